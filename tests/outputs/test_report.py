"""Tests for reduce_jax.outputs.report: atomic JSON/CSV/PNG outputs of a run."""

from __future__ import annotations

import csv
import json
import os

import pytest

from reduce_jax import files
from reduce_jax.outputs import plots, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary() -> dict:
    """Synthetic summary: F=3 rates, A=3 amounts, K=2 samples, 5 chips (one unrecoverable)."""
    rates, amounts = [0.0, 0.1, 0.3], [0.0, 0.5, 2.0]
    accuracy = [
        [[0.95 - 0.2 * f + 0.05 * a * f + 0.01 * k for k in range(2)] for a in amounts]
        for f in rates
    ]
    chips = []
    for i, (rate, sel) in enumerate([(0.02, 0.5), (0.08, 0.5), (0.15, 2.0), (0.25, 2.0)]):
        chips.append(
            {
                "chip": i,
                "pe_fault_rate": rate,
                "effective_fault_rate": rate * 0.9,
                "status": "ok",
                "selected_epochs": sel,
                "selected_steps": int(sel * 10),
                "topup_epochs": 0.5 if i == 3 else 0.0,
                "accuracy_before": 0.8,
                "accuracy_after": 0.93,
                "meets_target": True,
                "test_accuracy_after": 0.92,
                "meets_target_test": True,
            }
        )
    chips.append(
        dict(
            chips[0],
            chip=4,
            pe_fault_rate=0.4,
            effective_fault_rate=0.36,
            status="above_grid",
            selected_epochs=None,
            selected_steps=None,
            accuracy_after=0.5,
            meets_target=False,
        )
    )
    return {
        "baseline_accuracy": 0.95,
        "target_accuracy": 0.92,
        "resilience": {
            "fault_rates": rates,
            "measured_rates": [0.0, 0.098, 0.301],
            "retrain_epochs": amounts,
            "retrain_steps": [0, 5, 20],
            "accuracy": accuracy,
            "statistic": "min",
            "statistic_accuracy": [[min(s) for s in row] for row in accuracy],
        },
        "resilience_map": {
            "fault_rates": rates,
            "measured_rates": [0.0, 0.098, 0.301],
            "required_epochs": [0.0, 0.5, None],
            "rate_measure": "pe",
        },
        "chips": chips,
        "cost": {
            "reduce_epochs": 5.5,
            "fixed_epochs": 10.0,
            "fixed_epochs_per_chip": 2.0,
            "analysis_epochs": 12.0,
            "savings": 4.5,
            "savings_fraction": 0.45,
            "chips_meeting_target": 4,
            "chips_unrecoverable": 1,
            "topup_epochs": 0.5,
        },
        "policies": {
            name: {
                "chips": chips_paid,
                "chips_measured": measured,
                "sampled": measured < chips_paid,
                "train_epochs": epochs,
                "compute_epochs": epochs + 0.5,
                "chips_meeting_target": 4 if measured == 5 else 2,
                "chips_meeting_target_test": 3 if measured == 5 else 2,
            }
            for name, chips_paid, measured, epochs in (
                ("fixed", 5, 2, 10.0),
                ("adaptive", 5, 5, 4.0),
                ("reduce", 5, 5, 5.5),
                ("oracle", 3, 3, 1.0),
            )
        }
        | {"analysis": {"chips": 6, "train_epochs": 12.0, "compute_epochs": 14.0}}
        | {
            "unit": "compute_epochs",
            "cheapest_alternative": "adaptive",
            "break_even_vs_cheapest": None,
            "break_even_vs_fixed": 3,
            "break_even_vs_adaptive": None,
            "where_each_wins": {
                "eval_pass_epochs": [0.01, 1.0],
                "chips": [10, 1000],
                "cheapest": [["adaptive", "reduce"], ["fixed", "reduce"]],
                "measured_eval_pass_epochs": 0.05,
            },
        },
        "config": {"model": "mlp", "seed": 0},
        "timing": {"wall_s": 1.5},
    }


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_summary_without_chips_keeps_them_in_chips_csv(tmp_path):
    summary = _summary()
    report.write_outputs(summary, str(tmp_path), chips_in_json=False)
    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == dict(summary, chips=None)
    chips = _read_csv(tmp_path / "chips.csv")
    assert len(chips) == 1 + len(summary["chips"]) and chips[0] == list(summary["chips"][0])


