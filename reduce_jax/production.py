"""From study to production: new chips retrained from a study's map, without the analysis.

``retrain_chips(bundle, fault_maps, workdir=OUT)`` reads every chip's amount off the saved
map (``resilience.assign``), retrains the chips the map serves for their amounts, verifies
them on the validation split and tops up the misses (``retraining.retrain`` with the study's
``Verification``), exactly as a study treats its own chips: the same recipe, the same
targets, the same random stream for the batch order. No baseline is trained and no analysis
runs. Chips above the map's grid or unrecoverable are reported, not retrained.

With ``policy="online"`` a chip is not given the map's amount: it starts at the online map's
lower estimate (``stages.online``), learned from the bundle's observations and from every
chip retrained into ``OUT`` before it, with verifications that stop early (``sequential``).
Either way ``OUT/refined_map`` is the bundle with every served chip's (rate, need) added:
the map a production line keeps refining.

``OUT`` collects chips over calls: ``production.json`` records every finished chip (its id,
its fault map's sha256, the file it came from, its result), ``chips.csv`` and ``summary.json``
are rewritten from it after each call. A later call adds the chips it has not seen, never
redoes a finished one, and refuses a known chip id whose fault map changed. Within a call,
progress is saved per pool of chips (``ProgressStore`` keyed on the bundle's fingerprint and
the chips), so a killed call resumes when run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from reduce_jax import config as config_lib
from reduce_jax import data as data_lib
from reduce_jax import files
from reduce_jax import inputs as inputs_lib
from reduce_jax.engine import population, train
from reduce_jax.engine.progress import ProgressStore, Timer
from reduce_jax.errors import ConfigError
from reduce_jax.hardware import faults
from reduce_jax.nets import models
from reduce_jax.outputs import map_bundle
from reduce_jax.pipeline import Keys
from reduce_jax.stages import cost as cost_lib
from reduce_jax.stages import mitigation, online, policies, resilience, retraining, sequential

LEDGER = "production.json"
REFINED_MAP = "refined_map"  # the bundle with every served chip's (rate, need) added
POLICIES = ("reduce", "online")
_FORMAT = "reduce_jax production chips"
_BATCHES = "batches"  # per-call progress, removed once the call's chips are in the ledger


class Production(NamedTuple):
    """What ``retrain_chips`` did, and every chip retrained into its workdir so far.

    Attributes:
      chips: one record per chip of the workdir (every call), by chip id: the study's
        ``chips.csv`` columns plus ``source`` (the fault-map file) and ``map_sha256``.
      retrained: ids of the chips this call computed (``int64[n]``).
      found_done: ids of the chips given that an earlier call had finished.
      cost: the retraining cost of all chips (epochs; no analysis, no baseline).
      timing: this call's seconds per phase (``load_data``, ``retrain``) and ``wall_s``.
    """

    chips: list[dict]
    retrained: np.ndarray
    found_done: np.ndarray
    cost: dict
    timing: dict

    def headline(self) -> str:
        c = self.cost
        return (
            f"{len(self.retrained)} chips retrained from the map ({len(self.found_done)} found "
            f"done); {c['chips']} chips in all: {c['reduce_epochs']:.2f} epochs (fixed "
            f"{c['fixed_epochs']:.2f}), {c['chips_meeting_target']} meet the target "
            f"(validation), {c['chips_meeting_target_test']} on the test set, "
            f"{c['chips_unrecoverable']} not served"
        )


def retrain_chips(
    bundle: map_bundle.MapBundle | str,
    fault_maps: np.ndarray | str,
    *,
    workdir: str | None = None,
    chip_ids: np.ndarray | None = None,
    first_chip_id: int = 0,
    model: nn.Module | None = None,
    dataset: data_lib.Dataset | None = None,
    variables: dict | None = None,
    data_dir: str | None = None,
    chips_per_batch: int = 64,
    chip_batching: str = "vmap",
    topup_pool_chunks: int = 4,
    save_chip_weights: bool = False,
    policy: str = "reduce",
    online_settings: online.OnlineSettings | None = None,
    verify_slices: int = 16,
    verify_alpha: float = 0.02,
    **retrain_options: Any,
) -> Production:
    """Retrains new chips from a study's map bundle (no analysis, no baseline training).

    Args:
      bundle: a ``MapBundle`` or its directory (a study's ``<workdir>/map``).
      fault_maps: ``bool[chips, R, C]`` or a fault-map file (``.npz`` / ``.csv``).
      workdir: where the chips' results are collected (None: nothing written, no resume).
      chip_ids: ``int[chips]`` the chips' ids (default: ``first_chip_id`` plus their place
        in the file); a chip is known by its id across calls into one ``workdir``.
      first_chip_id: the first chip's id when ``chip_ids`` is not given.
      model: the study's own Flax module, when it was not a built-in ``--model``.
      dataset: the study's own ``Dataset``, when it was not a built-in ``--dataset``.
      variables: baseline weights to check against the bundle's (they must be the same).
      data_dir: where the study's dataset files are now (default: where the study read them).
      chips_per_batch, chip_batching, topup_pool_chunks: how the chips are computed
        (results do not depend on them beyond the last bits).
      save_chip_weights: store every retrained chip's variables in
        ``workdir/chip_weights`` (``outputs.chip_store``; ``reduce_jax.load_chip`` reads
        one back by its chip id).
      policy: ``reduce`` (each chip its amount off the map, verified and topped up) or
        ``online`` (``stages.online``: started at the lower estimate learned from the
        bundle's observations and the chips before it, topped up until the target, up to
        the study's fixed amount).
      online_settings: the online map's settings (default ``OnlineSettings`` with the
        recipe's top-up allowance as the margin of a chip's own cap).
      verify_slices, verify_alpha: the online policy's verification that stops early
        (``sequential.make_test``).
      **retrain_options: passed to ``retraining.retrain`` (``reduce``).

    Returns:
      ``Production``.

    Raises:
      ConfigError: before any compute and before ``workdir`` is touched: a bundle that is
        missing, damaged or does not match the model, weights or data given (naming the
        part); fault maps of another array size; a chip id seen before in ``workdir`` with
        another fault map (naming the chip and both files); a ``workdir`` that holds a
        study, chips of another map, or a damaged ledger (naming the file).
    """
    timer = Timer()
    with timer.phase("load_data"):
        where_map = bundle if isinstance(bundle, str) else "the bundle"
        if isinstance(bundle, str):
            bundle = map_bundle.load_map(bundle)
        maps, source = _fault_maps(fault_maps, bundle)
        ids = _chip_ids(chip_ids, len(maps), first_chip_id)
        net, ds = _inputs(bundle, model, dataset, data_dir, variables)
        if save_chip_weights and not workdir:
            raise ConfigError("--save_chip_weights needs --workdir (the store is in it)")
        if policy not in POLICIES:
            raise ConfigError(f"--policy={policy!r}; allowed: {', '.join(POLICIES)}")
        if not 1 <= verify_slices <= 1024:
            raise ConfigError(f"--verify_slices={verify_slices} is outside [1, 1024]")
        if not 0 <= verify_alpha <= 0.5:
            raise ConfigError(f"--verify_alpha={verify_alpha} is outside [0, 0.5]")
        ledger = _Ledger.read(workdir, bundle, where_map)
        todo, done = ledger.split(ids, maps, source)
    key = Keys.from_seed(bundle.recipe.seed).retrain
    timing = dict(baseline_trained=False, analysis_run=False)
    if len(todo):
        if workdir:
            os.makedirs(workdir, exist_ok=True)
        compute = dict(
            chips_per_batch=chips_per_batch, chip_batching=chip_batching,
            topup_pool_chunks=topup_pool_chunks,
        )  # fmt: skip
        with timer.phase("retrain"):
            if policy == "online":
                settings = online_settings or online.OnlineSettings(
                    margin_steps=bundle.recipe.max_topup_steps
                )
                rows = _retrain_online(
                    bundle, net, ds, ids[todo], maps[todo], source, workdir, compute,
                    settings, (verify_slices, verify_alpha), _observations(bundle, ledger),
                    save_chip_weights,
                )  # fmt: skip
            else:
                rows = _retrain(
                    bundle, net, ds, ids[todo], maps[todo], source, key, workdir, compute,
                    retrain_options, save_chip_weights,
                )  # fmt: skip
        ledger.add(rows)
    timing.update(timer.times, wall_s=timer.total())
    result = Production(
        chips=ledger.rows(),
        retrained=ids[todo],
        found_done=ids[done],
        cost=_cost(ledger.rows(), bundle),
        timing=timing,
    )
    if workdir:
        ledger.write()
        _write_outputs(workdir, bundle, where_map, result)
        refined = bundle._replace(observations=_observations(bundle, ledger))
        map_bundle.save_map(os.path.join(workdir, REFINED_MAP), refined)
    logging.info("%s", result.headline())
    return result


def _fault_maps(fault_maps, bundle: map_bundle.MapBundle) -> tuple[np.ndarray, str]:
    """``(bool[chips, R, C], source)``: the maps, checked against the bundle's array."""
    rows, cols = bundle.array_shape
    if isinstance(fault_maps, str):
        source = fault_maps
        try:
            maps = faults.load_fault_maps(fault_maps)
        except faults.FaultMapError as e:
            if "array size unknown" not in str(e):
                raise ConfigError(f"--chip_fault_maps: {e}") from None
            maps = faults.load_fault_maps(fault_maps, rows, cols)  # a CSV without its size
    else:
        source = "fault_maps (an array)"
        maps = np.asarray(fault_maps)
        if maps.ndim != 3 or maps.dtype != bool or not len(maps):
            raise ConfigError(
                f"{source}: expected a non-empty bool[chips, R, C], got {maps.dtype} "
                f"{list(maps.shape)}"
            )
    if maps.shape[1:] != (rows, cols):
        raise ConfigError(
            f"{source}: fault maps of a {maps.shape[1]}x{maps.shape[2]} array, but the map is "
            f"of a {rows}x{cols} array"
        )
    return maps, source


