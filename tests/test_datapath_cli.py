"""experiments/datapath.py: every bad flag is refused before any compute, in one line naming
the flag and its allowed range (exit code 2), a bad ``--stuck_at_file`` naming the file and
the line; a small study on digits writes its outputs, and measures a file's chips one by
one."""

import json
import os
import subprocess
import sys

import pytest
from test_cli import run_cli_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.datapath", *args],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


BAD_FLAGS = [
    ("--fault_rates=0,1.5", "--fault_rates=1.5 is out of range [0, 1]"),
    ("--site_probs=0.5,0.5", "--site_probs=0.5,0.5 must be three probabilities"),
    ("--zhang_pes=0", "--zhang_pes=0 is out of range [1, 256]"),
    ("--bits=low", "--bits='low' is not one of uniform, high, msb"),
]


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
    """Each of BAD_FLAGS given to the CLI as ``python -m experiments.datapath`` runs it, all in
    one process (tests/cli_cases.py): ``{flag: (result, its --workdir)}``."""
    root = tmp_path_factory.mktemp("datapath_cases")
    workdirs = [root / f"w{i}" for i in range(len(BAD_FLAGS))]
    cases = [
        dict(args=[f"--workdir={w}", flag], cwd=ROOT)
        for w, (flag, _) in zip(workdirs, BAD_FLAGS, strict=True)
    ]
    results = run_cli_cases("experiments.datapath", cases, root)
    return {flag: (r, w) for (flag, _), r, w in zip(BAD_FLAGS, results, workdirs, strict=True)}


@pytest.mark.parametrize("flag, says", BAD_FLAGS)
def test_a_bad_flag_is_one_line_naming_it(bad_flag_runs, flag, says):
    proc, workdir = bad_flag_runs[flag]
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: {says}")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not workdir.exists()  # refused before anything was made


def test_workdir_is_required():
    proc = _run()
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --workdir is required (the output directory)"
    )


@pytest.mark.slow
def test_a_small_study_writes_its_tables_and_plot(tmp_path):
    workdir = tmp_path / "study"
    proc = _run(
        f"--workdir={workdir}",
        "--dataset=digits",
        "--model=mlp",
        "--model_width=0.25",
        "--array_rows=8",
        "--array_cols=8",
        "--baseline_epochs=3",
        "--fault_rates=0,0.2",
        "--chips_per_rate=2",
        "--retrain_epochs=0.25",
        "--zhang_pes=1",
        "--zhang_chips=2",
        "--calibration_images=200",
        "--compilation_cache_dir=",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((workdir / "results.json").read_text())
    assert out["int8_mitigations"] == ["none", "bypass", "bypass+retrain", "fault-aware"]
    assert [r["rate"] for r in out["by_rate"]] == [0.0, 0.2]
    assert abs(out["int8_ptq"]["test"] - out["float32"]["test"]) < 0.05
    clean = out["by_rate"][0]["int8"]["test"]["mean"]
    assert clean[0] == clean[1] == out["int8_ptq"]["test"]  # no faults: none is bypass
    assert (workdir / "datapath_mlp.png").stat().st_size > 1000
    assert "| PE rate |" in (workdir / "report.md").read_text()


@pytest.mark.slow
def test_the_benchmark_times_the_three_steps_in_one_run():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.datapath", "--quick", "--results_dir="],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    for name in ("float32", "int8", "int8_psum"):
        assert row[f"{name}_chip_steps_per_s"] > 0
    ratio = row["float32_chip_steps_per_s"] / row["int8_psum_chip_steps_per_s"]
    assert row["int8_psum_over_float32"] == pytest.approx(ratio, rel=0.05)


def test_a_bad_stuck_at_file_is_one_line_naming_flag_file_and_line(tmp_path):
    path = tmp_path / "chips.csv"
    path.write_text("chip,row,col,site,bit,value\n0,1,2,weight,9,1\n")
    proc = _run(f"--workdir={tmp_path / 'w'}", "--array_rows=8", f"--stuck_at_file={path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: --stuck_at_file: {path}: line 2: bit=9 is out of range")
    assert not (tmp_path / "w").exists()  # refused before anything was made


@pytest.mark.slow
def test_the_files_chips_are_measured_one_by_one(tmp_path):
    path = tmp_path / "chips.csv"
    path.write_text(
        "# chips=3 rows=8 cols=8\n"
        "chip,row,col,site,bit,value\n"
        "0,0,0,weight,7,1\n"
        "1,2,3,psum,31,1\n"
        "1,5,5,product,15,0\n"
    )  # chip 2: fault-free
    workdir = tmp_path / "study"
    proc = _run(
        f"--workdir={workdir}",
        "--dataset=digits",
        "--model=mlp",
        "--model_width=0.25",
        "--array_rows=8",
        "--array_cols=8",
        "--baseline_epochs=3",
        "--fault_rates=0",
        "--chips_per_rate=1",
        "--retrain_epochs=0.25",
        "--zhang_chips=0",
        "--calibration_images=200",
        f"--stuck_at_file={path}",
        "--compilation_cache_dir=",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((workdir / "results.json").read_text())
    chips = out["file"]
    assert [c["faulty_pes"] for c in chips] == [1, 2, 0]
    assert chips[1]["stuck_bits"] == {"weight": 0, "product": 1, "psum": 1}
    clean = chips[2]["int8"]
    # A fault-free chip: unmitigated is bypassed is the int8 baseline.
    assert clean["none"]["test"] == clean["bypass"]["test"] == out["int8_ptq"]["test"]
    assert set(chips[0]["float32"]) == {"bypass", "bypass+retrain"}
    assert "The chips of" in (workdir / "report.md").read_text()
