"""Reduce end to end: baseline, resilience analysis and map, per-chip amounts, retraining,
verification with top-ups, and cost accounting.

``run(config)`` is what the CLI calls. Progress is saved per chunk of chips in
``<workdir>/progress.json`` (``progress.ProgressStore``), so an interrupted run continues
where it stopped and ends with the same ``summary.json``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from reduce_jax import baseline as baseline_lib
from reduce_jax import cost as cost_lib
from reduce_jax import data as data_lib
from reduce_jax import (
    faults,
    grouping,
    models,
    population,
    predictor,
    report,
    resilience,
    retraining,
    sharding,
    systolic,
    train,
)
from reduce_jax.config import ConfigError, ReduceConfig, validate
from reduce_jax.progress import Meter, ProgressStore


def _sha256(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _none_if_inf(x) -> float | None:
    return None if not math.isfinite(float(x)) else float(x)


def chip_fault_maps(cfg: ReduceConfig, key: jax.Array) -> np.ndarray:
    """The population's fault maps ``bool[chips, R, C]``: from the file, or sampled."""
    if cfg.chip_fault_maps is not None:
        return faults.load_fault_maps(cfg.chip_fault_maps, cfg.array_rows, cfg.array_cols)
    return np.asarray(
        faults.sample_fault_maps(
            key,
            cfg.num_chips,
            cfg.array_rows,
            cfg.array_cols,
            cfg.chip_fault_rate,
            cfg.fault_model,
            cfg.cluster_alpha,
            line_fraction=cfg.line_fraction,
        )
    )


def measure_weights(params, rows: int, cols: int, measures=systolic.RATE_MEASURES) -> dict:
    """Per-PE weights ``float64[R, C]`` of each rate measure (``systolic.pe_weights``)."""
    return {m: systolic.pe_weights(params, rows, cols, m) for m in measures}


def chip_rates(weights: dict[str, np.ndarray], maps: np.ndarray) -> dict[str, np.ndarray]:
    """Every chip's rate in each measure: measure -> ``float64[chips]``."""
    maps = jnp.asarray(maps)
    return {m: np.asarray(systolic.fault_rate(w, maps), np.float64) for m, w in weights.items()}


def grid_rates(weights: dict[str, np.ndarray], maps: np.ndarray) -> dict[str, np.ndarray]:
    """The measured rate of each grid point (mean over its K maps ``bool[F, K, R, C]``)."""
    return {m: r.mean(1) for m, r in chip_rates(weights, maps).items()}


def check_grid(measured: np.ndarray, cfg: ReduceConfig, measure: str) -> None:
    """The map is interpolated at the measured rates, so they must increase."""
    if np.any(np.diff(measured) <= 0):
        raise ConfigError(
            f"--fault_rates: grid points too close for a {cfg.array_rows}x{cfg.array_cols} "
            f"array (measured {measure} rates {np.round(measured, 4).tolist()} are not "
            "increasing)"
        )


def analysis_fault_maps(cfg: ReduceConfig, key: jax.Array) -> np.ndarray:
    """The analysis chips' fault maps ``bool[F, K, R, C]`` (``--analysis_fault_model``)."""
    rates, k = np.asarray(cfg.fault_rates, np.float64), cfg.maps_per_rate
    rows, cols = cfg.array_rows, cfg.array_cols
    maps = faults.sample_fault_maps(
        key,
        len(rates) * k,
        rows,
        cols,
        np.repeat(rates, k),
        cfg.analysis_fault_model,
        cfg.cluster_alpha,
        line_fraction=cfg.line_fraction,
    )
    return np.asarray(maps).reshape(len(rates), k, rows, cols)


def predictor_fault_maps(cfg: ReduceConfig, key: jax.Array) -> np.ndarray:
    """Validation chips of the predictor study: ``bool[predictor_chips, R, C]`` of
    ``--fault_model``, with (mean) rates spread evenly over ``[0, max(--fault_rates)]``."""
    n = cfg.predictor_chips
    rates = np.linspace(0.0, max(cfg.fault_rates), n)
    maps = faults.sample_fault_maps(
        key,
        n,
        cfg.array_rows,
        cfg.array_cols,
        rates,
        cfg.fault_model,
        cfg.cluster_alpha,
        line_fraction=cfg.line_fraction,
    )
    return np.asarray(maps)


