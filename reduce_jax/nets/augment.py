"""Data augmentation of the CIFAR training recipe: random crop (zero padding 4) and
horizontal flip.

A training step draws one augmentation for its batch, keyed by the phase's key and the step
(``step_key``), and every chip of the population sees the same augmented batch: the input of
the first layer stays shared, so it still runs as one GEMM for all chips
(``reduce_jax.nets.conv``), and a chip's trajectory does not depend on the chips beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AUGMENT_MODES = ("auto", "on", "off")
AUGMENTED_DATASETS = ("cifar10", "cifar100")
PAD = 4

# Stream tag: the step's batch order uses fold_in(phase_key, epoch), the augmentation
# fold_in(fold_in(phase_key, step), _STREAM), so the two never share a key.
_STREAM = 0x41554731


def enabled(mode: str, dataset: str) -> bool:
    """Whether ``--augment=mode`` augments ``dataset`` (``auto``: on for CIFAR-10/100)."""
    if mode not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and dataset in AUGMENTED_DATASETS)


def step_key(phase_key: jax.Array, step: jax.Array) -> jax.Array:
    """The augmentation key of step ``step`` of a phase (the same for every chip)."""
    return jax.random.fold_in(jax.random.fold_in(phase_key, step), _STREAM)


def crop_flip(key: jax.Array, images: jax.Array, pad: int = PAD) -> jax.Array:
    """Every image shifted by a random crop of its zero-padded copy, and flipped left-right
    with probability 1/2.

    Args:
      key: the step's key (``step_key``).
      images: ``float[B, H, W, C]``.
      pad: zero padding on each side; offsets are uniform in ``[0, 2 * pad]``.

    Returns:
      ``float[B, H, W, C]``.
    """
    b, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    cropped = jax.vmap(crop)(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (b,))
    return jnp.where(flip[:, None, None, None], cropped[:, :, ::-1], cropped)
