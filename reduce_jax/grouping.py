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

import jax
import jax.numpy as jnp
import numpy as np

from reduce_jax import resilience

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
