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

PyTree = Any

CHECKPOINT_DIR = "baseline"


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs every save and restore at INFO; keep the run's log readable."""
    level = logging.get_verbosity()
    logging.set_verbosity(min(level, logging.WARNING))  # absl: lower = quieter
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


def _checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer of this process alone: in a multi-process run only process 0 saves the
    baseline, and every process reads it on its own (no collective save or restore)."""
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def save_baseline(workdir: str, params: PyTree, config: dict, info: dict) -> None:
    """Writes the checkpoint and its metadata; the metadata file is written last, atomically."""
    path = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    meta = os.path.join(workdir, "baseline.json")
    if os.path.exists(meta):  # first, so a kill below never pairs old metadata with new params
        os.remove(meta)
    if os.path.exists(path):
        shutil.rmtree(path)
    with _quiet_orbax():
        ckpt = _checkpointer()
        # As numpy: orbax refuses to save a process's own jax.Arrays in a multi-process run.
        ckpt.save(path, jax.tree.map(np.asarray, params))
        ckpt.wait_until_finished()
    with open(meta + ".tmp", "w") as f:
        json.dump(dict(config=config, info=info), f, indent=1)
    os.replace(meta + ".tmp", meta)


def load_baseline(
    workdir: str, abstract_params: PyTree, config: dict, quiet: bool = False
) -> tuple[PyTree, dict] | None:
    """The saved baseline if it exists and was trained with ``config``; else None (with a
    warning when it was trained with other settings, unless ``quiet``)."""
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
        target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_params)
        params = _checkpointer().restore(path, target)
    return params, saved["info"]


def wait_for_baseline(
    workdir: str, abstract_params: PyTree, config: dict, poll_s: float = 0.5
) -> tuple[PyTree, dict]:
    """The baseline that process 0 trains with ``config`` and saves in ``workdir``, once it
    is there (``save_baseline`` writes the metadata last, so a found one is complete).

    No timeout of its own: if process 0 fails, ``jax.distributed`` ends the others.
    """
    logging.info("baseline: waiting for process 0's checkpoint in %s", workdir)
    while True:
        loaded = load_baseline(workdir, abstract_params, config, quiet=True)
        if loaded is not None:
            logging.info("baseline: read process 0's checkpoint in %s", workdir)
            return loaded
        time.sleep(poll_s)


def get_baseline(
    workdir: str | None,
    model_name: str,
    data: Dataset,
    key: jax.Array,
    epochs: float,
    batch_size: int,
    optimizer: str,
    lr: float,
    seed: int,
) -> tuple[PyTree, dict]:
    """Loads the baseline from ``workdir`` or trains (and saves) it.

    In a multi-process run (``jax.distributed``) process 0 does this and every other process
    waits for its checkpoint in ``workdir`` (shared by all processes) and reads it; without a
    ``workdir`` every process trains the same baseline (same key, same parameters).

    Returns:
      ``(params, info)``; ``info`` has ``test_accuracy``, ``train_s``, ``steps`` and
      ``reused`` (True when loaded from the checkpoint).
    """
    model = models.get_model(model_name, data.num_classes)
    config = baseline_config(data.name, model_name, epochs, batch_size, optimizer, lr, seed)
    if workdir is not None:
        abstract = jax.eval_shape(
            lambda: models.init_params(model, jax.random.key(0), data.image_shape)
        )
        if jax.process_index() > 0:
            # Multi-process runs: process 0 trains and saves the baseline; the others read it.
            params, info = wait_for_baseline(workdir, abstract, config)
            return jax.tree.map(np.asarray, params), dict(info, reused=True)
        loaded = load_baseline(workdir, abstract, config)
        if loaded is not None:
            params, info = loaded
            logging.info("baseline: reused checkpoint in %s", workdir)
            return jax.tree.map(np.asarray, params), dict(info, reused=True)
    params, info = train_baseline(model, data, key, epochs, batch_size, optimizer, lr)
    if workdir is not None:
        save_baseline(workdir, params, config, info)
    return params, dict(info, reused=False)
