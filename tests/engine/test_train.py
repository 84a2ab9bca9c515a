"""FAP+T retraining of one chip and of a population (tiny MLP on sklearn digits)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reduce_jax.engine import train
from reduce_jax.hardware import systolic

BATCH = 32
ROWS = COLS = 4  # the MLP's kernels [64, 16] and [16, 10]: the second has edge tiles
CHIPS = 4
PHASE_KEY = jax.random.key(11)


def _fault_maps():
    """Four chips: one fault-free, three with different fault maps."""
    maps = np.array(jax.random.bernoulli(jax.random.key(5), 0.3, (CHIPS, ROWS, COLS)))
    maps[0] = False
    assert len({m.tobytes() for m in maps}) == CHIPS and maps[1:].any(axis=(1, 2)).all()
    return maps


def _masks(params, maps):
    return jax.vmap(systolic.weight_masks, in_axes=(None, 0))(params, jnp.asarray(maps))


def _chip(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _batch(digits_jnp, t):
    x, y = digits_jnp[0], digits_jnp[1]
    idx = train.batch_indices(PHASE_KEY, t, x.shape[0], BATCH)
    return x[idx], y[idx]


def _copy(tree):
    """A fresh copy (``run`` donates its input states)."""
    return jax.tree.map(jnp.array, tree)


def _assert_states_close(a, b, atol=1e-6, rtol=1e-5):
    chex.assert_trees_all_close(a.params, b.params, atol=atol, rtol=rtol)
    chex.assert_trees_all_close(a.opt_state, b.opt_state, atol=atol, rtol=rtol)
    np.testing.assert_array_equal(a.step, b.step)
    np.testing.assert_array_equal(a.diverged, b.diverged)


@pytest.fixture(scope="module")
def adam_trainer(tiny_mlp):
    return train.make_trainer(tiny_mlp, train.make_optimizer("adam", 1e-2), BATCH, 100)


@pytest.fixture(scope="module")
def masks(tiny_mlp_params):
    return _masks(tiny_mlp_params, _fault_maps())


# ------------------------------------------------------------------------------ utilities


def test_steps_and_epochs():
    assert train.steps_per_epoch(1437, 32) == 45
    assert train.steps_per_epoch(64, 32) == 2
    np.testing.assert_array_equal(
        train.epochs_to_steps([0, 0.25, 0.5, 1, 2.0, 0.1], 45), [0, 12, 23, 45, 90, 5]
    )
    # 0.1 * 30 = 3.0000000000000004 in floating point: still 3 steps, not 4.
    assert int(train.epochs_to_steps(0.1, 30)) == 3
    assert int(train.epochs_to_steps(0.7, 10)) == 7


def test_make_optimizer():
    for name in train.OPTIMIZERS:
        tx = train.make_optimizer(name, 0.5)
        state = tx.init({"w": jnp.ones(3)})
        assert float(state.hyperparams["learning_rate"]) == 0.5
    with pytest.raises(ValueError, match="adam"):
        train.make_optimizer("lamb", 0.1)


def test_batch_indices_cover_each_epoch():
    n, bs = 10, 4  # 3 steps per epoch; the last batch wraps around
    fn = jax.jit(lambda t: train.batch_indices(PHASE_KEY, t, n, bs))
    epoch0 = np.stack([np.asarray(fn(t)) for t in range(3)])
    assert epoch0.shape == (3, 4)
    assert sorted(epoch0.ravel()[:10]) == list(range(10))
    np.testing.assert_array_equal(epoch0[2, 2:], epoch0[0, :2])
    epoch1 = np.stack([np.asarray(fn(t)) for t in range(3, 6)])
    assert sorted(epoch1.ravel()[:10]) == list(range(10))
    assert not np.array_equal(epoch0, epoch1)  # a fresh permutation every epoch
    np.testing.assert_array_equal(fn(4), fn(4))


def _stack(trees):
    """Single-chip pytrees stacked along a new leading ``chips`` axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def test_slice_chips(tiny_mlp_params):
    trees = [jax.tree.map(lambda x, i=i: x + i, tiny_mlp_params) for i in range(3)]
    stacked = _stack(trees)
    chex.assert_tree_shape_prefix(stacked, (3,))
    chex.assert_trees_all_equal(train.slice_chips(stacked, 1), trees[1])
    chex.assert_tree_shape_prefix(train.slice_chips(stacked, np.array([2, 0])), (2,))
    chex.assert_trees_all_equal(_chip(train.slice_chips(stacked, slice(1, 3)), 1), trees[2])


