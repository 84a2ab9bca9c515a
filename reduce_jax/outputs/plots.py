"""The plots of a run, drawn from its ``summary.json`` dict (``None`` marks a missing value).

* ``accuracy_vs_fault_rate.png``: the analysis, one line per grid amount, zoomed to the
  decision band around the target, with the full range beside it;
* ``required_epochs.png``: the resilience map and every chip's selected amount;
* ``chip_epochs_histogram.png``: per-chip amounts against the fixed policy;
* ``cost.png``: cumulative cost of Reduce (with its analysis) and of the policies without it
  that the run measured, with Reduce's break-even with the cheapest of them;
* ``chip_accuracy.png``: every chip's accuracy before and after at its fault rate, against
  the target;
* ``policies.png``: cost of every policy (training and evaluation) and its chips that meet
  the target on validation and test; cumulative cost over the population size;
* ``policy_regions.png``: which policy costs least, over the cost of an evaluation pass and
  the population (``summary["policies"]["where_each_wins"]``), with the run's own marked;

Every cost is in the comparison's one unit (``summary["policies"]["unit"]``: compute epochs,
evaluation included), the unit of the headline's break-even too.
* ``cost_grouping.png`` (grouped runs) and ``predictor.png`` (with a predictor study).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

DPI = 120
PLOT_NAMES = (
    "accuracy_vs_fault_rate.png",
    "required_epochs.png",
    "chip_epochs_histogram.png",
    "cost.png",
    "chip_accuracy.png",
    "policies.png",
    "policy_regions.png",
)
GROUPING_PLOT = "cost_grouping.png"
PREDICTOR_PLOT = "predictor.png"


def _floats(values) -> np.ndarray:
    """``float64`` array with ``None`` -> NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _epochs(x: float) -> str:
    return f"{x:g} epoch" + ("" if x == 1 else "s")


def _validation_target(summary: dict) -> float:
    """What decisions on the validation split required (the target plus the margin)."""
    return summary.get("validation_target_accuracy", summary["target_accuracy"])


def _target_lines(ax, summary: dict) -> None:
    """The target, and with ``--validation_margin`` what the validation split required."""
    target, required = summary["target_accuracy"], _validation_target(summary)
    ax.axhline(target, color="k", ls="--", lw=1, label="target")
    if required != target:
        ax.axhline(required, color="0.4", ls="-.", lw=1, label="target + validation margin")


def _plot_accuracy(summary: dict, fig) -> None:
    """The analysis: zoomed to the band where decisions are taken (target +- a few points),
    and over its full range."""
    res = summary["resilience"]
    rates = _floats(res["fault_rates"])
    # One line per amount of the grid (the axis may be denser: --eval_every).
    grid = set(res.get("grid_epochs", res["retrain_epochs"]))
    shown = [j for j, e in enumerate(res["retrain_epochs"]) if e in grid]
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(shown), 1)))
    target, base = _validation_target(summary), summary["baseline_accuracy"]
    zoom, full = fig.subplots(1, 2)
    for ax in (zoom, full):
        for c, j in enumerate(shown):
            stat = _floats(row[j] for row in res["statistic_accuracy"])
            samples = np.array([_floats(row[j]) for row in res["accuracy"]])  # [F, K]
            label = _epochs(res["retrain_epochs"][j])
            ax.plot(rates, stat, "o-", color=colors[c], ms=4, label=label)
            low, high = np.nanmin(samples, 1), np.nanmax(samples, 1)
            ax.fill_between(rates, low, high, color=colors[c], alpha=0.15, lw=0)
        _target_lines(ax, summary)
        ax.axhline(base, color="k", ls=":", lw=1, label="baseline")
        ax.set_xlabel("fault rate")
        ax.grid(alpha=0.3)
    zoom.set_ylim(summary["target_accuracy"] - 0.04, min(1.0, max(base, target) + 0.01))
    zoom.set_ylabel(f"validation accuracy ({res['statistic']} over samples)")
    zoom.set_title("Decision band (band: min..max over samples)", fontsize=9)
    full.set_title("Full range", fontsize=9)
    # One legend for both panels, outside them to the right, where it hides neither.
    fig.set_layout_engine("constrained")
    handles, labels = full.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside right center")


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


def _unit(pol: dict) -> str:
    """The axis label of the comparison's unit."""
    if pol.get("unit") == "train_epochs":
        return "training epochs (no flop count for evaluation)"
    return "compute epochs (training + evaluation)"


