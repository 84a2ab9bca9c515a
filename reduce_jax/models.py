"""Flax (linen) models, written so a population of chips runs as batched GEMMs.

Convolutions are computed as a matmul over im2col patches (``PatchConv``), with the kernel
kept in Flax's HWIO layout and named ``kernel`` so the systolic mapping applies to it as to
``nn.Conv``. Under ``vmap`` over a chips axis of the parameters, each layer becomes one
batched GEMM; the first layer, whose input every chip shares, becomes a single GEMM
(``patches @ kernel[chips]`` folds the chips into the output dim). A vmapped ``nn.Conv``
with per-chip weights instead lowers to a grouped convolution that XLA:CPU runs slowly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MODELS = ("mlp", "lenet5", "vgg_small")


def im2col(x: jax.Array, kh: int, kw: int, padding: str = "SAME") -> jax.Array:
    """Patches of a stride-1 convolution in HWIO order.

    Args:
      x: ``float[B, H, W, C]``.
      kh, kw: kernel size.
      padding: ``SAME`` or ``VALID``.

    Returns:
      ``float[B, H', W', kh * kw * C]``; the last axis is ordered (i, j, c), matching
      ``kernel.reshape(kh * kw * C, out)`` for a ``[kh, kw, C, out]`` kernel.
    """
    if padding == "SAME":
        ph, pw = kh - 1, kw - 1
        x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    elif padding != "VALID":
        raise ValueError(f"padding must be SAME or VALID, got {padding!r}")
    b, h, w, c = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    cols = [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)]
    return jnp.stack(cols, axis=3).reshape(b, ho, wo, kh * kw * c)


class PatchConv(nn.Module):
    """Stride-1 2-D convolution as an im2col matmul; parameters as ``nn.Conv``.

    With ``pool=True`` the output is 2x2 max-pooled *before* the bias is added:
    ``max_pool2(conv(x)) + b == max_pool2(conv(x) + b)`` and, since ReLU is monotone,
    ``relu(max_pool2(z)) == max_pool2(relu(z))``; so ``relu(PatchConv(pool=True)(x))`` is
    exactly conv-ReLU-pool while the bias and ReLU (and their gradients) touch a quarter of
    the elements. The activations of every chip are distinct, so this elementwise traffic,
    not the matmuls, bounds a population step on a CPU.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    padding: str = "SAME"
    pool: bool = False
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        y = im2col(x, kh, kw, self.padding) @ kernel.reshape(kh * kw * cin, self.features)
        if self.pool:
            y = max_pool2(y)
        return y + bias


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2 (VALID), as a reshape: ``[B, H, W, C] -> [B, H//2, W//2, C]``."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class MLP(nn.Module):
    """Fully connected net as in the FAP paper's MNIST experiments (784-256-256-10)."""

    num_classes: int = 10
    hidden: Sequence[int] = (256, 256)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(h, name=f"fc{i + 1}")(x))
        return nn.Dense(self.num_classes, name="out")(x)


class LeNet5(nn.Module):
    """LeNet-5 style CNN: conv6-pool-conv16-pool-120-84-classes (5x5 SAME convs)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(PatchConv(6, (5, 5), pool=True, name="conv1")(x))
        x = nn.relu(PatchConv(16, (5, 5), pool=True, name="conv2")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(self.num_classes, name="out")(x)


class VGGSmall(nn.Module):
    """Small VGG for 32x32 images: [32,32]-pool-[64,64]-pool-[128,128]-pool-256-classes."""

    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, w in enumerate(self.widths):
            x = nn.relu(PatchConv(w, (3, 3), name=f"conv{i + 1}a")(x))
            x = nn.relu(PatchConv(w, (3, 3), pool=True, name=f"conv{i + 1}b")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256, name="fc1")(x))
        return nn.Dense(self.num_classes, name="out")(x)


def get_model(name: str, num_classes: int) -> nn.Module:
    """The model called ``name`` (one of ``MODELS``)."""
    if name == "mlp":
        return MLP(num_classes)
    if name == "lenet5":
        return LeNet5(num_classes)
    if name == "vgg_small":
        return VGGSmall(num_classes)
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")


def init_params(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]):
    """Parameters of ``model`` for images ``float[*, H, W, C]`` (the ``params`` collection)."""
    return model.init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
