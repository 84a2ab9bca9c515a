"""The fault-free baseline: trained from scratch once, checkpointed (orbax), reused.

The checkpoint holds the model's Flax variables, ``{"params", "batch_stats"}``
(``batch_stats`` is empty for models without BatchNorm).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from reduce_jax.data import Dataset
from reduce_jax.engine import train
from reduce_jax.errors import ConfigError
from reduce_jax.nets import models

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


class BaselineSpec(NamedTuple):
    """What determines the baseline; a checkpoint is reused only if this matches.

    Attributes:
      dataset: the dataset's name; model: the model's name; width: its width multiplier.
      epochs: training epochs; batch_size: training batch size.
      optimizer, learning_rate, weight_decay, schedule: as ``train.make_optimizer``.
      augment: random crop and flip of every batch (``augment.crop_flip``).
      seed: the run's seed.
    """

    dataset: str
    model: str
    width: float
    epochs: float
    batch_size: int
    optimizer: str
    learning_rate: float
    weight_decay: float
    schedule: str
    augment: bool
    seed: int

    def as_dict(self) -> dict:
        """``baseline.json``'s ``config`` (plain JSON values: build the spec from them)."""
        return self._asdict()


def train_baseline(model, data: Dataset, key: jax.Array, spec: BaselineSpec) -> tuple[PyTree, dict]:
    """Trains ``model`` from scratch on ``data`` (no faults).

    Uses the population machinery with one chip whose mask is all ones, so the baseline goes
    through exactly the code path that retraining uses.

    Returns:
      ``(variables, info)``: ``{"params", "batch_stats"}`` and
      ``info = {train_s, steps, accuracy}`` (validation accuracy).
    """
    init_key, data_key = jax.random.split(key)
    variables = models.init_variables(model, init_key, data.image_shape)
    spe = train.steps_per_epoch(len(data.train_labels), spec.batch_size)
    total = int(train.epochs_to_steps(spec.epochs, spe))
    tx = train.make_optimizer(
        spec.optimizer, spec.learning_rate, spec.weight_decay, spec.schedule, total
    )
    trainer = train.make_trainer(model, tx, spec.batch_size, augment=spec.augment)
    ones = train.unit_masks(variables["params"])
    state = trainer.init_population(variables, ones, jnp.array([total], jnp.int32))
    images, labels = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
    # Progress and the recorded accuracy are on the validation split (the test set reports
    # only); a dataset without one is evaluated on its test set.
    held_out = (data.val_images, data.val_labels) if data.val_images is not None else None
    val_x, val_y = map(jnp.asarray, held_out or (data.test_images, data.test_labels))
    start = time.perf_counter()
    done = 0
    while done < total:
        n = min(spe, total - done)
        state = trainer.run(state, ones, images, labels, data_key, done, n)
        done += n
        if done % (5 * spe) == 0 or done == total:
            acc = float(trainer.evaluate(state.variables, ones, val_x, val_y)[0])
            logging.info(
                "baseline: epoch %.1f/%g validation accuracy %.4f", done / spe, spec.epochs, acc
            )
    if bool(state.diverged[0]):
        raise FloatingPointError(
            "baseline training diverged (non-finite loss); lower --baseline_learning_rate"
        )
    accuracy = float(trainer.evaluate(state.variables, ones, val_x, val_y)[0])
    info = dict(train_s=time.perf_counter() - start, steps=total, accuracy=accuracy)
    return train.slice_chips(state.variables, 0), info