def _policy_cost(pol: dict, name: str) -> float:
    """A policy's cost in the comparison's unit (``summary["policies"]["unit"]``)."""
    p = pol[name]
    if pol.get("unit") == "train_epochs" or p["compute_epochs"] is None:
        return p["train_epochs"]
    return p["compute_epochs"]


def _cumulative(summary: dict, ax, names: list[str], break_even: int | None, label: str):
    """Cumulative cost over the population size of ``names`` (Reduce with its analysis),
    with Reduce's break-even with the cheapest policy without it marked; the x-axis reaches
    past the break-even, and the y-axis shows Reduce and the cheapest policy in full (a
    dearer policy may leave through the top)."""
    pol = summary["policies"]
    n_chips = max(pol["reduce"]["chips"], 1)
    evens = [b for b in (pol.get(f"break_even_vs_{a}") for a in _ALTERNATIVES) if b]
    n_max = max([n_chips] + [int(np.ceil(1.25 * b)) for b in evens])
    n = np.linspace(0, n_max, 200)
    analysis = _policy_cost(pol, "analysis")
    focus = []
    for name in names:
        per = _policy_cost(pol, name) / max(pol[name]["chips"], 1)
        one_off = analysis if name in ("reduce", "grouped") else 0.0
        text = f"{name} ({per:.3g}/chip)" + (f" + analysis {analysis:.4g}" if one_off else "")
        ax.plot(n, one_off + n * per, color=_POLICY_COLORS[name], lw=2, label=text)
        if name in ("reduce", pol.get("cheapest_alternative")):
            focus.append(one_off + n_max * per)
    ax.set_ylim(0, 1.3 * max(focus + [1e-9]))
    if n_max > n_chips:
        ax.axvline(n_chips, color="k", lw=0.8, alpha=0.5, label=f"this run: {n_chips} chips")
    if break_even is not None:
        per = _policy_cost(pol, "reduce") / n_chips
        ax.plot([break_even], [analysis + break_even * per], "o", color="k", ms=6, label=label)
    else:
        ax.plot([], [], " ", label=label)
    ax.set(xlabel="number of chips", ylabel=f"cumulative cost, {_unit(pol)}")
    ax.set_xlim(0, n_max)
    ax.legend(fontsize=7, loc="upper left")


def _plot_cost(summary: dict, ax) -> None:
    """Cumulative cost of Reduce (with its analysis) and of every policy without it that the
    run measured, in the comparison's one unit; Reduce's break-even with the cheapest."""
    pol = summary.get("policies")
    if not pol:
        ax.set_title("Cost: no policies in this summary", fontsize=10)
        return
    cheapest = pol.get("cheapest_alternative")
    names = ["reduce"] + [a for a in _ALTERNATIVES if pol.get(a)]
    if cheapest is None:
        _cumulative(summary, ax, names, None, "no other policy run")
        ax.set_title("Cost of Reduce (no other policy run)", fontsize=10)
        return
    be = pol.get("break_even_vs_cheapest")
    label = f"break-even with {cheapest}: " + ("never" if be is None else f"{be} chips")
    _cumulative(summary, ax, names, be, label)
    ax.set_title(f"Reduce vs {cheapest} (the cheapest policy without Reduce)", fontsize=10)


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
    """Per measure: validation chips' rate against the retraining they really needed, and
    what the map predicted for them; the x-axis spans the grid's rates."""
    study = summary["predictor_study"]
    measures = study["measures"]
    needed = _floats(study["needed_epochs"])
    top = np.nanmax(needed) if np.isfinite(needed).any() else 1.0
    shown = np.where(np.isnan(needed), 1.15 * top + 0.1, needed)
    axes = fig.subplots(1, len(measures), sharey=True, squeeze=False)[0]
    grid = summary["resilience"].get("measured_rates_by_measure", {})
    for ax, (name, v) in zip(axes, measures.items(), strict=True):
        rates = np.asarray(v["rates"])
        ok = ~np.isnan(needed)
        ax.scatter(rates[ok], shown[ok], s=18, color="C0", label="needed")
        ax.scatter(rates[~ok], shown[~ok], s=18, marker="x", color="C3", label="unrecoverable")
        if v.get("predicted_epochs"):
            predicted = _floats(v["predicted_epochs"])
            ax.scatter(
                rates, predicted, s=22, facecolors="none", edgecolors="C1", label="predicted"
            )
        if name in grid and len(grid[name]):
            hi = float(np.nanmax(_floats(grid[name])))
            ax.set_xlim(-0.02 * hi, 1.05 * hi)
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
    axes[0].set_ylabel("retraining (epochs)")
    axes[0].legend(fontsize=7, loc="upper left")


