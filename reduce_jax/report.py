"""Outputs of a run: ``summary.json``, ``resilience.csv``, ``chips.csv`` and PNG plots, plus
``groups.csv`` and ``cost_grouping.png`` for grouped runs and ``predictor.png`` (and
``predictor.csv``) when the run has a predictor study.

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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 120
PLOT_NAMES = (
    "accuracy_vs_fault_rate.png",
    "required_epochs.png",
    "chip_epochs_histogram.png",
    "cost.png",
)
GROUPING_PLOT = "cost_grouping.png"
PREDICTOR_PLOT = "predictor.png"


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


def _save(fig, path: str) -> None:
    """Saves ``fig`` as PNG atomically (the temporary name keeps the .png suffix) and closes it."""
    try:
        _replace_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI), True, ".tmp.png")
    finally:
        plt.close(fig)


def _floats(values) -> np.ndarray:
    """``float64`` array with ``None`` -> NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _plot_accuracy(summary: dict, ax) -> None:
    res = summary["resilience"]
    rates = _floats(res["fault_rates"])
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(res["retrain_epochs"]), 1)))
    for j, epochs in enumerate(res["retrain_epochs"]):
        stat = _floats(row[j] for row in res["statistic_accuracy"])
        samples = np.array([_floats(row[j]) for row in res["accuracy"]])  # [F, K]
        ax.plot(rates, stat, "o-", color=colors[j], ms=4, label=f"{epochs:g} epochs")
        ax.fill_between(
            rates, np.nanmin(samples, 1), np.nanmax(samples, 1), color=colors[j], alpha=0.15, lw=0
        )
    ax.axhline(summary["target_accuracy"], color="k", ls="--", lw=1, label="target")
    ax.axhline(summary["baseline_accuracy"], color="k", ls=":", lw=1, label="baseline")
    ax.set(
        xlabel="fault rate",
        ylabel=f"test accuracy ({res['statistic']} over samples)",
        title="Accuracy after retraining (band: min..max over samples)",
    )
    ax.legend(fontsize=8, loc="best")


def _plot_required(summary: dict, ax) -> None:
    rmap = summary["resilience_map"]
    # The map is interpolated at the measured rates of the analysis maps (same measure as
    # the chips' rates), so that is where its points are drawn.
    rates = _floats(rmap.get("measured_rates", rmap["fault_rates"]))
    required = _floats(rmap["required_epochs"])
    measure = rmap.get("rate_measure", "pe")
    chips = [c for c in summary["chips"] if c.get("selected_epochs") is not None]
    chip_x = _floats(c[f"{measure}_fault_rate"] for c in chips)
    chip_y = _floats(c["selected_epochs"] for c in chips)
    finite = np.concatenate([required[np.isfinite(required)], chip_y, [1.0]])
    top = 1.1 * float(np.nanmax(finite))
    ax.plot(rates, required, "o-", color="C0", label="required (resilience map)")
    if len(chips):
        ax.scatter(chip_x, chip_y, s=16, alpha=0.4, color="C1", label="chips (selected)")
    bad = ~np.isfinite(required)
    if bad.any():
        ax.plot(
            rates[bad],
            np.full(bad.sum(), top),
            "x",
            color="red",
            ms=9,
            mew=2,
            label="unrecoverable",
            clip_on=False,
        )
    ax.set_ylim(-0.03 * top, top * 1.04)
    ax.set(
        xlabel=f"fault rate ({measure})",
        ylabel="retraining epochs",
        title="Required retraining vs fault rate",
    )
    ax.legend(fontsize=8, loc="upper left")


def _plot_histogram(summary: dict, ax) -> None:
    chips = summary["chips"]
    totals = _floats(
        c["selected_epochs"] + (c.get("topup_epochs") or 0.0)
        for c in chips
        if c.get("selected_epochs") is not None
    )
    values, counts = np.unique(totals, return_counts=True)
    if 0 < len(values) <= 20:  # Amounts come from a small grid: one bar per distinct amount.
        width = 0.8 * (np.diff(values).min() if len(values) > 1 else 1.0)
        ax.bar(values, counts, width=width, color="C0", alpha=0.8, label="chips")
    elif len(values):
        ax.hist(totals, bins=20, color="C0", alpha=0.8, label="chips")
    fixed = summary["cost"]["fixed_epochs_per_chip"]
    ax.axvline(fixed, color="k", ls="--", lw=1.2, label=f"fixed policy ({fixed:g} epochs)")
    ax.plot([], [], " ", label=f"unrecoverable: {len(chips) - totals.size} of {len(chips)} chips")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="per-chip epochs (selected + top-up)", ylabel="chips")
    ax.set_title("Per-chip retraining amount")
    ax.legend(fontsize=8, loc="best")


