"""The population benchmark's smoke mode prints one JSON line with every documented key."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = (
    "chips",
    "population_chip_steps_per_s",
    "loop_chip_steps_per_s",
    "speedup",
    "eval_chip_evals_per_s",
    "compile_s",
    "peak_rss_mb",
    "step_gflops",
    "matmul_gflops",
    "fraction_of_matmul_peak",
)


@pytest.mark.slow
def test_quick_benchmark_prints_every_key():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.population", "--quick"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    row = lines[0]
    for key in KEYS:
        assert key in row
    assert row["population_chip_steps_per_s"] > 0 and row["loop_chip_steps_per_s"] > 0
    assert row["speedup"] == pytest.approx(
        row["population_chip_steps_per_s"] / row["loop_chip_steps_per_s"], rel=0.02
    )
    assert 0 < row["fraction_of_matmul_peak"]