def _plot_chip_accuracy(summary: dict, ax) -> None:
    """Every chip's validation accuracy before and after retraining (and on the test set),
    at its fault rate, against the target; chips Reduce does not serve are marked."""
    chips = summary["chips"]
    measure = summary["resilience_map"].get("rate_measure", "pe")
    x = _floats(c[f"{measure}_fault_rate"] for c in chips)
    get = lambda key: _floats(c.get(key) for c in chips)  # noqa: E731
    before, after = get("accuracy_before"), get("accuracy_after")
    served = np.array([c.get("selected_epochs") is not None for c in chips], bool)
    ax.vlines(x[served], before[served], after[served], color="0.7", lw=1)
    ax.plot(x, before, "v", color="C3", ms=4, ls="none", label="before (validation)")
    ax.plot(x[served], after[served], "^", color="C0", ms=4, ls="none", label="after (validation)")
    if all("test_accuracy_after" in c for c in chips):
        test = get("test_accuracy_after")
        ax.plot(x[served], test[served], ".", color="C2", ms=4, ls="none", label="after (test)")
    if (~served).any():
        ax.plot(
            x[~served], before[~served], "x", color="k", ms=6, ls="none",
            label=f"not served ({int((~served).sum())}: above the grid or unrecoverable)",
        )  # fmt: skip
    _target_lines(ax, summary)
    ax.set(xlabel=f"chip fault rate ({measure})", ylabel="accuracy")
    ax.set_title("Per-chip accuracy before and after retraining", fontsize=10)
    ax.legend(fontsize=7, loc="best")


_POLICY_COLORS = dict(
    fixed="C3", adaptive="C4", adaptive_es="C5", online="C1", reduce="C0", grouped="C2",
    oracle="C7",
)  # fmt: skip
_ALTERNATIVES = ("fixed", "adaptive", "adaptive_es", "online")  # policies.ALTERNATIVES


def _plot_regions(summary: dict, ax) -> None:
    """The cheapest policy in every cell of (population, cost of an evaluation pass), from
    the run's own per-chip counts; the run's population and its measured pass cost marked."""
    pol = summary["policies"]
    w = pol["where_each_wins"]
    chips, evals = np.asarray(w["chips"]), _floats(w["eval_pass_epochs"])
    names = [n for n in _POLICY_COLORS if any(n in row for row in w["cheapest"])]
    index = {n: i for i, n in enumerate(names)}
    grid = np.array([[index[c] for c in row] for row in w["cheapest"]])
    colors = matplotlib.colors.ListedColormap([_POLICY_COLORS[n] for n in names])
    ax.pcolormesh(
        np.arange(len(chips) + 1), np.arange(len(evals) + 1), grid, cmap=colors,
        vmin=-0.5, vmax=len(names) - 0.5, alpha=0.8,
    )  # fmt: skip
    for i in range(len(evals)):
        for j in range(len(chips)):
            ax.text(j + 0.5, i + 0.5, w["cheapest"][i][j], ha="center", va="center", fontsize=6)
    ax.set_xticks(np.arange(len(chips)) + 0.5, [f"{c:,}" for c in chips], fontsize=7)
    ax.set_yticks(np.arange(len(evals)) + 0.5, [f"{e:.3g}" for e in evals], fontsize=7)
    ax.set(xlabel="chips", ylabel="cost of one evaluation pass, training epochs")
    run_chips = max(pol["reduce"]["chips"], 1)
    e = w.get("measured_eval_pass_epochs")
    x = np.interp(np.log(run_chips), np.log(chips), np.arange(len(chips))) + 0.5
    ax.axvline(x, color="k", lw=1, ls="--", label=f"this run: {run_chips} chips")
    if e is not None and np.isfinite(e):
        y = np.interp(np.log(e), np.log(evals), np.arange(len(evals))) + 0.5
        ax.axhline(y, color="k", lw=1, ls=":", label=f"this run: a pass costs {e:.3g} epochs")
    ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
    ax.set_title(
        "Cheapest policy (Reduce with its analysis), from this run's per-chip counts", fontsize=9
    )


