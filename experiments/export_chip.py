"""Exports one chip's retrained weights from a run's store (``--save_chip_weights``).

  python -m experiments.export_chip --workdir=DIR --chip=7 --out=chip7.npz
  python -m experiments.export_chip --workdir=DIR --chip=7 --out=chip7_ckpt

``--out`` ending in ``.npz`` writes the variables with flattened tree paths as keys
(``params/Conv_0/kernel``); any other path is a standalone orbax checkpoint directory of
``{"params", "batch_stats"}``. A bad flag, a workdir without a store or a chip not in it
exits with a one-line message (exit code 2) and writes nothing.
"""

from __future__ import annotations

import sys

from absl import app, flags

from reduce_jax.errors import ConfigError

WORKDIR = flags.DEFINE_string("workdir", None, "A run's directory, run with --save_chip_weights.")
CHIP = flags.DEFINE_integer("chip", None, "The chip's id (its row in chips.csv).")
OUT = flags.DEFINE_string(
    "out", None, "Where to write: FILE.npz, or a directory for an orbax checkpoint."
)
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    try:
        for flag in (WORKDIR, CHIP, OUT):
            if flag.value is None:
                raise ConfigError(f"--{flag.name} is required")
        if CHIP.value < 0:
            raise ConfigError(f"--chip={CHIP.value} must be >= 0")
        from reduce_jax.outputs import chip_store  # heavy imports after the flags' checks

        path = chip_store.export_chip(WORKDIR.value, CHIP.value, OUT.value, OVERWRITE.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"chip {CHIP.value}: {path}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
