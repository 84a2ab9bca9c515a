"""ResNets, VGG-11 with BatchNorm, the width option, BatchNorm in the population (folding,
vmap == loop, masking with weight decay) and the CIFAR augmentation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reduce_jax import data as data_lib
from reduce_jax.engine import population, train
from reduce_jax.hardware import systolic
from reduce_jax.nets import augment, models

# A two-stage ResNet (stem, an identity block, a strided block with a 1x1 projection): every
# kind of layer of resnet20/18 at a fraction of their compile time.
TINY_RESNET = models.ResNet(10, widths=(4, 8), blocks_per_stage=1)
BATCH = 16


def _kernels(params) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): x for p, x in flat if systolic.is_kernel_path(p)}


def test_resnet20_resnet18_vgg11_bn_shapes_and_what_is_on_the_array():
    shapes = {
        name: _abstract(name, 10, (32, 32, 3)) for name in ("resnet20", "resnet18", "vgg11_bn")
    }
    r20 = _kernels(shapes["resnet20"]["params"])
    # 19 convolutions (stem, 2 per block) + 2 projections + the classifier.
    assert len(r20) == 19 + 2 + 1
    assert r20["['stem']['conv']['kernel']"].shape == (3, 3, 3, 16)
    assert r20["['stage2_block1']['proj']['conv']['kernel']"].shape == (1, 1, 16, 32)
    assert r20["['stage3_block3']['b']['conv']['kernel']"].shape == (3, 3, 64, 64)
    assert r20["['out']['kernel']"].shape == (64, 10)
    r18 = _kernels(shapes["resnet18"]["params"])
    assert len(r18) == 17 + 3 + 1
    assert r18["['stage4_block2']['b']['conv']['kernel']"].shape == (3, 3, 512, 512)
    n18 = sum(x.size for x in jax.tree.leaves(shapes["resnet18"]["params"]))
    assert 11.1e6 < n18 < 11.2e6  # the CIFAR ResNet-18's 11.17M parameters
    vgg = _kernels(shapes["vgg11_bn"]["params"])
    assert len(vgg) == 8 + 1 and vgg["['out']['kernel']"].shape == (512, 10)
    # BatchNorm statistics for every convolution; no convolution has a bias before its BN.
    for var in shapes.values():
        assert len(jax.tree.leaves(var["batch_stats"])) == 2 * (len(_kernels(var["params"])) - 1)
        assert not any("conv']['bias" in k for k in map(str, _paths(var["params"])))
    # Only kernels are on the array: with every PE faulty, every kernel and nothing else is 0
    # (masks depend on the parameters' shapes only).
    shape = _abstract("resnet20", 10, (8, 8, 1), width=0.25)["params"]
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shape)
    masks = jax.jit(systolic.weight_masks)(params, jnp.ones((4, 4), bool))
    for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
        assert np.all(np.asarray(m) == (0 if systolic.is_kernel_path(path) else 1)), path


def _abstract(name, num_classes, image_shape, **kwargs):
    """The variables' shapes of model ``name``."""
    model = models.get_model(name, num_classes, **kwargs)
    return jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), image_shape))


def _paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vgg11_bn"])
@pytest.mark.parametrize("image_shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_models_run_on_small_and_cifar_images_in_both_modes(name, image_shape):
    model = models.get_model(name, 7, width=0.25)
    var = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), image_shape))
    x = jnp.zeros((2, *image_shape))
    for mode in (False, True):
        out = jax.eval_shape(
            lambda v, mode=mode: model.apply(v, x, train=mode, mutable=["batch_stats"]), var
        )
        assert out[0].shape == (2, 7)


def test_width_scales_channels_and_no_bn_variant_has_biases():
    k = _kernels(_abstract("resnet20", 10, (8, 8, 1), width=0.5)["params"])
    assert k["['stem']['conv']['kernel']"].shape == (3, 3, 1, 8)
    assert k["['stage3_block1']['proj']['conv']['kernel']"].shape == (1, 1, 16, 32)
    assert models.scaled(16, 0.01) == 1 and models.scaled(6, 0.5) == 3
    lenet = _abstract("lenet5", 10, (8, 8, 1), width=2.0)
    assert lenet["params"]["conv1"]["kernel"].shape == (5, 5, 1, 12)
    plain = _abstract("resnet20", 10, (8, 8, 1), width=0.5, batch_norm=False)
    assert plain["batch_stats"] == {}
    assert plain["params"]["stem"]["conv"]["bias"].shape == (8,)


def _key(seed: int) -> jax.Array:
    """A key for variables whose values these tests do not depend on: the "rbg" generator,
    whose programs compile in a fraction of threefry's time."""
    return jax.random.key(seed, impl="rbg")


