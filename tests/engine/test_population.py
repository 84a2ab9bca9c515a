"""Chunked population retraining: compaction of finished chips changes nothing but the work."""

from typing import NamedTuple

import jax
import numpy as np
import pytest

from reduce_jax import data as data_lib
from reduce_jax.config import ConfigError
from reduce_jax.engine import population, progress, train
from reduce_jax.hardware import faults


@pytest.mark.parametrize(
    "n, cap, expected", [(1, 32, 1), (2, 32, 4), (4, 32, 4), (5, 32, 16), (17, 32, 32), (3, 2, 2)]
)
def test_bucket_size(n, cap, expected):
    assert population.bucket_size(n, cap) == expected


class _Chips(NamedTuple):
    chip: np.ndarray
    rate: np.ndarray


class _Out(NamedTuple):
    value: np.ndarray
    flag: np.ndarray
    rate: np.ndarray
    extra: np.ndarray | None = None


def test_pad_pads_every_array_with_zeros_and_keeps_none():
    maps = np.ones((3, 2, 2), bool)
    padded = population.pad(_Out(maps, np.array([5, 6, 7]), np.ones(3, np.float32)), 5)
    assert padded.value.shape == (5, 2, 2) and padded.value[:3].all()
    assert not padded.value[3:].any() and padded.flag.tolist() == [5, 6, 7, 0, 0]
    assert padded.rate.dtype == np.float32 and padded.extra is None


def test_compacted_phase_equals_gated_phase(digits_device, tiny_mlp, tiny_mlp_variables):
    """Dropping finished chips equals running every chip to the longest budget, gated."""
    data = digits_device
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(3), 6, 8, 8, 0.2))
    steps = np.array([0, 9, 2, 5, 1, 9])
    key = jax.random.key(7)
    states, masks = population.init_chunk(trainer, tiny_mlp_variables, maps, steps)
    done = []
    compacted = population.run_phase(
        trainer, states, masks, data, key, steps, on_progress=done.append
    )
    states, masks = population.init_chunk(trainer, tiny_mlp_variables, maps, steps)
    gated = trainer.run(
        states, masks, data.train_images, data.train_labels, key, 0, int(steps.max())
    )
    np.testing.assert_array_equal(compacted.step, steps)
    np.testing.assert_array_equal(gated.step, steps)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), compacted, gated
    )
    assert sum(done) == steps.sum()  # progress counts budgeted chip-steps


def test_phase_from_nonzero_start_continues_the_batch_order(
    digits_device, tiny_mlp, tiny_mlp_variables
):
    """Two phases 0..3 and 3..7 equal one phase 0..7 (same batches, same states)."""
    data = digits_device
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("sgd", 0.1), 32)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(4), 2, 8, 8, 0.1))
    key = jax.random.key(1)
    budgets = np.array([7, 7])
    s1, masks = population.init_chunk(trainer, tiny_mlp_variables, maps, budgets)
    s1 = population.run_phase(trainer, s1, masks, data, key, np.array([3, 3]))
    s1 = population.run_phase(trainer, s1, masks, data, key, np.array([4, 4]), start=3)
    s2, _ = population.init_chunk(trainer, tiny_mlp_variables, maps, budgets)
    s2 = population.run_phase(trainer, s2, masks, data, key, budgets)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), s1, s2)


def _compute(calls):
    """A chunk function recording its calls: value = 10 * chip id, flag = even id."""

    def compute(ids, chunk: _Chips) -> _Out:
        calls.append((ids.tolist(), chunk.chip.tolist()))
        return _Out(value=chunk.chip * 10, flag=chunk.chip % 2 == 0, rate=chunk.rate)

    return compute


def test_drive_orders_pads_and_scatters_back_by_chip_id():
    order = np.array([4, 0, 3, 1, 2])  # processing order
    inputs = _Chips(chip=np.arange(5), rate=np.array([0.5, np.inf, np.nan, 0.1, 0.2]))
    calls = []
    out = population.drive(inputs, _compute(calls), _Out, 2, order)
    # Chunks of 2 in processing order; the last one padded with zeros to the chunk size.
    assert calls == [([4, 0], [4, 0]), ([3, 1], [3, 1]), ([2], [2, 0])]
    assert isinstance(out, _Out) and out.extra is None
    assert out.value.tolist() == [0, 10, 20, 30, 40]
    assert out.flag.dtype == bool and out.flag.tolist() == [True, False, True, False, True]
    np.testing.assert_array_equal(out.rate, inputs.rate)


