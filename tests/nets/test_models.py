"""Models: their convolutions equal Flax convolutions; shapes and parameter names."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reduce_jax.hardware import systolic
from reduce_jax.nets import conv, models


def _normal(seed, shape):
    """Standard normal float32 values, from numpy: a jax.random draw compiles a program for
    every new shape, which costs more than these tests."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize(
    "kernel_size,strides",
    [((3, 3), (1, 1)), ((2, 2), (1, 1)), ((4, 3), (1, 1)), ((3, 3), (2, 2)), ((1, 1), (2, 2))],
)
def test_conv_equals_flax_conv(padding, kernel_size, strides):
    x = _normal(0, (2, 7, 6, 3))
    layer = models.Conv(4, kernel_size, padding=padding, strides=strides)
    flax_conv = nn.Conv(4, kernel_size, padding=padding, strides=strides)
    # Same parameter names, shapes (HWIO kernel) and dtypes as nn.Conv.
    shapes = jax.eval_shape(layer.init, jax.random.key(1), x)["params"]
    ref_shapes = jax.eval_shape(flax_conv.init, jax.random.key(1), x)["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, ref_shapes)
    assert shapes["kernel"].shape == (*kernel_size, 3, 4)
    # Random kernel and a non-zero bias, so that both are checked.
    params = {
        "kernel": _normal(1, shapes["kernel"].shape),
        "bias": jnp.arange(4.0) / 10,
    }
    out = jax.jit(layer.apply)({"params": params}, x)
    ref = jax.jit(flax_conv.apply)({"params": params}, x)
    assert out.shape == ref.shape
    (sh, sw), (kh, kw) = strides, kernel_size
    if padding == "SAME":
        assert out.shape == (2, -(-7 // sh), -(-6 // sw), 4)
    else:
        assert out.shape == (2, (7 - kh) // sh + 1, (6 - kw) // sw + 1, 4)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_im2col_ordering_matches_hwio_reshape(padding):
    kh, kw, cin = 3, 2, 2
    x = np.arange(1 * 4 * 5 * cin, dtype=np.float32).reshape(1, 4, 5, cin) + 1
    patches = np.asarray(
        conv.im2col(jnp.asarray(x), conv.Window(kh, kw, conv.pads_of(padding, kh, kw)))
    )
    if padding == "SAME":
        # Low side gets (k-1)//2, as lax/flax SAME padding for stride 1.
        xp = np.pad(x, ((0, 0), (1, 1), (0, 1), (0, 0)))
    else:
        xp = x
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    assert patches.shape == (1, ho, wo, kh * kw * cin)
    for y in range(ho):
        for z in range(wo):
            for i in range(kh):
                for j in range(kw):
                    for c in range(cin):
                        k = (i * kw + j) * cin + c
                        assert patches[0, y, z, k] == xp[0, y + i, z + j, c]
    # Hence patches @ kernel.reshape(kh*kw*cin, cout) is the convolution, written as a sum.
    kernel = np.random.default_rng(0).normal(size=(kh, kw, cin, 3)).astype(np.float32)
    gemm = patches @ kernel.reshape(kh * kw * cin, 3)
    direct = np.zeros((1, ho, wo, 3), np.float32)
    for i in range(kh):
        for j in range(kw):
            direct += np.einsum("byzc,co->byzo", xp[:, i : i + ho, j : j + wo, :], kernel[i, j])
    np.testing.assert_allclose(gemm, direct, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("height,width", [(8, 8), (7, 9)])
def test_pooling_conv_is_conv_relu_pool(height, width):
    """``relu(Conv(pool=True)(x))`` (bias after the pool) is Flax's conv, ReLU, max pool."""
    x = _normal(0, (2, height, width, 3))
    layer, flax_conv = models.Conv(4, (3, 3), pool=True), nn.Conv(4, (3, 3))
    params = {
        "kernel": _normal(1, (3, 3, 3, 4)),
        "bias": jnp.array([-0.5, 0.0, 0.3, 1.0]),
    }
    out = nn.relu(layer.apply({"params": params}, x))
    ref = nn.max_pool(nn.relu(flax_conv.apply({"params": params}, x)), (2, 2), strides=(2, 2))
    assert out.shape == ref.shape == (2, height // 2, width // 2, 4)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_pooling_conv_rejects_strides():
    with pytest.raises(ValueError, match="pool=True needs strides"):
        layer = models.Conv(2, pool=True, strides=(2, 2))
        layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


def test_conv_rejects_other_padding():
    with pytest.raises(ValueError, match="padding"):
        models.Conv(2, padding="CIRCULAR").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


@pytest.mark.parametrize(
    "name, image_shape, kernels",
    [
        ("mlp", (8, 8, 1), {"fc1": (64, 256), "fc2": (256, 256), "out": (256, 10)}),
        (
            "lenet5",
            (8, 8, 1),
            {
                "conv1": (5, 5, 1, 6),
                "conv2": (5, 5, 6, 16),
                "fc1": (64, 120),
                "fc2": (120, 84),
                "out": (84, 10),
            },
        ),
        ("lenet5", (28, 28, 1), {"conv2": (5, 5, 6, 16), "fc1": (784, 120)}),
        (
            "vgg_small",
            (32, 32, 3),
            {"conv1a": (3, 3, 3, 32), "conv3b": (3, 3, 128, 128), "fc1": (2048, 256)},
        ),
    ],
)
def test_model_shapes_and_kernels(name, image_shape, kernels):
    model = models.get_model(name, 10)
    params = jax.eval_shape(
        lambda: models.init_variables(model, jax.random.key(0), image_shape)["params"]
    )
    shapes = {k: v["kernel"].shape for k, v in params.items()}
    for layer, shape in kernels.items():
        assert shapes[layer] == shape
    # Every layer has a kernel on the array and a bias that is not.
    for layer in params.values():
        assert set(layer) == {"kernel", "bias"}
    logits = jax.eval_shape(
        lambda p: model.apply({"params": p}, jnp.zeros((3, *image_shape))), params
    )
    assert logits.shape == (3, 10)
    load = systolic.pe_load(params, 16, 16)
    assert load.sum() == sum(np.prod(v["kernel"].shape) for v in params.values())


def test_get_model_unknown():
    with pytest.raises(ValueError, match="lenet5"):
        models.get_model("resnet", 10)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_vmapped_conv_over_chips_equals_flax_conv_per_chip(strides):
    """Per-chip kernels under vmap (a shared input) give each chip's own convolution."""
    x = _normal(2, (4, 7, 6, 3))
    kernels = _normal(3, (3, 3, 3, 3, 5))  # [chips, kh, kw, cin, cout]
    biases = _normal(4, (3, 5))
    layer = models.Conv(5, (3, 3), strides=strides)
    flax_conv = nn.Conv(5, (3, 3), strides=strides)
    batched = jax.jit(jax.vmap(lambda k, b: layer.apply({"params": {"kernel": k, "bias": b}}, x)))(
        kernels, biases
    )
    assert batched.shape == (3, 4, -(-7 // strides[0]), -(-6 // strides[1]), 5)
    conv_apply = jax.jit(flax_conv.apply)
    for i in range(3):
        ref = conv_apply({"params": {"kernel": kernels[i], "bias": biases[i]}}, x)
        np.testing.assert_allclose(batched[i], ref, atol=1e-5, rtol=1e-5)