def _fault_maps(seed: int, chips: int, rate: float) -> np.ndarray:
    """``bool[chips, 4, 4]`` maps, each PE faulty with probability ``rate`` (numpy: sampling
    with jax.random compiles a program for every new shape)."""
    return np.random.default_rng(seed).random((chips, 4, 4)) < rate


def _init(model, key, image_shape=(8, 8, 1)):
    """``models.init_variables``, compiled as one program (not op by op)."""
    return jax.jit(lambda k: models.init_variables(model, k, image_shape))(key)


def _random_bn_variables(model, key, image_shape=(8, 8, 1)):
    """Variables with random BatchNorm scales, offsets and running statistics (computed as
    one program, not op by op)."""

    @jax.jit
    def make(key):
        def randomize(path, x):
            name = jax.tree_util.keystr(path)
            k = jax.random.fold_in(key, hash(name) % (1 << 30))
            if name.endswith("['scale']") or name.endswith("['var']"):
                return jax.random.uniform(k, x.shape, minval=0.5, maxval=2.0)
            if name.endswith("['bias']") or name.endswith("['mean']"):
                return 0.3 * jax.random.normal(k, x.shape)
            return x

        variables = models.init_variables(model, key, image_shape)
        return jax.tree_util.tree_map_with_path(randomize, variables)

    return make(key)


def test_folded_masked_model_equals_unfolded_masked_model_in_evaluation(digits):
    """BatchNorm folded into the kernel (w * gamma / sigma per output channel): a bypassed PE
    zeroes the folded weight exactly where it zeroes w, so the chip computes the same."""
    var = _random_bn_variables(TINY_RESNET, _key(3))
    folded_model = TINY_RESNET.clone(batch_norm=False)
    fault_map = _fault_maps(4, 1, 0.3)[0]
    mask = systolic.weight_masks(var["params"], fault_map)
    x = jnp.asarray(digits.test_images[:32])

    unfolded = TINY_RESNET.apply(train.masked_variables(var, mask), x, train=False)
    folded = models.fold_batchnorm(var)
    folded_mask = systolic.weight_masks(folded, fault_map)
    masked_folded = train.apply_mask(folded, folded_mask)
    out = folded_model.apply({"params": masked_folded}, x, train=False)
    np.testing.assert_allclose(out, unfolded, rtol=1e-4, atol=1e-4)
    # Masking commutes with folding, and the folded kernels are zero exactly where w is masked.
    fold_of_masked = models.fold_batchnorm(train.masked_variables(var, mask))
    for (path, a), b, m in zip(
        jax.tree_util.tree_flatten_with_path(fold_of_masked)[0],
        jax.tree.leaves(masked_folded),
        jax.tree.leaves(folded_mask),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
        if systolic.is_kernel_path(path):
            assert np.array_equal(np.asarray(a) == 0, np.asarray(m) == 0)
    assert float(jnp.abs(out - TINY_RESNET.apply(var, x)).max()) > 1e-3  # the faults matter
    # A model without BatchNorm is its own folded form.
    mlp = {"params": {"fc1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}}
    chex.assert_trees_all_equal(models.fold_batchnorm(mlp), mlp["params"])


@pytest.fixture(scope="module")
def bn_setup(digits):
    var = jax.tree.map(np.asarray, _init(TINY_RESNET, _key(0)))
    maps = _fault_maps(5, 3, 0.25)
    data = population.DeviceData.from_dataset(data_lib.split_validation(digits, 0.1))
    return var, maps, data


@pytest.mark.parametrize("chip_batching", train.CHIP_BATCHING)
def test_population_with_batchnorm_equals_loop_over_chips(bn_setup, chip_batching):
    """Parameters and BatchNorm statistics of every chip of an augmented population run equal
    the chip's run alone (budgets differ; the augmentation is the same for every chip), with
    the chips vectorised or mapped."""
    var, maps, data = bn_setup
    tx = train.make_optimizer("momentum", 0.05)
    trainer = train.make_trainer(TINY_RESNET, tx, BATCH, augment=True, chip_batching=chip_batching)
    budgets = np.array([3, 1, 3])
    args = (data.train_images, data.train_labels, jax.random.key(6), 0, 3)
    states, masks = population.init_chunk(trainer, var, maps, budgets)
    states = trainer.run(states, masks, *args)
    for i in range(3):
        alone, mask = population.init_chunk(trainer, var, maps[i : i + 1], budgets[i : i + 1])
        alone = trainer.run(alone, mask, *args)
        chip = train.slice_chips(states, i)
        chex.assert_trees_all_close(chip.params, train.slice_chips(alone.params, 0), atol=1e-5)
        chex.assert_trees_all_close(
            chip.batch_stats, train.slice_chips(alone.batch_stats, 0), atol=1e-5
        )
        assert int(chip.step) == budgets[i]
    # The running statistics were updated, per chip (chips with other faults see other
    # activations).
    mean = np.asarray(states.batch_stats["stem"]["bn"]["mean"])
    assert not np.allclose(mean[0], 0) and not np.allclose(mean[0], mean[2])
    # Evaluation uses the running averages: the same as applying each chip's variables.
    acc = population.evaluate(trainer, states, masks, data, "test")
    for i in (0, 2):
        v = train.masked_variables(
            train.slice_chips(states.variables, i), train.slice_chips(masks, i)
        )
        logits = TINY_RESNET.apply(v, data.test_images, train=False)
        expected = float(np.mean(np.argmax(logits, -1) == np.asarray(data.test_labels)))
        assert acc[i] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_bypassed_weights_stay_exactly_zero_with_weight_decay_and_batchnorm(bn_setup, optimizer):
    """adamw (decoupled) and momentum SGD + add_decayed_weights: bypassed kernels stay 0;
    BatchNorm scales and offsets are not on the array and move."""
    var, maps, data = bn_setup
    tx = train.make_optimizer(optimizer, 0.05, weight_decay=0.1)
    trainer = train.make_trainer(TINY_RESNET, tx, BATCH)
    states, masks = population.init_chunk(trainer, var, maps, np.full(3, 4))
    states = trainer.run(
        states, masks, data.train_images, data.train_labels, jax.random.key(7), 0, 4
    )
    moved = 0
    for (path, w), w0, m in zip(
        jax.tree_util.tree_flatten_with_path(states.params)[0],
        jax.tree.leaves(var["params"]),
        jax.tree.leaves(masks),
        strict=True,
    ):
        w, m = np.asarray(w), np.asarray(m)
        if systolic.is_kernel_path(path):
            assert (m == 0).any() and np.all(w[m == 0] == 0.0), path
        else:
            assert np.all(m == 1)
            moved += not np.allclose(w, w0[None])
    assert moved >= 4  # BatchNorm scales/offsets and the classifier's bias trained


def test_weight_decay_and_cosine_schedule():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.5])}
    ours = train.make_optimizer("adam", 0.1, weight_decay=0.01)
    ref = optax.adamw(0.1, weight_decay=0.01)
    u, _ = ours.update(grads, ours.init(params), params)
    u_ref, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(u["w"], u_ref["w"], rtol=1e-5)
    sgd = train.make_optimizer("sgd", 0.1, weight_decay=0.01)
    u, _ = sgd.update(grads, sgd.init(params), params)
    np.testing.assert_allclose(u["w"], -0.1 * (grads["w"] + 0.01 * params["w"]), rtol=1e-5)
    # Without weight decay the optimizer is the plain one (state and update).
    plain = train.make_optimizer("momentum", 0.1)
    ref = optax.sgd(0.1, momentum=0.9)
    chex.assert_trees_all_equal_structs(plain.init(params).inner_state, ref.init(params))
    # Cosine: the peak rate at step 0, half at the middle, 0 at the end.
    cos = train.make_optimizer("momentum", 0.1, schedule="cosine", total_steps=10)
    state, rates = cos.init(params), []
    for _ in range(11):
        _, state = cos.update(grads, state, params)
        rates.append(float(state.hyperparams["learning_rate"]))
    assert rates[0] == pytest.approx(0.1) and rates[5] == pytest.approx(0.05, abs=1e-6)
    assert rates[10] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="schedule"):
        train.make_optimizer("adam", 0.1, schedule="step")


