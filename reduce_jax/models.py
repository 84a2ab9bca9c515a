"""Flax (linen) models, written so a population of chips runs fast under ``vmap``.

Convolutions are ``Conv`` layers: ``nn.Conv``'s parameters (an HWIO ``kernel``, which the
systolic mapping maps as it does ``nn.Conv``'s, and a ``bias``), computed with ``conv.conv2d``,
whose batching rule runs a population's convolutions as plain convolutions or GEMMs rather
than as the grouped convolution a vmapped ``nn.Conv`` becomes (see ``reduce_jax.conv``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reduce_jax import conv

MODELS = ("mlp", "lenet5", "vgg_small")


class Conv(nn.Module):
    """Stride-1 2-D convolution (``conv.conv2d``); parameters as ``nn.Conv``; ``padding`` is
    ``SAME`` or ``VALID``.

    With ``pool=True`` the output is 2x2 max-pooled (``conv.conv2d_pool``) *before* the bias
    is added: ``pool(conv(x)) + b == pool(conv(x) + b)`` and, since ReLU is monotone,
    ``relu(pool(z)) == pool(relu(z))``; so ``relu(Conv(pool=True)(x))`` is
    exactly conv-ReLU-pool while the bias and ReLU (and their gradients) touch a quarter of
    the elements. The activations of every chip are distinct, so this elementwise traffic
    weighs on a population step on a CPU.
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
        if self.pool:
            return conv.conv2d_pool(x, kernel, self.padding) + bias
        return conv.conv2d(x, kernel, self.padding) + bias


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
        x = nn.relu(Conv(6, (5, 5), pool=True, name="conv1")(x))
        x = nn.relu(Conv(16, (5, 5), pool=True, name="conv2")(x))
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
            x = nn.relu(Conv(w, (3, 3), name=f"conv{i + 1}a")(x))
            x = nn.relu(Conv(w, (3, 3), pool=True, name=f"conv{i + 1}b")(x))
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


BUILTIN_MODELS = (MLP, LeNet5, VGGSmall)


def apply(model: nn.Module, variables, x: jax.Array, train: bool, **kwargs):
    """How every model is called: the one place that knows the calling convention.

    Your own modules are called as ``model.apply(variables, x, train=train)``; the built-in
    ones (``BUILTIN_MODELS``) take only ``x`` and are called as ``model.apply(variables, x)``.

    Args:
      model: a Flax linen module.
      variables: ``{'params': ...}`` (and any other collection of the model).
      x: ``float32[B, H, W, C]`` images.
      train: training (True) or evaluation (False) mode.
      **kwargs: passed on to ``model.apply`` (``mutable=...``, ...).

    Returns:
      What ``model.apply`` returns: ``float32[B, classes]`` logits (with ``mutable``, the
      pair ``(logits, updated collections)``).
    """
    if isinstance(model, BUILTIN_MODELS):
        return model.apply(variables, x, **kwargs)
    return model.apply(variables, x, train=train, **kwargs)


def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]) -> dict:
    """Every variable collection of ``model`` (``params``, ...) for images
    ``float[*, H, W, C]``; ``apply``'s calling convention, in evaluation mode."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return apply(model, {}, x, train=False, rngs={"params": key}, mutable=True)[1]


def init_params(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]):
    """Parameters of ``model`` for images ``float[*, H, W, C]`` (the ``params`` collection)."""
    return init_variables(model, key, image_shape)["params"]


def kernel_inputs(model: nn.Module, image_shape: tuple[int, int, int]) -> dict[tuple, int]:
    """The size of the last input dimension of every module that owns a ``kernel``.

    Found by tracing ``model.init`` (shapes only, no compute); a convolution whose kernel
    ``[kh, kw, cin, cout]`` has ``cin`` less than its input's channels is grouped or
    depthwise (``systolic.check_mappable``).

    Returns:
      ``{('params', *module path, 'kernel'): input channels}`` for every module called with
      an array as its first argument (a module called several times: its last call).
    """
    found = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if args and hasattr(args[0], "shape") and mod.has_variable("params", "kernel"):
            found[("params", *mod.path, "kernel")] = int(args[0].shape[-1])
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))
    return found
