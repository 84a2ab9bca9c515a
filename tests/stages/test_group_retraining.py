"""Retraining units of several chips (groups of mixed sizes): one model per group, verified
on every member's own map, and handed to a weight sink pool by pool."""

import jax
import numpy as np
import pytest

from reduce_jax import data as data_lib
from reduce_jax.engine import population, train
from reduce_jax.hardware import faults
from reduce_jax.stages import retraining

KEY = jax.random.key(3)


class _Sink:
    """Records every pool ``retrain`` hands over."""

    def __init__(self):
        self.pools = []

    def write(self, stage, members, steps, maps, diverged, variables):
        first = jax.tree.leaves(variables)[0]
        self.pools.append((stage, members.tolist(), steps.tolist(), maps.copy(), diverged, first))


def test_a_group_model_reads_its_fused_maps_accuracy_on_every_member(
    digits, tiny_mlp, tiny_mlp_variables
):
    """A group's model is trained with the fused map's weights bypassed, so each member's
    own (smaller) mask changes nothing: every member reads the group's accuracy. Groups of
    5, 2 and 1 chips, verified 2 chips at a time (a group of 5 takes three chunks)."""
    data = population.DeviceData.from_dataset(data_lib.split_validation(digits, 0.1))
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(8), 8, 8, 8, 0.1))
    ctx = population.Context(trainer, tiny_mlp_variables, data, 45, 2)
    policy = retraining.Verification(0.0, 0.0, 0, 0)
    groups = [[0, 1, 2, 6, 7], [3, 5], [4]]
    units = retraining.Units.of_groups(groups, np.array([4, 3, 2]), True)
    sink = _Sink()
    out = retraining.retrain(ctx, policy, units, maps, KEY, sink=sink)
    assert out.members.tolist() == [[0, 1, 2, 6, 7], [3, 5, -1, -1, -1], [4, -1, -1, -1, -1]]
    for u, g in enumerate(groups):
        np.testing.assert_allclose(out.member_accuracy[u, : len(g)], out.accuracy_after[u])
        assert np.isnan(out.member_accuracy[u, len(g) :]).all()
    assert not np.allclose(out.accuracy_after, out.accuracy_before)  # trained
    # Every unit reached the sink once, with its fused map and its steps.
    written = {tuple(m): (steps, fused) for _, ms, ss, fs, _, _ in sink.pools
               for m, steps, fused in zip(ms, ss, fs, strict=True)}  # fmt: skip
    assert {s for s, *_ in sink.pools} == {"retrain"}
    assert sorted(written) == [(0, 1, 2, 6, 7), (3, 5, -1, -1, -1), (4, -1, -1, -1, -1)]
    for m, (steps, fused) in written.items():
        chips = [c for c in m if c >= 0]
        np.testing.assert_array_equal(fused, maps[chips].any(0))
        assert steps == units.steps[[tuple(r) for r in units.members.tolist()].index(m)]


@pytest.mark.parametrize("topup_pool_chunks", [1, 2])
def test_results_do_not_depend_on_the_sink(digits, tiny_mlp, tiny_mlp_variables, topup_pool_chunks):
    data = population.DeviceData.from_dataset(data_lib.split_validation(digits, 0.1))
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(9), 4, 8, 8, 0.2))
    ctx = population.Context(trainer, tiny_mlp_variables, data, 45, 2)
    policy = retraining.Verification(0.5, 0.5, 2, 4, topup_pool_chunks)
    units = retraining.Units.of_groups([[0], [1], [2, 3]], np.array([2, 0, 3]), True)
    sink = _Sink()
    with_sink = retraining.retrain(ctx, policy, units, maps, KEY, sink=sink)
    alone = retraining.retrain(ctx, policy, units, maps, KEY)
    for a, b in zip(with_sink, alone, strict=True):
        np.testing.assert_array_equal(a, b)
    assert sum(len(p[1]) for p in sink.pools) == 3


def test_units_of_groups_keep_which_ones_are_retrained():
    units = retraining.Units.of_groups([[0, 1], [2]], np.array([3, 4]), [True, False])
    assert units.retrain.tolist() == [True, False] and units.retrain.dtype == bool
    assert units.members.tolist() == [[0, 1], [2, -1]]
    assert units.steps.tolist() == [3, 0]  # a unit not retrained takes no steps
    assert retraining.Units.of_groups([[0]], np.array([1]), False).retrain.tolist() == [False]