def test_crop_flip_is_a_shifted_window_of_the_padded_image_or_its_mirror():
    images = np.random.default_rng(0).random((16, 6, 5, 2), np.float32)
    out = np.asarray(augment.crop_flip(jax.random.key(1), jnp.asarray(images), pad=2))
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    shifts, flips = set(), 0
    for b in range(len(images)):
        found = [
            (dy, dx, f)
            for dy in range(5)
            for dx in range(5)
            for f in (False, True)
            if np.array_equal(
                out[b],
                padded[b, dy : dy + 6, dx : dx + 5][:, ::-1]
                if f
                else padded[b, dy : dy + 6, dx : dx + 5],
            )
        ]
        assert found, b
        shifts.add(found[0][:2])
        flips += found[0][2]
    assert len(shifts) > 3 and 0 < flips < len(images)  # images get their own crops and flips
    same = augment.crop_flip(jax.random.key(1), jnp.asarray(images), pad=2)
    assert np.array_equal(out, same)
    k = jax.random.key(9)
    a, b = augment.step_key(k, 3), augment.step_key(k, 4)
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert augment.enabled("auto", "cifar10") and augment.enabled("auto", "cifar100")
    assert not augment.enabled("auto", "mnist5k") and augment.enabled("on", "digits")
    assert not augment.enabled("off", "cifar10")
