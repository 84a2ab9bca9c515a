"""conv2d / conv2d_pool: values and gradients equal lax's, and vmap equals a loop over chips
in every batching case (shared input, shared kernel, both per chip; lax.map and GEMMs)."""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from reduce_jax.nets import conv

TOL = dict(rtol=2e-5, atol=2e-5)


def _ref_conv(x, kernel, padding, strides=(1, 1)):
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _ref_pool(y):
    b, h, w, c = y.shape
    y = y[:, : h // 2 * 2, : w // 2 * 2]
    return y.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _normal(seed, shape):
    """Standard normal float32 values, from numpy: a jax.random draw compiles a program for
    every new shape, which costs more than most of these tests."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _loss(fn, x, kernel, probe):
    """A scalar whose gradient checks every output element (``probe`` weighs them)."""
    return jnp.sum(fn(x, kernel) * probe)


def _assert_value_and_grads_equal(ours, ref, x, kernel):
    """``ours(x, kernel)`` (jitted) equals ``ref``, and so do both gradients."""
    out = jax.jit(ours)(x, kernel)
    np.testing.assert_allclose(out, ref(x, kernel), **TOL)
    probe = _normal(2, out.shape)
    grads = jax.jit(jax.grad(functools.partial(_loss, ours), (0, 1)))(x, kernel, probe)
    ref_grads = jax.grad(functools.partial(_loss, ref), (0, 1))(x, kernel, probe)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def _id(value):
    """A test id's part: ``3x3`` for a shape, ``SAME_3x3_6x6_2_4_1x1`` for a geometry."""
    if isinstance(value, tuple):
        return ("x" if all(isinstance(v, int) for v in value) else "_").join(map(_id, value))
    return str(value)


def _cross(names: str, fast, **values):
    """Every combination of ``values`` (in ``names``' order) as parameters; those not in
    ``fast`` are marked slow. The fast ones hold every value of every parameter (and, where
    listed so, every pair of values), so the fast tests still reach each case's code."""
    keys = [k.strip() for k in names.split(",")]
    combos = itertools.product(*(values[k] for k in keys))
    return [c if c in fast else pytest.param(*c, marks=pytest.mark.slow) for c in combos]


@pytest.mark.parametrize(
    "padding, kernel_size, channels",
    _cross(
        "padding, kernel_size, channels",
        # Each kernel size, each padding with each channel count.
        fast={
            ("SAME", (3, 3), (2, 4)),
            ("VALID", (2, 2), (5, 8)),
            ("SAME", (4, 3), (5, 8)),
            ("VALID", (5, 5), (2, 4)),
        },
        padding=["SAME", "VALID"],
        kernel_size=[(3, 3), (2, 2), (4, 3), (5, 5)],
        channels=[(2, 4), (5, 8)],  # (5, 8) pads the input to 8 on a CPU
    ),
    ids=_id,
)
def test_conv2d_value_and_grads_equal_lax(padding, kernel_size, channels):
    cin, cout = channels
    x, kernel = _normal(0, (3, 7, 6, cin)), _normal(1, (*kernel_size, cin, cout))
    ours = functools.partial(conv.conv2d, padding=padding)
    _assert_value_and_grads_equal(ours, functools.partial(_ref_conv, padding=padding), x, kernel)


@pytest.mark.parametrize(
    "padding, strides, kernel_size, size",
    _cross(
        "padding, strides, kernel_size, size",
        # Every pair of values of any two parameters.
        fast={
            ("SAME", (1, 1), (1, 1), (8, 8)),
            ("VALID", (1, 1), (3, 3), (7, 9)),
            ("SAME", (2, 2), (1, 1), (7, 9)),
            ("VALID", (2, 2), (3, 3), (8, 8)),
            ("VALID", (1, 2), (1, 1), (8, 8)),
            ("SAME", (1, 2), (3, 3), (7, 9)),
        },
        padding=["SAME", "VALID"],
        strides=[(1, 1), (2, 2), (1, 2)],
        kernel_size=[(1, 1), (3, 3)],
        size=[(8, 8), (7, 9)],  # even and odd input sizes
    ),
    ids=_id,
)
def test_strided_conv2d_value_and_grads_equal_lax(padding, strides, kernel_size, size):
    height, width = size
    x, kernel = _normal(0, (2, height, width, 3)), _normal(1, (*kernel_size, 3, 4))
    ours = functools.partial(conv.conv2d, padding=padding, strides=strides)
    ref = functools.partial(_ref_conv, padding=padding, strides=strides)
    _assert_value_and_grads_equal(ours, ref, x, kernel)


@pytest.mark.parametrize(
    "padding, size",
    _cross(
        "padding, size",
        # An even output (8x6, SAME) and an odd one (7x9, VALID: 5x7).
        fast={("SAME", (8, 6)), ("VALID", (7, 9))},
        padding=["SAME", "VALID"],
        size=[(8, 6), (7, 9)],  # odd sizes drop a row / column
    ),
    ids=_id,
)
def test_conv2d_pool_value_equals_lax_and_grads_without_ties(padding, size):
    height, width = size
    x, kernel = _normal(0, (2, height, width, 3)), _normal(1, (3, 3, 3, 5))
    ours = functools.partial(conv.conv2d_pool, padding=padding)
    ref = lambda x, k: _ref_pool(_ref_conv(x, k, padding))
    # Random inputs have no tied maxima, so the gradient equals jnp.max's.
    _assert_value_and_grads_equal(ours, ref, x, kernel)


def test_pool_gradient_goes_to_the_first_maximum_of_a_window():
    y = jnp.array([[1.0, 3.0], [3.0, 0.0]]).reshape(1, 2, 2, 1)  # tie between (0,1), (1,0)
    pooled, index = conv.pool_argmax(y)
    assert float(pooled[0, 0, 0, 0]) == 3.0 and int(index[0, 0, 0, 0]) == 1
    dy = conv.unpool(jnp.full((1, 1, 1, 1), 2.0), index, 2, 2)
    np.testing.assert_array_equal(dy[0, :, :, 0], [[0.0, 2.0], [0.0, 0.0]])
    # All four equal: the first one takes it; an odd size gets zeros in the dropped row.
    pooled, index = conv.pool_argmax(jnp.zeros((1, 3, 2, 1)))
    assert int(index[0, 0, 0, 0]) == 0
    dy = conv.unpool(jnp.ones((1, 1, 1, 1)), index, 3, 2)
    np.testing.assert_array_equal(dy[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])


def _chips_loss(fn, x, kernels, probe, x_batched, k_batched):
    """Sum over chips of ``_loss`` under ``vmap`` (in_axes from the batching flags)."""
    axes = (0 if x_batched else None, 0 if k_batched else None, 0)
    per_chip = jax.vmap(functools.partial(_loss, fn), in_axes=axes)
    return per_chip(x, kernels, probe).sum()


CASES = [(False, True), (True, True), (True, False)]  # (input per chip, kernel per chip)
# (padding, kernel size, H, W, C, O, strides): square and odd sizes (pooling drops a row /
# column), uneven SAME padding, 5 input channels (padded to 8 on a CPU), and strided 3x3 and
# 1x1 convolutions (ResNet's downsampling and projection shortcuts; not pooled).
GEOMETRIES = [
    ("SAME", (3, 3), 6, 6, 2, 4, (1, 1)),
    ("VALID", (4, 3), 8, 9, 5, 8, (1, 1)),
    ("SAME", (2, 2), 7, 9, 3, 8, (1, 1)),
]
STRIDED_GEOMETRIES = [
    ("SAME", (3, 3), 7, 8, 3, 4, (2, 2)),
    ("VALID", (3, 3), 8, 7, 2, 4, (2, 2)),
    ("SAME", (1, 1), 7, 8, 3, 4, (2, 2)),
    ("VALID", (1, 1), 6, 5, 2, 4, (1, 1)),
]


def _out_shape(geometry, pool):
    padding, (kh, kw), h, w, _, cout, (sh, sw) = geometry
    if padding == "VALID":
        h, w = h - kh + 1, w - kw + 1
    h, w = -(-h // sh), -(-w // sw)
    return (2, h // 2, w // 2, cout) if pool else (2, h, w, cout)


LAYER_GEOMETRIES = [(False, g) for g in GEOMETRIES]
LAYER_GEOMETRIES += [(True, g) for g in GEOMETRIES] + [(False, g) for g in STRIDED_GEOMETRIES]
# Fast: every (pool, geometry) once, and every batching case on both paths (lax.map: True,
# GEMMs: False) at least once: (layer geometry index, per-chip convolutions, batching case).
FAST_VMAP = {
    (0, False, (False, True)),
    (1, False, (True, True)),
    (2, False, (True, False)),
    (3, True, (True, False)),
    (4, True, (False, True)),
    (5, True, (True, True)),
    (6, True, (True, False)),
    (7, False, (True, True)),
    (8, True, (False, True)),
    (9, True, (True, True)),
}


@pytest.mark.parametrize(
    "pool, geometry, per_chip_convolutions, x_batched, k_batched",
    [
        pytest.param(
            pool,
            geometry,
            per_chip,
            *case,
            marks=[] if (i, per_chip, case) in FAST_VMAP else [pytest.mark.slow],
        )
        for i, (pool, geometry) in enumerate(LAYER_GEOMETRIES)
        for per_chip in (True, False)
        for case in CASES
    ],
    ids=_id,
)
def test_vmap_over_chips_equals_a_loop_over_chips(
    monkeypatch, pool, x_batched, k_batched, per_chip_convolutions, geometry
):
    """Values and gradients of every chip equal the chip computed alone (both the CPU
    ``lax.map`` path and the GEMM path of other backends)."""
    monkeypatch.setattr(conv, "_on_cpu", lambda: per_chip_convolutions)
    padding, kernel_size, h, w, cin, cout, strides = geometry
    chips = 3
    if pool:
        fn = functools.partial(conv.conv2d_pool, padding=padding)
    else:
        fn = functools.partial(conv.conv2d, padding=padding, strides=strides)
    x = _normal(0, (chips, 2, h, w, cin) if x_batched else (2, h, w, cin))
    kernels = _normal(
        1, (chips, *kernel_size, cin, cout) if k_batched else (*kernel_size, cin, cout)
    )
    one = lambda v, batched, i: v[i] if batched else v
    probe = _normal(2, (chips, *_out_shape(geometry, pool)))
    axes = (0 if x_batched else None, 0 if k_batched else None)
    out = jax.jit(jax.vmap(fn, in_axes=axes))(x, kernels)
    loss = functools.partial(_chips_loss, fn, x_batched=x_batched, k_batched=k_batched)
    grad_x, grad_k = jax.jit(jax.grad(loss, (0, 1)))(x, kernels, probe)
    alone = jax.jit(fn)
    grad_alone = jax.jit(jax.grad(functools.partial(_loss, fn), (0, 1)))
    for i in range(chips):
        xi, ki = one(x, x_batched, i), one(kernels, k_batched, i)
        np.testing.assert_allclose(out[i], alone(xi, ki), **TOL)
        gx, gk = grad_alone(xi, ki, probe[i])
        # A shared operand's gradient is the sum over chips.
        if x_batched:
            np.testing.assert_allclose(grad_x[i], gx, rtol=1e-4, atol=1e-4)
        if k_batched:
            np.testing.assert_allclose(grad_k[i], gk, rtol=1e-4, atol=1e-4)
    if not x_batched:
        total = sum(grad_alone(x, one(kernels, k_batched, i), probe[i])[0] for i in range(chips))
        np.testing.assert_allclose(grad_x, total, rtol=1e-4, atol=1e-4)
    if not k_batched:
        total = sum(grad_alone(one(x, x_batched, i), kernels, probe[i])[1] for i in range(chips))
        np.testing.assert_allclose(grad_k, total, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool", [False, True])
def test_nested_vmap_equals_loops(pool):
    """vmap over groups of vmap over chips (per-chip inputs and kernels) equals loops."""
    fn = conv.conv2d_pool if pool else conv.conv2d
    x, kernels = _normal(0, (2, 3, 2, 7, 6, 3)), _normal(1, (2, 3, 3, 3, 3, 8))
    loss = lambda x, k: jnp.sum(jax.vmap(jax.vmap(fn))(x, k) ** 2)
    grad_x, grad_k = jax.jit(jax.grad(loss, (0, 1)))(x, kernels)
    alone = jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k) ** 2), (0, 1)))
    for g in range(2):
        for c in range(3):
            gx, gk = alone(x[g, c], kernels[g, c])
            np.testing.assert_allclose(grad_x[g, c], gx, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(grad_k[g, c], gk, rtol=1e-4, atol=1e-4)


def _hlo(f, *args):
    return jax.jit(f).lower(*args).as_text()


# (ours, lax's) for one chip: a plain, a pooling and a strided 3x3 convolution.
LAYERS = {
    "plain": (conv.conv2d, lambda x, k: _ref_conv(x, k, "SAME")),
    "pool": (conv.conv2d_pool, lambda x, k: _ref_pool(_ref_conv(x, k, "SAME"))),
    "strided": (
        functools.partial(conv.conv2d, strides=(2, 2)),
        lambda x, k: _ref_conv(x, k, "SAME", (2, 2)),
    ),
}


def _groups(text):
    return set(re.findall(r"(?:feature|batch)_group_count = (\d+)", text))


def _per_chip_grad(f):
    return jax.vmap(jax.grad(lambda x, k, p: jnp.sum(f(x, k) * p), (0, 1)))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_population_convolutions_avoid_grouped_convolutions(layer):
    """The point of the batching rules: a vmapped gradient has no grouped convolution (a
    plain vmap of lax's has), and a shared input's layer has no convolution at all (one
    GEMM for every chip)."""
    fn, ref_fn = LAYERS[layer]
    x, kernels = _normal(0, (4, 2, 8, 8, 3)), _normal(1, (4, 3, 3, 3, 5))
    probes = _normal(2, (4, *fn(x[0], kernels[0]).shape))  # per chip, so dy is per chip
    assert _groups(_hlo(_per_chip_grad(fn), x, kernels, probes)) <= {"1"}
    assert "4" in _groups(_hlo(_per_chip_grad(ref_fn), x, kernels, probes))
    shared = jax.vmap(jax.grad(lambda k, p: jnp.sum(fn(x[0], k) * p)))
    compiled = jax.jit(shared).lower(kernels, probes).compile().as_text()
    assert "convolution(" not in compiled and "while(" not in compiled


def test_population_1x1_convolutions_are_matrix_products():
    """A vmapped strided 1x1 convolution and its gradients (per-chip inputs and kernels)
    have no convolution at all."""
    fn = functools.partial(conv.conv2d, strides=(2, 2))
    x, kernels = _normal(0, (4, 2, 8, 7, 3)), _normal(1, (4, 1, 1, 3, 5))
    probes = _normal(2, (4, *fn(x[0], kernels[0]).shape))
    compiled = jax.jit(_per_chip_grad(fn)).lower(x, kernels, probes).compile().as_text()
    assert "convolution(" not in compiled and " dot(" in compiled


def test_pads_of_rejects_other_padding():
    with pytest.raises(ValueError, match="padding must be one of SAME, VALID"):
        conv.pads_of("CIRCULAR", 3, 3)


@pytest.mark.parametrize("size", [1, 2, 7, 8, 9])
@pytest.mark.parametrize("kernel,stride", [(1, 1), (1, 2), (3, 1), (3, 2), (4, 2), (3, 3)])
def test_pads_of_equals_lax_padding(size, kernel, stride):
    want = lax.padtype_to_pads((size, size), (kernel, kernel), (stride, stride), "SAME")
    got = conv.pads_of("SAME", kernel, kernel, (stride, stride), (size, size))
    assert [tuple(p) for p in want] == list(got)


def test_conv2d_rejects_bad_strides():
    x, kernel = jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1))
    for strides in [(0, 1), (2,), (1, -1)]:
        with pytest.raises(ValueError, match="strides must be two integers >= 1"):
            conv.conv2d(x, kernel, strides=strides)
