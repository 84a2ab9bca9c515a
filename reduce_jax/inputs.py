"""The run's model, data and starting weights, checked before any compute.

Each is the built-in one the config names (``--model``, ``--dataset``; the baseline trained by
the tool) or your own: a Flax module, a ``Dataset``, trained variables given to
``reduce_jax.run``, or an orbax checkpoint (``--init_checkpoint``). ``resolve`` loads and
checks them together, from shapes (``jax.eval_shape``), before the workdir is touched: the
model must run on the images, give one logit per class, hold only kernels the array can
place, and the weights must have the model's tree and shapes. Every problem is a one-line
``ConfigError`` naming the file, flag or parameter path.

Inputs that would run to nonsense are refused too: a batch larger than the training split, and
a baseline or target at chance (``chance_level``). What is legal but may mislead (given weights
judged on a validation split held out of the training set, a validation accuracy far above the
test accuracy) becomes a warning in the log and in ``summary.json``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from reduce_jax import data as data_lib
from reduce_jax.config import ReduceConfig
from reduce_jax.errors import ConfigError
from reduce_jax.hardware import systolic
from reduce_jax.nets import models
from reduce_jax.stages import baseline as baseline_lib

PyTree = Any

# Where the baseline comes from (summary.json's baseline.source).
SOURCES = ("trained", "checkpoint", "given")
# Where the validation split comes from (summary.json's inputs.validation_split).
VALIDATION_SPLITS = ("held_out", "given")
# An accuracy within this many binomial standard deviations of guessing reads as chance;
# a validation accuracy this many standard errors above the test accuracy is flagged.
CHANCE_SIGMAS = 3.0
GAP_SIGMAS = 3.0


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
      validation_split: ``held_out`` (``--validation_fraction`` of the training set) or
        ``given`` (the dataset's own ``x_val``, ``y_val``).
      warnings: what the run warns about its inputs (logged, and in ``summary.json``).
    """

    model: nn.Module
    dataset: data_lib.Dataset
    abstract: dict
    variables: dict | None
    source: str
    model_id: str
    dataset_id: str
    baseline_sha256: str | None
    validation_split: str = "held_out"
    warnings: tuple[str, ...] = ()

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
            validation_split=self.validation_split,
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
        array cannot place, weights that do not match the model (naming file and key), a
        batch larger than the training split, given weights or a target at chance.
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
    split = "given" if ds.val_images is not None else "held_out"
    if ds.val_images is None:  # a given dataset may bring its own validation split
        ds = data_lib.split_validation(ds, cfg.validation_fraction)
    _check_batch_size(cfg, ds, split)
    if cfg.target_accuracy is not None:
        check_target(cfg, cfg.target_accuracy, None, ds)
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
    warnings = ()
    if weights is not None:  # measured now, so that weights at chance are refused at once
        accuracy = _accuracy(net, weights, ds.val_images, ds.val_labels, cfg.eval_batch_size)
        check_target(cfg, accuracy, _given_name(cfg, source), ds)
        if split == "held_out":
            warnings = (_held_out_warning(cfg, source),)
    return Inputs(
        model=net,
        dataset=ds,
        abstract=abstract,
        variables=weights,
        source=source,
        model_id=cfg.model if model is None else _module_id(net),
        dataset_id=ds.name if dataset is None and cfg.dataset != "npz" else _dataset_id(ds),
        baseline_sha256=None if weights is None else _sha256(jax.tree.leaves(weights)),
        validation_split=split,
        warnings=warnings,
    )


def chance_level(num_classes: int, images: int, sigmas: float = CHANCE_SIGMAS) -> float:
    """The highest accuracy that still reads as guessing on ``images`` images: ``1/classes``
    plus ``sigmas`` binomial standard deviations of a guesser's accuracy on that many."""
    p = 1.0 / num_classes
    return p + sigmas * math.sqrt(p * (1.0 - p) / images)


