"""Mapping of weight kernels onto a tiled, weight-stationary systolic array.

Every kernel is viewed as a matrix ``W[k, n]`` (reduction dim ``k``, output dim ``n``):
a Dense kernel ``[in, out]`` as is, a Conv kernel ``[kh, kw, cin, cout]`` (Flax HWIO) as
``reshape(kh * kw * cin, cout)``. Weight ``W[k, n]`` sits on PE ``(k mod R, n mod C)``.
A faulty PE is bypassed, so every weight mapped onto it acts as zero.

The mapping depends on shapes only, so it is computed once in numpy; applying a fault map
is a pure gather, written for one chip and vmapped over chips at the call site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reduce_jax.errors import ConfigError

PyTree = Any

KERNEL_NAME = "kernel"


class MappingError(ConfigError):
    """A kernel the mapping cannot place on the array (one line, naming its parameter path)."""


def _key_names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def check_mappable(params: PyTree, kernel_inputs: Mapping[tuple, int] | None = None) -> None:
    """Checks, from shapes only, that every kernel can be placed on the array.

    Placed are Dense kernels ``[in, out]`` and 2-D convolution kernels in Flax's HWIO layout
    ``[kh, kw, cin, cout]`` (strided or not; a 1x1 kernel is a ``[cin, cout]`` matrix). A
    kernel of any other rank, and a grouped or depthwise convolution (its ``cin`` is less
    than its input's channels: the im2col view of such a kernel is not the matrix the array
    runs), is refused.

    Args:
      params: the ``params`` collection (arrays or ``ShapeDtypeStruct``s).
      kernel_inputs: ``models.kernel_inputs``: the input channels of each kernel's module,
        keyed ``('params', *path)``; without it grouped convolutions are not detected.

    Raises:
      MappingError: naming the first such kernel's path (``params/block1/conv/kernel``).
    """
    kernels = [
        (("params", *_key_names(path)), tuple(leaf.shape))
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if is_kernel_path(path)
    ]
    if not kernels:
        raise MappingError("the model has no parameter named 'kernel': nothing maps onto the array")
    for key, shape in kernels:
        name = "/".join(key)
        if len(shape) not in (2, 4):
            raise MappingError(
                f"parameter {name} has shape {list(shape)}: the array maps Dense [in, out] and "
                "2-D convolution [kh, kw, cin, cout] kernels only"
            )
        channels = (kernel_inputs or {}).get(key)
        if len(shape) == 4 and channels is not None and channels != shape[2]:
            raise MappingError(
                f"parameter {name} {list(shape)} is a grouped or depthwise convolution ({channels} "
                f"input channels, {shape[2]} per group), which the array mapping does not place"
            )


def is_kernel_path(path: tuple) -> bool:
    """Whether a ``tree_flatten_with_path`` key path names a weight kernel."""
    if not path:
        return False
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return name == KERNEL_NAME


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(k, n)`` matrix view of a kernel of the given shape (im2col view for convs)."""
    if len(shape) < 2:
        raise ValueError(f"a kernel needs at least 2 dims, got shape {shape}")
    return int(np.prod(shape[:-1])), int(shape[-1])


