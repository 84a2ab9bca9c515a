"""The run's model, data and starting weights, checked before any compute.

Each is the built-in one the config names (``--model``, ``--dataset``; the baseline trained by
the tool) or your own: a Flax module, a ``Dataset``, trained variables given to
``reduce_jax.run``, or an orbax checkpoint (``--init_checkpoint``). ``resolve`` loads and
checks them together, from shapes (``jax.eval_shape``), before the workdir is touched: the
model must run on the images, give one logit per class, hold only kernels the array can
place, and the weights must have the model's tree and shapes. Every problem is a one-line
``ConfigError`` naming the file, flag or parameter path.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reduce_jax import data as data_lib
from reduce_jax.config import ReduceConfig
from reduce_jax.errors import ConfigError
from reduce_jax.hardware import systolic
from reduce_jax.nets import models
from reduce_jax.stages import baseline as baseline_lib

PyTree = Any

# Where the baseline comes from (summary.json's baseline.source).
SOURCES = ("trained", "checkpoint", "given")


class Inputs(NamedTuple):
    """What a run computes on.

    Attributes:
      model: the Flax module.
      dataset: the data.
      abstract: the model's variables for the data's images, ``ShapeDtypeStruct`` leaves.
      variables: the baseline's variables (numpy) when the tool does not train it, else None.
      source: one of ``SOURCES``.
      model_id: ``--model``'s name, or ``ClassName@sha256:...`` of a given module's
        attributes; keys the baseline checkpoint and the saved progress.
      dataset_id: the dataset's name, or ``name@sha256:...`` of its arrays (npz and given).
      baseline_sha256: of the given or restored variables (None when trained).
    """

    model: nn.Module
    dataset: data_lib.Dataset
    abstract: dict
    variables: dict | None
    source: str
    model_id: str
    dataset_id: str
    baseline_sha256: str | None

    def describe(self) -> dict:
        """``summary.json``'s ``inputs``."""
        ds = self.dataset
        return dict(
            model=self.model_id,
            dataset=self.dataset_id,
            image_shape=list(ds.image_shape),
            num_classes=ds.num_classes,
            train_images=len(ds.train_labels),
            val_images=len(ds.val_labels),
            test_images=len(ds.test_labels),
        )


def resolve(
    cfg: ReduceConfig,
    model: nn.Module | None = None,
    variables: dict | None = None,
    dataset: data_lib.Dataset | None = None,
) -> Inputs:
    """The run's inputs: given ones, else those the config names; checked together.

    Args:
      cfg: the (validated) config; ``model`` and ``dataset`` replace ``cfg.model`` and
        ``cfg.dataset``/``cfg.data_dir``; ``cfg.init_checkpoint`` is an alternative to
        ``variables``.
      model: a Flax linen module called as ``model.apply(variables, x, train=...)``
        (``models.apply``), returning ``float[B, classes]`` logits.
      variables: trained ``{'params': ...}`` of ``model`` for the dataset's images.
      dataset: the data; without a validation split, ``data.split_validation`` holds
        ``cfg.validation_fraction`` of its training set out (as for the built-in datasets).

    Raises:
      ConfigError: a wrong type, a model that does not run on the images, a kernel the
        array cannot place, weights that do not match the model (naming file and key).
      DatasetError: a dataset file that cannot be read.
    """
    if dataset is not None and not isinstance(dataset, data_lib.Dataset):
        raise ConfigError(
            f"dataset must be a reduce_jax.Dataset (Dataset.from_arrays builds one), "
            f"got {type(dataset).__name__}"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a flax.linen.Module, got {type(model).__name__}")
    if variables is not None and cfg.init_checkpoint is not None:
        raise ConfigError("give either variables or --init_checkpoint, not both")
    ds = dataset if dataset is not None else data_lib.load_dataset(cfg.dataset, cfg.data_dir)
    if ds.val_images is None:  # a given dataset may bring its own validation split
        ds = data_lib.split_validation(ds, cfg.validation_fraction)
    net = model
    if net is None:
        net = models.get_model(cfg.model, ds.num_classes, cfg.model_width)
    images = _images_name(cfg, dataset is not None, ds)
    abstract = abstract_variables(net, ds, images)
    systolic.check_mappable(abstract["params"], models.kernel_inputs(net, ds.image_shape))
    source, weights = "trained", None
    if variables is not None:
        source, weights = "given", _given_variables(variables, abstract, images)
    elif cfg.init_checkpoint is not None:
        source, weights = "checkpoint", _checkpoint_variables(cfg.init_checkpoint, abstract, images)
    return Inputs(
        model=net,
        dataset=ds,
        abstract=abstract,
        variables=weights,
        source=source,
        model_id=cfg.model if model is None else _module_id(net),
        dataset_id=ds.name if dataset is None and cfg.dataset != "npz" else _dataset_id(ds),
        baseline_sha256=None if weights is None else _sha256(jax.tree.leaves(weights)),
    )


def _images_name(cfg: ReduceConfig, given: bool, ds: data_lib.Dataset) -> str:
    """The images, named for messages: ``images [8, 8, 1] of --data_dir=x.npz``."""
    if given:
        where = f"dataset {ds.name!r}"
    elif cfg.data_dir is not None:
        where = f"--data_dir={cfg.data_dir}"
    else:
        where = f"--dataset={cfg.dataset}"
    return f"images {list(ds.image_shape)} of {where}"


def abstract_variables(model: nn.Module, ds: data_lib.Dataset, images: str) -> dict:
    """The model's variables for the dataset's images (shapes only), checked: the model
    initialises and runs on them in both modes (``batch_stats`` is BatchNorm's, ``{}`` for a
    model without it), has no collection besides ``params`` and ``batch_stats``, and returns
    ``[B, K]`` logits with ``K >= num_classes``.

    Raises:
      ConfigError: naming the model and the images.
    """
    name = type(model).__name__
    abstract = _trace(
        name, f"does not initialise on {images}",
        lambda: models.init_variables(model, jax.random.key(0), ds.image_shape),
    )  # fmt: skip
    x1 = jnp.zeros((1, *ds.image_shape), jnp.float32)
    every = jax.eval_shape(lambda: model.init(jax.random.key(0), x1, train=False))
    extra = sorted(set(every) - {"params", "batch_stats"})
    if extra:
        raise ConfigError(
            f"model {name} has variable collections {extra} besides 'params' and "
            "'batch_stats': not supported; use a model without them"
        )
    x = jax.ShapeDtypeStruct((2, *ds.image_shape), jnp.float32)
    for train in (False, True):
        logits = _trace(
            name, f"does not run on {images} with train={train}",
            lambda v, x, t=train: _logits(model, v, x, t), abstract, x,
        )  # fmt: skip
    shape = tuple(getattr(logits, "shape", ()))
    if len(shape) != 2 or shape[1] < ds.num_classes:
        raise ConfigError(
            f"model {name} returns {list(shape)} on {images}; it must return logits "
            f"[batch, classes] with at least num_classes={ds.num_classes} classes"
        )
    return abstract


def _logits(model: nn.Module, variables: dict, x: jax.Array, train: bool) -> jax.Array:
    """The model's logits as the population computes them: in train mode BatchNorm updates
    its ``batch_stats`` (``mutable``), which are dropped here."""
    if train:
        return models.apply(model, variables, x, train=True, mutable=["batch_stats"])[0]
    return models.apply(model, variables, x, train=False)


def _trace(name: str, what: str, fn, *args):
    """``jax.eval_shape(fn, *args)``; whatever a foreign module raises becomes one line."""
    try:
        return jax.eval_shape(fn, *args)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"model {name} {what}: {type(e).__name__}: {first}") from None


