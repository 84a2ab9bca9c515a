"""The online map: its isotonic fit, its plan for new chips, and the policy on real chips."""

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reduce_jax.engine import population, train
from reduce_jax.engine.progress import ProgressStore
from reduce_jax.hardware import faults
from reduce_jax.stages import online, policies, resilience, sequential

INF = np.inf


def test_isotonic_quantile_pools_violators_at_their_quantile():
    x = [0.1, 0.2, 0.3, 0.4]
    xs, fit = online.isotonic_quantile(x, [10, 30, 20, 40], 0.5)
    np.testing.assert_array_equal(xs, x)
    # 30 > 20 violates: pooled {30, 20}, whose (lower) median is 20.
    np.testing.assert_array_equal(fit, [10, 20, 20, 40])
    # Already non-decreasing: every point keeps its value; unreached needs sort last.
    np.testing.assert_array_equal(
        online.isotonic_quantile(x, [0, 5, 5, INF], 0.25)[1], [0, 5, 5, INF]
    )


def test_equal_rates_share_one_value_the_quantile_of_their_needs():
    xs, fit = online.isotonic_quantile([0.2, 0.2, 0.2, 0.2, 0.5], [40, 10, 20, 30, 50], 0.25)
    np.testing.assert_array_equal(xs, [0.2, 0.5])
    np.testing.assert_array_equal(fit, [10, 50])


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.3]),
            st.sampled_from([0.0, 4.0, 8.0, 12.0, 16.0, INF]),
        ),
        min_size=1,
        max_size=30,
    ),
    st.sampled_from([0.1, 0.25, 0.5, 0.75]),
)
def test_the_fit_is_non_decreasing_and_each_block_holds_one_of_its_needs(pairs, q):
    x, y = np.array(pairs).T
    xs, fit = online.isotonic_quantile(x, y, q)
    assert np.all(np.diff(xs) > 0)
    assert np.all(fit[1:] >= fit[:-1])
    assert set(fit.tolist()) <= set(y.tolist())
    # The lowest fitted value is no more than the quantile of the lowest rate's needs.
    low = y[x == xs[0]]
    assert fit[0] <= np.quantile(low, q, method="inverted_cdf")


POINTS = policies.adaptive_points(4, 18)  # 0, 4, 8, 12, 16, 18


def test_without_observations_every_chip_starts_at_0_and_is_served():
    p = online.plan(
        online.Observations.empty(), np.array([0.0, 0.5]), POINTS, online.OnlineSettings()
    )
    np.testing.assert_array_equal(p.first, [0, 0])
    np.testing.assert_array_equal(p.skip, [False, False])


def _bound(values, q, confidence):
    """The lower confidence bound by its definition: the largest order statistic j with
    P(at least j of m draws at or below the q quantile) >= confidence."""
    v, m = sorted(values), len(values)
    best = 0.0
    for j in range(1, m + 1):
        p = sum(math.comb(m, i) * q**i * (1 - q) ** (m - i) for i in range(j, m + 1))
        if p >= confidence:
            best = v[j - 1]
    return best


@pytest.mark.parametrize("m", [1, 8, 9, 20, 40])
def test_the_lower_bound_of_a_quantile_is_an_order_statistic_few_values_give_0(m):
    values = np.random.default_rng(m).integers(0, 40, m).astype(float)
    got = online.quantile_lower_bound(values, 0.25, 0.9)
    assert got == _bound(values.tolist(), 0.25, 0.9)
    assert got <= np.quantile(values, 0.25, method="inverted_cdf")
    if m <= 8:  # 1 - 0.75**8 < 0.9: not even the least of 8 values is a bound
        assert got == 0.0


def _obs(groups):
    rates = np.concatenate([np.full(len(needs), r) for r, needs in groups])
    needs = np.concatenate([np.asarray(needs, float) for _, needs in groups])
    return online.Observations(rates, needs)


