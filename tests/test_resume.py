"""Interrupted runs resume to the same result; results do not depend on chunk size; a
diverging chip is reported and does not stop the run."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from reduce_jax import pipeline
from reduce_jax.engine import population
from reduce_jax.stages import retraining

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "configs", "smoke.flags")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def cli(workdir, *extra):
    return [
        sys.executable,
        "-m",
        "experiments.resilience",
        f"--flagfile={SMOKE}",
        f"--workdir={workdir}",
        *extra,
    ]


def finish(workdir, *extra) -> dict:
    proc = subprocess.run(
        cli(workdir, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def kill_when(workdir, phase: str, *extra) -> int:
    """Runs to the first saved chunk of ``phase`` and SIGKILLs the run there (from inside the
    process, so the kill point does not depend on machine load); returns the chunks of
    ``phase`` saved."""
    launcher = os.path.join(ROOT, "tests", "kill_after_chunk.py")
    command = [sys.executable, launcher, phase, *cli(workdir, *extra)[3:]]
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    with open(os.path.join(workdir, "progress.json")) as f:
        return len(json.load(f)["phases"].get(phase, {}))


def strip(summary, *config_keys):
    """The summary less timing, the workdir and the given config keys."""
    out = {k: v for k, v in summary.items() if k != "timing"}
    drop = ("workdir", *config_keys)
    out["config"] = {k: v for k, v in summary["config"].items() if k not in drop}
    return out


@pytest.mark.slow
def test_killed_twice_then_resumed_equals_uninterrupted_and_chunk_size_does_not_matter(
    tmp_path,
):
    # analysis: 3 chunks; retraining: 4 chunks, each its own top-up pool; the target is
    # tighter than the smoke study's, so that chips of several chunks are topped up.
    small_chunks = ("--chips_per_batch=2", "--topup_pool_chunks=1", "--max_accuracy_drop=0.03")
    reference = finish(str(tmp_path / "reference"), *small_chunks)

    workdir = str(tmp_path / "killed")
    saved = kill_when(workdir, "analysis", *small_chunks)
    assert saved < 3, "killed too late to test resuming the analysis"
    kill_when(workdir, "retrain", *small_chunks)
    with open(os.path.join(workdir, "progress.json")) as f:
        progress = json.load(f)["phases"]
    assert len(progress["analysis"]) == 3 and 1 <= len(progress["retrain"]) < 4
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    resumed = finish(workdir, *small_chunks)
    assert strip(resumed) == strip(reference)

    # Chunks of 3 in pools of 2 chunks: 6 chips whose top-ups are pooled, then 2 (padded).
    other = finish(
        str(tmp_path / "pooled"),
        "--chips_per_batch=3",
        "--topup_pool_chunks=2",
        "--max_accuracy_drop=0.03",
    )
    assert sum(c["topup_epochs"] > 0 for c in other["chips"]) >= 2  # top-ups to pool
    keys = ("chips_per_batch", "topup_pool_chunks")
    assert strip(other, *keys) == strip(reference, *keys)


@pytest.mark.slow
def test_grouped_run_killed_in_its_group_retraining_resumes_to_the_same_result(tmp_path):
    flags = ("--grouping=greedy", "--max_group_size=2", "--chips_per_batch=1")
    flags += ("--topup_pool_chunks=1",)  # one saved chunk per group
    reference = finish(str(tmp_path / "reference"), *flags)
    groups = sum(len(g["members"]) > 1 for g in reference["groups"])
    assert groups >= 2
    workdir = str(tmp_path / "killed")
    saved = kill_when(workdir, "grouped", *flags)
    assert saved < groups, "killed too late"
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    assert strip(finish(workdir, *flags)) == strip(reference)


def stop_at(workdir, stop: str, *extra) -> subprocess.CompletedProcess:
    """Runs the CLI until the code reaches ``stop`` (``SIGNAL@POINT``: the process sends
    itself the signal there; tests/kill_after_chunk.py)."""
    launcher = os.path.join(ROOT, "tests", "kill_after_chunk.py")
    command = [sys.executable, launcher, stop, *cli(workdir, *extra)[3:]]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_a_stop_says_whether_any_work_was_saved(tmp_path):
    workdir = tmp_path / "w"
    # At startup: the workdir does not exist yet, and nothing is said to be saved in it.
    proc = stop_at(workdir, "SIGINT@validate")
    assert proc.returncode == 130, proc.stderr[-3000:]
    hint = proc.stderr.strip().splitlines()[-1]
    assert hint == (
        f"interrupted (SIGINT) before any work was saved in {workdir}: run the same command "
        "to start over"
    )
    assert not workdir.exists()
    # Once the baseline is saved, a rerun resumes from it.
    proc = stop_at(workdir, "SIGTERM@saved_baseline", "--baseline_epochs=1")
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"interrupted (SIGTERM); finished work is saved in {workdir}: run the same command "
        "to resume"
    )
    assert (workdir / "baseline.json").exists() and not (workdir / "progress.json").exists()


@pytest.mark.slow
def test_diverging_chip_is_reported_and_run_goes_on(tmp_path, monkeypatch, small_run_config):
    cfg = small_run_config(
        str(tmp_path / "w"),
        chip_fault_rate=0.15,
        baseline_epochs=5,
        chips_per_batch=8,
        topup_epochs=0.5,
    )
    original = population.init_chunk
    sabotaged = []

    def init_chunk(trainer, variables, maps, budgets):
        states, masks = original(trainer, variables, maps, budgets)
        victim = int(np.argmax(budgets))  # the chip that trains longest
        lr = states.opt_state.hyperparams["learning_rate"]
        states.opt_state.hyperparams["learning_rate"] = lr.at[victim].set(1e30)
        sabotaged.append(victim)
        return states, masks

    original_retrain = retraining.retrain

    def retrain(*args, **kwargs):
        # Only retraining's chunks: the policies compared after it start chunks of their own.
        monkeypatch.setattr(population, "init_chunk", init_chunk)
        try:
            return original_retrain(*args, **kwargs)
        finally:
            monkeypatch.setattr(population, "init_chunk", original)

    monkeypatch.setattr(retraining, "retrain", retrain)
    summary = pipeline.run(cfg).to_json()
    diverged = [c for c in summary["chips"] if c["status"] == "diverged"]
    assert len(sabotaged) == 1 and len(diverged) == 1
    assert not diverged[0]["meets_target"] and diverged[0]["topup_epochs"] == 0
    assert summary["cost"]["chips_diverged"] == 1
    others = [c for c in summary["chips"] if c["status"] != "diverged"]
    assert all(np.isfinite(c["accuracy_after"]) for c in others)
    assert sum(c["meets_target"] for c in others) >= len(others) - 1
