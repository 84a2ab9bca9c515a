"""Retraining units (single chips or fused groups of chips) for their own budgets, verifying
each unit's model on every member chip, and topping up units that miss the target.

A *unit* is one fault map with one budget: a chip on its own, or a group of chips whose
maps are fused (``grouping.fuse``). The unit's model is verified on each member chip (the
member's own mask applied on top of the unit's trained weights).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from reduce_jax import population, sharding, train
from reduce_jax.progress import Meter

# Member accuracy slots a unit does not use (fewer members than the widest group).
NO_MEMBER = -1.0


def evaluate_members(
    trainer: train.Trainer,
    params,
    states: train.ChipState,
    units: np.ndarray,
    member_maps: np.ndarray,
    data: population.DeviceData,
    size: int,
) -> np.ndarray:
    """Test accuracy of unit ``units[j]``'s weights on a chip with map ``member_maps[j]``.

    Args:
      params: the baseline (only for the masks' structure).
      states: ``ChipState[size]`` of a chunk of units.
      units: ``int[m]`` unit index within the chunk of each evaluation.
      member_maps: ``bool[m, R, C]`` the member chips' maps.
      size: evaluations per call (the chunk size, so no new shapes are compiled).

    Returns:
      ``float64[m]``.
    """
    out = []
    for lo in range(0, len(units), size):
        idx, maps = units[lo : lo + size], member_maps[lo : lo + size]
        m = len(idx)
        maps, idx = population.pad_chunk(maps, idx, size)
        sub = population.take(states.params, idx)
        masks = population.population_masks(params, sharding.shard_chips(jnp.asarray(maps)))
        acc = trainer.evaluate(sub, masks, data.test_images, data.test_labels)
        out.append(sharding.to_host(acc).astype(np.float64)[:m])
    return np.concatenate(out) if out else np.zeros(0)


def _retrain_chunk(
    trainer: train.Trainer,
    params,
    data: population.DeviceData,
    maps: np.ndarray,
    budgets: np.ndarray,
    retrain: np.ndarray,
    members: list[np.ndarray],
    target: float,
    topup_steps: int,
    max_topup_steps: int,
    phase_key: jax.Array,
    topup_key: jax.Array,
    size: int,
    width: int,
    meter: Meter,
) -> dict[str, list]:
    """One chunk of ``m <= size`` units: retrain, top up, verify on members; lists over units."""
    m = len(maps)
    chunk_maps, chunk_budgets = population.pad_chunk(maps, budgets, size)
    states, masks = population.init_chunk(trainer, params, chunk_maps, chunk_budgets)
    before = population.evaluate(trainer, states, masks, data)
    states = population.run_phase(
        trainer, states, masks, data, phase_key, chunk_budgets, on_progress=meter
    )
    after = population.evaluate(trainer, states, masks, data)
    topup = np.zeros(size, np.int64)
    missing = np.zeros(size, bool)
    missing[:m] = retrain & (after[:m] < target)
    rnd = 0
    while True:
        # A diverged unit is frozen: more steps cannot help it.
        missing &= ~sharding.to_host(states.diverged)
        left = max_topup_steps - rnd * topup_steps
        if not missing.any() or topup_steps <= 0 or left <= 0:
            break
        extra = np.where(missing, min(topup_steps, left), 0)
        budget = states.budget + sharding.shard_chips(jnp.asarray(extra, jnp.int32))
        states = population.run_phase(
            trainer,
            states.replace(budget=budget),
            masks,
            data,
            jax.random.fold_in(topup_key, rnd),
            extra,
        )
        topup += extra
        after = np.where(missing, population.evaluate(trainer, states, masks, data), after)
        missing &= after < target
        rnd += 1
    # Verification on every member chip of the groups (a unit of one chip is its member).
    member_acc = np.full((m, width), NO_MEMBER)
    member_acc[:, 0] = after[:m]
    grouped = [
        (u, j, chip_map)
        for u in range(m)
        if len(members[u]) > 1
        for j, chip_map in enumerate(members[u])
    ]
    if grouped:
        units = np.array([u for u, _, _ in grouped])
        accs = evaluate_members(
            trainer, params, states, units, np.stack([g[2] for g in grouped]), data, size
        )
        for (u, j, _), acc in zip(grouped, accs, strict=True):
            member_acc[u, j] = acc
    diverged = sharding.to_host(states.diverged)[:m]
    return dict(
        accuracy_before=before[:m].tolist(),
        accuracy_after=after[:m].tolist(),
        topup_steps=topup[:m].tolist(),
        diverged=diverged.tolist(),
        member_accuracy=member_acc.tolist(),
    )


def retrain_units(
    trainer: train.Trainer,
    params,
    data: population.DeviceData,
    maps: np.ndarray,
    steps: np.ndarray,
    retrain: np.ndarray,
    members: list[np.ndarray],
    target: float,
    topup_steps: int,
    max_topup_steps: int,
    key: jax.Array,
    chips_per_batch: int,
    done: dict[int, dict] | None = None,
    on_chunk: Callable[[int, dict], None] | None = None,
    label: str = "retraining",
) -> dict[str, np.ndarray]:
    """Retrains every unit for its own steps, verifies it on its members, tops up misses.

    Units are sorted by budget before chunking, so a chunk holds similar budgets. Each
    finished chunk goes to ``on_chunk``; chunks in ``done`` are not redone (resume).

    Args:
      maps: ``bool[units, R, C]`` the units' (fused) maps; steps: ``int[units]`` budgets;
        retrain: ``bool[units]`` which units to retrain (the others are only evaluated).
      members: per unit, ``bool[members, R, C]`` the member chips' own maps (verification).
      target: the accuracy target; top-ups of ``topup_steps`` (up to ``max_topup_steps``)
        go to retrained units below it.

    Returns:
      numpy arrays over units: ``accuracy_before``, ``accuracy_after`` (on the unit's map),
      ``topup_steps``, ``diverged``, ``member_accuracy float64[units, W]`` (on each member,
      in ``members`` order; ``NO_MEMBER`` in unused slots; W = the most members of a unit).
    """
    n = len(maps)
    steps = np.where(retrain, steps, 0).astype(np.int64)
    order = np.argsort(steps, kind="stable")
    size = population.chunk_size(n, chips_per_batch)
    width = max(len(m) for m in members)
    phase_key, topup_key = jax.random.split(key)
    meter = Meter(label, int(steps.sum()))

    def compute(ids: np.ndarray) -> dict[str, list]:
        result = _retrain_chunk(
            trainer,
            params,
            data,
            maps[ids],
            steps[ids],
            retrain[ids],
            [members[i] for i in ids],
            target,
            topup_steps,
            max_topup_steps,
            phase_key,
            topup_key,
            size,
            width,
            meter,
        )
        for unit in ids[np.asarray(result["diverged"], bool)]:
            logging.warning(
                "%s: unit %d: loss or weights became non-finite; stopped, reported as diverged",
                label,
                unit,
            )
        logging.info("%s: %d units done", label, len(ids))
        return result

    return population.map_chunks(order, size, done, compute, on_chunk)
