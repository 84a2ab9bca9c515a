"""The population benchmark's smoke mode prints one JSON line with every documented key;
benchmarks/gpu.sh (CPU test mode), its collector and the benchmark's memory planning."""

import json
import os
import re
import subprocess
import sys

import numpy as np
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
def test_quick_benchmark_prints_every_key(tmp_path):
    """The run's settings come from the config's flags (``--batch_size``); the lines printed
    are also written into ``--results_dir``, whose path is printed."""
    results = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.population",
            "--quick",
            "--batch_size=64",
            f"--results_dir={results}",
        ],
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
    assert row["batch_size"] == 64 and row["array"] == row["array_cols"] == 8
    (written,) = results.iterdir()
    assert written.name.startswith("population-") and str(written) in proc.stderr
    assert [json.loads(ln) for ln in written.read_text().splitlines()] == lines
    assert row["population_chip_steps_per_s"] > 0 and row["loop_chip_steps_per_s"] > 0
    assert row["speedup"] == pytest.approx(
        row["population_chip_steps_per_s"] / row["loop_chip_steps_per_s"], rel=0.02
    )
    assert 0 < row["fraction_of_matmul_peak"]


# --- benchmarks/gpu.sh and what it runs ------------------------------------------------------

if ROOT not in sys.path:  # benchmarks/ runs from the checkout; it is not installed
    sys.path.insert(0, ROOT)

MB = 1 << 20


def test_synthetic_cifar_is_cifar_shaped_and_deterministic():
    from benchmarks import population as bench

    a = bench.load_dataset("synthetic_cifar", ("40", "10"), seed=3)
    b = bench.load_dataset("synthetic_cifar", ("40", "10"), seed=3)
    assert a.image_shape == (32, 32, 3) and a.num_classes == 10
    assert len(a.train_labels) == 40 and len(a.test_labels) == 10
    assert a.train_images.dtype == np.float32 and a.train_labels.dtype == np.int32
    assert 0 <= a.train_images.min() and a.train_images.max() < 1
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    c = bench.load_dataset("synthetic_cifar", ("40", "10"), seed=4)
    assert not np.array_equal(a.train_images, c.train_images)
    from reduce_jax import data

    assert "synthetic_cifar" not in data.DATASETS  # not one of the library's datasets


def test_chunk_candidates_divide_n_in_multiples_of_the_devices():
    from benchmarks import population as bench

    assert bench.chunk_candidates(12) == [12, 6, 4, 3, 2, 1]
    assert bench.chunk_candidates(1024, 4)[:3] == [1024, 512, 256]
    assert all(c % 4 == 0 for c in bench.chunk_candidates(1024, 4))


@pytest.mark.slow
def test_bench_chunks_to_fit_the_memory_and_skips_what_cannot_fit(
    digits, tiny_mlp, tiny_mlp_variables
):
    from benchmarks import population as bench
    from reduce_jax import config

    cache = {}
    kw = dict(trials=1, memory_fraction=1.0, cache=cache)
    cfg = config.ReduceConfig(batch_size=32, array_rows=8, array_cols=8)
    args = (cfg, digits, tiny_mlp, tiny_mlp_variables, 1.0, 1)
    whole = bench.bench(4, *args, **kw)
    assert whole["chips_per_batch"] == 4 and whole["planned_mb"] > 0
    for key in KEYS + ("peak_device_mb", "jax_version", "backend", "device_kind"):
        assert key in whole

    # Just under what 4 chips at once need: the chips run in smaller chunks.
    limit = int((whole["planned_mb"] - 0.002) * MB)
    chunked = bench.bench(4, *args, memory_limit=limit, **kw)
    assert chunked["chips_per_batch"] in (1, 2)
    assert chunked["planned_mb"] * MB <= limit + 0.001 * MB
    assert chunked["population_chip_steps_per_s"] > 0 and chunked["loop_chip_steps_per_s"] > 0

    # Nothing fits, or the chunk asked for does not: one line that says why, nothing run.
    for row in (
        bench.bench(4, *args, memory_limit=1024, **kw),
        bench.bench(4, *args, memory_limit=limit, chips_per_batch=4, **kw),
    ):
        assert row["chips"] == 4 and "fits in" in row["skipped"]
        assert row["needed_mb"] > 0 and "population_chip_steps_per_s" not in row


def test_collect_writes_one_json_and_a_table(tmp_path):
    from benchmarks import collect

    out = tmp_path / "out"
    out.mkdir()
    (out / "env.json").write_text(
        json.dumps(dict(device_kind="NVIDIA H200", backend="gpu", jax_version="0.11.2"))
    )
    row = dict(chips=32, model="LeNet5", dataset="mnist5k", population_chip_steps_per_s=10.0)
    skipped = dict(chips=1024, model="VGGSmall", dataset="synthetic_cifar", skipped="too big")
    (out / "bench-lenet5.log").write_text(f"I0 log line\n{json.dumps(row)}\n{{cut")
    (out / "bench-vgg_small.log").write_text(json.dumps(skipped) + "\n")
    summary = dict(
        timing=dict(wall_s=12.5),
        baseline_accuracy=0.98,
        chips=[dict(status="ok"), dict(status="ok"), dict(status="unrecoverable")],
        cost=dict(reduce_epochs=3.0, fixed_epochs=8.0, chips_meeting_target=2),
    )
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    parts = ["bench-lenet5:0:20.5", "study:0:30.5", "bench-vgg_small:124:200.0"]
    argv = ["collect", "--outdir", str(out), "--study_summary", str(tmp_path / "summary.json")]
    argv += ["--study_flagfile", "default.flags"] + [a for p in parts for a in ("--part", p)]
    assert collect.main(argv) == 0
    (path,) = out.glob("nvidia-h200-*.json")
    result = json.loads(path.read_text())
    assert result["device"] == "nvidia-h200" and result["jax_version"] == "0.11.2"
    assert result["benchmarks"]["lenet5"] == [row]
    assert result["benchmarks"]["vgg_small"] == [skipped]
    assert result["parts"]["bench-vgg_small"] == dict(rc=124, wall_s=200.0)
    study = result["study"]
    assert study["wall_s"] == 30.5 and study["exit_code"] == 0
    assert study["summary"]["statuses"] == dict(ok=2, unrecoverable=1)
    assert study["summary"]["timing"]["wall_s"] == 12.5
    table = result["table_md"]
    assert "| LeNet5 | mnist5k | 32 |" in table and "skipped: too big" in table
    assert "exit code 124" in table and "wall time 30.5 s" in table
    assert len({line.count("|") for line in table.splitlines() if line.startswith("|")}) == 1