def plan_units(
    cfg: ReduceConfig,
    maps: np.ndarray,
    ok: np.ndarray,
    weights: np.ndarray,
    amount: grouping.AmountFn,
    levels: np.ndarray,
) -> list[list[int]]:
    """The retraining units: groups of chips sharing one retraining (``--grouping``).

    Chips that cannot be served (``~ok``) stay on their own; with ``none`` every chip is
    its own unit. Returns lists of chip ids, ordered by first member.
    """
    ids = np.flatnonzero(ok)
    if cfg.grouping == "none" or len(ids) < 2:
        return [[int(i)] for i in range(len(maps))]
    groups = grouping.greedy_groups(maps[ids], weights, amount, levels, cfg.max_group_size)
    units = [[int(ids[i]) for i in g] for g in groups]
    units += [[int(i)] for i in np.flatnonzero(~ok)]
    return sorted(units, key=lambda u: u[0])


def retrain_plan(
    trainer: train.Trainer,
    params,
    data: population.DeviceData,
    cfg: ReduceConfig,
    units: list[list[int]],
    maps: np.ndarray,
    unit_steps: np.ndarray,
    unit_ok: np.ndarray,
    target: float,
    spe: int,
    key: jax.Array,
    store: ProgressStore,
    stage: str = "retrain",
) -> list[dict]:
    """Retrains every unit (a chip, or a group on its fused map) for its steps, tops it up,
    and verifies it on every member chip. Saved per chunk in ``store`` under ``stage``.

    Args:
      units: lists of chip ids; unit_steps: ``int[units]``; unit_ok: ``bool[units]`` which
        units to retrain (the others, chips the map cannot serve, are only evaluated).

    Returns:
      One record per unit: ``members``, ``steps`` (None if not retrained), ``topup_steps``,
      ``retrained``, ``accuracy_before``, ``accuracy_after`` (on the unit's map),
      ``member_accuracy`` (on each member), ``diverged``, ``meets_target`` (on every
      member), ``split`` (False), ``split_from`` (None).
    """
    res = retraining.retrain_units(
        trainer,
        params,
        data,
        np.stack([maps[u].any(0) for u in units]),
        np.where(unit_ok, unit_steps, 0).astype(np.int64),
        unit_ok,
        [maps[u] for u in units],
        target,
        int(train.epochs_to_steps(cfg.topup_epochs, spe)),
        int(train.epochs_to_steps(cfg.max_topup_epochs, spe)),
        key,
        cfg.chips_per_batch,
        done=store.done(stage),
        on_chunk=lambda i, r: store.put(stage, i, r),
        label=stage,
    )
    records = []
    for i, u in enumerate(units):
        member_acc = [float(a) for a in res["member_accuracy"][i][: len(u)]]
        diverged = bool(res["diverged"][i])
        records.append(
            dict(
                members=list(u),
                steps=int(unit_steps[i]) if unit_ok[i] else None,
                topup_steps=int(res["topup_steps"][i]),
                retrained=bool(unit_ok[i]),
                accuracy_before=float(res["accuracy_before"][i]),
                accuracy_after=float(res["accuracy_after"][i]),
                member_accuracy=member_acc,
                diverged=diverged,
                meets_target=not diverged and min(member_acc) >= target,
                split=False,
                split_from=None,
            )
        )
    return records


def grouped_records(group_records: list[dict], per_chip: list[dict]) -> list[dict]:
    """The retrainings of a grouped run: every group of 2+ chips, then each chip that no
    successful group serves, by its own per-chip retraining.

    A group whose model misses the target on a member after its top-ups is split: it keeps
    its record (``split=True``; its steps still count) and its members are served by their
    per-chip retrainings, whose records get ``split_from`` = the group's index.

    Args:
      group_records: ``retrain_plan`` records of the groups of 2+ chips.
      per_chip: ``retrain_plan`` records of every chip alone, indexed by chip id.
    """
    records, split_from, served = [], {}, set()
    for i, r in enumerate(group_records):
        split = r["retrained"] and not r["meets_target"]
        records.append(dict(r, split=split))
        for chip in r["members"]:
            if split:
                split_from[chip] = i
            else:
                served.add(chip)
    if split_from:
        logging.info(
            "%d groups missed the target; their %d chips are served by their own retraining",
            len(set(split_from.values())),
            len(split_from),
        )
    for chip, r in enumerate(per_chip):
        if chip not in served:
            records.append(dict(r, split_from=split_from.get(chip)))
    return records


