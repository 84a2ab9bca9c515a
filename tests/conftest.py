"""Shared fixtures: the sklearn digits dataset and tiny models trained on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reduce_jax import config, data
from reduce_jax.engine import population
from reduce_jax.nets import models


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
