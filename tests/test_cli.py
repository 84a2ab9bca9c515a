"""The CLI end to end on the smoke flagfile, its handling of bad flags and files, its --help,
and stopping it with SIGTERM or SIGINT."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from reduce_jax import config as config_lib
from reduce_jax import pipeline
from reduce_jax.outputs import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "configs", "smoke.flags")
CLI = [sys.executable, "-m", "experiments.resilience"]
# PYTHONPATH: the CLI of this checkout also when run from another directory.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
# As a user runs it: JAX picks (and probes) the platforms itself.
USER_ENV = {k: v for k, v in ENV.items() if k != "JAX_PLATFORMS"}
RESUME_HINT = "run the same command to resume"


def run_cli(*args, timeout=600, env=ENV, cwd=ROOT):
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def without_timing(summary):
    return {k: v for k, v in summary.items() if k != "timing"}


def without_workdir(summary):
    """The summary less timing and the workdir (runs in two workdirs compare equal)."""
    config = {k: v for k, v in summary["config"].items() if k != "workdir"}
    return dict(without_timing(summary), config=config)


def one_line_error(proc, needle: str) -> None:
    """The CLI failed with exit code 2 and one line on stderr that contains ``needle``."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, lines


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """The smoke runs' persistent compilation cache."""
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, xla_cache):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    proc = run_cli(
        f"--flagfile={SMOKE}",
        f"--workdir={workdir}",
        f"--compilation_cache_dir={xla_cache}",
        env=USER_ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        return workdir, json.load(f), proc


@pytest.mark.slow
def test_smoke_summary_has_every_key_and_consistent_values(smoke_run):
    workdir, s, proc = smoke_run
    for key in (
        "baseline_accuracy",
        "target_accuracy",
        "resilience",
        "resilience_map",
        "chips",
        "cost",
        "config",
        "timing",
    ):
        assert key in s
    res, rmap, cost = s["resilience"], s["resilience_map"], s["cost"]
    f, a, k = len(res["fault_rates"]), len(res["retrain_epochs"]), s["config"]["maps_per_rate"]
    assert np.asarray(res["accuracy"]).shape == (f, a, k)
    assert rmap["fault_rates"] == res["fault_rates"] and len(rmap["required_epochs"]) == f
    finite = [x for x in rmap["required_epochs"] if x is not None]
    assert finite == sorted(finite)
    assert s["target_accuracy"] == pytest.approx(
        s["baseline_accuracy"] - s["config"]["max_accuracy_drop"]
    )
    chips = s["chips"]
    assert len(chips) == s["config"]["num_chips"]
    chip_keys = {
        "chip",
        "pe_fault_rate",
        "effective_fault_rate",
        "selected_epochs",
        "topup_epochs",
        "accuracy_before",
        "accuracy_after",
        "meets_target",
    }
    assert s["validation_target_accuracy"] == pytest.approx(
        s["target_accuracy"] + s["config"]["validation_margin"]
    )
    for c in chips:
        assert chip_keys <= set(c)
        served = c["selected_epochs"] is not None and c["status"] != "diverged"
        assert c["meets_target"] == (
            c["accuracy_after"] >= s["validation_target_accuracy"] and served
        )
        if c["status"] in ("ok", "missed_target", "diverged"):  # the retrained chips
            assert c["meets_target"] == (c["status"] == "ok")
        if c["selected_epochs"] is None:
            assert c["topup_epochs"] == 0 and c["accuracy_after"] == c["accuracy_before"]
    total = sum((c["selected_epochs"] or 0) + c["topup_epochs"] for c in chips)
    assert cost["reduce_epochs"] == pytest.approx(total)
    assert cost["fixed_epochs"] == pytest.approx(len(chips) * cost["fixed_epochs_per_chip"])
    assert cost["savings"] == pytest.approx(cost["fixed_epochs"] - cost["reduce_epochs"])
    assert cost["analysis_epochs"] == pytest.approx(f * k * max(res["retrain_epochs"]))
    assert cost["chips_meeting_target"] == sum(c["meets_target"] for c in chips)
    assert cost["chips_unrecoverable"] == sum(c["selected_epochs"] is None for c in chips)
    assert cost["chips_missing_target"] == sum(c["status"] == "missed_target" for c in chips)
    for flag in ("dataset", "model", "array_rows", "fault_rates", "seed", "statistic"):
        assert flag in s["config"]
    with open(os.path.join(workdir, "chips.csv")) as fh:
        assert len(list(csv.DictReader(fh))) == len(chips)
    with open(os.path.join(workdir, "resilience.csv")) as fh:
        assert len(list(csv.DictReader(fh))) == f * a * k
    for png in plots.PLOT_NAMES:
        assert os.path.getsize(os.path.join(workdir, png)) > 1000
    assert "chips meeting the target (validation/test)" in proc.stdout
    # Decisions on the validation split, the test set for reporting.
    assert s["config"]["validation_fraction"] > 0 and s["baseline_test_accuracy"] is not None
    assert cost["chips_meeting_target_test"] == sum(
        c["test_accuracy_after"] >= s["target_accuracy"]
        and c["status"] != "diverged"
        and c["selected_epochs"] is not None
        for c in chips
    )
    pol = s["policies"]
    assert pol["reduce"]["train_epochs"] == pytest.approx(cost["reduce_epochs"])
    assert pol["reduce"]["chips_meeting_target"] == cost["chips_meeting_target"]
    assert pol["fixed"]["train_epochs"] == pytest.approx(cost["fixed_epochs"])
    assert pol["fixed"]["eval_passes"] == len(chips)
    assert pol["adaptive"]["train_epochs"] <= pol["fixed"]["train_epochs"] + 1e-9
    assert pol["adaptive"]["eval_passes"] >= len(chips)
    for p in ("fixed", "adaptive", "reduce"):
        assert pol[p]["compute_epochs"] > pol[p]["train_epochs"]  # evaluation costs too
    assert pol["unit"] == "compute_epochs"
    others = ("fixed", "adaptive", "adaptive_es", "online")  # in policies.POLICIES' order
    cheapest = min(others, key=lambda p: pol[p]["compute_epochs"])
    assert pol["cheapest_alternative"] == cheapest
    assert f"cheapest without Reduce: {cheapest}" in proc.stdout
    # Without a false rejection, early stops change no decision: the same training, the
    # same verifications, no more images evaluated.
    audit = pol["early_stop_audit"]["adaptive_es"]
    if audit["false_rejects"] == 0:
        assert pol["adaptive_es"]["train_epochs"] == pytest.approx(pol["adaptive"]["train_epochs"])
        assert audit["verifications"] == pytest.approx(len(chips) * pol["adaptive"]["rounds_mean"])
        assert pol["adaptive_es"]["eval_passes"] <= pol["adaptive"]["eval_passes"]
    assert pol["recommended"] in ("reduce", *others)
    assert f"recommended for {len(chips)} chips: {pol['recommended']}" in proc.stdout


@pytest.mark.slow
def test_smoke_run_does_not_log_platform_probing(smoke_run):
    _, _, proc = smoke_run
    assert "Unable to initialize backend" not in proc.stderr
    assert "baseline accuracy" in proc.stderr  # the run's own INFO lines still show


@pytest.mark.slow
def test_grouping_predictor_lines_and_importance_end_to_end(tmp_path):
    workdir = str(tmp_path / "grouped")
    proc = run_cli(
        f"--flagfile={SMOKE}",
        f"--workdir={workdir}",
        "--grouping=greedy",
        "--max_group_size=4",
        "--predictor_chips=6",
        "--fault_model=lines",
        "--line_fraction=0.5",
        "--chip_fault_rate=0.08",
        "--num_chips=12",
        "--rate_measure=importance",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grouped " in proc.stdout.splitlines()[-1]  # the headline gives the grouped cost
    with open(os.path.join(workdir, "summary.json")) as f:
        s = json.load(f)
    target, chips, groups, cost = s["target_accuracy"], s["chips"], s["groups"], s["cost"]
    assert s["resilience_map"]["rate_measure"] == "importance"
    assert all("importance_fault_rate" in c for c in chips)
    # Every retrained chip is served by exactly one final group that lists it.
    for c in chips:
        if c["status"] in ("above_grid", "unrecoverable"):
            assert c["group"] is None and c["grouped_meets_target"] is False
            continue
        g = groups[c["group"]]
        assert c["chip"] in g["members"] and not g["split"]
        j = g["members"].index(c["chip"])
        assert c["grouped_accuracy_after"] == g["member_accuracy"][j]
        assert c["grouped_meets_target"] == (c["grouped_accuracy_after"] >= target)
    for g in groups:
        assert 1 <= len(g["members"]) <= 4
        # The group's model gives the same accuracy on every member as on the fused chip.
        assert all(a == g["accuracy_after"] for a in g["member_accuracy"])
        if not g["split"]:
            assert g["meets_target"] == (min(g["member_accuracy"]) >= target)
    total = sum(g["amount_epochs"] + g["topup_epochs"] for g in groups)
    assert cost["grouped_epochs"] == pytest.approx(total)
    assert cost["groups"] == len(groups)
    planned = sum(g["amount_epochs"] for g in groups if g["split_from"] is None)
    assert planned <= cost["reduce_planned_epochs"] + 1e-9
    # Per-chip Reduce ran too, for the comparison: its cost is measured.
    per_chip = sum((c["selected_epochs"] or 0) + c["topup_epochs"] for c in chips)
    assert cost["reduce_epochs"] == pytest.approx(per_chip)
    study = s["predictor_study"]
    assert study["chips"] == 6 and len(study["needed_epochs"]) == 6
    assert set(study["measures"]) == {"pe", "effective", "importance"}
    for name in ("groups.csv", "predictor.csv", "cost_grouping.png", "predictor.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 100


@pytest.mark.slow
def test_rerun_reuses_baseline_and_gives_identical_summary(smoke_run):
    workdir, first, _ = smoke_run
    proc = run_cli(f"--flagfile={SMOKE}", f"--workdir={workdir}", env=USER_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        second = json.load(f)
    assert second["timing"]["baseline_reused"] is True
    assert without_timing(second) == without_timing(first)


@pytest.mark.slow
def test_a_run_from_the_compilation_cache_gives_the_same_summary(smoke_run, xla_cache, tmp_path):
    """A second study in a new workdir recomputes everything, its programs loaded from the
    cache the first one filled, and writes the same summary; every phase's compile seconds
    are reported, within the phase's seconds."""
    _, first, _ = smoke_run
    cached = set(os.listdir(xla_cache))
    assert any(name.endswith("-cache") for name in cached), cached
    workdir = tmp_path / "w"
    proc = run_cli(
        f"--flagfile={SMOKE}", f"--workdir={workdir}", f"--compilation_cache_dir={xla_cache}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads((workdir / "summary.json").read_text())
    assert second["timing"]["baseline_reused"] is False
    assert without_workdir(second) == without_workdir(first)
    for summary in (first, second):
        timing = summary["timing"]
        for phase in ("baseline", "analysis", "retrain", "policies"):
            assert 0 <= timing[f"{phase}_compile_s"] <= timing[f"{phase}_s"], timing


@pytest.mark.slow
def test_other_flags_into_same_workdir_refused(smoke_run):
    workdir, _, _ = smoke_run
    before = open(os.path.join(workdir, "summary.json")).read()
    proc = run_cli(f"--flagfile={SMOKE}", f"--workdir={workdir}", "--seed=1", env=USER_ENV)
    assert proc.returncode == 2
    assert "--overwrite" in proc.stderr and "seed" in proc.stderr
    assert open(os.path.join(workdir, "summary.json")).read() == before


# (arguments after the smoke flagfile and a --workdir, what the one line says); {tmp}: the
# folder of the files that _bad_inputs writes.
BAD_FLAGS = [
    (["--num_chips=0"], "--num_chips"),
    (["--fault_rates=0,0.5,0.2"], "--fault_rates"),
    (["--statistic=median"], "--statistic"),
    (["--retrain_epochs=0,1,x"], "--retrain_epochs"),
    (["--num_chips=abc"], "--num_chips"),
    (["--fault_rates=0,0.001,0.5"], "--fault_rates"),  # 0.001 of 64 PEs rounds to 0
    (["--fault_rates=0.1"], "--fault_rates=0.1 must start at 0 and have at least 2"),
    (["--retrain_epochs=0.5,1"], "--retrain_epochs=0.5,1 must start at 0"),
    (["--fixed_epochs=abc"], "--fixed_epochs=abc"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["--dataset=mnist", "--data_dir={tmp}/idx"], "train-images-idx3-ubyte"),
    (["--chip_fault_maps={tmp}/float_maps.npz"], "float_maps.npz"),
    (["--chip_fault_maps={tmp}/maps.csv"], "maps.csv"),
    (["--distributed_auto", "--num_processes=2"], "--distributed_auto"),
    (["--num_processes=2"], "--coordinator_address"),
    (["--compilation_cache_dir={tmp}/maps.csv/xla"], "--compilation_cache_dir"),
    (["--chip_batching=loop"], "--chip_batching"),
    (  # the smoke study's digits: 1,293 training images once 10% are held out
        ["--batch_size=100000"],
        "--batch_size=100000 is larger than the training split (1293 images after holding "
        "out --validation_fraction=0.1); use at most 1293",
    ),
    (["--flagfile={tmp}/notes.md"], "--flagfile={tmp}/notes.md is not a flagfile: line 2"),
]


def _bad_inputs(d) -> None:
    """The files that BAD_FLAGS name, in folder ``d``."""
    (d / "idx").mkdir()
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (d / "idx" / name).write_bytes(b"")
    (d / "idx" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03trunc")
    np.savez(d / "float_maps.npz", fault_maps=np.full((2, 8, 8), 0.5))
    (d / "maps.csv").write_text("chip,row,col\n0,9,1\n")  # row 9 on an 8x8 array
    # Prose with a flag in it (absl would read the prose as arguments, then the flag).
    (d / "notes.md").write_text("# Notes\nRun it so:\n\n--seed=1\n")


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, digits):
    """An npz of the digits (float images), npz files that do not fit, and checkpoints: of
    the smoke run's model (the MLP on 8x8 images) and of a smaller MLP."""
    import jax
    import orbax.checkpoint as ocp

    from reduce_jax.nets import models

    d = tmp_path_factory.mktemp("user_files")
    arrays = dict(
        x_train=digits.train_images,
        y_train=digits.train_labels,
        x_test=digits.test_images,
        y_test=digits.test_labels,
    )
    np.savez(d / "digits.npz", **arrays)
    np.savez(d / "no_y_test.npz", **{k: v for k, v in arrays.items() if k != "y_test"})
    # 100 images: enough for a stratified validation split of 10 classes.
    big = np.random.default_rng(0).random((100, 16, 16, 1), np.float32)
    labels = np.arange(100) % 10
    np.savez(d / "big.npz", x_train=big, y_train=labels, x_test=big, y_test=labels)
    for name, hidden in (("mlp_ckpt", (256, 256)), ("small_ckpt", (16,))):
        params = models.init_params(models.MLP(10, hidden), jax.random.key(0), (8, 8, 1))
        ocp.StandardCheckpointer().save(str(d / name), params)
    return d


@pytest.mark.slow
def test_init_checkpoint_of_a_run_and_npz_data_reproduce_it_without_training(
    smoke_run, user_files, tmp_path
):
    """The smoke run's baseline/ and its data as an npz file: a second run into another
    workdir measures that baseline (no training) and finds everything the first found."""
    first_dir, first, _ = smoke_run
    workdir = tmp_path / "second"
    proc = run_cli(
        f"--flagfile={SMOKE}",
        f"--workdir={workdir}",
        f"--init_checkpoint={first_dir}/baseline",
        "--dataset=npz",
        f"--data_dir={user_files / 'digits.npz'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline: epoch" not in proc.stderr and not (workdir / "baseline").exists()
    with open(workdir / "summary.json") as f:
        second = json.load(f)
    assert second["baseline_accuracy"] == first["baseline_accuracy"]
    assert second["baseline"] == dict(
        first["baseline"], steps=0, accuracy_at_training=None, source="checkpoint"
    )
    assert first["baseline"]["source"] == "trained" and first["baseline"]["steps"] > 0
    assert second["inputs"]["dataset"].startswith("npz@sha256:")
    assert second["inputs"] == dict(first["inputs"], dataset=second["inputs"]["dataset"])
    changed = dict(
        workdir=str(workdir),
        init_checkpoint=f"{first_dir}/baseline",
        dataset="npz",
        data_dir=str(user_files / "digits.npz"),
    )
    assert second["config"] == dict(first["config"], **changed)
    # Given weights judged on a split held out of the training set: said, though this
    # checkpoint was trained with that same split held out.
    assert first["warnings"] == []
    (warning,) = second["warnings"]
    assert warning.startswith(
        f"the baseline is given (--init_checkpoint={first_dir}/baseline) but the validation "
        "split is held out of the training set"
    )
    assert warning in proc.stderr  # logged too
    same = set(first) - {"baseline", "inputs", "config", "timing", "warnings"}
    assert {k: second[k] for k in same} == {k: first[k] for k in same}


# (arguments after the smoke flagfile and a --workdir, what the one line says); {d}: the
# folder of user_files.
BAD_FILES = [
    (["--dataset=npz", "--data_dir={d}/no_y_test.npz"], ["no_y_test.npz", "'y_test'"]),
    (["--init_checkpoint={d}/small_ckpt"], ["small_ckpt", "params/fc2/bias"]),
    (  # untrained weights of the smoke study's model
        ["--init_checkpoint={d}/mlp_ckpt"],
        [
            "--init_checkpoint={d}/mlp_ckpt: the baseline's validation accuracy",
            "is at or near chance on 144 validation images of 10 classes",
            "give trained weights",
        ],
    ),
    (
        ["--dataset=npz", "--data_dir={d}/big.npz", "--init_checkpoint={d}/mlp_ckpt"],
        ["mlp_ckpt", "params/fc1/kernel", "[64, 256]", "[256, 256]", "big.npz"],
    ),
]
EMPTY_WORKDIRS = ["", "  "]
CASES = os.path.join(ROOT, "tests", "cli_cases.py")


def run_cli_cases(module: str, cases: list[dict], tmp, env=ENV, timeout=300) -> list:
    """``python -m module ARGS`` for each case (``{"args", "cwd"}``), all in one process
    (tests/cli_cases.py): a ``subprocess.CompletedProcess`` per case."""
    given, got = tmp / "cases.json", tmp / "results.json"
    given.write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, CASES, module, str(given), str(got)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(got.read_text())
    return [
        subprocess.CompletedProcess(c["args"], r["code"], r["stdout"], r["stderr"])
        for c, r in zip(cases, results, strict=True)
    ]


@pytest.fixture(scope="module")
def cli_cases(tmp_path_factory, user_files):
    """Every case of BAD_FLAGS, BAD_FILES and EMPTY_WORKDIRS, each run as the CLI runs it
    (tests/cli_cases.py), all in one process: ``{(kind, arguments): (result, path)}``, the
    path being the case's --workdir (BAD_FLAGS, BAD_FILES) or the empty folder it ran in
    (EMPTY_WORKDIRS); ``["files"]``: the folder of BAD_FLAGS' files."""
    root = tmp_path_factory.mktemp("cli_cases")
    files = root / "files"
    files.mkdir()
    _bad_inputs(files)
    keys, cases, paths = [], [], []
    for kind, table, folder in (("flag", BAD_FLAGS, files), ("file", BAD_FILES, user_files)):
        for i, (args, _) in enumerate(table):
            workdir = root / f"{kind}{i}" / "w"
            given = [a.format(tmp=folder, d=folder) for a in args]
            keys.append((kind, tuple(args)))
            cases.append(
                dict(args=[f"--flagfile={SMOKE}", f"--workdir={workdir}", *given], cwd=ROOT)
            )
            paths.append(workdir)
    for i, workdir in enumerate(EMPTY_WORKDIRS):
        # Run from an empty directory: an empty --workdir used to mean "write here".
        cwd = root / f"empty{i}"
        cwd.mkdir()
        keys.append(("empty", workdir))
        cases.append(dict(args=[f"--flagfile={SMOKE}", f"--workdir={workdir}"], cwd=str(cwd)))
        paths.append(cwd)
    results = run_cli_cases("experiments.resilience", cases, root)
    out = {key: (r, p) for key, r, p in zip(keys, results, paths, strict=True)}
    out["files"] = files
    return out


@pytest.mark.parametrize("args, flag", BAD_FLAGS)
def test_bad_flag_gives_one_line_and_exit_code(cli_cases, args, flag):
    proc, workdir = cli_cases["flag", tuple(args)]
    one_line_error(proc, flag.format(tmp=cli_cases["files"]))
    assert not workdir.exists()  # nothing computed or written


@pytest.mark.parametrize("args, needles", BAD_FILES)
def test_bad_checkpoint_or_npz_gives_one_line_naming_file_and_key(
    cli_cases, user_files, args, needles
):
    proc, workdir = cli_cases["file", tuple(args)]
    for needle in needles:
        one_line_error(proc, needle.format(d=user_files))
    assert not workdir.exists()  # checked before the workdir is touched


@pytest.mark.parametrize("workdir", EMPTY_WORKDIRS)
def test_empty_workdir_is_refused_and_nothing_is_written(cli_cases, workdir):
    proc, cwd = cli_cases["empty", workdir]
    one_line_error(proc, "--workdir is empty")
    assert os.listdir(cwd) == []


def test_a_bad_flag_on_the_command_line_is_the_one_line_of_its_case(cli_cases, tmp_path):
    """The user's path, ``python -m experiments.resilience`` in a process of its own, refuses a
    bad flag with the same exit code and line as its case run in one process with the others
    (the cases above)."""
    workdir = tmp_path / "w"
    proc = run_cli(f"--flagfile={SMOKE}", f"--workdir={workdir}", "--num_chips=0", timeout=120)
    one_line_error(proc, "--num_chips=0")
    case, _ = cli_cases["flag", ("--num_chips=0",)]
    assert (proc.returncode, proc.stderr, proc.stdout) == (
        case.returncode,
        case.stderr,
        case.stdout,
    )
    assert not workdir.exists()


def test_help_lists_every_setting_and_not_other_modules_flags():
    proc = run_cli("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for f in dataclasses.fields(config_lib.ReduceConfig):
        name = f"[no]{f.name}" if isinstance(f.default, bool) else f.name
        assert f"  --{name}:" in text, f.name
    for name in ("coordinator_address", "num_processes", "process_id", "[no]overwrite", "seeds"):
        assert f"  --{name}:" in text, name
    for other in ("--chex_n_cpu_devices", "--test_srcdir", "--run_with_pdb", "--verbosity"):
        assert other not in text, other


BASE = config_lib.ReduceConfig(dataset="digits", model="mlp")


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(dataset="imagenet"), "--dataset"),
        (dict(model="resnet"), "--model"),
        (dict(array_rows=0), "--array_rows"),
        (dict(fault_model="gaussian"), "--fault_model"),
        (dict(fault_rates=(0.0, 1.5)), "--fault_rates"),
        (dict(fault_rates=(0.2, 0.1)), "strictly increasing"),
        (dict(fault_rates=()), "--fault_rates"),
        (dict(fault_rates=(0.1,)), "--fault_rates=0.1 must start at 0"),
        (dict(fault_rates=(0.05, 0.1)), "--fault_rates=0.05,0.1 must start at 0"),
        (dict(fault_rates=(0.0,)), "at least 2 points"),
        (dict(retrain_epochs=(0.5, 1.0)), "--retrain_epochs=0.5,1 must start at 0"),
        (dict(retrain_epochs=(0.0, -1.0)), "--retrain_epochs"),
        (dict(maps_per_rate=0), "--maps_per_rate"),
        (dict(num_chips=0), "--num_chips"),
        (dict(chip_fault_rate=1.2), "--chip_fault_rate"),
        (dict(max_accuracy_drop=None), "exactly one"),
        (dict(target_accuracy=0.9), "exactly one"),
        (dict(max_accuracy_drop=None, target_accuracy=1.5), "--target_accuracy"),
        (dict(validation_margin=-0.01), "--validation_margin=-0.01 is outside [0, 0.5]"),
        (dict(validation_margin=0.6), "--validation_margin"),
        (
            dict(max_accuracy_drop=None, target_accuracy=0.99, validation_margin=0.02),
            "plus --validation_margin=0.02 must be <= 1",
        ),
        (dict(statistic="quantile:1.5"), "--statistic"),
        (dict(interpolation="cubic"), "--interpolation"),
        (dict(statistic="median"), "or auto"),
        (dict(validation_fraction=0.0), "--validation_fraction"),
        (dict(validation_fraction=0.6), "--validation_fraction"),
        (dict(eval_every=-0.1), "--eval_every"),
        (dict(adaptive_max_epochs=0.0), "--adaptive_max_epochs"),
        (dict(rate_measure="area"), "--rate_measure"),
        (dict(line_fraction=1.5), "--line_fraction"),
        (dict(predictor_chips=-1), "--predictor_chips"),
        (dict(grouping="optimal"), "--grouping"),
        (dict(max_group_size=1), "--max_group_size"),
        (dict(fixed_epochs=0.0), "--fixed_epochs"),
        (dict(topup_epochs=0.0), "--topup_epochs"),
        (dict(arithmetic="int4"), "--arithmetic='int4'; allowed: float32, int8"),
        (dict(verify_slices=0), "--verify_slices=0 is outside [1, 1024]"),
        (dict(verify_alpha=0.6), "--verify_alpha=0.6 is outside [0, 0.5]"),
        (dict(online_batch=0), "--online_batch=0 is outside"),
        (dict(online_quantile=1.0), "--online_quantile=1.0 is outside (0, 1)"),
        (dict(online_confidence=0.0), "--online_confidence=0.0 is outside (0, 1)"),
        (dict(online_min_evidence=-1), "--online_min_evidence=-1 is outside"),
        (dict(batch_size=0), "--batch_size"),
        (dict(optimizer="lamb"), "--optimizer"),
        (dict(learning_rate=0.0), "--learning_rate"),
        (dict(model_width=0.0), "--model_width=0.0 is outside (0, 16]"),
        (dict(model_width=float("nan")), "--model_width"),
        (dict(augment="yes"), "--augment='yes'; allowed: auto, on, off"),
        (dict(weight_decay=-1e-4), "--weight_decay"),
        (dict(baseline_weight_decay=2.0), "--baseline_weight_decay"),
        (dict(baseline_schedule="step"), "--baseline_schedule='step'; allowed: constant, cosine"),
        (dict(chips_per_batch=0), "--chips_per_batch"),
        (dict(topup_pool_chunks=0), "--topup_pool_chunks=0 is outside [1, 1024]"),
        (dict(dataset="mnist"), "--data_dir"),
        (dict(data_dir="/tmp"), "--data_dir=/tmp is given but --dataset=digits reads no files"),
        (dict(dataset="cifar10", data_dir="/nonexistent"), "/nonexistent"),
        (dict(chip_fault_maps="/nonexistent/maps.npz"), "maps.npz"),
        (dict(init_checkpoint="/nonexistent/ckpt"), "--init_checkpoint=/nonexistent/ckpt"),
        (dict(init_checkpoint=os.path.dirname(__file__)), "not an orbax checkpoint"),
        (dict(dataset="npz"), "--data_dir=FILE.npz"),
        (dict(dataset="npz", data_dir=__file__), "not a readable .npz"),
        (dict(workdir="/proc/nope/run"), "--workdir"),
        (dict(workdir=__file__ + "/run"), "--workdir"),
        (dict(workdir=__file__), "--workdir"),
        (dict(workdir=""), "--workdir is empty"),
        (dict(workdir=" \t"), "--workdir is empty"),
    ],
)
def test_validate_rejects_bad_settings(changes, needle):
    cfg = dataclasses.replace(BASE, **changes)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("measure", ["pe", "effective", "importance"])
def test_grid_too_fine_for_the_array_is_rejected_before_training(tmp_path, measure):
    # On an 8x8 array, rates 0.1 and 0.101 both give 6 faulty PEs: the grid cannot be
    # resolved, whatever measure reads the map.
    workdir = tmp_path / "w"
    cfg = dataclasses.replace(
        BASE,
        array_rows=8,
        array_cols=8,
        fault_rates=(0.0, 0.1, 0.101),
        rate_measure=measure,
        workdir=str(workdir),
    )
    with pytest.raises(config_lib.ConfigError, match="--fault_rates.*not increasing"):
        pipeline.run(cfg)
    assert not workdir.exists()


def test_validate_rejects_fault_map_file_of_wrong_size(tmp_path):
    path = str(tmp_path / "maps.npz")
    np.savez(path, fault_maps=np.zeros((3, 4, 4), bool))
    cfg = dataclasses.replace(BASE, chip_fault_maps=path, array_rows=8, array_cols=8)
    with pytest.raises(config_lib.ConfigError, match="--chip_fault_maps.*4x4"):
        config_lib.validate(cfg)


def test_validate_accepts_defaults():
    config_lib.validate(config_lib.ReduceConfig())


# Runs the CLI and stops it when the code reaches a given point (tests/kill_after_chunk.py).
STOPPER = os.path.join(ROOT, "tests", "kill_after_chunk.py")
SAVED_HINT = "finished work is saved in {w}: " + RESUME_HINT
NOTHING_HINT = "before any work was saved in {w}: run the same command to start over"


@pytest.mark.slow
def test_stopped_ten_times_with_sigterm_or_sigint_then_resumed_equals_uninterrupted(
    smoke_run, tmp_path
):
    """Each stop: exit 130 and a hint that says what was saved, never a crash; progress
    stays readable.

    One workdir is stopped over and over, each time at the next point of the run (the runs
    resume in between, so the stops walk through startup, baseline, analysis, retraining and
    the outputs); then one run finishes it. Every stop is triggered by the run reaching its
    point (the process signals itself there), so none depends on the machine's speed.
    """
    _, reference, _ = smoke_run
    workdir = tmp_path / "w"
    stops = [  # (stop point, what a rerun finds saved: nothing, the baseline, chunks)
        ("SIGTERM@validate", None),
        ("SIGINT@load_data", None),
        ("SIGTERM@train_baseline", None),
        ("SIGINT@save_baseline", None),  # trained, not yet saved
        ("SIGTERM@saved_baseline", {}),
        ("SIGINT@before:analysis", {}),  # the first chunk computed, not yet saved
        ("SIGTERM@after:analysis", {"analysis": 1}),
        ("SIGINT@before:retrain", {"analysis": 1}),
        ("SIGTERM@after:retrain", {"analysis": 1, "retrain": 1}),
        # summary.json written, the other outputs not yet (the policies' phases saved too).
        ("SIGINT@summary.json", {"analysis": 1, "retrain": 1}),
    ]
    for stop, saved in stops:
        proc = subprocess.run(
            [sys.executable, STOPPER, stop, f"--flagfile={SMOKE}", f"--workdir={workdir}"],
            cwd=ROOT,
            env=USER_ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        err = proc.stderr
        assert proc.returncode == 130, f"{stop}: exit code {proc.returncode}\n{err[-3000:]}"
        assert "Fatal Python error" not in err and "Traceback" not in err, f"{stop}\n{err}"
        name = stop.split("@")[0]
        if saved is None:
            hint = f"interrupted ({name}) " + NOTHING_HINT.format(w=workdir)
            assert not (workdir / "baseline.json").exists(), stop
        else:
            hint = f"interrupted ({name}); " + SAVED_HINT.format(w=workdir)
            assert (workdir / "baseline.json").exists(), stop
        assert err.strip().splitlines()[-1] == hint, f"{stop}\n{err[-3000:]}"
        if stop in ("SIGTERM@validate", "SIGINT@load_data"):
            assert not workdir.exists(), stop  # stopped before anything was written
        phases = {}
        if (workdir / "progress.json").exists():
            phases = json.loads((workdir / "progress.json").read_text())["phases"]
        counts = {k: len(v) for k, v in phases.items() if v}
        if stop.endswith("summary.json"):
            assert (saved or {}).items() <= counts.items() and len(counts) > 2, (stop, counts)
            assert (workdir / "summary.json").exists() and not (workdir / "chips.csv").exists()
        else:
            assert counts == (saved or {}), (stop, counts)
    proc = run_cli(f"--flagfile={SMOKE}", f"--workdir={workdir}", env=USER_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((workdir / "summary.json").read_text())
    assert without_workdir(resumed) == without_workdir(reference)
    assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]
