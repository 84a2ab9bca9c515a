"""Retraining a population of chips in chunks, with per-chip budgets and no wasted compute.

The population is processed in chunks of at most ``chips_per_batch`` chips (bounded memory).
Inside a chunk, a *phase* runs every chip for its own number of steps: the chips run
together until the smallest remaining budget is reached, then finished chips are dropped
and the rest continue, compacted to a power-of-four number of chips so that only a few
shapes are ever compiled (``Trainer.run`` never recompiles for new step counts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reduce_jax import sharding, systolic, train
from reduce_jax.data import Dataset

PyTree = Any


class DeviceData(NamedTuple):
    """Train and test sets on the device."""

    train_images: jax.Array
    train_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array

    @classmethod
    def from_dataset(cls, data: Dataset) -> DeviceData:
        arrays = (data.train_images, data.train_labels, data.test_images, data.test_labels)
        return cls(*sharding.replicate([jnp.asarray(a) for a in arrays]))

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])


@jax.jit
def population_masks(params: PyTree, fault_maps: jax.Array) -> PyTree:
    """Masks ``[chips, ...]`` for every parameter, from ``bool[chips, R, C]`` fault maps."""
    return jax.vmap(systolic.weight_masks, in_axes=(None, 0))(params, fault_maps)


def chunk_size(num_chips: int, chips_per_batch: int) -> int:
    """Chips per chunk: at most ``chips_per_batch``, a multiple of the number of devices."""
    return sharding.round_up(min(chips_per_batch, num_chips))


def bucket_size(n: int, cap: int) -> int:
    """Chips to compute for ``n`` active chips: the smallest power of 4 >= ``n`` (a multiple
    of the device count), at most ``cap``.

    Every distinct size is compiled once (seconds on a CPU); powers of 4 bound the number of
    sizes to ``log4(cap) + 1`` while never computing more than 4x the active chips.
    """
    size = 1
    while size < n:
        size *= 4
    return min(cap, sharding.round_up(size))


def _gather(tree: PyTree, idx: np.ndarray) -> PyTree:
    idx = jnp.asarray(idx)
    return jax.tree.map(lambda x: x[idx], tree)


def take(tree: PyTree, idx: np.ndarray) -> PyTree:
    """Chips ``idx`` (a multiple of the device count), sharded over the devices."""
    return sharding.shard_chips(_gather(tree, idx))


def _put(tree: PyTree, idx: np.ndarray, values: PyTree) -> PyTree:
    idx = jnp.asarray(idx)
    return jax.tree.map(lambda x, v: x.at[idx].set(v), tree, values)


def run_phase(
    trainer: train.Trainer,
    states: train.ChipState,
    masks: PyTree,
    data: DeviceData,
    phase_key: jax.Array,
    phase_steps: np.ndarray,
    compact: bool = True,
    on_progress=None,
    start: int = 0,
) -> train.ChipState:
    """Runs chip ``i`` for ``phase_steps[i]`` steps of a phase, from the phase's step ``start``.

    Budgets in ``states`` must allow the steps (``budget >= step + phase_steps``); a chip with
    a smaller budget stops at its budget. Chips whose steps are done are dropped from the
    computation.

    Args:
      trainer: from ``train.make_trainer``.
      states: ``ChipState[chips]``.
      masks: masks ``[chips, ...]``.
      data: the training data on the device.
      phase_key: key of the phase's batch order.
      phase_steps: ``int[chips]`` steps to run per chip.
      compact: drop finished chips (False: run all chips to the longest, gated by budgets).
      on_progress: called with the number of chip-steps just completed (budgeted steps,
        not padding or gated steps).
      start: first phase step (batch ``batch_indices(phase_key, start)``).

    Returns:
      The updated ``ChipState[chips]``.
    """
    phase_steps = np.asarray(phase_steps, np.int64)
    chips = len(phase_steps)
    ends = start + phase_steps
    active = np.flatnonzero(phase_steps > 0)
    t = start
    while active.size:
        t_next = int(ends[active].min()) if compact else int(ends.max())
        if compact and active.size < chips:
            size = bucket_size(active.size, chips)
            idx = np.concatenate([active, np.full(size - active.size, active[-1])])
            sub = trainer.run(
                take(states, idx),
                take(masks, idx),
                data.train_images,
                data.train_labels,
                phase_key,
                t,
                t_next - t,
            )
            states = _put(states, idx[: active.size], _gather(sub, np.arange(active.size)))
        else:
            states = trainer.run(
                states, masks, data.train_images, data.train_labels, phase_key, t, t_next - t
            )
        if on_progress is not None:
            # Dispatch is asynchronous: wait for the steps, so the meter's rate is real.
            jax.block_until_ready(states.step)
            on_progress(int((np.minimum(ends[active], t_next) - t).sum()))
        t = t_next
        active = active[ends[active] > t]
    return states


def evaluate(trainer: train.Trainer, states: train.ChipState, masks: PyTree, data: DeviceData):
    """Test accuracy ``float64[chips]`` (numpy) of every chip."""
    acc = trainer.evaluate(states.params, masks, data.test_images, data.test_labels)
    return sharding.to_host(acc).astype(np.float64)


def init_chunk(
    trainer: train.Trainer, params: PyTree, fault_maps: np.ndarray, budgets: np.ndarray
) -> tuple[train.ChipState, PyTree]:
    """States and masks of a chunk of chips (pad it first with ``pad_chunk``).

    Args:
      fault_maps: ``bool[n, R, C]`` with ``n <= size``; budgets ``int[n]``.

    Returns:
      ``(states[n], masks[n])``.
    """
    maps, budgets = sharding.shard_chips((jnp.asarray(fault_maps), jnp.asarray(budgets, jnp.int32)))
    masks = population_masks(params, maps)
    # XLA may replicate leaves that do not depend on the maps (step counts, optimizer
    # counters); every leaf is laid out over the chips so each compiled program sees one
    # sharding.
    states = sharding.shard_chips(trainer.init_population(params, masks, budgets))
    return states, sharding.shard_chips(masks)


def map_chunks(
    ids: np.ndarray,
    size: int,
    done: dict[int, dict] | None,
    compute: Callable[[np.ndarray], dict[str, list]],
    on_chunk: Callable[[int, dict], None] | None = None,
) -> dict[str, np.ndarray]:
    """Runs ``compute`` on each chunk of ``size`` chips of ``ids`` that is not ``done`` yet.

    This is where resuming happens: chunk ``i`` (chips ``ids[i*size : (i+1)*size]``) is
    computed only if ``i`` is not in ``done``, and ``on_chunk(i, result)`` saves it.

    Args:
      ids: ``int[chips]`` chip ids in processing order (a permutation of ``0..chips-1``).
      size: chips per chunk.
      done: results of chunks finished earlier (not modified).
      compute: chunk chip ids -> dict of per-chip lists (JSON-able).
      on_chunk: called with ``(chunk_index, result)`` after each computed chunk.

    Returns:
      For every key of the results, a numpy array over all chips, indexed by chip id.
    """
    done = dict(done or {})
    results = []
    for ci, lo in enumerate(range(0, len(ids), size)):
        if ci not in done:
            done[ci] = compute(ids[lo : lo + size])
            if on_chunk is not None:
                on_chunk(ci, done[ci])
        results.append(done[ci])
    out = {}
    for key in results[0]:
        values = np.concatenate([np.asarray(r[key]) for r in results])
        out[key] = np.empty_like(values)
        out[key][ids] = values
    return out


def pad_chunk(fault_maps: np.ndarray, budgets: np.ndarray, size: int):
    """Pads a chunk to ``size`` chips (fault-free, budget 0) so every chunk has one shape."""
    n = len(fault_maps)
    if n == size:
        return fault_maps, budgets
    pad_maps = np.zeros((size - n, *fault_maps.shape[1:]), bool)
    return (
        np.concatenate([fault_maps, pad_maps]),
        np.concatenate([budgets, np.zeros(size - n, budgets.dtype)]),
    )