def pe_coordinates(shape: tuple[int, ...], rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """PE row and column of every weight of a kernel.

    Args:
      shape: the kernel's shape (Dense ``[in, out]`` or Conv ``[kh, kw, cin, cout]``).
      rows, cols: the array size ``R x C``.

    Returns:
      ``(pe_row int32[k, 1], pe_col int32[1, n])``; broadcast together they give the PE of
      ``W[k, n]``.
    """
    k, n = matrix_shape(shape)
    return (np.arange(k, dtype=np.int32) % rows)[:, None], (np.arange(n, dtype=np.int32) % cols)[
        None, :
    ]


def num_tiles(shape: tuple[int, ...], rows: int, cols: int) -> int:
    """Number of ``R x C`` tiles that cover the kernel's matrix view."""
    k, n = matrix_shape(shape)
    return -(-k // rows) * -(-n // cols)


def kernel_mask(shape: tuple[int, ...], fault_map: jax.Array, dtype=jnp.float32) -> jax.Array:
    """0/1 mask of one kernel for one chip.

    Args:
      shape: the kernel's shape.
      fault_map: ``bool[R, C]``, True where the PE is faulty.
      dtype: dtype of the mask.

    Returns:
      ``dtype[*shape]``: 0 where the weight sits on a faulty PE, 1 elsewhere.
    """
    rows, cols = fault_map.shape
    pe_row, pe_col = pe_coordinates(shape, rows, cols)
    healthy = jnp.logical_not(jnp.asarray(fault_map)[pe_row, pe_col])
    return healthy.astype(dtype).reshape(shape)


def weight_masks(params: PyTree, fault_map: jax.Array) -> PyTree:
    """Masks of every parameter for one chip.

    Args:
      params: a Flax parameter pytree; leaves named ``kernel`` are mapped onto the array.
      fault_map: ``bool[R, C]``.

    Returns:
      A pytree like ``params``: 0/1 masks (the leaf's dtype) for kernels, ones elsewhere
      (biases and normalisation parameters are not on the array). ``jax.vmap`` over a
      ``bool[chips, R, C]`` gives masks with a leading ``chips`` axis.
    """

    def mask_leaf(path, leaf):
        if is_kernel_path(path):
            return kernel_mask(leaf.shape, fault_map, leaf.dtype)
        return jnp.ones(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(mask_leaf, params)


def pe_load(params: PyTree, rows: int, cols: int) -> np.ndarray:
    """How many kernel weights of the network each PE holds, over all tiles and layers.

    Args:
      params: a parameter pytree (only leaf shapes are used; ShapeDtypeStructs work).
      rows, cols: the array size.

    Returns:
      ``int64[R, C]``; its sum is the number of kernel weights in the network.
    """
    load = np.zeros((rows, cols), np.int64)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not is_kernel_path(path):
            continue
        k, n = matrix_shape(tuple(leaf.shape))
        per_row = np.bincount(np.arange(k) % rows, minlength=rows)
        per_col = np.bincount(np.arange(n) % cols, minlength=cols)
        load += np.outer(per_row, per_col)
    return load


def magnitude_load(params: PyTree, rows: int, cols: int) -> np.ndarray:
    """Each PE's share of every kernel's weight magnitude, summed over kernels.

    Each kernel's ``|W|`` is normalised to sum 1 before it is spread over the PEs, so every
    layer counts equally, however many weights it has: a small layer whose few weights all
    matter (the first convolution, the classifier) weighs as much as a large one.

    Args:
      params: a parameter pytree with concrete kernel values (the trained network).
      rows, cols: the array size.

    Returns:
      ``float64[R, C]``, non-negative, summing to the number of kernels with any weight.
    """
    load = np.zeros(rows * cols, np.float64)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not is_kernel_path(path):
            continue
        k, n = matrix_shape(tuple(leaf.shape))
        mag = np.abs(np.asarray(leaf, np.float64)).reshape(k, n)
        total = mag.sum()
        if total == 0:
            continue
        pe_row, pe_col = pe_coordinates(tuple(leaf.shape), rows, cols)
        pe = (pe_row * cols + pe_col).reshape(-1)
        load += np.bincount(pe, weights=(mag / total).reshape(-1), minlength=rows * cols)
    return load.reshape(rows, cols)


RATE_MEASURES = ("pe", "effective", "importance")


def pe_weights(params: PyTree, rows: int, cols: int, measure: str) -> np.ndarray:
    """Per-PE weights of a fault-rate measure: the rate of a map is ``sum(weights[map])``.

    Every measure is linear in the fault map (a weighted count of faulty PEs), so the rate
    of a fused map and of any subset of PEs is cheap to compute.

    Args:
      params: a parameter pytree (only shapes are used, except for ``importance``).
      rows, cols: the array size.
      measure: ``pe`` (fraction of faulty PEs), ``effective`` (fraction of kernel weights
        bypassed) or ``importance`` (fraction of the trained network's weight magnitude
        bypassed, every layer counting equally: ``magnitude_load``).

    Returns:
      ``float64[R, C]``, non-negative, summing to 1.
    """
    if measure == "pe":
        load = np.ones((rows, cols), np.float64)
    elif measure == "effective":
        load = pe_load(params, rows, cols).astype(np.float64)
    elif measure == "importance":
        load = magnitude_load(params, rows, cols)
    else:
        raise ValueError(f"unknown rate measure {measure!r}; allowed: {', '.join(RATE_MEASURES)}")
    total = load.sum()
    if total == 0:
        raise ValueError("params have no leaf named 'kernel' with non-zero weights")
    return load / total


def fault_rate(weights: jax.Array, fault_map: jax.Array) -> jax.Array:
    """A map's rate in a measure: ``float32[...]`` from weights ``[R, C]`` and ``bool[..., R, C]``.

    ``weights`` from ``pe_weights``; 0 for a fault-free map, 1 when every PE is faulty, and
    non-decreasing as PEs are added to the map.
    """
    w = jnp.asarray(weights, jnp.float32)
    return jnp.sum(jnp.where(fault_map, w, 0.0), axis=(-2, -1))


def effective_fault_rate(params: PyTree, fault_map: jax.Array) -> jax.Array:
    """Fraction of the network's kernel weights that a chip's fault map zeroes.

    Args:
      params: a parameter pytree (only shapes are used).
      fault_map: ``bool[R, C]`` (or ``bool[..., R, C]``).

    Returns:
      ``float32[...]`` in [0, 1]. Equals ``mean(fault_map)`` when every layer fills whole tiles.
    """
    rows, cols = fault_map.shape[-2:]
    return fault_rate(pe_weights(params, rows, cols, "effective"), fault_map)


def pe_fault_rate(fault_map: jax.Array) -> jax.Array:
    """Fraction of faulty PEs: ``float32[...]`` from ``bool[..., R, C]``."""
    return jnp.mean(jnp.asarray(fault_map, jnp.float32), axis=(-2, -1))


def describe_mapping(params: PyTree, rows: int, cols: int) -> list[Mapping[str, Any]]:
    """Per-kernel mapping summary (name, shape, matrix view, tiles, array utilisation)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not is_kernel_path(path):
            continue
        shape = tuple(int(d) for d in leaf.shape)
        k, n = matrix_shape(shape)
        tiles = num_tiles(shape, rows, cols)
        out.append(
            dict(
                name="/".join(_key_names(path)),
                shape=shape,
                matrix=(k, n),
                tiles=tiles,
                utilisation=k * n / (tiles * rows * cols),
            )
        )
    return out


def measure_weights(
    params: PyTree, rows: int, cols: int, measures: Sequence[str] = RATE_MEASURES
) -> dict[str, np.ndarray]:
    """Per-PE weights ``float64[R, C]`` of each rate measure (``pe_weights``)."""
    return {m: pe_weights(params, rows, cols, m) for m in measures}


def chip_rates(weights: dict[str, np.ndarray], maps: np.ndarray) -> dict[str, np.ndarray]:
    """Every chip's rate in each measure: measure -> ``float64[...]`` for ``bool[..., R, C]``."""
    maps = jnp.asarray(maps)
    return {m: np.asarray(fault_rate(w, maps), np.float64) for m, w in weights.items()}


def grid_rates(weights: dict[str, np.ndarray], maps: np.ndarray) -> dict[str, np.ndarray]:
    """The measured rate of each grid point: the mean over its maps ``bool[F, K, R, C]``,
    measure -> ``float64[F]``."""
    return {m: r.mean(1) for m, r in chip_rates(weights, maps).items()}
