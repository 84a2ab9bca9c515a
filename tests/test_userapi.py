"""Your own model, data and weights through ``reduce_jax.run``: a module written with plain
strided ``nn.Conv``, trained outside the tool, measured (not retrained) as the baseline; and
every input the tool cannot use refused before compute, naming what is wrong."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reduce_jax
from reduce_jax import data, inputs
from reduce_jax.config import ConfigError
from reduce_jax.hardware import systolic
from reduce_jax.nets import models


class StridedNet(nn.Module):
    """A user's network: plain ``nn.Conv`` (strided 3x3, then 1x1), ``nn.BatchNorm`` and
    ``nn.Dense``."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), strides=2, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
        x = nn.relu(x)
        x = nn.relu(nn.Conv(16, (1, 1), name="proj")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="out")(x)


def train_outside(model, ds, key, steps=150, batch=64):
    """Adam on cross-entropy, as a user would train the module (any collection besides
    ``params``, such as BatchNorm's ``batch_stats``, is updated in train mode)."""
    variables = model.init(key, jnp.asarray(ds.train_images[:1]), train=False)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, state, opt, x, y):
        def loss_fn(p):
            logits, new = model.apply({"params": p, **state}, x, train=True, mutable=list(state))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, new

        (_, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), {**state, **new_state}, opt

    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(ds.train_labels), batch)
        params, state, opt = step(params, state, opt, ds.train_images[idx], ds.train_labels[idx])
    return {"params": params, **state}


def own_accuracy(model, variables, images, labels) -> float:
    logits = model.apply(variables, jnp.asarray(images), train=False)
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(labels)))


@pytest.fixture(scope="module")
def user_digits(digits):
    """The digits as a user brings them: uint8 arrays (0..255), scaled by the constructor."""
    to_u8 = lambda x: np.round(x * 255).astype(np.uint8)
    return reduce_jax.Dataset.from_arrays(
        to_u8(digits.train_images),
        digits.train_labels.astype(np.int64),
        to_u8(digits.test_images),
        digits.test_labels.astype(np.int64),
        name="my_digits",
    )


@pytest.mark.slow
def test_own_strided_conv_model_trained_outside_is_measured_not_trained(
    user_digits, small_run_config, tmp_path
):
    model = StridedNet()
    variables = train_outside(model, user_digits, jax.random.key(0))
    assert set(variables) == {"params", "batch_stats"}  # BatchNorm's running averages
    expected = own_accuracy(model, variables, user_digits.test_images, user_digits.test_labels)
    assert expected > 0.8  # a trained network, so the comparison means something
    cfg = small_run_config(str(tmp_path), num_chips=4, retrain_epochs=(0.0, 0.5))
    # Decisions are taken on the validation split the run holds out of the training set.
    val = data.split_validation(user_digits, cfg.validation_fraction)
    expected_val = own_accuracy(model, variables, val.val_images, val.val_labels)
    summary = reduce_jax.run(cfg, model=model, variables=variables, dataset=user_digits)

    assert summary.baseline.test_accuracy == pytest.approx(expected, abs=1e-6)
    assert summary.baseline.accuracy == pytest.approx(expected_val, abs=1e-6)
    assert summary.baseline.source == "given" and summary.baseline.steps == 0
    assert not (tmp_path / "baseline").exists()  # nothing trained, nothing saved
    with open(tmp_path / "summary.json") as f:
        s = json.load(f)
    assert s["baseline"]["source"] == "given" and s["baseline"]["accuracy_at_training"] is None
    assert s["baseline_test_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert s["baseline_accuracy"] == pytest.approx(expected_val, abs=1e-6)
    assert s["inputs"]["model"].startswith("StridedNet@sha256:")
    # The weights were trained on all of the training set the validation split is drawn from.
    assert s["inputs"]["validation_split"] == "held_out"
    assert any(w.startswith("the baseline is given (variables)") for w in s["warnings"])
    assert summary.warnings == s["warnings"]
    assert s["inputs"]["dataset"].startswith("my_digits@sha256:")
    assert {m["name"]: m["shape"] for m in s["mapping"]} == {
        "conv1/kernel": [3, 3, 1, 8],
        "proj/kernel": [1, 1, 8, 16],
        "out/kernel": [256, 10],
    }
    # The fault-free chip of the analysis is the baseline itself.
    assert s["resilience"]["accuracy"][0][0] == [pytest.approx(expected_val, abs=1e-6)] * 2
    assert len(s["chips"]) == 4 and all(c["accuracy_before"] <= 1 for c in s["chips"])


def test_models_apply_passes_train_to_every_model():
    class Mode(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.Dense(2)(x.reshape(len(x), -1)) + (1.0 if train else 0.0)

    x = jnp.ones((1, 2, 2, 1))
    v = models.init_variables(Mode(), jax.random.key(0), (2, 2, 1))
    diff = models.apply(Mode(), v, x, train=True) - models.apply(Mode(), v, x, train=False)
    np.testing.assert_allclose(diff, 1.0)
    mlp = models.MLP(10, (4,))  # a built-in model: called the same way
    p = models.init_variables(mlp, jax.random.key(0), (2, 2, 1))
    np.testing.assert_array_equal(models.apply(mlp, p, x, train=True), mlp.apply(p, x, train=True))


class Odd(nn.Module):
    """A layer with a 3-D ``kernel`` (no matrix view on the array)."""

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 2, 10))
        return jnp.einsum("bi,ijk->bk", x, k)


