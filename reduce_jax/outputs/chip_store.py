"""Every chip's retrained weights: one chunked store, ``WORKDIR/chip_weights/``.

Layout (format 1):

* ``baseline.npz``: the baseline's variables, once (flattened tree paths as keys,
  ``params/Conv_0/kernel``).
* one ``<stage>-<digest>.npz`` per pool of units that ``retraining.retrain`` finished, or
  per chunk of chips the online policy finished (``policies.run_adaptive``; ``/`` in a
  stage's name is written ``_``): the
  units' members ``_members int64[m, W]`` (chip ids, ``-1``: none), steps in all
  ``_steps int64[m]``, ``_diverged bool[m]``, fused fault maps ``_fault_maps bool[m, R, C]``,
  ``_rows int64[m]`` (each unit's row in the weights, ``-1``: a unit given 0 steps, stored as
  a reference to the masked baseline, not as a copy) and every variable with a leading axis
  over the trained units only (``params/...``, ``batch_stats/...``).
* ``index.json``: the run's fingerprint, ``bypass`` (False for fault-aware chips, which
  bypass nothing: a unit given 0 steps is the baseline itself) and, per complete chunk, its
  file and its units' members, steps and rows; ``serving``: chip -> (chunk, unit) for the
  chips a group serves.

A chunk is written to a temporary name, fsynced and renamed, and only then entered in the
index (itself replaced atomically): a chunk file missing from the index is incomplete and
never read; a resumed run recomputes it and overwrites it, and skips the chunks the index
has. The digest names a pool by its stage and member chips, so chunks of different runs into
the same store (new chips added later) never collide.

A chip's weights are those of the retraining that serves it: its group's in a grouped run
(the group's weights are stored once), else its own per-chip retraining.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from reduce_jax import files, sharding
from reduce_jax.errors import ConfigError

PyTree = Any

STORE_DIR = "chip_weights"
INDEX_FILE = "index.json"
BASELINE_FILE = "baseline.npz"
FORMAT = 1
COLLECTIONS = ("params", "batch_stats")
# Metadata arrays of a chunk file; variables are stored under their tree paths.
_META = ("_members", "_steps", "_diverged", "_fault_maps", "_rows")


def flatten(variables: PyTree) -> dict[str, np.ndarray]:
    """``{"params": {...}, "batch_stats": {...}}`` as ``{"params/Dense_0/kernel": array}``."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        flat["/".join(str(getattr(p, "key", p)) for p in path)] = leaf
    return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """The inverse of ``flatten``: nested dicts with ``params`` and ``batch_stats`` (empty
    when the model has no BatchNorm)."""
    tree: dict = {c: {} for c in COLLECTIONS}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _save_npz(path: str, arrays: dict[str, np.ndarray | Callable[[], np.ndarray]]) -> int:
    """Writes ``arrays`` as an uncompressed ``.npz`` atomically, calling a callable value
    only when its array is written (so one such array is in memory at a time); returns the
    file's size in bytes."""

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, value in arrays.items():
                with z.open(name + ".npy", "w", force_zip64=True) as member:
                    array = value() if callable(value) else value
                    np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)

    files.replace_atomic(path, write, binary=True)
    return os.path.getsize(path)


