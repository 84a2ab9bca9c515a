"""Configuration of a Reduce run: its settings, their command-line flags, and their validation.

``ReduceConfig`` is the one place a setting is declared: each field's metadata holds its help
text, ``define_flags`` turns every field into an absl flag of the same name, type and default,
and ``from_flags`` reads the parsed flags back into a ``ReduceConfig``. Adding a setting is one
field here.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import tempfile
import types
import typing
from collections.abc import Sequence

from absl import flags

from reduce_jax import data as data_lib
from reduce_jax.engine import train
from reduce_jax.errors import ConfigError
from reduce_jax.hardware import faults, stuck_at, systolic
from reduce_jax.nets import augment as augment_lib
from reduce_jax.nets import int8, models
from reduce_jax.stages import calibration, grouping, resilience

# What ``--mitigation`` chooses for a Reduce run (``stages.mitigation.chip_hardware``).
MITIGATIONS = ("bypass", "fault-aware")


def _setting(default, help_text: str):
    """A ``ReduceConfig`` field with its flag's help text."""
    return dataclasses.field(default=default, metadata={"help": help_text})


def _choices(names: Sequence[str]) -> str:
    return " | ".join(names)


@dataclasses.dataclass(frozen=True)
class ReduceConfig:
    """Every setting of a Reduce run; each field is also a CLI flag of the same name."""

    workdir: str | None = _setting(
        None,
        "Output directory (created if missing; rerun the same command there to resume). "
        "Required by the CLI.",
    )
    dataset: str = _setting("mnist5k", f"Dataset: {_choices(data_lib.DATASETS)}.")
    data_dir: str | None = _setting(
        None,
        "Folder with the dataset files (mnist: IDX files; cifar10/cifar100: the archive; "
        "refused for mnist5k and digits, which read none); npz: the .npz file (x_train, "
        "y_train, x_test, y_test, and optionally your own validation split x_val, y_val; "
        "uint8 or float images [N, H, W, C] or [N, H, W], integer labels).",
    )
    validation_fraction: float = _setting(
        0.1,
        "Share of the training set held out, stratified, as the validation split that every "
        "decision (resilience map, verification, top-ups) is taken on, in (0, 0.5]; the test "
        "set only reports results.",
    )
    model: str = _setting("lenet5", f"Network: {_choices(models.MODELS)}.")
    model_width: float = _setting(
        1.0,
        "Channel (and hidden unit) multiplier of the network, in (0, 16]; 1 = the published "
        "architecture, e.g. 0.5 for a half-width ResNet on a CPU.",
    )
    init_checkpoint: str | None = _setting(
        None,
        "Orbax checkpoint of the trained model's variables (like a run's baseline/): the "
        "baseline is measured, not trained (refused at chance accuracy). Weights trained on "
        "the training set read high on a split held out of it: give --dataset=npz with "
        "x_val, y_val.",
    )
    array_rows: int = _setting(16, "Rows R of the systolic array (PEs).")
    array_cols: int = _setting(16, "Columns C of the systolic array (PEs).")
    arithmetic: str = _setting(
        "float32",
        f"What the array computes: {_choices(int8.ARITHMETICS)} (int8: post-training int8 of "
        "the baseline, activation scales calibrated on training images, int32 partial sums; "
        "retraining is quantization-aware).",
    )
    mitigation: str = _setting(
        "bypass",
        "What a chip does with its faulty PEs: bypass (FAP: the weights they hold act as zero, "
        "retraining keeps them at zero) | fault-aware (--arithmetic=int8 only: each faulty "
        "PE has one stuck bit, drawn from --stuck_site_probs, --stuck_p_one and --stuck_bits, "
        "that stays in the forward pass; nothing is bypassed and retraining learns around "
        "it). The map's rate axis is --rate_measure of the PE maps either way (under "
        "fault-aware, weights on faulty PEs are stuck, not bypassed).",
    )
    stuck_site_probs: Sequence[float] = _setting(
        (1 / 3, 1 / 3, 1 / 3),
        "--mitigation=fault-aware: probabilities that a faulty PE's stuck bit is in its "
        "weight register, its product, its partial sum (three numbers in [0, 1] summing to 1).",
    )
    stuck_p_one: float = _setting(
        0.5, "--mitigation=fault-aware: probability that the bit is stuck at 1, in [0, 1]."
    )
    stuck_bits: str = _setting(
        "uniform",
        f"--mitigation=fault-aware: the stuck bit's position: "
        f"{_choices(stuck_at.BIT_DISTRIBUTIONS)} (high: weighted to the high bits; msb: the "
        "sign bit).",
    )
    fault_model: str = _setting(
        "clustered", f"Fault model of the chip population: {_choices(faults.FAULT_MODELS)}."
    )
    cluster_alpha: float = _setting(
        2.0, "Clustered model: clustering parameter (> 0; small = strong chip-to-chip variation)."
    )
    line_fraction: float = _setting(
        1.0,
        "Lines model: share of the fault rate from whole failed rows/columns, in [0, 1] "
        "(the rest: independent PE faults).",
    )
    analysis_fault_model: str = _setting(
        "exact",
        f"Fault model of the resilience analysis chips: {_choices(faults.FAULT_MODELS)}.",
    )
    fault_rates: Sequence[float] = _setting(
        (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
        "Resilience analysis grid of PE fault rates: increasing, in [0, 1], starting at 0, "
        "at least 2 points.",
    )
    retrain_epochs: Sequence[float] = _setting(
        (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
        "Resilience analysis grid of retraining amounts (epochs): increasing, starting at 0 "
        "(no retraining).",
    )
    eval_every: float = _setting(
        0.125,
        "The analysis also evaluates every this many epochs between the --retrain_epochs "
        "amounts (retraining nests, so this costs evaluations only; 0 = the grid only), >= 0.",
    )
    maps_per_rate: int = _setting(4, "Sampled fault maps K per grid fault rate (>= 1).")
    num_chips: int = _setting(64, "Chips in the sampled population (>= 1).")
    chip_fault_rate: float = _setting(
        0.1, "Mean PE fault rate of the sampled population, in [0, 1]."
    )
    chip_fault_maps: str | None = _setting(
        None,
        "Population fault maps file (.npz with bool[chips, R, C] 'fault_maps', or .csv with "
        "chip,row,col); replaces sampling.",
    )
    max_accuracy_drop: float | None = _setting(
        0.02, "Accuracy target = baseline accuracy - this, in [0, 1]."
    )
    target_accuracy: float | None = _setting(
        None, "Absolute accuracy target in [0, 1]; when given, replaces --max_accuracy_drop."
    )
    validation_margin: float = _setting(
        0.0,
        "Decisions on the validation split (the map, verification, top-ups, where every "
        "policy stops) require the target plus this; the test set is judged against the "
        "target alone. In [0, 0.5].",
    )
    statistic: str = _setting(
        "min",
        f"Accuracy over the K maps of a grid rate: {resilience.STATISTICS_HELP}; or auto "
        f"(of {', '.join(calibration.STATISTICS)}, the one that, with --interpolation, "
        "misses the target on the fewest analysis chips in cross-validation, then costs "
        "least, top-ups included).",
    )
    interpolation: str = _setting(
        "conservative",
        "How a chip's amount is read off the map: conservative (amount at the next grid rate "
        "up) | linear (between grid rates, rounded up to a whole step) | auto (chosen with "
        "--statistic by cross-validation on the analysis).",
    )
    rate_measure: str = _setting(
        "pe",
        "Chip fault rate that selects its amount: pe (faulty PEs) | effective (bypassed "
        "weights) | importance (bypassed weight magnitude).",
    )
    predictor_chips: int = _setting(
        0,
        "Validation chips of the predictor study, which checks how well each rate measure "
        "predicts the retraining a chip needs (0 = no study).",
    )
    grouping: str = _setting(
        "none",
        f"Fuse chips' fault maps into shared retrainings: {_choices(grouping.GROUPINGS)}.",
    )
    max_group_size: int = _setting(8, "Most chips in one fused group (>= 2).")
    fixed_epochs: float | None = _setting(
        None,
        "Per-chip epochs of the fixed policy Reduce is compared with (default: the largest "
        "--retrain_epochs).",
    )
    compare_policies: bool = _setting(
        True,
        "Also run the fixed and adaptive policies on the population, to compare Reduce with "
        "them in one run.",
    )
    fixed_policy_chips: int = _setting(
        0,
        "Chips whose outcome under the fixed policy is measured: a random sample of the "
        "population (its cost still counts every chip), in [0, --num_chips]; 0 = every chip.",
    )
    adaptive_max_epochs: float | None = _setting(
        None,
        "Cap of the adaptive policy (verify at 0, top up --topup_epochs at a time until the "
        "target): most epochs per chip, > 0 (default: the fixed policy's amount).",
    )
    verify_slices: int = _setting(
        16,
        "Slices of the validation split in a verification that stops early (the adaptive_es "
        "and online policies): a chip is rejected as soon as the slices seen prove it cannot "
        "meet the target; in [1, 1024] (1 = the whole split at once, no early stop).",
    )
    verify_alpha: float = _setting(
        0.02,
        "Bound on the probability that a verification stopping early rejects a chip the "
        "whole split would accept, in [0, 0.5] (0: stop only when the target is out of "
        "reach whatever the rest of the split gives).",
    )
    online_batch: int = _setting(
        8, "Chips per round of the online policy: its map is refitted between rounds (>= 1)."
    )
    online_quantile: float = _setting(
        0.25,
        "Quantile of the needs, at a chip's rate, at which the online policy starts it, in "
        "(0, 1) (low: most chips are not over-provisioned).",
    )
    online_confidence: float = _setting(
        0.9,
        "Confidence that a chip's start is at most that quantile, in (0, 1) (the start is a "
        "lower confidence bound of it: a rate seen on few chips starts at 0).",
    )
    online_min_evidence: int = _setting(
        3,
        "Chips at or below a rate that missed the target within the cap before the online "
        "policy stops serving chips at that rate (>= 0; 0 = serve every chip).",
    )
    topup_epochs: float = _setting(
        0.25, "Top-up increment (epochs) for a retrained chip still below the target (> 0)."
    )
    max_topup_epochs: float = _setting(1.0, "Most top-up epochs per chip (>= 0; 0 = no top-up).")
    batch_size: int = _setting(
        128, "Training batch size (baseline and retraining), at most the training split."
    )
    augment: str = _setting(
        "auto",
        f"Random crop (pad {augment_lib.PAD}) and horizontal flip of training batches, the "
        f"same for every chip of a step: {_choices(augment_lib.AUGMENT_MODES)} (auto: on for "
        f"{', '.join(augment_lib.AUGMENTED_DATASETS)}).",
    )
    optimizer: str = _setting("adam", f"Retraining optimizer: {_choices(train.OPTIMIZERS)}.")
    learning_rate: float = _setting(1e-3, "Retraining learning rate, in (0, 10].")
    weight_decay: float = _setting(
        0.0,
        "Retraining weight decay, in [0, 1] (adam: decoupled, AdamW; sgd/momentum: added to "
        "the gradient).",
    )
    baseline_epochs: float = _setting(15.0, "Epochs of the fault-free baseline training (> 0).")
    baseline_optimizer: str = _setting("adam", f"Baseline optimizer: {_choices(train.OPTIMIZERS)}.")
    baseline_learning_rate: float = _setting(1e-3, "Baseline (peak) learning rate, in (0, 10].")
    baseline_weight_decay: float = _setting(
        0.0, "Baseline weight decay, in [0, 1] (as --weight_decay)."
    )
    baseline_schedule: str = _setting(
        "constant",
        f"Baseline learning-rate schedule: {_choices(train.SCHEDULES)} (cosine: from "
        "--baseline_learning_rate to 0 over the baseline's steps).",
    )
    chips_per_batch: int = _setting(
        64, "Chips trained together in one chunk (bounds memory; results do not depend on it)."
    )
    chip_batching: str = _setting(
        "vmap",
        f"How each compiled step computes its chips: {_choices(train.CHIP_BATCHING)} (vmap: "
        "vectorised, for small networks and accelerators; map: one chip after another in the "
        "same program, faster for ResNets on a CPU).",
    )
    topup_pool_chunks: int = _setting(
        4,
        "Top-ups are pooled over this many chunks: the chips still below the target after "
        "their selected retraining, from up to this many chunks of --chips_per_batch chips, "
        "are topped up together in full batches (1 to 1024; the chip states of that many "
        "chunks are held at once; results do not depend on it).",
    )
    eval_batch_size: int = _setting(100, "Test images per evaluation batch.")
    summary_chips: bool = _setting(
        True,
        "Per-chip entries in summary.json (false: null there, for large populations; "
        "chips.csv holds them either way).",
    )
    save_chip_weights: bool = _setting(
        False,
        "Store every chip's retrained variables (bypassed weights zero; chips given 0 epochs as "
        "a reference to the masked baseline) in WORKDIR/chip_weights/, written as chunks of "
        "chips finish; read one with reduce_jax.load_chip or experiments.export_chip.",
    )
    seed: int = _setting(0, "Seed of every random stream (>= 0).")

    def as_dict(self) -> dict:
        """The settings as plain JSON values (the grids as lists of floats)."""
        d = dataclasses.asdict(self)
        d["fault_rates"] = [float(x) for x in self.fault_rates]
        d["retrain_epochs"] = [float(x) for x in self.retrain_epochs]
        d["stuck_site_probs"] = [float(x) for x in self.stuck_site_probs]
        return d

    @classmethod
    def from_dict(cls, settings: dict) -> ReduceConfig:
        """The settings ``as_dict`` wrote (a saved study's): the grids as tuples again;
        a key this version does not know is ignored, a missing one takes its default."""
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in settings.items() if k in names}
        for name in ("fault_rates", "retrain_epochs", "stuck_site_probs"):
            if name in kept:
                kept[name] = tuple(kept[name])
        return cls(**kept)

    def stuck_mix(self) -> stuck_at.StuckAtMix:
        """The stuck bits of ``--mitigation=fault-aware`` (``--stuck_*``)."""
        return stuck_at.StuckAtMix(
            tuple(float(p) for p in self.stuck_site_probs), self.stuck_p_one, self.stuck_bits
        )


class _FloatListParser(flags.ListParser):
    """A comma-separated list of numbers, parsed to a tuple of floats."""

    def __init__(self) -> None:
        super().__init__()
        self.syntactic_help = "a comma-separated list of numbers"

    def parse(self, argument) -> tuple[float, ...]:
        items = argument if isinstance(argument, (list, tuple)) else super().parse(argument)
        try:
            return tuple(float(x) for x in items)
        except (TypeError, ValueError):
            raise ValueError("must be a comma-separated list of numbers") from None


def _flag(field: dataclasses.Field, annotation) -> flags.Flag:
    """The absl flag of one ``ReduceConfig`` field: its name, default, help and type.

    Types: ``str``, ``int``, ``float``, ``bool``, ``Sequence[float]`` (a comma-separated list,
    parsed to a tuple of floats) and ``T | None`` of those (default None).

    Raises:
      TypeError: the annotation is none of these.
    """
    name, default, help_text = field.name, field.default, field.metadata.get("help", "")
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        (annotation,) = [a for a in args if a is not type(None)]  # Optional[T]: default None
    if annotation is bool:
        return flags.BooleanFlag(name, default, help_text)
    if typing.get_origin(annotation) is collections.abc.Sequence:
        if typing.get_args(annotation) == (float,):
            serializer = flags.CsvListSerializer(",")
            return flags.Flag(_FloatListParser(), serializer, name, default, help_text)
    parsers = {str: flags.ArgumentParser, int: flags.IntegerParser, float: flags.FloatParser}
    if annotation not in parsers:
        raise TypeError(f"ReduceConfig.{name}: no flag type for {annotation!r}")
    return flags.Flag(parsers[annotation](), flags.ArgumentSerializer(), name, default, help_text)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per ``ReduceConfig`` field (same name, type, default and help).

    The flags belong to this module: a CLI shows them in its ``--help`` with
    ``flags.adopt_module_key_flags(reduce_jax.config)``.

    Args:
      flag_values: where to define them.
    """
    hints = typing.get_type_hints(ReduceConfig)
    for field in dataclasses.fields(ReduceConfig):
        flags.DEFINE_flag(_flag(field, hints[field.name]), flag_values)


def from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> ReduceConfig:
    """The configuration from parsed flags defined by ``define_flags``.

    ``--target_accuracy``, when given, replaces ``--max_accuracy_drop`` (which has a default).

    Args:
      flag_values: the parsed flags.

    Returns:
      The ``ReduceConfig``, not yet validated (see ``validate``).
    """
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(ReduceConfig)}
    if values["target_accuracy"] is not None:
        values["max_accuracy_drop"] = None
    return ReduceConfig(**values)


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


def _join(values: Sequence[float]) -> str:
    return ",".join(f"{v:.12g}" for v in values)


def _check_grid(name: str, values: Sequence[float], lo: float, hi: float | None) -> None:
    _require(len(values) > 0, f"--{name} is empty; give a comma-separated list")
    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    for v in values:
        _require(lo <= v and (hi is None or v <= hi), f"--{name}: value {v} is outside {rng}")
    _require(
        all(b > a for a, b in zip(values[:-1], values[1:], strict=True)),
        f"--{name}={_join(values)} must be strictly increasing",
    )


def validate(cfg: ReduceConfig, dataset_files: bool = True) -> None:
    """Checks every setting and input file; raises ``ConfigError`` (one line) on the first bad one.

    Cheap: no dataset is loaded and nothing is computed, but files are checked to exist,
    fault-map files are read and validated, and ``--init_checkpoint``'s tree is read.

    Args:
      cfg: the settings.
      dataset_files: check ``--dataset``'s files (False when a ``Dataset`` is given instead).
    """
    _one_of(cfg, "dataset", data_lib.DATASETS)
    _require(
        0 < cfg.validation_fraction <= 0.5,
        f"--validation_fraction={cfg.validation_fraction} is outside (0, 0.5]",
    )
    _one_of(cfg, "model", models.MODELS)
    _require(0 < cfg.model_width <= 16, f"--model_width={cfg.model_width} is outside (0, 16]")
    for name in ("array_rows", "array_cols"):
        _in_range(cfg, name, 1, 4096)
    for name in ("fault_model", "analysis_fault_model"):
        _one_of(cfg, name, faults.FAULT_MODELS)
    _require(cfg.cluster_alpha > 0, f"--cluster_alpha={cfg.cluster_alpha} must be > 0")
    _in_range(cfg, "line_fraction", 0, 1)
    _check_grid("fault_rates", list(cfg.fault_rates), 0.0, 1.0)
    _require(
        len(cfg.fault_rates) >= 2 and cfg.fault_rates[0] == 0,
        f"--fault_rates={_join(cfg.fault_rates)} must start at 0 and have at least 2 points "
        "(a chip's amount is read off the map between grid rates, from fault-free at 0 up)",
    )
    _check_grid("retrain_epochs", list(cfg.retrain_epochs), 0.0, None)
    _require(
        cfg.retrain_epochs[0] == 0,
        f"--retrain_epochs={_join(cfg.retrain_epochs)} must start at 0 (no retraining, the "
        "amount for chips that need none)",
    )
    _require(cfg.eval_every >= 0, f"--eval_every={cfg.eval_every} must be >= 0")
    _require(cfg.maps_per_rate >= 1, f"--maps_per_rate={cfg.maps_per_rate} must be >= 1")
    _require(cfg.num_chips >= 1, f"--num_chips={cfg.num_chips} must be >= 1")
    _in_range(cfg, "chip_fault_rate", 0, 1)
    has_drop, has_target = cfg.max_accuracy_drop is not None, cfg.target_accuracy is not None
    _require(
        has_drop != has_target, "give exactly one of --max_accuracy_drop and --target_accuracy"
    )
    _in_range(cfg, "max_accuracy_drop" if has_drop else "target_accuracy", 0, 1)
    _in_range(cfg, "validation_margin", 0, 0.5)
    if has_target:
        _require(
            cfg.target_accuracy + cfg.validation_margin <= 1,
            f"--target_accuracy={cfg.target_accuracy} plus --validation_margin="
            f"{cfg.validation_margin} must be <= 1 (no accuracy can meet it)",
        )
    if cfg.statistic != resilience.AUTO:
        try:
            resilience.parse_statistic(cfg.statistic)
        except ValueError as e:
            raise ConfigError(f"{e}, or auto") from None
    _one_of(cfg, "interpolation", (*resilience.INTERPOLATIONS, resilience.AUTO))
    _one_of(cfg, "rate_measure", systolic.RATE_MEASURES)
    _in_range(cfg, "predictor_chips", 0, 1 << 20)
    # With --chip_fault_maps the population's size is the file's: a larger sample is all of it.
    _in_range(
        cfg, "fixed_policy_chips", 0, cfg.num_chips if cfg.chip_fault_maps is None else 1 << 20
    )
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
    if cfg.adaptive_max_epochs is not None:
        _require(
            cfg.adaptive_max_epochs > 0,
            f"--adaptive_max_epochs={cfg.adaptive_max_epochs} must be > 0",
        )
    _require(cfg.topup_epochs > 0, f"--topup_epochs={cfg.topup_epochs} must be > 0")
    _one_of(cfg, "arithmetic", int8.ARITHMETICS)
    _one_of(cfg, "mitigation", MITIGATIONS)
    _check_stuck_mix(cfg)
    _in_range(cfg, "verify_slices", 1, 1024)
    _in_range(cfg, "verify_alpha", 0, 0.5)
    _in_range(cfg, "online_batch", 1, 1 << 20)
    _require(
        0 < cfg.online_quantile < 1, f"--online_quantile={cfg.online_quantile} is outside (0, 1)"
    )
    _require(
        0 < cfg.online_confidence < 1,
        f"--online_confidence={cfg.online_confidence} is outside (0, 1)",
    )
    _in_range(cfg, "online_min_evidence", 0, 1 << 20)
    _require(cfg.max_topup_epochs >= 0, f"--max_topup_epochs={cfg.max_topup_epochs} must be >= 0")
    for name in ("batch_size", "chips_per_batch", "eval_batch_size"):
        _in_range(cfg, name, 1, 1 << 20)
    _in_range(cfg, "topup_pool_chunks", 1, 1024)
    _one_of(cfg, "chip_batching", train.CHIP_BATCHING)
    for name in ("optimizer", "baseline_optimizer"):
        _one_of(cfg, name, train.OPTIMIZERS)
    for name in ("learning_rate", "baseline_learning_rate"):
        v = getattr(cfg, name)
        _require(0 < v <= 10, f"--{name}={v} is outside (0, 10]")
    for name in ("weight_decay", "baseline_weight_decay"):
        _in_range(cfg, name, 0, 1)
    _one_of(cfg, "baseline_schedule", train.SCHEDULES)
    _one_of(cfg, "augment", augment_lib.AUGMENT_MODES)
    _require(cfg.baseline_epochs > 0, f"--baseline_epochs={cfg.baseline_epochs} must be > 0")
    _require(cfg.seed >= 0, f"--seed={cfg.seed} must be >= 0")
    _require(
        not cfg.save_chip_weights or bool(cfg.workdir),
        "--save_chip_weights needs --workdir (the store is WORKDIR/chip_weights/)",
    )
    _validate_files(cfg, dataset_files)


def _check_stuck_mix(cfg: ReduceConfig) -> None:
    """``--mitigation=fault-aware`` needs the int8 array and a valid stuck-bit mix, and no
    fused groups (a group's members have different stuck bits)."""
    probs = tuple(float(p) for p in cfg.stuck_site_probs)
    _require(
        len(probs) == len(stuck_at.SITES) and min(probs, default=-1) >= 0,
        f"--stuck_site_probs={_join(probs)} must be {len(stuck_at.SITES)} probabilities in "
        f"[0, 1] ({', '.join(stuck_at.SITES)})",
    )
    _require(abs(sum(probs) - 1) <= 1e-6, f"--stuck_site_probs={_join(probs)} must sum to 1")
    _in_range(cfg, "stuck_p_one", 0, 1)
    _one_of(cfg, "stuck_bits", stuck_at.BIT_DISTRIBUTIONS)
    if cfg.mitigation != "fault-aware":
        return
    _require(
        cfg.arithmetic == "int8",
        f"--mitigation=fault-aware needs --arithmetic=int8 (stuck bits are simulated on the "
        f"int8 array), got --arithmetic={cfg.arithmetic}",
    )
    _require(
        cfg.grouping == "none",
        f"--grouping={cfg.grouping} fuses chips' maps, which --mitigation=fault-aware cannot "
        "(the members' stuck bits differ); use --grouping=none",
    )


def _validate_files(cfg: ReduceConfig, dataset_files: bool) -> None:
    """The input files and the workdir named by ``cfg`` exist and are usable."""
    try:
        if dataset_files:
            data_lib.validate_dataset_files(cfg.dataset, cfg.data_dir)
    except data_lib.DatasetError as e:
        raise ConfigError(str(e)) from None
    if cfg.init_checkpoint is not None:
        from reduce_jax.stages import baseline  # orbax: imported only when needed

        baseline.checkpoint_tree(cfg.init_checkpoint)
    if cfg.chip_fault_maps is not None:
        try:
            faults.load_fault_maps(cfg.chip_fault_maps, cfg.array_rows, cfg.array_cols)
        except faults.FaultMapError as e:
            raise ConfigError(f"--chip_fault_maps: {e}") from None
    if cfg.workdir is not None:
        _require(cfg.workdir.strip() != "", "--workdir is empty; give the output directory")
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
