"""Verification that stops early: the hypergeometric test, its decisions against the whole
split, and its evaluation of real chips slice by slice."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from reduce_jax.engine import population, train
from reduce_jax.hardware import faults
from reduce_jax.stages import sequential


@pytest.mark.parametrize(
    "n, target, expected",
    # 9/10 in float32 reads 0.89999998, below 0.9: the engine's accuracy decides.
    [(7, 0.9, 7), (10, 0.9, 10), (10, 0.0, 0), (400, 0.75, 300), (10, 1.5, 11), (3, 1.0, 3)],
)
def test_needed_correct_is_the_fewest_correct_images_meeting_the_target(n, target, expected):
    assert sequential.needed_correct(n, target) == expected
    t = sequential.needed_correct(n, target)
    if t <= n:
        assert float(np.float32(t) / np.float32(n)) >= target
    if t > 0:
        assert float(np.float32(t - 1) / np.float32(n)) < target


def test_slices_cover_the_split_in_near_equal_parts():
    b = sequential.slice_bounds(403, 8)
    assert b[0] == 0 and b[-1] == 403 and len(b) == 9
    assert np.diff(b).max() - np.diff(b).min() <= 1
    assert sequential.slice_bounds(3, 8).tolist() == [0, 1, 2, 3]  # no empty slice


def test_thresholds_test_every_look_at_one_level_no_stricter_than_the_union_bound():
    n, target, alpha, looks = 200, 0.9, 0.02, 5
    seen = sequential.slice_bounds(n, looks)[1:]
    thr = sequential.reject_below(n, seen, target, alpha)
    t_star = sequential.needed_correct(n, target)
    assert thr[-1] == t_star - 1  # the last look is the exact decision
    union = sequential.reject_below(n, seen, target, 0.0)
    for j, m in enumerate(seen[:-1]):
        cdf = stats.hypergeom.cdf(np.arange(m + 1), n, t_star, m)
        # At least what the union bound's level alpha / S rejects, every one a tail <= alpha.
        bonferroni = np.flatnonzero(cdf <= alpha / looks)
        assert thr[j] >= (bonferroni[-1] if len(bonferroni) else -1) >= union[j]
        assert thr[j] == -1 or cdf[thr[j]] <= alpha
    assert sequential.false_reject_probability(n, seen, t_star, thr) <= alpha


def test_the_false_reject_probability_is_what_random_orders_give():
    n, t_star = 60, 50
    seen = np.array([15, 30, 45, 60])
    reject = np.array([10, 23, 36, 49])
    exact = sequential.false_reject_probability(n, seen, t_star, reject)
    rng = np.random.default_rng(1)
    correct = np.arange(n) < t_star
    draws = np.array([np.cumsum(correct[rng.permutation(n)])[seen - 1] for _ in range(20000)])
    assert np.mean((draws <= reject).any(1)) == pytest.approx(exact, abs=0.01)
    assert 0 < exact < 1
    # Nothing is rejected before the last look at threshold -1; the last look is exact.
    assert sequential.false_reject_probability(n, seen, t_star, np.array([-1, -1, -1, 49])) == 0


def _test(n, target, slices, alpha, seed=0):
    return sequential.make_test(n, target, slices, alpha, jax.random.key(seed))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(10, 300), st.floats(0.5, 0.99), st.integers(1, 10), st.floats(0.0, 0.3),
    st.data(),
)  # fmt: skip
def test_acceptance_needs_the_whole_split_and_equals_its_decision(n, target, slices, alpha, data):
    test = _test(n, target, slices, alpha)
    correct = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    b = test.bounds
    hits = np.array([[correct[b[j] : b[j + 1]].sum() for j in range(test.slices)]])
    accept, seen = sequential.decide(hits, test)
    whole = correct.sum() >= sequential.needed_correct(n, target)
    # A chip that misses the target is always rejected; an accepted chip saw every image.
    assert not accept[0] or (whole and seen[0] == n)
    assert seen[0] in b[1:]
    if alpha == 0:  # only a target out of reach stops early: the same decision always
        assert accept[0] == whole


def test_a_chip_just_at_the_target_is_rejected_at_most_alpha_of_the_time():
    """The hardest case: exactly T* of N correct, the images in random orders."""
    n, target, alpha, slices = 400, 0.9, 0.05, 8
    t_star = sequential.needed_correct(n, target)
    correct = np.arange(n) < t_star
    test = _test(n, target, slices, alpha)
    rng = np.random.default_rng(0)
    b = test.bounds
    hits = np.array([np.add.reduceat(correct[rng.permutation(n)], b[:-1]) for _ in range(4000)])
    accept, _ = sequential.decide(hits, test)
    exact = sequential.false_reject_probability(n, b[1:], t_star, test.reject)
    assert exact <= alpha
    # The level is calibrated to alpha, so the rate is near it (3 standard errors).
    assert 1 - accept.mean() == pytest.approx(exact, abs=3 * np.sqrt(alpha / 4000))
    # ... and a chip far below the target is stopped after few images.
    low = np.array([np.add.reduceat(rng.random(n) < 0.6, b[:-1]) for _ in range(200)])
    accept, seen = sequential.decide(low, test)
    assert not accept.any() and seen.mean() <= n / 4


def _chips(tiny_mlp, tiny_mlp_variables, digits_device):
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    rates = np.array([0.0, 0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(2), len(rates), 8, 8, rates))
    states, masks = population.init_chunk(
        trainer, tiny_mlp_variables, maps, np.zeros(len(maps), np.int64)
    )
    return trainer, states, masks


def test_verify_stops_evaluating_rejected_chips_and_audit_changes_nothing(
    tiny_mlp, tiny_mlp_variables, digits_device
):
    """Real chips (masked baselines from fault-free to 90% faulty PEs): the verdict slice by
    slice equals ``decide`` on every slice's hits; auditing (evaluating everything) gives
    the same decisions and cost, and the whole split's decisions."""
    trainer, states, masks = _chips(tiny_mlp, tiny_mlp_variables, digits_device)
    whole = population.evaluate(trainer, states, masks, digits_device)
    target = float(np.sort(whole)[len(whole) // 2])
    test = _test(len(digits_device.val_labels), target, 6, 0.05, seed=1)
    sliced = sequential.slice_data(digits_device, test)
    ids = np.arange(len(whole))
    fast = sequential.verify(trainer, states, masks, sliced, test, ids)
    audit = sequential.verify(trainer, states, masks, sliced, test, ids, audit=True)
    np.testing.assert_array_equal(fast.accept, audit.accept)
    np.testing.assert_array_equal(fast.seen, audit.seen)
    np.testing.assert_array_equal(audit.whole_accept, whole >= target)
    np.testing.assert_allclose(audit.accuracy, whole, atol=1e-6)
    assert np.all(fast.accept <= audit.whole_accept)  # never accepts what the split rejects
    assert fast.seen.sum() < len(ids) * test.num_images  # some chip stopped early
    np.testing.assert_allclose(fast.accuracy[fast.accept], whole[fast.accept], atol=1e-6)
    # A subset of chips is verified as when verified with the others.
    some = sequential.verify(trainer, states, masks, sliced, test, ids[[1, 5, 6]])
    np.testing.assert_array_equal(some.accept, fast.accept[[1, 5, 6]])
    np.testing.assert_array_equal(some.seen, fast.seen[[1, 5, 6]])


def test_the_whole_split_test_is_the_usual_verification(
    tiny_mlp, tiny_mlp_variables, digits_device
):
    trainer, states, masks = _chips(tiny_mlp, tiny_mlp_variables, digits_device)
    whole = population.evaluate(trainer, states, masks, digits_device)
    target = float(np.sort(whole)[3])
    test = sequential.whole_split(len(digits_device.val_labels), target)
    sliced = sequential.slice_data(digits_device, test)
    v = sequential.verify(trainer, states, masks, sliced, test, np.arange(len(whole)))
    np.testing.assert_array_equal(v.accept, whole >= target)
    assert np.all(v.seen == test.num_images)
    np.testing.assert_allclose(v.accuracy, whole, atol=1e-6)
