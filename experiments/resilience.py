"""Reduce: resilience analysis and per-chip fault-aware retraining of a chip population.

  python -m experiments.resilience --flagfile=experiments/configs/default.flags --workdir=DIR

Flags are validated before any compute; a bad value exits with a one-line message.
"""

from __future__ import annotations

import dataclasses
import signal
import sys

from absl import app, flags, logging

from reduce_jax import config as config_lib
from reduce_jax.data import DatasetError
from reduce_jax.faults import FaultMapError

_D = config_lib.ReduceConfig()

WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; reused to resume).")
flags.DEFINE_string("dataset", _D.dataset, "mnist5k | digits | mnist | cifar10 | cifar100.")
flags.DEFINE_string("data_dir", None, "Folder with the MNIST IDX / CIFAR files.")
flags.DEFINE_string("model", _D.model, "mlp | lenet5 | vgg_small.")
flags.DEFINE_integer("array_rows", _D.array_rows, "Systolic array rows R.")
flags.DEFINE_integer("array_cols", _D.array_cols, "Systolic array columns C.")
flags.DEFINE_string(
    "fault_model", _D.fault_model, "Population fault model: bernoulli | exact | clustered | lines."
)
flags.DEFINE_float(
    "cluster_alpha", _D.cluster_alpha, "Clustering parameter of the clustered model (> 0)."
)
flags.DEFINE_float(
    "line_fraction",
    _D.line_fraction,
    "lines model: share of the rate from whole failed rows/columns, in [0, 1] (rest: PE faults).",
)
flags.DEFINE_string(
    "analysis_fault_model", _D.analysis_fault_model, "Fault model of the resilience analysis."
)
flags.DEFINE_list(
    "fault_rates", [str(x) for x in _D.fault_rates], "Analysis grid of PE fault rates."
)
flags.DEFINE_list(
    "retrain_epochs", [str(x) for x in _D.retrain_epochs], "Analysis grid of retraining epochs."
)
flags.DEFINE_integer("maps_per_rate", _D.maps_per_rate, "Fault maps K per rate.")
flags.DEFINE_integer("num_chips", _D.num_chips, "Chips in the sampled population.")
flags.DEFINE_float(
    "chip_fault_rate", _D.chip_fault_rate, "Mean PE fault rate of the sampled population."
)
flags.DEFINE_string(
    "chip_fault_maps",
    None,
    "Population fault maps file (.npz bool[chips,R,C] or .csv chip,row,col); replaces sampling.",
)
flags.DEFINE_float("max_accuracy_drop", _D.max_accuracy_drop, "Target = baseline accuracy - this.")
flags.DEFINE_float(
    "target_accuracy", None, "Absolute accuracy target (overrides --max_accuracy_drop)."
)
flags.DEFINE_string("statistic", _D.statistic, "Over the maps of a rate: min | mean | quantile:q.")
flags.DEFINE_string("interpolation", _D.interpolation, "conservative | linear.")
flags.DEFINE_string(
    "rate_measure",
    _D.rate_measure,
    "Chip rate that selects the amount: pe | effective | importance.",
)
flags.DEFINE_integer(
    "predictor_chips",
    _D.predictor_chips,
    "Validation chips of the predictor study (0 = no study): which rate measure predicts the "
    "retraining a chip needs.",
)
flags.DEFINE_string(
    "grouping", _D.grouping, "none | greedy: fuse chips' fault maps into shared retrainings."
)
flags.DEFINE_integer("max_group_size", _D.max_group_size, "Most chips in one fused group (>= 2).")
flags.DEFINE_float(
    "fixed_epochs", None, "Per-chip epochs of the fixed policy (default: max retrain_epochs)."
)
flags.DEFINE_float("topup_epochs", _D.topup_epochs, "Top-up increment (epochs).")
flags.DEFINE_float("max_topup_epochs", _D.max_topup_epochs, "Cap on a chip's top-up (epochs).")
flags.DEFINE_integer("batch_size", _D.batch_size, "Training batch size.")
flags.DEFINE_string("optimizer", _D.optimizer, "Retraining optimizer: adam | sgd | momentum.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Retraining learning rate.")
flags.DEFINE_float("baseline_epochs", _D.baseline_epochs, "Baseline epochs.")
flags.DEFINE_string("baseline_optimizer", _D.baseline_optimizer, "Baseline optimizer.")
flags.DEFINE_float("baseline_learning_rate", _D.baseline_learning_rate, "Baseline learning rate.")
flags.DEFINE_integer(
    "chips_per_batch", _D.chips_per_batch, "Chips retrained together (bounds memory)."
)
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Test images per evaluation batch.")
flags.DEFINE_integer("seed", _D.seed, "Seed of every random stream.")
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host runs: host:port of process 0 (jax.distributed)."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-host runs: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-host runs: this process's index.")
OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "Discard progress in --workdir saved with other settings."
)


def _floats(name: str, values: list[str]) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise config_lib.ConfigError(
            f"--{name}={','.join(values)} must be a comma-separated list of numbers"
        ) from None


def config_from_flags() -> config_lib.ReduceConfig:
    """The run's configuration from the parsed flags (one flag per ``ReduceConfig`` field)."""
    values = {
        f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(config_lib.ReduceConfig)
    }
    for name in ("fault_rates", "retrain_epochs"):
        values[name] = _floats(name, values[name])
    if values["target_accuracy"] is not None:  # an absolute target replaces the drop
        values["max_accuracy_drop"] = None
    return config_lib.ReduceConfig(**values)


def _interrupt(signum, frame):
    del frame
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    try:
        cfg = config_from_flags()
        if cfg.workdir is None:
            raise config_lib.ConfigError("--workdir is required (the output directory)")
        config_lib.validate(cfg)
        if NUM_PROCESSES.value < 1 or not 0 <= PROCESS_ID.value < NUM_PROCESSES.value:
            raise config_lib.ConfigError(
                f"--process_id={PROCESS_ID.value} must be in [0, --num_processes="
                f"{NUM_PROCESSES.value})"
            )
        if NUM_PROCESSES.value > 1 and not COORDINATOR_ADDRESS.value:
            raise config_lib.ConfigError(
                "--coordinator_address=host:port is required when --num_processes > 1"
            )
        from reduce_jax import pipeline, sharding  # heavy imports only after validation

        sharding.initialize(COORDINATOR_ADDRESS.value, NUM_PROCESSES.value, PROCESS_ID.value)

        signal.signal(signal.SIGTERM, _interrupt)
        summary = pipeline.run(cfg, overwrite=OVERWRITE.value)
    except (config_lib.ConfigError, DatasetError, FaultMapError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"interrupted; finished work is saved in {WORKDIR.value}: run the same command "
            "to resume",
            file=sys.stderr,
        )
        return 130
    print(f"{summary.headline()}; outputs in {cfg.workdir}")
    return 0


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a one-line message and exit code 2 for a bad or unknown flag."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
