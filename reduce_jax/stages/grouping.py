"""Grouping and fusion of chips' fault maps (eFAT): one retraining serves a whole group.

A group's *fused* map is the union of its members' faulty PEs. A model retrained with the
fused map's weights bypassed runs unchanged on every member: each member's faulty PEs are
bypassed in it already, so the member's own mask changes nothing. Fusion raises the fault
rate, so a group pays only while its fused map needs less retraining than its members
together; the *reward* of a group is the retraining it saves,
``sum(member amounts) - fused amount``, both read off the resilience map.

Every rate measure is linear in the fault map (``systolic.pe_weights``), so the rate of the
union of two maps is ``rate(a) + rate(b) - rate(a & b)``, and the rates of all pairs of
groups are one matrix product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from reduce_jax.engine import population
from reduce_jax.engine.progress import ProgressStore
from reduce_jax.stages import resilience, retraining

GROUPINGS = ("none", "greedy")

# Steps of retraining as a function of rates ``float64[n]`` -> ``float64[n]`` (inf: the map
# cannot be served: above the grid or unrecoverable).
AmountFn = Callable[[np.ndarray], np.ndarray]


def fuse(fault_maps: jax.Array) -> jax.Array:
    """The fused map of a group of chips: the union of their faulty PEs.

    Args:
      fault_maps: ``bool[members, R, C]``.

    Returns:
      ``bool[R, C]``.
    """
    return jnp.any(jnp.asarray(fault_maps, bool), axis=0)


def group_reward(member_amounts: np.ndarray, fused_amount: float) -> float:
    """Retraining a group saves: ``sum(member_amounts) - fused_amount`` (``-inf`` when the
    fused map cannot be served, i.e. its amount is ``inf``)."""
    if not np.isfinite(fused_amount):
        return -np.inf
    return float(np.sum(member_amounts) - fused_amount)


def amount_fn(grid_rates: np.ndarray, required_steps: np.ndarray, interpolation: str) -> AmountFn:
    """The resilience map as a function: rates -> steps of retraining (inf = not served).

    Args:
      grid_rates: ``float[F]`` measured rates of the grid points (increasing).
      required_steps: ``float[F]`` required steps per grid rate (``inf`` = unrecoverable).
      interpolation: ``conservative`` | ``linear``.
    """
    grid = jnp.asarray(grid_rates, jnp.float32)
    required = jnp.asarray(required_steps, jnp.float32)
    fn = jax.jit(lambda r: resilience.retraining_amount(grid, required, r, interpolation))

    def amount(rates: np.ndarray) -> np.ndarray:
        steps, status = fn(jnp.asarray(rates, jnp.float32))
        return np.where(np.asarray(status) == resilience.OK, np.asarray(steps, np.float64), np.inf)

    return amount


def fused_rates(fault_maps: np.ndarray, weights: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """Rate of every group's fused map: ``float64[groups]``.

    Args:
      fault_maps: ``bool[chips, R, C]``; weights: ``float[R, C]`` (``systolic.pe_weights``);
      groups: lists of chip indices.
    """
    if not groups:
        return np.zeros(0, np.float64)
    maps = np.asarray(fault_maps, bool).reshape(len(fault_maps), -1)
    w = np.asarray(weights, np.float64).reshape(-1)
    # The same arithmetic as ``greedy_groups`` (a 0/1 float vector times the weights), so a
    # group planned as servable is read off the map at exactly the rate it was planned at.
    return np.array([maps[g].any(0).astype(np.float64) @ w for g in groups], np.float64)


def plan_steps(
    fault_maps: np.ndarray, weights: np.ndarray, amount: AmountFn, groups: list[list[int]]
) -> float:
    """Planned steps of a partition into groups: the sum of the fused maps' amounts."""
    return float(amount(fused_rates(fault_maps, weights, groups)).sum())


