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
      ``(params, info)`` with ``info = {train_s, steps, accuracy}`` (validation accuracy).
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
            acc = float(trainer.evaluate(state.params, ones, val_x, val_y)[0])
            logging.info(
                "baseline: epoch %.1f/%g validation accuracy %.4f", done / spe, epochs, acc
            )
    if bool(state.diverged[0]):
        raise FloatingPointError(
            "baseline training diverged (non-finite loss); lower --baseline_learning_rate"
        )
    accuracy = float(trainer.evaluate(state.params, ones, val_x, val_y)[0])
    info = dict(train_s=time.perf_counter() - start, steps=total, accuracy=accuracy)
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

    Returns:
      ``(params, info)``; ``info`` has ``accuracy`` (validation), ``train_s``, ``steps`` and
      ``reused`` (True when loaded from the checkpoint).
    """
    model = models.get_model(model_name, data.num_classes)
    if jax.process_count() > 1:
        # Orbax saves collectively across processes; the baseline is cheap next to the
        # study, so multi-host runs train it on every process (same seed, same params).
        workdir = None
    config = baseline_config(data.name, model_name, epochs, batch_size, optimizer, lr, seed)
    config["train_examples"] = len(data.train_labels)  # the validation split is held out
    if workdir is not None:
        abstract = jax.eval_shape(
            lambda: models.init_params(model, jax.random.key(0), data.image_shape)
        )
        loaded = load_baseline(workdir, abstract, config)
        if loaded is not None:
            params, info = loaded
            logging.info("baseline: reused checkpoint in %s", workdir)
            return jax.tree.map(np.asarray, params), dict(info, reused=True)
    params, info = train_baseline(model, data, key, epochs, batch_size, optimizer, lr)
    if workdir is not None:
        save_baseline(workdir, params, config, info)
    return params, dict(info, reused=False)
