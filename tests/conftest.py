"""Shared fixtures: the sklearn digits dataset and tiny models trained on it."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from reduce_jax import config, data
from reduce_jax.engine import population
from reduce_jax.nets import models

# XLA:CPU spends most of these tests' time compiling their small programs, which compile
# faster with fewer of LLVM's optimizations: level 1 instead of the default 3 (the smoke
# study's summary is the same). Level 0 would save more, but it moves some float sums by a
# few ULPs, past tests/engine/test_train.py's 1e-6 on a loss. Set here, before anything
# starts JAX's backend (the imports above do not), so that the processes the tests start
# (the CLI, the docs' examples) compile so too; a level already in XLA_FLAGS is kept.
_OPT_LEVEL = "--xla_backend_optimization_level"
if _OPT_LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT_LEVEL}=1".strip()


CACHE_DIR = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "xla_tests"


@pytest.fixture(scope="session", autouse=True)
def compilation_cache():
    """JAX's persistent compilation cache, shared by the run's workers (pytest-xdist) and kept
    between runs, as the CLI keeps its own (``--compilation_cache_dir``): a program compiled
    again with the same shapes (every in-process run of the small study compiles the same
    ones, and so does every run of the suite on unchanged code) is loaded instead; results do
    not change. It is ``.cache/xla_tests`` in the checkout (ignored by git; a fresh clone, as
    in CI, starts cold), or ``JAX_COMPILATION_CACHE_DIR`` when set, as mutation testing does
    (docs/testing.md). Workers write their entries unlocked: an entry read while being
    written is compiled again, with a warning."""
    given = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    path = pathlib.Path(given) if given else CACHE_DIR
    path.mkdir(parents=True, exist_ok=True)
    before = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
        jax.config.jax_persistent_cache_min_entry_size_bytes,
    )
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax_cache.reset_cache()  # programs compiled while collecting the tests checked it already
    yield path
    for name, value in zip(
        (
            "jax_compilation_cache_dir",
            "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes",
        ),
        before,
        strict=True,
    ):
        jax.config.update(name, value)
    jax_cache.reset_cache()


@pytest.fixture(scope="session")
def digits():
    """8x8 sklearn digits: 1437 train / 360 test images, NHWC float32."""
    return data.load_dataset("digits")


@pytest.fixture(scope="session")
def digits_device(digits):
    """The digits on the device, 10% of the training images held out for validation."""
    return population.DeviceData.from_dataset(data.split_validation(digits, 0.1))


@pytest.fixture(scope="session")
def digits_jnp(digits):
    """``(train_x, train_y, test_x, test_y)`` as device arrays."""
    return (
        jnp.asarray(digits.train_images),
        jnp.asarray(digits.train_labels),
        jnp.asarray(digits.test_images),
        jnp.asarray(digits.test_labels),
    )


@pytest.fixture(scope="session")
def tiny_mlp():
    """A one-hidden-layer MLP (64 -> 16 -> 10): kernels [64, 16] and [16, 10]."""
    return models.MLP(num_classes=10, hidden=(16,))


@pytest.fixture(scope="session")
def tiny_mlp_params(tiny_mlp, digits):
    params = models.init_variables(tiny_mlp, jax.random.key(0), digits.image_shape)["params"]
    # Return numpy leaves: jitted functions that donate their inputs cannot invalidate them.
    return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="session")
def tiny_mlp_variables(tiny_mlp_params):
    """The tiny MLP's Flax variables: ``{"params", "batch_stats": {}}`` (no BatchNorm)."""
    return {"params": tiny_mlp_params, "batch_stats": {}}


@pytest.fixture(scope="session")
def small_run_config():
    """Factory of the config of a seconds-long in-process Reduce run (digits, the MLP, an
    8x8 array, 8 chips): ``small_run_config(workdir, **changes)``."""
    return _small_run_config


def _small_run_config(workdir: str, **changes) -> config.ReduceConfig:
    base = dict(
        workdir=workdir,
        dataset="digits",
        model="mlp",
        array_rows=8,
        array_cols=8,
        fault_rates=(0.0, 0.1, 0.3),
        retrain_epochs=(0.0, 0.5, 1.0),
        maps_per_rate=2,
        num_chips=8,
        max_accuracy_drop=0.05,
        batch_size=64,
        learning_rate=3e-3,
    )
    return config.ReduceConfig(**{**base, **changes})
