"""The verification that stops early, swept over its slices and its alpha on a study's chips.

  python -m experiments.early_stop --study=runs/default --verify_slices=1,8,16,32 \\
    --verify_alpha=0,0.02,0.05,0.1

Reads a finished study (its ``map/`` bundle: baseline, data, recipe and settings), draws its
chips again from its seed, and runs the adaptive policy on them once per setting, every early
stop audited against the whole split. Prints a table (evaluation passes, their cut against
the whole split, verifications, false rejections, training) and writes it to
``<study>/early_stop.json``. The training, and so the decisions of the whole split, are the
study's; only the evaluation differs.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from experiments import cli
from reduce_jax.errors import ConfigError

STUDY = flags.DEFINE_string("study", None, "A finished study's --workdir (with its map/).")
SLICES = flags.DEFINE_list("verify_slices", ["1", "8", "16", "32"], "Slices to try, 1 to 1024.")
ALPHAS = flags.DEFINE_list("verify_alpha", ["0", "0.02", "0.05"], "Alphas to try, in [0, 0.5].")


def _settings() -> list[tuple[int, float]]:
    """Every (slices, alpha) to run, checked (one-line ``ConfigError``)."""
    try:
        slices = [int(s) for s in SLICES.value]
        alphas = [float(a) for a in ALPHAS.value]
    except ValueError as e:
        raise ConfigError(f"--verify_slices / --verify_alpha: {e}") from None
    if not slices or any(not 1 <= s <= 1024 for s in slices):
        raise ConfigError(f"--verify_slices={','.join(SLICES.value)}: each in [1, 1024]")
    if not alphas or any(not 0 <= a <= 0.5 for a in alphas):
        raise ConfigError(f"--verify_alpha={','.join(ALPHAS.value)}: each in [0, 0.5]")
    return [(1, 0.0)] + [(s, a) for s in slices if s > 1 for a in alphas]


def sweep(study: str, settings: list[tuple[int, float]]) -> list[dict]:
    """The adaptive policy on the study's chips under each ``(slices, alpha)``."""
    import numpy as np

    from reduce_jax import pipeline, production
    from reduce_jax.config import ReduceConfig
    from reduce_jax.engine import train
    from reduce_jax.outputs import map_bundle
    from reduce_jax.stages import policies, sequential

    bundle = map_bundle.load_map(os.path.join(study, map_bundle.MAP_DIR))
    cfg = ReduceConfig.from_dict(bundle.study)
    ctx, ds = production.study_context(bundle, cfg.chips_per_batch, cfg.chip_batching)
    keys = pipeline.Keys.from_seed(cfg.seed)
    maps = pipeline.chip_fault_maps(cfg, keys.chips)
    spe, target = ctx.steps_per_epoch, bundle.decision_target
    cap_epochs = cfg.adaptive_max_epochs or bundle.fixed_epochs
    cap = int(train.epochs_to_steps(cap_epochs, spe))
    rows, whole = [], None
    for slices, alpha in settings:
        if slices == 1:
            test = sequential.whole_split(len(ds.val_labels), target)
        else:
            test = sequential.make_test(
                len(ds.val_labels), target, slices, alpha, keys.verify_order
            )
        out = policies.run_adaptive(
            ctx, maps, bundle.recipe.topup_steps, cap, target, keys.policies, test=test, audit=True
        )
        passes = float(np.sum(out.eval_passes))
        whole = passes if whole is None else whole
        checks, false = int(out.verifications.sum()), int(out.false_rejects.sum())
        rows.append(
            dict(
                slices=slices,
                alpha=alpha,
                eval_passes=passes,
                cut=1 - passes / whole,
                verifications=checks,
                false_rejects=false,
                same_decision=1 - false / max(checks, 1),
                train_epochs=float(np.sum(out.steps)) / spe,
                chips_meeting_target=int(out.met.sum()),
            )
        )
        logging.info("%s", rows[-1])
    return rows


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    cli.quiet_platform_probing()
    try:
        if not STUDY.value or not os.path.isdir(STUDY.value):
            raise ConfigError(f"--study={STUDY.value}: give a finished study's --workdir")
        rows = sweep(STUDY.value, _settings())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    head = ("slices", "alpha", "evaluation passes", "cut", "verifications", "same decision")
    print("| " + " | ".join(head) + " | training (epochs) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['slices']} | {r['alpha']:g} | {r['eval_passes']:.2f} | {r['cut']:.1%} | "
            f"{r['verifications']} | {r['same_decision']:.4f} ({r['false_rejects']} false) | "
            f"{r['train_epochs']:.2f} |"
        )
    with open(os.path.join(STUDY.value, "early_stop.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
