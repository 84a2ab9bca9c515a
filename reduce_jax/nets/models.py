"""Flax (linen) models, written so a population of chips runs fast under ``vmap``.

Convolutions are ``Conv`` layers: ``nn.Conv``'s parameters (an HWIO ``kernel``, which the
systolic mapping maps as it does ``nn.Conv``'s, and a ``bias``), computed with ``conv.conv2d``,
whose batching rule runs a population's convolutions as plain convolutions or GEMMs rather
than as the grouped convolution a vmapped ``nn.Conv`` becomes (see ``reduce_jax.nets.conv``).

Every model is called as ``model.apply(variables, x, train=...)``: ``train=True`` in training
steps (BatchNorm normalises with the batch's statistics and updates its running averages,
``mutable=["batch_stats"]``), ``train=False`` in evaluation (running averages); models without
BatchNorm accept ``train`` and ignore it. ``model_width`` scales every layer's channels (and
hidden units), so tests and CPU studies can run narrow versions of the same architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reduce_jax.nets import conv

MODELS = ("mlp", "lenet5", "vgg_small", "vgg11_bn", "resnet20", "resnet18")

# BatchNorm as in PyTorch's CIFAR recipes (running averages: 0.9 old + 0.1 batch).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class Conv(nn.Module):
    """2-D convolution (``conv.conv2d``); parameters as ``nn.Conv``; ``padding`` is ``SAME``
    or ``VALID`` and ``strides`` a pair, both with ``nn.Conv``'s meaning (a strided ``SAME``
    convolution gives ``ceil(H / stride)`` rows).

    With ``pool=True`` (stride 1 only) the output is 2x2 max-pooled (``conv.conv2d_pool``)
    *before* the bias is added: ``pool(conv(x)) + b == pool(conv(x) + b)`` and, since ReLU is
    monotone, ``relu(pool(z)) == pool(relu(z))``; so ``relu(Conv(pool=True)(x))`` is exactly
    conv-ReLU-pool while the bias and ReLU (and their gradients) touch a quarter of the
    elements. The activations of every chip are distinct, so this elementwise traffic
    weighs on a population step on a CPU. ``use_bias=False`` before a BatchNorm (whose
    offset is the bias).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    padding: str = "SAME"
    strides: tuple[int, int] = (1, 1)
    pool: bool = False
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features))
        if self.pool:
            if tuple(self.strides) != (1, 1):
                raise ValueError(f"Conv: pool=True needs strides (1, 1), got {self.strides}")
            y = conv.conv2d_pool(x, kernel, self.padding)
        else:
            y = conv.conv2d(x, kernel, self.padding, self.strides)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return y


def scaled(units: int, width: float) -> int:
    """``units`` channels (or hidden units) at width multiplier ``width``: at least 1."""
    return max(1, round(units * width))


class MLP(nn.Module):
    """Fully connected net as in the FAP paper's MNIST experiments (784-256-256-10)."""

    num_classes: int = 10
    hidden: Sequence[int] = (256, 256)
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm
        x = x.reshape(x.shape[0], -1)
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(scaled(h, self.width), name=f"fc{i + 1}")(x))
        return nn.Dense(self.num_classes, name="out")(x)


class LeNet5(nn.Module):
    """LeNet-5 style CNN: conv6-pool-conv16-pool-120-84-classes (5x5 SAME convs)."""

    num_classes: int = 10
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm
        w = self.width
        x = nn.relu(Conv(scaled(6, w), (5, 5), pool=True, name="conv1")(x))
        x = nn.relu(Conv(scaled(16, w), (5, 5), pool=True, name="conv2")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(scaled(120, w), name="fc1")(x))
        x = nn.relu(nn.Dense(scaled(84, w), name="fc2")(x))
        return nn.Dense(self.num_classes, name="out")(x)


class VGGSmall(nn.Module):
    """Small VGG for 32x32 images: [32,32]-pool-[64,64]-pool-[128,128]-pool-256-classes."""

    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128)
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm
        for i, c in enumerate(self.widths):
            c = scaled(c, self.width)
            x = nn.relu(Conv(c, (3, 3), name=f"conv{i + 1}a")(x))
            x = nn.relu(Conv(c, (3, 3), pool=True, name=f"conv{i + 1}b")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(scaled(256, self.width), name="fc1")(x))
        return nn.Dense(self.num_classes, name="out")(x)


