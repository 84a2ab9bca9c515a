"""Outputs of a run: ``summary.json``, ``resilience.csv``, ``chips.csv`` and the plots
(``reduce_jax.outputs.plots``), plus ``groups.csv`` for grouped runs and ``predictor.csv`` when the
run has a predictor study.

Every file is written atomically (to a temporary name in the same directory, flushed and
fsynced, then ``os.replace``d), so an interrupted run never leaves a truncated output and a
repeated run never destroys the previous one before the new one is complete.

The ``summary`` dict holds plain Python values only; ``None`` marks an unrecoverable or
missing value (callers convert ``inf`` to ``None``). NaN and infinities are rejected.
"""

from __future__ import annotations

import os

import matplotlib.pyplot as plt

from reduce_jax import files
from reduce_jax.outputs import plots

DPI = 120


def resilience_rows(summary: dict) -> list[dict]:
    """One row per (fault rate, retraining amount, sample) of the resilience analysis.

    Keys: ``fault_rate, measured_rate, retrain_epochs, retrain_steps, sample, accuracy``.
    """
    res = summary["resilience"]
    rows = []
    for i, rate in enumerate(res["fault_rates"]):
        for j, epochs in enumerate(res["retrain_epochs"]):
            for k, acc in enumerate(res["accuracy"][i][j]):
                rows.append(
                    {
                        "fault_rate": rate,
                        "measured_rate": res["measured_rates"][i],
                        "retrain_epochs": epochs,
                        "retrain_steps": res["retrain_steps"][j],
                        "sample": k,
                        "accuracy": acc,
                    }
                )
    return rows


def chip_rows(summary: dict) -> list[dict]:
    """One row per chip: the keys of each ``summary["chips"][i]``, in order."""
    return [dict(chip) for chip in summary["chips"]]


def group_rows(summary: dict) -> list[dict]:
    """One row per group of a grouped run (members space-separated)."""
    rows = []
    for g in summary.get("groups") or []:
        row = {k: v for k, v in g.items() if k not in ("members", "member_accuracy")}
        row["members"] = " ".join(str(m) for m in g["members"])
        row["size"] = len(g["members"])
        row["min_member_accuracy"] = min(g["member_accuracy"])
        rows.append(row)
    return rows


def predictor_rows(summary: dict) -> list[dict]:
    """One row per validation chip of the predictor study: its rate and predicted amount in
    every measure, and the amount it really needed."""
    study = summary["predictor_study"]
    rows = []
    for i, needed in enumerate(study["needed_epochs"]):
        row = {"chip": i, "requested_rate": study["requested_rates"][i], "needed_epochs": needed}
        for m, v in study["measures"].items():
            row[f"{m}_rate"] = v["rates"][i]
            row[f"{m}_predicted_epochs"] = (v.get("predicted_epochs") or [None] * (i + 1))[i]
        rows.append(row)
    return rows


def _save_png(fig, path: str) -> None:
    """Saves ``fig`` as PNG atomically (the temporary name keeps the .png suffix); closes it."""
    try:
        files.replace_atomic(
            path, lambda f: fig.savefig(f, format="png", dpi=DPI), True, ".tmp.png"
        )
    finally:
        plt.close(fig)


def write_outputs(summary: dict, workdir: str, chips_in_json: bool = True) -> list[str]:
    """Writes ``summary.json``, ``resilience.csv``, ``chips.csv`` and the plots to ``workdir``.

    The JSON is written (and validated) first, so a summary with NaN/inf fails before any
    other output is replaced. Without ``chips_in_json`` its ``chips`` is ``null`` (the
    entries grow with the population; ``chips.csv`` holds them).

    Returns:
      The written paths, in that order.
    """
    os.makedirs(workdir, exist_ok=True)
    paths = [os.path.join(workdir, n) for n in ("summary.json", "resilience.csv", "chips.csv")]
    files.write_json_atomic(paths[0], summary if chips_in_json else dict(summary, chips=None))
    files.write_csv_atomic(paths[1], resilience_rows(summary))
    files.write_csv_atomic(paths[2], chip_rows(summary))
    if summary.get("groups") is not None:
        paths.append(os.path.join(workdir, "groups.csv"))
        files.write_csv_atomic(paths[-1], group_rows(summary))
    if summary.get("predictor_study"):
        paths.append(os.path.join(workdir, "predictor.csv"))
        files.write_csv_atomic(paths[-1], predictor_rows(summary))
    for name, fig in plots.figures(summary):
        paths.append(os.path.join(workdir, name))
        _save_png(fig, paths[-1])
    return paths