def _plot_cost(summary: dict, ax) -> None:
    """Cumulative cost for n = 0..N chips, extended to show the break-even point if beyond N."""
    cost, n_chips = summary["cost"], len(summary["chips"])
    be = cost.get("break_even_chips")
    n_max = max(n_chips, 1, int(np.ceil(1.25 * be)) if be is not None else 0)
    n = np.linspace(0, n_max, 200)
    # reduce_epochs: the population's per-chip amounts plus top-ups, without the analysis.
    per_chip = cost["reduce_epochs"] / n_chips if n_chips else 0.0
    analysis, fixed = cost["analysis_epochs"], cost["fixed_epochs_per_chip"]
    reduce_label = f"Reduce (analysis {analysis:g} + {per_chip:.3g}/chip)"
    ax.plot(n, analysis + n * per_chip, "-", color="C0", lw=2, label=reduce_label)
    ax.plot(n, n * fixed, "--", color="C3", lw=2, label=f"fixed ({fixed:g}/chip)")
    if n_max > n_chips:
        ax.axvline(
            n_chips, color="k", ls="-", lw=0.8, alpha=0.5, label=f"this run: {n_chips} chips"
        )
    if be is not None:
        ax.plot([be], [analysis + be * per_chip], "o", color="k", ms=6, label=f"break-even: {be}")
    ax.set(xlabel="number of chips", ylabel="cumulative retraining cost (epochs)")
    ax.set_title("Retraining cost: Reduce vs fixed")
    ax.set_xlim(0, n_max)
    ax.legend(fontsize=8, loc="upper left")


def _plot_grouping(summary: dict, fig) -> None:
    """The three costs of the population (fixed, per-chip Reduce, grouped Reduce), and the
    two Reduce costs split into selected amounts and top-ups."""
    cost = summary["cost"]
    left, right = fig.subplots(1, 2)
    names = ["fixed", "Reduce\nper chip", "Reduce\ngrouped"]
    totals = [cost["fixed_epochs"], cost["reduce_epochs"], cost["grouped_epochs"]]
    bars = left.bar(names, totals, color=["C3", "C0", "C2"], alpha=0.85)
    for bar, v in zip(bars, totals, strict=True):
        left.annotate(
            f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8
        )
    if min(totals) > 0:
        left.set_yscale("log")
    left.set(ylabel="retraining epochs, whole population (log)")
    left.set_title(
        f"{len(summary['chips'])} chips, {cost['groups']} groups ({cost['groups_split']} split)",
        fontsize=9,
    )
    planned = [cost["reduce_planned_epochs"], cost["grouped_planned_epochs"]]
    topups = [
        cost["reduce_epochs"] - cost["reduce_planned_epochs"],
        cost["grouped_epochs"] - cost["grouped_planned_epochs"],
    ]
    right.bar(names[1:], planned, color=["C0", "C2"], alpha=0.85, label="selected amounts")
    right.bar(names[1:], topups, bottom=planned, color="0.6", alpha=0.85, label="top-ups")
    right.set(ylabel="epochs")
    right.set_title(
        f"chips meeting the target: {cost['chips_meeting_target']} per chip, "
        f"{cost['grouped_chips_meeting_target']} grouped",
        fontsize=9,
    )
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")


def _plot_predictor(summary: dict, fig) -> None:
    """Per measure: validation chips' rate against the retraining they really needed."""
    study = summary["predictor_study"]
    measures = study["measures"]
    needed = np.array([np.nan if x is None else x for x in study["needed_epochs"]])
    top = np.nanmax(needed) if np.isfinite(needed).any() else 1.0
    shown = np.where(np.isnan(needed), 1.15 * top + 0.1, needed)
    axes = fig.subplots(1, len(measures), sharey=True, squeeze=False)[0]
    for ax, (name, v) in zip(axes, measures.items(), strict=True):
        rates = np.asarray(v["rates"])
        ax.scatter(rates[~np.isnan(needed)], shown[~np.isnan(needed)], s=18, color="C0")
        ax.scatter(
            rates[np.isnan(needed)],
            shown[np.isnan(needed)],
            s=18,
            marker="x",
            color="C3",
            label="unrecoverable within the grid",
        )
        rho = v.get("spearman_rate")
        ax.set_title(
            f"{name}: rank corr. {rho:.2f}\nunder {v['under']}, over {v['over']}"
            if rho is not None
            else f"{name}\n(skipped: grid not increasing)"
            if "skipped" in v
            else name,
            fontsize=9,
        )
        ax.set_xlabel(f"{name} fault rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("needed retraining (epochs)")
    axes[0].legend(fontsize=7, loc="upper left")


def plot_all(summary: dict, workdir: str) -> list[str]:
    """Writes the plots (``PLOT_NAMES``, then ``GROUPING_PLOT`` for grouped runs and
    ``PREDICTOR_PLOT`` with a predictor study) into ``workdir``; returns their paths."""
    paths = []
    for name, draw in zip(
        PLOT_NAMES, (_plot_accuracy, _plot_required, _plot_histogram, _plot_cost), strict=True
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        draw(summary, ax)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(workdir, name)
        _save(fig, path)
        paths.append(path)
    if summary["cost"].get("grouped_epochs") is not None:
        fig = plt.figure(figsize=(9.6, 4.4))
        _plot_grouping(summary, fig)
        fig.tight_layout()
        paths.append(os.path.join(workdir, GROUPING_PLOT))
        _save(fig, paths[-1])
    if summary.get("predictor_study"):
        fig = plt.figure(figsize=(4 * len(summary["predictor_study"]["measures"]), 4.0))
        _plot_predictor(summary, fig)
        fig.tight_layout()
        paths.append(os.path.join(workdir, PREDICTOR_PLOT))
        _save(fig, paths[-1])
    return paths


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
    return paths + plot_all(summary, workdir)
