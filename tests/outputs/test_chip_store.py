"""Every chip's retrained weights (``--save_chip_weights``): the stored chip is the chip
``chips.csv`` reports, its bypassed weights are zero, 0-epoch chips are references to the
masked baseline, a resumed run stores the same weights without rewriting finished chunks,
and a half-written chunk never reads as complete."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import reduce_jax
from reduce_jax import inputs, pipeline
from reduce_jax.engine import population, progress, train
from reduce_jax.errors import ConfigError
from reduce_jax.hardware import systolic
from reduce_jax.outputs import chip_store

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Four pools of two chips, each topped up on its own: several chunks in the store.
CHUNKS = dict(chips_per_batch=2, topup_pool_chunks=1, compare_policies=False)


def _config(small_run_config, workdir, **changes):
    return small_run_config(str(workdir), save_chip_weights=True, **{**CHUNKS, **changes})


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_run_config):
    """A finished small study with the store: ``(config, summary)``."""
    cfg = _config(small_run_config, tmp_path_factory.mktemp("study"))
    return cfg, pipeline.run(cfg)


def _chip_maps(cfg) -> np.ndarray:
    return pipeline.chip_fault_maps(cfg, pipeline.Keys.from_seed(cfg.seed).chips)


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "chips.csv")) as f:
        return list(csv.DictReader(f))


def _index(workdir) -> dict:
    with open(os.path.join(workdir, chip_store.STORE_DIR, chip_store.INDEX_FILE)) as f:
        return json.load(f)


def _kernels(params):
    return [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if systolic.is_kernel_path(path)
    ]


def _evaluator(cfg):
    """``evaluate(variables, fault_map) -> accuracy`` on the run's validation split, the
    chip's mask applied."""
    inp = inputs.resolve(cfg)
    data = population.DeviceData.from_dataset(inp.dataset)
    trainer = train.make_trainer(
        inp.model, train.make_optimizer("adam", 1e-3, 0.0), cfg.batch_size, cfg.eval_batch_size
    )

    def evaluate(variables, fault_map):
        mask = systolic.weight_masks(variables["params"], fault_map)
        one = jax.tree.map(lambda x: np.asarray(x)[None], (variables, mask))
        return float(trainer.evaluate(*one, *data.split("val"))[0])

    return evaluate


def test_a_loaded_chip_with_its_mask_has_its_chips_csv_accuracy_and_zero_bypassed_weights(
    study,
):
    cfg, _ = study
    evaluate = _evaluator(cfg)
    maps, rows = _chip_maps(cfg), _rows(cfg.workdir)
    assert len(rows) == len(maps) == cfg.num_chips
    baseline = chip_store.unflatten(
        dict(np.load(os.path.join(cfg.workdir, "chip_weights/baseline.npz")))
    )
    retrained = 0
    for chip, row in enumerate(rows):
        variables = reduce_jax.load_chip(cfg.workdir, chip)
        mask = systolic.weight_masks(variables["params"], maps[chip])
        acc = evaluate(variables, maps[chip])
        assert acc == pytest.approx(float(row["accuracy_after"]), abs=1e-9), chip
        for path, kernel in _kernels(variables["params"]):
            bypassed = np.asarray(_leaf(mask, path)) == 0
            assert bypassed.any() == maps[chip].any(), (chip, path)
            assert np.all(kernel[bypassed] == 0), (chip, path)
        masked = jax.tree.map(lambda w, m: np.asarray(w * m), baseline["params"], mask)
        same = jax.tree.leaves(jax.tree.map(np.array_equal, variables["params"], masked))
        trained = int(row["selected_steps"]) + int(row["topup_steps"]) > 0
        assert all(same) != trained, chip  # retrained: not the masked baseline
        retrained += trained
    assert 0 < retrained < len(rows), "the study needs chips with and without retraining"