def test_resumed_drive_computes_only_the_missing_chunks(tmp_path):
    """A reopened store hands back the saved chunks (arrays, NaN and inf kept), and the
    driver computes only the chunks that are missing."""
    workdir = str(tmp_path)
    inputs = _Chips(chip=np.arange(5), rate=np.array([0.5, np.inf, np.nan, 0.1, 0.2]))
    first = []

    def interrupted(ids, chunk):
        if len(first) == 2:
            raise KeyboardInterrupt
        return _compute(first)(ids, chunk)

    store = progress.ProgressStore(workdir, dict(a=1), overwrite=False)
    with pytest.raises(KeyboardInterrupt):
        population.drive(inputs, interrupted, _Out, 2, store=store, stage="s")
    reopened = progress.ProgressStore(workdir, dict(a=1), overwrite=False)
    saved = reopened.done("s", _Out)
    assert sorted(saved) == [0, 1]
    assert saved[0].value.tolist() == [0, 10] and saved[0].flag.dtype == bool
    assert saved[0].extra is None  # a field computed as None is read back as None
    np.testing.assert_array_equal(saved[0].rate, [0.5, np.inf])
    np.testing.assert_array_equal(saved[1].rate, [np.nan, 0.1])
    second = []
    out = population.drive(inputs, _compute(second), _Out, 2, store=reopened, stage="s")
    assert [ids for ids, _ in second] == [[4]]  # only the missing chunk
    assert out.value.tolist() == [0, 10, 20, 30, 40]
    np.testing.assert_array_equal(out.rate, inputs.rate)
    assert sorted(progress.ProgressStore(workdir, dict(a=1), False).done("s", _Out)) == [0, 1, 2]


class _X(NamedTuple):
    x: np.ndarray


def test_progress_store_refuses_other_settings(tmp_path):
    store = progress.ProgressStore(str(tmp_path), dict(a=1, b=2), overwrite=False)
    store.put("s", 0, _X(np.zeros(2)))
    with pytest.raises(ConfigError, match="differs in: b"):
        progress.ProgressStore(str(tmp_path), dict(a=1, b=3), overwrite=False)
    fresh = progress.ProgressStore(str(tmp_path), dict(a=1, b=3), overwrite=True)
    assert fresh.done("s", _X) == {}


def test_meter_counts_resumed_work_as_done_but_not_in_the_rate(monkeypatch, caplog):
    """8 of 10 chips found saved, 1 computed in 2 s: 9/10 done at 0.5 chips/s, ETA 2 s."""
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    meter = progress.Meter("retrain", 10, unit="chips", every_s=0.0)
    meter.resumed(8)
    # absl's own logger: a baseline saved earlier in the session leaves its level set.
    with caplog.at_level("INFO", logger="absl"):
        meter(1)
    assert "retrain: 9/10 chips (90%), 0.5/s, ETA 2 s" in caplog.text


def test_progress_store_resumes_across_settings_that_do_not_change_results(tmp_path):
    saved = dict(a=1, workdir="x", summary_chips=True)
    progress.ProgressStore(str(tmp_path), saved, overwrite=False).put("s", 0, _X(np.ones(2)))
    other = dict(a=1, workdir="y", summary_chips=False)
    assert sorted(progress.ProgressStore(str(tmp_path), other, overwrite=False).done("s", _X)) == [
        0
    ]


def test_evaluating_some_chips_equals_evaluating_all(digits, tiny_mlp, tiny_mlp_variables):
    data = population.DeviceData.from_dataset(data_lib.split_validation(digits, 0.1))
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("sgd", 0.1), 32)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(6), 6, 8, 8, 0.3))
    states, masks = population.init_chunk(trainer, tiny_mlp_variables, maps, np.zeros(6))
    every = population.evaluate(trainer, states, masks, data)
    assert len(set(every.tolist())) > 1  # the chips differ, so a mix-up would show
    for ids in ([4], [1, 4], [0, 2, 3, 5, 1], [0, 1, 2, 3, 4, 5]):
        some = population.evaluate(trainer, states, masks, data, ids=np.array(ids))
        np.testing.assert_allclose(some, every[ids], atol=1e-6)
