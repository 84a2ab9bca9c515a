"""Retraining units (single chips or fused groups of chips) for their own budgets, topping up
units that miss the target, and verifying each unit's model on every member chip.

A *unit* is one fault map with one budget: a chip on its own, or a group of chips whose
maps are fused (``grouping.fuse``). The unit's model is verified on each member chip (the
member's own mask applied on top of the unit's trained weights).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from reduce_jax import sharding
from reduce_jax.engine import population, train
from reduce_jax.engine.progress import Meter, ProgressStore


class WeightSink(Protocol):
    """Where ``retrain`` hands every pool's final variables as the pool finishes (after its
    top-ups), e.g. ``outputs.chip_store.ChipStore``. It only reads them: results do not
    depend on whether one is given."""

    def write(
        self,
        stage: str,
        members: np.ndarray,
        steps: np.ndarray,
        maps: np.ndarray,
        diverged: np.ndarray,
        variables: train.PyTree,
    ) -> None:
        """One pool of ``m`` units.

        Args:
          stage: the stage's name (``retrain``'s ``stage``).
          members: ``int64[m, W]`` each unit's member chips (``-1``: none).
          steps: ``int64[m]`` each unit's steps in all (budget plus top-ups; 0: the unit is
            the masked baseline).
          maps: ``bool[m, R, C]`` each unit's (fused) fault map.
          diverged: ``bool[m]``.
          variables: ``{"params", "batch_stats"}`` with leading axis ``>= m`` (device
            arrays; rows past ``m`` are padding).
        """


class Verification(NamedTuple):
    """Reduce's policy for a retrained chip: what it is verified against and how it is
    topped up.

    Attributes:
      decision_target: the accuracy every decision on the validation split requires (the
        target plus ``--validation_margin``): the map, verification, top-ups.
      test_target: the accuracy the test set is judged against (reported only).
      topup_steps: top-up increment for a retrained chip below ``decision_target`` (steps;
        0: no top-ups).
      max_topup_steps: cap on a chip's top-ups (steps).
      topup_pool_chunks: chunks whose chips below the target are topped up together
        (``retrain``; results do not depend on it).
    """

    decision_target: float
    test_target: float
    topup_steps: int
    max_topup_steps: int
    topup_pool_chunks: int = 1


class Units(NamedTuple):
    """What to retrain (leading axis: units).

    A unit's fault map is the union of its members' maps (``fused_maps``).

    Attributes:
      members: ``int64[U, W]`` the member chips of each unit, ``-1`` past its last member
        (``W`` = the most members of a unit).
      steps: ``int64[U]`` every unit's budget (0 where it is not retrained).
      retrain: ``bool[U]`` which units to retrain (the others, chips the map cannot serve,
        are only evaluated).
    """

    members: np.ndarray
    steps: np.ndarray
    retrain: np.ndarray

    @classmethod
    def of_groups(cls, groups: list[list[int]], steps, retrain) -> Units:
        """Units of groups of chips (lists of chip ids).

        Args:
          groups: chip ids per unit; steps: ``int[U]`` budgets; retrain: ``bool[U]`` (or one
            value for every unit).
        """
        width = max(len(g) for g in groups)
        members = np.full((len(groups), width), -1, np.int64)
        for i, g in enumerate(groups):
            members[i, : len(g)] = g
        retrain = np.broadcast_to(np.asarray(retrain, bool), (len(groups),)).copy()
        return cls(
            members=members, steps=np.where(retrain, steps, 0).astype(np.int64), retrain=retrain
        )


def fused_maps(chip_maps: np.ndarray, members: np.ndarray) -> np.ndarray:
    """``bool[U, R, C]`` every unit's map: the union of its members' maps ``chip_maps[c]``
    (``bool[chips, R, C]``) over ``members int[U, W]`` (``-1``: none; a unit without
    members is fault-free)."""
    out = np.zeros((len(members), *chip_maps.shape[1:]), bool)
    for slot in members.T:
        out |= chip_maps[np.maximum(slot, 0)] & (slot >= 0)[:, None, None]
    return out


class ChipOutcome(NamedTuple):
    """What retraining did to every unit (leading axis: units; for per-chip runs, chips).

    Attributes:
      members: ``int64[U, W]`` member chips (``-1``: no member in that slot).
      steps: ``int64[U]`` planned steps (0 where not retrained).
      retrained: ``bool[U]``.
      accuracy_before: ``float64[U]`` on the unit's map, before retraining (validation).
      accuracy_after: ``float64[U]`` on the unit's map, after retraining and top-ups
        (validation: the split every decision is taken on).
      test_accuracy_after: ``float64[U]`` the same on the test set (reported only).
      topup_steps: ``int64[U]``.
      diverged: ``bool[U]`` the training became non-finite (the unit is frozen).
      member_accuracy: ``float64[U, W]`` the unit's model on each member chip's own map
        (NaN where ``members == -1``).
      meets_target: ``bool[U]`` not diverged, and every member meets the target.
    """

    members: np.ndarray
    steps: np.ndarray
    retrained: np.ndarray
    accuracy_before: np.ndarray
    accuracy_after: np.ndarray
    test_accuracy_after: np.ndarray
    topup_steps: np.ndarray
    diverged: np.ndarray
    member_accuracy: np.ndarray
    meets_target: np.ndarray

    def take(self, idx: np.ndarray) -> ChipOutcome:
        """Units ``idx``, as a ``ChipOutcome``."""
        return ChipOutcome(*(np.asarray(x)[idx] for x in self))

    def widen(self, width: int) -> ChipOutcome:
        """The same units with ``width >= W`` member slots."""
        pad = width - self.members.shape[1]
        return self._replace(
            members=np.pad(self.members, ((0, 0), (0, pad)), constant_values=-1),
            member_accuracy=np.pad(
                self.member_accuracy, ((0, 0), (0, pad)), constant_values=np.nan
            ),
        )


def retrain(
    ctx: population.Context,
    policy: Verification,
    units: Units,
    chip_maps: np.ndarray,
    key: jax.Array,
    store: ProgressStore | None = None,
    stage: str = "retrain",
    sink: WeightSink | None = None,
) -> ChipOutcome:
    """Retrains every unit for its own steps, tops up misses, verifies it on its members.

    Units are processed in order of their budget (a chunk holds similar budgets), by the
    population driver (``population.drive``: chunking, padding, resume). The driver's chunk
    is a *pool* of ``policy.topup_pool_chunks`` chunks of ``ctx.chips_per_batch`` units:
    each chunk is retrained for its budgets, then the pool's units still below the target
    are topped up together (``top_up``), so the few misses of each chunk fill whole batches.

    Args:
      ctx: the engine's context.
      policy: the targets and the top-ups.
      units: what to retrain.
      chip_maps: ``bool[chips, R, C]`` the chips' own maps (``units.members`` index it; a
        unit is retrained on the union of its members' maps and verified on each of them).
      key: key of the batch order of the retraining and of the top-ups.
      store: saves finished pools under ``stage`` (resume).
      stage: the stage's name.
      sink: receives every computed pool's final variables (``WeightSink``; None: dropped).

    Returns:
      ``ChipOutcome`` over units.
    """
    units = units._replace(steps=np.where(units.retrain, units.steps, 0).astype(np.int64))
    keys = jax.random.split(key)
    meter = Meter(f"{stage} training", int(units.steps.sum()))
    size = population.chunk_size(len(units.steps), ctx.chips_per_batch)
    chunks = -(-len(units.steps) // size)
    # A pool is whole chunks, so the driver's padding is the padding of every chunk.
    pool_size = size * min(max(1, policy.topup_pool_chunks), chunks)

    def compute(ids: np.ndarray, pool: Units) -> _Retrained:
        real = np.arange(len(pool.steps)) < len(ids)
        # Padding units have no members: fault-free, budget 0.
        maps = fused_maps(chip_maps, np.where(real[:, None], pool.members, -1))
        out, variables = _retrain_pool(ctx, policy, pool, maps, len(ids), size, keys, meter)
        if sink is not None:
            m = len(ids)
            trained = pool.steps[:m] + out.topup[:m]
            sink.write(stage, pool.members[:m], trained, maps[:m], out.diverged[:m], variables)
        member_accuracy = _verify_members(
            ctx, variables, pool.members[: len(ids)], chip_maps, out.after, size
        )
        for unit in ids[out.diverged[: len(ids)]]:
            logging.warning(
                "%s: unit %d: loss or weights became non-finite; stopped, reported as diverged",
                stage,
                unit,
            )
        return out._replace(member_accuracy=member_accuracy)

    order = np.argsort(units.steps, kind="stable")
    out = population.drive(units, compute, _Retrained, pool_size, order, store, stage)
    member_acc = np.where(units.members >= 0, out.member_accuracy, np.nan)
    ok = np.where(units.members >= 0, member_acc >= policy.decision_target, True).all(1)
    return ChipOutcome(
        members=units.members,
        steps=units.steps,
        retrained=np.asarray(units.retrain, bool),
        accuracy_before=out.before,
        accuracy_after=out.after,
        test_accuracy_after=out.test_after,
        topup_steps=out.topup,
        diverged=out.diverged,
        member_accuracy=member_acc,
        meets_target=ok & ~out.diverged,
    )


class _Retrained(NamedTuple):
    """What ``retrain`` measures on a pool of units ``[m]`` (arrays may have padding rows
    past ``m``): validation accuracy ``before`` and ``after`` (``float64``), ``test_after``,
    ``topup`` steps (``int64``), ``diverged`` (``bool``), and ``member_accuracy``
    (``float64[m, W]``)."""

    before: np.ndarray
    after: np.ndarray
    test_after: np.ndarray
    topup: np.ndarray
    diverged: np.ndarray
    member_accuracy: np.ndarray | None = None


def _retrain_pool(
    ctx: population.Context,
    policy: Verification,
    pool: Units,
    maps: np.ndarray,
    m: int,
    size: int,
    keys: jax.Array,
    meter: Meter,
) -> tuple[_Retrained, train.PyTree]:
    """One pool of ``m`` units, in chunks of ``size``: retrain each chunk for its budgets
    and evaluate it, then top up the pool's misses together and evaluate every unit on the
    test set.

    Args:
      pool: the pool's units, padded (``population.drive``) to a whole number of chunks.
      maps: ``bool[len(pool), R, C]`` their fused maps.
      m: the pool's real units (the rest is padding).

    Returns:
      ``(results, variables)``: results of ``ceil(m / size) * size`` rows (padding last;
      no ``member_accuracy``), and the trained variables of those rows.
    """
    n = -(-m // size) * size  # the chunks that hold real units
    before, after = np.zeros(n), np.zeros(n)
    for lo in range(0, n, size):
        steps = pool.steps[lo : lo + size]
        part, part_chips = population.init_chunk(
            ctx.trainer, ctx.variables, maps[lo : lo + size], steps
        )
        before[lo : lo + size] = population.evaluate(ctx.trainer, part, part_chips, ctx.data)
        part = population.run_phase(
            ctx.trainer, part, part_chips, ctx.data, keys[0], steps, on_progress=meter
        )
        # A unit without steps is unchanged: its accuracy after is the one before.
        trained = np.flatnonzero(steps > 0)
        after[lo : lo + size] = before[lo : lo + size]
        after[lo + trained] = population.evaluate(
            ctx.trainer, part, part_chips, ctx.data, ids=trained
        )
        if n == size:
            states, chips = part, part_chips
        else:  # the pool's states, filled in place chunk by chunk
            if lo == 0:
                states, chips = population.zeros((part, part_chips), n)
            rows = np.arange(lo, lo + size)
            states, chips = population.put((states, chips), rows, (part, part_chips))
    states, after, topup = top_up(
        ctx, policy, states, chips, after, pool.retrain[:n], keys[1], size
    )
    test_after = np.concatenate(
        [
            population.evaluate(
                ctx.trainer, states, chips, ctx.data, "test", np.arange(lo, lo + size), size
            )
            for lo in range(0, n, size)
        ]
    )
    out = _Retrained(
        before=before,
        after=after,
        test_after=test_after,
        topup=topup,
        diverged=sharding.to_host(states.diverged),
    )
    return out, states.variables


def top_up(
    ctx: population.Context,
    policy: Verification,
    states: train.ChipState,
    chips,
    after: np.ndarray,
    retrained: np.ndarray,
    key: jax.Array,
    size: int | None = None,
) -> tuple[train.ChipState, np.ndarray, np.ndarray]:
    """Tops up retrained chips below the decision target, ``policy.topup_steps`` at a time.

    Round ``r`` gives one increment to every chip still below the target, on the batches of
    ``fold_in(key, r)`` (a chip's top-ups do not depend on which chips it is pooled with),
    computed ``size`` chips at a time (the last batch a power-of-4 bucket, as in
    ``population.run_phase``). A chip stops at the first increment after which it meets the
    target, when it has had ``policy.max_topup_steps``, or when it diverges (more steps cannot
    help a frozen chip); after each increment only the chips just topped up are evaluated.

    Args:
      states: ``ChipState[n]``; chips: their chips (``trainer.chips``).
      after: ``float64[n]`` accuracy now; retrained: ``bool[n]`` chips that may be topped up.
      key: key of the top-ups' batch order.
      size: most chips computed together (default ``n``).

    Returns:
      ``(states, after float64[n], topup int64[n])``.
    """
    n = len(after)
    size = n if size is None else size
    topup = np.zeros(n, np.int64)
    after = np.array(after, np.float64)
    missing = np.asarray(retrained, bool) & (after < policy.decision_target)
    missing &= ~sharding.to_host(states.diverged)
    rnd = 0
    while missing.any() and policy.topup_steps > 0:
        left = policy.max_topup_steps - rnd * policy.topup_steps
        if left <= 0:
            break
        inc = min(policy.topup_steps, left)
        below = np.flatnonzero(missing)
        phase_key = jax.random.fold_in(key, rnd)
        for lo in range(0, len(below), size):
            ids = below[lo : lo + size]
            states, acc, diverged = _top_up_once(ctx, states, chips, ids, inc, size, phase_key)
            topup[ids] += inc
            after[ids] = acc
            missing[ids] &= (acc < policy.decision_target) & ~diverged
        rnd += 1
    return states, after, topup


def _top_up_once(ctx, states, chips, ids, inc, size, phase_key):
    """One increment of ``inc`` steps for chips ``ids`` (at most ``size``), computed on a
    power-of-4 bucket of them: ``(states, accuracy float64[len(ids)], diverged bool[...])``."""
    n, bucket = len(states.step), population.bucket_size(len(ids), size)
    pad = bucket - len(ids)
    # The padding rows repeat the last chip (so the bucket runs as one block); their results
    # are scattered to index ``n``, past the end, and dropped.
    sub, sub_chips = population.take((states, chips), np.concatenate([ids, np.full(pad, ids[-1])]))
    sub = sub.replace(budget=sub.budget + inc)
    sub = population.run_phase(
        ctx.trainer, sub, sub_chips, ctx.data, phase_key, np.full(bucket, inc)
    )
    acc = population.evaluate(ctx.trainer, sub, sub_chips, ctx.data)[: len(ids)]
    states = population.put(states, np.concatenate([ids, np.full(pad, n)]), sub)
    return states, acc, sharding.to_host(sub.diverged)[: len(ids)]


def _verify_members(
    ctx: population.Context,
    variables,
    members: np.ndarray,
    chip_maps: np.ndarray,
    after: np.ndarray,
    size: int,
) -> np.ndarray:
    """Accuracy ``float64[m, W]`` of each unit's model on each member chip's own map.

    A unit of one chip is its own member (its accuracy is ``after``); the members of
    groups are evaluated in batches of the chunk size ``size``, so no new shapes are compiled.

    Args:
      variables: ``[>= m, ...]`` the pool's trained ``{"params", "batch_stats"}`` (a member
        chip runs the unit's weights on its own hardware, under bypass its own mask on top,
        and the unit's BatchNorm statistics).
      members: ``int64[m, W]`` the pool's real units' members (``-1``: none).
      chip_maps: ``bool[chips, R, C]``; after: ``float64[>= m]`` accuracy on the unit's map.
      size: chips evaluated together.
    """
    member_acc = np.full(members.shape, np.nan)
    member_acc[:, 0] = after[: len(members)]
    unit, slot = np.nonzero(((members >= 0).sum(1) > 1)[:, None] & (members >= 0))
    for lo in range(0, len(unit), size):
        u, j = unit[lo : lo + size], slot[lo : lo + size]
        maps, idx = population.pad((chip_maps[members[u, j]], u), size)
        maps = sharding.shard_chips(jnp.asarray(maps))
        chips = ctx.trainer.chips(ctx.variables["params"], maps)
        acc = ctx.trainer.evaluate(population.take(variables, idx), chips, *ctx.data.split("val"))
        member_acc[u, j] = sharding.to_host(acc).astype(np.float64)[: len(u)]
    return member_acc
