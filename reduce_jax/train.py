"""Mask-aware retraining (FAP+T) of one chip and of a population of chips.

The forward pass uses ``param * mask``, so gradients of bypassed weights are zero; updates
are masked too, so bypassed weights stay exactly zero. A population is a ``ChipState`` with
a leading ``chips`` axis; one jitted step updates every chip on the same data batch. Each
chip has a step budget: once ``step == budget`` (or once it has diverged) its state no
longer changes, so a chip's trajectory does not depend on which chips it is trained with
(up to the last bits: XLA may pick other GEMM kernels for other numbers of chips).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from reduce_jax import models

PyTree = Any

OPTIMIZERS = ("adam", "sgd", "momentum")


@struct.dataclass
class ChipState:
    """Training state of one chip (or, with a leading ``chips`` axis, of a population).

    Attributes:
      params: the chip's parameters; bypassed weights are exactly zero.
      opt_state: optimizer state (``inject_hyperparams``: the learning rate is per chip).
      step: ``int32[]`` steps taken so far.
      budget: ``int32[]`` steps the chip may take; at ``step == budget`` it stops changing.
      diverged: ``bool[]`` the loss or the new weights became NaN/inf; the chip is frozen.
    """

    params: PyTree
    opt_state: PyTree
    step: jax.Array
    budget: jax.Array
    diverged: jax.Array


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """Optimizer by name (``adam``, ``sgd``, ``momentum``) with an injectable learning rate."""
    factories = {
        "adam": optax.adam,
        "sgd": optax.sgd,
        "momentum": functools.partial(optax.sgd, momentum=0.9),
    }
    if name not in factories:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    return optax.inject_hyperparams(factories[name])(learning_rate=learning_rate)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Steps in one epoch: ``ceil(num_examples / batch_size)``."""
    return math.ceil(num_examples / batch_size)


def epochs_to_steps(epochs, spe: int):
    """``ceil(epochs * steps_per_epoch)``, elementwise for arrays (numpy or python)."""
    return np.ceil(np.round(np.asarray(epochs, np.float64) * spe, 9)).astype(np.int64)


def batch_indices(key: jax.Array, step: jax.Array, num_examples: int, batch_size: int):
    """Indices ``int32[batch_size]`` of the batch at ``step`` of a phase.

    Every epoch is a fresh permutation (``fold_in(key, epoch)``); the last batch of an epoch
    wraps around to the permutation's start so all batches have the same shape.
    """
    spe = steps_per_epoch(num_examples, batch_size)
    epoch, pos = step // spe, step % spe
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return perm[(pos * batch_size + jnp.arange(batch_size)) % num_examples]


def apply_mask(params: PyTree, mask: PyTree) -> PyTree:
    """``params * mask`` leaf by leaf."""
    return jax.tree.map(jnp.multiply, params, mask)


def init_chip(params: PyTree, mask: PyTree, tx: optax.GradientTransformation, budget) -> ChipState:
    """A chip's state at the start of FAP+T: the baseline with bypassed weights zeroed."""
    params = apply_mask(params, mask)
    return ChipState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        budget=jnp.asarray(budget, jnp.int32),
        diverged=jnp.zeros((), bool),
    )


def unit_masks(params: PyTree, chips: int = 1) -> PyTree:
    """All-ones masks ``[chips, ...]`` (fault-free chips) for ``params``."""
    return jax.tree.map(lambda x: jnp.ones((chips, *x.shape), x.dtype), params)


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all()


