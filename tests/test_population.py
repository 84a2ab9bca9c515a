"""Chunked population retraining: compaction of finished chips changes nothing but the work."""

import jax
import numpy as np
import pytest

from reduce_jax import faults, population, train


@pytest.mark.parametrize(
    "n, cap, expected", [(1, 32, 1), (2, 32, 4), (4, 32, 4), (5, 32, 16), (17, 32, 32), (3, 2, 2)]
)
def test_bucket_size(n, cap, expected):
    assert population.bucket_size(n, cap) == expected


def test_pad_chunk():
    maps = np.ones((3, 2, 2), bool)
    pm, pb = population.pad_chunk(maps, np.array([5, 6, 7]), 5)
    assert pm.shape == (5, 2, 2) and not pm[3:].any() and pb.tolist() == [5, 6, 7, 0, 0]


def test_compacted_phase_equals_gated_phase(digits, tiny_mlp, tiny_mlp_params):
    data = population.DeviceData.from_dataset(digits)
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(3), 6, 8, 8, 0.2))
    steps = np.array([0, 9, 2, 5, 1, 9])
    key = jax.random.key(7)
    results, work = [], []
    for compact in (True, False):
        states, masks = population.init_chunk(trainer, tiny_mlp_params, maps, steps)
        done = []
        states = population.run_phase(
            trainer, states, masks, data, key, steps, compact=compact, on_progress=done.append
        )
        results.append(states)
        work.append(sum(done))
    np.testing.assert_array_equal(results[0].step, steps)
    np.testing.assert_array_equal(results[1].step, steps)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *results)
    assert work == [steps.sum(), steps.sum()]  # progress counts budgeted chip-steps


def test_phase_from_nonzero_start_continues_the_batch_order(digits, tiny_mlp, tiny_mlp_params):
    """Two phases 0..3 and 3..7 equal one phase 0..7 (same batches, same states)."""
    data = population.DeviceData.from_dataset(digits)
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("sgd", 0.1), 32)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(4), 2, 8, 8, 0.1))
    key = jax.random.key(1)
    budgets = np.array([7, 7])
    s1, masks = population.init_chunk(trainer, tiny_mlp_params, maps, budgets)
    s1 = population.run_phase(trainer, s1, masks, data, key, np.array([3, 3]))
    s1 = population.run_phase(trainer, s1, masks, data, key, np.array([4, 4]), start=3)
    s2, _ = population.init_chunk(trainer, tiny_mlp_params, maps, budgets)
    s2 = population.run_phase(trainer, s2, masks, data, key, budgets)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), s1, s2)


def test_map_chunks_skips_done_chunks_and_scatters_by_chip_id():
    ids = np.array([4, 0, 3, 1, 2])  # processing order
    calls, saved = [], {}

    def compute(chunk):
        calls.append(chunk.tolist())
        return dict(value=(chunk * 10).tolist(), flag=(chunk % 2 == 0).tolist())

    done = {1: dict(value=[-1, -1], flag=[True, True])}  # chunk 1 (chips 3, 1) saved earlier
    out = population.map_chunks(ids, 2, done, compute, lambda i, r: saved.setdefault(i, r))
    assert calls == [[4, 0], [2]] and sorted(saved) == [0, 2]
    assert out["value"].tolist() == [0, -1, 20, -1, 40]
    assert out["flag"].dtype == bool and out["flag"].tolist() == [True, True, True, True, True]
    assert list(done) == [1]  # the caller's dict is not modified