def _chip_ids(chip_ids, n: int, first: int) -> np.ndarray:
    if chip_ids is None:
        return np.arange(first, first + n, dtype=np.int64)
    ids = np.asarray(chip_ids)
    if ids.shape != (n,) or ids.dtype.kind not in "iu" or (ids < 0).any():
        raise ConfigError(f"chip_ids: expected {n} ids >= 0, got {ids.dtype} {list(ids.shape)}")
    if len(np.unique(ids)) != n:
        raise ConfigError("chip_ids: an id appears twice")
    return ids.astype(np.int64)


def _inputs(bundle, model, dataset, data_dir, variables) -> tuple[nn.Module, data_lib.Dataset]:
    """The study's model and data (given, or rebuilt from its settings), checked against the
    bundle's fingerprint before any compute."""
    study = bundle.study
    if model is None and bundle.model_id != study["model"]:
        raise ConfigError(
            f"the map's model is your own ({bundle.model_id}): pass it as model= (the Flax "
            "module the study ran)"
        )
    builtin_data = dataset is None
    if builtin_data:
        if bundle.dataset_id != study["dataset"] and study["dataset"] != "npz":
            raise ConfigError(
                f"the map's data is your own ({bundle.dataset_id}): pass it as dataset="
            )
        where_data = data_dir or study["data_dir"]
        try:
            dataset = data_lib.load_dataset(study["dataset"], where_data)
        except data_lib.DatasetError as e:
            raise ConfigError(f"--data_dir: {e}") from None
    elif not isinstance(dataset, data_lib.Dataset):
        raise ConfigError(f"dataset must be a reduce_jax.Dataset, got {type(dataset).__name__}")
    if dataset.val_images is None:
        if bundle.split.kind != "held_out":
            raise ConfigError(
                "the map's validation split was given with its data (x_val, y_val); the data "
                "given has none"
            )
        dataset = data_lib.split_validation(dataset, bundle.split.fraction)
    net = model or models.get_model(study["model"], dataset.num_classes, study["model_width"])
    given = "model" if model is not None else f"--model={study['model']}"
    data_name = "dataset" if not builtin_data else f"--dataset={study['dataset']}"
    abstract = inputs_lib.abstract_variables(net, dataset, f"images of {data_name}")
    weights = bundle.variables if variables is None else variables
    try:
        found = map_bundle.fingerprint(abstract, weights, dataset)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"variables: not arrays ({e})") from None
    where = dict(model=given, weights="variables", data=data_name, split=data_name)
    map_bundle.check_fingerprint(bundle, found, where)
    return net, dataset


