"""The flags generated from ``ReduceConfig``: one per field, same name, type, default and help."""

import dataclasses
import glob
import os

import pytest
from absl import flags

from reduce_jax import config as config_lib
from reduce_jax.errors import ConfigError

FIELDS = dataclasses.fields(config_lib.ReduceConfig)

# The progress store keys saved runs on this dict: it must not change with the flags.
DEFAULT_DICT = {
    "workdir": None,
    "dataset": "mnist5k",
    "data_dir": None,
    "validation_fraction": 0.1,
    "model": "lenet5",
    "model_width": 1.0,
    "init_checkpoint": None,
    "array_rows": 16,
    "array_cols": 16,
    "arithmetic": "float32",
    "mitigation": "bypass",
    "stuck_site_probs": [1 / 3, 1 / 3, 1 / 3],
    "stuck_p_one": 0.5,
    "stuck_bits": "uniform",
    "fault_model": "clustered",
    "cluster_alpha": 2.0,
    "line_fraction": 1.0,
    "analysis_fault_model": "exact",
    "fault_rates": [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5],
    "retrain_epochs": [0.0, 0.25, 0.5, 1.0, 2.0, 4.0],
    "eval_every": 0.125,
    "maps_per_rate": 4,
    "num_chips": 64,
    "chip_fault_rate": 0.1,
    "chip_fault_maps": None,
    "max_accuracy_drop": 0.02,
    "target_accuracy": None,
    "validation_margin": 0.0,
    "statistic": "min",
    "interpolation": "conservative",
    "rate_measure": "pe",
    "predictor_chips": 0,
    "grouping": "none",
    "max_group_size": 8,
    "fixed_epochs": None,
    "compare_policies": True,
    "fixed_policy_chips": 0,
    "adaptive_max_epochs": None,
    "verify_slices": 16,
    "verify_alpha": 0.02,
    "online_batch": 8,
    "online_quantile": 0.25,
    "online_confidence": 0.9,
    "online_min_evidence": 3,
    "topup_epochs": 0.25,
    "max_topup_epochs": 1.0,
    "batch_size": 128,
    "augment": "auto",
    "optimizer": "adam",
    "learning_rate": 0.001,
    "weight_decay": 0.0,
    "baseline_epochs": 15.0,
    "baseline_optimizer": "adam",
    "baseline_learning_rate": 0.001,
    "baseline_weight_decay": 0.0,
    "baseline_schedule": "constant",
    "chips_per_batch": 64,
    "chip_batching": "vmap",
    "topup_pool_chunks": 4,
    "eval_batch_size": 100,
    "summary_chips": True,
    "save_chip_weights": False,
    "seed": 0,
}


def parsed(*args: str) -> flags.FlagValues:
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["prog", *args])
    return fv


def test_every_field_has_a_flag_with_its_default_and_help():
    fv = parsed()
    assert {f.name for f in FIELDS} == set(fv)
    for f in FIELDS:
        flag = fv[f.name]
        assert flag.default == f.default and flag.value == f.default, f.name
        assert f.metadata["help"].strip() and flag.help == f.metadata["help"], f.name


def test_default_flags_give_the_default_config_and_the_same_dict():
    cfg = config_lib.from_flags(parsed())
    assert cfg == config_lib.ReduceConfig()
    assert cfg.as_dict() == DEFAULT_DICT and list(cfg.as_dict()) == list(DEFAULT_DICT)


def test_flags_parse_to_the_field_types():
    cfg = config_lib.from_flags(
        parsed(
            "--fault_rates=0, 0.2,0.4",
            "--retrain_epochs=0,1",
            "--fixed_epochs=2",
            "--num_chips=3",
            "--data_dir=/data",
            "--statistic=quantile:0.1",
        )
    )
    assert cfg.fault_rates == (0.0, 0.2, 0.4) and isinstance(cfg.fault_rates, tuple)
    assert cfg.retrain_epochs == (0.0, 1.0)
    assert cfg.fixed_epochs == 2.0 and isinstance(cfg.fixed_epochs, float)
    assert cfg.num_chips == 3 and cfg.data_dir == "/data" and cfg.statistic == "quantile:0.1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_chips = 4


def test_target_accuracy_replaces_max_accuracy_drop():
    cfg = config_lib.from_flags(parsed("--target_accuracy=0.9"))
    assert cfg.target_accuracy == 0.9 and cfg.max_accuracy_drop is None
    assert config_lib.from_flags(parsed()).max_accuracy_drop == 0.02


@pytest.mark.parametrize(
    "arg, needle",
    [
        ("--retrain_epochs=0,1,x", "--retrain_epochs=0,1,x: must be a comma-separated list"),
        ("--fault_rates=0;0.1", "--fault_rates=0;0.1: must be a comma-separated list"),
        ("--num_chips=1.5", "--num_chips=1.5"),
    ],
)
def test_bad_value_names_the_flag(arg, needle):
    with pytest.raises(flags.IllegalFlagValueError) as e:
        parsed(arg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_flag_types_from_annotations():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        on: bool = dataclasses.field(default=False, metadata={"help": "a switch"})
        size: int | None = dataclasses.field(default=None, metadata={"help": "a size"})
        name: dict = dataclasses.field(default=None, metadata={"help": "unsupported"})

    on, size, name = dataclasses.fields(Toy)
    fv = flags.FlagValues()
    flags.DEFINE_flag(config_lib._flag(on, bool), fv)
    flags.DEFINE_flag(config_lib._flag(size, int | None), fv)
    fv(["prog", "--on", "--size=3"])
    assert fv["on"].value is True and fv["size"].value == 3 and fv["size"].default is None
    with pytest.raises(TypeError, match="name"):
        config_lib._flag(name, dict)


@pytest.mark.parametrize(
    "flagfile",
    sorted(
        glob.glob(
            os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "*.flags")
        )
    ),
    ids=os.path.basename,
)
def test_every_flagfile_parses_and_validates(flagfile):
    """Every shipped flagfile names existing flags with allowed values (its dataset files
    aside: cifar10_resnet18 reads the user's archive)."""
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["prog", f"--flagfile={flagfile}", "--workdir=unused"])
    config_lib.validate(config_lib.from_flags(fv), dataset_files=False)


@pytest.mark.parametrize("value", [0, 1, 8, 64])
def test_fixed_policy_chips_is_every_chip_or_a_sample_of_the_population(value):
    config_lib.validate(config_lib.ReduceConfig(dataset="digits", fixed_policy_chips=value))


@pytest.mark.parametrize("value", [-1, 65])
def test_fixed_policy_chips_outside_the_population_names_the_flag_and_range(value):
    cfg = config_lib.ReduceConfig(dataset="digits", num_chips=64, fixed_policy_chips=value)
    with pytest.raises(ConfigError) as e:
        config_lib.validate(cfg)
    assert str(e.value) == f"--fixed_policy_chips={value} is outside [0, 64]"


def test_a_saved_studys_settings_read_back_as_the_same_config():
    cfg = config_lib.ReduceConfig(
        fault_rates=(0.0, 0.2), stuck_site_probs=(1.0, 0.0, 0.0), mitigation="fault-aware"
    )
    assert config_lib.ReduceConfig.from_dict(cfg.as_dict()) == cfg
    older = {k: v for k, v in cfg.as_dict().items() if k != "stuck_bits"}
    assert config_lib.ReduceConfig.from_dict(dict(older, removed_flag=1)) == cfg