def _leaf(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


def test_chips_given_0_epochs_are_references_to_the_masked_baseline(study):
    cfg, _ = study
    index, rows, maps = _index(cfg.workdir), _rows(cfg.workdir), _chip_maps(cfg)
    units = {
        m[0]: (entry, i)
        for entry in index["chunks"].values()
        for i, m in enumerate(entry["members"])
    }
    directory = os.path.join(cfg.workdir, chip_store.STORE_DIR)
    stored_rows = 0
    for entry in index["chunks"].values():
        with np.load(os.path.join(directory, entry["file"])) as z:
            weights = z["params/fc1/kernel"]
            assert len(weights) == sum(r >= 0 for r in entry["rows"])  # no copies
            stored_rows += len(weights)
    zero = [c for c, r in enumerate(rows) if int(r["selected_steps"]) + int(r["topup_steps"]) <= 0]
    assert zero and stored_rows == len(rows) - len(zero)
    with np.load(os.path.join(directory, chip_store.BASELINE_FILE)) as z:
        baseline = chip_store.unflatten(dict(z))
    for chip in zero:
        entry, i = units[chip]
        assert entry["rows"][i] == -1 and entry["steps"][i] == 0
        loaded = reduce_jax.load_chip(cfg.workdir, chip)
        mask = systolic.weight_masks(baseline["params"], maps[chip])
        expected = jax.tree.map(lambda w, m: np.asarray(w * m), baseline["params"], mask)
        jax.tree.map(np.testing.assert_array_equal, loaded["params"], expected)


@pytest.mark.slow
def test_the_store_is_not_written_without_the_flag_and_results_do_not_change(
    study, small_run_config, tmp_path
):
    cfg, with_store = study
    off = pipeline.run(small_run_config(str(tmp_path), **CHUNKS))
    assert not os.path.exists(tmp_path / chip_store.STORE_DIR)
    a, b = with_store.to_json(), off.to_json()
    for s in (a, b):
        s.pop("timing")
        s["config"] = {
            k: v for k, v in s["config"].items() if k not in ("workdir", "save_chip_weights")
        }
    assert a == b


class _Killed(Exception):
    pass


def test_a_resumed_run_stores_the_same_weights_and_does_not_rewrite_finished_chunks(
    study, small_run_config, tmp_path, monkeypatch
):
    reference, _ = study
    cfg = _config(small_run_config, tmp_path)
    put = progress.ProgressStore.put
    saved = []

    def put_then_stop(self, phase, index, result):
        if phase == "retrain" and len(saved) == 1:
            # The second pool is stored, but the run dies before its progress is saved:
            # the resumed run computes it again and must not rewrite it.
            raise _Killed
        put(self, phase, index, result)
        if phase == "retrain":
            saved.append(index)

    monkeypatch.setattr(progress.ProgressStore, "put", put_then_stop)
    with pytest.raises(_Killed):
        pipeline.run(cfg)
    monkeypatch.setattr(progress.ProgressStore, "put", put)
    directory = os.path.join(cfg.workdir, chip_store.STORE_DIR)
    before = _index(cfg.workdir)["chunks"]
    assert len(before) == 2
    stamps = {
        e["file"]: os.stat(os.path.join(directory, e["file"])).st_mtime_ns for e in before.values()
    }
    pipeline.run(cfg)
    after = _index(cfg.workdir)["chunks"]
    assert len(after) == 4 and set(before) <= set(after)
    for name, stamp in stamps.items():
        assert os.stat(os.path.join(directory, name)).st_mtime_ns == stamp, name
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]
    for chip in range(cfg.num_chips):
        jax.tree.map(
            np.testing.assert_array_equal,
            reduce_jax.load_chip(cfg.workdir, chip),
            reduce_jax.load_chip(reference.workdir, chip),
        )


def test_a_half_written_chunk_does_not_read_as_complete(study, tmp_path):
    cfg, _ = study
    workdir = str(tmp_path / "copy")
    shutil.copytree(cfg.workdir, workdir)
    directory = os.path.join(workdir, chip_store.STORE_DIR)
    index = _index(workdir)
    key, entry = next((k, e) for k, e in index["chunks"].items() if any(r >= 0 for r in e["rows"]))
    chips = [m[0] for m in entry["members"]]
    # Killed after the chunk's file was renamed into place, before the index named it; and
    # a temporary file of another chunk left behind.
    del index["chunks"][key]
    with open(os.path.join(directory, chip_store.INDEX_FILE), "w") as f:
        json.dump(index, f)
    with open(os.path.join(directory, "retrain-0123456789abcdef.npz.tmp"), "wb") as f:
        f.write(b"PK\x03\x04 half")
    for chip in chips:
        with pytest.raises(ConfigError, match=f"chip {chip} is not in"):
            reduce_jax.load_chip(workdir, chip)
    assert set(chip_store.stored_chips(workdir)) == set(range(cfg.num_chips)) - set(chips)