def _path(path: tuple) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def check_tree(got: PyTree, expected: PyTree, where: str, images: str) -> None:
    """``got`` has ``expected``'s keys and leaf shapes (dtypes may differ: they are cast).

    Raises:
      ConfigError: ``where`` and the first missing, unexpected or mis-shaped key.
    """
    flat = lambda t: {_path(p): tuple(np.shape(x)) for p, x in jax.tree.leaves_with_path(t)}
    have, need = flat(got), flat(expected)
    for key in need:
        if key not in have:
            raise ConfigError(f"{where}: missing key {key} that the model needs")
    for key in have:
        if key not in need:
            raise ConfigError(f"{where}: key {key} is not a variable of the model")
    for key, shape in need.items():
        if have[key] != shape:
            raise ConfigError(
                f"{where}: key {key} has shape {list(have[key])} but the model on {images} "
                f"needs {list(shape)}"
            )


def _given_variables(variables, abstract: dict, images: str) -> dict:
    if not isinstance(variables, dict) or "params" not in variables:
        raise ConfigError("variables must be Flax variables {'params': ...}")
    check_tree(variables, abstract, "variables", images)
    # A model without BatchNorm may come without its (empty) batch_stats.
    variables = {"batch_stats": {}, **variables}
    return jax.tree.map(lambda x, a: np.asarray(x, a.dtype), variables, abstract)


def _checkpoint_variables(path: str, abstract: dict, images: str) -> dict:
    tree = baseline_lib.as_variables(baseline_lib.checkpoint_tree(path))
    check_tree(tree, abstract, f"--init_checkpoint={path}", images)
    try:
        return baseline_lib.restore_variables(path, abstract)
    except Exception as e:  # a damaged checkpoint whose metadata was readable
        raise ConfigError(f"--init_checkpoint={path}: cannot restore ({type(e).__name__})") from e


def _sha256(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _module_id(model: nn.Module) -> str:
    """``ClassName@sha256:<16 hex>`` of the module's class and attributes (its ``repr``);
    the code of its ``__call__`` is not part of it."""
    text = f"{type(model).__module__}.{type(model).__qualname__}:{model!r}"
    return f"{type(model).__name__}@sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _dataset_id(ds: data_lib.Dataset) -> str:
    arrays = (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
    arrays += (ds.val_images, ds.val_labels)
    return f"{ds.name}@sha256:{_sha256(arrays)[:16]}"
