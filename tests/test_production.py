"""New chips retrained from a study's map bundle (``production.retrain_chips``) and its CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import reduce_jax
from experiments import cli
from reduce_jax import config as config_lib
from reduce_jax import data as data_lib
from reduce_jax import inputs, pipeline, production
from reduce_jax.engine import population, progress, train
from reduce_jax.errors import ConfigError
from reduce_jax.hardware import faults, systolic
from reduce_jax.nets import models
from reduce_jax.stages import online, policies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = (
    "chip", "pe_fault_rate", "status", "selected_steps", "topup_steps", "accuracy_before",
    "accuracy_after", "meets_target", "test_accuracy_after", "meets_target_test",
)  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_run_config):
    """A small study on 8 chips from a file (7 at rate 0.1, the last at 0.6, above the grid):
    ``(workdir, fault-map file)``."""
    root = tmp_path_factory.mktemp("study")
    maps = faults.FaultSpec("clustered", 8, 8, 2.0, 1.0).sample(
        jax.random.key(3), np.r_[np.full(7, 0.1), 0.6]
    )
    path = str(root / "chips.npz")
    faults.save_fault_maps(path, maps)
    cfg = small_run_config(
        str(root / "study"), chip_fault_maps=path, compare_policies=False, chips_per_batch=8
    )
    pipeline.run(cfg)
    return str(root / "study"), path


@pytest.fixture(scope="module")
def served(study, tmp_path_factory):
    """The study's own chips retrained from its map into a new workdir: ``(workdir,
    Production)``."""
    out = str(tmp_path_factory.mktemp("served") / "out")
    result = reduce_jax.retrain_chips(
        reduce_jax.load_map(os.path.join(study[0], "map")), study[1], workdir=out,
        chips_per_batch=8,
    )  # fmt: skip
    return out, result


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _assert_same_chips(mine: list[dict], theirs: list[dict]) -> None:
    """The rows of two chips.csv files name the same chips with the same outcome: status and
    steps equal, accuracies equal to 1e-6 (empty where the other's is)."""
    for m, t in zip(mine, theirs, strict=True):
        exact = ("chip", "status", "selected_steps", "topup_steps")
        assert {k: m[k] for k in exact} == {k: t[k] for k in exact}
        for k in ("accuracy_after", "test_accuracy_after"):
            assert (m[k] == "") == (t[k] == ""), (m["chip"], k)
            if m[k]:
                assert float(m[k]) == pytest.approx(float(t[k]), abs=1e-6), (m["chip"], k)


def test_a_studys_chips_from_its_map_are_the_studys(study, served):
    # Same map, recipe, targets and retraining stream: every chip's amount, status, top-ups
    # and accuracies equal the study's chips.csv, the chip above the grid included.
    mine = _rows(os.path.join(served[0], "chips.csv"))
    theirs = _rows(os.path.join(study[0], "chips.csv"))
    assert [{k: r[k] for k in COLUMNS} for r in mine] == [
        {k: r[k] for k in COLUMNS} for r in theirs
    ]
    assert theirs[7]["status"] == "above_grid" and mine[7]["selected_steps"] == ""
    assert sum(r["status"] == "ok" for r in mine) >= 5


def test_summary_shows_no_baseline_training_and_no_analysis(served):
    with open(os.path.join(served[0], "summary.json")) as f:
        summary = json.load(f)
    timing = summary["timing"]
    assert timing["baseline_trained"] is False and timing["analysis_run"] is False
    assert "retrain_s" in timing
    assert not any(k.startswith(("baseline_s", "analysis_s")) for k in timing)
    cost = summary["cost"]
    assert cost["analysis_epochs"] == 0 and cost["study_analysis_epochs"] > 0
    spe = cost["steps_per_epoch"]
    chips = summary["chips"]
    assert cost["reduce_steps"] == sum((c["selected_steps"] or 0) + c["topup_steps"] for c in chips)
    assert cost["reduce_epochs"] == pytest.approx(cost["reduce_steps"] / spe)
    assert cost["chips_unrecoverable"] == 1 and summary["retrained"] == list(range(8))
    for name in ("chip_epochs_histogram.png", "chip_accuracy.png"):
        with open(os.path.join(served[0], name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_second_call_with_the_same_chips_computes_nothing(study, served, monkeypatch):
    out, first = served
    before = _rows(os.path.join(out, "chips.csv"))

    def no_compute(*args, **kwargs):
        raise AssertionError("a finished chip was retrained again")

    monkeypatch.setattr(production.retraining, "retrain", no_compute)
    again = reduce_jax.retrain_chips(os.path.join(study[0], "map"), study[1], workdir=out)
    assert len(again.retrained) == 0 and list(again.found_done) == list(range(8))
    assert _rows(os.path.join(out, "chips.csv")) == before


def test_more_chips_are_added_and_finished_ones_never_redone(study, served, tmp_path):
    maps = faults.load_fault_maps(study[1])
    first, rest = str(tmp_path / "first.npz"), str(tmp_path / "rest.npz")
    faults.save_fault_maps(first, maps[:3])
    faults.save_fault_maps(rest, maps[3:])
    out = str(tmp_path / "out")
    bundle = reduce_jax.load_map(study[0])  # the study's workdir finds its map/
    a = reduce_jax.retrain_chips(bundle, first, workdir=out, save_chip_weights=True)
    b = reduce_jax.retrain_chips(bundle, rest, workdir=out, first_chip_id=3, save_chip_weights=True)
    assert list(a.retrained) == [0, 1, 2] and list(b.retrained) == list(range(3, 8))
    mine = _rows(os.path.join(out, "chips.csv"))
    full = _rows(os.path.join(served[0], "chips.csv"))
    assert [r["chip"] for r in mine] == [str(c) for c in range(8)]
    assert [r["source"] for r in mine] == [first] * 3 + [rest] * 5
    for m, f in zip(mine, full, strict=True):
        assert (m["status"], m["selected_steps"]) == (f["status"], f["selected_steps"])
        # Other chunks may pick other GEMM kernels: equal up to the last bits.
        assert float(m["accuracy_after"]) == pytest.approx(float(f["accuracy_after"]), abs=0.01)
    # Every chip's weights, from either call, are stored under its id: bypassed weights are
    # zero, and the chip's model scores on the validation split what chips.csv reports.
    net = models.get_model("mlp", 10)  # the study's model
    val = data_lib.split_validation(data_lib.load_dataset("digits"), 0.1)
    for chip in (1, 5):
        weights = reduce_jax.load_chip(out, chip)
        masks = systolic.weight_masks(weights["params"], maps[chip])
        jax.tree.map(lambda w, k: np.testing.assert_array_equal(w[k == 0], 0), weights["params"],
                     masks)  # fmt: skip
        logits = models.apply(net, weights, val.val_images, train=False)
        accuracy = float(np.mean(np.argmax(logits, -1) == val.val_labels))
        assert accuracy == pytest.approx(float(mine[chip]["accuracy_after"]), abs=1e-9)


def test_a_known_chip_with_another_map_is_refused_naming_both_files(study, served, tmp_path):
    maps = faults.load_fault_maps(study[1])
    maps[2] = ~maps[2]
    other = str(tmp_path / "other.npz")
    faults.save_fault_maps(other, maps)
    ledger = os.path.join(served[0], production.LEDGER)
    with open(ledger) as f:
        saved = f.read()
    with pytest.raises(ConfigError, match=r"chip 2: .*other\.npz.*chips\.npz"):
        reduce_jax.retrain_chips(os.path.join(study[0], "map"), other, workdir=served[0])
    with open(ledger) as f:
        assert f.read() == saved


def _refused(study, tmp_path, match, **kwargs):
    out = str(tmp_path / "out")
    maps = kwargs.pop("maps", study[1])
    with pytest.raises(ConfigError, match=match):
        reduce_jax.retrain_chips(os.path.join(study[0], "map"), maps, workdir=out, **kwargs)
    assert not os.path.exists(out)  # refused before anything is written


def test_another_model_is_refused_naming_the_variable(study, tmp_path):
    net = models.MLP(num_classes=10, hidden=(32,))
    _refused(study, tmp_path, r"not the map's model \(mlp\): variable params/fc1/bias", model=net)


def test_other_weights_are_refused(study, tmp_path):
    bundle = reduce_jax.load_map(os.path.join(study[0], "map"))
    weights = jax.tree.map(lambda x: x + 1e-3, bundle.variables)
    _refused(study, tmp_path, "variables: the baseline weights differ", variables=weights)


def test_other_data_and_another_split_are_refused(study, tmp_path):
    digits = data_lib.load_dataset("digits")
    changed = data_lib.Dataset.from_arrays(
        digits.train_images, digits.train_labels, digits.test_images[::-1],
        digits.test_labels[::-1], name="digits",
    )  # fmt: skip
    _refused(study, tmp_path, "dataset: the training and test data differ", dataset=changed)
    split = data_lib.split_validation(digits, 0.2)
    _refused(study, tmp_path, "dataset: the validation split differ", dataset=split)


def test_fault_maps_of_another_array_are_refused(study, tmp_path):
    maps = np.zeros((2, 16, 16), bool)
    _refused(study, tmp_path, "16x16 array, but the map is of a 8x8 array", maps=maps)


def test_a_studys_workdir_is_not_an_output(study):
    with pytest.raises(ConfigError, match="holds a study's outputs"):
        reduce_jax.retrain_chips(os.path.join(study[0], "map"), study[1], workdir=study[0])


def test_a_workdir_of_chips_from_another_map_is_refused(study, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ledger = {"bundle": "0" * 64, "map": "elsewhere/map", "chips": []}
    (out / production.LEDGER).write_text(json.dumps(ledger))
    with pytest.raises(ConfigError, match=r"chips retrained from another map \(elsewhere/map\)"):
        reduce_jax.retrain_chips(os.path.join(study[0], "map"), study[1], workdir=str(out))
    assert os.listdir(out) == [production.LEDGER]


@pytest.mark.parametrize(
    "contents", ['{"bundle": "0', '{"bundle": "0"}', "[]"], ids=["truncated", "no_chips", "list"]
)
def test_a_damaged_ledger_is_refused_naming_it(study, tmp_path, contents):
    out = tmp_path / "out"
    out.mkdir()
    ledger = out / production.LEDGER
    ledger.write_text(contents)
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(ledger))}: unreadable ledger \(\w+Error: [^\n]*$"
    ):
        reduce_jax.retrain_chips(os.path.join(study[0], "map"), study[1], workdir=str(out))
    assert os.listdir(out) == [production.LEDGER] and ledger.read_text() == contents


def test_a_stop_says_whether_finished_chips_are_saved(tmp_path):
    out = tmp_path / "out"
    assert not cli.production_saved_work(str(out))
    out.mkdir()
    assert not cli.production_saved_work(str(out))
    assert cli.stop_hint(signal.SIGTERM, str(out), False) == (
        f"interrupted (SIGTERM) before any work was saved in {out}: run the same command to "
        "start over"
    )
    pool = out / "batches" / "0123" / progress.PROGRESS_FILE
    pool.parent.mkdir(parents=True)
    assert not cli.production_saved_work(str(out))  # a pool's directory, nothing saved in it
    pool.write_text("{}")
    assert cli.production_saved_work(str(out))
    pool.unlink()
    (out / production.LEDGER).write_text("{}")
    assert cli.production_saved_work(str(out))
    assert cli.stop_hint(signal.SIGINT, str(out), True) == (
        f"interrupted (SIGINT); finished work is saved in {out}: run the same command to resume"
    )


def test_a_stopped_call_resumes_to_the_same_chips(study, served, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    put, saved = progress.ProgressStore.put, []

    def stop_after_first(self, phase, index, result):
        put(self, phase, index, result)
        saved.append(index)
        raise KeyboardInterrupt  # the first pool is saved, then the call is stopped

    monkeypatch.setattr(progress.ProgressStore, "put", stop_after_first)
    kwargs = dict(workdir=out, chips_per_batch=4, topup_pool_chunks=1)
    with pytest.raises(KeyboardInterrupt):
        reduce_jax.retrain_chips(os.path.join(study[0], "map"), study[1], **kwargs)
    assert saved == [0] and not os.path.exists(os.path.join(out, production.LEDGER))
    assert cli.production_saved_work(out)  # a stop now says the same command resumes
    monkeypatch.setattr(progress.ProgressStore, "put", put)
    computed = []
    drive = production.retraining.population.drive

    def counting(inputs, compute, *args, **kw):
        return drive(inputs, lambda ids, c: computed.append(ids) or compute(ids, c), *args, **kw)

    monkeypatch.setattr(production.retraining.population, "drive", counting)
    reduce_jax.retrain_chips(os.path.join(study[0], "map"), study[1], **kwargs)
    assert len(computed) == 1  # the saved pool is read back, only the second is computed
    _assert_same_chips(
        _rows(os.path.join(out, "chips.csv")), _rows(os.path.join(served[0], "chips.csv"))
    )
    assert not os.path.exists(os.path.join(out, "batches"))


@pytest.mark.slow
def test_cli_end_to_end(study, tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "experiments.retrain_chips", f"--map={study[0]}/map"]
    bad = subprocess.run(
        [*cmd, f"--chip_fault_maps={tmp_path}/missing.npz", f"--workdir={out}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and not os.path.exists(out)
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --chip_fault_maps=")
    ok = subprocess.run(
        [*cmd, f"--chip_fault_maps={study[1]}", f"--workdir={out}", "--chips_per_batch=8",
         "--compilation_cache_dir="],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "8 chips retrained from the map" in ok.stdout
    assert "ETA" in ok.stderr  # the progress line
    _assert_same_chips(
        _rows(os.path.join(out, "chips.csv")), _rows(os.path.join(study[0], "chips.csv"))
    )
    ledger = os.path.join(out, production.LEDGER)
    with open(ledger, "r+") as f:
        f.truncate(f.seek(0, os.SEEK_END) // 2)  # a damaged ledger
    damaged = subprocess.run(
        [*cmd, f"--chip_fault_maps={study[1]}", f"--workdir={out}", "--compilation_cache_dir="],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert damaged.returncode == 2, damaged.stderr[-2000:]
    assert damaged.stderr.strip().splitlines()[-1].startswith(f"error: {ledger}: unreadable")


def test_the_online_policy_learns_from_the_chips_before_it_and_refines_the_map(study, tmp_path):
    """Two calls into one workdir: the second call's chips start where the map learned from
    the bundle and the first call's chips says (``online.plan``); the refined map holds
    every served chip's (rate, need) in arrival order."""
    maps = faults.load_fault_maps(study[1])
    first, rest = str(tmp_path / "first.npz"), str(tmp_path / "rest.npz")
    faults.save_fault_maps(first, maps[:4])
    faults.save_fault_maps(rest, maps[4:])
    out = str(tmp_path / "line")
    bundle = reduce_jax.load_map(os.path.join(study[0], "map"))
    s = online.OnlineSettings(batch=2, quantile=0.5, confidence=0.5, min_evidence=0)
    kw = dict(workdir=out, policy="online", online_settings=s, chips_per_batch=8)
    a = reduce_jax.retrain_chips(bundle, first, save_chip_weights=True, **kw)
    _assert_stored_weights_are_the_chips(bundle, out, a.chips, maps[:4])
    refined = reduce_jax.load_map(os.path.join(out, production.REFINED_MAP))
    rows = {r["chip"]: r for r in a.chips}
    learned = [c for c in range(4) if rows[c]["status"] in ("ok", "missed_target")]
    np.testing.assert_array_equal(
        refined.observations.rates, [rows[c]["pe_fault_rate"] for c in learned]
    )
    b = reduce_jax.retrain_chips(bundle, rest, first_chip_id=4, **kw)
    rows = {r["chip"]: r for r in b.chips}
    assert {r["policy"] for r in rows.values()} == {"online"}
    spe = bundle.recipe.steps_per_epoch
    points = policies.adaptive_points(
        bundle.recipe.topup_steps, int(train.epochs_to_steps(bundle.fixed_epochs, spe))
    )
    plan = online.plan(refined.observations, [rows[c]["pe_fault_rate"] for c in (4, 5)], points, s)
    assert [rows[c]["selected_steps"] for c in (4, 5)] == plan.first.tolist()
    for r in rows.values():
        assert r["meets_target"] == (r["status"] == "ok")
        if r["meets_target"]:
            assert r["accuracy_after"] >= bundle.decision_target
            assert r["verifications"] >= 1 and 0 < r["eval_passes"] <= r["verifications"]
    again = reduce_jax.load_map(os.path.join(out, production.REFINED_MAP))
    assert len(again.observations.rates) == sum(
        r["status"] in ("ok", "missed_target") for r in rows.values()
    )
    with pytest.raises(ConfigError, match="--policy='cheapest'; allowed: reduce, online"):
        reduce_jax.retrain_chips(bundle, rest, workdir=str(tmp_path / "x"), policy="cheapest")


def _assert_stored_weights_are_the_chips(bundle, workdir, rows, maps):
    """Every chip's stored weights: bypassed weights zero; a chip that met the target reads
    its ``accuracy_after`` on the validation split; a retrained chip is not the masked
    baseline, a chip given no steps is."""
    inp = inputs.resolve(config_lib.ReduceConfig(**bundle.study))
    data = population.DeviceData.from_dataset(inp.dataset)
    trainer = train.make_trainer(inp.model, train.make_optimizer("adam", 1e-3), 32)
    served = 0
    for row in rows:
        chip = row["chip"]
        variables = reduce_jax.load_chip(workdir, chip)
        mask = systolic.weight_masks(variables["params"], maps[chip])
        one = jax.tree.map(lambda x: np.asarray(x)[None], (variables, mask))
        if row["status"] == "ok":
            acc = float(trainer.evaluate(*one, *data.split("val"))[0])
            assert acc == pytest.approx(row["accuracy_after"], abs=1e-6), chip
        masked = jax.tree.map(lambda w, m: np.asarray(w * m), bundle.variables["params"], mask)
        same = all(jax.tree.leaves(jax.tree.map(np.array_equal, variables["params"], masked)))
        steps = (row["selected_steps"] or 0) + row["topup_steps"]
        assert same == (steps == 0), chip
        served += steps > 0
    assert served > 0


def test_the_early_stop_sweep_keeps_the_training_and_with_alpha_0_every_decision(study):
    """``experiments.early_stop`` on a study's chips: every setting trains the chips alike
    (the decisions of the whole split are the same); alpha 0 never rejects a chip the whole
    split accepts and evaluates no more than the whole split."""
    from experiments import early_stop

    rows = early_stop.sweep(study[0], [(1, 0.0), (4, 0.0), (4, 0.2)])
    whole, exact, loose = rows
    assert whole["cut"] == 0 and whole["false_rejects"] == 0
    assert exact["false_rejects"] == 0 and exact["eval_passes"] <= whole["eval_passes"]
    assert exact["train_epochs"] == whole["train_epochs"]
    assert loose["eval_passes"] <= exact["eval_passes"]
    assert loose["chips_meeting_target"] == whole["chips_meeting_target"] or loose["false_rejects"]
