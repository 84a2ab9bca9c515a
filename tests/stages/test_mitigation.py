"""The four mitigations of stuck-at faults, per chip: what each one computes, chip by chip,
whatever chips it is batched with."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from reduce_jax.engine import train
from reduce_jax.hardware import faults, stuck_at
from reduce_jax.nets import int8
from reduce_jax.stages import mitigation

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