class ChipStore:
    """The writer (a ``retraining.WeightSink``): ``write`` stores a pool as it finishes.

    Only process 0 writes; every process takes part in gathering a pool's variables.

    Args:
      workdir: the run's directory (the store is ``workdir/chip_weights``).
      baseline: the baseline's ``{"params", "batch_stats"}``.
      fingerprint: what the stored weights depend on (the run's settings and inputs); a
        store with another fingerprint (a run started again with ``--overwrite``) is cleared.
      chip_ids: ``int[chips]`` the chip id of each row of the fault maps ``retrain`` is given
        (default: the row number).
      bypass: the chips bypass their faulty PEs (a chip given 0 epochs is the baseline with
        its map's mask); False under ``--mitigation=fault-aware`` (it is the baseline).
    """

    def __init__(
        self, workdir: str, baseline: PyTree, fingerprint: str, chip_ids=None, bypass=True
    ):
        self.dir = os.path.join(workdir, STORE_DIR)
        self.chip_ids = None if chip_ids is None else np.asarray(chip_ids, np.int64)
        self.primary = jax.process_index() == 0
        self.seconds, self.bytes, self.chunks_written, self.chunks_skipped = 0.0, 0, 0, 0
        index = _read_index(self.dir)
        if index is not None and index.get("fingerprint") == fingerprint:
            self.index = index
            return
        start = time.perf_counter()
        self.index = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "baseline": BASELINE_FILE,
            "bypass": bool(bypass),
            "chunks": {},
            "serving": {},
        }
        if self.primary:
            os.makedirs(self.dir, exist_ok=True)
            _clear(self.dir, index)
            flat = {k: sharding.to_host(v) for k, v in flatten(baseline).items()}
            self.bytes += _save_npz(os.path.join(self.dir, BASELINE_FILE), flat)
            files.write_json_atomic(os.path.join(self.dir, INDEX_FILE), self.index)
        self.seconds += time.perf_counter() - start

    def write(self, stage, members, steps, maps, diverged, variables) -> None:
        """Stores one pool (``retraining.WeightSink.write``); a chunk the index already holds
        (computed again after a kill before the run's progress was saved) is not rewritten."""
        start = time.perf_counter()
        members = np.asarray(members, np.int64)
        if self.chip_ids is not None:
            members = np.where(members >= 0, self.chip_ids[np.maximum(members, 0)], -1)
        digest = hashlib.sha256(f"{stage}:".encode() + members.tobytes()).hexdigest()[:16]
        key = f"{stage.replace('/', '_')}-{digest}"
        if key in self.index["chunks"]:
            self.chunks_skipped += 1
            return
        steps = np.asarray(steps, np.int64)
        trained = np.flatnonzero(steps > 0)
        rows = np.full(len(steps), -1, np.int64)
        rows[trained] = np.arange(len(trained))
        # Gathered leaf by leaf as the file is written: the host holds one leaf of one pool
        # at a time, never the population's weights.
        leaves = {
            name: lambda leaf=leaf: sharding.to_host(leaf)[trained]
            for name, leaf in flatten(variables).items()
        }
        if not self.primary:  # takes part in the gathers (collectives in multi-host runs)
            for gather in leaves.values():
                gather()
        else:
            arrays = dict(
                _members=members,
                _steps=steps,
                _diverged=np.asarray(diverged, bool),
                _fault_maps=np.asarray(maps, bool),
                _rows=rows,
            )
            self.bytes += _save_npz(os.path.join(self.dir, key + ".npz"), {**arrays, **leaves})
            self.index["chunks"][key] = {
                "stage": stage,
                "file": key + ".npz",
                "members": [[int(c) for c in m if c >= 0] for m in members],
                "steps": steps.tolist(),
                "rows": rows.tolist(),
            }
            files.write_json_atomic(os.path.join(self.dir, INDEX_FILE), self.index)
        self.chunks_written += 1
        self.seconds += time.perf_counter() - start

    def finish(self, served_by=None, unit_members=None) -> None:
        """Records which group serves each chip of a grouped run, and logs the store's size.

        Args:
          served_by: ``int64[chips]`` the retraining unit that serves each chip (``-1``:
            none), as ``grouping.GroupedOutcome.served_by``; None: every chip is served by
            its own per-chip retraining.
          unit_members: ``int64[U, W]`` those units' members (``retrainings.members``).
        """
        start = time.perf_counter()
        if served_by is not None:
            where = {
                (tuple(m), e["stage"]): (key, i)
                for key, e in self.index["chunks"].items()
                for i, m in enumerate(e["members"])
            }
            serving = {}
            for chip, u in enumerate(np.asarray(served_by)):
                mine = [int(c) for c in unit_members[u] if c >= 0] if u >= 0 else []
                if len(mine) > 1:  # a group (a unit of one chip is its own retraining)
                    cid = int(self.chip_ids[chip]) if self.chip_ids is not None else chip
                    serving[str(cid)] = list(where[(tuple(mine), "grouped")])
            self.index["serving"] = serving
            if self.primary:
                files.write_json_atomic(os.path.join(self.dir, INDEX_FILE), self.index)
        self.seconds += time.perf_counter() - start
        logging.info(
            "chip weights: %d chunks in %s (%d written now, %.1f MB, %.1f s writing; %d "
            "found complete)",
            len(self.index["chunks"]),
            self.dir,
            self.chunks_written,
            self.bytes / 1e6,
            self.seconds,
            self.chunks_skipped,
        )


def fingerprint(settings: dict) -> str:
    """A store's fingerprint: the SHA-256 of ``settings`` (JSON values) as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _read_index(directory: str) -> dict | None:
    path = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _clear(directory: str, index: dict | None) -> None:
    """Removes a previous store's files (those its index names, and temporary files)."""
    names = {BASELINE_FILE} | {e["file"] for e in (index or {}).get("chunks", {}).values()}
    for name in os.listdir(directory):
        if name in names or name.endswith(".tmp") or name.endswith(".npz"):
            os.remove(os.path.join(directory, name))
    if os.path.exists(os.path.join(directory, INDEX_FILE)):
        os.remove(os.path.join(directory, INDEX_FILE))


