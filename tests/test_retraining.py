"""Top-ups: increments until the target is met, up to the cap, never past it."""

import jax
import jax.numpy as jnp
import numpy as np

from reduce_jax import population, retraining, train


def test_top_ups_stop_at_the_first_increment_that_meets_the_target(monkeypatch):
    """Chip 0 meets the target after 1 increment, chip 1 after 3, chip 2 never (it stops
    at the cap, the last increment cut to fit), chip 3 already meets it, chip 4 is not
    retrained, and chip 5 diverges in its first increment."""
    need = np.array([2, 6, 100, 0, 0, 100])  # steps of top-up each chip needs
    runs = []

    def run_phase(trainer, states, masks, data, key, phase_steps, **kwargs):
        runs.append(np.asarray(phase_steps).tolist())
        diverged = states.diverged | jnp.asarray(np.arange(6) == 5)
        return states.replace(
            step=states.step + jnp.asarray(phase_steps, jnp.int32), diverged=diverged
        )

    def evaluate(trainer, states, masks, data):
        return np.where(np.asarray(states.step) >= need, 0.95, 0.5)

    monkeypatch.setattr(population, "run_phase", run_phase)
    monkeypatch.setattr(population, "evaluate", evaluate)
    n = len(need)
    states = train.ChipState(
        params={},
        batch_stats={},
        opt_state={},
        step=jnp.zeros(n, jnp.int32),
        budget=jnp.zeros(n, jnp.int32),
        diverged=jnp.zeros(n, bool),
    )
    ctx = population.Context(None, None, None, 0.9, 10, n, topup_steps=2, max_topup_steps=7)
    after = np.array([0.5, 0.5, 0.5, 0.95, 0.5, 0.5])
    retrained = np.array([True, True, True, True, False, True])
    states, after, topup = retraining.top_up(ctx, states, None, after, retrained, jax.random.key(0))
    assert runs == [[2, 2, 2, 0, 0, 2], [0, 2, 2, 0, 0, 0], [0, 2, 2, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert topup.tolist() == [2, 6, 7, 0, 0, 2]
    assert after.tolist() == [0.95, 0.95, 0.5, 0.95, 0.5, 0.5]
    assert np.asarray(states.budget).tolist() == [2, 6, 7, 0, 0, 2]
