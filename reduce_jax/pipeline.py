"""Reduce end to end: baseline, resilience analysis and map, per-chip amounts, retraining,
verification with top-ups, grouping, and cost accounting.

``run(config)`` is what the CLI calls; it reads as Reduce's steps, one call per stage.
``run(config, model=..., variables=..., dataset=...)`` runs it on your own model, trained
weights and data (``reduce_jax.inputs``).
Progress is saved per chunk of chips in ``<workdir>/progress.json``
(``progress.ProgressStore``), so an interrupted run continues where it stopped and ends
with the same ``summary.json``.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from reduce_jax import data as data_lib
from reduce_jax import inputs as inputs_lib
from reduce_jax import sharding
from reduce_jax.config import ReduceConfig, check_grid, validate
from reduce_jax.engine import population, train
from reduce_jax.engine.progress import ProgressStore, Timer
from reduce_jax.hardware import faults, systolic
from reduce_jax.nets import augment as augment_lib
from reduce_jax.nets import models
from reduce_jax.outputs import chip_store, map_bundle, report
from reduce_jax.outputs.summary import Baseline, Summary
from reduce_jax.stages import baseline as baseline_lib
from reduce_jax.stages import (
    calibration,
    grouping,
    mitigation,
    online,
    policies,
    predictor,
    resilience,
    retraining,
    sequential,
)
from reduce_jax.stages import cost as cost_lib


class Keys(NamedTuple):
    """The run's random streams: ``fold_in(key(seed), stream_id(name))`` for the field
    ``name``, so adding, removing or reordering a field never changes the other streams."""

    baseline: jax.Array
    analysis_maps: jax.Array
    analysis_data: jax.Array
    chips: jax.Array
    retrain: jax.Array
    predictor_maps: jax.Array
    predictor_data: jax.Array
    grouped: jax.Array
    policies: jax.Array
    fixed_sample: jax.Array
    verify_order: jax.Array
    stuck_at: jax.Array

    @classmethod
    def from_seed(cls, seed: int) -> Keys:
        key = jax.random.key(seed)
        return cls(*(jax.random.fold_in(key, stream_id(name)) for name in cls._fields))


def stream_id(name: str) -> int:
    """A stable number for a stream's name: its CRC-32, in 31 bits (``fold_in``'s data)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def run(
    cfg: ReduceConfig,
    overwrite: bool = False,
    *,
    model: nn.Module | None = None,
    variables: dict | None = None,
    dataset: data_lib.Dataset | None = None,
) -> Summary:
    """Runs Reduce; writes the outputs into ``cfg.workdir`` (if set) and returns the result.

    Args:
      cfg: the settings.
      overwrite: discard progress in the workdir saved with other settings.
      model: your own Flax linen module instead of ``cfg.model``, called as
        ``model.apply(variables, x, train=...)`` and returning ``float[B, classes]``
        logits; every ``kernel`` parameter (Dense ``[in, out]``, Conv HWIO) is placed on the
        array.
      variables: its trained ``{'params': ...}``: the baseline is measured, not trained
        (``cfg.init_checkpoint`` does the same from an orbax checkpoint).
      dataset: your own ``Dataset`` instead of ``cfg.dataset``.

    Raises:
      ConfigError: a bad setting or input (before any compute and before the workdir is
        touched).
    """
    validate(cfg, dataset_files=dataset is None)
    timer, keys = Timer(), Keys.from_seed(cfg.seed)
    with timer.phase("load_data"):
        # Everything that can be wrong with the inputs is found before the workdir is touched.
        inp = inputs_lib.resolve(cfg, model, variables, dataset)
        store = _progress_store(cfg, overwrite, inp)
        data = population.DeviceData.from_dataset(inp.dataset)
    amaps = _analysis_fault_maps(cfg, keys.analysis_maps)
    _check_shape_grid(cfg, inp.abstract["params"], amaps)
    if cfg.workdir:
        os.makedirs(cfg.workdir, exist_ok=True)
    with timer.phase("baseline"):
        variables, weights, base_info = _baseline(cfg, inp, keys.baseline, amaps)
    timer.times["baseline_reused"] = base_info["reused"]
    ctx, policy, base = _context(cfg, inp, variables, data, base_info, keys.stuck_at)
    # A target at chance: for a trained baseline known only now (given ones: in resolve).
    inputs_lib.check_target(cfg, base.accuracy, None, inp.dataset)
    warnings = inputs_lib.baseline_warnings(inp, base.accuracy, base.test_accuracy)

    # 1-2. Resilience analysis and map.
    amounts, _ = resilience.amount_axis(cfg.retrain_epochs, cfg.eval_every, ctx.steps_per_epoch)
    with timer.phase("analysis"):
        analysis = resilience.analyze(ctx, amaps, amounts, keys.analysis_data, store)
    rmap, choice = _resilience_map(cfg, ctx, policy, analysis, amaps, weights)
    study = None
    if cfg.predictor_chips > 0:
        with timer.phase("predictor"):
            study = _predictor_study(cfg, ctx, policy, rmap, keys, store)

    # 3. Per-chip amounts; 4-5. retraining, verification and top-ups of every chip alone.
    maps = chip_fault_maps(cfg, keys.chips)
    assignment = resilience.assign(rmap, maps)
    with timer.phase("retrain"):
        singles = [[i] for i in range(len(maps))]
        units = retraining.Units.of_groups(singles, assignment.budgets, assignment.ok)
        sink = _chip_store(cfg, store, variables)
        per_chip = retraining.retrain(ctx, policy, units, maps, keys.retrain, store, sink=sink)

    # Grouped runs (eFAT): chips whose fused maps need less retraining share one.
    grouped = None
    if cfg.grouping != "none":
        with timer.phase("grouped_retrain"):
            grouped = _grouped(
                cfg, ctx, policy, maps, assignment, rmap, per_chip, keys.grouped, store, sink
            )
    if sink is not None:
        groups = (grouped.served_by, grouped.retrainings.members) if grouped is not None else ()
        sink.finish(*groups)

    # 6. Cost, and Reduce against the policies a user would follow without it.
    chips = cost_lib.chip_results(
        assignment, per_chip, policy.decision_target, grouped, test_target=policy.test_target
    )
    fixed = cfg.fixed_epochs if cfg.fixed_epochs is not None else amounts.max()
    analysis_epochs = len(cfg.fault_rates) * cfg.maps_per_rate * amounts.max()
    cost = cost_lib.summarize(chips, fixed, analysis_epochs, ctx.steps_per_epoch, grouped)
    with timer.phase("policies"):
        outcomes = _Outcomes(analysis, chips, grouped, study)
        rates = assignment.rates[cfg.rate_measure]
        comparison = _compare(cfg, ctx, policy, maps, rates, outcomes, fixed, keys, store)
    timer.times["wall_s"] = timer.total()
    summary = Summary(
        config=cfg, overwrite=overwrite, baseline=base, test_target=policy.test_target,
        decision_target=policy.decision_target,
        steps_per_epoch=ctx.steps_per_epoch, analysis=analysis, rmap=rmap,
        assignment=assignment, chips=chips, grouped=grouped, cost=cost, predictor=study,
        policies=comparison, calibration=choice,
        mapping=systolic.describe_mapping(variables["params"], cfg.array_rows, cfg.array_cols),
        inputs=inp.describe(),
        timing=timer.times, warnings=warnings,
    )  # fmt: skip
    if cfg.workdir and jax.process_index() == 0:
        report.write_outputs(summary.to_json(), cfg.workdir, chips_in_json=cfg.summary_chips)
        # The map as an artefact: new chips are served from it without the analysis.
        map_bundle.save_map(os.path.join(cfg.workdir, map_bundle.MAP_DIR), map_bundle.of_study(
            cfg, rmap, variables, inp.abstract, inp.dataset, policy=policy,
            steps_per_epoch=ctx.steps_per_epoch, fixed_epochs=fixed,
            analysis_epochs=analysis_epochs, augment=_augments(cfg, inp),
            validation_split=inp.validation_split, model_id=inp.model_id, dataset_id=inp.dataset_id,
        ))  # fmt: skip
    return summary