def test_init_population(adam_trainer, tiny_mlp_params, masks, tiny_mlp_variables):
    budgets = jnp.array([0, 3, 7, 10], jnp.int32)
    states = adam_trainer.init_population(tiny_mlp_variables, masks, budgets)
    chex.assert_tree_shape_prefix(states, (CHIPS,))
    np.testing.assert_array_equal(states.step, 0)
    np.testing.assert_array_equal(states.budget, budgets)
    assert not states.diverged.any()
    expected = jax.tree.map(lambda p, m: p[None] * m, tiny_mlp_params, masks)
    chex.assert_trees_all_equal(states.params, expected)
    # The baseline's weights on faulty PEs were non-zero and are now exactly zero.
    kernel, mask = states.params["fc1"]["kernel"], masks["fc1"]["kernel"]
    assert np.all(np.asarray(kernel)[np.asarray(mask) == 0] == 0.0)
    assert np.all(np.asarray(tiny_mlp_params["fc1"]["kernel"]) != 0.0)
    assert (np.asarray(mask) == 0).any()


# ------------------------------------------------------------------------------ one chip


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_fault_free_chip_trains_like_unmasked_training(
    optimizer, tiny_mlp, tiny_mlp_params, digits_jnp, tiny_mlp_variables
):
    lr = 1e-2
    tx = train.make_optimizer(optimizer, lr)
    plain = optax.adam(lr) if optimizer == "adam" else optax.sgd(lr, momentum=0.9)

    @jax.jit
    def plain_step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = tiny_mlp.apply({"params": p}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = plain.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(train.chip_step, static_argnums=(0, 1))
    ones = jax.tree.map(jnp.ones_like, tiny_mlp_params)
    state = train.init_chip(tiny_mlp_variables, ones, tx, budget=100)
    params, opt_state = tiny_mlp_params, plain.init(tiny_mlp_params)
    for t in range(5):
        images, labels = _batch(digits_jnp, t)
        state, loss = step(tiny_mlp, tx, state, ones, images, labels)
        params, opt_state, ref_loss = plain_step(params, opt_state, images, labels)
        np.testing.assert_allclose(loss, ref_loss, atol=1e-6)
        chex.assert_trees_all_close(state.params, params, atol=1e-6, rtol=0)
        chex.assert_trees_all_close(state.opt_state.inner_state, opt_state, atol=1e-6, rtol=0)
    assert int(state.step) == 5 and not bool(state.diverged)
    # ... and it really trained: the parameters moved.
    assert not np.allclose(state.params["fc1"]["kernel"], tiny_mlp_params["fc1"]["kernel"])


def test_chip_step_stops_at_budget(
    adam_trainer, tiny_mlp_params, masks, digits_jnp, tiny_mlp_variables
):
    state = train.init_chip(tiny_mlp_variables, _chip(masks, 1), adam_trainer.tx, budget=2)
    for t in range(4):
        previous = state
        state, loss = adam_trainer.step(state, _chip(masks, 1), *_batch(digits_jnp, t))
        assert np.isfinite(loss)
        if t >= 2:  # budget spent: nothing changes
            chex.assert_trees_all_equal(state, previous)
    assert int(state.step) == 2


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_masked_weights_stay_exactly_zero(
    optimizer, request, tiny_mlp, tiny_mlp_params, masks, digits_jnp, tiny_mlp_variables
):
    if optimizer == "adam":
        trainer = request.getfixturevalue("adam_trainer")  # lr 1e-2, already compiled
    else:
        trainer = train.make_trainer(tiny_mlp, train.make_optimizer(optimizer, 5e-2), BATCH, 100)
    x, y, test_x, test_y = digits_jnp
    budgets = jnp.full((CHIPS,), 50, jnp.int32)
    before = trainer.evaluate(
        trainer.init_population(tiny_mlp_variables, masks, budgets).variables, masks, test_x, test_y
    )
    states = trainer.init_population(tiny_mlp_variables, masks, budgets)
    states = trainer.run(states, masks, x, y, PHASE_KEY, 0, 50)
    np.testing.assert_array_equal(states.step, 50)
    assert not states.diverged.any()
    for layer in ("fc1", "out"):
        kernel = np.asarray(states.params[layer]["kernel"])
        mask = np.asarray(masks[layer]["kernel"])
        start = np.asarray(tiny_mlp_params[layer]["kernel"])[None]
        assert (mask[1:] == 0).any(axis=(1, 2)).all()
        assert np.all(kernel[mask == 0] == 0.0)  # exactly, not approximately
        changed = (kernel != start)[mask == 1]
        assert changed.mean() > 0.5, changed.mean()
        assert np.all(np.isfinite(kernel))
    assert not np.allclose(states.params["out"]["bias"], 0.0)  # biases are trained too
    after = trainer.evaluate(states.variables, masks, test_x, test_y)
    assert np.all(after > before + 0.3), (before, after)


def _sgd_with_decayed_weights(learning_rate):
    return optax.chain(optax.add_decayed_weights(0.1), optax.sgd(learning_rate, momentum=0.9))


def _noisy_sgd(learning_rate):
    return optax.chain(optax.add_noise(1e-2, 0.55, key=jax.random.key(3)), optax.sgd(learning_rate))


def _assert_bypassed_zero_and_trained(states, params, masks):
    """Bypassed kernel weights are exactly zero; most of the others moved off the baseline."""
    for layer in ("fc1", "out"):
        kernel = np.asarray(states.params[layer]["kernel"])
        mask = np.asarray(masks[layer]["kernel"])
        assert (mask[1:] == 0).any(axis=(1, 2)).all()  # every faulty chip bypasses weights
        bypassed = kernel[mask == 0]
        # Every bit but the sign is zero (``w * 0`` at the start keeps the sign of ``w``).
        np.testing.assert_array_equal(bypassed.view(np.uint32) & 0x7FFFFFFF, 0)
        baseline = np.broadcast_to(np.asarray(params[layer]["kernel"]), kernel.shape)
        changed = (kernel != baseline)[mask == 1]
        assert changed.mean() > 0.9, changed.mean()
        assert np.all(np.isfinite(kernel))


@pytest.mark.parametrize(
    "factory, learning_rate",
    [(optax.adamw, 1e-2), (_sgd_with_decayed_weights, 5e-2)],
    ids=["adamw", "add_decayed_weights+sgd"],
)
def test_weight_decay_keeps_bypassed_weights_exactly_zero(
    factory, learning_rate, tiny_mlp, tiny_mlp_params, masks, digits_jnp, tiny_mlp_variables
):
    # Weight decay adds ``wd * param`` to every update, gradient or not. The weights on faulty
    # PEs start at zero, so their decay is zero too and they stay zero (this would hold even
    # without the update mask; test_updates_are_masked_not_only_gradients checks that mask).
    kwargs = dict(weight_decay=0.1) if factory is optax.adamw else {}
    tx = optax.inject_hyperparams(factory)(learning_rate=learning_rate, **kwargs)
    trainer = train.make_trainer(tiny_mlp, tx, BATCH, 100)
    x, y, _, _ = digits_jnp
    budgets = jnp.full((CHIPS,), 30, jnp.int32)
    states = trainer.init_population(tiny_mlp_variables, masks, budgets)
    states = trainer.run(states, masks, x, y, PHASE_KEY, 0, 30)
    np.testing.assert_array_equal(states.step, 30)
    assert not states.diverged.any()
    _assert_bypassed_zero_and_trained(states, tiny_mlp_params, masks)


def test_updates_are_masked_not_only_gradients(
    tiny_mlp, tiny_mlp_params, masks, digits_jnp, tiny_mlp_variables
):
    # Gradient noise moves every weight whatever its gradient: only masking the updates keeps
    # the bypassed weights at zero (with a masked gradient alone they would drift).
    tx = optax.inject_hyperparams(_noisy_sgd)(learning_rate=5e-2)
    trainer = train.make_trainer(tiny_mlp, tx, BATCH, 100)
    x, y, _, _ = digits_jnp
    states = trainer.init_population(tiny_mlp_variables, masks, jnp.full((CHIPS,), 10, jnp.int32))
    states = trainer.run(states, masks, x, y, PHASE_KEY, 0, 10)
    np.testing.assert_array_equal(states.step, 10)
    _assert_bypassed_zero_and_trained(states, tiny_mlp_params, masks)


# ------------------------------------------------------------------------------ population


@pytest.mark.parametrize("chip_batching", train.CHIP_BATCHING)
def test_population_step_equals_loop_over_chips(
    adam_trainer, tiny_mlp, masks, digits_jnp, tiny_mlp_variables, chip_batching
):
    if chip_batching != "vmap":
        tx = train.make_optimizer("adam", 1e-2)
        adam_trainer = train.make_trainer(tiny_mlp, tx, BATCH, 100, chip_batching=chip_batching)
    budgets = jnp.array([4, 4, 2, 0], jnp.int32)
    pop = adam_trainer.init_population(tiny_mlp_variables, masks, budgets)
    singles = [
        train.init_chip(tiny_mlp_variables, _chip(masks, i), adam_trainer.tx, budgets[i])
        for i in range(CHIPS)
    ]
    for t in range(4):
        images, labels = _batch(digits_jnp, t)
        pop, losses = adam_trainer.population_step(pop, masks, images, labels)
        assert losses.shape == (CHIPS,)
        for i in range(CHIPS):
            singles[i], loss = adam_trainer.step(singles[i], _chip(masks, i), images, labels)
            np.testing.assert_allclose(losses[i], loss, rtol=1e-5, atol=1e-6)
    chex.assert_tree_shape_prefix(pop, (CHIPS,))
    _assert_states_close(pop, _stack(singles))
    np.testing.assert_array_equal(pop.step, [4, 4, 2, 0])
    # Different fault maps give different chips.
    kernels = np.asarray(pop.params["fc1"]["kernel"])
    assert not np.allclose(kernels[0], kernels[1])


def test_budget_b_equals_training_alone_for_b_steps(
    adam_trainer, tiny_mlp_params, masks, digits_jnp, tiny_mlp_variables
):
    x, y, _, _ = digits_jnp
    budgets = [0, 3, 7, 10]
    states = adam_trainer.init_population(tiny_mlp_variables, masks, jnp.array(budgets, jnp.int32))
    states = adam_trainer.run(states, masks, x, y, PHASE_KEY, 0, 10)
    np.testing.assert_array_equal(states.step, budgets)
    for i, b in enumerate(budgets):
        alone = train.init_chip(tiny_mlp_variables, _chip(masks, i), adam_trainer.tx, budget=100)
        initial = alone
        for t in range(b):
            alone, _ = adam_trainer.step(alone, _chip(masks, i), *_batch(digits_jnp, t))
        chip = _chip(states, i)
        chex.assert_trees_all_close(chip.params, alone.params, atol=1e-6, rtol=1e-5)
        chex.assert_trees_all_close(chip.opt_state, alone.opt_state, atol=1e-6, rtol=1e-5)
        assert int(chip.step) == int(alone.step) == b
        if b == 0:
            chex.assert_trees_all_equal(chip.params, initial.params)


def test_run_in_pieces_equals_one_call_without_retracing(
    tiny_mlp, tiny_mlp_params, masks, digits_jnp, tiny_mlp_variables
):
    chex.clear_trace_counter()
    trainer = train.make_trainer(
        tiny_mlp, train.make_optimizer("adam", 1e-2), BATCH, 100, max_traces=1
    )
    x, y, test_x, test_y = digits_jnp
    budgets = jnp.array([2, 5, 8, 10], jnp.int32)
    pieces = trainer.init_population(tiny_mlp_variables, masks, budgets)
    pieces = trainer.run(pieces, masks, x, y, PHASE_KEY, 0, 4)
    np.testing.assert_array_equal(pieces.step, [2, 4, 4, 4])
    pieces = trainer.run(pieces, masks, x, y, PHASE_KEY, 4, 6)  # other start and num_steps
    whole = trainer.init_population(tiny_mlp_variables, masks, budgets)
    whole = trainer.run(whole, masks, x, y, PHASE_KEY, 0, 10)
    _assert_states_close(pieces, whole)
    np.testing.assert_array_equal(whole.step, budgets)
    other = trainer.init_population(tiny_mlp_variables, masks, jnp.array([1, 1, 0, 3], jnp.int32))
    other = trainer.run(other, masks, x, y, jax.random.key(99), 7, 3)  # other budgets and key
    np.testing.assert_array_equal(other.step, [1, 1, 0, 3])
    acc = trainer.evaluate(whole.variables, masks, test_x, test_y)
    acc2 = trainer.evaluate(other.variables, masks, test_x, test_y)
    assert acc.shape == acc2.shape == (CHIPS,)
    # The guard is live: another number of chips is a new shape, i.e. a second trace.
    few = trainer.init_population(
        tiny_mlp_variables, _chip(masks, slice(0, 2)), jnp.array([1, 1], jnp.int32)
    )
    with pytest.raises(AssertionError, match="traced"):
        trainer.run(few, _chip(masks, slice(0, 2)), x, y, PHASE_KEY, 0, 1)
    chex.clear_trace_counter()


def test_diverged_chip_is_flagged_frozen_and_isolated(
    adam_trainer, tiny_mlp_params, masks, digits_jnp, tiny_mlp_variables
):
    x, y, _, _ = digits_jnp

    def population(lr1, budget1):
        budgets = jnp.array([10, budget1, 10, 10], jnp.int32)
        states = adam_trainer.init_population(tiny_mlp_variables, masks, budgets)
        hyper = dict(states.opt_state.hyperparams)
        assert hyper["learning_rate"].shape == (CHIPS,)  # one learning rate per chip
        hyper["learning_rate"] = hyper["learning_rate"].at[1].set(lr1)
        return states.replace(opt_state=states.opt_state._replace(hyperparams=hyper))

    states = adam_trainer.run(population(1e30, 10), masks, x, y, PHASE_KEY, 0, 10)
    np.testing.assert_array_equal(states.diverged, [False, True, False, False])
    np.testing.assert_array_equal(np.asarray(states.step)[[0, 2, 3]], 10)
    assert int(states.step[1]) < 10
    for leaf in jax.tree.leaves(_chip(states, 1).params):
        assert np.all(np.isfinite(leaf))
    # It took at least one huge (finite) step before the loss blew up.
    assert np.abs(states.params["fc1"]["kernel"][1]).max() > 1e20
    # A diverged chip is frozen: more steps (budget left) change nothing.
    frozen = _chip(states, 1)
    more = adam_trainer.run(
        _copy(states.replace(step=states.step * 0)), masks, x, y, PHASE_KEY, 10, 3
    )
    chex.assert_trees_all_equal(_chip(more, 1).params, frozen.params)
    chex.assert_trees_all_equal(_chip(more, 1).opt_state, frozen.opt_state)
    assert bool(more.diverged[1]) and int(more.step[1]) == 0
    # The other chips train exactly as they do without that chip (budget 0: never active).
    without = adam_trainer.run(population(1e-2, 0), masks, x, y, PHASE_KEY, 0, 10)
    assert not without.diverged.any()
    others = np.array([0, 2, 3])
    _assert_states_close(_chip(states, others), _chip(without, others), atol=0, rtol=0)


def test_evaluate_equals_per_chip_numpy(
    adam_trainer, tiny_mlp, tiny_mlp_params, digits_jnp, tiny_mlp_variables
):
    x, y, test_x, test_y = digits_jnp
    maps = _fault_maps()
    maps[3] = True  # every PE faulty: the output is the bias alone
    masks = _masks(tiny_mlp_params, maps)
    states = adam_trainer.init_population(tiny_mlp_variables, masks, jnp.full((CHIPS,), 20))
    states = adam_trainer.run(states, masks, x, y, PHASE_KEY, 0, 20)
    acc = np.asarray(adam_trainer.evaluate(states.variables, masks, test_x, test_y))
    assert acc.shape == (CHIPS,) and acc.dtype == np.float32
    labels = np.asarray(test_y)
    forward = jax.jit(lambda p: tiny_mlp.apply({"params": p}, test_x))
    manual = []
    for i in range(CHIPS):
        masked = jax.tree.map(
            lambda p, m, i=i: np.asarray(p[i]) * np.asarray(m[i]), states.params, masks
        )
        logits = np.asarray(forward(masked))
        manual.append(np.mean(np.argmax(logits, axis=-1) == labels))
    np.testing.assert_allclose(acc, manual, atol=1e-6)
    # Chip 3 predicts one class whatever the input: its accuracy is that class's share of
    # the 360 test images (batches of 100, so 40 padded rows that must not count).
    counts = np.bincount(labels, minlength=10)
    assert np.isclose(acc[3], counts / 360, atol=1e-6).sum() >= 1, (acc[3], counts)
    assert len(set(np.round(acc, 6))) > 1  # chips differ