def check_target(cfg: ReduceConfig, accuracy: float, given: str | None, ds) -> None:
    """Refuses a baseline (given weights) or a target at chance on the validation split.

    Args:
      cfg: the settings (the target is ``--target_accuracy``, else ``accuracy`` less
        ``--max_accuracy_drop``).
      accuracy: the baseline's validation accuracy, or ``--target_accuracy`` itself when
        the baseline is not measured yet.
      given: how the weights were given (``--init_checkpoint=PATH``, ``variables``), for
        weights that must not be at chance; None for a baseline the tool trained.
      ds: the dataset, with its validation split.

    Raises:
      ConfigError: naming the weights or the flag, the value and the chance level.
    """
    n, k = len(ds.val_labels), ds.num_classes
    level = chance_level(k, n)
    chance = (
        f"chance on {n} validation images of {k} classes (1/{k} = {1 / k:.4f}, plus "
        f"{CHANCE_SIGMAS:g} binomial standard deviations: {level:.4f})"
    )
    if given is not None and accuracy <= level:
        raise ConfigError(
            f"{given}: the baseline's validation accuracy {accuracy:.4f} is at or near {chance}; "
            "give trained weights"
        )
    if cfg.target_accuracy is not None:
        target, flag = cfg.target_accuracy, f"--target_accuracy={cfg.target_accuracy}"
    else:
        target = accuracy - cfg.max_accuracy_drop
        flag = f"--max_accuracy_drop={cfg.max_accuracy_drop} below the baseline's {accuracy:.4f}"
    if target <= level:
        raise ConfigError(
            f"the target accuracy {target:.4f} ({flag}) is at or below {chance}: a chip that "
            f"guesses would meet it; the target must be above {level:.4f}"
        )


def baseline_warnings(
    inp: Inputs, accuracy: float, test_accuracy: float, sigmas: float = GAP_SIGMAS
) -> list[str]:
    """The run's warnings about its inputs and baseline, each also logged.

    ``inp.warnings``, and one more when the baseline's validation accuracy reads more than
    ``sigmas`` standard errors above its test accuracy (two-proportion z-test,
    ``accuracy_gap_z``): the target, taken from the validation split, may then be out of
    reach on chips that are as good as the baseline on new data.
    """
    warnings = list(inp.warnings)
    ds = inp.dataset
    nv, nt = len(ds.val_labels), len(ds.test_labels)
    z = accuracy_gap_z(accuracy, nv, test_accuracy, nt)
    if z > sigmas:
        warnings.append(
            f"the baseline's validation accuracy {accuracy:.4f} ({nv} images) is {z:.1f} "
            f"standard errors above its test accuracy {test_accuracy:.4f} ({nt} images), more "
            "than the two splits' noise: the validation split may overlap the data the weights "
            "were trained on, and the target taken from it may be out of reach; "
            f"{_OWN_SPLIT}"
        )
    for w in warnings:
        logging.warning("%s", w)
    return warnings


def accuracy_gap_z(accuracy: float, images: int, other: float, other_images: int) -> float:
    """How many standard errors ``accuracy`` (on ``images`` images) lies above ``other`` (on
    ``other_images``): the two-proportion z statistic with the pooled proportion; 0 when
    both are 0 or both 1."""
    pooled = (accuracy * images + other * other_images) / (images + other_images)
    var = pooled * (1.0 - pooled) * (1.0 / images + 1.0 / other_images)
    return (accuracy - other) / math.sqrt(var) if var > 0 else 0.0


_OWN_SPLIT = (
    "pass your own validation split (x_val and y_val in the --dataset=npz file, or "
    "Dataset.from_arrays(..., x_val=, y_val=))"
)


def _given_name(cfg: ReduceConfig, source: str) -> str:
    return f"--init_checkpoint={cfg.init_checkpoint}" if source == "checkpoint" else "variables"


def _held_out_warning(cfg: ReduceConfig, source: str) -> str:
    return (
        f"the baseline is given ({_given_name(cfg, source)}) but the validation split is held "
        f"out of the training set (--validation_fraction={cfg.validation_fraction}), on which "
        "the weights were most likely trained (unless they were trained with this same split "
        "held out, as a run's baseline/ is): its accuracy may read high and the target be out "
        f"of reach; {_OWN_SPLIT}"
    )


def _check_batch_size(cfg: ReduceConfig, ds: data_lib.Dataset, split: str) -> None:
    n = len(ds.train_labels)
    if cfg.batch_size > n:
        held = (
            f" after holding out --validation_fraction={cfg.validation_fraction}"
            if split == "held_out"
            else ""
        )
        raise ConfigError(
            f"--batch_size={cfg.batch_size} is larger than the training split ({n} images"
            f"{held}); use at most {n}"
        )


def _accuracy(model: nn.Module, variables: dict, images, labels, batch: int) -> float:
    """Share of ``images`` ``float32[V, H, W, C]`` the model (evaluation mode) classifies as
    ``labels`` ``int[V]``, in batches of ``batch`` (the last one padded)."""
    predict = jax.jit(lambda v, x: jnp.argmax(models.apply(model, v, x, train=False), -1))
    n = len(labels)
    batch = min(batch, n)
    padded = np.concatenate([images, np.zeros((-n % batch, *images.shape[1:]), images.dtype)])
    preds = [np.asarray(predict(variables, padded[i : i + batch])) for i in range(0, n, batch)]
    return float(np.mean(np.concatenate(preds)[:n] == labels))


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