def _hardware(bundle, net, data: population.DeviceData) -> train.Hardware:
    """The chips' hardware as the study had it (its ``--arithmetic`` and ``--mitigation``;
    fault-aware chips' stuck bits drawn from their maps with the study's stuck-at key, so a
    chip the study retrained has the same bits here)."""
    cfg = config_lib.ReduceConfig.from_dict(bundle.study)
    return mitigation.chip_hardware(
        net, bundle.variables, data.train_images, bundle.array_shape, cfg.arithmetic,
        cfg.mitigation, Keys.from_seed(bundle.recipe.seed).stuck_at, cfg.stuck_mix(),
    )  # fmt: skip


def study_context(
    bundle: map_bundle.MapBundle, chips_per_batch: int = 32, chip_batching: str = "vmap"
) -> tuple[population.Context, data_lib.Dataset]:
    """The engine's context of a study's bundle on its own model and data (rebuilt from its
    settings and checked against its fingerprint), and that dataset: what a tool that
    reruns part of a study on its chips needs (``experiments.early_stop``)."""
    net, ds = _inputs(bundle, None, None, None, None)
    compute = dict(chips_per_batch=chips_per_batch, chip_batching=chip_batching)
    return _context(bundle, net, ds, compute), ds


def _context(bundle, net, ds, compute) -> population.Context:
    """The engine's context of the bundle's recipe, model and data."""
    recipe = bundle.recipe
    data = population.DeviceData.from_dataset(ds)
    spe = train.steps_per_epoch(data.num_train, recipe.batch_size)
    if spe != recipe.steps_per_epoch:  # the fingerprint's data check makes this unreachable
        raise ConfigError(f"{spe} steps per epoch, the map's recipe has {recipe.steps_per_epoch}")
    hardware = _hardware(bundle, net, data)
    trainer = train.make_trainer(
        hardware,
        train.make_optimizer(recipe.optimizer, recipe.learning_rate, recipe.weight_decay),
        recipe.batch_size,
        recipe.eval_batch_size,
        augment=recipe.augment,
        chip_batching=compute["chip_batching"],
    )
    return population.Context(
        trainer=trainer,
        variables=jax.tree.map(jax.numpy.asarray, bundle.variables),
        data=data,
        steps_per_epoch=spe,
        chips_per_batch=compute["chips_per_batch"],
    )


