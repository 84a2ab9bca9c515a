"""Reduce: resilience analysis and per-chip fault-aware retraining of a chip population.

  python -m experiments.resilience --flagfile=experiments/configs/default.flags --workdir=DIR

Flags are validated before any compute; a bad value exits with a one-line message (exit code
2). SIGTERM or SIGINT (Ctrl-C) stops the run with exit code 130; rerunning the same command
resumes from the finished work saved in --workdir (the message says whether any was saved).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

from absl import app, flags, logging

from experiments import cli
from reduce_jax import config as config_lib
from reduce_jax.data import DatasetError
from reduce_jax.hardware.faults import FaultMapError

# One flag per ReduceConfig field, listed in this CLI's --help.
config_lib.define_flags(flags.FLAGS)
flags.adopt_module_key_flags(config_lib)

COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host runs: host:port of process 0 (jax.distributed)."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-host runs: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-host runs: this process's index.")
SEEDS = flags.DEFINE_integer(
    "seeds",
    1,
    "Repeat the study for this many seeds from --seed, each into --workdir/seed_<s>, and "
    "write --workdir/seeds.json with every headline number's mean and spread (>= 1; 1 = "
    "one run in --workdir).",
)
DISTRIBUTED_AUTO = flags.DEFINE_boolean(
    "distributed_auto",
    False,
    "Multi-host runs started by a cluster launcher (SLURM srun, Open MPI mpirun): "
    "jax.distributed reads the coordinator, process count and id from its environment.",
)
COMPILATION_CACHE_DIR = cli.define_compilation_cache_dir()
flags.adopt_module_key_flags(cli)  # listed in this CLI's --help
OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "Discard progress in --workdir saved with other settings."
)


def _stop(signum: int, frame) -> None:
    """SIGTERM / SIGINT: prints the resume hint and ends the process at once (exit code 130;
    ``cli.stop``)."""
    del frame
    cli.stop(signum, flags.FLAGS["workdir"].value, cli.study_saved_work)


def _check_processes() -> None:
    if DISTRIBUTED_AUTO.value and (
        COORDINATOR_ADDRESS.value or NUM_PROCESSES.value != 1 or PROCESS_ID.value != 0
    ):
        raise config_lib.ConfigError(
            "--distributed_auto reads the coordinator, process count and id from the "
            "launcher; do not also pass --coordinator_address, --num_processes or --process_id"
        )
    if NUM_PROCESSES.value < 1 or not 0 <= PROCESS_ID.value < NUM_PROCESSES.value:
        raise config_lib.ConfigError(
            f"--process_id={PROCESS_ID.value} must be in [0, --num_processes={NUM_PROCESSES.value})"
        )
    if NUM_PROCESSES.value > 1 and not COORDINATOR_ADDRESS.value:
        raise config_lib.ConfigError(
            "--coordinator_address=host:port is required when --num_processes > 1"
        )


def main(argv: list[str]) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    cli.quiet_platform_probing()
    try:
        cfg = config_lib.from_flags(flags.FLAGS)
        if cfg.workdir is None:
            raise config_lib.ConfigError("--workdir is required (the output directory)")
        config_lib.validate(cfg)
        _check_processes()
        if SEEDS.value < 1:
            raise config_lib.ConfigError(f"--seeds={SEEDS.value} must be >= 1")
        cli.use_compilation_cache(COMPILATION_CACHE_DIR.value)
        from reduce_jax import pipeline, seeds, sharding  # heavy imports after validation

        sharding.initialize(
            COORDINATOR_ADDRESS.value,
            NUM_PROCESSES.value,
            PROCESS_ID.value,
            auto=DISTRIBUTED_AUTO.value,
        )
        try:
            if SEEDS.value > 1:
                out = seeds.run_seeds(cfg, SEEDS.value, overwrite=OVERWRITE.value)
                print(seeds.table(out["metrics"]))
                print(f"{SEEDS.value} seeds; outputs in {cfg.workdir}/seeds.json")
                return 0
            summary = pipeline.run(cfg, overwrite=OVERWRITE.value)
        except Exception as e:
            if sharding.process_count() > 1:
                _end_process(e)
            raise
    except (config_lib.ConfigError, DatasetError, FaultMapError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{summary.headline()}; outputs in {cfg.workdir}")
    return 0


def _end_process(e: Exception) -> None:
    """A multi-process run's error: reported as in one process, then the process ends at once.

    A normal exit waits at ``jax.distributed``'s shutdown barrier for the other processes,
    which may be waiting for this one (for its baseline, or inside a collective): they would
    all hang. Ending at once drops this process's connection, and ``jax.distributed`` then
    ends the others with an error.
    """
    if isinstance(e, (config_lib.ConfigError, DatasetError, FaultMapError, FloatingPointError)):
        print(f"error: {e}", file=sys.stderr)
        code = 1 if isinstance(e, FloatingPointError) else 2
    else:
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
