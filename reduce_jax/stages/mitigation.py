"""The four mitigations of stuck-at faults on the int8 array, for a population of chips.

For every chip (its stuck-at faults, ``hardware.stuck_at.StuckAt``) and every mitigation,
the accuracy on the validation and test splits:

* ``none``: the faults active, the int8 baseline unchanged;
* ``bypass``: the chip's faulty PEs bypassed (FAP: the weights they hold are zero and their
  stuck bits no longer act), no retraining;
* ``bypass+retrain``: the same, retrained quantization-aware (FAP+T), bypassed weights kept
  exactly zero;
* ``fault-aware``: no bypass; retrained with the stuck values in the forward pass and the
  gradients straight through them (``hardware.datapath``).

Retraining is the engine's trainer on the int8 hardware (``fault_aware``: a chip is
``(mask, faults)``, computed by ``nets.int8.Int8Model``), ``vmap``-ped over the chips of a
chunk; every chip takes the same number of steps on the same batches. The same hardware is
what ``--mitigation=fault-aware`` runs Reduce on: its chips' stuck bits drawn from their PE
maps. ``float_bypass`` gives the float32 FAP and FAP+T
accuracies of the same PE maps (the engine's ``train.make_trainer``), the reference curve;
``finetune`` trains the int8 baseline quantization-aware.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reduce_jax.engine import population, train
from reduce_jax.hardware import stuck_at, systolic
from reduce_jax.nets import int8

PyTree = Any

MITIGATIONS = ("none", "bypass", "bypass+retrain", "fault-aware")
FLOAT_MITIGATIONS = ("bypass", "bypass+retrain")


def fault_aware(
    net: int8.Int8Net, key: jax.Array, mix: stuck_at.StuckAtMix = stuck_at.DEFAULT_MIX
) -> train.Hardware:
    """Chips on the int8 array whose stuck bits stay in the forward pass: a chip is
    ``(mask, faults)``, computed by ``int8.Int8Model(net, faults)`` with ``mask`` (the
    weights it holds at zero) on top.

    From a PE map (``Hardware.chip``, the engine's ``trainer.chips``) a chip is fault-aware:
    no weight bypassed (a unit mask) and one stuck bit in each faulty PE, drawn from ``mix``
    by ``stuck_at.from_map(key, map, mix)``. ``mitigate`` builds every mitigation's
    ``(mask, faults)`` itself and uses only ``compute``.

    Args:
      net: the int8 model; its ``sites`` must include every site ``mix`` can draw.
      key: the run's stuck-at key; mix: site, polarity and bit distributions (validated).
    """
    mix.validate()

    def chip(params, fault_map):
        ones = jax.tree.map(jnp.ones_like, params)
        return ones, stuck_at.from_map(key, fault_map, mix)

    compute = lambda c: (int8.Int8Model(net, c[1]), c[0])  # noqa: E731
    if set(net.sites) <= {"weight"}:
        return train.Hardware(chip=chip, compute=compute)
    # The same multiply-adds on the matrix-product path, for XLA's cost analysis.
    counted = fault_aware(net._replace(sites=("weight",)), key, mix)
    return train.Hardware(chip=chip, compute=compute, counted=counted)


def chip_hardware(
    model,
    variables: PyTree,
    train_images: jax.Array,
    array: tuple[int, int],
    arithmetic: str = "float32",
    mitigation: str = "bypass",
    key: jax.Array | None = None,
    mix: stuck_at.StuckAtMix = stuck_at.DEFAULT_MIX,
) -> train.Hardware:
    """What the chips of a Reduce run compute on (``--arithmetic``, ``--mitigation``).

    * ``bypass``: FAP (``train.bypass``) of ``model`` in float32, or of the baseline
      quantized post-training (``int8.bypass_model``) in int8;
    * ``fault-aware`` (int8 only): ``fault_aware`` hardware on the quantized baseline, its
      stuck-at sites those ``mix`` can draw, each chip's stuck bits drawn from its PE map
      with ``key``.

    Args:
      model: the Flax model; variables: its trained ``{"params", "batch_stats"}`` (the
        int8 activation scales are calibrated with them on ``train_images``).
      array: ``(R, C)``.
    """
    if mitigation == "fault-aware":
        if arithmetic != "int8" or key is None:
            raise ValueError("fault-aware chips need the int8 array and a stuck-at key")
        net = int8.post_training(model, variables, train_images, array, stuck_at.mix_sites(mix))
        return fault_aware(net, key, mix)
    if mitigation != "bypass":
        raise ValueError(f"mitigation must be bypass or fault-aware, got {mitigation!r}")
    if arithmetic == "int8":
        model = int8.bypass_model(model, variables, train_images, array)
    return train.bypass(model)


def finetune(
    net: int8.Int8Net,
    variables: PyTree,
    data: population.DeviceData,
    tx: optax.GradientTransformation,
    steps: int,
    key: jax.Array,
    batch_size: int,
) -> PyTree:
    """The int8 baseline trained quantization-aware for ``steps`` steps, fault-free.

    Args:
      net: the int8 model; variables: the model's ``{"params", "batch_stats"}`` (unfolded:
        ``int8.Int8Model`` folds them); data: the training set on the device; tx,
        batch_size: the optimizer and batch; key: the batch order.

    Returns:
      The variables after ``steps`` steps (``variables`` itself for 0); BatchNorm's
      statistics unchanged.
    """
    if steps <= 0:
        return variables
    # A fault-free chip, ``(ones, None)``, built here: ``fault_aware``'s ``compute`` only.
    trainer = train.make_trainer(fault_aware(net, key), tx, batch_size)
    ones = train.unit_masks(variables["params"])
    states = trainer.init_population(variables, (ones, None), np.full(1, steps, np.int32))
    states = trainer.run(states, (ones, None), data.train_images, data.train_labels, key, 0, steps)
    return train.slice_chips(states.variables, 0)


class Accuracies(NamedTuple):
    """Accuracy of every chip under every mitigation.

    Attributes:
      val: ``float64[chips, M]`` on the validation split; test: the same on the test split.
      mitigations: the ``M`` names, in column order.
    """

    val: np.ndarray
    test: np.ndarray
    mitigations: tuple[str, ...]


class _Chunk(NamedTuple):
    val: np.ndarray
    test: np.ndarray


def _check(mitigations: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    bad = [m for m in mitigations if m not in allowed]
    if bad or not mitigations:
        raise ValueError(f"unknown mitigation {bad[:1]}; allowed: {', '.join(allowed)}")
    return tuple(mitigations)


def _accuracies(trainer, variables, chips, data) -> tuple[np.ndarray, np.ndarray]:
    val = trainer.evaluate(variables, chips, data.val_images, data.val_labels)
    test = trainer.evaluate(variables, chips, data.test_images, data.test_labels)
    return np.asarray(val, np.float64), np.asarray(test, np.float64)


def mitigate(
    net: int8.Int8Net,
    variables: PyTree,
    faults: stuck_at.StuckAt,
    data: population.DeviceData,
    tx: optax.GradientTransformation,
    steps: int,
    key: jax.Array,
    batch_size: int,
    mitigations: Sequence[str] = MITIGATIONS,
    chips_per_batch: int = 32,
    eval_batch_size: int = 100,
    chip_batching: str = "vmap",
) -> Accuracies:
    """Every chip's validation and test accuracy under every mitigation, in int8.

    Chips are computed in chunks of ``chips_per_batch`` (``population.drive``; the last chunk
    padded with fault-free chips), each chunk's chips ``vmap``-ped together. The sites
    simulated are those where any chip has a stuck bit (``int8.present_sites``).

    Args:
      net: the int8 model (``int8.Int8Net``; its ``sites`` are replaced as above).
      variables: the baseline's ``{"params", "batch_stats"}``, unfolded (every chip starts
        from them; ``int8.Int8Model`` folds them, BatchNorm's statistics frozen).
      faults: ``StuckAt`` of ``int32[chips, 3, R, C]``.
      data: train, validation and test sets on the device.
      tx: the retraining optimizer (its state starts fresh for every chip).
      steps: retraining steps of ``bypass+retrain`` and ``fault-aware`` (batches
        ``train.batch_indices(key, t)``, the same for every chip and both mitigations).
      key: the retraining's batch order.
      batch_size, eval_batch_size, chip_batching: as ``train.make_trainer``.
      mitigations: which of ``MITIGATIONS`` to compute, in the columns' order.

    Returns:
      ``Accuracies`` (``float64[chips, len(mitigations)]`` each).
    """
    mitigations = _check(mitigations, MITIGATIONS)
    faults = stuck_at.StuckAt(*(np.asarray(m, np.int32) for m in faults))
    net = net._replace(sites=int8.present_sites(faults))
    hardware = fault_aware(net, key)  # its ``compute`` only: the chips are built below
    trainer = train.make_trainer(
        hardware, tx, batch_size, eval_batch_size, chip_batching=chip_batching
    )
    params = variables["params"]

    def compute(ids: np.ndarray, chunk: stuck_at.StuckAt) -> _Chunk:
        del ids
        chunk = stuck_at.StuckAt(*(jnp.asarray(m) for m in chunk))
        n = chunk.and_mask.shape[0]
        ones = train.unit_masks(params, n)
        masks = jax.vmap(systolic.weight_masks, (None, 0))(params, stuck_at.faulty_pes(chunk))
        chips = {
            "none": (ones, chunk),
            "bypass": (masks, None),
            "bypass+retrain": (masks, None),
            "fault-aware": (ones, chunk),
        }
        val, test = [], []
        for name in mitigations:
            budgets = np.full(n, max(steps, 0), np.int32)
            states = trainer.init_population(variables, chips[name], budgets)
            if name in ("bypass+retrain", "fault-aware") and steps > 0:
                images, labels = data.train_images, data.train_labels
                states = trainer.run(states, chips[name], images, labels, key, 0, steps)
            v, t = _accuracies(trainer, states.variables, chips[name], data)
            val.append(v)
            test.append(t)
        return _Chunk(np.stack(val, axis=1), np.stack(test, axis=1))

    size = population.chunk_size(len(faults.and_mask), chips_per_batch)
    out = population.drive(faults, compute, _Chunk, size, stage="mitigation")
    return Accuracies(out.val, out.test, mitigations)


def float_bypass(
    model,
    variables: PyTree,
    fault_maps: np.ndarray,
    data: population.DeviceData,
    tx: optax.GradientTransformation,
    steps: int,
    key: jax.Array,
    batch_size: int,
    mitigations: Sequence[str] = FLOAT_MITIGATIONS,
    chips_per_batch: int = 32,
    eval_batch_size: int = 100,
    chip_batching: str = "vmap",
) -> Accuracies:
    """The float32 reference: FAP (``bypass``) and FAP+T (``bypass+retrain``) of the same PE
    maps, with the engine's trainer (``train.make_trainer``) exactly as the study runs it.

    Args:
      model: the Flax model; variables: the float baseline ``{"params", "batch_stats"}``.
      fault_maps: ``bool[chips, R, C]`` (``stuck_at.faulty_pes`` of the int8 chips' faults).
      data, tx, steps, key, batch_size, ...: as ``mitigate``.

    Returns:
      ``Accuracies`` over ``mitigations`` (a subset of ``FLOAT_MITIGATIONS``).
    """
    mitigations = _check(mitigations, FLOAT_MITIGATIONS)
    trainer = train.make_trainer(
        model, tx, batch_size, eval_batch_size, chip_batching=chip_batching
    )

    def compute(ids: np.ndarray, chunk: tuple) -> _Chunk:
        del ids
        (maps,) = chunk
        budgets = np.full(len(maps), max(steps, 0), np.int32)
        states, masks = population.init_chunk(trainer, variables, maps, budgets)
        found = {}
        for name in FLOAT_MITIGATIONS:  # bypass is measured before the retraining
            if name not in mitigations:
                continue
            if name == "bypass+retrain" and steps > 0:
                images, labels = data.train_images, data.train_labels
                states = trainer.run(states, masks, images, labels, key, 0, steps)
            v = trainer.evaluate(states.variables, masks, data.val_images, data.val_labels)
            t = trainer.evaluate(states.variables, masks, data.test_images, data.test_labels)
            found[name] = (np.asarray(v, np.float64), np.asarray(t, np.float64))
        val, test = zip(*(found[name] for name in mitigations), strict=True)
        return _Chunk(np.stack(val, axis=1), np.stack(test, axis=1))

    maps = np.asarray(fault_maps, bool)
    size = population.chunk_size(len(maps), chips_per_batch)
    out = population.drive((maps,), compute, _Chunk, size, stage="float_bypass")
    return Accuracies(out.val, out.test, mitigations)