def _locate(directory: str, index: dict, chip: int) -> tuple[str, int]:
    """The (chunk, unit) whose weights serve ``chip``: its group's in a grouped run, else
    the latest complete chunk holding ``chip`` alone."""
    if str(chip) in index.get("serving", {}):
        key, unit = index["serving"][str(chip)]
        return key, int(unit)
    found = None
    for key, entry in index["chunks"].items():
        for i, m in enumerate(entry["members"]):
            if m == [chip]:
                found = (key, i)
    if found is None:
        alone = sorted({m[0] for e in index["chunks"].values() for m in e["members"] if m})
        have = f"chips {alone[0]}..{alone[-1]} ({len(alone)})" if alone else "no chips"
        raise ConfigError(f"chip {chip} is not in {directory} (it holds {have})")
    return found


def store_dir(workdir: str) -> str:
    """The store of ``workdir``; ``ConfigError`` if it has none."""
    directory = os.path.join(workdir, STORE_DIR)
    if _read_index(directory) is None:
        raise ConfigError(
            f"--workdir={workdir} has no chip weights ({directory}/{INDEX_FILE} is missing); "
            "run with --save_chip_weights"
        )
    return directory


def stored_chips(workdir: str) -> list[int]:
    """The chips whose weights ``workdir``'s store holds (each chip alone, or served by a
    group), sorted."""
    index = _read_index(store_dir(workdir))
    chips = {c for e in index["chunks"].values() for m in e["members"] for c in m}
    return sorted(chips)


def load_chip(workdir: str, chip: int) -> dict:
    """A chip's retrained variables, ready for ``model.apply``.

    Args:
      workdir: a run's directory, written with ``--save_chip_weights``.
      chip: the chip's id (its row in ``chips.csv``).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (numpy leaves; ``batch_stats`` empty for a model
      without BatchNorm): the weights that go onto the chip, every weight on a bypassed PE
      exactly zero. A chip given 0 epochs (not retrained, or a budget of 0 and no top-up) is
      the baseline with its fault map's mask applied (under ``--mitigation=fault-aware``,
      which bypasses nothing: the baseline).

    Raises:
      ConfigError: no store in ``workdir``, or ``chip`` is not in it.
    """
    directory = store_dir(workdir)
    index = _read_index(directory)
    key, unit = _locate(directory, index, int(chip))
    with np.load(os.path.join(directory, index["chunks"][key]["file"])) as z:
        row = int(z["_rows"][unit])
        if row >= 0:
            return unflatten({k: z[k][row] for k in z.files if k not in _META})
        fault_map = z["_fault_maps"][unit]
    if not index.get("bypass", True):  # fault-aware: nothing bypassed
        fault_map = np.zeros_like(fault_map)
    return masked_baseline(directory, fault_map)


def masked_baseline(directory: str, fault_map: np.ndarray) -> dict:
    """The store's baseline with ``fault_map``'s (``bool[R, C]``) mask applied."""
    from reduce_jax.engine import train  # noqa: PLC0415 (jax-heavy; only for these chips)
    from reduce_jax.hardware import systolic  # noqa: PLC0415

    with np.load(os.path.join(directory, BASELINE_FILE)) as z:
        variables = unflatten({k: z[k] for k in z.files})
    mask = systolic.weight_masks(variables["params"], fault_map)
    params = jax.tree.map(np.asarray, train.apply_mask(variables["params"], mask))
    return dict(variables, params=params)


def export_chip(workdir: str, chip: int, out: str, overwrite: bool = False) -> str:
    """Writes one chip's variables (``load_chip``) as a standalone file: ``.npz`` (flattened
    tree paths as keys) or, for any other ``out``, an orbax checkpoint directory (restore it
    with ``orbax.checkpoint.StandardCheckpointer().restore(path)``).

    Returns:
      ``out``'s absolute path.

    Raises:
      ConfigError: no store, no such chip, or ``out`` exists and not ``overwrite``.
    """
    path = os.path.abspath(out)
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"--out={out} exists; pass --overwrite or choose another path")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConfigError(f"--out={out}: {parent} is not a directory")
    variables = load_chip(workdir, chip)
    if path.endswith(".npz"):
        _save_npz(path, flatten(variables))
        return path
    import shutil  # noqa: PLC0415

    import orbax.checkpoint as ocp  # noqa: PLC0415 (keeps `import reduce_jax` light)

    if os.path.exists(path):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    # Orbax does not save an empty subtree: a model without BatchNorm has no batch_stats.
    tree = {k: v for k, v in variables.items() if v}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree)
    return path