@pytest.mark.slow
def test_gpu_script_in_cpu_test_mode_collects_every_part(tmp_path):
    """benchmarks/gpu.sh end to end on the CPU (tiny sizes, smoke study): one folder, one JSON."""
    out = tmp_path / "out"
    env = dict(os.environ, REDUCE_GPU_SH_CPU_TEST="1", PYTHON=sys.executable, TMPDIR=str(tmp_path))
    env.pop("OUT", None)
    env.pop("REDUCE_GPU_PARTS", None)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    (path,) = out.glob("cpu-*.json")
    result = json.loads(path.read_text())
    assert result["cpu_test"] and result["backend"] == "cpu" and result["jax_version"]
    names = ("lenet5", "vgg_small")  # CPU test mode: not the ResNets
    assert set(result["parts"]) == {"study", *(f"bench-{n}" for n in names)}
    assert all(p["rc"] == 0 and p["wall_s"] > 0 for p in result["parts"].values())
    for name in names:
        (row,) = result["benchmarks"][name]
        assert row["model_name"] == name
        assert row["dataset"] == ("mnist5k" if name == "lenet5" else "synthetic_cifar")
        for key in KEYS + ("peak_device_mb", "jax_version", "backend", "device_kind"):
            assert key in row
    study = result["study"]
    assert study["flagfile"].endswith("smoke.flags") and study["wall_s"] > 0
    assert study["summary"]["timing"]["wall_s"] > 0 and study["summary"]["chips"] == 8
    assert "| lenet5 | mnist5k |" in result["table_md"]
    assert "| vgg_small | synthetic_cifar |" in result["table_md"] and "smoke.flags" in proc.stdout
    # The result folder stays small and flat: at most 8 plain files, plainly named.
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    assert all((out / n).is_file() for n in names) and "gpu.log" in names
    assert list(tmp_path.glob("reduce_jax_study.*")) == []  # the study's workdir is removed


def test_gpu_script_fails_fast_without_a_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
    env.pop("REDUCE_GPU_SH_CPU_TEST", None)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout[-2000:]
    assert "not a GPU" in proc.stdout and "REDUCE_GPU_SH_CPU_TEST=1" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["env.json", "gpu.log"]


# --- benchmarks/efficiency.py -------------------------------------------------------------------


def test_retraining_efficiency_counts_steps_and_evaluations():
    from benchmarks import efficiency

    # As in chips.csv: a chip with 2 top-up increments of 5 steps, one with a last increment
    # cut to 3 steps, one not topped up, one not retrained and one selected for 0 steps but
    # topped up once (evaluated before, and after its increment).
    chips = [
        dict(selected_steps="20", topup_steps="10"),
        dict(selected_steps="10", topup_steps="8"),
        dict(selected_steps="15", topup_steps="0"),
        dict(selected_steps="", topup_steps="0"),
        dict(selected_steps="0", topup_steps="5"),
    ]
    steps, evals = efficiency.retrain_work(chips, topup_steps=5, val_images=100, test_images=40)
    assert steps == 20 + 10 + 10 + 8 + 15 + 5
    # Validation passes for the decisions, one test pass per chip for the report.
    assert evals == (4 + 4 + 2 + 1 + 2) * 100 + 5 * 40
    rows = [dict(chips=8, error="x"), *(dict(chips=n, population_chip_steps_per_s=10.0 * n,
            eval_chip_evals_per_s=1000.0) for n in (8, 32, 128))]  # fmt: skip
    assert efficiency.benchmark_row(rows, 32)["chips"] == 32
    assert efficiency.benchmark_row(rows, 64)["chips"] == 32  # the nearest
    assert efficiency.benchmark_row(rows, 80)["chips"] == 128  # the larger on a tie
    bench = efficiency.benchmark_row(rows, 30)
    summary = dict(
        config=dict(topup_epochs=0.5, chips_per_batch=30),
        baseline=dict(steps_per_epoch=10),
        timing=dict(retrain_s=10.0, retrain_compile_s=2.0),
    )
    out = efficiency.efficiency(summary, chips, bench, 100, 40)
    # 68 steps at 320/s and 1,500 evaluations at 1,000/s, against 10 s measured, 2 of them
    # compiling.
    assert out["chip_steps"] == 68 and out["chip_evals"] == 1500
    assert out["efficiency"] == round((68 / 320 + 1.5) / 10, 3)
    assert out["efficiency_without_compile"] == round((68 / 320 + 1.5) / 8, 3)
