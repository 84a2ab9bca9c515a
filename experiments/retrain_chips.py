"""New chips from a study's saved map: retrained, verified and topped up without the analysis.

  python -m experiments.retrain_chips --map=runs/study/map --chip_fault_maps=week2.npz \
      --workdir=runs/production

Reads every chip's amount off the map, retrains the chips it serves, verifies them and tops
up the misses, and writes chips.csv and summary.json into --workdir. Another call into the
same --workdir adds the chips it has not seen and never redoes a finished one; a stopped call
resumes when run again. Every input is checked before any compute: a bad one exits with a
one-line message (exit code 2) and writes nothing.
"""

from __future__ import annotations

import logging as py_logging
import os
import signal
import sys

from absl import app, flags, logging

from reduce_jax.errors import ConfigError

MAP = flags.DEFINE_string("map", None, "A study's map bundle: its <workdir>/map (or the workdir).")
CHIP_FAULT_MAPS = flags.DEFINE_string(
    "chip_fault_maps",
    None,
    "The new chips' fault maps: .npz with bool[chips, R, C] 'fault_maps', or .csv with "
    "chip,row,col (R x C: the map's array).",
)
WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Output directory (created if missing): chips.csv, summary.json, production.json; "
    "another call into it adds new chips; not a study's workdir.",
)
FIRST_CHIP_ID = flags.DEFINE_integer(
    "first_chip_id",
    0,
    "Id of the file's first chip (the others follow in file order), >= 0: give each batch "
    "of chips its own ids when several files go into one --workdir.",
)
DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "Where the study's dataset files are now (default: where the study read them).",
)
CHIPS_PER_BATCH = flags.DEFINE_integer(
    "chips_per_batch", 64, "Chips trained together (bounds memory), >= 1."
)
CHIP_BATCHING = flags.DEFINE_enum(
    "chip_batching", "vmap", ["vmap", "map"], "How each compiled step computes its chips."
)
TOPUP_POOL_CHUNKS = flags.DEFINE_integer(
    "topup_pool_chunks", 4, "Chunks whose top-ups run together, 1 to 1024."
)
SAVE_CHIP_WEIGHTS = flags.DEFINE_boolean(
    "save_chip_weights",
    False,
    "Store every retrained chip's variables in --workdir/chip_weights (read one back with "
    "reduce_jax.load_chip(workdir, chip)).",
)
COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir",
    os.path.join("~", ".cache", "reduce_jax", "xla"),
    "Directory of JAX's persistent compilation cache (empty: no cache).",
)


def _check_flags() -> None:
    """Every flag and file, before any compute (one-line ``ConfigError``)."""
    for name, holder in (("map", MAP), ("chip_fault_maps", CHIP_FAULT_MAPS), ("workdir", WORKDIR)):
        if not holder.value:
            raise ConfigError(f"--{name} is required")
    if not os.path.isdir(MAP.value):
        raise ConfigError(f"--map={MAP.value} is not a directory; give a study's <workdir>/map")
    if not os.path.isfile(CHIP_FAULT_MAPS.value):
        raise ConfigError(f"--chip_fault_maps={CHIP_FAULT_MAPS.value}: no such file (.npz or .csv)")
    if FIRST_CHIP_ID.value < 0:
        raise ConfigError(f"--first_chip_id={FIRST_CHIP_ID.value} must be >= 0")
    if not 1 <= CHIPS_PER_BATCH.value <= 1 << 20:
        raise ConfigError(f"--chips_per_batch={CHIPS_PER_BATCH.value} is outside [1, 1048576]")
    if not 1 <= TOPUP_POOL_CHUNKS.value <= 1024:
        raise ConfigError(f"--topup_pool_chunks={TOPUP_POOL_CHUNKS.value} is outside [1, 1024]")
    if os.path.exists(WORKDIR.value) and not os.path.isdir(WORKDIR.value):
        raise ConfigError(f"--workdir={WORKDIR.value} exists and is not a directory")


def _use_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in ``path`` (``~`` expanded; empty: off)."""
    if not path:
        return
    path = os.path.expanduser(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--compilation_cache_dir={path} cannot be created ({e.strerror}); pass a writable "
            "directory, or an empty value for no cache"
        ) from e
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


EXIT_INTERRUPTED = 130


def _stop(signum: int, frame) -> None:
    """SIGTERM / SIGINT: says what is saved and ends the process at once (exit code 130);
    finished pools of chips and every output are only ever replaced atomically, so the same
    command resumes."""
    del frame
    name = signal.Signals(signum).name
    where = WORKDIR.value
    os.write(2, f"interrupted ({name}); run the same command to resume in {where}\n".encode())
    os._exit(EXIT_INTERRUPTED)


def main(argv: list[str]) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)
    try:
        _check_flags()
        _use_compilation_cache(COMPILATION_CACHE_DIR.value)
        from reduce_jax import production  # heavy imports after the flags are checked
        from reduce_jax.data import DatasetError
        from reduce_jax.hardware.faults import FaultMapError

        try:
            result = production.retrain_chips(
                MAP.value,
                CHIP_FAULT_MAPS.value,
                workdir=WORKDIR.value,
                first_chip_id=FIRST_CHIP_ID.value,
                data_dir=DATA_DIR.value,
                chips_per_batch=CHIPS_PER_BATCH.value,
                chip_batching=CHIP_BATCHING.value,
                topup_pool_chunks=TOPUP_POOL_CHUNKS.value,
                save_chip_weights=SAVE_CHIP_WEIGHTS.value,
            )
        except (DatasetError, FaultMapError) as e:
            raise ConfigError(str(e)) from None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result.headline()}; outputs in {WORKDIR.value}")
    return 0


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a one-line message and exit code 2 for a bad or unknown flag;
    ``--help`` exits with code 0."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:  # absl's --help prints the help, then exits with code 1
        if e.code == 1 and any(a.lstrip("-") in ("help", "helpfull", "h", "?") for a in argv):
            sys.exit(0)
        raise


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
