"""2-D convolutions whose ``vmap`` over chips runs fast: ``conv2d``, ``conv2d_pool``.

``conv2d(x, kernel, padding, strides)`` is ``lax.conv_general_dilated`` (NHWC input, HWIO
kernel) for one chip; ``conv2d_pool`` adds 2x2 max pooling to a stride-1 convolution. A
population vmaps them over a leading ``chips`` axis, and a plain ``vmap`` of a convolution
with per-chip kernels becomes a *grouped* convolution, which XLA:CPU runs as a slow generic
loop, an order of magnitude slower per chip than one plain convolution (the kernel gradient
worse than the forward pass; figures in docs/performance.md). So both have their own
batching rule (``custom_vmap``) and gradient (``custom_vjp``, built from
batchable parts):

* shared input, per-chip kernels (a first layer: every chip sees the same images): one
  im2col GEMM with the chips folded into the output channels, ``[kh * kw * C, chips * O]``
  (``conv2d_pool`` pools in that layout); its kernel gradient is one GEMM too
  (``patches^T @ dy``);
* per-chip inputs, shared kernel: the chips folded into the batch (forward only; its kernel
  gradient is computed per chip, then summed);
* per-chip inputs and kernels: on a CPU, ``lax.map`` over the chips of plain convolutions
  (each runs as fast as one chip alone; with several devices, each maps over its own chips);
  on other backends, batched im2col GEMMs (not yet measured on an accelerator; the
  patches take ``kh * kw / (sh * sw)`` times the input's memory, which ``--chips_per_batch``
  bounds).

Strided convolutions (ResNet's downsampling) take the same three routes with strided patches
or strided plain convolutions. A 1x1 kernel is a ``[C, O]`` matrix: a 1x1 convolution
(a projection shortcut) is the subsampled input times that matrix, whose ``vmap`` and
gradient are matrix products already (a shared input's is one GEMM), so it has no rule of
its own.

Operands are float32 (or one float dtype for all of them).

A stride-1 kernel gradient of per-chip inputs is a canonical (NHWC/HWIO) convolution of the
input, with channels as the batch, against the output gradient; written so, XLA:CPU runs it
fast inside loops too (``Trainer.run`` runs every step inside a ``fori_loop``), where the
form ``jax.grad`` produces is lowered to a slow generic convolution. A strided one is the
GEMM ``patches^T @ dy``. The input gradient is ``conv2d`` of the output gradient with the
flipped kernel at stride 1; with strides (the transposed convolution) it is the GEMM
``dy @ kernel^T`` followed by col2im (every tap's columns added, shifted, into its phase of
the input), which ``vmap`` batches as matrix products. Only first derivatives of the
gradients are defined (training needs no more).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from reduce_jax import sharding

PADDINGS = ("SAME", "VALID")
_DIMS = ("NHWC", "HWIO", "NHWC")
_CHANNEL_MULTIPLE = 8

Pads = tuple[tuple[int, int], tuple[int, int]]


class Window(NamedTuple):
    """A convolution's geometry: kernel size, explicit padding ``((top, bottom), (left,
    right))`` and strides. Hashable: the batchable operations are built once per window."""

    kh: int
    kw: int
    pads: Pads
    strides: tuple[int, int] = (1, 1)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Spatial size of the output for an ``h x w`` input."""
        (top, bottom), (left, right) = self.pads
        sh, sw = self.strides
        return (h + top + bottom - self.kh) // sh + 1, (w + left + right - self.kw) // sw + 1


def pads_of(
    padding: str,
    kh: int,
    kw: int,
    strides: tuple[int, int] = (1, 1),
    size: tuple[int, int] | None = None,
) -> Pads:
    """Explicit ``((top, bottom), (left, right))`` padding of a ``SAME``/``VALID`` convolution
    with a ``kh x kw`` kernel, as ``lax`` and Flax compute it.

    ``SAME`` gives ``ceil(H / stride)`` output rows: ``total = max((out - 1) * stride + kh - H,
    0)`` rows of zeros, ``total // 2`` on the low side (``(kh - 1) // 2`` for stride 1, which
    needs no ``size``). ``size`` is the input's ``(H, W)``, needed for ``SAME`` with a stride.
    """
    if padding == "VALID":
        return (0, 0), (0, 0)
    if padding != "SAME":
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    if size is None:
        if tuple(strides) != (1, 1):
            raise ValueError("pads_of: SAME padding with a stride needs the input size")
        size = (0, 0)  # unused: with stride 1 the total is k - 1 whatever the size
    pads = []
    for n, k, s in zip(size, (kh, kw), strides, strict=True):
        total = k - 1 if s == 1 else max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def _flip(kernel: jax.Array) -> jax.Array:
    """``[kh, kw, C, O]`` -> ``[kh, kw, O, C]`` rotated by 180 degrees (for input gradients)."""
    return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