def test_a_chip_starts_at_the_point_below_the_lower_bound_at_the_rate_at_or_below_its_own():
    low = list(range(0, 20))  # 20 chips at rate 0.1 needing 0..19 steps
    high = list(range(10, 30))  # 20 chips at rate 0.3 needing 10..29
    obs = _obs([(0.1, low), (0.3, high)])
    s = online.OnlineSettings(quantile=0.5, confidence=0.9)
    p = online.plan(obs, np.array([0.05, 0.1, 0.2, 0.3, 0.9]), POINTS, s)
    b_low, b_high = _bound(low, 0.5, 0.9), _bound(high, 0.5, 0.9)
    assert 0 < b_low < b_high
    grid = lambda v: POINTS[POINTS <= v].max()  # noqa: E731
    np.testing.assert_array_equal(
        p.first, [0, grid(b_low), grid(b_low), grid(b_high), grid(b_high)]
    )
    assert not p.skip.any()
    # Without a margin every chip keeps the policy's cap.
    np.testing.assert_array_equal(p.last, 18)
    # The bounds are made non-decreasing: a hard low-rate pool lifts the easy one above it.
    lifted = online.plan(_obs([(0.1, high), (0.3, low)]), np.array([0.3]), POINTS, s)
    assert lifted.first[0] == grid(_bound(high + low, 0.5, 0.9))


def test_a_chip_gets_its_own_cap_from_the_hardest_chip_at_or_below_its_rate():
    obs = _obs([(0.1, [0, 4, 4, 8]), (0.2, [4, 8, INF])])
    s = online.OnlineSettings(quantile=0.25, margin_steps=5, cap_evidence=4)
    p = online.plan(obs, np.array([0.05, 0.1, 0.25]), POINTS, s)
    # 0.05: no chip at or below; 0.1: 4 met (hardest 8) -> 13; 0.25: 6 met -> 8 + 5.
    np.testing.assert_array_equal(p.last, [18, 13, 13])
    assert np.all(p.last >= p.first)
    few = online.plan(obs, np.array([0.1]), POINTS, s._replace(cap_evidence=5))
    assert few.last.tolist() == [18]


def test_chips_are_not_served_only_where_the_bound_is_unreached_with_enough_misses():
    obs = _obs([(0.1, [0.0] * 12), (0.5, [INF] * 12)])
    s = online.OnlineSettings(quantile=0.5, min_evidence=3)
    p = online.plan(obs, np.array([0.1, 0.5, 0.7]), POINTS, s)
    np.testing.assert_array_equal(p.skip, [False, True, True])
    assert p.first[p.skip].tolist() == [0, 0]
    never = online.plan(obs, np.array([0.5]), POINTS, s._replace(min_evidence=0))
    assert not never.skip.any() and never.first.tolist() == [18]
    # Too few misses: the chip is served, from the cap.
    thin = online.plan(
        _obs([(0.5, [INF] * 12)]), np.array([0.5]), POINTS, s._replace(min_evidence=13)
    )
    assert not thin.skip.any()


def _outcome(**kw):
    n = len(kw["steps"])
    base = dict(
        eval_passes=np.ones(n), val=np.ones(n), test=np.ones(n), diverged=np.zeros(n, bool),
        met=np.ones(n, bool), first=np.zeros(n, np.int64), verifications=np.ones(n, np.int64),
        false_rejects=np.zeros(n, np.int64), served=np.ones(n, bool),
    )  # fmt: skip
    base.update(kw)
    return policies.AdaptiveOutcome(**base)


