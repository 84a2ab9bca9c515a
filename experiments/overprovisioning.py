"""How much Reduce over-provisions, per way of building and reading the map, from one run.

  python -m experiments.overprovisioning --summary=runs/default/summary.json

Reads a finished run with a predictor study and, for every statistic x interpolation, on the
run's dense amount axis and on the grid's amounts alone, rebuilds the resilience map from the
run's analysis and prints what it would select for the study's chips: Reduce's amounts plus
the top-ups each chip would need (from its own accuracy curve) over the oracle's (the least
evaluated amount that met the target), the chips it under-provisions (selected below the
need) and misses (still below the target after the top-up cap), and those it flags though
an amount served them. Nothing is retrained: the curves are the run's.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
from absl import app, flags

from reduce_jax.engine import train
from reduce_jax.stages import calibration, predictor, resilience, retraining

SUMMARY = flags.DEFINE_string("summary", None, "summary.json of a run with --predictor_chips.")


def _floats(x) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in x], np.float64)


def rows(summary: dict) -> list[dict]:
    """One row per axis (dense, grid) x statistic x interpolation."""
    res, study, cfg = summary["resilience"], summary["predictor_study"], summary["config"]
    spe = summary["baseline"]["steps_per_epoch"]
    measure = summary["resilience_map"]["rate_measure"]
    epochs = np.asarray(res["retrain_epochs"], np.float64)
    steps = np.asarray(res["retrain_steps"], np.int64)
    analysis_acc = np.asarray(res["accuracy"], np.float64)  # [F, A, K]
    chips_acc = _floats(study["accuracy"])  # [n, A]
    grid_rates = np.asarray(res["measured_rates_by_measure"][measure], np.float64)
    chip_rates = np.asarray(study["measures"][measure]["rates"], np.float64)
    policy = retraining.Verification(
        # What the run's decisions required (the target plus any --validation_margin).
        decision_target=summary.get("validation_target_accuracy", summary["target_accuracy"]),
        test_target=summary["target_accuracy"],
        topup_steps=int(train.epochs_to_steps(cfg["topup_epochs"], spe)),
        max_topup_steps=int(train.epochs_to_steps(cfg["max_topup_epochs"], spe)),
    )
    grid = np.isin(epochs, np.asarray(res.get("grid_epochs", epochs)))
    out = []
    for axis, keep in (("dense", np.ones_like(grid)), ("grid", grid)):
        a = resilience.Analysis(analysis_acc[:, keep], None, epochs[keep], steps[keep])
        curves = chips_acc[:, keep]
        needed = predictor.needed_steps(curves, steps[keep], policy.decision_target)
        for stat in calibration.STATISTICS:
            required, _ = resilience.required_amounts(
                a.accuracy, steps[keep].astype(np.float64), policy.decision_target, stat
            )
            for interp in resilience.INTERPOLATIONS:
                selected, _ = resilience.retraining_amount(grid_rates, required, chip_rates, interp)
                selected = np.asarray(selected, np.float64)
                chips = resilience.Analysis(curves[:, :, None], None, epochs[keep], steps[keep])
                r = predictor.reduce_vs_oracle(policy, spe, chips, selected, needed)
                both = np.isfinite(selected) & np.isfinite(needed)
                out.append(
                    dict(
                        axis=axis,
                        statistic=stat,
                        interpolation=interp,
                        reduce_over_oracle=r["reduce_over_oracle"],
                        reduce_epochs=r["reduce_epochs"],
                        oracle_epochs=r["oracle_epochs"],
                        under=int(np.sum(both & (selected < needed))),
                        missed=r["reduce_missed"],
                        flagged=r["reduce_flagged"],
                    )
                )
    return out


def main(argv: list[str]) -> int:
    if len(argv) > 1 or not SUMMARY.value:
        print("usage: python -m experiments.overprovisioning --summary=FILE", file=sys.stderr)
        return 2
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no platform probing
    with open(SUMMARY.value) as f:
        summary = json.load(f)
    if not summary.get("predictor_study"):
        print(f"error: {SUMMARY.value} has no predictor study (--predictor_chips)", file=sys.stderr)
        return 2
    print(
        "| axis | statistic | interpolation | Reduce / oracle | Reduce epochs | oracle epochs "
        "| under | missed | flagged |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows(summary):
        ratio = "-" if r["reduce_over_oracle"] is None else f"{r['reduce_over_oracle']:.2f}"
        print(
            f"| {r['axis']} | {r['statistic']} | {r['interpolation']} | {ratio} | "
            f"{r['reduce_epochs']:.2f} | {r['oracle_epochs']:.2f} | {r['under']} | "
            f"{r['missed']} | {r['flagged']} |"
        )
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