def _transposed(window: Window) -> Window:
    """Window of the stride-1 convolution that gives a stride-1 input gradient (flipped
    kernel)."""
    (top, bottom), (left, right) = window.pads
    kh, kw = window.kh, window.kw
    return Window(kh, kw, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)))


def im2col(x: jax.Array, window: Window) -> jax.Array:
    """Patches of a convolution in HWIO order.

    Args:
      x: ``float[B, H, W, C]``.
      window: kernel size, explicit padding (``pads_of``) and strides.

    Returns:
      ``float[B, H', W', kh * kw * C]``; the last axis is ordered (i, j, c), matching
      ``kernel.reshape(kh * kw * C, out)`` for a ``[kh, kw, C, out]`` kernel.
    """
    ho, wo = window.out_size(*x.shape[1:3])
    (sh, sw), kh, kw = window.strides, window.kh, window.kw
    x = jnp.pad(x, ((0, 0), *window.pads, (0, 0)))
    cols = [
        x[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(cols, axis=-1)


def conv_single(x: jax.Array, kernel: jax.Array, window: Window) -> jax.Array:
    """One chip: ``float[B, H, W, C]`` * ``float[kh, kw, C, O]`` -> ``float[B, H', W', O]``.

    On a CPU, 3 to 7 input channels into 8 or more output channels are padded with zeros to
    8 input channels: XLA:CPU's convolution runs faster so (LeNet-5's second layer, a CIFAR
    image's first layer), but slower for 2, 12 or 20 channels. The result is the same, since
    the padded channels meet zero kernel rows.
    """
    c, o = x.shape[-1], kernel.shape[-1]
    if 2 < c < _CHANNEL_MULTIPLE <= o and _on_cpu():
        extra = _CHANNEL_MULTIPLE - c
        x = jnp.pad(x, ((0, 0),) * 3 + ((0, extra),))
        kernel = jnp.pad(kernel, ((0, 0),) * 2 + ((0, extra), (0, 0)))
    return lax.conv_general_dilated(x, kernel, window.strides, window.pads, dimension_numbers=_DIMS)


def kernel_grad_single(x: jax.Array, dy: jax.Array, window: Window) -> jax.Array:
    """Kernel gradient ``float[kh, kw, C, O]`` of one chip from its input ``float[B, H, W, C]``
    and output gradient ``float[B, H', W', O]``:
    ``sum_b,y,z xpad[b, sh*y+i, sw*z+j, c] dy[b, y, z, o]``.

    Stride 1: a canonical convolution (channels as batch, batch as features). Strided: the
    GEMM ``patches^T @ dy`` (XLA:CPU, 8 chips of a 3x3 stride-2 16 -> 32 layer on 128 32x32
    images: 5.3 to 6.2 CPU-ms per chip, against 7.9 for the canonical convolution with the
    output gradient dilated by the strides).
    """
    if tuple(window.strides) != (1, 1):
        return shared_kernel_grad(x, dy, window)
    out = lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0),
        dy.transpose(1, 2, 0, 3),
        (1, 1),
        window.pads,
        dimension_numbers=_DIMS,
    )
    return out.transpose(1, 2, 0, 3)


def _fold_chips(kernels: jax.Array) -> jax.Array:
    """``[chips, kh, kw, C, O]`` -> ``[kh, kw, C, chips * O]`` (chip-major output channels)."""
    n, kh, kw, c, o = kernels.shape
    return kernels.transpose(1, 2, 3, 0, 4).reshape(kh, kw, c, n * o)