def _resilience_map(cfg, ctx, policy, analysis, amaps, weights):
    """The map under the decision target; with ``auto``, its statistic and interpolation are chosen
    by cross-validation on the analysis (``calibration.choose``; else the choice is None)."""
    statistic, interpolation, choice = cfg.statistic, cfg.interpolation, None
    if resilience.AUTO in (statistic, interpolation):
        grid = systolic.grid_rates(weights, amaps)[cfg.rate_measure]
        flat = amaps.reshape(-1, *amaps.shape[2:])
        rates = systolic.chip_rates(weights, flat)[cfg.rate_measure].reshape(amaps.shape[:2])
        choice = calibration.choose(
            policy,
            ctx.steps_per_epoch,
            analysis,
            rates,
            grid,
            calibration.STATISTICS if statistic == resilience.AUTO else (statistic,),
            resilience.INTERPOLATIONS if interpolation == resilience.AUTO else (interpolation,),
        )
        statistic, interpolation = choice.statistic, choice.interpolation
        logging.info(
            "map: %s statistic, %s interpolation (cross-validated on %d analysis chips)",
            statistic,
            interpolation,
            choice.chips,
        )
    rmap = resilience.resilience_map(
        analysis, amaps, weights, policy.decision_target, statistic, cfg.rate_measure,
        ctx.steps_per_epoch, interpolation,
    )  # fmt: skip
    return rmap, choice


