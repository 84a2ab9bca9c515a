"""The int8 datapath: scales, quantization, the integer tile product, fake quantization."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reduce_jax.hardware import quant, systolic


def _int8(rng, shape):
    return rng.integers(-127, 128, size=shape).astype(np.int8)


# ------------------------------------------------------------------------------ scales


def test_weight_scale_is_per_output_channel_max_over_127():
    w = np.array([[0.5, -2.0, 0.0], [-1.27, 1.0, 0.0]], np.float32)
    np.testing.assert_allclose(quant.weight_scale(w), [1.27 / 127, 2.0 / 127, 1.0], rtol=1e-6)


def test_weight_scale_ignores_masked_weights_and_conv_kernels_use_last_axis():
    w = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4) - 40
    mask = np.ones_like(w)
    mask[0, 0, 0, :] = 0  # the weights -40..-37, the largest magnitudes of their columns
    expected = np.abs(w * mask).reshape(-1, 4).max(0) / 127
    np.testing.assert_allclose(quant.weight_scale(w, mask), expected, rtol=1e-6)
    assert not np.allclose(quant.weight_scale(w), expected)


def test_activation_scale_from_a_batch():
    x = np.array([[0.1, -3.81], [2.0, 0.0]], np.float32)
    np.testing.assert_allclose(quant.activation_scale(x), 3.81 / 127, rtol=1e-6)
    assert float(quant.activation_scale(np.zeros(5))) == 1.0
    lower = quant.activation_scale(np.linspace(-1, 1, 1001), percentile=50.0)
    np.testing.assert_allclose(lower, 0.5 / 127, rtol=1e-3)


def test_quantize_rounds_half_to_even_and_clips_to_the_symmetric_range():
    q = quant.quantize(np.array([0.5, 1.5, -0.5, 126.6, 300.0, -300.0]), 1.0)
    assert q.dtype == jnp.int8
    np.testing.assert_array_equal(q, [0, 2, 0, 127, 127, -127])


def test_dequantize_scales_by_both_scales():
    acc = jnp.array([[2, -4]], jnp.int32)
    out = quant.dequantize(acc, jnp.float32(0.5), jnp.array([1.0, 0.25]))
    np.testing.assert_array_equal(out, [[1.0, -0.5]])


# ---------------------------------------------------------------------- integer product


@pytest.mark.parametrize(
    "b,k,n,rows,cols",
    [(3, 7, 5, 2, 3), (4, 33, 9, 8, 4), (1, 5, 2, 16, 16), (2, 16, 16, 4, 4), (2, 3000, 3, 16, 16)],
)
def test_int_matmul_equals_numpy_integers_bit_for_bit(b, k, n, rows, cols):
    rng = np.random.default_rng(k * 100 + n)
    x, w = _int8(rng, (b, k)), _int8(rng, (k, n))
    out = jax.jit(quant.int_matmul, static_argnums=2)(x, w, (rows, cols))
    assert out.dtype == jnp.int32 and out.shape == (b, n)
    np.testing.assert_array_equal(out, x.astype(np.int64) @ w.astype(np.int64))


def test_int_matmul_wraps_like_an_int32_adder():
    # 2**17 + 4 products of -128 * -128 = 2**14 sum to 2**31 + 2**16: past int32's range.
    k = 2**17 + 4
    x = np.full((1, k), -128, np.int8)
    w = np.full((k, 1), -128, np.int8)
    out = quant.int_matmul(x, w, (256, 256))
    exact = k * 2**14
    assert int(out[0, 0]) == (exact + 2**31) % 2**32 - 2**31


def test_int_matmul_is_exact_past_float32_integers():
    # 3000 products of 127 * 127 = 16129 (odd): sums past 2**24, where float32 no longer
    # holds every integer.
    x = np.full((1, 3000), 127, np.int8)
    w = np.full((3000, 2), 127, np.int8)
    w[::2, 1] = -127
    out = quant.int_matmul(x, w, (16, 16))
    np.testing.assert_array_equal(out, [[3000 * 16129, 0]])
    assert 3000 * 16129 > 2**24


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 4),
    k=st.integers(1, 40),
    n=st.integers(1, 12),
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    seed=st.integers(0, 2**31),
)
def test_int_matmul_property(b, k, n, rows, cols, seed):
    rng = np.random.default_rng(seed)
    x, w = _int8(rng, (b, k)), _int8(rng, (k, n))
    out = quant.int_matmul(x, w, (rows, cols))
    np.testing.assert_array_equal(out, x.astype(np.int64) @ w.astype(np.int64))


def test_tile_operands_put_k_on_pe_row_k_mod_r():
    x = np.arange(7, dtype=np.int8)[None]
    w = np.arange(7 * 2, dtype=np.int8).reshape(7, 2)
    xt, wt = quant.tile_operands(x, w, 3)
    assert xt.shape == (1, 3, 3) and wt.shape == (3, 3, 2)
    pe_row, _ = systolic.pe_coordinates((7, 2), 3, 2)
    for k in range(7):
        t, r = divmod(k, 3)
        assert r == pe_row[k, 0] and xt[0, t, r] == k
        np.testing.assert_array_equal(wt[t, r], w[k])
    np.testing.assert_array_equal(xt[0, 2, 1:], 0)
    np.testing.assert_array_equal(wt[2, 1:], 0)


@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 2), "SAME"), ((1, 2), "VALID")])
def test_integer_convolution_equals_lax_convolution(strides, padding):
    rng = np.random.default_rng(0)
    x = _int8(rng, (2, 7, 6, 3))
    kernel = _int8(rng, (3, 3, 3, 5))
    out = quant.conv_as_matmul(
        x, kernel, functools.partial(quant.int_matmul, array=(4, 4)), strides, padding
    )
    # Float32 is exact here: every partial sum is an integer below 2**24 in magnitude.
    ref = jax.lax.conv_general_dilated(
        x.astype(np.float32),
        kernel.astype(np.float32),
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, np.asarray(ref).astype(np.int64))


def test_quantized_matmul_matches_fake_quantized_float_product():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 20)).astype(np.float32)
    w = rng.normal(size=(20, 6)).astype(np.float32)
    mask = (rng.random((20, 6)) > 0.3).astype(np.float32)
    s = quant.activation_scale(x)
    out = quant.quantized_matmul(x, w, s, (4, 4), mask)
    ref = quant.fake_quant(x, s) @ quant.fake_quant_kernel(w, mask)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, x @ (w * mask), atol=0.1)


# ---------------------------------------------------------------------------- fake quant


def test_fake_quant_values_lie_on_the_grid():
    x = jnp.linspace(-2.0, 2.0, 101)
    y = quant.fake_quant(x, jnp.float32(0.01))
    np.testing.assert_allclose(y / 0.01, np.round(y / 0.01), atol=1e-4)
    assert float(jnp.max(jnp.abs(y))) == pytest.approx(1.27)


def test_fake_quant_gradient_is_straight_through_inside_the_range_and_zero_outside():
    x = jnp.array([-3.0, -1.0, 0.123, 0.5, 1.27, 2.0])
    g = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, jnp.float32(0.01)) * jnp.arange(6.0)))(x)
    np.testing.assert_array_equal(g, [0.0, 1.0, 2.0, 3.0, 4.0, 0.0])


def test_fake_quant_kernel_gradient_is_the_masked_identity():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    mask = jnp.asarray(rng.random(w.shape) > 0.4, jnp.float32)
    cot = jnp.asarray(rng.normal(size=w.shape), jnp.float32)
    g = jax.grad(lambda v: jnp.sum(quant.fake_quant_kernel(v, mask) * cot))(w)
    np.testing.assert_array_equal(g, cot * mask)


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1, momentum=0.9), optax.adamw(1e-2)])
def test_masked_weights_stay_exactly_zero_through_optax_steps(optimizer):
    rng = np.random.default_rng(3)
    fault = jnp.asarray(rng.random((2, 3)) < 0.4)
    w = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    mask = systolic.kernel_mask(w.shape, fault)
    x = jnp.asarray(rng.normal(size=(16, 7)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    s = quant.activation_scale(x)
    params = w * mask
    state = optimizer.init(params)

    def loss(p):
        out = quant.fake_quant(x, s) @ quant.fake_quant_kernel(p, mask)
        return jnp.mean((out - y) ** 2)

    start = loss(params)
    for _ in range(5):
        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert np.all(np.asarray(params)[np.asarray(mask) == 0] == 0.0)
    assert np.any(np.asarray(params - w * mask)[np.asarray(mask) == 1] != 0.0)
    assert loss(params) < start
