"""The int8 datapath of the array: quantization, the integer tile product, fake quantization.

Weights are symmetric int8 per output channel (one scale per column ``n`` of the matrix view
``W[k, n]``); activations are symmetric int8 per tensor, with one scale calibrated from data.
Both use the range ``[-127, 127]`` (symmetric, so ``-q`` is representable for every ``q``),
round half to even. The array multiplies int8 by int8 and adds in int32 (two's complement,
wrapping on overflow as an adder does); the result is dequantized with
``x_scale * w_scale[n]``.

Retraining is quantization-aware: ``fake_quant`` rounds in the forward pass and passes the
gradient straight through (zero outside the clipping range). ``fake_quant_kernel`` quantizes
a kernel per output channel behind a bypass mask: a masked weight is exactly zero in the
forward pass and gets an exactly zero gradient.

Convolutions run on the array as matrices: ``conv_patches`` gives the im2col rows in the
order of the kernel's matrix view (``[kh, kw, cin]``, as ``systolic`` maps an HWIO kernel),
and ``conv_as_matmul`` runs any matrix product (integer, faulty) as a convolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

BITS = 8
QMAX = 2 ** (BITS - 1) - 1  # 127: symmetric range [-QMAX, QMAX]
INT_DTYPE = jnp.int8
ACC_DTYPE = jnp.int32

Padding = str | Sequence[tuple[int, int]]


# ----------------------------------------------------------------------------- scales


def weight_scale(kernel: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Per-output-channel scale of a kernel: ``max |W[:, n]| / 127``.

    Args:
      kernel: ``float[..., N]`` (Dense ``[K, N]`` or Conv ``[kh, kw, cin, N]``).
      mask: optional 0/1 bypass mask of the kernel's shape; bypassed weights do not count
        (the chip quantizes what it holds).

    Returns:
      ``float32[N]``; a column that is all zero gets scale 1 (its weights quantize to 0).
    """
    w = jnp.asarray(kernel, jnp.float32)
    if mask is not None:
        w = w * mask
    amax = jnp.max(jnp.abs(w.reshape(-1, w.shape[-1])), axis=0)
    return jnp.where(amax > 0, amax / QMAX, 1.0).astype(jnp.float32)


def activation_scale(x: jax.Array, percentile: float = 100.0) -> jax.Array:
    """Per-tensor activation scale calibrated on a batch: ``percentile(|x|) / 127``.

    Args:
      x: ``float[...]``, activations of one layer's input over a calibration batch.
      percentile: 100 (the default) takes the maximum; a lower value clips outliers.

    Returns:
      ``float32[]``; 1 when the batch is all zero. Several batches combine by their maximum
      scale (for ``percentile=100``).
    """
    a = jnp.abs(jnp.asarray(x, jnp.float32)).reshape(-1)
    amax = jnp.max(a) if percentile >= 100.0 else jnp.percentile(a, percentile)
    return jnp.where(amax > 0, amax / QMAX, 1.0).astype(jnp.float32)


# ------------------------------------------------------------------- quantize, dequantize