def _progress_store(cfg: ReduceConfig, overwrite: bool, inp: inputs_lib.Inputs) -> ProgressStore:
    """Saved chunks are reused only with the same settings, the same device count (it sets
    the chunk sizes), the same fault-map file contents, model, data and baseline."""
    sha = None
    if cfg.chip_fault_maps is not None:
        with open(cfg.chip_fault_maps, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
    key = dict(cfg.as_dict(), devices=jax.device_count(), chip_fault_maps_sha256=sha)
    if cfg.mitigation == "bypass":
        # Bypassed chips have no stuck bits: their settings change nothing, and a run from
        # before these settings existed keeps its key (it resumes).
        for name in ("mitigation", "stuck_site_probs", "stuck_p_one", "stuck_bits"):
            del key[name]
    key.update(model=inp.model_id, dataset=inp.dataset_id)
    if inp.baseline_sha256 is not None:  # not trained by the tool
        key.update(baseline_source=inp.source, baseline_sha256=inp.baseline_sha256)
    return ProgressStore(cfg.workdir, key, overwrite)


def _analysis_fault_maps(cfg: ReduceConfig, key: jax.Array) -> np.ndarray:
    """The analysis chips' maps ``bool[F, K, R, C]``: ``K`` of ``--analysis_fault_model`` at
    every grid rate."""
    rates = np.repeat(np.asarray(cfg.fault_rates, np.float64), cfg.maps_per_rate)
    maps = _fault_spec(cfg, cfg.analysis_fault_model).sample(key, rates)
    return maps.reshape(len(cfg.fault_rates), cfg.maps_per_rate, *maps.shape[1:])


def _fault_spec(cfg: ReduceConfig, model: str) -> faults.FaultSpec:
    return faults.FaultSpec(
        model, cfg.array_rows, cfg.array_cols, cfg.cluster_alpha, cfg.line_fraction
    )


def _check_shape_grid(cfg: ReduceConfig, abstract_params, amaps: np.ndarray) -> None:
    """The grid must be resolvable on the array (``pe``) and in the rate measure that reads
    the map. Measures of shapes only are checked before any training; ``importance`` needs
    the trained weights and is checked once the baseline exists."""
    measures = ("pe",) if cfg.rate_measure in ("pe", "importance") else ("pe", "effective")
    grid = systolic.grid_rates(
        systolic.measure_weights(abstract_params, cfg.array_rows, cfg.array_cols, measures), amaps
    )
    for m in measures:
        check_grid(grid[m], cfg, m)


def _augments(cfg: ReduceConfig, inp: inputs_lib.Inputs) -> bool:
    """Whether training batches are augmented (``--augment``; ``auto`` reads the dataset's
    name, so a given dataset is augmented under ``auto`` only when named like CIFAR)."""
    return augment_lib.enabled(cfg.augment, inp.dataset.name)


def _baseline(cfg: ReduceConfig, inp: inputs_lib.Inputs, key: jax.Array, amaps: np.ndarray):
    """The baseline's variables (given, from ``--init_checkpoint``, or trained or reused from
    the workdir), replicated over the devices, and the per-PE weights of every rate measure;
    checks the grid in the map's measure."""
    if inp.variables is not None:
        variables = inp.variables
        info = dict(steps=0, accuracy=None, reused=False, source=inp.source)
    else:
        spec = baseline_lib.BaselineSpec(
            dataset=inp.dataset_id,
            model=inp.model_id,
            width=float(cfg.model_width),
            epochs=float(cfg.baseline_epochs),
            batch_size=int(cfg.batch_size),
            optimizer=cfg.baseline_optimizer,
            learning_rate=float(cfg.baseline_learning_rate),
            weight_decay=float(cfg.baseline_weight_decay),
            schedule=cfg.baseline_schedule,
            augment=_augments(cfg, inp),
            seed=int(cfg.seed),
        )
        variables, info = baseline_lib.get_baseline(cfg.workdir, inp.model, inp.dataset, key, spec)
        info = dict(info, source=inp.source)
    # What sits on the array is the kernel with BatchNorm folded in: ``importance`` reads
    # its magnitudes (the other measures read shapes only, which folding keeps).
    folded = models.fold_batchnorm(variables)
    weights = systolic.measure_weights(folded, cfg.array_rows, cfg.array_cols)
    check_grid(systolic.grid_rates(weights, amaps)[cfg.rate_measure], cfg, cfg.rate_measure)
    return sharding.replicate(jax.tree.map(jnp.asarray, variables)), weights, info


def _context(
    cfg: ReduceConfig, inp: inputs_lib.Inputs, variables, data, base_info: dict, stuck_key
):
    """The run's engine context (``population.Context``), its policy
    (``retraining.Verification``: targets and top-ups) and its ``Baseline`` (accuracy
    measured here, on a fault-free chip of the run's hardware: in int8, the quantized
    baseline)."""
    array = (cfg.array_rows, cfg.array_cols)
    hardware = mitigation.chip_hardware(
        inp.model, variables, data.train_images, array, cfg.arithmetic, cfg.mitigation,
        stuck_key, cfg.stuck_mix(),
    )  # fmt: skip
    trainer = train.make_trainer(
        hardware,
        train.make_optimizer(cfg.optimizer, cfg.learning_rate, cfg.weight_decay),
        cfg.batch_size,
        cfg.eval_batch_size,
        augment=_augments(cfg, inp),
        chip_batching=cfg.chip_batching,
    )
    spe = train.steps_per_epoch(data.num_train, cfg.batch_size)
    one_chip = jax.tree.map(lambda x: x[None], variables)
    fault_free = trainer.chips(variables["params"], jnp.zeros((1, *array), bool))
    accuracy, test_accuracy = (
        float(trainer.evaluate(one_chip, fault_free, *data.split(s))[0]) for s in ("val", "test")
    )
    test_target = (
        cfg.target_accuracy if cfg.target_accuracy is not None else accuracy - cfg.max_accuracy_drop
    )
    decision_target = test_target + cfg.validation_margin
    logging.info(
        "baseline accuracy %.4f (validation; test %.4f), target %.4f (decisions on the "
        "validation split require %.4f), %d steps per epoch",
        accuracy,
        test_accuracy,
        test_target,
        decision_target,
        spe,
    )
    if decision_target > 1:
        logging.warning(
            "the target %.4f plus --validation_margin=%g is above 1: no chip can meet it",
            test_target,
            cfg.validation_margin,
        )
    ctx = population.Context(
        trainer=trainer,
        variables=variables,
        data=data,
        steps_per_epoch=spe,
        chips_per_batch=cfg.chips_per_batch,
    )
    policy = retraining.Verification(
        decision_target=decision_target,
        test_target=test_target,
        topup_steps=int(train.epochs_to_steps(cfg.topup_epochs, spe)),
        max_topup_steps=int(train.epochs_to_steps(cfg.max_topup_epochs, spe)),
        topup_pool_chunks=cfg.topup_pool_chunks,
    )
    base = Baseline(
        accuracy=accuracy,
        test_accuracy=test_accuracy,
        steps=base_info["steps"],
        accuracy_at_training=base_info["accuracy"],
        reused=base_info["reused"],
        source=base_info["source"],
    )
    return ctx, policy, base


def chip_fault_maps(cfg: ReduceConfig, key: jax.Array) -> np.ndarray:
    """The population's fault maps ``bool[chips, R, C]``: from the file, or sampled."""
    if cfg.chip_fault_maps is None:
        return _fault_spec(cfg, cfg.fault_model).sample(
            key, np.full(cfg.num_chips, cfg.chip_fault_rate)
        )
    logging.info(
        "chips from %s (--num_chips, --chip_fault_rate and --fault_model are not used)",
        cfg.chip_fault_maps,
    )
    return faults.load_fault_maps(cfg.chip_fault_maps, cfg.array_rows, cfg.array_cols)


def _predictor_study(cfg, ctx, policy, rmap, keys: Keys, store) -> predictor.PredictorStudy:
    """Validation chips of ``--fault_model`` with (mean) rates spread evenly over
    ``[0, max(--fault_rates)]``, retrained over the amount grid (``predictor.run_study``)."""
    rates = np.linspace(0.0, max(cfg.fault_rates), cfg.predictor_chips)
    maps = _fault_spec(cfg, cfg.fault_model).sample(keys.predictor_maps, rates)
    if cfg.chip_fault_maps is not None:
        logging.warning(
            "predictor study: validation chips are sampled from --fault_model=%s, not "
            "taken from --chip_fault_maps",
            cfg.fault_model,
        )
    return predictor.run_study(ctx, policy, maps, rates, rmap, keys.predictor_data, store)


def _chip_store(cfg: ReduceConfig, store: ProgressStore, variables):
    """The writer of every chip's retrained weights (``--save_chip_weights``), else None; its
    fingerprint is the run's progress key, so a run started again with ``--overwrite``
    starts a new store."""
    if not cfg.save_chip_weights:
        return None
    key = chip_store.fingerprint(store.state["config"])
    return chip_store.ChipStore(cfg.workdir, variables, key, bypass=cfg.mitigation == "bypass")


def _grouped(cfg, ctx, policy, maps, assignment, rmap, per_chip, key, store, sink=None):
    """Plans the groups on the map and retrains them (``grouping.run_grouped``)."""
    amount = grouping.amount_fn(rmap.measured_rates, rmap.required_steps, rmap.interpolation)
    w = rmap.weights[cfg.rate_measure]
    levels = rmap.required_steps
    plan = grouping.plan_groups(maps, assignment.ok, w, amount, levels, cfg.max_group_size)
    return grouping.run_grouped(ctx, policy, maps, plan, per_chip, rmap, key, store, sink)


class _Outcomes(NamedTuple):
    """What the run measured, for the comparison of policies."""

    analysis: resilience.Analysis
    chips: cost_lib.ChipResults
    grouped: grouping.GroupedOutcome | None
    study: predictor.PredictorStudy | None


def _compare(
    cfg, ctx, policy, maps, rates, outcomes: _Outcomes, fixed_epochs, keys: Keys, store
) -> policies.Comparison:
    """Every policy's cost and result (``policies``). With ``--compare_policies``: ``fixed``
    on ``--fixed_policy_chips`` sampled chips (paid for every chip), and ``adaptive``,
    ``adaptive_es`` and ``online`` on every chip (``rates float[n]``: the chips' rates in
    the map's measure, which the online map reads); the early stops of ``adaptive_es`` and
    ``online`` are audited against the whole split."""
    inc = policy.topup_steps
    found = {"reduce": policies.reduce_policy(outcomes.chips, inc)}
    audits = {}
    if cfg.compare_policies:
        spe = ctx.steps_per_epoch
        fixed_steps = int(train.epochs_to_steps(fixed_epochs, spe))
        cap = cfg.adaptive_max_epochs if cfg.adaptive_max_epochs is not None else fixed_epochs
        cap_steps = int(train.epochs_to_steps(cap, spe))
        target, test_target = policy.decision_target, policy.test_target
        # Every policy retrains a chip on the batches of ``keys.policies``: a chip's result
        # does not depend on the policy's other chips, nor on which sample it is in. The
        # sample and the order of the validation images have streams of their own.
        sample = policies.sample_chips(len(maps), cfg.fixed_policy_chips, keys.fixed_sample)
        fixed = policies.run_fixed(ctx, maps[sample], fixed_steps, keys.policies, store)
        found["fixed"] = policies.fixed_policy(
            fixed, fixed_steps, target, test_target, chips=len(maps)
        )
        run = lambda **kw: policies.run_adaptive(  # noqa: E731
            ctx, maps, inc, cap_steps, target, keys.policies, store, **kw
        )
        found["adaptive"] = policies.adaptive_policy(run(), test_target)
        test = sequential.make_test(
            len(ctx.data.val_labels), target, cfg.verify_slices, cfg.verify_alpha,
            keys.verify_order,
        )  # fmt: skip
        es = run(test=test, audit=True, stage="adaptive_es_policy")
        found["adaptive_es"] = policies.adaptive_policy(es, test_target)
        settings = online.OnlineSettings(
            batch=cfg.online_batch,
            quantile=cfg.online_quantile,
            confidence=cfg.online_confidence,
            min_evidence=cfg.online_min_evidence,
            margin_steps=policy.max_topup_steps,
        )
        line = online.run_online(
            ctx, maps, rates, inc, cap_steps, target, keys.policies, settings, test,
            store=store, audit=True,
        )  # fmt: skip
        found["online"] = policies.adaptive_policy(line.outcome, test_target)
        for name, out in (("adaptive_es", es), ("online", line.outcome)):
            audits[name] = (int(out.verifications.sum()), int(out.false_rejects.sum()))
    if outcomes.grouped is not None:
        found["grouped"] = policies.grouped_policy(outcomes.grouped, outcomes.chips, inc)
    if outcomes.study is not None:
        found["oracle"] = policies.oracle_policy(outcomes.study, policy.test_target)
    ordered = {name: found[name] for name in policies.POLICIES if name in found}
    compute = policies.measure_compute(
        ctx, cfg.batch_size, cfg.eval_batch_size, (cfg.array_rows, cfg.array_cols)
    )
    return policies.compare(ordered, outcomes.analysis, compute, audits)