def run(cfg: ReduceConfig, overwrite: bool = False) -> dict:
    """Runs Reduce; writes the outputs into ``cfg.workdir`` (if set) and returns the summary."""
    validate(cfg)
    t_start = time.perf_counter()
    timing = {}
    # Everything that can be wrong with the inputs is found before the workdir is touched.
    ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir)
    # Saved chunks are reused only with the same settings, the same device count (it sets
    # the chunk sizes) and the same fault-map file contents.
    store = ProgressStore(
        cfg.workdir,
        dict(
            cfg.as_dict(),
            devices=jax.device_count(),
            chip_fault_maps_sha256=_sha256(cfg.chip_fault_maps),
        ),
        overwrite,
    )
    data = population.DeviceData.from_dataset(ds)
    timing["load_data_s"] = time.perf_counter() - t_start
    key = jax.random.key(cfg.seed)
    keys = [jax.random.fold_in(key, i) for i in range(8)]
    k_base, k_analysis_maps, k_analysis_data, k_chips, k_retrain = keys[:5]
    k_pred_maps, k_pred_data, k_group = keys[5:]
    model = models.get_model(cfg.model, ds.num_classes)
    rates = np.asarray(cfg.fault_rates, np.float64)
    amounts = np.asarray(cfg.retrain_epochs, np.float64)
    k = cfg.maps_per_rate
    rows, cols = cfg.array_rows, cfg.array_cols
    amaps = analysis_fault_maps(cfg, k_analysis_maps)
    # The grid must be resolvable on the array (``pe``) and in the rate measure that reads
    # the map. Measures of shapes only are checked before any training; ``importance``
    # needs the trained weights and is checked once the baseline exists.
    abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), ds.image_shape))
    shape_measures = ("pe",) if cfg.rate_measure in ("pe", "importance") else ("pe", "effective")
    shape_grid = grid_rates(measure_weights(abstract, rows, cols, shape_measures), amaps)
    for m in shape_measures:
        check_grid(shape_grid[m], cfg, m)
    if cfg.workdir:
        os.makedirs(cfg.workdir, exist_ok=True)

    t = time.perf_counter()
    params, base_info = baseline_lib.get_baseline(
        cfg.workdir,
        cfg.model,
        ds,
        k_base,
        cfg.baseline_epochs,
        cfg.batch_size,
        cfg.baseline_optimizer,
        cfg.baseline_learning_rate,
        cfg.seed,
    )
    weights = measure_weights(params, rows, cols)
    measured_all = grid_rates(weights, amaps)
    measured = measured_all[cfg.rate_measure]
    check_grid(measured, cfg, cfg.rate_measure)
    params = sharding.replicate(jax.tree.map(jnp.asarray, params))
    timing["baseline_s"] = time.perf_counter() - t
    timing["baseline_reused"] = base_info["reused"]
    trainer = train.make_trainer(
        model,
        train.make_optimizer(cfg.optimizer, cfg.learning_rate),
        cfg.batch_size,
        cfg.eval_batch_size,
    )
    spe = train.steps_per_epoch(data.num_train, cfg.batch_size)
    ones = train.unit_masks(params)
    base_acc = float(
        trainer.evaluate(
            jax.tree.map(lambda x: x[None], params), ones, data.test_images, data.test_labels
        )[0]
    )
    target = (
        cfg.target_accuracy if cfg.target_accuracy is not None else base_acc - cfg.max_accuracy_drop
    )
    logging.info("baseline accuracy %.4f, target %.4f, %d steps per epoch", base_acc, target, spe)

    # 1. Resilience analysis.
    t = time.perf_counter()
    amount_steps = train.epochs_to_steps(amounts, spe)
    meter = Meter("resilience analysis", len(rates) * k * int(amount_steps.max()))
    accuracy, a_diverged = resilience.analyze(
        trainer,
        params,
        data,
        amaps,
        amount_steps,
        k_analysis_data,
        cfg.chips_per_batch,
        done=store.done("analysis"),
        on_chunk=lambda i, r: store.put("analysis", i, r),
        on_progress=meter,
    )
    timing["analysis_s"] = time.perf_counter() - t

    # 2. Resilience map, on the measured rates of the analysis maps.
    required, stat = resilience.resilience_map(accuracy, amounts, target, cfg.statistic)
    required_steps = np.where(
        np.isfinite(required), train.epochs_to_steps(np.nan_to_num(required, posinf=0), spe), np.inf
    )

    # Which rate measure predicts the retraining a chip really needs (validation chips).
    predictor_summary = None
    if cfg.predictor_chips > 0:
        t = time.perf_counter()
        pmaps = predictor_fault_maps(cfg, k_pred_maps)
        if cfg.chip_fault_maps is not None:
            logging.warning(
                "predictor study: validation chips are sampled from --fault_model=%s, not "
                "taken from --chip_fault_maps",
                cfg.fault_model,
            )
        p_acc, p_div = resilience.analyze(
            trainer,
            params,
            data,
            pmaps[:, None],
            amount_steps,
            k_pred_data,
            cfg.chips_per_batch,
            done=store.done("predictor"),
            on_chunk=lambda i, r: store.put("predictor", i, r),
            on_progress=Meter("predictor study", len(pmaps) * int(amount_steps.max())),
        )
        needed = predictor.needed_steps(p_acc[:, :, 0], amount_steps, target)
        predictor_summary = dict(
            chips=len(pmaps),
            fault_model=cfg.fault_model,
            requested_rates=np.linspace(0.0, max(cfg.fault_rates), len(pmaps)).tolist(),
            needed_epochs=[_none_if_inf(x / spe) for x in needed],
            accuracy=p_acc[:, :, 0].tolist(),
            diverged=p_div[:, 0].tolist(),
            epochs=float(len(pmaps) * amounts.max()),
            **predictor.study(
                chip_rates(weights, pmaps),
                measured_all,
                required_steps,
                needed,
                cfg.interpolation,
                spe,
            ),
        )
        timing["predictor_s"] = time.perf_counter() - t
        logging.info(
            "predictor study: rank correlation of rate and needed retraining: %s",
            ", ".join(
                f"{m} {v['spearman_rate']:.3f}" if v.get("spearman_rate") is not None else f"{m} -"
                for m, v in predictor_summary["measures"].items()
            ),
        )

    # 3. Per-chip amounts.
    maps = chip_fault_maps(cfg, k_chips)
    if cfg.chip_fault_maps is not None:
        logging.info(
            "%d chips from %s (--num_chips, --chip_fault_rate and --fault_model are not used)",
            len(maps),
            cfg.chip_fault_maps,
        )
    rates_by_measure = chip_rates(weights, maps)
    sel_steps, status = resilience.retraining_amount(
        measured, required_steps, rates_by_measure[cfg.rate_measure], cfg.interpolation
    )
    sel_steps, status = np.asarray(sel_steps), np.asarray(status)
    ok = status == resilience.OK
    budgets = np.where(ok, sel_steps, 0).astype(np.int64)

    # 4-5. Retrain every chip for its own amount, verify, top up (per-chip Reduce).
    t = time.perf_counter()
    singles = [[i] for i in range(len(maps))]
    per_chip = retrain_plan(
        trainer,
        params,
        data,
        cfg,
        singles,
        maps,
        budgets,
        ok,
        target,
        spe,
        k_retrain,
        store,
    )
    chip_result = collect_groups(per_chip, maps, weights, cfg.rate_measure, spe)[2]
    timing["retrain_s"] = time.perf_counter() - t

    # With --grouping: chips whose fused maps need less retraining share one retraining
    # (eFAT); each group is verified on every member chip, and split if it misses.
    groups, served_by, grouped_result = None, None, None
    if cfg.grouping != "none":
        t = time.perf_counter()
        amount = grouping.amount_fn(measured, required_steps, cfg.interpolation)
        units = plan_units(cfg, maps, ok, weights[cfg.rate_measure], amount, required_steps)
        multi = [u for u in units if len(u) > 1]
        multi_steps = amount(grouping.fused_rates(maps, weights[cfg.rate_measure], multi))
        if not np.all(np.isfinite(multi_steps)):
            raise RuntimeError("a planned group's fused map cannot be served by the map")
        group_records = (
            retrain_plan(
                trainer,
                params,
                data,
                cfg,
                multi,
                maps,
                multi_steps.astype(np.int64),
                np.ones(len(multi), bool),
                target,
                spe,
                k_group,
                store,
                stage="grouped",
            )
            if multi
            else []
        )
        records = grouped_records(group_records, per_chip)
        groups, served_by, grouped_result = collect_groups(
            records, maps, weights, cfg.rate_measure, spe
        )
        timing["grouped_retrain_s"] = time.perf_counter() - t

    # 6. Cost.
    chips = cost_lib.chip_records(
        rates_by_measure, status, budgets, chip_result, target, spe, served_by, grouped_result
    )
    fixed_per_chip = float(cfg.fixed_epochs if cfg.fixed_epochs is not None else amounts.max())
    cost = cost_lib.cost_summary(
        chips,
        fixed_per_chip,
        len(rates) * k * amounts.max(),
        spe,
        groups,
    )
    timing["wall_s"] = time.perf_counter() - t_start
    summary = dict(
        baseline_accuracy=base_acc,
        target_accuracy=float(target),
        baseline=dict(
            steps=base_info["steps"],
            steps_per_epoch=spe,
            accuracy_at_training=base_info["test_accuracy"],
        ),
        resilience=dict(
            fault_rates=rates.tolist(),
            measured_rates=measured.tolist(),
            measured_rates_by_measure={m: v.tolist() for m, v in measured_all.items()},
            retrain_epochs=amounts.tolist(),
            retrain_steps=amount_steps.tolist(),
            accuracy=accuracy.tolist(),
            statistic=cfg.statistic,
            statistic_accuracy=stat.tolist(),
            diverged=a_diverged.tolist(),
        ),
        resilience_map=dict(
            fault_rates=rates.tolist(),
            measured_rates=measured.tolist(),
            required_epochs=[_none_if_inf(x) for x in required],
            required_steps=[None if not np.isfinite(x) else int(x) for x in required_steps],
            rate_measure=cfg.rate_measure,
        ),
        chips=chips,
        groups=groups,
        cost=cost,
        predictor_study=predictor_summary,
        config=dict(cfg.as_dict(), overwrite=overwrite),
        timing=timing,
        mapping=[
            dict(m, shape=list(m["shape"]), matrix=list(m["matrix"]))
            for m in systolic.describe_mapping(params, rows, cols)
        ],
    )
    if cfg.workdir and jax.process_index() == 0:
        report.write_outputs(summary, cfg.workdir)
    logging.info(
        "Reduce: %.2f epochs vs fixed %.2f (saves %.1f%%)%s; %d/%d chips meet target; "
        "%d unrecoverable; break-even at %s chips",
        cost["reduce_epochs"],
        cost["fixed_epochs"],
        100 * cost["savings_fraction"],
        f"; grouped {cost['grouped_epochs']:.2f} in {cost['groups']} groups"
        if cost["grouped_epochs"] is not None
        else "",
        cost["chips_meeting_target"],
        len(maps),
        cost["chips_unrecoverable"],
        cost["break_even_chips"],
    )
    return summary


