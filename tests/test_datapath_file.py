"""experiments/datapath.py with ``--stuck_at_file``: a bad file is refused before any compute
in one line naming the flag, the file and the line; the file's chips are each measured under
every mitigation."""

import json
import os
import subprocess
import sys

import pytest

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