class WithOdd(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Dense(8, name="fc")(x.reshape(len(x), -1)))
        return Odd(name="odd")(x)


class Depthwise(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.Conv(4, (3, 3), feature_group_count=4, name="dw")(x)
        return nn.Dense(10, name="out")(x.reshape(len(x), -1))


class WithCounter(nn.Module):
    """A variable collection besides ``params`` and ``batch_stats``."""

    @nn.compact
    def __call__(self, x, train: bool):
        self.variable("counters", "calls", jnp.zeros, ())
        return nn.Dense(10)(x.reshape(len(x), -1))


class MnistOnly(nn.Module):
    """Written for 28x28 images."""

    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(10)(x.reshape(len(x), 28 * 28))


class TooFewClasses(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(3)(x.reshape(len(x), -1))


@pytest.mark.parametrize(
    "module, needles",
    [
        (WithOdd(), ["params/odd/kernel", "[8, 2, 10]"]),
        (Depthwise(), ["params/dw/kernel", "grouped or depthwise"]),
        (WithCounter(), ["WithCounter", "['counters']", "not supported"]),
        (TooFewClasses(), ["TooFewClasses", "num_classes=10"]),
        (MnistOnly(), ["MnistOnly does not initialise on images [8, 8, 1]"]),
    ],
)
def test_model_the_tool_cannot_use_is_refused_before_compute(
    module, needles, user_digits, small_run_config, tmp_path
):
    workdir = tmp_path / "w"
    with pytest.raises(ConfigError) as e:
        reduce_jax.run(small_run_config(str(workdir)), model=module, dataset=user_digits)
    msg = str(e.value)
    assert all(n in msg for n in needles) and "\n" not in msg, msg
    assert not workdir.exists()


def test_check_mappable_places_dense_and_hwio_convs_of_any_stride():
    for name, shape in (("mlp", (8, 8, 1)), ("lenet5", (28, 28, 1)), ("vgg_small", (32, 32, 3))):
        model = models.get_model(name, 10)
        params = jax.eval_shape(
            lambda m=model, s=shape: models.init_params(m, jax.random.key(0), s)
        )
        systolic.check_mappable(params, models.kernel_inputs(model, shape))
    net = StridedNet()
    params = jax.eval_shape(lambda: models.init_params(net, jax.random.key(0), (8, 8, 1)))
    systolic.check_mappable(params, models.kernel_inputs(net, (8, 8, 1)))
    with pytest.raises(systolic.MappingError, match="params/a/b/kernel has shape \\[3\\]"):
        systolic.check_mappable({"a": {"b": {"kernel": np.zeros(3)}}})
    with pytest.raises(systolic.MappingError, match="no parameter named 'kernel'"):
        systolic.check_mappable({"a": {"bias": np.zeros(3)}})


def test_given_variables_must_match_the_model(user_digits, small_run_config, tmp_path):
    model = StridedNet()
    v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    cases = [
        (
            {**v, "params": {**v["params"], "extra": {"kernel": np.zeros((2, 2))}}},
            "params/extra/kernel",
        ),
        ({**v, "params": {k: x for k, x in v["params"].items() if k != "out"}}, "params/out/bias"),
        ({"params": v["params"]}, "missing key batch_stats/bn1/mean"),
        (
            StridedNet(num_classes=5).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), False),
            "params/out/bias has shape [5] but the model on images [8, 8, 1]",
        ),
        (v["params"], "{'params': ...}"),
    ]
    for variables, needle in cases:
        with pytest.raises(ConfigError) as e:
            reduce_jax.run(
                small_run_config(str(tmp_path / "w")),
                model=model,
                variables=variables,
                dataset=user_digits,
            )
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "w").exists()