def greedy_groups(
    fault_maps: np.ndarray,
    weights: np.ndarray,
    amount: AmountFn,
    levels: np.ndarray,
    max_group_size: int,
) -> list[list[int]]:
    """Partitions chips into groups: resilience-driven seeded growth, kept by reward.

    Chips are taken as seeds in order of decreasing amount (then rate), like first-fit
    decreasing bin packing. For a seed and every amount level ``L`` of the resilience map
    at or above the seed's own amount, a group grows from the seed by adding the remaining
    chip that saves the most (its own amount; ties: the one that adds the least rate) while
    the fused map still needs at most ``L``. The level whose group has the largest reward
    (members' amounts minus the fused amount) wins; if no group saves anything the seed
    stays alone. Trying every level looks past a merge that saves nothing by itself (two
    chips that each need ``a`` may fuse to a map needing ``2a``) to the third chip that then
    rides for free.

    Only groups with a positive reward are formed, and a fused map never exceeds the map's
    largest finite amount (it is never unrecoverable or above the grid), so the plan never
    costs more than per-chip Reduce on the same map. Rates are linear in the map
    (``systolic.pe_weights``), so a group's rate with each candidate added is one product.

    Args:
      fault_maps: ``bool[n, R, C]`` maps of the chips to group (all servable on their own).
      weights: ``float[R, C]`` per-PE weights of the rate measure.
      amount: the resilience map as a function (``amount_fn``).
      levels: ``float[L]`` the map's finite required amounts, in steps.
      max_group_size: most chips per group (>= 1).

    Returns:
      Groups as lists of indices into ``fault_maps``, every index in exactly one group,
      sorted by their first member.
    """
    n = len(fault_maps)
    if n == 0:
        return []
    maps = np.asarray(fault_maps, bool).reshape(n, -1).astype(np.float64)
    w = np.asarray(weights, np.float64).reshape(-1)
    rate = maps @ w
    amt = amount(rate)
    if not np.all(np.isfinite(amt)):
        raise ValueError("every chip to group must be servable on its own (finite amount)")
    levels = np.unique(np.asarray(levels, np.float64)[np.isfinite(levels)])
    remaining = np.ones(n, bool)
    groups = []
    for seed in np.lexsort((-rate, -amt)):
        if not remaining[seed]:
            continue
        remaining[seed] = False
        best_reward, best = 0.0, [int(seed)]
        for level in levels[levels >= amt[seed]]:
            group, fused = [int(seed)], maps[seed].copy()
            while len(group) < max_group_size:
                grown = rate_with(fused, maps, w)
                fits = remaining & (amt > 0) & (amount(grown) <= level)
                fits[group] = False
                if not fits.any():
                    break
                cand = np.flatnonzero(fits)
                c = int(cand[np.lexsort((grown[cand], -amt[cand]))[0]])
                group.append(c)
                fused = np.maximum(fused, maps[c])
            reward = group_reward(amt[group], amount(np.array([fused @ w]))[0])
            if reward > best_reward:
                best_reward, best = reward, group
        remaining[best] = False
        groups.append(sorted(best))
    return sorted(groups, key=lambda g: g[0])


