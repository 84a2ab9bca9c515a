"""Layers on the int8 array: exact integer forward pass, straight-through backward pass.

``int8_matmul`` and ``int8_conv`` take float activations and kernels, quantize them
(``quant``), run the chip's integer product (``quant.int_matmul``, or
``stuck_at.stuck_at_matmul`` with the chip's stuck bits) and dequantize. The forward value is
exactly what the chip outputs; the gradient is the straight-through one of the fake-quantized
float product: ``dx = g @ W^T`` (zero where ``x`` was clipped), ``dW = x^T @ g``, where ``W``
is the kernel as the weight registers hold it (stuck weight bits included) and product and
partial-sum faults pass the gradient unchanged. A bypass mask multiplies the kernel first,
so masked weights are exactly zero and get exactly zero gradient.

Scales are not learned: the activation scale is calibrated (``quant.activation_scale``) and
the weight scales follow the kernel (``quant.weight_scale``), both outside the gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from reduce_jax.hardware import quant, stuck_at

ARITHMETICS = ("float32", "int8")


def int8_matmul(
    x: jax.Array,
    kernel: jax.Array,
    x_scale: jax.Array,
    array: tuple[int, int],
    faults: stuck_at.StuckAt | None = None,
    mask: jax.Array | None = None,
    sites: Sequence[str] = stuck_at.SITES,
) -> jax.Array:
    """``x @ kernel`` as a chip's int8 array computes it.

    Args:
      x: ``float[B, K]``.
      kernel: ``float[K, N]``.
      x_scale: ``float32[]``, the calibrated activation scale.
      array: ``(R, C)``; must match ``faults``' ``[3, R, C]`` when faults are given.
      faults: the chip's ``StuckAt`` (``int32[3, R, C]`` each), or None (fault-free).
      mask: 0/1 ``[K, N]`` bypass mask, or None.
      sites: the fault sites simulated (static; see ``stuck_at.stuck_at_matmul``).

    Returns:
      ``float32[B, N]``: ``dequantize(integer product)``, exact.
    """
    if faults is not None and tuple(faults.and_mask.shape[-2:]) != tuple(array):
        raise ValueError(
            f"faults are for a {faults.and_mask.shape[-2:]} array, the layer runs on {array}"
        )
    w, w_scale = quant.held_kernel(kernel, mask)
    x_scale = lax.stop_gradient(jnp.asarray(x_scale, jnp.float32))
    return _matmul(tuple(array), tuple(sites), x, w, x_scale, w_scale, faults)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _matmul(array, sites, x, w, x_scale, w_scale, faults):
    x_q, w_q = quant.quantize(x, x_scale), quant.quantize(w, w_scale)
    if faults is None:
        acc = quant.int_matmul(x_q, w_q, array)
    else:
        acc = stuck_at.stuck_at_matmul(x_q, w_q, faults, sites)
    return quant.dequantize(acc, x_scale, w_scale)


def _matmul_fwd(array, sites, x, w, x_scale, w_scale, faults):
    return _matmul(array, sites, x, w, x_scale, w_scale, faults), (x, w, x_scale, w_scale, faults)


def _matmul_bwd(array, sites, res, g):
    x, w, x_scale, w_scale, faults = res
    x_q, w_q = quant.quantize(x, x_scale), quant.quantize(w, w_scale)
    if faults is not None and "weight" in sites:
        w_q = stuck_at.stuck_weights(w_q, faults)
    x_fq = x_q.astype(jnp.float32) * x_scale
    w_fq = w_q.astype(jnp.float32) * w_scale
    inside = jnp.abs(x) <= quant.QMAX * x_scale
    dx = jnp.where(inside, g @ w_fq.T, 0.0).astype(x.dtype)
    dw = (x_fq.T @ g).astype(w.dtype)
    zero_faults = None if faults is None else jax.tree.map(_zero_cotangent, faults)
    return dx, dw, jnp.zeros_like(x_scale), jnp.zeros_like(w_scale), zero_faults


def _zero_cotangent(a):
    return jnp.zeros(a.shape, jax.dtypes.float0)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def int8_conv(
    x: jax.Array,
    kernel: jax.Array,
    x_scale: jax.Array,
    array: tuple[int, int],
    faults: stuck_at.StuckAt | None = None,
    mask: jax.Array | None = None,
    strides: tuple[int, int] = (1, 1),
    padding: quant.Padding = "SAME",
    sites: Sequence[str] = stuck_at.SITES,
) -> jax.Array:
    """A 2-D convolution as a chip's int8 array computes it (im2col rows times the kernel's
    matrix view ``[kh * kw * cin, cout]``, mapped as ``systolic`` maps it).

    Args:
      x: ``float[B, H, W, Cin]``; kernel: ``float[kh, kw, Cin, Cout]`` (HWIO);
      x_scale, array, faults, sites: as ``int8_matmul``; mask: 0/1 of the kernel's shape;
      strides, padding: as ``lax.conv_general_dilated`` (``SAME``, ``VALID`` or pairs).

    Returns:
      ``float32[B, Ho, Wo, Cout]``.
    """
    k = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
    mask2d = None if mask is None else mask.reshape(k, kernel.shape[3])

    def matmul(patches, w):
        return int8_matmul(patches, w, x_scale, array, faults, mask2d, sites)

    return quant.conv_as_matmul(x, kernel, matmul, strides, padding)