@pytest.mark.slow
def test_a_group_served_chip_is_its_groups_weights_stored_once(small_run_config, tmp_path):
    cfg = _config(small_run_config, tmp_path, grouping="greedy", max_group_size=4)
    grouped = pipeline.run(cfg).grouped
    members = grouped.retrainings.members
    groups = [u for u in range(len(members)) if (members[u] >= 0).sum() > 1]
    assert groups, "the study needs a group"
    index, rows, maps = _index(cfg.workdir), _rows(cfg.workdir), _chip_maps(cfg)
    evaluate = _evaluator(cfg)
    for u in groups:
        chips = [int(c) for c in members[u] if c >= 0]
        key, unit = index["serving"][str(chips[0])]
        entry = index["chunks"][key]
        assert entry["stage"] == "grouped" and entry["members"][unit] == chips
        assert all(index["serving"][str(c)] == [key, unit] for c in chips)
        with np.load(os.path.join(cfg.workdir, chip_store.STORE_DIR, entry["file"])) as z:
            assert len(z["params/fc1/kernel"]) == sum(r >= 0 for r in entry["rows"])
        first = reduce_jax.load_chip(cfg.workdir, chips[0])
        for chip in chips:
            variables = reduce_jax.load_chip(cfg.workdir, chip)
            jax.tree.map(np.testing.assert_array_equal, variables, first)
            acc = evaluate(variables, maps[chip])
            assert acc == pytest.approx(float(rows[chip]["grouped_accuracy_after"]), abs=1e-9)
    # Chips no group serves read their own retraining.
    alone = [c for c in range(cfg.num_chips) if str(c) not in index["serving"]]
    assert alone
    for chip in alone:
        acc = evaluate(reduce_jax.load_chip(cfg.workdir, chip), maps[chip])
        assert acc == pytest.approx(float(rows[chip]["accuracy_after"]), abs=1e-9)


def test_export_to_npz_and_orbax_round_trips(study, tmp_path):
    cfg, _ = study
    chip = 5
    expected = reduce_jax.load_chip(cfg.workdir, chip)
    out = chip_store.export_chip(cfg.workdir, chip, str(tmp_path / "chip5.npz"))
    with np.load(out) as z:
        got = chip_store.unflatten(dict(z))
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    import orbax.checkpoint as ocp

    path = chip_store.export_chip(cfg.workdir, chip, str(tmp_path / "chip5"))
    restored = ocp.StandardCheckpointer().restore(path)
    jax.tree.map(np.testing.assert_array_equal, restored["params"], expected["params"])
    with pytest.raises(ConfigError, match="exists"):
        chip_store.export_chip(cfg.workdir, chip, out)


@pytest.mark.slow
def test_the_export_cli(study, tmp_path):
    cfg, _ = study
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def export(*args):
        command = [sys.executable, "-m", "experiments.export_chip", *args]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)

    out = str(tmp_path / "chip2.npz")
    ok = export(f"--workdir={cfg.workdir}", "--chip=2", f"--out={out}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    with np.load(out) as z:
        got = chip_store.unflatten(dict(z))
    jax.tree.map(np.testing.assert_array_equal, got, reduce_jax.load_chip(cfg.workdir, 2))
    missing = export(f"--workdir={cfg.workdir}", "--chip=99", f"--out={tmp_path / 'x.npz'}")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith(
        "error: chip 99 is not in"
    )
    assert not os.path.exists(tmp_path / "x.npz")
    nostore = export(f"--workdir={tmp_path}", "--chip=0", f"--out={tmp_path / 'y.npz'}")
    assert nostore.returncode == 2 and "--save_chip_weights" in nostore.stderr
