"""The models on the int8 array: the forward pass is an integer network (checked against an
independent numpy one), ``vmap`` over chips equals a loop, quantization-aware steps keep
bypassed weights at exactly zero, and a fault-free int8 net is about as accurate as float32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reduce_jax.engine import train
from reduce_jax.hardware import faults, stuck_at
from reduce_jax.nets import int8, models
from reduce_jax.stages import mitigation

ARRAY = (4, 4)


# ------------------------------------------------------------- numpy integer reference


def _q(x: np.ndarray, scale) -> np.ndarray:
    """int64 ``clip(round_half_even(x / scale), -127, 127)`` in float32 arithmetic."""
    v = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
    return np.clip(np.round(v), -127, 127).astype(np.int64)


def _wscale(w: np.ndarray) -> np.ndarray:
    amax = np.abs(w.reshape(-1, w.shape[-1])).max(axis=0)
    return np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)


def _ref_matmul(x: np.ndarray, w: np.ndarray, x_scale) -> np.ndarray:
    """The int8 layer in numpy: integer product in int64 (no overflow at these sizes)."""
    ws = _wscale(w)
    acc = _q(x, x_scale) @ _q(w, ws)
    return acc.astype(np.float32) * (np.float32(x_scale) * ws)


def _ref_conv_same(x: np.ndarray, w: np.ndarray, x_scale) -> np.ndarray:
    """SAME stride-1 convolution by explicit patches, on the int8 layer above."""
    b, h, wd, c = x.shape
    kh, kw, _, o = w.shape
    xp = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    patches = np.zeros((b, h, wd, kh, kw, c), np.float32)
    for i in range(kh):
        for j in range(kw):
            patches[:, :, :, i, j] = xp[:, i : i + h, j : j + wd]
    y = _ref_matmul(patches.reshape(b * h * wd, -1), w.reshape(-1, o), x_scale)
    return y.reshape(b, h, wd, o)


def _ref_pool(y: np.ndarray) -> np.ndarray:
    b, h, w, c = y.shape
    return y[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _ref_lenet(params, scales, x: np.ndarray) -> np.ndarray:
    p = jax.tree.map(np.asarray, params)
    s = {k: np.float32(v) for k, v in scales.items()}
    for name in ("conv1", "conv2"):
        y = _ref_pool(_ref_conv_same(x, p[name]["kernel"], s[name])) + p[name]["bias"]
        x = np.maximum(y, 0)
    x = x.reshape(x.shape[0], -1)
    for name in ("fc1", "fc2"):
        x = np.maximum(_ref_matmul(x, p[name]["kernel"], s[name]) + p[name]["bias"], 0)
    return _ref_matmul(x, p["out"]["kernel"], s["out"]) + p["out"]["bias"]


@pytest.fixture(scope="module")
def lenet(digits):
    model = models.get_model("lenet5", 10, 0.5)
    params = models.init_params(model, jax.random.key(0), digits.image_shape)
    images = jnp.asarray(digits.train_images[:64])
    net = int8.Int8Net(model, int8.calibrate(model, params, images), ARRAY)
    return net, params, images


def test_forward_equals_a_numpy_integer_network(lenet):
    net, params, images = lenet
    assert sorted(net.x_scales) == ["conv1", "conv2", "fc1", "fc2", "out"]
    got = np.asarray(jax.jit(lambda x: int8.apply(net, params, x))(images))
    want = _ref_lenet(params, net.x_scales, np.asarray(images))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Not the float network: quantization changes the logits.
    float_logits = np.asarray(models.apply(net.model, {"params": params}, images, False))
    assert np.max(np.abs(got - float_logits)) > 1e-4


class _ConvDense(nn.Module):
    """A convolution with pooling, then a Dense layer: both kinds of layer on the array."""

    @nn.compact
    def __call__(self, x, train=False):
        del train
        x = nn.relu(models.Conv(4, (3, 3), pool=True, name="conv")(x))
        return nn.Dense(10, name="out")(x.reshape(x.shape[0], -1))


def test_vmap_over_chips_equals_a_loop(digits):
    model = _ConvDense()
    params = models.init_params(model, jax.random.key(0), digits.image_shape)
    x = jnp.asarray(digits.train_images[:16])
    net = int8.Int8Net(model, int8.calibrate(model, params, x), ARRAY)
    maps = faults.sample_fault_maps(jax.random.key(3), 3, *ARRAY, 0.25, "exact")
    pop = stuck_at.sample_stuck_at(jax.random.key(4), maps, stuck_at.StuckAtMix(bits="high"))
    assert int8.present_sites(pop) == stuck_at.SITES
    batched = jax.jit(jax.vmap(lambda f: int8.apply(net, params, x, f)))(pop)
    one = jax.jit(lambda f: int8.apply(net, params, x, f))
    for i in range(3):
        chip = one(jax.tree.map(lambda m, i=i: m[i], pop))
        np.testing.assert_allclose(batched[i], chip, rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(batched[0] - batched[1])) > 1e-3  # each chip its own faults


@pytest.mark.slow
def test_folded_resnet_on_the_array_follows_the_float_network(digits):
    # One block a stage: the stem, identity and projection shortcuts, strided convolutions.
    model = models.ResNet(10, widths=(4, 8), blocks_per_stage=1)
    variables = models.init_variables(model, jax.random.key(1), digits.image_shape)
    images = jnp.asarray(digits.train_images[:32])
    folded, params = int8.folded_model(model), int8.fold(variables)
    assert not folded.batch_norm
    net = int8.Int8Net(folded, int8.calibrate(folded, params, images), ARRAY)
    kernels = [p for p in jax.tree_util.tree_flatten_with_path(params)[0] if "kernel" in str(p)]
    assert len(net.x_scales) == len(kernels)  # every kernel has its input's scale
    want = models.apply(model, variables, images, train=False)
    got = jax.jit(lambda x: int8.apply(net, params, x))(images)
    assert float(jnp.max(jnp.abs(got - want))) < 0.05 * float(jnp.max(jnp.abs(want)))
    # The engine's chip: the unfolded variables, folded in the forward pass.
    chip = int8.Int8Model(net)
    logits, updated = jax.jit(lambda v, x: chip.apply(v, x, True, ["batch_stats"]))(
        variables, images
    )
    np.testing.assert_allclose(logits, got, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(updated["batch_stats"]),
        jax.tree.leaves(variables["batch_stats"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)  # the statistics are frozen


def test_quantization_aware_steps_keep_bypassed_weights_zero(
    tiny_mlp, tiny_mlp_params, digits_device
):
    params, d = tiny_mlp_params, digits_device
    scales = int8.calibrate(tiny_mlp, params, d.train_images[:256])
    net = int8.Int8Net(tiny_mlp, scales, ARRAY)
    tx = train.make_optimizer("adam", 1e-2)
    trainer = train.make_trainer(mitigation.fault_aware(net, jax.random.key(4)), tx, 32)
    maps = faults.sample_fault_maps(jax.random.key(5), 2, *ARRAY, 0.3, "exact")
    pop = stuck_at.sample_stuck_at(jax.random.key(6), maps)
    masks = train.make_trainer(tiny_mlp, tx, 32).chips(params, maps)
    variables = {"params": params, "batch_stats": {}}
    budgets = np.full(2, 3, np.int32)
    for chips in ((masks, None), (masks, pop)):  # bypass+retrain; and with faults active
        states = trainer.init_population(variables, chips, budgets)
        images, labels = d.train_images, d.train_labels
        states = trainer.run(states, chips, images, labels, jax.random.key(7), 0, 3)
        assert np.all(np.asarray(states.step) == 3)
        for w, m, w0 in zip(
            jax.tree.leaves(states.params),
            jax.tree.leaves(masks),
            jax.tree.leaves(params),
            strict=True,
        ):
            w, m = np.asarray(w), np.asarray(m)
            assert np.all(w[m == 0] == 0.0)
            assert np.any(w[m == 1] != np.broadcast_to(np.asarray(w0), w.shape)[m == 1])


@pytest.fixture(scope="module")
def trained_mlp(digits_device):
    model = models.MLP(num_classes=10, hidden=(32,))
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 1))
    tx = train.make_optimizer("adam", 3e-3)
    trainer = train.make_trainer(model, tx, 64)
    ones = train.unit_masks(variables["params"])
    d = digits_device
    states = trainer.init_population(variables, ones, jnp.array([300], jnp.int32))
    states = trainer.run(states, ones, d.train_images, d.train_labels, jax.random.key(1), 0, 300)
    acc = float(trainer.evaluate(states.variables, ones, d.test_images, d.test_labels)[0])
    return model, train.slice_chips(states.variables, 0), acc


def test_fault_free_int8_accuracy_is_close_to_float32(trained_mlp, digits_device):
    model, variables, float_acc = trained_mlp
    d = digits_device
    assert float_acc > 0.9
    params = int8.fold(variables)
    net = int8.Int8Net(model, int8.calibrate(model, params, d.train_images), ARRAY)
    none = stuck_at.StuckAt(*(m[None] for m in stuck_at.no_faults(*ARRAY)))
    tx = train.make_optimizer("adam", 1e-3)
    acc = mitigation.mitigate(net, variables, none, d, tx, 0, jax.random.key(0), 64)
    assert acc.mitigations == mitigation.MITIGATIONS
    assert abs(acc.test[0, 0] - float_acc) <= 0.02
    # A fault-free chip: every mitigation is the baseline (no retraining: 0 steps).
    np.testing.assert_array_equal(acc.test[0], acc.test[0, 0])
