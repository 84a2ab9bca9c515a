"""The project's models with every kernel on the int8 array (``hardware.datapath``).

A model runs on the int8 datapath in its folded form: BatchNorm folded into the
convolutions (``models.fold_batchnorm``), the model built with ``batch_norm=False``
(``folded_model``). Every module that owns a kernel (``models.Conv``, ``nn.Dense``) is
intercepted and computed as the chip computes it: its input quantized with the layer's
calibrated per-tensor scale, its kernel per output channel, the integer product with the
chip's stuck-at faults (``datapath.int8_matmul`` / ``int8_conv``), dequantized; biases,
pooling, residual additions and activations stay float32, off the array. The forward value
is the chip's exact output; the gradient is straight-through (``datapath``), so the same
function trains quantization-aware and fault-aware.

``calibrate`` measures the activation scales on training images (the float folded model's
inputs of every layer); ``Int8Net`` holds them with the array and the fault sites simulated.
``Int8Model`` is what the engine's one-chip step and evaluation call (``model.apply``), one
chip's faults inside it, so ``engine.train.chip_step`` and ``chip_correct`` run the int8
chip unchanged and ``vmap`` over chips; it takes the model's unfolded variables and folds
them in every forward pass, BatchNorm's statistics frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from reduce_jax.hardware import datapath, quant, stuck_at
from reduce_jax.nets import models

PyTree = Any


class Int8Net(NamedTuple):
    """A model on the int8 array.

    Attributes:
      model: the folded model (``folded_model``: no BatchNorm layers).
      x_scales: ``{layer name: float32[]}``, the calibrated input scale of every layer on the
        array (``layer_name``).
      array: ``(R, C)``.
      sites: the stuck-at sites simulated (static; ``stuck_at.stuck_at_matmul``).
    """

    model: nn.Module
    x_scales: dict
    array: tuple[int, int]
    sites: tuple[str, ...] = stuck_at.SITES


def folded_model(model: nn.Module) -> nn.Module:
    """The model with ``batch_norm=False`` where it has BatchNorm (the form whose parameters
    ``models.fold_batchnorm`` gives); other models unchanged."""
    if getattr(model, "batch_norm", False):
        return model.clone(batch_norm=False)
    return model


def fold(variables: PyTree) -> PyTree:
    """The folded model's ``params`` from ``{"params", "batch_stats"}`` (BatchNorm folded into
    the kernels and biases; a model without BatchNorm: its ``params`` unchanged)."""
    return models.fold_batchnorm(variables)


def layer_name(module: nn.Module) -> str:
    """A module's path, ``/``-joined (``conv1``, ``stage1_block1/a/conv``)."""
    return "/".join(module.path)


