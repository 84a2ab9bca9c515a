"""The two Python steps of ``benchmarks/gpu.sh``: the environment check and the collection.

  python -m benchmarks.collect env --out DIR/env.json [--require_gpu]
  python -m benchmarks.collect collect --outdir DIR --part NAME:RC:WALL_S ... \
      [--study_summary PATH] [--study_flagfile PATH] [--cpu_test]

``env`` writes the versions, the backend and the device (and ``nvidia-smi``'s view of it
where there is one) to a JSON file; with ``--require_gpu`` it exits with status 3 and a
one-line message when JAX's default backend is not a GPU.

``collect`` reads what ``gpu.sh`` left in ``DIR`` (``env.json``, the JSON lines of each
``bench-<model>.log``, the default study's ``summary.json``) and writes
``DIR/<device>-<date>.json`` (``<device>`` from the device kind, e.g. ``nvidia-h200``;
``<date>`` in UTC), then prints a markdown table of it. Its keys are described in
``benchmarks/results/README.md``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shutil
import subprocess
import sys

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "chex",
    "numpy",
    "absl-py",
    "orbax-checkpoint",
    "scikit-learn",
    "mlxtend",
    "matplotlib",
)


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    for dist in metadata.distributions():  # the CUDA plugin and PJRT packages
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("jax-") or name.startswith("jax_"):
            out[name] = dist.version
    return out


def _nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem"
    try:
        proc = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error: {e}"
    return (proc.stdout or proc.stderr).strip()


def environment() -> dict:
    """Versions, backend and devices of this Python (initialises JAX's backend)."""
    import jax

    from benchmarks import device

    devices = jax.devices()
    limit = device.memory_limit()
    return dict(
        device.environment(),
        device_count=len(devices),
        devices=[d.device_kind for d in devices],
        device_memory_limit_mb=None if limit is None else round(limit / device.MB, 1),
        packages=_versions(),
        nvidia_smi=_nvidia_smi(),
        env={k: os.environ[k] for k in sorted(os.environ) if k.startswith(("XLA_", "JAX_"))},
    )


def device_name(kind: str) -> str:
    """File-name form of a device kind: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"


def read_json_lines(path: str) -> list[dict]:
    """The JSON objects of the lines of ``path`` that start with ``{`` ([] if no file)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a timeout
    return rows


def study_record(summary_path: str | None, flagfile: str | None, part: dict | None) -> dict:
    """The default study's wall time and key numbers (the summary's, where it was written)."""
    out = dict(flagfile=flagfile, exit_code=None, wall_s=None)
    if part:
        out.update(exit_code=part["rc"], wall_s=part["wall_s"])
    if not summary_path or not os.path.isfile(summary_path):
        out["summary"] = None
        return out
    with open(summary_path) as f:
        s = json.load(f)
    cost = s.get("cost", {})
    chips = s.get("chips", [])
    out["summary"] = dict(
        timing=s.get("timing"),
        baseline_accuracy=s.get("baseline_accuracy"),
        target_accuracy=s.get("target_accuracy"),
        chips=len(chips),
        statuses=dict(collections.Counter(c.get("status") for c in chips)),
        cost={
            k: cost.get(k)
            for k in (
                "reduce_epochs",
                "fixed_epochs",
                "analysis_epochs",
                "savings_fraction",
                "chips_meeting_target",
                "chips_unrecoverable",
                "chips_missing_target",
                "chips_diverged",
            )
        },
        break_even_vs_cheapest=(s.get("policies") or {}).get("break_even_vs_cheapest"),
        required_epochs=s.get("resilience_map", {}).get("required_epochs"),
    )
    return out


def _fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def markdown(result: dict) -> str:
    """The result as a markdown table (benchmarks) and a line (the default study)."""
    lines = [
        f"{result['device_kind']} ({result['backend']}), jax {result['jax_version']}, "
        f"{result['date']}" + (" (CPU test mode)" if result["cpu_test"] else ""),
        "",
        "| model | data | N | chunk | population chip-steps/s | loop chip-steps/s | "
        "population/loop | step GFLOP/s | matmul GFLOP/s | fraction of matmul peak | "
        "compile s | peak device MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    row = lambda cells: "| " + " | ".join(cells + ["-"] * (12 - len(cells))) + " |"
    for name, rows in result["benchmarks"].items():
        part = result["parts"].get(f"bench-{name}", {})
        for r in rows:
            model = r.get("model_name") or r.get("model")  # resnet20/18 share a class
            head = [str(model), str(r.get("dataset")), str(r.get("chips"))]
            if "skipped" in r or "error" in r:
                what = f"skipped: {r['skipped']}" if "skipped" in r else f"error: {r['error']}"
                lines.append(row(head + [what.replace("|", "/")]))
                continue
            lines.append(
                row(
                    head
                    + [
                        _fmt(r.get("chips_per_batch")),
                        _fmt(r.get("population_chip_steps_per_s")),
                        _fmt(r.get("loop_chip_steps_per_s")),
                        _fmt(r.get("speedup"), 2),
                        _fmt(r.get("step_gflops")),
                        _fmt(r.get("matmul_gflops")),
                        _fmt(r.get("fraction_of_matmul_peak"), 3),
                        _fmt(r.get("compile_s")),
                        _fmt(r.get("peak_device_mb"), 0),
                    ]
                )
            )
        if part.get("rc") not in (0, None):
            lines.append(row([name, f"exit code {part['rc']} after {part['wall_s']} s"]))
    study = result["study"]
    if study.get("exit_code") is not None:
        s = study.get("summary") or {}
        timing = s.get("timing") or {}
        cost = s.get("cost") or {}
        lines += [
            "",
            f"Study `{study['flagfile']}`: exit code {study['exit_code']}, wall time "
            f"{_fmt(study['wall_s'])} s (pipeline {_fmt(timing.get('wall_s'))} s: baseline "
            f"{_fmt(timing.get('baseline_s'))}, analysis {_fmt(timing.get('analysis_s'))}, "
            f"retraining {_fmt(timing.get('retrain_s'))}); Reduce "
            f"{_fmt(cost.get('reduce_epochs'), 2)} epochs vs fixed "
            f"{_fmt(cost.get('fixed_epochs'), 2)}; {cost.get('chips_meeting_target')}/"
            f"{s.get('chips')} chips meet the target.",
        ]
    return "\n".join(lines)


def _part(text: str) -> tuple[str, dict]:
    try:
        name, rc, wall = text.rsplit(":", 2)
        return name, dict(rc=int(rc), wall_s=float(wall))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part must be NAME:RC:WALL_S, got {text!r}") from None


def collect(args) -> dict:
    env_path = os.path.join(args.outdir, "env.json")
    env = {}
    if os.path.isfile(env_path):
        with open(env_path) as f:
            env = json.load(f)
    parts = dict(args.part or [])
    benchmarks = {
        name[len("bench-") :]: read_json_lines(os.path.join(args.outdir, f"{name}.log"))
        for name in parts
        if name.startswith("bench-")
    }
    first = next((r for rows in benchmarks.values() for r in rows), {})
    pick = lambda key: env.get(key, first.get(key))
    kind = pick("device_kind") or "unknown"
    now = datetime.datetime.now(datetime.timezone.utc)
    result = dict(
        device=device_name(kind),
        device_kind=kind,
        backend=pick("backend"),
        jax_version=pick("jax_version"),
        jaxlib_version=pick("jaxlib_version"),
        date=now.date().isoformat(),
        time_utc=now.strftime("%H:%M:%S"),
        cpu_test=bool(args.cpu_test),
        environment=env,
        parts=parts,
        benchmarks=benchmarks,
        study=study_record(args.study_summary, args.study_flagfile, parts.get("study")),
    )
    result["table_md"] = markdown(result)
    path = os.path.join(args.outdir, f"{result['device']}-{result['date']}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    result["path"] = path
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env", help="write the environment as JSON; check for a GPU")
    p_env.add_argument("--out", required=True)
    p_env.add_argument("--require_gpu", action="store_true")
    p_col = sub.add_parser("collect", help="collect gpu.sh's outputs into one JSON file")
    p_col.add_argument("--outdir", required=True)
    p_col.add_argument("--part", action="append", type=_part, help="NAME:RC:WALL_S")
    p_col.add_argument("--study_summary")
    p_col.add_argument("--study_flagfile")
    p_col.add_argument("--cpu_test", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "env":
        env = environment()
        with open(args.out, "w") as f:
            json.dump(env, f, indent=1)
            f.write("\n")
        print(json.dumps({k: env[k] for k in ("backend", "device_kind", "device_count")}))
        if args.require_gpu and env["backend"] != "gpu":
            print(
                f"error: JAX's backend is {env['backend']!r} ({env['device_kind']}), not a GPU: "
                f"the CUDA build of jax is missing or sees no device (packages: "
                f"{ {k: v for k, v in env['packages'].items() if k.startswith('jax')} }). "
                "Set REDUCE_GPU_SH_CPU_TEST=1 to run the CPU test mode instead.",
                file=sys.stderr,
            )
            return 3
        return 0

    result = collect(args)
    print(result["table_md"])
    print(f"wrote {result['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
