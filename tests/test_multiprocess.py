"""A real multi-process run: 2 processes on this machine (localhost coordinator, CPU
collectives), 2 CPU devices each, killed with SIGKILL and resumed, against one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The grouped smoke study (every stage but the predictor study), 2 chunks per retraining,
# pooled for the top-ups.
FLAGS = [
    "--flagfile=experiments/configs/smoke.flags",
    "--grouping=greedy",
    "--baseline_epochs=5",
    "--chips_per_batch=4",
]
TIMEOUT_S = 300  # per run; the runs below take 20-60 s on 2 CPU cores


def _env(devices: int) -> dict:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=ROOT,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir: str, log: str, devices: int, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.resilience", *FLAGS, f"--workdir={workdir}", *args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=f, stderr=f)


def _start_two(workdir: str, logs: list[str]) -> list[subprocess.Popen]:
    address = f"--coordinator_address=localhost:{_free_port()}"
    return [
        _start(workdir, logs[i], 2, address, "--num_processes=2", f"--process_id={i}")
        for i in range(2)
    ]


def _wait_all(procs: list[subprocess.Popen], logs: list[str]) -> None:
    for p, log in zip(procs, logs, strict=True):
        assert p.wait(timeout=TIMEOUT_S) == 0, open(log).read()[-3000:]


def _saved_phases(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, "progress.json")) as f:
            return json.load(f)["phases"]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _comparable(workdir: str) -> dict:
    """``summary.json`` without what may differ between the runs (timing, workdir)."""
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    del summary["timing"], summary["config"]["workdir"]
    return summary


@pytest.mark.slow
def test_two_processes_killed_and_resumed_equal_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
    resumed_logs = [str(tmp_path / f"p{i}-resumed.log") for i in range(2)]
    procs = []
    try:
        single = _start(one, str(tmp_path / "one.log"), 1)
        _wait_all([single], [str(tmp_path / "one.log")])

        # Both processes are killed once the per-chip retraining has saved its first chunk.
        procs = _start_two(two, logs)
        deadline = time.monotonic() + TIMEOUT_S
        while "retrain" not in _saved_phases(two):
            assert all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:]
            assert time.monotonic() < deadline, "no retraining chunk saved in time"
            time.sleep(0.1)
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
        assert "grouped" not in _saved_phases(two)  # killed before the end
        text = [open(log).read() for log in logs]
        # The baseline was trained once, by process 0, and read by process 1.
        assert "baseline: epoch" in text[0] and "baseline: epoch" not in text[1]
        assert "read process 0's checkpoint" in text[1]

        procs = _start_two(two, resumed_logs)
        _wait_all(procs, resumed_logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    resumed = open(resumed_logs[0]).read()
    assert "resuming from" in resumed and "baseline: reused checkpoint" in resumed
    assert "analysis training" not in resumed  # the saved analysis was reused, not recomputed
    assert _comparable(two) == _comparable(one)
