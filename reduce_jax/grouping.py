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
    maps = np.asarray(fault_maps, bool)
    w = np.asarray(weights, np.float64)
    return np.array([float(w[maps[g].any(0)].sum()) for g in groups], np.float64)


def plan_steps(
    fault_maps: np.ndarray, weights: np.ndarray, amount: AmountFn, groups: list[list[int]]
) -> float:
    """Planned steps of a partition into groups: the sum of the fused maps' amounts."""
    return float(amount(fused_rates(fault_maps, weights, groups)).sum())


def greedy_groups(
    fault_maps: np.ndarray,
    weights: np.ndarray,
    amount: AmountFn,
    max_group_size: int,
) -> list[list[int]]:
    """Partitions chips into groups by greedy agglomeration on the reward.

    Starts from singletons and repeatedly merges the two groups whose fusion saves the most
    retraining (ties: the smaller fused rate, which leaves the most headroom for later
    merges), as long as the saving is positive. A merge is never planned when the fused
    map cannot be served (above the grid or unrecoverable) or when it would exceed
    ``max_group_size`` chips. So the plan never costs more than per-chip Reduce on the same
    map: every merge lowers the planned total.

    Args:
      fault_maps: ``bool[n, R, C]`` maps of the chips to group (all servable on their own).
      weights: ``float[R, C]`` per-PE weights of the rate measure (``systolic.pe_weights``).
      amount: the resilience map as a function (``amount_fn``).
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
    members = [[i] for i in range(n)]
    alive = np.ones(n, bool)

    def pair_scores(i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reward and fused rate of groups ``i`` paired with every group: ``[len(i), n]``."""
        union = rate[i, None] + rate[None, :] - (maps[i] * w) @ maps.T
        fused = amount(union.reshape(-1)).reshape(union.shape)
        reward = amt[i, None] + amt[None, :] - fused
        sizes = np.array([len(m) for m in members])
        invalid = (
            ~np.isfinite(fused)
            | ~alive[None, :]
            | ~alive[i, None]
            | (sizes[i, None] + sizes[None, :] > max_group_size)
            | (i[:, None] == np.arange(n)[None, :])
        )
        return np.where(invalid, -np.inf, reward), union

    reward, union = pair_scores(np.arange(n))
    while True:
        best = reward.max()
        if not best > 0:
            break
        cand = np.argwhere(reward == best)
        i, j = cand[np.argmin(union[cand[:, 0], cand[:, 1]])]
        i, j = (int(i), int(j)) if i < j else (int(j), int(i))
        maps[i] = np.maximum(maps[i], maps[j])
        rate[i] = maps[i] @ w
        amt[i] = amount(rate[i : i + 1])[0]
        members[i] += members[j]
        alive[j] = False
        members[j] = []
        row, row_union = pair_scores(np.array([i]))
        reward[i], union[i] = row[0], row_union[0]
        reward[:, i], union[:, i] = row[0], row_union[0]
        reward[j], reward[:, j] = -np.inf, -np.inf
    return sorted((sorted(m) for m in members if m), key=lambda m: m[0])
