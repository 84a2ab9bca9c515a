"""Sharding the chips axis over devices, on one host or many (``jax.distributed``).

Every population array (chip states, the chips' masks or stuck bits) has a leading ``chips`` axis, laid out with
``NamedSharding(mesh, P("chips"))`` over a 1-D mesh of all devices; the data is replicated.
Since chips are independent, XLA partitions the vmapped step with no communication.
With one device every function here is the identity.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any

AXIS = "chips"


def initialize(
    coordinator_address: str | None, num_processes: int, process_id: int, auto: bool = False
) -> None:
    """Joins a multi-process run (``jax.distributed.initialize``); a no-op for one process.

    With ``auto``, ``jax.distributed`` reads the coordinator, the process count and this
    process's id from a cluster launcher's environment (SLURM ``srun``: ``SLURM_JOB_ID``,
    ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``; Open MPI ``mpirun``).
    """
    if auto:
        jax.distributed.initialize()
    elif num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )


def process_count() -> int:
    """Processes of the run (1 unless ``initialize`` joined a multi-process run)."""
    return jax.process_count()


@functools.cache
def mesh() -> Mesh:
    """1-D mesh of every device (of every process), axis ``chips``."""
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def num_shards() -> int:
    """Devices the chips axis is split over; chunk sizes are multiples of this."""
    return jax.device_count()


def round_up(n: int) -> int:
    """``n`` rounded up to a multiple of the number of devices."""
    k = num_shards()
    return -(-int(n) // k) * k


def map_chips(f, chips: tuple, shared: tuple = ()) -> PyTree:
    """``lax.map`` of ``f(*one_chip, *shared)`` over the leading ``chips`` axis of ``chips``.

    With several devices (and a chip count they divide), each device maps over its own chips
    (``shard_map`` over the ``chips`` mesh axis), so a sharded population is not gathered onto
    every device. ``shared`` (the same for every chip) is replicated and marked as varying
    over the chips axis inside, so a gradient flowing to it (a convolution's custom rule
    produces one) has its type. The leading axis is taken to be the population's; under an
    inner ``vmap`` over another axis the result is the same, but that axis is split over the
    devices instead (moving data between them).

    Args:
      f: one chip's computation.
      chips: pytrees with a leading ``chips`` axis.
      shared: pytrees every chip reads whole.
    """

    def mapped(chips, shared):
        return jax.lax.map(lambda one: f(*one, *shared), chips)

    n = jax.tree.leaves(chips)[0].shape[0]
    if num_shards() == 1 or n % num_shards():
        return mapped(chips, shared)

    def on_device(chips, shared):
        shared = jax.tree.map(lambda v: jax.lax.pcast(v, AXIS, to="varying"), shared)
        return mapped(chips, shared)

    return jax.shard_map(on_device, mesh=mesh(), in_specs=(P(AXIS), P()), out_specs=P(AXIS))(
        chips, shared
    )


def shard_chips(tree: PyTree) -> PyTree:
    """Lays the leading ``chips`` axis of every leaf out over the devices."""
    if num_shards() == 1:
        return tree
    return jax.device_put(tree, NamedSharding(mesh(), P(AXIS)))


def replicate(tree: PyTree) -> PyTree:
    """Copies ``tree`` to every device (the data every chip reads)."""
    if num_shards() == 1:
        return tree
    return jax.device_put(tree, NamedSharding(mesh(), P()))


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as numpy on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
