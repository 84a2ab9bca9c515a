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
from reduce_jax import faults, models, population, report, resilience, sharding, systolic, train
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
        )
    )


def chip_rates(params, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pe_rate float64[chips], effective_rate float64[chips])``."""
    maps = jnp.asarray(maps)
    pe = systolic.pe_fault_rate(maps)
    eff = jax.vmap(lambda m: systolic.effective_fault_rate(params, m))(maps)
    return np.asarray(pe, np.float64), np.asarray(eff, np.float64)


def analysis_fault_maps(cfg: ReduceConfig, key: jax.Array, params) -> tuple[np.ndarray, np.ndarray]:
    """The analysis chips' fault maps and the measured rate of each grid point.

    The map is interpolated at the measured rates (in ``--rate_measure``), which need only
    the parameter shapes, so a grid too fine for the array is rejected before any training.

    Returns:
      ``(bool[F, K, R, C], float64[F])``.
    """
    rates, k = np.asarray(cfg.fault_rates, np.float64), cfg.maps_per_rate
    rows, cols = cfg.array_rows, cfg.array_cols
    maps = np.asarray(
        faults.sample_fault_maps(
            key,
            len(rates) * k,
            rows,
            cols,
            np.repeat(rates, k),
            cfg.analysis_fault_model,
            cfg.cluster_alpha,
        )
    )
    pe, eff = chip_rates(params, maps)
    measured = (pe if cfg.rate_measure == "pe" else eff).reshape(len(rates), k).mean(1)
    if np.any(np.diff(measured) <= 0):
        raise ConfigError(
            f"--fault_rates: grid points too close for a {rows}x{cols} array (measured rates "
            f"{np.round(measured, 4).tolist()} are not increasing)"
        )
    return maps.reshape(len(rates), k, rows, cols), measured


def _retrain_chunk(
    trainer: train.Trainer,
    params,
    data: population.DeviceData,
    maps: np.ndarray,
    budgets: np.ndarray,
    retrain: np.ndarray,
    target: float,
    topup_steps: int,
    max_topup_steps: int,
    phase_key: jax.Array,
    topup_key: jax.Array,
    size: int,
    meter: Meter,
) -> dict[str, list]:
    """One chunk of ``m <= size`` chips: retrain, verify, top up; results as lists over chips."""
    m = len(maps)
    chunk_maps, chunk_budgets = population.pad_chunk(maps, budgets, size)
    states, masks = population.init_chunk(trainer, params, chunk_maps, chunk_budgets)
    before = population.evaluate(trainer, states, masks, data)
    states = population.run_phase(
        trainer, states, masks, data, phase_key, chunk_budgets, on_progress=meter
    )
    after = population.evaluate(trainer, states, masks, data)
    topup = np.zeros(size, np.int64)
    missing = np.zeros(size, bool)
    missing[:m] = retrain & (after[:m] < target)
    rnd = 0
    while True:
        # A diverged chip is frozen: more steps cannot help it.
        missing &= ~sharding.to_host(states.diverged)
        left = max_topup_steps - rnd * topup_steps
        if not missing.any() or topup_steps <= 0 or left <= 0:
            break
        extra = np.where(missing, min(topup_steps, left), 0)
        budget = states.budget + sharding.shard_chips(jnp.asarray(extra, jnp.int32))
        states = population.run_phase(
            trainer,
            states.replace(budget=budget),
            masks,
            data,
            jax.random.fold_in(topup_key, rnd),
            extra,
        )
        topup += extra
        after = np.where(missing, population.evaluate(trainer, states, masks, data), after)
        missing &= after < target
        rnd += 1
    diverged = sharding.to_host(states.diverged)[:m]
    return dict(
        accuracy_before=before[:m].tolist(),
        accuracy_after=after[:m].tolist(),
        topup_steps=topup[:m].tolist(),
        diverged=diverged.tolist(),
    )


def retrain_chips(
    trainer: train.Trainer,
    params,
    data: population.DeviceData,
    maps: np.ndarray,
    steps: np.ndarray,
    retrain: np.ndarray,
    target: float,
    topup_steps: int,
    max_topup_steps: int,
    key: jax.Array,
    chips_per_batch: int,
    store: ProgressStore,
) -> dict[str, np.ndarray]:
    """Retrains every chip for its own steps, verifies it, and tops up those that miss.

    Chips are sorted by budget before chunking, so a chunk holds similar budgets. Each
    finished chunk is saved in ``store``; chunks already there are not redone.

    Args:
      maps: ``bool[chips, R, C]``; steps: ``int[chips]`` budgets; retrain: ``bool[chips]``
        which chips to retrain (the others are only evaluated).

    Returns:
      numpy arrays over chips: ``accuracy_before``, ``accuracy_after``, ``topup_steps``,
      ``diverged``.
    """
    n = len(maps)
    steps = np.where(retrain, steps, 0).astype(np.int64)
    order = np.argsort(steps, kind="stable")
    size = population.chunk_size(n, chips_per_batch)
    phase_key, topup_key = jax.random.split(key)
    meter = Meter("retraining", int(steps.sum()))

    def compute(ids: np.ndarray) -> dict[str, list]:
        result = _retrain_chunk(
            trainer,
            params,
            data,
            maps[ids],
            steps[ids],
            retrain[ids],
            target,
            topup_steps,
            max_topup_steps,
            phase_key,
            topup_key,
            size,
            meter,
        )
        for chip in ids[np.asarray(result["diverged"], bool)]:
            logging.warning(
                "chip %d: loss or weights became non-finite; stopped, reported as diverged", chip
            )
        logging.info("retraining: %d chips done", len(ids))
        return result

    return population.map_chunks(
        order, size, store.done("retrain"), compute, lambda i, r: store.put("retrain", i, r)
    )


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
    k_base, k_analysis_maps, k_analysis_data, k_chips, k_retrain = (
        jax.random.fold_in(key, i) for i in range(5)
    )
    model = models.get_model(cfg.model, ds.num_classes)
    rates = np.asarray(cfg.fault_rates, np.float64)
    amounts = np.asarray(cfg.retrain_epochs, np.float64)
    k = cfg.maps_per_rate
    abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), ds.image_shape))
    amaps, measured = analysis_fault_maps(cfg, k_analysis_maps, abstract)
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

    # 3. Per-chip amounts.
    maps = chip_fault_maps(cfg, k_chips)
    if cfg.chip_fault_maps is not None:
        logging.info(
            "%d chips from %s (--num_chips, --chip_fault_rate and --fault_model are not used)",
            len(maps),
            cfg.chip_fault_maps,
        )
    pe, eff = chip_rates(params, maps)
    chip_rate = pe if cfg.rate_measure == "pe" else eff
    sel_steps, status = resilience.retraining_amount(
        measured, required_steps, chip_rate, cfg.interpolation
    )
    sel_steps, status = np.asarray(sel_steps), np.asarray(status)
    ok = status == resilience.OK
    budgets = np.where(ok, sel_steps, 0).astype(np.int64)

    # 4-5. Retrain every chip for its own amount, verify, top up.
    t = time.perf_counter()
    res = retrain_chips(
        trainer,
        params,
        data,
        maps,
        budgets,
        ok,
        target,
        int(train.epochs_to_steps(cfg.topup_epochs, spe)),
        int(train.epochs_to_steps(cfg.max_topup_epochs, spe)),
        k_retrain,
        cfg.chips_per_batch,
        store,
    )
    timing["retrain_s"] = time.perf_counter() - t

    # 6. Cost.
    chips = cost_lib.chip_records(pe, eff, status, budgets, res, target, spe)
    fixed_per_chip = float(cfg.fixed_epochs if cfg.fixed_epochs is not None else amounts.max())
    cost = cost_lib.cost_summary(chips, fixed_per_chip, len(rates) * k * amounts.max(), spe)
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
        cost=cost,
        config=dict(cfg.as_dict(), overwrite=overwrite),
        timing=timing,
        mapping=[
            dict(m, shape=list(m["shape"]), matrix=list(m["matrix"]))
            for m in systolic.describe_mapping(params, cfg.array_rows, cfg.array_cols)
        ],
    )
    if cfg.workdir and jax.process_index() == 0:
        report.write_outputs(summary, cfg.workdir)
    logging.info(
        "Reduce: %.2f epochs vs fixed %.2f (saves %.1f%%); %d/%d chips meet target; "
        "%d unrecoverable; break-even at %s chips",
        cost["reduce_epochs"],
        cost["fixed_epochs"],
        100 * cost["savings_fraction"],
        cost["chips_meeting_target"],
        len(maps),
        cost["chips_unrecoverable"],
        cost["break_even_chips"],
    )
    return summary