def test_variables_and_init_checkpoint_together_are_refused(
    user_digits, small_run_config, tmp_path
):
    cfg = small_run_config(None, init_checkpoint=str(tmp_path))
    with pytest.raises(ConfigError, match="--init_checkpoint"):
        inputs.resolve(cfg, StridedNet(), {"params": {}}, user_digits)


def test_wrong_types_are_refused(digits, small_run_config):
    cfg = small_run_config(None)
    with pytest.raises(ConfigError, match="Dataset.from_arrays"):
        inputs.resolve(cfg, dataset=(digits.train_images, digits.train_labels))
    with pytest.raises(ConfigError, match="flax.linen.Module"):
        inputs.resolve(cfg, model=lambda x: x)


def test_named_inputs_keep_their_names_and_given_ones_are_fingerprinted(
    digits, user_digits, small_run_config
):
    cfg = small_run_config(None)
    named = inputs.resolve(cfg)
    assert (named.model_id, named.dataset_id, named.source) == ("mlp", "digits", "trained")
    assert named.variables is None and named.baseline_sha256 is None
    given = inputs.resolve(cfg, model=models.MLP(10), dataset=user_digits)
    again = inputs.resolve(cfg, model=models.MLP(10), dataset=user_digits)
    other = inputs.resolve(cfg, model=models.MLP(10, (64,)), dataset=digits)
    assert given.model_id == again.model_id != other.model_id
    assert given.dataset_id == again.dataset_id != other.dataset_id
    assert given.model_id.startswith("MLP@sha256:")
    # uint8 images are scaled to [0, 1]: the named dataset's images up to the rounding.
    assert user_digits.test_images.dtype == np.float32
    np.testing.assert_allclose(user_digits.test_images, digits.test_images, atol=0.5 / 255)


# ------------------------------------------------- degenerate weights, the validation split


@pytest.fixture(scope="module")
def trained_strided(user_digits):
    """StridedNet trained outside the tool on all of ``user_digits``' training images."""
    model = StridedNet()
    return model, train_outside(model, user_digits, jax.random.key(0))


def test_given_weights_at_chance_are_refused_before_compute(
    user_digits, small_run_config, tmp_path
):
    model = StridedNet()
    v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    # Equal logits for every class: always class 0, about 1 image in 10 right.
    out = jax.tree.map(jnp.zeros_like, v["params"]["out"])
    guessing = {**v, "params": {**v["params"], "out": out}}
    workdir = tmp_path / "w"
    with pytest.raises(ConfigError) as e:
        reduce_jax.run(
            small_run_config(str(workdir)), model=model, variables=guessing, dataset=user_digits
        )
    msg = str(e.value)
    share = np.mean(data.split_validation(user_digits, 0.1).val_labels == 0)  # 14 of 144
    assert msg.startswith(f"variables: the baseline's validation accuracy {share:.4f} is")
    assert "\n" not in msg
    assert "at or near chance on 144 validation images of 10 classes" in msg, msg
    assert "give trained weights" in msg
    assert not workdir.exists()