def quantize(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``int8[...]``: ``clip(round(x / scale), -127, 127)``; ``scale`` broadcasts against
    ``x`` (a scalar per tensor, or ``[N]`` per output channel of a kernel ``[..., N]``)."""
    q = jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) / scale), -QMAX, QMAX)
    return q.astype(INT_DTYPE)


def dequantize(acc: jax.Array, x_scale: jax.Array, w_scale: jax.Array) -> jax.Array:
    """``float32[..., N]`` from an int32 result ``[..., N]``: ``acc * x_scale * w_scale[n]``."""
    return acc.astype(jnp.float32) * (x_scale * w_scale)


# ------------------------------------------------------------------------ integer matmul


def tile_operands(x_q: jax.Array, w_q: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """Splits the reduction dimension into tiles of ``rows`` (zero-padded at the end).

    Args:
      x_q: ``[B, K]``; w_q: ``[K, N]``; rows: the array's ``R``.

    Returns:
      ``x [B, T, R]`` and ``w [T, R, N]`` with ``T = ceil(K / R)``: row ``r`` of tile ``t`` is
      ``k = t * R + r``, on PE row ``r``. The padding is the unused rows of an edge tile,
      which hold a zero weight and see a zero input.
    """
    k = x_q.shape[-1]
    tiles = -(-k // rows)
    pad = tiles * rows - k
    x = jnp.pad(x_q, ((0, 0), (0, pad))).reshape(x_q.shape[0], tiles, rows)
    w = jnp.pad(w_q, ((0, pad), (0, 0))).reshape(tiles, rows, w_q.shape[-1])
    return x, w


# Float32 holds every integer up to 2**24 exactly, and a sum of up to 1024 int8 x int8
# products (each at most 2**14 in magnitude) stays within that range whatever the order of
# the additions: a float32 matrix product over at most 1024 reduction rows is the exact
# integer result, and XLA:CPU runs a float32 product far faster than an int8 x int8 -> int32
# dot (docs/datapath.md).
EXACT_FLOAT_ROWS = 2**24 // 2**14


def int_matmul(x_q: jax.Array, w_q: jax.Array, array: tuple[int, int]) -> jax.Array:
    """The array's integer product of int8 activations and int8 weights, fault-free.

    Each tile of ``R`` reduction rows sums its int8 x int8 products in int32 inside the
    array; the tiles are added in int32 outside it. Integer addition modulo ``2**32`` is
    associative, so without faults the result does not depend on the order: it is the
    exact product, wrapped to int32 (``stuck_at.stuck_at_matmul`` follows the order of the
    array, which matters once a PE is faulty). It is computed as float32 products over
    chunks of at most ``EXACT_FLOAT_ROWS`` reduction rows, each exact, converted to int32
    and added in int32.

    Args:
      x_q: ``int8[B, K]`` (any integers of magnitude at most 128).
      w_q: ``int8[K, N]`` (a kernel's matrix view).
      array: ``(R, C)``; the result does not depend on it (see above).

    Returns:
      ``int32[B, N]``.
    """
    del array  # the order of integer additions does not change their sum
    k = x_q.shape[-1]
    chunks = -(-k // EXACT_FLOAT_ROWS)
    x, w = tile_operands(x_q, w_q, -(-k // chunks))  # [B, G, k/G], [G, k/G, N]
    partial = jnp.einsum(
        "bgr,grn->bgn",
        x.astype(jnp.float32),
        w.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )
    return jnp.sum(partial.astype(ACC_DTYPE), axis=1, dtype=ACC_DTYPE)


# ------------------------------------------------------------------------- convolutions


def _pads(x_shape, kernel_hw, strides, padding: Padding) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        return lax.padtype_to_pads(x_shape[1:3], kernel_hw, strides, padding)
    return [tuple(p) for p in padding]


def conv_patches(
    x: jax.Array,
    kernel_hw: tuple[int, int],
    strides: tuple[int, int] = (1, 1),
    padding: Padding = "SAME",
) -> jax.Array:
    """im2col rows of an NHWC input, in the order of an HWIO kernel's matrix view.

    Exact for any dtype (slices of the zero-padded input, no arithmetic).

    Args:
      x: ``[B, H, W, Cin]``.
      kernel_hw: ``(kh, kw)``.
      strides: ``(sh, sw)``.
      padding: ``SAME``, ``VALID`` (as ``lax.conv_general_dilated``) or explicit pairs.

    Returns:
      ``[B, Ho, Wo, kh * kw * Cin]``; feature ``(i * kw + j) * Cin + c`` is input channel
      ``c`` at tap ``(i, j)``, the row ``k`` of ``kernel.reshape(kh * kw * Cin, Cout)``.
    """
    kh, kw = kernel_hw
    sh, sw = strides
    (pt, pb), (pl, pr) = _pads(x.shape, kernel_hw, strides, padding)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    taps = [
        xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(taps, axis=-1)


def conv_as_matmul(
    x: jax.Array,
    kernel: jax.Array,
    matmul: Callable[[jax.Array, jax.Array], jax.Array],
    strides: tuple[int, int] = (1, 1),
    padding: Padding = "SAME",
) -> jax.Array:
    """A convolution run as the array runs it: im2col rows times the kernel's matrix view.

    Args:
      x: ``[B, H, W, Cin]``.
      kernel: ``[kh, kw, Cin, Cout]`` (HWIO).
      matmul: ``([M, K], [K, Cout]) -> [M, Cout]``, e.g. ``partial(int_matmul, array=...)``
        or a chip's ``stuck_at.stuck_at_matmul``.
      strides, padding: as ``conv_patches``.

    Returns:
      ``[B, Ho, Wo, Cout]`` in ``matmul``'s output dtype.
    """
    kh, kw, cin, cout = kernel.shape
    patches = conv_patches(x, (kh, kw), strides, padding)
    b, ho, wo, k = patches.shape
    out = matmul(patches.reshape(b * ho * wo, k), kernel.reshape(kh * kw * cin, cout))
    return out.reshape(b, ho, wo, cout)


# --------------------------------------------------------------- quantization-aware training


@jax.custom_vjp
def fake_quant(x: jax.Array, scale: jax.Array) -> jax.Array:
    """Quantize-dequantize with a straight-through gradient.

    Forward: ``quantize(x, scale) * scale`` (float32). Backward: the gradient passes
    unchanged where ``|x| <= 127 * scale`` and is zero where the value was clipped; ``scale``
    gets no gradient (it is calibrated, not learned).

    Args:
      x: ``float[...]``; scale: broadcasts against ``x`` (``[]`` or ``[N]``).

    Returns:
      ``float32[...]``, every value an integer multiple of ``scale`` in ``[-127, 127]``.
    """
    return quantize(x, scale).astype(jnp.float32) * scale


def _fake_quant_fwd(x, scale):
    return fake_quant(x, scale), (x, scale)


def _fake_quant_bwd(res, g):
    x, scale = res
    inside = jnp.abs(x) <= QMAX * scale
    return jnp.where(inside, g, 0.0).astype(jnp.result_type(x)), jnp.zeros_like(scale)


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def held_kernel(kernel: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The float kernel a chip holds, masked, and its per-channel int8 scale, held constant
    in the gradient.

    Args:
      kernel: ``float[..., N]``; mask: 0/1 of the same shape, or None.

    Returns:
      ``(float32[..., N], float32[N])``.
    """
    w = jnp.asarray(kernel, jnp.float32)
    if mask is not None:
        w = w * mask
    return w, lax.stop_gradient(weight_scale(w))


def fake_quant_kernel(kernel: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """A kernel as the chip holds it: masked, then int8 per output channel, dequantized.

    The scale comes from the masked kernel (``weight_scale``) and is held constant in the
    gradient. A masked weight is exactly 0 (0 quantizes to 0) and its gradient is exactly 0,
    so, with masked updates as in retraining, a bypassed weight stays exactly zero.

    Args:
      kernel: ``float[..., N]``; mask: 0/1 of the same shape, or None.

    Returns:
      ``float32[..., N]``.
    """
    return fake_quant(*held_kernel(kernel, mask))


def quantized_matmul(
    x: jax.Array,
    kernel: jax.Array,
    x_scale: jax.Array,
    array: tuple[int, int],
    mask: jax.Array | None = None,
) -> jax.Array:
    """A float matrix product as the int8 array computes it (inference, fault-free).

    Args:
      x: ``float[B, K]``; kernel: ``float[K, N]``; x_scale: ``float32[]`` (calibrated);
      array: ``(R, C)``; mask: optional 0/1 ``[K, N]`` bypass mask.

    Returns:
      ``float32[B, N]``: ``dequantize(int_matmul(quantize(x), quantize(w)))``. Equal, up to
      float32 rounding, to ``fake_quant(x) @ fake_quant_kernel(w)``.
    """
    w = jnp.asarray(kernel, jnp.float32) if mask is None else kernel * mask
    w_scale = weight_scale(w)
    acc = int_matmul(quantize(x, x_scale), quantize(w, w_scale), array)
    return dequantize(acc, x_scale, w_scale)
