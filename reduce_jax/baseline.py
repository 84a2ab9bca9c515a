"""The fault-free baseline: trained from scratch once, checkpointed (orbax), reused."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from reduce_jax import models, train
from reduce_jax.data import Dataset
from reduce_jax.errors import ConfigError

PyTree = Any

CHECKPOINT_DIR = "baseline"


@contextlib.contextmanager
def _quiet_orbax(quietest: int = logging.WARNING):
    """Orbax logs every save and restore at INFO; keep the run's log readable (log nothing
    below ``quietest``)."""
    level = logging.get_verbosity()
    logging.set_verbosity(min(level, quietest))  # absl: lower = quieter
    try:
        yield
    finally:
        logging.set_verbosity(level)


def baseline_config(
    dataset: str, model: str, epochs: float, batch_size: int, optimizer: str, lr: float, seed: int
) -> dict:
    """What determines the baseline; a checkpoint is reused only if this matches."""
    return dict(
        dataset=dataset,
        model=model,
        epochs=float(epochs),
        batch_size=int(batch_size),
        optimizer=optimizer,
        learning_rate=float(lr),
        seed=int(seed),
    )


def train_baseline(
    model, data: Dataset, key: jax.Array, epochs: float, batch_size: int, optimizer: str, lr: float
) -> tuple[PyTree, dict]:
    """Trains ``model`` from scratch on ``data`` (no faults).

    Uses the population machinery with one chip whose mask is all ones, so the baseline goes
    through exactly the code path that retraining uses.

    Returns:
      ``(params, info)`` with ``info = {train_s, steps, test_accuracy}``.
    """
    init_key, data_key = jax.random.split(key)
    params = models.init_params(model, init_key, data.image_shape)
    tx = train.make_optimizer(optimizer, lr)
    trainer = train.make_trainer(model, tx, batch_size)
    spe = train.steps_per_epoch(len(data.train_labels), batch_size)
    total = int(train.epochs_to_steps(epochs, spe))
    ones = train.unit_masks(params)
    state = trainer.init_population(params, ones, jnp.array([total], jnp.int32))
    images, labels = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
    test_x, test_y = jnp.asarray(data.test_images), jnp.asarray(data.test_labels)
    start = time.perf_counter()
    done = 0
    while done < total:
        n = min(spe, total - done)
        state = trainer.run(state, ones, images, labels, data_key, done, n)
        done += n
        if done % (5 * spe) == 0 or done == total:
            acc = float(trainer.evaluate(state.params, ones, test_x, test_y)[0])
            logging.info("baseline: epoch %.1f/%g test accuracy %.4f", done / spe, epochs, acc)
    if bool(state.diverged[0]):
        raise FloatingPointError(
            "baseline training diverged (non-finite loss); lower --baseline_learning_rate"
        )
    accuracy = float(trainer.evaluate(state.params, ones, test_x, test_y)[0])
    info = dict(train_s=time.perf_counter() - start, steps=total, test_accuracy=accuracy)
    return train.slice_chips(state.params, 0), info


def save_baseline(workdir: str, params: PyTree, config: dict, info: dict) -> None:
    """Writes the checkpoint and its metadata; the metadata file is written last, atomically."""
    path = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    meta = os.path.join(workdir, "baseline.json")
    if os.path.exists(meta):  # first, so a kill below never pairs old metadata with new params
        os.remove(meta)
    if os.path.exists(path):
        shutil.rmtree(path)
    with _quiet_orbax():
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(path, params)
        ckpt.wait_until_finished()
    with open(meta + ".tmp", "w") as f:
        json.dump(dict(config=config, info=info), f, indent=1)
    os.replace(meta + ".tmp", meta)


def load_baseline(
    workdir: str, abstract_params: PyTree, config: dict
) -> tuple[PyTree, dict] | None:
    """The saved baseline if it exists and was trained with ``config``; else None."""
    meta = os.path.join(workdir, "baseline.json")
    path = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if not (os.path.isfile(meta) and os.path.isdir(path)):
        return None
    with open(meta) as f:
        saved = json.load(f)
    if saved.get("config") != config:
        logging.warning("baseline in %s was trained with other settings; retraining", workdir)
        return None
    with _quiet_orbax():
        params = ocp.StandardCheckpointer().restore(path, abstract_params)
    return params, saved["info"]


def get_baseline(
    workdir: str | None, model, data: Dataset, key: jax.Array, config: dict
) -> tuple[PyTree, dict]:
    """Loads the baseline from ``workdir`` or trains (and saves) it.

    Args:
      workdir: where the checkpoint is kept (None: train, keep nothing).
      model: the Flax module.
      data: the dataset.
      key: the baseline's random stream (initialisation and batch order).
      config: ``baseline_config(...)``: the training settings; the checkpoint is reused
        only if it was trained with the same.

    Returns:
      ``(params, info)``; ``info`` has ``test_accuracy``, ``train_s``, ``steps`` and
      ``reused`` (True when loaded from the checkpoint).
    """
    if jax.process_count() > 1:
        # Orbax saves collectively across processes; the baseline is cheap next to the
        # study, so multi-host runs train it on every process (same seed, same params).
        workdir = None
    if workdir is not None:
        abstract = jax.eval_shape(
            lambda: models.init_params(model, jax.random.key(0), data.image_shape)
        )
        loaded = load_baseline(workdir, abstract, config)
        if loaded is not None:
            params, info = loaded
            logging.info("baseline: reused checkpoint in %s", workdir)
            return jax.tree.map(np.asarray, params), dict(info, reused=True)
    settings = (
        config["epochs"],
        config["batch_size"],
        config["optimizer"],
        config["learning_rate"],
    )
    params, info = train_baseline(model, data, key, *settings)
    if workdir is not None:
        save_baseline(workdir, params, config, info)
    return params, dict(info, reused=False)


def checkpoint_tree(path: str) -> PyTree:
    """The tree of an orbax checkpoint, ``ShapeDtypeStruct`` leaves, read from its metadata
    (no array is read).

    Raises:
      ConfigError: naming ``--init_checkpoint`` and ``path`` when it is no checkpoint.
    """
    if not os.path.isdir(path):
        raise ConfigError(f"--init_checkpoint={path} is not a directory")
    with _quiet_orbax(logging.ERROR):  # a directory that is no checkpoint: our message only
        try:
            meta = ocp.StandardCheckpointer().metadata(os.path.abspath(path)).item_metadata
        except Exception as e:  # any failure to read a foreign directory is a bad input
            raise ConfigError(f"--init_checkpoint={path}: unreadable ({type(e).__name__})") from e
    tree = getattr(meta, "tree", None)
    if not tree:
        raise ConfigError(
            f"--init_checkpoint={path} is not an orbax checkpoint (no tree metadata); give a "
            "directory written like a run's baseline/"
        )
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def as_variables(tree: PyTree) -> dict:
    """A checkpoint's tree as Flax variables: a tree with a top-level ``params`` is taken as
    variables (``{'params': ..., ...}``), any other (a run's ``baseline/``) as ``params``."""
    if isinstance(tree, dict) and "params" in tree:
        return dict(tree)
    return {"params": tree}


def restore_variables(path: str, abstract_variables: dict) -> dict:
    """The checkpoint's arrays as variables of the given (checked) structure; numpy leaves.

    Args:
      path: the checkpoint directory (``checkpoint_tree`` read it already).
      abstract_variables: ``{'params': ..., ...}`` of ``ShapeDtypeStruct`` that the
        checkpoint's tree matches (in ``as_variables``' sense).
    """
    target = abstract_variables
    if "params" not in checkpoint_tree(path):
        target = abstract_variables["params"]
    with _quiet_orbax():
        tree = ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
    return as_variables(jax.tree.map(np.asarray, tree))
