"""Mask-aware retraining (FAP+T) of one chip and of a population of chips.

The forward pass uses ``param * mask``, so gradients of bypassed weights are zero; updates
are masked too, so bypassed weights stay exactly zero (weight decay included: it is part of
the masked update). Only ``params`` are masked; a chip's BatchNorm statistics
(``batch_stats``) are its own, updated in every training step and used in evaluation. A
population is a ``ChipState`` with a leading ``chips`` axis; one jitted step updates every
chip on the same data batch. Each chip has a step budget: once ``step == budget`` (or once it
has diverged) its state no longer changes, so a chip's trajectory does not depend on which
chips it is trained with (up to the last bits: XLA may pick other GEMM kernels for other
numbers of chips).

What a faulty PE does is the trainer's ``Hardware``: by default the chip bypasses it
(``bypass``: the chip is its masks); a chip whose faults stay in the forward pass (stuck-at
bits on the int8 array, ``stages.mitigation.fault_aware``) brings its own model and a unit
mask, and the same step retrains it fault-aware.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from reduce_jax import sharding
from reduce_jax.hardware import systolic
from reduce_jax.nets import augment as augment_lib

PyTree = Any

OPTIMIZERS = ("adam", "sgd", "momentum")
SCHEDULES = ("constant", "cosine")
# How a population's programs compute its chips: ``vmap`` vectorises them (one program over
# all chips: the fast way for small networks and on accelerators); ``map`` runs the one-chip
# computation for each chip in turn inside the same compiled program (``lax.map``; on a CPU,
# faster for ResNets, whose per-chip convolutions and BatchNorm gain nothing from a chips
# axis; see docs/performance.md).
CHIP_BATCHING = ("vmap", "map")


@struct.dataclass
class ChipState:
    """Training state of one chip (or, with a leading ``chips`` axis, of a population).

    Attributes:
      params: the chip's parameters; bypassed weights are exactly zero.
      batch_stats: the chip's BatchNorm running statistics (``{}`` without BatchNorm).
      opt_state: optimizer state (``inject_hyperparams``: the learning rate is per chip).
      step: ``int32[]`` steps taken so far.
      budget: ``int32[]`` steps the chip may take; at ``step == budget`` it stops changing.
      diverged: ``bool[]`` the loss or the new weights became NaN/inf; the chip is frozen.
    """

    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    step: jax.Array
    budget: jax.Array
    diverged: jax.Array

    @property
    def variables(self) -> dict:
        """The Flax variables ``{"params", "batch_stats"}`` (unmasked)."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def make_optimizer(
    name: str,
    learning_rate: float,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    total_steps: int = 1,
) -> optax.GradientTransformation:
    """Optimizer by name (``adam``, ``sgd``, ``momentum``) with an injectable learning rate.

    Args:
      name: ``adam``, ``sgd`` or ``momentum`` (SGD with momentum 0.9).
      learning_rate: the (peak) learning rate.
      weight_decay: 0 for none; else decoupled for ``adam`` (``optax.adamw``) and added to
        the gradient for ``sgd``/``momentum`` (``add_decayed_weights``, as PyTorch's SGD).
      schedule: ``constant``, or ``cosine`` (decay to 0 over ``total_steps`` steps).
      total_steps: length of the cosine schedule.
    """
    factories = {
        "adam": optax.adam,
        "sgd": optax.sgd,
        "momentum": functools.partial(optax.sgd, momentum=0.9),
    }
    if name not in factories:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    factory = factories[name]
    if weight_decay and name == "adam":
        factory = functools.partial(optax.adamw, weight_decay=weight_decay)
    elif weight_decay:
        base = factory

        def factory(learning_rate):
            return optax.chain(optax.add_decayed_weights(weight_decay), base(learning_rate))

    if schedule == "cosine":
        learning_rate = optax.cosine_decay_schedule(learning_rate, max(int(total_steps), 1))
    return optax.inject_hyperparams(factory)(learning_rate=learning_rate)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Steps in one epoch: ``ceil(num_examples / batch_size)``."""
    return math.ceil(num_examples / batch_size)


def epochs_to_steps(epochs: float | np.ndarray, spe: int) -> np.ndarray:
    """``ceil(epochs * steps_per_epoch)``, elementwise for arrays (numpy or python)."""
    return np.ceil(np.round(np.asarray(epochs, np.float64) * spe, 9)).astype(np.int64)


def batch_indices(key: jax.Array, step: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
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


def init_chip(
    variables: PyTree, mask: PyTree, tx: optax.GradientTransformation, budget
) -> ChipState:
    """A chip's state at the start of FAP+T: the baseline with bypassed weights zeroed.

    Args:
      variables: the baseline's ``{"params", "batch_stats"}`` (``batch_stats`` optional).
      mask: 0/1 masks like ``variables["params"]``.
    """
    params = apply_mask(variables["params"], mask)
    return ChipState(
        params=params,
        batch_stats=variables.get("batch_stats", {}),
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
      diverged, or this step would make it non-finite (then ``diverged`` is set). The model
      runs in train mode: BatchNorm uses the batch's statistics and updates the chip's
      running averages.
    """

    def loss_fn(params):
        variables = {"params": apply_mask(params, mask), "batch_stats": state.batch_stats}
        logits, updated = model.apply(variables, images, train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updated.get("batch_stats", {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(apply_mask(grads, mask), state.opt_state, state.params)
    params = optax.apply_updates(state.params, apply_mask(updates, mask))
    active = (state.step < state.budget) & ~state.diverged
    finite = jnp.isfinite(loss) & _all_finite((params, batch_stats))
    take = active & finite
    keep = lambda new, old: jnp.where(take, new, old)
    new_state = ChipState(
        params=jax.tree.map(keep, params, state.params),
        batch_stats=jax.tree.map(keep, batch_stats, state.batch_stats),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        step=state.step + take.astype(jnp.int32),
        budget=state.budget,
        diverged=state.diverged | (active & ~finite),
    )
    return new_state, loss


def masked_variables(variables: PyTree, mask: PyTree) -> dict:
    """``{"params": params * mask, "batch_stats": ...}``: what a chip computes with."""
    params = apply_mask(variables["params"], mask)
    return {"params": params, "batch_stats": variables.get("batch_stats", {})}


def chip_correct(
    model: nn.Module, variables: PyTree, mask: PyTree, images: jax.Array, labels: jax.Array
) -> jax.Array:
    """Number of correct predictions ``int32[]`` of one chip on a batch (evaluation mode:
    BatchNorm uses the chip's running averages).

    Args:
      variables: the chip's ``{"params", "batch_stats"}``; mask: like its ``params``.
    """
    logits = model.apply(masked_variables(variables, mask), images, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32)


class Hardware(NamedTuple):
    """How a chip's faulty PEs act on what it computes.

    A *chip* is a pytree (a population's has a leading ``chips`` axis) that the engine passes
    to ``Trainer.run`` and ``Trainer.evaluate`` without looking inside.

    Attributes:
      chip: ``(params, fault_map bool[R, C]) -> chip``: one chip from its PE fault map.
      compute: ``chip -> (model, mask)``: what ``chip_step`` and ``chip_correct`` compute
        that chip with: a model called like a Flax module, and 0/1 masks like ``params``
        (the weights it holds at zero).
      counted: hardware with the same arithmetic whose programs XLA's cost analysis counts
        in full (None: this one's do). Stuck product and partial-sum bits run the array row
        by row in a ``scan``, whose body the cost analysis counts once.
    """

    chip: Callable[[PyTree, jax.Array], PyTree]
    compute: Callable[[PyTree], tuple[Any, PyTree]]
    counted: Hardware | None = None


def bypass(model: nn.Module) -> Hardware:
    """FAP: a chip's faulty PEs are bypassed, the weights they hold act as zero. A chip is its
    masks (``systolic.weight_masks``); ``unit_masks`` is a fault-free one."""
    return Hardware(chip=systolic.weight_masks, compute=lambda masks: (model, masks))


# The jitted functions of a ``Trainer`` (``make_trainer`` documents each one).
Chips = PyTree  # ``Hardware.chip``'s pytrees with a leading ``chips`` axis (bypass: masks)
InitPopulation = Callable[[PyTree, Chips, jax.Array], ChipState]
Step = Callable[[ChipState, Chips, jax.Array, jax.Array], tuple[ChipState, jax.Array]]
Run = Callable[
    [ChipState, Chips, jax.Array, jax.Array, jax.Array, int | jax.Array, int | jax.Array],
    ChipState,
]
Evaluate = Callable[[PyTree, Chips, jax.Array, jax.Array], jax.Array]


class Trainer(NamedTuple):
    """Jitted functions of one model on one kind of hardware, and one optimizer (see
    ``make_trainer``).

    Attributes:
      chips: ``(params, fault_maps bool[chips, R, C]) -> chips``: the population's chips.
      init_population: ``(variables, chips, budgets int32[chips]) -> ChipState[chips]``.
      step: ``(state, chip, images, labels) -> (state, loss)``: one chip, one step.
      population_step: the same over ``[chips]`` (``loss float32[chips]``).
      run: ``(states, chips, train_images, train_labels, phase_key, start, num_steps) ->
        states``: phase steps ``start .. start + num_steps - 1``; donates ``states``.
      evaluate: ``(variables[chips], chips, images, labels) -> float32[chips]``.
      tx: the retraining optimizer.
      hardware: what the chips compute on.
    """

    chips: Callable[[PyTree, jax.Array], Chips]
    init_population: InitPopulation
    step: Step
    population_step: Step
    run: Run
    evaluate: Evaluate
    tx: optax.GradientTransformation
    hardware: Hardware


def make_trainer(
    model: nn.Module | Hardware,
    tx: optax.GradientTransformation,
    batch_size: int,
    eval_batch_size: int = 100,
    max_traces: int | None = None,
    augment: bool = False,
    chip_batching: str = "vmap",
) -> Trainer:
    """Builds the jitted single-chip and population functions.

    Returns a ``Trainer`` with:
      ``chips(params, fault_maps bool[chips, R, C]) -> chips`` (``Hardware.chip`` of each).
      ``init_population(variables, chips, budgets int32[chips]) -> ChipState[chips]``
        (``variables``: the baseline's ``{"params", "batch_stats"}``; each chip's masked).
      ``step(state, chip, images, labels) -> (state, loss)``: one chip, one step.
      ``population_step(states[chips], chips, images, labels) -> (states, loss[chips])``
      ``run(states, chips, train_images, train_labels, phase_key, start, num_steps)``: runs
        phase steps ``start .. start + num_steps - 1`` (each on the batch
        ``batch_indices(phase_key, t)``, with ``augment`` cropped and flipped with
        ``augment.step_key(phase_key, t)``: the same batch for every chip) in one call;
        donates ``states``; ``start`` and ``num_steps`` are traced, so a new budget never
        recompiles.
      ``evaluate(variables[chips], chips, images, labels) -> float32[chips]``
        accuracy (``variables``: ``{"params", "batch_stats"}``, e.g. ``states.variables``).

    Args:
      model: a Flax model, whose chips bypass their faulty PEs (``bypass(model)``), or the
        ``Hardware`` the chips compute on.
      max_traces: if set, ``run`` and ``evaluate`` fail when traced more often (tests).
      augment: random crop (pad 4) and flip of every training batch (``augment.crop_flip``).
      chip_batching: how ``population_step``, ``run`` and ``evaluate`` compute the chips
        (``CHIP_BATCHING``); results are the same up to floating-point rounding.
    """
    if chip_batching not in CHIP_BATCHING:
        raise ValueError(f"chip_batching must be one of {CHIP_BATCHING}, got {chip_batching!r}")
    hardware = model if isinstance(model, Hardware) else bypass(model)

    def step(state: ChipState, chip: PyTree, images: jax.Array, labels: jax.Array):
        chip_model, mask = hardware.compute(chip)
        return chip_step(chip_model, tx, state, mask, images, labels)

    def correct(variables: PyTree, chip: PyTree, images: jax.Array, labels: jax.Array):
        chip_model, mask = hardware.compute(chip)
        return chip_correct(chip_model, variables, mask, images, labels)

    population_step = over_chips(step, chip_batching)

    def chips(params: PyTree, fault_maps: jax.Array) -> Chips:
        return jax.vmap(hardware.chip, in_axes=(None, 0))(params, fault_maps)

    def init_population(variables: PyTree, chips: Chips, budgets: jax.Array) -> ChipState:
        def one(chip, budget):
            return init_chip(variables, hardware.compute(chip)[1], tx, budget)

        return jax.vmap(one)(chips, budgets)

    def run(
        states: ChipState,
        chips: Chips,
        images: jax.Array,
        labels: jax.Array,
        phase_key: jax.Array,
        start: int | jax.Array,
        num_steps: int | jax.Array,
    ) -> ChipState:
        def body(t, states):
            idx = batch_indices(phase_key, t, images.shape[0], batch_size)
            batch = images[idx]
            if augment:
                batch = augment_lib.crop_flip(augment_lib.step_key(phase_key, t), batch)
            states, _ = population_step(states, chips, batch, labels[idx])
            return states

        return jax.lax.fori_loop(start, start + num_steps, body, states)

    correct_fn = over_chips(correct, chip_batching)

    def evaluate(variables: PyTree, chips: Chips, images: jax.Array, labels: jax.Array):
        return batched_accuracy(correct_fn, variables, chips, images, labels, eval_batch_size)

    if max_traces is not None:
        run = chex.assert_max_traces(run, n=max_traces)
        evaluate = chex.assert_max_traces(evaluate, n=max_traces)
    return Trainer(
        chips=jax.jit(chips),
        init_population=jax.jit(init_population),
        step=jax.jit(step),
        population_step=jax.jit(population_step),
        run=jax.jit(run, donate_argnums=0),
        evaluate=jax.jit(evaluate),
        tx=tx,
        hardware=hardware,
    )


def batched_accuracy(
    correct_fn: Callable[..., jax.Array],
    variables: PyTree,
    chips: PyTree,
    images: jax.Array,
    labels: jax.Array,
    eval_batch_size: int,
) -> jax.Array:
    """Accuracy ``float32[chips]`` of every chip on ``images``, ``labels``, scanned in batches
    of ``eval_batch_size`` (the last padded with rows that never match).

    Args:
      correct_fn: ``(variables[chips], chips, images[B], labels[B]) -> int32[chips]``
        correct predictions on one batch (``over_chips`` of a one-chip count).
      variables, chips: with a leading ``chips`` axis.
    """
    n = images.shape[0]
    bs = min(eval_batch_size, n)
    num_batches = -(-n // bs)
    pad = num_batches * bs - n
    images = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
    labels = jnp.pad(labels, (0, pad), constant_values=-1)  # padded rows never match
    images = images.reshape(num_batches, bs, *images.shape[1:])
    labels = labels.reshape(num_batches, bs)

    def body(total, batch):
        return total + correct_fn(variables, chips, *batch), None

    n_chips = jax.tree.leaves(variables["params"])[0].shape[0]
    total, _ = jax.lax.scan(body, jnp.zeros((n_chips,), jnp.int32), (images, labels))
    return total.astype(jnp.float32) / n


def over_chips(fn: Callable[..., Any], chip_batching: str = "vmap") -> Callable[..., Any]:
    """``fn(chip_a, chip_b, x, y)`` of one chip -> the same over a leading ``chips`` axis of
    its first two arguments (``x`` and ``y`` are shared by every chip).

    ``vmap`` vectorises the chips; ``map`` computes them one after another, each device over
    its own chips (``sharding.map_chips``).
    """
    if chip_batching == "vmap":
        return jax.vmap(fn, in_axes=(0, 0, None, None))

    return lambda a, b, x, y: sharding.map_chips(fn, (a, b), (x, y))


def slice_chips(tree: PyTree, index) -> PyTree:
    """Select chips (an index array or slice) along the leading axis of every leaf."""
    return jax.tree.map(lambda x: x[index], tree)