def _batch_store(
    bundle, ids, maps, compute, workdir, policy: str, save_weights: bool
) -> ProgressStore | None:
    """The progress of one call's chips (resume), in ``workdir/batches/<key>``; a call that
    stores the chips' weights does not resume one that did not (its finished chunks' weights
    were never written)."""
    if not workdir:
        return None
    shas = [_map_sha256(m) for m in maps]
    parts = [bundle.key, *map(str, ids), *shas, repr(sorted(compute.items()))]
    if policy != "reduce":
        parts.append(policy)
    if save_weights:
        parts.append("weights")
    batch = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    store_key = dict(bundle=bundle.key, batch=batch, devices=jax.device_count())
    batch_dir = os.path.join(workdir, _BATCHES, batch)
    os.makedirs(batch_dir, exist_ok=True)
    return ProgressStore(batch_dir, store_key, overwrite=False)


def _retrain(
    bundle, net, ds, ids, maps, source, key, workdir, compute, options, save_weights
) -> list[dict]:
    """Retrains chips ``ids`` (maps ``bool[n, R, C]``) as a study does; their records."""
    recipe = bundle.recipe
    ctx = _context(bundle, net, ds, compute)
    spe = ctx.steps_per_epoch
    policy = retraining.Verification(
        decision_target=bundle.decision_target,
        test_target=bundle.test_target,
        topup_steps=recipe.topup_steps,
        max_topup_steps=recipe.max_topup_steps,
        topup_pool_chunks=compute["topup_pool_chunks"],
    )
    assignment = resilience.assign(bundle.rmap, maps)
    singles = [[i] for i in range(len(maps))]
    units = retraining.Units.of_groups(singles, assignment.budgets, assignment.ok)
    shas = [_map_sha256(m) for m in maps]
    store = _batch_store(bundle, ids, maps, compute, workdir, "reduce", save_weights)
    sink = None
    if save_weights:
        sink = _chip_store(bundle, workdir, ids)
        options = dict(options, sink=sink)
    outcome = retraining.retrain(ctx, policy, units, maps, key, store, **options)
    if sink is not None:
        sink.finish()
    chips = cost_lib.chip_results(
        assignment, outcome, policy.decision_target, test_target=policy.test_target
    )
    served = chips.selected_steps >= 0
    # Rounds: a verification after the amount and after every top-up (as a study counts).
    rounds = np.where(served, 1 + policies.topup_rounds(chips.topup_steps, policy.topup_steps), 0)
    rows = []
    for i in range(len(ids)):
        sel = int(chips.selected_steps[i])
        rows.append(
            dict(
                chip=int(ids[i]),
                **{f"{m}_fault_rate": float(r[i]) for m, r in assignment.rates.items()},
                status=str(chips.status[i]),
                selected_epochs=sel / spe if sel >= 0 else None,
                selected_steps=sel if sel >= 0 else None,
                topup_epochs=float(chips.topup_steps[i] / spe),
                topup_steps=int(chips.topup_steps[i]),
                accuracy_before=float(chips.accuracy_before[i]),
                accuracy_after=float(chips.accuracy_after[i]),
                meets_target=bool(chips.meets_target[i]),
                test_accuracy_after=float(chips.test_accuracy_after[i]),
                meets_target_test=bool(chips.meets_target_test[i]),
                source=source,
                map_sha256=shas[i],
                policy="reduce",
                verifications=int(rounds[i]),
                eval_passes=float(rounds[i]),
            )
        )
    return rows