def _plot_policies(summary: dict, fig) -> None:
    """Cost of every policy in the comparison's unit, annotated with its chips meeting the
    target on the validation split and on the test set (the fixed policy's on its sample,
    the oracle's on the predictor study's own chips); and the cumulative cost over the
    population size, Reduce with its analysis, with the same break-even as the headline."""
    pol = summary["policies"]
    names = [n for n in _POLICY_COLORS if pol.get(n)]
    left, right = fig.subplots(1, 2)
    for i, name in enumerate(names):
        p = pol[name]
        total, train = _policy_cost(pol, name), p["train_epochs"]
        evals = max(total - train, 0.0)
        other = name == "oracle"  # other chips than the population's
        style = dict(hatch="//", edgecolor="k") if other else {}
        left.bar(i, train, color=_POLICY_COLORS[name], alpha=0.85, **style)
        left.bar(i, evals, bottom=train, color="0.6", alpha=0.85)
        test = p.get("chips_meeting_target_test")
        of = p.get("chips_measured", p["chips"])
        text = f"val {p['chips_meeting_target']}/{of}\ntest {'-' if test is None else test}/{of}"
        left.annotate(text, (i, train + evals), ha="center", va="bottom", fontsize=7)
    handles = [Patch(color="0.6", alpha=0.85, label="evaluation")]
    if "oracle" in names:
        handles.append(
            Patch(facecolor="C7", hatch="//", edgecolor="k", label="other chips (predictor study)")
        )
    left.legend(handles=handles, fontsize=7, loc="upper right")

    def tick(name: str) -> str:
        p = pol[name]
        if name == "oracle":
            return f"oracle\n{p['chips']} other chips"
        if p.get("sampled"):
            return f"{name}\n{p['chips_measured']} of {p['chips']}\nsampled"
        return f"{name}\n{p['chips']} chips"

    left.set_xticks(range(len(names)), [tick(n) for n in names], fontsize=8)
    left.set(ylabel=_unit(pol))
    left.set_ylim(0, 1.22 * max([_policy_cost(pol, n) for n in names] + [1e-9]))
    left.set_title(
        "Per policy, whole population (label: chips meeting the target,\nvalidation and test)",
        fontsize=9,
    )
    cheapest = pol.get("cheapest_alternative")
    be = pol.get("break_even_vs_cheapest")
    label = (
        "no other policy run"
        if cheapest is None
        else f"Reduce = {cheapest} at {be} chips"
        if be is not None
        else f"Reduce never breaks even with {cheapest}"
    )
    curves = [n for n in names if n != "oracle"]
    _cumulative(summary, right, curves, be if cheapest else None, label)
    right.set_title("Over the population (Reduce with its analysis)", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)


def figures(summary: dict) -> list[tuple[str, plt.Figure]]:
    """The run's plots as ``(file name, figure)`` pairs: ``PLOT_NAMES`` (``policies.png`` and
    ``policy_regions.png`` only where the summary has policies), then ``GROUPING_PLOT`` for
    grouped runs and ``PREDICTOR_PLOT`` with a predictor study. The caller saves and closes
    them."""
    out = []
    single = {
        "required_epochs.png": _plot_required,
        "policy_regions.png": _plot_regions,
        "chip_epochs_histogram.png": _plot_histogram,
        "cost.png": _plot_cost,
        "chip_accuracy.png": _plot_chip_accuracy,
    }
    wide = {"accuracy_vs_fault_rate.png": _plot_accuracy}
    if summary.get("policies"):
        wide["policies.png"] = _plot_policies
    if summary["cost"].get("grouped_epochs") is not None:
        wide[GROUPING_PLOT] = _plot_grouping
    for name in PLOT_NAMES + (GROUPING_PLOT,):
        if name == "policy_regions.png" and not (summary.get("policies") or {}).get(
            "where_each_wins"
        ):
            continue
        if name in single:
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            single[name](summary, ax)
            ax.grid(alpha=0.3)
        elif name in wide:
            fig = plt.figure(figsize=(10.4, 4.4))
            wide[name](summary, fig)
        else:
            continue
        if fig.get_layout_engine() is None:  # a plot may lay itself out (outside legends)
            fig.tight_layout()
        out.append((name, fig))
    if summary.get("predictor_study"):
        fig = plt.figure(figsize=(4 * len(summary["predictor_study"]["measures"]), 4.0))
        _plot_predictor(summary, fig)
        fig.tight_layout()
        out.append((PREDICTOR_PLOT, fig))
    return out


def chip_figures(summary: dict) -> list[tuple[str, plt.Figure]]:
    """The per-chip plots of chips served from a saved map (``production.retrain_chips``):
    ``chip_epochs_histogram.png`` and ``chip_accuracy.png``, from a summary with ``chips``,
    ``cost.fixed_epochs_per_chip``, the targets and ``resilience_map.rate_measure``. The
    caller saves and closes them."""
    out = []
    for name, plot in (
        ("chip_epochs_histogram.png", _plot_histogram),
        ("chip_accuracy.png", _plot_chip_accuracy),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        plot(summary, ax)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append((name, fig))
    return out
