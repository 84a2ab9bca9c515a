"""Retraining a population of chips in chunks, with per-chip budgets and no wasted compute.

The population is processed in chunks of at most ``chips_per_batch`` chips (bounded memory).
Inside a chunk, a *phase* runs every chip for its own number of steps: the chips run
together until the smallest remaining budget is reached, then finished chips are dropped
and the rest continue, compacted to a power-of-four number of chips so that only a few
shapes are ever compiled (``Trainer.run`` never recompiles for new step counts). The
retraining stages hand the driver pools of several chunks, whose top-ups run together
(``retraining.retrain``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from reduce_jax import sharding
from reduce_jax.data import Dataset
from reduce_jax.engine import train
from reduce_jax.engine.progress import Meter, ProgressStore

PyTree = Any


class DeviceData(NamedTuple):
    """Train, validation and test sets on the device.

    Decisions (the resilience map, verification, top-ups) use the validation split; the test
    set only reports results.
    """

    train_images: jax.Array
    train_labels: jax.Array
    val_images: jax.Array
    val_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array

    @classmethod
    def from_dataset(cls, data: Dataset) -> DeviceData:
        """From a dataset with a validation split (``data.split_validation``)."""
        if data.val_images is None:
            raise ValueError(f"dataset {data.name!r} has no validation split")
        arrays = (
            data.train_images,
            data.train_labels,
            data.val_images,
            data.val_labels,
            data.test_images,
            data.test_labels,
        )
        return cls(*sharding.replicate([jnp.asarray(a) for a in arrays]))

    def split(self, name: str) -> tuple[jax.Array, jax.Array]:
        """``(images, labels)`` of the ``val`` or ``test`` split."""
        if name not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {name!r}")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])


def chunk_size(num_chips: int, chips_per_batch: int) -> int:
    """Chips per chunk: at most ``chips_per_batch``, a multiple of the number of devices."""
    return sharding.round_up(min(chips_per_batch, num_chips))


def bucket_size(n: int, cap: int) -> int:
    """Chips to compute for ``n`` active chips: the smallest power of 4 >= ``n`` (a multiple
    of the device count), at most ``cap``.

    Every distinct size is compiled once, and compiling is slow; powers of 4 bound the number
    of sizes to ``log4(cap) + 1`` while never computing more than 4x the active chips.
    """
    size = 1
    while size < n:
        size *= 4
    return min(cap, sharding.round_up(size))


# Gathers and scatters of chips are one compiled program per tree and number of chips (a
# bucket size), not one small program per leaf and per count of active chips, so the
# programs compiled, and the memory they hold, stay bounded by the few bucket sizes.
@jax.jit
def _gather(tree: PyTree, idx: jax.Array) -> PyTree:
    return jax.tree.map(lambda x: x[idx], tree)


@functools.partial(jax.jit, donate_argnums=0)
def _put(tree: PyTree, idx: jax.Array, values: PyTree) -> PyTree:
    """``tree`` with chips ``idx`` set to ``values``; an index past the end is dropped."""
    return jax.tree.map(lambda x, v: x.at[idx].set(v, mode="drop"), tree, values)


@functools.partial(jax.jit, static_argnums=1)
def _zeros(tree: PyTree, n: int) -> PyTree:
    return jax.tree.map(lambda x: jnp.zeros((n, *x.shape[1:]), x.dtype), tree)


def take(tree: PyTree, idx: np.ndarray) -> PyTree:
    """Chips ``idx`` (a multiple of the device count), sharded over the devices."""
    return sharding.shard_chips(_gather(tree, jnp.asarray(idx)))


def put(tree: PyTree, idx: np.ndarray, values: PyTree) -> PyTree:
    """``tree`` (donated) with chips ``idx`` set to ``values``; an index past the end is
    dropped (padding rows)."""
    return _put(tree, jnp.asarray(idx), values)


def zeros(tree: PyTree, n: int) -> PyTree:
    """``n`` chips of zeros shaped like ``tree``'s chips, sharded over the devices (filled
    in place by ``put``)."""
    return sharding.shard_chips(_zeros(tree, n))


def run_phase(
    trainer: train.Trainer,
    states: train.ChipState,
    chips: PyTree,
    data: DeviceData,
    phase_key: jax.Array,
    phase_steps: np.ndarray,
    on_progress: Callable[[int], None] | None = None,
    start: int = 0,
) -> train.ChipState:
    """Runs chip ``i`` for ``phase_steps[i]`` steps of a phase, from the phase's step ``start``.

    Budgets in ``states`` must allow the steps (``budget >= step + phase_steps``); a chip with
    a smaller budget stops at its budget. Chips whose steps are done are dropped from the
    computation.

    Args:
      trainer: from ``train.make_trainer``.
      states: ``ChipState[chips]``.
      chips: the chips (``trainer.chips``: under bypass, their masks).
      data: the training data on the device.
      phase_key: key of the phase's batch order.
      phase_steps: ``int[chips]`` steps to run per chip.
      on_progress: called with the number of chip-steps just completed (budgeted steps,
        not padding or gated steps).
      start: first phase step (batch ``batch_indices(phase_key, start)``).

    Returns:
      The updated ``ChipState[chips]``.
    """
    phase_steps = np.asarray(phase_steps, np.int64)
    n = len(phase_steps)
    ends = start + phase_steps
    active = np.flatnonzero(phase_steps > 0)
    t = start
    while active.size:
        t_next = int(ends[active].min())
        if active.size < n:
            pad = bucket_size(active.size, n) - active.size
            idx = np.concatenate([active, np.full(pad, active[-1])])
            sub = trainer.run(
                take(states, idx),
                take(chips, idx),
                data.train_images,
                data.train_labels,
                phase_key,
                t,
                t_next - t,
            )
            # The padding rows go to index ``n``, past the end: dropped.
            back = np.concatenate([active, np.full(pad, n)])
            states = put(states, back, sub)
        else:
            states = trainer.run(
                states, chips, data.train_images, data.train_labels, phase_key, t, t_next - t
            )
        if on_progress is not None:
            # Dispatch is asynchronous: wait for the steps, so the meter's rate is real.
            jax.block_until_ready(states.step)
            on_progress(int((np.minimum(ends[active], t_next) - t).sum()))
        t = t_next
        active = active[ends[active] > t]
    return states


def evaluate(
    trainer: train.Trainer,
    states: train.ChipState,
    chips: PyTree,
    data: DeviceData,
    split: str = "val",
    ids: np.ndarray | None = None,
    size: int | None = None,
) -> np.ndarray:
    """Accuracy ``float64[chips]`` (numpy) of every chip on the ``val`` or ``test`` split, or
    ``float64[len(ids)]`` of chips ``ids`` only (computed on a power-of-4 bucket of them, as
    ``run_phase`` does, so a few chips cost a few chips' evaluations, not the chunk's; at
    most ``size`` of them, default all ``chips``)."""
    return evaluate_on(trainer, states, chips, *data.split(split), ids, size)


def evaluate_on(
    trainer: train.Trainer,
    states: train.ChipState,
    chips: PyTree,
    images: jax.Array,
    labels: jax.Array,
    ids: np.ndarray | None = None,
    size: int | None = None,
) -> np.ndarray:
    """``evaluate`` on any images and labels (e.g. a slice of the validation split)."""
    variables, n = states.variables, len(states.step)
    if ids is not None and len(ids) < n:
        ids = np.asarray(ids)
        size = bucket_size(len(ids), n if size is None else size)
        idx = np.concatenate([ids, np.full(size - len(ids), ids[-1] if len(ids) else 0)])
        variables, chips = take(variables, idx), take(chips, idx)
    acc = sharding.to_host(trainer.evaluate(variables, chips, images, labels))
    return acc.astype(np.float64)[: n if ids is None else len(ids)]


def init_chunk(
    trainer: train.Trainer, variables: PyTree, fault_maps: np.ndarray, budgets: np.ndarray
) -> tuple[train.ChipState, PyTree]:
    """States and chips of a chunk (padded by ``drive``, or with ``pad``).

    Args:
      variables: the baseline's ``{"params", "batch_stats"}``; every chip starts from them.
      fault_maps: ``bool[n, R, C]`` with ``n <= size``; budgets ``int[n]``.

    Returns:
      ``(states[n], chips[n])`` (``trainer.chips`` of the maps: under bypass, their masks).
    """
    maps, budgets = sharding.shard_chips((jnp.asarray(fault_maps), jnp.asarray(budgets, jnp.int32)))
    chips = trainer.chips(variables["params"], maps)
    # XLA may replicate leaves that do not depend on the maps (step counts, optimizer
    # counters); every leaf is laid out over the chips so each compiled program sees one
    # sharding.
    states = sharding.shard_chips(trainer.init_population(variables, chips, budgets))
    return states, sharding.shard_chips(chips)


class Context(NamedTuple):
    """What the engine needs to retrain and evaluate chips, passed to every stage as one value.

    Reduce's policy (the targets and the top-ups) is not here: it is
    ``retraining.Verification``.

    Attributes:
      trainer: the jitted functions of the model and the retraining optimizer.
      variables: the fault-free baseline, ``{"params", "batch_stats"}`` (replicated over the
        devices; ``batch_stats`` is ``{}`` for models without BatchNorm).
      data: the train, validation and test sets on the device.
      steps_per_epoch: training steps in one epoch (amounts in epochs -> steps).
      chips_per_batch: most chips computed together (bounds memory).
    """

    trainer: train.Trainer
    variables: PyTree
    data: DeviceData
    steps_per_epoch: int
    chips_per_batch: int


# A chunk of a population: a NamedTuple of numpy arrays (or None for a field not computed),
# every array with the chips as its leading axis. Stages define their own, for what they
# hand the driver and for what they get back.
Chunk = TypeVar("Chunk", bound=tuple)
Result = TypeVar("Result", bound=tuple)


def pad(chunk: Chunk, size: int) -> Chunk:
    """Every array of ``chunk`` padded with zeros (``False``) along its leading axis to
    ``size`` rows: padding chips are fault-free, with budget 0, so every chunk of a stage has
    one shape and compiles once."""
    return jax.tree.map(lambda x: _pad(np.asarray(x), size), chunk)


def _rows(chunk: Chunk, index) -> Chunk:
    """Rows ``index`` (an index array or slice) of every array of ``chunk``, as numpy."""
    return jax.tree.map(lambda x: np.asarray(x)[index], chunk)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def drive(
    inputs: Chunk,
    compute: Callable[[np.ndarray, Chunk], Result],
    result: type[Result],
    size: int,
    order: np.ndarray | None = None,
    store: ProgressStore | None = None,
    stage: str = "stage",
) -> Result:
    """Runs a stage over a population in chunks; the one loop of every stage.

    The driver owns the population bookkeeping: the processing order, padding every chunk
    to ``size`` chips (``pad``) so one shape is compiled, resuming (chunk ``i`` is computed
    only if ``store`` has no result for it; each computed chunk is saved at once), progress,
    and scattering the results back to chip order.

    Args:
      inputs: the stage's per-chip arrays (a NamedTuple), every one with leading axis ``n``
        (at least one).
      compute: the stage's work on one chunk, ``compute(ids int[m], chunk) -> result``:
        ``chunk`` is ``inputs`` of chips ``ids`` padded to ``size`` rows (the first ``m``
        rows are chips ``ids``); every array of the result has leading axis ``m`` or more
        (rows past ``m`` are dropped).
      result: the NamedTuple class ``compute`` returns (to read saved chunks back).
      size: chips per chunk, a multiple of the device count (``chunk_size``).
      order: ``int[n]`` processing order (a permutation of ``0..n-1``); default ``0..n-1``.
      store: where finished chunks are saved and found again (``None``: not saved).
      stage: the stage's name in ``store`` and in the progress log.

    Returns:
      A ``result`` whose every array has leading axis ``n``, in chip order.
    """
    n = len(jax.tree.leaves(inputs)[0])
    order = np.arange(n) if order is None else np.asarray(order)
    done = store.done(stage, result) if store is not None else {}
    meter = Meter(stage, n, unit="chips")
    results = []
    for ci, lo in enumerate(range(0, n, size)):
        ids = order[lo : lo + size]
        if ci in done:
            meter.resumed(len(ids))
            results.append(done[ci])
            continue
        out = compute(ids, pad(_rows(inputs, ids), size))
        done[ci] = _rows(out, slice(0, len(ids)))
        if store is not None:
            store.put(stage, ci, done[ci])
        meter(len(ids))
        results.append(done[ci])

    def in_chip_order(*parts: np.ndarray) -> np.ndarray:
        values = np.concatenate(parts)
        scattered = np.empty_like(values)
        scattered[order] = values
        return scattered

    return jax.tree.map(in_chip_order, *results)
