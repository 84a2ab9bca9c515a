"""The result of a Reduce run, and its one JSON layout (``summary.json``).

``Summary`` holds every stage's typed result. ``Summary.to_json()`` is the only place that
turns them into plain Python values: numpy to lists and scalars, ``inf`` and NaN (an
unrecoverable amount, a missing value) to ``None``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from reduce_jax.config import ReduceConfig
from reduce_jax.stages import calibration, grouping, policies, predictor, resilience
from reduce_jax.stages import cost as cost_lib


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The fault-free baseline of a run.

    Attributes:
      accuracy: validation accuracy of the baseline (the target is taken from it).
      test_accuracy: its test accuracy (reported only).
      steps: steps it was trained for (0: not trained by the tool).
      accuracy_at_training: the accuracy recorded when it was trained (None: not trained).
      reused: loaded from the run's checkpoint rather than trained.
      source: ``trained`` (by the tool, in this workdir), ``checkpoint``
        (``--init_checkpoint``) or ``given`` (``variables`` passed to ``run``).
    """

    accuracy: float
    test_accuracy: float
    steps: int
    accuracy_at_training: float | None
    reused: bool
    source: str


@dataclasses.dataclass(frozen=True)
class Summary:
    """Everything a run found (``pipeline.run``'s result).

    Attributes:
      config: the run's settings; overwrite: the run discarded saved progress.
      baseline: the fault-free baseline; test_target: the accuracy target the test set is
        judged against; decision_target: what decisions on the validation split required
        (the target plus ``--validation_margin``).
      steps_per_epoch: training steps in one epoch.
      analysis: the resilience analysis; rmap: the resilience map.
      assignment: every chip's rates and amount; chips: every chip's result.
      grouped: the grouped retraining (grouped runs; else None).
      cost: the cost accounting; predictor: the predictor study (or None).
      policies: Reduce against the fixed, adaptive, grouped and oracle policies.
      calibration: how ``auto`` chose the map's statistic and interpolation (else None).
      mapping: ``systolic.describe_mapping`` of the network on the array.
      inputs: the model and data the run computed on (``inputs.Inputs.describe``).
      timing: seconds per phase.
      warnings: what the run warns about its inputs and baseline (``inputs.baseline_warnings``).
    """

    config: ReduceConfig
    overwrite: bool
    baseline: Baseline
    test_target: float
    decision_target: float
    steps_per_epoch: int
    analysis: resilience.Analysis
    rmap: resilience.ResilienceMap
    assignment: resilience.Assignment
    chips: cost_lib.ChipResults
    grouped: grouping.GroupedOutcome | None
    cost: cost_lib.Cost
    predictor: predictor.PredictorStudy | None
    policies: policies.Comparison
    calibration: calibration.Choice | None
    mapping: list[dict]
    inputs: dict
    timing: dict[str, Any]
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        """``summary.json``: plain Python values only, ``None`` for inf and NaN."""
        cfg, rmap = self.config, self.rmap
        rates = np.asarray(cfg.fault_rates, np.float64)
        return _plain(
            dict(
                baseline_accuracy=self.baseline.accuracy,
                baseline_test_accuracy=self.baseline.test_accuracy,
                target_accuracy=float(self.test_target),
                validation_target_accuracy=float(self.decision_target),
                baseline=dict(
                    steps=self.baseline.steps,
                    steps_per_epoch=self.steps_per_epoch,
                    accuracy_at_training=self.baseline.accuracy_at_training,
                    source=self.baseline.source,
                ),
                resilience=dict(
                    fault_rates=rates,
                    measured_rates=rmap.measured_rates,
                    measured_rates_by_measure=rmap.grid_rates,
                    grid_epochs=np.asarray(cfg.retrain_epochs, np.float64),
                    retrain_epochs=self.analysis.amount_epochs,
                    retrain_steps=self.analysis.amount_steps,
                    accuracy=self.analysis.accuracy,
                    statistic=rmap.statistic,
                    statistic_accuracy=rmap.statistic_accuracy,
                    diverged=self.analysis.diverged,
                ),
                resilience_map=dict(
                    fault_rates=rates,
                    measured_rates=rmap.measured_rates,
                    required_epochs=rmap.required_epochs,
                    required_steps=_ints(rmap.required_steps),
                    rate_measure=rmap.rate_measure,
                    interpolation=rmap.interpolation,
                    calibration=self.calibration._asdict() if self.calibration else None,
                ),
                chips=self._chip_records(),
                groups=self._group_records(),
                cost=self.cost._asdict(),
                policies=self._policies(),
                predictor_study=self._predictor(),
                config=dict(cfg.as_dict(), overwrite=self.overwrite),
                timing=self.timing,
                mapping=[
                    dict(m, shape=list(m["shape"]), matrix=list(m["matrix"])) for m in self.mapping
                ],
                inputs=self.inputs,
                warnings=list(self.warnings),
            )
        )

    def headline(self) -> str:
        """The run's result in one line (logged by the run, printed by the CLI): every
        policy's cost in the comparison's one unit, the policy recommended (the cheapest for
        the run's population, Reduce's analysis included), the cheapest policy without Reduce
        and Reduce's break-even with it, and the chips meeting the target on the validation
        split and on the test set (a chip a policy does not serve never counts)."""
        c, cmp = self.cost, self.policies
        margin = (
            f" ({self.decision_target:.4f} on validation)"
            if self.decision_target != self.test_target
            else ""
        )
        pol = cmp.policies
        n = len(self.chips.status)
        unit = UNIT_WORDS[cmp.unit]
        shown = [name for name in ("reduce", "grouped", *policies.ALTERNATIVES) if name in pol]
        costs = ", ".join(
            f"Reduce {cmp.cost(pol[name]):.2f} + analysis {cmp.cost(cmp.analysis):.2f}"
            if name == "reduce"
            else f"{name} {cmp.cost(pol[name]):.2f}"
            for name in shown
        )
        if cmp.cheapest is None:
            verdict = "no other policy run (--compare_policies=false)"
        else:
            others = [a for a in policies.ALTERNATIVES if a in pol and a != cmp.cheapest]
            rest = "".join(f" (with {a}: {_chips(cmp.break_even[a])})" for a in others)
            be = cmp.break_even_vs_cheapest
            verdict = f"cheapest without Reduce: {cmp.cheapest}; " + (
                "Reduce never breaks even with it"
                if be is None
                else f"Reduce breaks even with it at {be} chips"
            )
            verdict += rest
        if cmp.recommended is not None:
            verdict = f"recommended for {n} chips: {cmp.recommended} (cheapest); " + verdict
        meeting = ", ".join(
            f"{'Reduce' if name == 'reduce' else name} {_meeting(pol[name])}" for name in shown
        )
        not_served = f"; {c.chips_unrecoverable} not served (above the grid or unrecoverable)"
        return (
            f"baseline {self.baseline.accuracy:.4f}, target {self.test_target:.4f}{margin}; "
            f"{n} chips in {unit}: {costs}; {verdict}; chips meeting the target "
            f"(validation/test): {meeting}"
            f"{not_served if c.chips_unrecoverable else ''}"
        )

    def _chip_records(self) -> list[dict]:
        ch, spe = self.chips, self.steps_per_epoch
        records = []
        for i in range(len(ch.status)):
            sel = int(ch.selected_steps[i])
            record = dict(
                chip=i,
                **{f"{m}_fault_rate": float(r[i]) for m, r in self.assignment.rates.items()},
                status=str(ch.status[i]),
                selected_epochs=sel / spe if sel >= 0 else None,
                selected_steps=sel if sel >= 0 else None,
                topup_epochs=float(ch.topup_steps[i] / spe),
                topup_steps=int(ch.topup_steps[i]),
                accuracy_before=float(ch.accuracy_before[i]),
                accuracy_after=float(ch.accuracy_after[i]),
                meets_target=bool(ch.meets_target[i]),
                test_accuracy_after=float(ch.test_accuracy_after[i]),
                meets_target_test=bool(ch.meets_target_test[i]),
            )
            if ch.group is not None:
                group = int(ch.group[i])
                record.update(
                    group=group if group >= 0 else None,
                    grouped_accuracy_after=float(ch.grouped_accuracy_after[i]),
                    grouped_meets_target=bool(ch.grouped_meets_target[i]),
                )
            records.append(record)
        return records

    def _group_records(self) -> list[dict] | None:
        if self.grouped is None:
            return None
        g, spe = self.grouped, self.steps_per_epoch
        t = g.retrainings
        records = []
        for u in range(len(t.steps)):
            valid = t.members[u] >= 0
            records.append(
                dict(
                    group=u,
                    members=t.members[u][valid],
                    fused_pe_rate=float(g.fused_pe_rate[u]),
                    fused_rate=float(g.fused_rate[u]),
                    amount_epochs=t.steps[u] / spe,
                    amount_steps=int(t.steps[u]),
                    topup_epochs=t.topup_steps[u] / spe,
                    topup_steps=int(t.topup_steps[u]),
                    accuracy_before=float(t.accuracy_before[u]),
                    accuracy_after=float(t.accuracy_after[u]),
                    member_accuracy=t.member_accuracy[u][valid],
                    diverged=bool(t.diverged[u]),
                    meets_target=bool(t.meets_target[u]),
                    split=bool(g.split[u]),
                    split_from=int(g.split_from[u]) if g.split_from[u] >= 0 else None,
                )
            )
        return records

    def _policies(self) -> dict:
        c = self.policies
        compute, spe = c.compute, self.steps_per_epoch

        def entry(p: policies.Policy) -> dict:
            return dict(
                chips=p.chips,
                train_epochs=p.train_steps / spe,
                train_steps=p.train_steps,
                eval_passes=p.eval_passes,
                compute_epochs=compute.epochs(p.train_steps, p.eval_passes),
                flops=compute.flops(p.train_steps, p.eval_passes),
                chips_measured=p.measured_chips,
                sampled=p.sampled_chips is not None,
                chips_meeting_target=p.chips_meeting_target,
                chips_meeting_target_test=p.chips_meeting_target_test,
                rounds_mean=p.rounds_mean,
                rounds_max=p.rounds_max,
            )

        regions = policies.where_each_wins(c)
        return dict(
            **{name: entry(p) for name, p in c.policies.items()},
            analysis=entry(c.analysis),
            unit=c.unit,
            cheapest_alternative=c.cheapest,
            break_even_vs_cheapest=c.break_even_vs_cheapest,
            **{f"break_even_vs_{name}": c.break_even.get(name) for name in policies.ALTERNATIVES},
            recommended=c.recommended,
            step_flops=compute.step_flops,
            eval_pass_flops=compute.eval_flops,
            early_stop_audit={
                name: dict(
                    verifications=v,
                    false_rejects=f,
                    same_decision=1.0 - f / v if v else None,
                )
                for name, (v, f) in c.audits.items()
            },
            where_each_wins=dict(
                eval_pass_epochs=regions.eval_epochs,
                chips=regions.chips,
                cheapest=regions.cheapest,
                measured_eval_pass_epochs=regions.measured_eval_epochs,
            ),
        )

    def _predictor(self) -> dict | None:
        p = self.predictor
        if p is None:
            return None
        amounts = np.asarray(self.config.retrain_epochs, np.float64)
        return dict(
            chips=len(p.requested_rates),
            fault_model=self.config.fault_model,
            requested_rates=p.requested_rates,
            needed_epochs=p.needed_steps / self.steps_per_epoch,
            accuracy=p.analysis.accuracy[:, :, 0],
            diverged=p.analysis.diverged[:, 0],
            epochs=float(len(p.requested_rates) * amounts.max()),
            **p.scores,
        )


UNIT_WORDS = dict(
    compute_epochs="compute epochs (training + evaluation)",
    train_epochs="training epochs (no flop count for evaluation)",
)


def _chips(break_even: int | None) -> str:
    """A break-even population in words."""
    return "never" if break_even is None else f"at {break_even} chips"


def _meeting(p: policies.Policy) -> str:
    """``validation/test of chips``, ``of m sampled`` for a sample."""
    test = "-" if p.chips_meeting_target_test is None else p.chips_meeting_target_test
    of = f"{p.sampled_chips} sampled" if p.sampled_chips is not None else str(p.chips)
    return f"{p.chips_meeting_target}/{test} of {of}"


def _ints(x: np.ndarray) -> list[int | None]:
    """Whole numbers held as floats (``inf`` for none) as ints and ``None``."""
    return [int(v) if math.isfinite(v) else None for v in np.asarray(x, np.float64).tolist()]


def _plain(obj):
    """``obj`` as plain Python values: numpy arrays to lists, numpy scalars to Python
    scalars, non-finite floats to ``None``; dicts, lists and tuples recursively."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
