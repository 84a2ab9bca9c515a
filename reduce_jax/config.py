"""Configuration of a Reduce run, and its validation before any compute."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence

from reduce_jax import data as data_lib
from reduce_jax import faults, grouping, models, resilience, systolic, train
from reduce_jax.errors import ConfigError

__all__ = ["ConfigError", "ReduceConfig", "check_grid", "validate"]


@dataclasses.dataclass(frozen=True)
class ReduceConfig:
    """Every setting of a Reduce run (the CLI flags have the same names)."""

    workdir: str | None = None
    dataset: str = "mnist5k"
    data_dir: str | None = None
    model: str = "lenet5"
    array_rows: int = 16
    array_cols: int = 16
    fault_model: str = "clustered"
    cluster_alpha: float = 2.0
    line_fraction: float = 1.0
    analysis_fault_model: str = "exact"
    fault_rates: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
    retrain_epochs: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    maps_per_rate: int = 4
    num_chips: int = 64
    chip_fault_rate: float = 0.1
    chip_fault_maps: str | None = None
    max_accuracy_drop: float | None = 0.02
    target_accuracy: float | None = None
    statistic: str = "min"
    interpolation: str = "conservative"
    rate_measure: str = "pe"
    predictor_chips: int = 0
    grouping: str = "none"
    max_group_size: int = 8
    fixed_epochs: float | None = None
    topup_epochs: float = 0.25
    max_topup_epochs: float = 1.0
    batch_size: int = 128
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    baseline_epochs: float = 15.0
    baseline_optimizer: str = "adam"
    baseline_learning_rate: float = 1e-3
    chips_per_batch: int = 64
    eval_batch_size: int = 100
    seed: int = 0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fault_rates"] = [float(x) for x in self.fault_rates]
        d["retrain_epochs"] = [float(x) for x in self.retrain_epochs]
        return d


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(cfg: ReduceConfig, name: str, allowed: Sequence[str]) -> None:
    """The flag ``name`` is one of ``allowed``."""
    v = getattr(cfg, name)
    _require(v in allowed, f"--{name}={v!r}; allowed: {', '.join(allowed)}")


def _in_range(cfg: ReduceConfig, name: str, lo: float, hi: float) -> None:
    """The flag ``name`` is in ``[lo, hi]``."""
    v = getattr(cfg, name)
    _require(lo <= v <= hi, f"--{name}={v} is outside [{lo}, {hi}]")


def _check_grid(name: str, values: Sequence[float], lo: float, hi: float | None) -> None:
    _require(len(values) > 0, f"--{name} is empty; give a comma-separated list")
    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    for v in values:
        _require(lo <= v and (hi is None or v <= hi), f"--{name}: value {v} is outside {rng}")
    _require(
        all(b > a for a, b in zip(values[:-1], values[1:], strict=True)),
        f"--{name}={','.join(map(str, values))} must be strictly increasing",
    )


def validate(cfg: ReduceConfig) -> None:
    """Checks every setting and input file; raises ``ConfigError`` (one line) on the first bad one.

    Cheap: no dataset is loaded and nothing is computed, but files are checked to exist and
    fault-map files are read and validated.
    """
    _one_of(cfg, "dataset", data_lib.DATASETS)
    _one_of(cfg, "model", models.MODELS)
    for name in ("array_rows", "array_cols"):
        _in_range(cfg, name, 1, 4096)
    for name in ("fault_model", "analysis_fault_model"):
        _one_of(cfg, name, faults.FAULT_MODELS)
    _require(cfg.cluster_alpha > 0, f"--cluster_alpha={cfg.cluster_alpha} must be > 0")
    _in_range(cfg, "line_fraction", 0, 1)
    _check_grid("fault_rates", list(cfg.fault_rates), 0.0, 1.0)
    _check_grid("retrain_epochs", list(cfg.retrain_epochs), 0.0, None)
    _require(cfg.maps_per_rate >= 1, f"--maps_per_rate={cfg.maps_per_rate} must be >= 1")
    _require(cfg.num_chips >= 1, f"--num_chips={cfg.num_chips} must be >= 1")
    _in_range(cfg, "chip_fault_rate", 0, 1)
    has_drop, has_target = cfg.max_accuracy_drop is not None, cfg.target_accuracy is not None
    _require(
        has_drop != has_target, "give exactly one of --max_accuracy_drop and --target_accuracy"
    )
    _in_range(cfg, "max_accuracy_drop" if has_drop else "target_accuracy", 0, 1)
    try:
        resilience.parse_statistic(cfg.statistic)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _one_of(cfg, "interpolation", resilience.INTERPOLATIONS)
    _one_of(cfg, "rate_measure", systolic.RATE_MEASURES)
    _in_range(cfg, "predictor_chips", 0, 1 << 20)
    _one_of(cfg, "grouping", grouping.GROUPINGS)
    _in_range(cfg, "max_group_size", 2, 1 << 20)
    if cfg.fixed_epochs is not None:
        _require(cfg.fixed_epochs > 0, f"--fixed_epochs={cfg.fixed_epochs} must be > 0")
    else:
        _require(
            max(cfg.retrain_epochs, default=0) > 0,
            "--retrain_epochs needs an amount > 0 (it sets the fixed policy's amount), "
            "or give --fixed_epochs",
        )
    _require(cfg.topup_epochs > 0, f"--topup_epochs={cfg.topup_epochs} must be > 0")
    _require(cfg.max_topup_epochs >= 0, f"--max_topup_epochs={cfg.max_topup_epochs} must be >= 0")
    for name in ("batch_size", "chips_per_batch", "eval_batch_size"):
        _in_range(cfg, name, 1, 1 << 20)
    for name in ("optimizer", "baseline_optimizer"):
        _one_of(cfg, name, train.OPTIMIZERS)
    for name in ("learning_rate", "baseline_learning_rate"):
        v = getattr(cfg, name)
        _require(0 < v <= 10, f"--{name}={v} is outside (0, 10]")
    _require(cfg.baseline_epochs > 0, f"--baseline_epochs={cfg.baseline_epochs} must be > 0")
    _require(cfg.seed >= 0, f"--seed={cfg.seed} must be >= 0")
    try:
        data_lib.validate_dataset_files(cfg.dataset, cfg.data_dir)
    except data_lib.DatasetError as e:
        raise ConfigError(str(e)) from None
    if cfg.chip_fault_maps is not None:
        try:
            faults.load_fault_maps(cfg.chip_fault_maps, cfg.array_rows, cfg.array_cols)
        except faults.FaultMapError as e:
            raise ConfigError(f"--chip_fault_maps: {e}") from None
    if cfg.workdir is not None:
        _check_workdir(cfg.workdir)


def check_grid(measured, cfg: ReduceConfig, measure: str) -> None:
    """The map is interpolated at the grid's measured rates ``float[F]``: they must increase.

    Raises:
      ConfigError: naming ``--fault_rates`` and the rates measured on the array.
    """
    diffs = [b - a for a, b in zip(measured[:-1], measured[1:], strict=True)]
    if any(d <= 0 for d in diffs):
        raise ConfigError(
            f"--fault_rates: grid points too close for a {cfg.array_rows}x{cfg.array_cols} "
            f"array (measured {measure} rates {[round(float(x), 4) for x in measured]} are "
            "not increasing)"
        )


def _check_workdir(workdir: str) -> None:
    _require(
        not os.path.exists(workdir) or os.path.isdir(workdir),
        f"--workdir={workdir} exists and is not a directory",
    )
    parent = os.path.abspath(workdir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    _require(os.path.isdir(parent), f"--workdir={workdir}: {parent} is not a directory")
    try:  # os.access is not enough: root passes it on read-only file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} is not writable ({parent}: {e.strerror})") from None