def _chip_store(bundle, workdir: str, ids: np.ndarray):
    """The writer of the chips' weights into ``workdir/chip_weights`` (row ``i`` of the
    call's maps is chip ``ids[i]``)."""
    from reduce_jax.outputs import chip_store

    bypass = bundle.study.get("mitigation", "bypass") == "bypass"
    return chip_store.ChipStore(workdir, bundle.variables, bundle.key, ids, bypass=bypass)


def _retrain_online(
    bundle, net, ds, ids, maps, source, workdir, compute, settings, verify, prior, save_weights
) -> list[dict]:
    """The online policy on chips ``ids`` (maps ``bool[n, R, C]``) in their order, from the
    observations ``prior``; their records (``selected_steps``: the chip's start;
    ``accuracy_before``: not measured, None). With ``save_weights``, every chip's final
    weights go to ``workdir``'s chip store as its round finishes."""
    ctx = _context(bundle, net, ds, compute)
    spe, recipe = ctx.steps_per_epoch, bundle.recipe
    keys = Keys.from_seed(recipe.seed)
    rates = resilience.assign(bundle.rmap, maps).rates
    test = sequential.make_test(
        len(ds.val_labels), bundle.decision_target, *verify, keys.verify_order
    )
    cap = int(train.epochs_to_steps(bundle.fixed_epochs, spe))
    store = _batch_store(bundle, ids, maps, compute, workdir, "online", save_weights)
    sink = _chip_store(bundle, workdir, ids) if save_weights else None
    out = online.run_online(
        ctx, maps, rates[bundle.rmap.rate_measure], recipe.topup_steps, cap,
        bundle.decision_target, keys.policies, settings, test, prior, store, sink=sink,
    ).outcome  # fmt: skip
    if sink is not None:
        sink.finish()
    rows = []
    for i in range(len(ids)):
        served, diverged, met = bool(out.served[i]), bool(out.diverged[i]), bool(out.met[i])
        status = (
            "unrecoverable" if not served else "diverged" if diverged
            else "ok" if met else "missed_target"
        )  # fmt: skip
        first = int(out.first[i])
        rows.append(
            dict(
                chip=int(ids[i]),
                **{f"{m}_fault_rate": float(r[i]) for m, r in rates.items()},
                status=status,
                selected_epochs=first / spe if served else None,
                selected_steps=first if served else None,
                topup_epochs=float((out.steps[i] - first) / spe) if served else 0.0,
                topup_steps=int(out.steps[i] - first) if served else 0,
                accuracy_before=None,
                accuracy_after=float(out.val[i]),
                meets_target=met and not diverged,
                test_accuracy_after=float(out.test[i]),
                meets_target_test=served
                and not diverged
                and bool(out.test[i] >= bundle.test_target),
                source=source,
                map_sha256=_map_sha256(maps[i]),
                policy="online",
                verifications=int(out.verifications[i]),
                eval_passes=float(out.eval_passes[i]),
            )
        )
    return rows


