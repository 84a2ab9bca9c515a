"""Outputs of a run: ``summary.json``, ``resilience.csv``, ``chips.csv`` and the plots
(``reduce_jax.plots``), plus ``groups.csv`` for grouped runs and ``predictor.csv`` when the
run has a predictor study.

Every file is written atomically (to a temporary name in the same directory, flushed and
fsynced, then ``os.replace``d), so an interrupted run never leaves a truncated output and a
repeated run never destroys the previous one before the new one is complete.

The ``summary`` dict holds plain Python values only; ``None`` marks an unrecoverable or
missing value (callers convert ``inf`` to ``None``). NaN and infinities are rejected.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import matplotlib.pyplot as plt

from reduce_jax import plots

DPI = 120


def _check_finite(obj, path: str = "$") -> None:
    """Raises ``ValueError`` naming the key path of the first NaN or infinite float."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite value {obj!r} at {path}; convert inf to None first")
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_finite(value, f"{path}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_finite(value, f"{path}[{i}]")


def _replace_atomic(path: str, write, binary: bool = False, tmp_suffix: str = ".tmp") -> None:
    """Calls ``write(file)`` on ``path + tmp_suffix``, fsyncs, then renames onto ``path``."""
    tmp = path + tmp_suffix
    kwargs = {} if binary else {"encoding": "utf-8", "newline": ""}
    try:
        with open(tmp, "wb" if binary else "w", **kwargs) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    """Writes ``obj`` as JSON (``indent=1``) to ``path`` atomically.

    Args:
      path: destination file.
      obj: JSON-serialisable plain Python values, with no NaN or infinity.

    Raises:
      ValueError: a float is NaN or infinite (the message names its key path, e.g.
        ``$.resilience.accuracy[0][1][2]``). ``path`` is left untouched.
      TypeError: ``obj`` is not serialisable. ``path`` is left untouched.
    """
    _check_finite(obj)
    # Serialise fully before touching the disk, so a failure leaves no temporary file.
    text = json.dumps(obj, indent=1, allow_nan=False)
    _replace_atomic(path, lambda f: f.write(text + "\n"))


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    _replace_atomic(path, lambda f: f.write(text))


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


def write_csv_atomic(path: str, rows: list[dict]) -> None:
    """Writes ``rows`` as CSV atomically; the header is the first row's keys, ``None`` -> ``""``.

    An empty ``rows`` writes an empty file.
    """
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)  # DictWriter writes None as an empty cell.
    write_text_atomic(path, buf.getvalue())


def _save_png(fig, path: str) -> None:
    """Saves ``fig`` as PNG atomically (the temporary name keeps the .png suffix); closes it."""
    try:
        _replace_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI), True, ".tmp.png")
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
    write_json_atomic(paths[0], summary if chips_in_json else dict(summary, chips=None))
    write_csv_atomic(paths[1], resilience_rows(summary))
    write_csv_atomic(paths[2], chip_rows(summary))
    if summary.get("groups") is not None:
        paths.append(os.path.join(workdir, "groups.csv"))
        write_csv_atomic(paths[-1], group_rows(summary))
    if summary.get("predictor_study"):
        paths.append(os.path.join(workdir, "predictor.csv"))
        write_csv_atomic(paths[-1], predictor_rows(summary))
    for name, fig in plots.figures(summary):
        paths.append(os.path.join(workdir, name))
        _save_png(fig, paths[-1])
    return paths
