"""Shared fixtures: the sklearn digits dataset and tiny models trained on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reduce_jax import data, models


@pytest.fixture(scope="session")
def digits():
    """8x8 sklearn digits: 1437 train / 360 test images, NHWC float32."""
    return data.load_dataset("digits")


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
    params = models.init_params(tiny_mlp, jax.random.key(0), digits.image_shape)
    # Return numpy leaves: jitted functions that donate their inputs cannot invalidate them.
    return jax.tree.map(np.asarray, params)
