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

import os
import signal
import sys

from absl import app, flags, logging

from experiments import cli
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
POLICY = flags.DEFINE_enum(
    "policy",
    "reduce",
    ["reduce", "online"],
    "reduce: each chip its amount off the map, verified and topped up; online: each chip "
    "started at the lower estimate learned from the map's observations and the chips "
    "before it (in --workdir), topped up until the target. Either way "
    "--workdir/refined_map is the map with every served chip's (rate, need) added.",
)
COMPILATION_CACHE_DIR = cli.define_compilation_cache_dir()
flags.adopt_module_key_flags(cli)  # listed in this CLI's --help


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


# Files whose presence in a workdir means finished chips a rerun keeps: the ledger
# (production.LEDGER) or a saved pool of this call's chips (production's batches/).
def _stop(signum: int, frame) -> None:
    """SIGTERM / SIGINT: prints whether finished chips are saved (the same command resumes) or
    not (it starts over) and ends the process at once (exit code 130; ``cli.stop``). Finished
    pools of chips and every output are only ever replaced atomically."""
    del frame
    cli.stop(signum, WORKDIR.value, cli.production_saved_work)


def main(argv: list[str]) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    cli.quiet_platform_probing()
    try:
        _check_flags()
        cli.use_compilation_cache(COMPILATION_CACHE_DIR.value)
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
                policy=POLICY.value,
            )
        except (DatasetError, FaultMapError) as e:
            raise ConfigError(str(e)) from None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result.headline()}; outputs in {WORKDIR.value}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