class ConvBN(nn.Module):
    """A convolution (``conv``, no bias) and its BatchNorm (``bn``): what an accelerator runs
    as one convolution with the BatchNorm folded in (``fold_batchnorm``). With
    ``batch_norm=False``, a convolution with a bias (the folded form's parameters)."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            use_bias=not self.batch_norm,
            kernel_init=nn.initializers.he_normal(),
            name="conv",
        )(x)
        if self.batch_norm:
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=BN_MOMENTUM,
                epsilon=BN_EPSILON,
                name="bn",
            )(x)
        return x


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 ``ConvBN`` and a shortcut, ReLU after the sum.

    The shortcut is the identity, or, where the block changes the stride or the channels, a
    strided 1x1 ``ConvBN`` projection (He et al. 2016's option B): its kernel, a
    ``[cin, cout]`` matrix, is on the array like every other.
    """

    features: int
    strides: tuple[int, int] = (1, 1)
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = self.batch_norm
        y = nn.relu(ConvBN(self.features, (3, 3), self.strides, bn, name="a")(x, train))
        y = ConvBN(self.features, (3, 3), (1, 1), bn, name="b")(y, train)
        if tuple(self.strides) != (1, 1) or x.shape[-1] != self.features:
            x = ConvBN(self.features, (1, 1), self.strides, bn, name="proj")(x, train)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, stages of basic blocks (the first block of every stage
    after the first has stride 2), global average pooling and a Dense classifier.

    ResNet-20 (He et al. 2016): widths (16, 32, 64), 3 blocks per stage. ResNet-18, CIFAR
    variant: a 3x3 stride-1 stem, widths (64, 128, 256, 512), 2 blocks per stage. Strided
    ``SAME`` convolutions give ``ceil(H / 2)`` rows, so small images work (8x8 digits end
    ResNet-18 at 1x1).
    """

    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64)
    blocks_per_stage: int = 3
    width: float = 1.0
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bn, widths = self.batch_norm, [scaled(c, self.width) for c in self.widths]
        x = nn.relu(ConvBN(widths[0], (3, 3), (1, 1), bn, name="stem")(x, train))
        for s, c in enumerate(widths):
            for b in range(self.blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                block = BasicBlock(c, (stride, stride), bn, name=f"stage{s + 1}_block{b + 1}")
                x = block(x, train)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="out")(x)


VGG11 = (64, "pool", 128, "pool", 256, 256, "pool", 512, 512, "pool", 512, 512, "pool")


class VGG(nn.Module):
    """VGG with BatchNorm (``vgg11_bn``: VGG-11's eight 3x3 convolutions, each followed by
    BatchNorm and ReLU, five 2x2 max-pools, one Dense classifier, as for CIFAR).

    A pool is skipped once the feature map is 1 pixel high or wide (small inputs: 8x8 digits
    keep 3 of the 5 pools).
    """

    num_classes: int = 10
    layers: Sequence[int | str] = VGG11
    width: float = 1.0
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n = 0
        for item in self.layers:
            if item == "pool":
                if min(x.shape[1:3]) >= 2:
                    x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            n += 1
            conv_bn = ConvBN(scaled(item, self.width), batch_norm=self.batch_norm, name=f"conv{n}")
            x = nn.relu(conv_bn(x, train))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="out")(x)


def get_model(name: str, num_classes: int, width: float = 1.0, batch_norm: bool = True):
    """The model called ``name`` (one of ``MODELS``).

    Args:
      name: the model.
      num_classes: outputs of the classifier.
      width: channel (and hidden unit) multiplier, > 0; 1 is the published architecture.
      batch_norm: for the models with BatchNorm (``vgg11_bn``, ``resnet*``): False gives
        the same network without it (convolutions with biases; the folded form).

    Returns:
      The Flax module.
    """
    if name == "mlp":
        return MLP(num_classes, width=width)
    if name == "lenet5":
        return LeNet5(num_classes, width)
    if name == "vgg_small":
        return VGGSmall(num_classes, width=width)
    if name == "vgg11_bn":
        return VGG(num_classes, VGG11, width, batch_norm)
    if name == "resnet20":
        return ResNet(num_classes, (16, 32, 64), 3, width, batch_norm)
    if name == "resnet18":
        return ResNet(num_classes, (64, 128, 256, 512), 2, width, batch_norm)
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")


def apply(model: nn.Module, variables, x: jax.Array, train: bool, **kwargs):
    """How every model is called: ``model.apply(variables, x, train=train, **kwargs)``.

    The one place that knows the calling convention; built-in and your own modules alike
    take ``(x, train)``.

    Args:
      model: a Flax linen module.
      variables: ``{'params': ...}`` (and ``batch_stats`` for a model with BatchNorm).
      x: ``float32[B, H, W, C]`` images.
      train: training (True: BatchNorm uses batch statistics) or evaluation (False) mode.
      **kwargs: passed on to ``model.apply`` (``mutable=...``, ...).

    Returns:
      What ``model.apply`` returns: ``float32[B, classes]`` logits (with ``mutable``, the
      pair ``(logits, updated collections)``).
    """
    return model.apply(variables, x, train=train, **kwargs)


def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]) -> dict:
    """Variables of ``model`` for images ``float[*, H, W, C]``: ``{"params", "batch_stats"}``
    (``batch_stats`` is ``{}`` for models without BatchNorm)."""
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def fold_batchnorm(variables: dict, epsilon: float = BN_EPSILON) -> dict:
    """The parameters of the same model built with ``batch_norm=False``, with every
    ``ConvBN``'s BatchNorm (running averages) folded into its convolution, as an accelerator
    runs it in inference.

    Per output channel ``o``: ``s[o] = gamma[o] / sqrt(var[o] + eps)``, the folded kernel is
    ``w[..., o] * s[o]`` and its bias ``beta[o] - mean[o] * s[o]``. ``s`` scales whole output
    columns of the kernel's matrix view, so a zero weight (a bypassed PE) stays zero and
    masking commutes with folding: ``fold(w * mask) == fold(w) * mask``.

    Args:
      variables: ``{"params", "batch_stats"}`` of a model with BatchNorm.
      epsilon: BatchNorm's epsilon.

    Returns:
      A ``params`` pytree for the model with ``batch_norm=False`` (``variables["params"]``
      as they are for a model without ``ConvBN`` layers).
    """

    def fold(params, stats):
        if "bn" in params and "conv" in params:
            bn, st = params["bn"], stats["bn"]
            s = bn["scale"] * jax.lax.rsqrt(st["var"] + epsilon)
            kernel = params["conv"]["kernel"] * s
            return {"conv": {"kernel": kernel, "bias": bn["bias"] - st["mean"] * s}}
        return {
            k: fold(v, stats.get(k, {})) if isinstance(v, dict) else v for k, v in params.items()
        }

    return fold(variables["params"], variables.get("batch_stats", {}))


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