def rate_with(fused: np.ndarray, maps: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Rate of the fused map ``float[RC]`` (0/1) with each chip of ``maps [n, RC]`` added."""
    return fused @ w + maps @ (w * (1.0 - fused))


class GroupPlan(NamedTuple):
    """The groups of a grouped run that share one retraining.

    Attributes:
      groups: chip ids of every group of 2 or more chips, ordered by first member.
      steps: ``int64[G]`` each group's amount, read off the map at its fused rate.
    """

    groups: list[list[int]]
    steps: np.ndarray


def plan_groups(
    chip_maps: np.ndarray,
    servable: np.ndarray,
    weights: np.ndarray,
    amount: AmountFn,
    levels: np.ndarray,
    max_group_size: int,
) -> GroupPlan:
    """Groups the chips the map serves (``greedy_groups``); chips alone are left out.

    Args:
      chip_maps: ``bool[chips, R, C]``; servable: ``bool[chips]`` chips the map serves.
      weights: ``float[R, C]`` per-PE weights of the rate measure; amount, levels and
        max_group_size: as in ``greedy_groups``.
    """
    ids = np.flatnonzero(servable)
    groups = []
    if len(ids) >= 2:
        found = greedy_groups(chip_maps[ids], weights, amount, levels, max_group_size)
        groups = [[int(ids[i]) for i in g] for g in found if len(g) > 1]
    steps = amount(fused_rates(chip_maps, weights, groups))
    if not np.all(np.isfinite(steps)):
        raise RuntimeError("a planned group's fused map cannot be served by the map")
    return GroupPlan(groups=groups, steps=steps.astype(np.int64))


class GroupedOutcome(NamedTuple):
    """The retrainings of a grouped run, and which one served each chip.

    ``retrainings`` holds every group of 2+ chips (in plan order), then the per-chip
    retraining of each chip that no successful group serves, in chip order. A group that
    misses the target on a member after its top-ups is split: its steps still count, and
    its members are served by their own per-chip retrainings.

    Attributes:
      retrainings: ``ChipOutcome[U]`` (``W`` = the most members of a group).
      fused_pe_rate: ``float64[U]``; fused_rate: ``float64[U]`` in the map's measure.
      split: ``bool[U]``; split_from: ``int64[U]`` the split group a chip's own retraining
        stands in for (``-1``: none).
      served_by: ``int64[chips]`` the retraining that served each chip last (``-1``: none,
        the chip is not retrained).
      accuracy_after: ``float64[chips]``; diverged: ``bool[chips]``: the serving model on
        each chip (the per-chip result where no retraining served it).
    """

    retrainings: retraining.ChipOutcome
    fused_pe_rate: np.ndarray
    fused_rate: np.ndarray
    split: np.ndarray
    split_from: np.ndarray
    served_by: np.ndarray
    accuracy_after: np.ndarray
    diverged: np.ndarray


def run_grouped(
    ctx: population.Context,
    policy: retraining.Verification,
    chip_maps: np.ndarray,
    plan: GroupPlan,
    per_chip: retraining.ChipOutcome,
    rmap: resilience.ResilienceMap,
    key: jax.Array,
    store: ProgressStore | None = None,
    sink: retraining.WeightSink | None = None,
) -> GroupedOutcome:
    """Retrains every planned group once on its fused map, verifies it on every member,
    and serves each chip by its group, or by its own per-chip retraining.

    Args:
      ctx: the engine's context.
      policy: the targets a group is verified against and its top-ups.
      chip_maps: ``bool[chips, R, C]``.
      plan: from ``plan_groups``.
      per_chip: the per-chip retraining of every chip (``retraining.retrain``).
      rmap: the resilience map (the per-PE weights of its measures).
      key: key of the groups' batch order.
      store: saves finished chunks under ``grouped`` (resume).
      sink: receives the groups' retrained variables (``retraining.WeightSink``).
    """
    if plan.groups:
        units = retraining.Units.of_groups(plan.groups, plan.steps, True)
        groups = retraining.retrain(
            ctx, policy, units, chip_maps, key, store, stage="grouped", sink=sink
        )
    else:
        groups = per_chip.take(np.zeros(0, np.int64))
    split = groups.retrained & ~groups.meets_target
    split_from = np.full(len(chip_maps), -1, np.int64)
    served = np.zeros(len(chip_maps), bool)
    for g, members in enumerate(plan.groups):
        split_from[members] = g if split[g] else -1
        served[members] = ~split[g]
    if split.any():
        logging.info(
            "%d groups missed the target; their %d chips are served by their own retraining",
            int(split.sum()),
            int((split_from >= 0).sum()),
        )
    alone = np.flatnonzero(~served)
    # Chips alone that the map does not serve are not retrained: they are no retraining.
    kept = alone[per_chip.retrained[alone]]
    width = groups.members.shape[1] if plan.groups else 1
    table = retraining.ChipOutcome(
        *(
            np.concatenate([a, b])
            for a, b in zip(groups.widen(width), per_chip.take(kept).widen(width), strict=True)
        )
    )
    fused = [chip_maps[m[m >= 0]].any(0) for m in table.members]
    served_by = np.full(len(chip_maps), -1, np.int64)
    for u, members in enumerate(table.members):
        served_by[members[members >= 0]] = u
    return GroupedOutcome(
        retrainings=table,
        fused_pe_rate=np.array([float(rmap.weights["pe"][f].sum()) for f in fused]),
        fused_rate=np.array([float(rmap.weights[rmap.rate_measure][f].sum()) for f in fused]),
        split=np.concatenate([split, np.zeros(len(kept), bool)]),
        split_from=np.concatenate([np.full(len(split), -1), split_from[kept]]),
        served_by=served_by,
        accuracy_after=_serving(table, served_by, per_chip.accuracy_after, "member_accuracy"),
        diverged=_serving(table, served_by, per_chip.diverged, "diverged"),
    )


def _serving(table: retraining.ChipOutcome, served_by: np.ndarray, alone, field: str):
    """Per chip: ``field`` of the retraining that served it (``alone``'s value where none)."""
    out = np.array(alone, copy=True)
    for chip in np.flatnonzero(served_by >= 0):
        u = served_by[chip]
        if field == "member_accuracy":
            out[chip] = table.member_accuracy[u][table.members[u] == chip][0]
        else:
            out[chip] = getattr(table, field)[u]
    return out