def _observations(bundle, ledger: _Ledger) -> online.Observations:
    """The bundle's observations, then every served chip of ``ledger`` in the order it was
    added: a chip that met the target needed its steps (amount and top-ups; a chip that met
    it at its first verification needed at most that), a chip that missed it within its
    cap is ``inf``; chips not served or diverged add nothing."""
    rates, needs = [], []
    measure = bundle.rmap.rate_measure
    for r in ledger.arrivals():
        if r["status"] == "ok":
            need = (r["selected_steps"] or 0) + r["topup_steps"]
        elif r["status"] == "missed_target":
            need = np.inf
        else:
            continue
        rates.append(r[f"{measure}_fault_rate"])
        needs.append(need)
    return bundle.observations.add(rates, needs)


def _map_sha256(fault_map: np.ndarray) -> str:
    m = np.asarray(fault_map, bool)
    return hashlib.sha256(f"{m.shape}".encode() + np.packbits(m).tobytes()).hexdigest()


class _Ledger:
    """The chips finished in a workdir (``production.json``), and the map they came from."""

    def __init__(self, workdir: str | None, bundle_key: str, chips: dict[int, dict], where: str):
        self.workdir, self.bundle_key, self.chips, self.where = workdir, bundle_key, chips, where
        self.batch_dirs: list[str] = []

    @classmethod
    def read(cls, workdir: str | None, bundle: map_bundle.MapBundle, where_map: str) -> _Ledger:
        key = bundle.key
        if not workdir:
            return cls(None, key, {}, where_map)
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise ConfigError(f"--workdir={workdir} exists and is not a directory")
        if os.path.isfile(os.path.join(workdir, "resilience.csv")) or os.path.isdir(
            os.path.join(workdir, map_bundle.MAP_DIR)
        ):
            raise ConfigError(
                f"--workdir={workdir} holds a study's outputs; give new chips their own --workdir"
            )
        path = os.path.join(workdir, LEDGER)
        if not os.path.isfile(path):
            return cls(workdir, key, {}, where_map)
        try:
            with open(path) as f:
                saved = json.load(f)
            chips = {int(r["chip"]): r for r in saved["chips"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(
                f"{path}: unreadable ledger ({type(e).__name__}: {e}); a damaged file: give "
                "another --workdir"
            ) from None
        if saved.get("bundle") != key:
            raise ConfigError(
                f"--workdir={workdir} holds chips retrained from another map "
                f"({saved.get('map')}); --map={where_map} differs in its fingerprint or its "
                "chips' hardware (--arithmetic, --mitigation, stuck bits): give another --workdir"
            )
        return cls(workdir, key, chips, where_map)

    def split(self, ids: np.ndarray, maps: np.ndarray, source: str):
        """``(todo, done)`` indices of the chips given: new ones, and ones finished before.

        Raises:
          ConfigError: a finished chip's id given with another fault map.
        """
        todo, done = [], []
        for i, chip in enumerate(ids.tolist()):
            seen = self.chips.get(chip)
            if seen is None:
                todo.append(i)
            elif seen["map_sha256"] != _map_sha256(maps[i]):
                raise ConfigError(
                    f"chip {chip}: its fault map in {source} differs from the one retrained "
                    f"from {seen['source']} into --workdir={self.workdir}; give it another id "
                    "(--first_chip_id) or another --workdir"
                )
            else:
                done.append(i)
        return np.asarray(todo, np.int64), np.asarray(done, np.int64)

    def add(self, rows: list[dict]) -> None:
        """Adds finished chips, numbered in the order they arrived (``arrival``)."""
        start = 1 + max((r.get("arrival", -1) for r in self.chips.values()), default=-1)
        for i, r in enumerate(rows):
            self.chips[int(r["chip"])] = dict(r, arrival=start + i)

    def rows(self) -> list[dict]:
        return [self.chips[c] for c in sorted(self.chips)]

    def arrivals(self) -> list[dict]:
        """The chips in the order they were added (a ledger without that order: by id)."""
        return sorted(self.chips.values(), key=lambda r: (r.get("arrival", 0), r["chip"]))

    def write(self) -> None:
        """Saves the ledger atomically, then drops the progress of finished calls."""
        files.write_json_atomic(
            os.path.join(self.workdir, LEDGER),
            dict(format=_FORMAT, bundle=self.bundle_key, map=self.where, chips=_plain(self.rows())),
        )
        batches = os.path.join(self.workdir, _BATCHES)
        if os.path.isdir(batches):
            shutil.rmtree(batches)


def _plain(rows: list[dict]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
            for r in rows]  # fmt: skip


def _cost(rows: list[dict], bundle: map_bundle.MapBundle) -> dict:
    """Retraining cost of all chips, in epochs, against the study's fixed policy."""
    spe = bundle.recipe.steps_per_epoch
    planned = sum(r["selected_steps"] or 0 for r in rows)
    topup = sum(r["topup_steps"] for r in rows)
    fixed = bundle.fixed_epochs * len(rows)
    status = [r["status"] for r in rows]
    return dict(
        chips=len(rows),
        reduce_epochs=(planned + topup) / spe,
        reduce_planned_epochs=planned / spe,
        topup_epochs=topup / spe,
        reduce_steps=planned + topup,
        fixed_epochs_per_chip=bundle.fixed_epochs,
        fixed_epochs=fixed,
        savings=fixed - (planned + topup) / spe,
        analysis_epochs=0.0,
        study_analysis_epochs=bundle.analysis_epochs,
        chips_meeting_target=sum(bool(r["meets_target"]) for r in rows),
        chips_meeting_target_test=sum(bool(r["meets_target_test"]) for r in rows),
        chips_unrecoverable=sum(s in ("above_grid", "unrecoverable") for s in status),
        chips_missing_target=status.count("missed_target"),
        chips_diverged=status.count("diverged"),
        steps_per_epoch=spe,
    )


def _write_outputs(workdir: str, bundle, where_map: str, result: Production) -> None:
    """``chips.csv`` (every chip of the workdir), ``summary.json``, and the per-chip plots
    (``plots.chip_figures``)."""
    rmap, fp = bundle.rmap, bundle.fingerprint
    summary = dict(
        kind="retrain_chips",
        map=dict(
            path=os.path.abspath(where_map) if where_map != "the bundle" else None,
            version=bundle.version,
            model=bundle.model_id,
            dataset=bundle.dataset_id,
            fingerprint=dict(model=fp.model, weights=fp.weights, data=fp.data, split=fp.split),
            statistic=rmap.statistic,
        ),
        resilience_map=dict(
            rate_measure=rmap.rate_measure,
            interpolation=rmap.interpolation,
            measured_rates=[float(x) for x in rmap.measured_rates],
            required_epochs=[float(x) if np.isfinite(x) else None for x in rmap.required_epochs],
        ),
        target_accuracy=bundle.test_target,
        validation_target_accuracy=bundle.decision_target,
        recipe=bundle.recipe._asdict(),
        chips=_plain(result.chips),
        retrained=[int(c) for c in result.retrained],
        found_done=[int(c) for c in result.found_done],
        cost=result.cost,
        timing=result.timing,
    )
    files.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    files.write_csv_atomic(os.path.join(workdir, "chips.csv"), _plain(result.chips))
    from reduce_jax.outputs import plots, report  # matplotlib: only when writing

    for name, fig in plots.chip_figures(summary):
        try:
            files.replace_atomic(
                os.path.join(workdir, name),
                lambda f, fig=fig: fig.savefig(f, format="png", dpi=report.DPI),
                True,
                ".tmp.png",
            )
        finally:
            plots.plt.close(fig)