def test_write_outputs(tmp_path):
    summary = _summary()
    paths = report.write_outputs(summary, str(tmp_path))
    names = [os.path.basename(p) for p in paths]
    assert names == ["summary.json", "resilience.csv", "chips.csv", *plots.PLOT_NAMES]

    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == summary

    res = _read_csv(tmp_path / "resilience.csv")
    header = ["fault_rate", "measured_rate", "retrain_epochs", "retrain_steps", "sample"]
    assert res[0] == [*header, "accuracy"]
    assert len(res) == 1 + 3 * 3 * 2
    # Row order is (rate, amount, sample): rate 0.1, amount 2.0, sample 1 is row 1*6 + 2*2 + 1.
    row = dict(zip(res[0], res[1 + 1 * 6 + 2 * 2 + 1], strict=True))
    assert float(row["fault_rate"]) == 0.1 and float(row["measured_rate"]) == 0.098
    assert float(row["retrain_epochs"]) == 2.0 and int(row["retrain_steps"]) == 20
    assert int(row["sample"]) == 1
    assert float(row["accuracy"]) == pytest.approx(summary["resilience"]["accuracy"][1][2][1])

    chips = _read_csv(tmp_path / "chips.csv")
    assert chips[0] == list(summary["chips"][0])
    assert len(chips) == 1 + 5
    last = dict(zip(chips[0], chips[5], strict=True))
    assert last["selected_epochs"] == "" and last["selected_steps"] == ""
    assert last["status"] == "above_grid" and last["chip"] == "4"

    for name in plots.PLOT_NAMES:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # No temporary files left behind.


def _texts(fig) -> str:
    """Every title, axis label, tick label, legend entry and annotation of a figure."""
    out = []
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.get_xticklabels() + ax.texts]
        if ax.get_legend() is not None:
            out += [t.get_text() for t in ax.get_legend().get_texts()]
    for legend in fig.legends:
        out += [t.get_text() for t in legend.get_texts()]
    return "\n".join(out)


def test_plots_name_the_cheapest_policy_the_unit_the_splits_and_the_oracles_chips():
    figs = dict(plots.figures(_summary()))
    try:
        cost = _texts(figs["cost.png"])
        assert "Reduce vs adaptive (the cheapest policy without Reduce)" in cost
        assert "break-even with adaptive: never" in cost
        assert "compute epochs (training + evaluation)" in cost
        pol = _texts(figs["policies.png"])
        assert "val 4/5\ntest 3/5" in pol and "val 2/2\ntest 2/2" in pol
        assert "fixed\n2 of 5\nsampled" in pol
        assert "oracle\n3 other chips" in pol and "other chips (predictor study)" in pol
        assert "Reduce never breaks even with adaptive" in pol
        assert "compute epochs (training + evaluation)" in pol
        # chip_accuracy: the x-axis is the chips' fault rate, and the chip not served is shown.
        acc_fig = figs["chip_accuracy.png"]
        ax = acc_fig.axes[0]
        assert ax.get_xlabel() == "chip fault rate (pe)"
        lo, hi = ax.get_xlim()
        assert lo <= 0.02 and hi >= 0.4  # the rates of the first and last chips
        assert "not served (1: above the grid or unrecoverable)" in _texts(acc_fig)
        # accuracy_vs_fault_rate: one legend for both panels, on the figure, outside them.
        fig = figs["accuracy_vs_fault_rate.png"]
        assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
        assert "target" in _texts(fig) and "2 epochs" in _texts(fig)
    finally:
        for f in figs.values():
            plots.plt.close(f)


def test_cost_plot_draws_the_break_even_in_the_policies_unit():
    """The point drawn on cost.png is at the break-even of summary.json's policies."""
    summary = _summary()
    summary["policies"].update(
        cheapest_alternative="fixed", break_even_vs_cheapest=3, break_even_vs_fixed=3
    )
    figs = dict(plots.figures(summary))
    try:
        assert "break-even with fixed: 3 chips" in _texts(figs["cost.png"])
        ax = figs["cost.png"].axes[0]
        points = [ln for ln in ax.get_lines() if ln.get_label().startswith("break-even")]
        assert points[0].get_xdata()[0] == 3
        # Reduce's curve there: analysis 14 + 3 chips * (6 / 5) compute epochs.
        assert points[0].get_ydata()[0] == pytest.approx(14.0 + 3 * 6.0 / 5)
    finally:
        for f in figs.values():
            plots.plt.close(f)


def test_write_json_rejects_nan_with_key_path(tmp_path):
    path = tmp_path / "x.json"
    with pytest.raises(ValueError, match=r"resilience\.accuracy\[1\]"):
        files.write_json_atomic(str(path), {"resilience": {"accuracy": [0.5, float("nan")]}})
    with pytest.raises(ValueError, match="inf"):
        files.write_json_atomic(str(path), {"a": float("inf")})
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "summary.json"
    files.write_json_atomic(str(path), {"ok": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        files.write_json_atomic(str(path), {"ok": 2, "bad": object()})
    with pytest.raises(ValueError):
        files.write_json_atomic(str(path), {"ok": 3, "bad": float("nan")})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["summary.json"]


def test_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "chips.csv"
    files.write_csv_atomic(str(path), [{"chip": 0}])
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        files.write_csv_atomic(str(path), [{"chip": 1}])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["chips.csv"]


def test_write_csv_empty_rows(tmp_path):
    path = tmp_path / "empty.csv"
    files.write_csv_atomic(str(path), [])
    assert path.read_text() == ""