def test_a_target_at_chance_is_refused(trained_strided, user_digits, small_run_config):
    model, variables = trained_strided
    cfg = small_run_config(None, max_accuracy_drop=0.85)
    with pytest.raises(ConfigError, match="--max_accuracy_drop=0.85 below the baseline's 0.9"):
        inputs.resolve(cfg, model, variables, user_digits)
    # A baseline the tool trains is measured later: the same check on its accuracy.
    ds = inputs.resolve(small_run_config(None)).dataset
    level = inputs.chance_level(10, len(ds.val_labels))
    assert level == pytest.approx(0.1 + 3 * (0.09 / 144) ** 0.5)
    cfg = small_run_config(None, max_accuracy_drop=0.5)
    inputs.check_target(cfg, level + 0.5 + 1e-6, None, ds)
    with pytest.raises(ConfigError, match=r"target accuracy 0\.1750 .* at or below chance"):
        inputs.check_target(cfg, level + 0.5 - 1e-6, None, ds)
    # An absolute target: refused as soon as the validation split's size is known.
    absolute = small_run_config(None, target_accuracy=0.17, max_accuracy_drop=None)
    with pytest.raises(ConfigError) as e:
        inputs.resolve(absolute)
    assert str(e.value).startswith(
        "the target accuracy 0.1700 (--target_accuracy=0.17) is at or below chance on 144 "
        "validation images of 10 classes (1/10 = 0.1000, plus 3 binomial standard "
        "deviations: 0.1750): a chip that guesses would meet it"
    )


def test_batch_larger_than_the_training_split_is_refused(user_digits, small_run_config):
    with pytest.raises(ConfigError, match=r"--batch_size=1294 is larger .*\(1293 images"):
        inputs.resolve(small_run_config(None, batch_size=1294), dataset=user_digits)
    inputs.resolve(small_run_config(None, batch_size=1293), dataset=user_digits)
    own = data.split_validation(user_digits, 0.5)  # its own split: nothing more held out
    with pytest.raises(ConfigError, match=r"\(718 images\); use at most 718"):
        inputs.resolve(small_run_config(None, batch_size=719), dataset=own)


def test_given_weights_warn_when_the_validation_split_is_drawn_from_the_training_set(
    trained_strided, user_digits, small_run_config
):
    model, variables = trained_strided
    cfg = small_run_config(None)
    drawn = inputs.resolve(cfg, model, variables, user_digits)
    assert (
        drawn.validation_split == "held_out" and drawn.describe()["validation_split"] == "held_out"
    )
    (warning,) = drawn.warnings
    assert warning.startswith(
        "the baseline is given (variables) but the validation split is held out"
    )
    assert "x_val" in warning and "\n" not in warning
    # The user's own validation split: used as it is, and nothing to warn about.
    x_val, y_val = user_digits.test_images[:200], user_digits.test_labels[:200]
    own = reduce_jax.Dataset.from_arrays(
        user_digits.train_images, user_digits.train_labels,
        user_digits.test_images[200:], user_digits.test_labels[200:],
        x_val=x_val, y_val=y_val, name="mine",
    )  # fmt: skip
    given = inputs.resolve(cfg, model, variables, own)
    assert given.validation_split == "given" and given.warnings == ()
    np.testing.assert_array_equal(given.dataset.val_labels, y_val)
    assert len(given.dataset.train_labels) == len(user_digits.train_labels)
    # A baseline the tool trains: its split is held out of what trained it.
    assert inputs.resolve(cfg).warnings == ()


def test_validation_accuracy_far_above_test_accuracy_warns(small_run_config):
    assert inputs.accuracy_gap_z(0.986, 1293, 0.950, 10000) > 5  # the case a user hit
    assert inputs.accuracy_gap_z(0.955, 1293, 0.950, 10000) < 1
    assert inputs.accuracy_gap_z(0.90, 144, 0.99, 360) < 0
    assert inputs.accuracy_gap_z(1.0, 144, 1.0, 360) == 0
    inp = inputs.resolve(small_run_config(None))  # 144 validation, 360 test images
    assert inputs.baseline_warnings(inp, 0.95, 0.90) == []  # z = 1.9: noise
    (warning,) = inputs.baseline_warnings(inp, 0.99, 0.90)  # z = 3.5
    assert warning.startswith(
        "the baseline's validation accuracy 0.9900 (144 images) is 3.5 standard errors above "
        "its test accuracy 0.9000 (360 images)"
    )
    assert "x_val" in warning