def collect_groups(
    records: list[dict], maps: np.ndarray, weights: dict, rate_measure: str, spe: int
) -> tuple[list[dict], dict[int, int], dict[str, np.ndarray]]:
    """The retrained units of ``retrain_plan`` as ``summary["groups"]`` entries, which group
    served each chip last, and each chip's result on the model that served it.

    Returns:
      ``(groups, served_by chip -> group, result)`` with ``result`` arrays over chips:
      ``accuracy_before``, ``accuracy_after`` (the serving model on the chip's own mask),
      ``topup_steps`` (the chip's own, when retrained alone), ``diverged``.
    """
    n = len(maps)
    result = dict(
        accuracy_before=np.zeros(n),
        accuracy_after=np.zeros(n),
        topup_steps=np.zeros(n, np.int64),
        diverged=np.zeros(n, bool),
    )
    groups, served_by, group_of_record = [], {}, {}
    for i, r in enumerate(records):
        if not r["retrained"]:  # evaluated only: a chip the map cannot serve
            chip = r["members"][0]
            result["accuracy_before"][chip] = r["accuracy_before"]
            result["accuracy_after"][chip] = r["accuracy_after"]
            result["diverged"][chip] = r["diverged"]
            continue
        gid = group_of_record[i] = len(groups)
        fused = maps[r["members"]].any(0)
        groups.append(
            dict(
                group=gid,
                members=r["members"],
                fused_pe_rate=float(weights["pe"][fused].sum()),
                fused_rate=float(weights[rate_measure][fused].sum()),
                amount_epochs=r["steps"] / spe,
                amount_steps=r["steps"],
                topup_epochs=r["topup_steps"] / spe,
                topup_steps=r["topup_steps"],
                accuracy_before=r["accuracy_before"],
                accuracy_after=r["accuracy_after"],
                member_accuracy=r["member_accuracy"],
                diverged=r["diverged"],
                meets_target=r["meets_target"],
                split=r["split"],
                split_from=None if r["split_from"] is None else group_of_record[r["split_from"]],
            )
        )
        for j, chip in enumerate(r["members"]):
            served_by[chip] = gid
            result["accuracy_before"][chip] = r["accuracy_before"]
            result["accuracy_after"][chip] = r["member_accuracy"][j]
            result["diverged"][chip] = r["diverged"]
            result["topup_steps"][chip] = r["topup_steps"] if len(r["members"]) == 1 else 0
    return groups, served_by, result