def chip_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    state: ChipState,
    mask: PyTree,
    images: jax.Array,
    labels: jax.Array,
) -> tuple[ChipState, jax.Array]:
    """One FAP+T step of one chip (written for one chip; vmapped for a population).

    Args:
      model: the Flax module.
      tx: the optimizer.
      state: the chip's state.
      mask: 0/1 masks, a pytree like ``state.params``.
      images: ``float32[B, H, W, C]``; labels: ``int32[B]``.

    Returns:
      ``(new_state, loss)``; the state is unchanged when the budget is spent, the chip has
      diverged, or this step would make it non-finite (then ``diverged`` is set).
    """

    def loss_fn(params):
        logits = models.apply(model, {"params": apply_mask(params, mask)}, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(apply_mask(grads, mask), state.opt_state, state.params)
    params = optax.apply_updates(state.params, apply_mask(updates, mask))
    active = (state.step < state.budget) & ~state.diverged
    finite = jnp.isfinite(loss) & _all_finite(params)
    take = active & finite
    keep = lambda new, old: jnp.where(take, new, old)
    new_state = ChipState(
        params=jax.tree.map(keep, params, state.params),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        step=state.step + take.astype(jnp.int32),
        budget=state.budget,
        diverged=state.diverged | (active & ~finite),
    )
    return new_state, loss


def chip_correct(
    model: nn.Module, params: PyTree, mask: PyTree, images: jax.Array, labels: jax.Array
) -> jax.Array:
    """Number of correct predictions ``int32[]`` of one chip on a batch."""
    logits = models.apply(model, {"params": apply_mask(params, mask)}, images, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32)


class Trainer(NamedTuple):
    """Jitted functions of one model and optimizer (see ``make_trainer``)."""

    init_population: Any
    step: Any
    population_step: Any
    run: Any
    evaluate: Any
    tx: optax.GradientTransformation


def make_trainer(
    model: nn.Module,
    tx: optax.GradientTransformation,
    batch_size: int,
    eval_batch_size: int = 100,
    max_traces: int | None = None,
) -> Trainer:
    """Builds the jitted single-chip and population functions.

    Returns a ``Trainer`` with:
      ``init_population(params, masks[chips], budgets int32[chips]) -> ChipState[chips]``
      ``step(state, mask, images, labels) -> (state, loss)``: one chip, one step.
      ``population_step(states[chips], masks[chips], images, labels) -> (states, loss[chips])``
      ``run(states, masks, train_images, train_labels, phase_key, start, num_steps)``: runs
        phase steps ``start .. start + num_steps - 1`` (each on the batch
        ``batch_indices(phase_key, t)``) in one call; donates ``states``; ``start`` and
        ``num_steps`` are traced, so a new budget never recompiles.
      ``evaluate(params[chips], masks[chips], images, labels) -> float32[chips]`` accuracy.

    Args:
      max_traces: if set, ``run`` and ``evaluate`` fail when traced more often (tests).
    """
    step = functools.partial(chip_step, model, tx)
    population_step = jax.vmap(step, in_axes=(0, 0, None, None))

    def init_population(params, masks, budgets):
        return jax.vmap(lambda m, b: init_chip(params, m, tx, b))(masks, budgets)

    def run(states, masks, images, labels, phase_key, start, num_steps):
        def body(t, states):
            idx = batch_indices(phase_key, t, images.shape[0], batch_size)
            states, _ = population_step(states, masks, images[idx], labels[idx])
            return states

        return jax.lax.fori_loop(start, start + num_steps, body, states)

    def evaluate(params, masks, images, labels):
        n = images.shape[0]
        bs = min(eval_batch_size, n)
        num_batches = -(-n // bs)
        pad = num_batches * bs - n
        images = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
        labels = jnp.pad(labels, (0, pad), constant_values=-1)  # padded rows never match
        images = images.reshape(num_batches, bs, *images.shape[1:])
        labels = labels.reshape(num_batches, bs)
        correct_fn = jax.vmap(functools.partial(chip_correct, model), in_axes=(0, 0, None, None))

        def body(total, batch):
            return total + correct_fn(params, masks, *batch), None

        chips = jax.tree.leaves(params)[0].shape[0]
        total, _ = jax.lax.scan(body, jnp.zeros((chips,), jnp.int32), (images, labels))
        return total.astype(jnp.float32) / n

    if max_traces is not None:
        run = chex.assert_max_traces(run, n=max_traces)
        evaluate = chex.assert_max_traces(evaluate, n=max_traces)
    return Trainer(
        init_population=jax.jit(init_population),
        step=jax.jit(step),
        population_step=jax.jit(population_step),
        run=jax.jit(run, donate_argnums=0),
        evaluate=jax.jit(evaluate),
        tx=tx,
    )


def slice_chips(tree: PyTree, index) -> PyTree:
    """Select chips (an index array or slice) along the leading axis of every leaf."""
    return jax.tree.map(lambda x: x[index], tree)