def test_finished_chips_add_their_need_and_misses_add_inf():
    out = _outcome(
        steps=np.array([8, 18, 4, 0]),
        met=np.array([True, False, False, False]),
        diverged=np.array([False, False, True, False]),
        served=np.array([True, True, True, False]),
    )
    obs = online.observations_of(out, np.array([0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_array_equal(obs.rates, [0.1, 0.2])
    np.testing.assert_array_equal(obs.needed_steps, [8, INF])


def _setup(tiny_mlp, tiny_mlp_variables, digits_device, n=12):
    """Chips of the (untrained) tiny MLP and a target some meet early, some late, some never
    within 12 steps (the median, over chips, of the accuracy after 6 steps)."""
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    ctx = population.Context(trainer, tiny_mlp_variables, digits_device, 41, 8)
    rates = np.linspace(0.0, 0.8, n)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(7), n, 8, 8, rates))
    traj = resilience.analyze(ctx, maps[:, None], np.array([6 / 41]), jax.random.key(4))
    return ctx, maps, rates, float(np.median(traj.accuracy[:, 0, 0]))


def test_online_follows_each_chips_adaptive_trajectory_from_its_start(
    tiny_mlp, tiny_mlp_variables, digits_device
):
    """Without observations online is adaptive. From a map that knows these chips, later
    chips start at its lower estimate, are not evaluated before it, and a chip started at
    or below its adaptive stop stops where adaptive stops it with the same accuracy, in no
    more rounds."""
    ctx, maps, rates, target = _setup(tiny_mlp, tiny_mlp_variables, digits_device)
    key = jax.random.key(4)
    adaptive = policies.run_adaptive(ctx, maps, 3, 12, target, key)
    s = online.OnlineSettings(batch=4, quantile=0.5, confidence=0.5, min_evidence=0)
    blank = online.run_online(ctx, maps, rates, 3, 12, target, key, s._replace(batch=12))
    for a, b in zip(blank.outcome, adaptive, strict=True):
        np.testing.assert_array_equal(a, b)
    seen = online.observations_of(adaptive, rates)
    prior = online.Observations(*(np.tile(x, 3) for x in seen))
    line = online.run_online(ctx, maps, rates, 3, 12, target, key, s, prior=prior)
    out = line.outcome
    assert out.first.max() > 0  # the map moved some start
    below = (out.first <= adaptive.steps) & adaptive.met
    assert below.sum() >= 3
    np.testing.assert_array_equal(out.steps[below], adaptive.steps[below])
    np.testing.assert_array_equal(out.met[below], adaptive.met[below])
    np.testing.assert_allclose(out.val[below], adaptive.val[below], atol=1e-6)
    assert np.all(out.verifications[below] <= adaptive.verifications[below])
    assert np.all(out.steps >= out.first)
    assert np.all(out.val[out.met] >= target)
    # Every finished chip is an observation, after the prior's, in arrival order.
    kept = out.served & ~out.diverged
    np.testing.assert_array_equal(line.observations.rates[len(prior.rates) :], rates[kept])


def test_online_starts_from_a_prior_skips_unreachable_chips_and_resumes(
    tmp_path, tiny_mlp, tiny_mlp_variables, digits_device
):
    ctx, maps, rates, target = _setup(tiny_mlp, tiny_mlp_variables, digits_device, n=8)
    key = jax.random.key(4)
    # A prior that says nothing above rate 0.5 reaches the target.
    prior = _obs([(0.0, [0.0]), (0.5, [INF] * 12)])
    s = online.OnlineSettings(batch=4, quantile=0.5, min_evidence=3)
    test = sequential.make_test(len(digits_device.val_labels), target, 4, 0.05, key)
    store = ProgressStore(str(tmp_path), {"run": 1}, overwrite=False)
    line = online.run_online(ctx, maps, rates, 3, 12, target, key, s, test, prior, store)
    out = line.outcome
    skipped = rates >= 0.5
    np.testing.assert_array_equal(~out.served, skipped)
    assert np.all(out.steps[skipped] == 0) and np.all(out.verifications[skipped] == 0)
    assert np.all(np.isnan(out.val[skipped])) and not out.met[skipped].any()
    np.testing.assert_array_equal(line.observations.rates[:13], prior.rates)
    pol = policies.adaptive_policy(out, target)
    assert pol.chips == 8 and pol.chips_meeting_target <= int((~skipped).sum())
    # Resumed from the store: no chip is computed again, and the result is the same.
    broken = ctx._replace(trainer=None)
    again = online.run_online(broken, maps, rates, 3, 12, target, key, s, test, prior, store)
    for a, b in zip(again.outcome, out, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.observations.needed_steps, line.observations.needed_steps)
