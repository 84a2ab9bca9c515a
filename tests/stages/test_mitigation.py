"""The four mitigations of stuck-at faults, per chip: what each one computes, chip by chip,
whatever chips it is batched with."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from reduce_jax.engine import population, train
from reduce_jax.hardware import faults, stuck_at
from reduce_jax.nets import int8
from reduce_jax.stages import mitigation, policies

ARRAY = (4, 4)


@pytest.fixture(scope="module")
def setup(tiny_mlp, tiny_mlp_variables, digits_device):
    d = digits_device
    params = int8.fold(tiny_mlp_variables)
    net = int8.Int8Net(tiny_mlp, int8.calibrate(tiny_mlp, params, d.train_images[:256]), ARRAY)
    maps = faults.sample_fault_maps(jax.random.key(0), 3, *ARRAY, 0.2, "exact")
    mix = stuck_at.StuckAtMix((0.0, 0.0, 1.0), p_one=1.0, bits="msb")  # psum sign bit, at 1
    pop = stuck_at.sample_stuck_at(jax.random.key(1), maps, mix)
    return net, tiny_mlp_variables, maps, pop


@pytest.mark.slow
def test_mitigations_per_chip(setup, tiny_mlp, digits_device):
    net, variables, maps, pop = setup
    d, tx, key = digits_device, train.make_optimizer("adam", 1e-2), jax.random.key(2)
    acc = mitigation.mitigate(net, variables, pop, d, tx, 20, key, 64, chips_per_batch=2)
    assert acc.val.shape == acc.test.shape == (3, 4)
    none, bypass, retrained, aware = acc.val.T
    # A stuck sign bit of a partial sum wrecks the unmitigated chip; bypass removes it.
    assert np.all(none < bypass)
    assert np.all(retrained > bypass)
    # Chip by chip: the same with the chips batched otherwise (one chip, other mitigations).
    one = jax.tree.map(lambda m: m[1:2], pop)
    alone = mitigation.mitigate(
        net, variables, one, d, tx, 20, key, 64, mitigations=("fault-aware", "none")
    )
    np.testing.assert_allclose(alone.val[0], [aware[1], none[1]], atol=1.5 / len(d.val_labels))
    # The float32 reference on the same PE maps: FAP keeps the chip's healthy weights.
    fb = mitigation.float_bypass(tiny_mlp, variables, maps, d, tx, 20, key, 64)
    assert fb.mitigations == mitigation.FLOAT_MITIGATIONS and fb.val.shape == (3, 2)
    assert np.all(np.abs(fb.val[:, 0] - bypass) <= 0.1)


def test_unknown_mitigation_is_refused(setup, digits_device):
    net, variables, _, pop = setup
    tx = train.make_optimizer("adam", 1e-2)
    with pytest.raises(ValueError, match="allowed: none, bypass"):
        mitigation.mitigate(
            net, variables, pop, digits_device, tx, 1, jax.random.key(0), 8, mitigations=("fap",)
        )


def test_stuck_bits_drawn_from_a_map_are_a_function_of_the_map():
    key = jax.random.key(7)
    maps = np.array(faults.sample_fault_maps(jax.random.key(8), 64, 8, 8, 0.25, "exact"))
    maps[:, 0, 0] = True  # every chip has PE (0, 0) faulty
    draw = jax.jit(jax.vmap(lambda m: stuck_at.from_map(key, m, stuck_at.DEFAULT_MIX)))
    a, b = draw(maps), draw(maps[::-1])
    for x, y in zip(a, b, strict=True):  # the same map: the same bits, in any batch
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y)[::-1])
    np.testing.assert_array_equal(np.asarray(stuck_at.faulty_pes(a)), maps)
    one = stuck_at.from_map(key, maps[5], stuck_at.DEFAULT_MIX)
    np.testing.assert_array_equal(np.asarray(one.or_mask), np.asarray(a.or_mask[5]))
    # Other maps draw independently: PE (0, 0)'s stuck bit differs from chip to chip.
    pe = np.concatenate([np.asarray(a.and_mask[:, :, 0, 0]), np.asarray(a.or_mask[:, :, 0, 0])], 1)
    bits = {tuple(row) for row in pe.tolist()}
    assert len(bits) > 16
    # Another key: other bits.
    other = jax.vmap(lambda m: stuck_at.from_map(jax.random.key(9), m, stuck_at.DEFAULT_MIX))(maps)
    assert not np.array_equal(np.asarray(other.or_mask), np.asarray(a.or_mask))


def test_fault_aware_chips_are_the_int8_chips_of_their_stuck_bits(setup, digits_device):
    net, variables, maps, _ = setup
    mix = stuck_at.StuckAtMix((0.2, 0.3, 0.5), 0.5, "high")
    key = jax.random.key(3)
    aware = net._replace(sites=stuck_at.SITES)
    trainer = train.make_trainer(
        mitigation.fault_aware(aware, key, mix), train.make_optimizer("adam", 1e-3), 32
    )
    params = int8.fold(variables)
    chips = trainer.chips(params, maps)
    masks, found = chips
    for m in jax.tree.leaves(masks):  # nothing bypassed
        assert np.all(np.asarray(m) == 1)
    x, y = digits_device.test_images[:50], digits_device.test_labels[:50]
    many = jax.tree.map(lambda v: np.stack([v] * len(maps)), {"params": params, "batch_stats": {}})
    acc = np.asarray(trainer.evaluate(many, chips, x, y))
    for i, m in enumerate(maps):  # a loop over chips: each one's own bits from its own map
        bits = stuck_at.from_map(key, m, mix)
        for f, g in zip(bits, found, strict=True):
            np.testing.assert_array_equal(np.asarray(f), np.asarray(g[i]))
        logits = int8.apply(aware, params, x, bits)
        assert acc[i] == pytest.approx(float(np.mean(np.argmax(logits, -1) == np.asarray(y))))


def test_fault_aware_compute_counts_the_row_by_row_array_in_full(setup, tiny_mlp, digits_device):
    """Stuck psum bits run the array row by row in a scan, which XLA's cost analysis counts
    once: the policies' compute is measured on the same arithmetic without it."""
    net, variables, _, _ = setup
    tx = train.make_optimizer("adam", 1e-3)
    params = {"params": int8.fold(variables), "batch_stats": {}}
    counts = {}
    for sites in (("weight",), ("weight", "product", "psum")):
        hw = mitigation.fault_aware(net._replace(sites=sites), jax.random.key(0))
        ctx = population.Context(train.make_trainer(hw, tx, 32), params, digits_device, 41, 8)
        counts[sites] = policies.measure_compute(ctx, 32, 100, ARRAY)
    weight, every = counts.values()
    assert every.step_flops == weight.step_flops and every.eval_flops == weight.eval_flops
    bypass = train.make_trainer(tiny_mlp, tx, 32)
    plain = policies.measure_compute(
        population.Context(bypass, params, digits_device, 41, 8), 32, 100, ARRAY
    )
    assert 0.5 * plain.eval_flops <= weight.eval_flops <= 4 * plain.eval_flops
