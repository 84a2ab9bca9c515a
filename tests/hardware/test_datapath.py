"""Layers on the int8 array: the forward pass is the chip's exact output, the backward pass
is straight-through, masked weights stay zero, vmap over chips equals a loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reduce_jax.hardware import datapath, faults, quant, stuck_at, systolic

ARRAY = (4, 3)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 11)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(11, 7)), jnp.float32)
    maps = faults.sample_fault_maps(jax.random.key(0), 4, *ARRAY, 0.4)
    pop = stuck_at.sample_stuck_at(jax.random.key(1), maps)
    return x, w, quant.activation_scale(x), maps, pop


def _chip(pop, i):
    return jax.tree.map(lambda m: m[i], pop)


def test_forward_is_the_chips_integer_output_dequantized(problem):
    x, w, s, _, pop = problem
    chip = _chip(pop, 1)
    y = datapath.int8_matmul(x, w, s, ARRAY, chip)
    ws = quant.weight_scale(w)
    acc = stuck_at.stuck_at_matmul(quant.quantize(x, s), quant.quantize(w, ws), chip)
    np.testing.assert_array_equal(y, quant.dequantize(acc, s, ws))
    np.testing.assert_array_equal(
        datapath.int8_matmul(x, w, s, ARRAY), quant.quantized_matmul(x, w, s, ARRAY)
    )
    assert np.any(np.asarray(y) != np.asarray(datapath.int8_matmul(x, w, s, ARRAY)))


def test_fault_free_gradient_is_the_fake_quantized_products(problem):
    x, w, _, maps, _ = problem
    s = quant.activation_scale(x, percentile=90.0)  # some inputs clipped
    mask = systolic.kernel_mask(w.shape, maps[0])
    cot = jnp.asarray(np.random.default_rng(1).normal(size=(6, 7)), jnp.float32)

    def exact(x, w):
        return jnp.sum(datapath.int8_matmul(x, w, s, ARRAY, mask=mask) * cot)

    def fake(x, w):
        return jnp.sum(quant.fake_quant(x, s) @ quant.fake_quant_kernel(w, mask) * cot)

    for got, want in zip(jax.grad(exact, (0, 1))(x, w), jax.grad(fake, (0, 1))(x, w), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(jax.grad(exact, 1)(x, w))[np.asarray(mask) == 0] == 0.0)


def test_input_gradient_uses_the_stuck_weight_registers():
    x = jnp.ones((1, 2), jnp.float32)
    w = jnp.array([[1.0], [0.5]], jnp.float32)
    chip = jax.tree.map(
        jnp.asarray,
        jax.tree.map(lambda m: m[0], stuck_at.table_to_masks([(0, 1, 0, 0, 7, 1)], 1, 2, 1)),
    )
    dx = jax.grad(lambda v: datapath.int8_matmul(v, w, 1 / 127, (2, 1), chip).sum())(x)
    # Weights quantize to 127 and 64 (scale 1/127); the sign bit stuck at 1 holds 64 - 128.
    np.testing.assert_allclose(dx, [[1.0, -64 / 127]], rtol=1e-6)


def test_fault_aware_steps_keep_masked_weights_zero_and_vmap_equals_loop(problem):
    x, w, s, maps, pop = problem
    y = jnp.asarray(np.random.default_rng(2).normal(size=(6, 7)), jnp.float32)
    masks = jax.vmap(lambda m: systolic.kernel_mask(w.shape, m))(maps)
    opt = optax.adam(1e-2)

    def step(params, state, mask, chip):
        loss, g = jax.value_and_grad(
            lambda p: jnp.mean((datapath.int8_matmul(x, p, s, ARRAY, chip, mask) - y) ** 2)
        )(params)
        updates, state = opt.update(g * mask, state, params)
        return optax.apply_updates(params, updates), state, loss

    params = w * masks
    state = jax.vmap(opt.init)(params)
    batched = jax.jit(jax.vmap(step))
    losses = []
    for _ in range(3):
        params, state, loss = batched(params, state, masks, pop)
        losses.append(loss)
    assert np.all(np.asarray(params)[np.asarray(masks) == 0] == 0.0)
    moved = np.asarray(params - w * masks)[np.asarray(masks) == 1]
    assert np.all(np.isfinite(losses)) and np.any(moved != 0.0)
    for i in range(4):
        p, st = w * masks[i], opt.init(w * masks[i])
        for _ in range(3):
            p, st, _ = step(p, st, masks[i], _chip(pop, i))
        np.testing.assert_allclose(params[i], p, rtol=1e-6, atol=1e-7)


def test_int8_conv_matches_a_convolution_of_fake_quantized_values(problem):
    _, _, _, maps, _ = problem
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
    mask = systolic.kernel_mask(kernel.shape, maps[2])
    s = quant.activation_scale(x)

    def exact(k):
        return datapath.int8_conv(x, k, s, ARRAY, mask=mask, strides=(2, 1))

    def fake(k):
        return jax.lax.conv_general_dilated(
            quant.fake_quant(x, s),
            quant.fake_quant_kernel(k, mask),
            (2, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    np.testing.assert_allclose(exact(kernel), fake(kernel), rtol=1e-5, atol=1e-5)
    g_exact = jax.grad(lambda k: jnp.sum(exact(k) ** 2))(kernel)
    g_fake = jax.grad(lambda k: jnp.sum(fake(k) ** 2))(kernel)
    np.testing.assert_allclose(g_exact, g_fake, rtol=1e-4, atol=1e-4)


def test_faults_for_another_array_are_refused(problem):
    x, w, s, _, pop = problem
    with pytest.raises(ValueError, match="array"):
        datapath.int8_matmul(x, w, s, (8, 8), _chip(pop, 0))