def _on_array(module: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and isinstance(module, models.Conv | nn.Dense)


def calibrate(
    model: nn.Module,
    params: PyTree,
    images: jax.Array,
    batch_size: int = 500,
    percentile: float = 100.0,
) -> dict:
    """Per-tensor activation scales of every layer on the array, from the float forward pass.

    Args:
      model: the folded model; params: its parameters (``fold``).
      images: ``float32[N, H, W, C]`` calibration images (training data).
      batch_size: images per forward pass; the scales of several batches combine by their
        maximum (``quant.activation_scale``).
      percentile: of ``|x|`` per batch (100: the maximum).

    Returns:
      ``{layer name: float32[]}``.
    """

    @jax.jit
    def scales(batch):
        found = {}

        def record(next_fun, args, kwargs, context):
            if _on_array(context.module, context.method_name):
                found[layer_name(context.module)] = quant.activation_scale(args[0], percentile)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            models.apply(model, {"params": params}, batch, train=False)
        return found

    out = None
    for lo in range(0, images.shape[0], batch_size):
        s = scales(images[lo : lo + batch_size])
        out = s if out is None else jax.tree.map(jnp.maximum, out, s)
    return out


def apply(
    net: Int8Net, params: PyTree, images: jax.Array, faults: stuck_at.StuckAt | None = None
) -> jax.Array:
    """Logits of one chip computing ``net`` on its int8 array.

    Args:
      net: the model, scales, array and sites.
      params: the folded model's parameters as the chip holds them (a bypass mask already
        applied: a bypassed weight is 0).
      images: ``float32[B, H, W, C]``.
      faults: the chip's ``StuckAt`` (``int32[3, R, C]`` each), or None (fault-free).

    Returns:
      ``float32[B, classes]``.
    """

    def on_array(next_fun, args, kwargs, context):
        mod = context.module
        if not _on_array(mod, context.method_name):
            return next_fun(*args, **kwargs)
        x, name = args[0], layer_name(mod)
        scale = net.x_scales[name]
        kernel = mod.get_variable("params", "kernel")
        if isinstance(mod, nn.Dense):
            y = datapath.int8_matmul(x, kernel, scale, net.array, faults, sites=net.sites)
        else:
            y = datapath.int8_conv(
                x,
                kernel,
                scale,
                net.array,
                faults,
                strides=tuple(mod.strides),
                padding=mod.padding,
                sites=net.sites,
            )
            if mod.pool:  # as models.Conv: pool before the bias (conv.conv2d_pool)
                y = nn.max_pool(y, (2, 2), strides=(2, 2))
        if mod.use_bias:
            y = y + mod.get_variable("params", "bias")
        return y

    with nn.intercept_methods(on_array):
        return models.apply(net.model, {"params": params}, images, train=False)


class Int8Model:
    """One chip's ``net`` with its faults, called as a Flax model is
    (``apply(variables, x, train, mutable)``), so the engine's one-chip training step and
    evaluation (``train.chip_step``, ``train.chip_correct``) run it unchanged.

    ``variables`` are the model's own, ``{"params", "batch_stats"}``, unfolded: every forward
    pass folds them (``fold``) and runs the folded model on the array. BatchNorm is folded
    with its running statistics, frozen (as in inference, and as quantization-aware training
    of folded BatchNorm does once the statistics are frozen): training updates the kernels,
    BatchNorm's scales and offsets, and the biases, each at its own scale (an optimizer's
    steps on the folded kernels would be relative to no scale at all), and the statistics
    stay those of the baseline (with ``mutable``, returned unchanged). A bypass mask on the
    unfolded kernels is the same mask on the folded ones (``models.fold_batchnorm``).
    """

    def __init__(self, net: Int8Net, faults: stuck_at.StuckAt | None = None):
        self.net, self.faults = net, faults

    def apply(self, variables, x, train: bool = False, mutable: Sequence[str] | bool = False):
        del train  # the same computation in training and evaluation (statistics frozen)
        logits = apply(self.net, fold(variables), x, self.faults)
        if not mutable:
            return logits
        return logits, {"batch_stats": variables.get("batch_stats", {})}


ARITHMETICS = ("float32", "int8")


def post_training(
    model: nn.Module,
    variables: PyTree,
    images: jax.Array,
    array: tuple[int, int],
    sites: tuple[str, ...] = ("weight",),
    calibration_images: int = 1000,
) -> Int8Net:
    """``model`` with trained ``variables`` on the int8 array, quantized post-training: the
    folded model, its activation scales calibrated on the first ``calibration_images`` of
    ``images`` (training data), the stuck-at ``sites`` simulated."""
    folded = folded_model(model)
    scales = calibrate(folded, fold(variables), images[:calibration_images])
    return Int8Net(folded, scales, tuple(array), sites=tuple(sites))


def bypass_model(
    model: nn.Module,
    variables: PyTree,
    images: jax.Array,
    array: tuple[int, int],
    calibration_images: int = 1000,
) -> Int8Model:
    """``model`` on the int8 array (``post_training``), its only faults bypassed PEs (the
    engine's masks), no stuck-at site simulated: what ``--arithmetic=int8`` retrains and
    evaluates under ``--mitigation=bypass``."""
    return Int8Model(
        post_training(model, variables, images, array, ("weight",), calibration_images)
    )


def present_sites(faults: stuck_at.StuckAt) -> tuple[str, ...]:
    """The sites where any chip of ``faults`` (``[..., 3, R, C]``) has a stuck bit, in
    ``stuck_at.SITES`` order; ``("weight",)`` when none has any (the fast matrix product)."""
    bad = (jnp.asarray(faults.and_mask) != -1) | (jnp.asarray(faults.or_mask) != 0)
    axes = tuple(i for i in range(bad.ndim) if i != bad.ndim - 3)
    here = jax.device_get(jnp.any(bad, axis=axes))
    return tuple(s for s, h in zip(stuck_at.SITES, here, strict=True) if h) or ("weight",)