def _checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer of this process alone: in a multi-process run only process 0 saves the
    baseline, and every process reads it on its own (no collective save or restore)."""
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def save_baseline(workdir: str, variables: PyTree, config: dict, info: dict) -> None:
    """Writes the checkpoint of ``{"params", "batch_stats"}`` and its metadata; the metadata
    file is written last, atomically."""
    path = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    meta = os.path.join(workdir, "baseline.json")
    if os.path.exists(meta):  # first, so a kill below never pairs old metadata with new params
        os.remove(meta)
    if os.path.exists(path):
        shutil.rmtree(path)
    with _quiet_orbax():
        ckpt = _checkpointer()
        # As numpy: orbax refuses to save a process's own jax.Arrays in a multi-process run.
        ckpt.save(path, jax.tree.map(np.asarray, variables))
        ckpt.wait_until_finished()
    with open(meta + ".tmp", "w") as f:
        json.dump(dict(config=config, info=info), f, indent=1)
    os.replace(meta + ".tmp", meta)


def load_baseline(
    workdir: str, abstract_variables: PyTree, config: dict, quiet: bool = False
) -> tuple[PyTree, dict] | None:
    """The saved variables if they exist and were trained with ``config``; else None (with a
    warning when they were trained with other settings, unless ``quiet``)."""
    meta = os.path.join(workdir, "baseline.json")
    path = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if not (os.path.isfile(meta) and os.path.isdir(path)):
        return None
    with open(meta) as f:
        saved = json.load(f)
    if saved.get("config") != config:
        if not quiet:
            logging.warning("baseline in %s was trained with other settings; retraining", workdir)
        return None
    with _quiet_orbax():
        target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_variables)
        variables = _checkpointer().restore(path, target)
    return variables, saved["info"]


def wait_for_baseline(
    workdir: str, abstract_variables: PyTree, config: dict, poll_s: float = 0.5
) -> tuple[PyTree, dict]:
    """The baseline that process 0 trains with ``config`` and saves in ``workdir``, once it
    is there (``save_baseline`` writes the metadata last, so a found one is complete).

    No timeout of its own: if process 0 fails, ``jax.distributed`` ends the others.
    """
    logging.info("baseline: waiting for process 0's checkpoint in %s", workdir)
    while True:
        loaded = load_baseline(workdir, abstract_variables, config, quiet=True)
        if loaded is not None:
            logging.info("baseline: read process 0's checkpoint in %s", workdir)
            return loaded
        time.sleep(poll_s)


def get_baseline(
    workdir: str | None, model, data: Dataset, key: jax.Array, spec: BaselineSpec
) -> tuple[PyTree, dict]:
    """Loads the baseline from ``workdir`` or trains (and saves) it.

    In a multi-process run (``jax.distributed``) process 0 does this and every other process
    waits for its checkpoint in ``workdir`` (shared by all processes) and reads it; without a
    ``workdir`` every process trains the same baseline (same key, same parameters).

    Args:
      workdir: where the checkpoint is kept (None: train, keep nothing).
      model: the Flax module (built-in or your own: ``spec.model`` names it).
      data: the dataset (with its validation split).
      key: the baseline's random stream (initialisation and batch order).
      spec: the training settings; the checkpoint is reused only if it was trained with the
        same (and on as many training examples).

    Returns:
      ``(variables, info)``: ``{"params", "batch_stats"}``; ``info`` has ``accuracy``
      (validation), ``train_s``, ``steps`` and ``reused`` (True when loaded from the
      checkpoint).
    """
    # The training set without its validation split: the split is part of what trained it.
    config = dict(spec.as_dict(), train_examples=len(data.train_labels))
    if workdir is not None:
        abstract = jax.eval_shape(
            lambda: models.init_variables(model, jax.random.key(0), data.image_shape)
        )
        if jax.process_index() > 0:
            # Multi-process runs: process 0 trains and saves the baseline; the others read it.
            variables, info = wait_for_baseline(workdir, abstract, config)
            return jax.tree.map(np.asarray, variables), dict(info, reused=True)
        loaded = load_baseline(workdir, abstract, config)
        if loaded is not None:
            variables, info = loaded
            logging.info("baseline: reused checkpoint in %s", workdir)
            return jax.tree.map(np.asarray, variables), dict(info, reused=True)
    variables, info = train_baseline(model, data, key, spec)
    if workdir is not None:
        save_baseline(workdir, variables, config, info)
    return variables, dict(info, reused=False)


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
    saved = checkpoint_tree(path)
    if "params" in saved:  # variables: restore the collections it holds
        target = {k: v for k, v in abstract_variables.items() if k in saved}
    else:
        target = abstract_variables["params"]
    with _quiet_orbax():
        tree = ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
    # A model without BatchNorm: its checkpoint may lack the empty batch_stats.
    return {"batch_stats": {}, **as_variables(jax.tree.map(np.asarray, tree))}
