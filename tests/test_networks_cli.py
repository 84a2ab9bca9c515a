"""ResNets end to end: ResNet-20 through the CLI on digits, and the CIFAR-10 ResNet-18
flagfile's setup on a small synthetic CIFAR-10 archive."""

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from test_cli import ROOT, SMOKE, run_cli
from test_data import _write_cifar

from reduce_jax import config as config_lib
from reduce_jax import data, pipeline
from reduce_jax.engine import train
from reduce_jax.nets import augment, models
from reduce_jax.stages import baseline as baseline_lib

CIFAR_FLAGS = os.path.join(ROOT, "experiments", "configs", "cifar10_resnet18.flags")


@pytest.mark.slow
def test_resnet20_through_the_cli_on_digits(tmp_path):
    """A narrow ResNet-20 (BatchNorm, strided blocks, projections) on 8x8 digits: the run
    completes, the baseline learned, the checkpoint holds both collections, and every chip's
    outcome is reported."""
    workdir = str(tmp_path / "resnet20")
    proc = run_cli(
        f"--flagfile={SMOKE}",
        f"--workdir={workdir}",
        "--model=resnet20",
        "--model_width=0.25",
        "--fault_rates=0,0.3",
        "--retrain_epochs=0,0.5",
        "--maps_per_rate=1",
        "--num_chips=2",
        "--chips_per_batch=2",
        "--max_topup_epochs=0",
        "--baseline_epochs=3",
        "--baseline_learning_rate=0.003",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        s = json.load(f)
    assert s["config"]["model"] == "resnet20" and s["config"]["model_width"] == 0.25
    assert s["baseline_accuracy"] > 0.5  # 10 classes: it learned
    assert len(s["chips"]) == 2 and len(s["resilience"]["accuracy"]) == 2
    # The mapping lists every convolution, the 1x1 projections included, and no BN leaf.
    layers = [m["name"] for m in s["mapping"]]
    assert sum("proj" in n for n in layers) == 2 and len(layers) == 22
    assert not any("bn" in n for n in layers)
    with open(os.path.join(workdir, "baseline.json")) as f:
        meta = json.load(f)["config"]
    assert meta["augment"] is False and meta["width"] == 0.25  # digits: auto is off
    saved = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(workdir, "baseline")))
    assert set(saved) == {"params", "batch_stats"}
    var = np.asarray(saved["batch_stats"]["stem"]["bn"]["var"])
    assert var.shape == (4,) and not np.allclose(var, 1.0)  # running statistics were trained


def _cifar_config(tmp_path) -> config_lib.ReduceConfig:
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["prog", f"--flagfile={CIFAR_FLAGS}", f"--data_dir={tmp_path}", f"--workdir={tmp_path}/w"])
    return config_lib.from_flags(fv)


@pytest.mark.slow
def test_cifar10_resnet18_flagfile_validates_and_its_first_steps_run(tmp_path):
    """The GPU flagfile on a synthetic archive: it validates, the data loads as CIFAR-10,
    augmentation is on, and the baseline's first steps (momentum, weight decay, cosine, crop
    and flip) run on ResNet-18, here at width 1/8 to keep a CPU test short."""
    _write_cifar(tmp_path, "cifar10", as_archive=True, n=40)
    cfg = _cifar_config(tmp_path)
    config_lib.validate(cfg)
    assert cfg.model == "resnet18" and cfg.baseline_schedule == "cosine"
    ds = data.load_dataset(cfg.dataset, cfg.data_dir)
    assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
    assert augment.enabled(cfg.augment, cfg.dataset)
    cfg = dataclasses.replace(cfg, model_width=0.125, batch_size=16)
    model = models.get_model(cfg.model, ds.num_classes, cfg.model_width)
    spec = baseline_lib.BaselineSpec(
        ds.name, cfg.model, cfg.model_width, 0.2, cfg.batch_size, cfg.baseline_optimizer,
        cfg.baseline_learning_rate, cfg.baseline_weight_decay, cfg.baseline_schedule,
        True, cfg.seed,
    )  # fmt: skip
    variables, info = baseline_lib.train_baseline(model, ds, jax.random.key(0), spec)
    steps = int(train.epochs_to_steps(0.2, train.steps_per_epoch(len(ds.train_labels), 16)))
    assert info["steps"] == steps >= 2
    assert np.isfinite(info["accuracy"])  # validation (the test set only reports)
    init = models.init_variables(model, jax.random.key(0), ds.image_shape)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), variables, init)
    assert all(jax.tree.leaves(moved["batch_stats"])) and any(jax.tree.leaves(moved["params"]))
    assert pipeline.Keys.from_seed(cfg.seed)  # the run's streams exist for this config