def _unfold_chips(y: jax.Array, n: int) -> jax.Array:
    """``[..., chips * O]`` -> ``[chips, ..., O]``."""
    y = y.reshape(*y.shape[:-1], n, y.shape[-1] // n)
    return jnp.moveaxis(y, -2, 0)


def shared_conv(x: jax.Array, kernels: jax.Array, window: Window) -> jax.Array:
    """A shared input ``[B, H, W, C]`` with per-chip kernels ``[N, kh, kw, C, O]`` ->
    ``[B, H', W', N * O]`` (chips folded into the channels, chip-major): one im2col GEMM."""
    n, kh, kw, c, o = kernels.shape
    return im2col(x, window) @ _fold_chips(kernels).reshape(kh * kw * c, n * o)


def shared_kernel_grad(x: jax.Array, dy: jax.Array, window: Window) -> jax.Array:
    """Kernel gradients ``[kh, kw, C, M]`` of a shared input ``[B, H, W, C]`` and an output
    gradient ``[B, H', W', M]`` (``M = N * O``, chips folded into the channels): one GEMM
    ``patches^T @ dy`` over every position of every image."""
    c, m, kh, kw = x.shape[-1], dy.shape[-1], window.kh, window.kw
    patches = im2col(x, window).reshape(-1, kh * kw * c)
    return (patches.T @ dy.reshape(-1, m)).reshape(kh, kw, c, m)


def _fold_grad(dy: jax.Array) -> jax.Array:
    """``[N, B, H, W, O]`` -> ``[B, H, W, N * O]`` (the inverse of ``_unfold_chips``)."""
    n, o = dy.shape[0], dy.shape[-1]
    return jnp.moveaxis(dy, 0, -2).reshape(*dy.shape[1:-1], n * o)


def _on_cpu() -> bool:
    """On a CPU, per-chip inputs and kernels run as a ``lax.map`` of plain convolutions
    (other backends: batched im2col GEMMs), and 3 to 7 input channels are padded to 8."""
    return jax.default_backend() == "cpu"


def _chip_patches(x: jax.Array, window: Window) -> jax.Array:
    """``im2col`` of every chip's input ``[N, B, H, W, C]`` -> ``[N, B, H', W', kh * kw * C]``."""
    return jax.vmap(lambda v: im2col(v, window))(x)


def batched_conv(
    x: jax.Array, kernels: jax.Array, window: Window, per_chip_convolutions: bool
) -> jax.Array:
    """Per-chip inputs ``[N, B, H, W, C]`` and kernels ``[N, kh, kw, C, O]`` ->
    ``[N, B, H', W', O]``: a ``lax.map`` of plain convolutions, or batched im2col GEMMs."""
    if per_chip_convolutions:
        return sharding.map_chips(lambda a, b: conv_single(a, b, window), (x, kernels))
    n, kh, kw, c, o = kernels.shape
    return _chip_patches(x, window) @ kernels.reshape(n, 1, 1, kh * kw * c, o)


def batched_kernel_grad(
    x: jax.Array, dy: jax.Array, window: Window, per_chip_convolutions: bool
) -> jax.Array:
    """Per-chip kernel gradients ``[N, kh, kw, C, O]`` from ``x [N, B, H, W, C]`` and
    ``dy [N, B, H', W', O]``: a ``lax.map`` of ``kernel_grad_single``, or batched GEMMs."""
    if per_chip_convolutions:
        return sharding.map_chips(lambda a, b: kernel_grad_single(a, b, window), (x, dy))
    n, c, o, kh, kw = x.shape[0], x.shape[-1], dy.shape[-1], window.kh, window.kw
    patches = _chip_patches(x, window).reshape(n, -1, kh * kw * c)
    grad = jnp.einsum("npk,npo->nko", patches, dy.reshape(n, -1, o))
    return grad.reshape(n, kh, kw, c, o)


@functools.cache
def _ops(window: Window):
    """The batchable convolution and kernel gradient for one window."""

    @jax.custom_batching.custom_vmap
    def conv(x, kernel):
        return conv_single(x, kernel, window)

    @conv.def_vmap
    def conv_rule(n, in_batched, x, kernel):
        x_batched, k_batched = in_batched
        if x_batched and k_batched:
            return batched_conv(x, kernel, window, _on_cpu()), True
        if k_batched:  # shared input: chips become output channels
            return _unfold_chips(shared_conv(x, kernel, window), n), True
        y = conv_single(x.reshape(-1, *x.shape[2:]), kernel, window)  # chips become batch
        return y.reshape(n, -1, *y.shape[1:]), True

    @jax.custom_batching.custom_vmap
    def kernel_grad(x, dy):
        return kernel_grad_single(x, dy, window)

    @kernel_grad.def_vmap
    def kernel_grad_rule(n, in_batched, x, dy):
        x_batched, dy_batched = in_batched
        if not x_batched:  # shared input (so dy is per chip): chips become output channels
            return _unfold_chips(shared_kernel_grad(x, _fold_grad(dy), window), n), True
        if not dy_batched:  # (not met in training: a per-chip input has per-chip gradients)
            dy = jnp.broadcast_to(dy, (n, *dy.shape))
        return batched_kernel_grad(x, dy, window, _on_cpu()), True

    return conv, kernel_grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d(x: jax.Array, kernel: jax.Array, window: Window) -> jax.Array:
    conv, _ = _ops(window)
    return conv(x, kernel)


def _conv2d_fwd(x, kernel, window):
    return _conv2d(x, kernel, window), (x, kernel)


def _conv2d_bwd(window, residuals, dy):
    x, kernel = residuals  # [B, H, W, C], [kh, kw, C, O]; dy: [B, H', W', O]
    _, kernel_grad = _ops(window)
    return input_grad(dy, kernel, window, x.shape[1:3]), kernel_grad(x, dy)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def input_grad(dy: jax.Array, kernel: jax.Array, window: Window, size) -> jax.Array:
    """Gradient ``float[B, H, W, C]`` of a convolution's input of size ``(H, W)`` from the
    output gradient ``dy float[B, H', W', O]``.

    Stride 1: ``conv`` of ``dy`` with the flipped kernel. Strides ``(sh, sw)``: the GEMM
    ``cols = dy @ kernel^T`` gives every tap's contribution ``float[B, H', W', kh, kw, C]``;
    tap ``(i, j)`` lands on padded-input row ``sh * y + i``, i.e. on phase ``i mod sh`` at
    ``y + i // sh``, so each phase is a sum of shifted (padded) columns, and the phases are
    interleaved and the padding cut off (col2im). No convolution, so ``vmap`` batches it as
    matrix products; on XLA:CPU it ran in 10.3 CPU-ms per chip against 14 to 15 for one
    stride-1 convolution per phase (3x3 stride-2 16 -> 32 layer, 8 chips, 128 32x32 images).
    """
    if tuple(window.strides) == (1, 1):
        return _conv(dy, _flip(kernel), _transposed(window))
    (sh, sw), ((top, bottom), (left, right)) = window.strides, window.pads
    kh, kw, c, o = kernel.shape
    (h, w), (b, ho, wo) = size, dy.shape[:3]
    mh, mw = -(-(h + top + bottom) // sh), -(-(w + left + right) // sw)  # rows per phase
    cols = (dy @ kernel.reshape(kh * kw * c, o).T).reshape(b, ho, wo, kh, kw, c)
    phases = [[_phase(cols, window, p, q, (mh, mw)) for q in range(sw)] for p in range(sh)]
    rows = [jnp.stack(row, axis=3) for row in phases]  # [B, mh, mw, sw, C] each
    dx = jnp.stack(rows, axis=2).reshape(b, mh * sh, mw * sw, c)
    return dx[:, top : top + h, left : left + w]


def _phase(cols: jax.Array, window: Window, p: int, q: int, size) -> jax.Array:
    """Rows ``sh * m + p``, columns ``sw * n + q`` of the padded input's gradient,
    ``float[B, mh, mw, C]`` for ``size = (mh, mw)``, from the taps' columns
    ``float[B, H', W', kh, kw, C]``: tap ``(p + sh * t, q + sw * u)`` shifted by ``(t, u)``."""
    (sh, sw), (mh, mw) = window.strides, size
    b, ho, wo, _, _, c = cols.shape
    phase = jnp.zeros((b, mh, mw, c), cols.dtype)  # stays zero where no tap lands
    for t, i in enumerate(range(p, window.kh, sh)):
        for u, j in enumerate(range(q, window.kw, sw)):
            shift = ((0, 0), (t, mh - ho - t), (u, mw - wo - u), (0, 0))
            phase = phase + jnp.pad(cols[:, :, :, i, j], shift)
    return phase


def pointwise(x: jax.Array, kernel: jax.Array, window: Window) -> jax.Array:
    """A 1x1 convolution: the (padded, subsampled) input ``[B, H, W, C]`` times the
    ``[C, O]`` matrix ``kernel[0, 0]``. ``vmap`` and ``grad`` of it are matrix products."""
    (sh, sw), pads = window.strides, window.pads
    if pads != ((0, 0), (0, 0)):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    return x[:, ::sh, ::sw] @ kernel[0, 0]


def _conv(x: jax.Array, kernel: jax.Array, window: Window) -> jax.Array:
    """``conv2d`` with an explicit window: 1x1 kernels as ``pointwise``, others ``_conv2d``."""
    if window.kh == window.kw == 1:
        return pointwise(x, kernel, window)
    return _conv2d(x, kernel, window)


def conv2d(
    x: jax.Array, kernel: jax.Array, padding: str = "SAME", strides: tuple[int, int] = (1, 1)
) -> jax.Array:
    """Convolution of one chip (vmap it over chips; see the module docstring).

    Args:
      x: ``float[B, H, W, C]``.
      kernel: ``float[kh, kw, C, O]`` (HWIO, as ``nn.Conv``).
      padding: ``SAME`` or ``VALID`` (as ``lax``/``nn.Conv``: ``SAME`` gives ``ceil(H / s)``
        rows, see ``pads_of``).
      strides: ``(sh, sw)``, each >= 1.

    Returns:
      ``float[B, H', W', O]``, equal (up to float rounding) to
      ``lax.conv_general_dilated(x, kernel, strides, padding, ("NHWC", "HWIO", "NHWC"))``.
    """
    strides = _check_strides(strides)
    kh, kw = kernel.shape[:2]
    window = Window(kh, kw, pads_of(padding, kh, kw, strides, x.shape[1:3]), strides)
    return _conv(x, kernel, window)


def _check_strides(strides) -> tuple[int, int]:
    """``strides`` as a pair of ints >= 1, or a ``ValueError`` naming the allowed range."""
    strides = tuple(int(s) for s in strides)
    if len(strides) != 2 or min(strides) < 1:
        raise ValueError(f"strides must be two integers >= 1, got {strides!r}")
    return strides


# ---------------------------------------------------------------- convolution + max pool


def pool_argmax(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """2x2 stride-2 max pooling and where each maximum is.

    Args:
      y: ``float[B, H, W, C]`` (an odd last row or column is dropped).

    Returns:
      ``(pooled float[B, H//2, W//2, C], index int8[B, H//2, W//2, C])``; the index of window
      position ``(p, q)`` is ``2p + q``, the first maximum in that order on ties.
    """
    b, h, w, c = y.shape
    r = y[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
    v = [r[:, :, p, :, q] for p in (0, 1) for q in (0, 1)]
    top, top_i = jnp.maximum(v[0], v[1]), jnp.where(v[1] > v[0], 1, 0)
    bottom, bottom_i = jnp.maximum(v[2], v[3]), jnp.where(v[3] > v[2], 3, 2)
    index = jnp.where(bottom > top, bottom_i, top_i).astype(jnp.int8)
    return jnp.maximum(top, bottom), index


def unpool(g: jax.Array, index: jax.Array, h: int, w: int) -> jax.Array:
    """Gradient of ``pool_argmax``: ``g float[B, h//2, w//2, C]`` routed to the maxima ->
    ``float[B, h, w, C]`` (zeros elsewhere, and in a dropped odd row or column)."""
    b, h2, w2, c = g.shape
    parts = [jnp.where(index == 2 * p + q, g, 0) for p in (0, 1) for q in (0, 1)]
    r = jnp.stack(parts, axis=-2).reshape(b, h2, w2, 2, 2, c)
    dy = r.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h2, 2 * w2, c)
    return jnp.pad(dy, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0)))


@functools.cache
def _pool_ops(window: Window):
    """Batchable convolution + pooling and its kernel gradient for one stride-1 window.

    For one chip, ``conv_pool(x [B, H, W, C], kernel [kh, kw, C, O])`` returns
    ``pool_argmax`` of the convolution, ``(float[B, H'//2, W'//2, O], int8[same])``, and
    ``pool_kernel_grad(x, g, index)`` the kernel gradient ``[kh, kw, C, O]`` for the pooled
    output's gradient ``g`` (shaped like the pooled output) routed by ``index``.
    """
    conv, _ = _ops(window)

    @jax.custom_batching.custom_vmap
    def conv_pool(x, kernel):
        return pool_argmax(conv_single(x, kernel, window))

    @conv_pool.def_vmap
    def conv_pool_rule(n, in_batched, x, kernel):
        x_batched, k_batched = in_batched
        if not x_batched:  # shared input: pool with the chips folded into the channels
            pooled, index = pool_argmax(shared_conv(x, kernel, window))
            return (_unfold_chips(pooled, n), _unfold_chips(index, n)), (True, True)
        if k_batched and _on_cpu():  # pool each chip's output in the map
            one = lambda a, b: pool_argmax(conv_single(a, b, window))
            return sharding.map_chips(one, (x, kernel)), (True, True)
        y = jax.vmap(conv)(x, kernel) if k_batched else jax.vmap(conv, (0, None))(x, kernel)
        return jax.vmap(pool_argmax)(y), (True, True)

    @jax.custom_batching.custom_vmap
    def pool_kernel_grad(x, g, index):
        h, w = window.out_size(*x.shape[1:3])
        return kernel_grad_single(x, unpool(g, index, h, w), window)

    @pool_kernel_grad.def_vmap
    def pool_kernel_grad_rule(n, in_batched, x, g, index):
        x_batched = in_batched[0]
        g, index = (
            v if batched else jnp.broadcast_to(v, (n, *v.shape))
            for v, batched in zip((g, index), in_batched[1:], strict=True)
        )
        if not x_batched:  # shared input: unpool and differentiate with chips as channels
            h, w = window.out_size(*x.shape[1:3])
            dy = unpool(_fold_grad(g), _fold_grad(index), h, w)
            return _unfold_chips(shared_kernel_grad(x, dy, window), n), True
        h, w = window.out_size(*x.shape[2:4])  # x: [N, B, H, W, C]
        if _on_cpu():
            one = lambda a, b, i: kernel_grad_single(a, unpool(b, i, h, w), window)
            return sharding.map_chips(one, (x, g, index)), True
        dy = jax.vmap(lambda a, b: unpool(a, b, h, w))(g, index)
        return batched_kernel_grad(x, dy, window, False), True

    return conv_pool, pool_kernel_grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d_pool(x: jax.Array, kernel: jax.Array, window: Window) -> jax.Array:
    conv_pool, _ = _pool_ops(window)
    return conv_pool(x, kernel)[0]


def _conv2d_pool_fwd(x, kernel, window):
    conv_pool, _ = _pool_ops(window)
    pooled, index = conv_pool(x, kernel)
    return pooled, (x, kernel, index)


def _conv2d_pool_bwd(window, residuals, g):
    x, kernel, index = residuals  # index (and g): [B, H'//2, W'//2, O]
    h, w = window.out_size(*x.shape[1:3])
    dx = input_grad(unpool(g, index, h, w), kernel, window, x.shape[1:3])
    _, pool_kernel_grad = _pool_ops(window)
    return dx, pool_kernel_grad(x, g, index)


_conv2d_pool.defvjp(_conv2d_pool_fwd, _conv2d_pool_bwd)


def conv2d_pool(x: jax.Array, kernel: jax.Array, padding: str = "SAME") -> jax.Array:
    """``conv2d`` followed by 2x2 stride-2 max pooling, for one chip (vmap it over chips).

    Args:
      x: ``float[B, H, W, C]``.
      kernel: ``float[kh, kw, C, O]``.
      padding: ``SAME`` or ``VALID``.

    Returns:
      ``float[B, H'//2, W'//2, O]``. The gradient goes to the first maximum of each window
      (``pool_argmax``), as PyTorch's max pooling does (a plain ``jnp.max`` splits it between
      tied maxima). With a shared input (a first layer under ``vmap``) the convolution output, the
      largest activation of a CNN, stays in a chips-as-channels layout and is pooled there,
      so only the pooled output is transposed to the chips-first layout (and back, for the
      gradient, together with the int8 argmax).
    """
    kh, kw = kernel.shape[:2]
    return _conv2d_pool(x, kernel, Window(kh, kw, pads_of(padding, kh, kw)))
