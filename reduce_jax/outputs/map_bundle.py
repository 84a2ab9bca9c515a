"""A study's map bundle: everything needed to serve a new chip without the analysis.

A study writes ``<workdir>/map/`` (``save_map``); ``load_map`` reads it back as a typed
``MapBundle``. The bundle holds the baseline variables (orbax), the resilience map (grid,
required amounts, statistic, interpolation, rate measure and the per-PE weights the measure
needs), the array shape, the decision and test targets, the retraining recipe, how the
validation split was drawn, and a ``Fingerprint`` of the model structure, the baseline
weights, the data and the validation split, so a bundle is checked before it is reused
(``check_fingerprint``).

On disk::

    map/bundle.json   version, targets, recipe, split, fingerprint, the study's settings
    map/map.npz       the resilience map's arrays and the (rate, need) observations
    map/variables/    the baseline's {"params", "batch_stats"} (orbax)

``bundle.json`` is written last (atomically) and removed first when a bundle is replaced,
so a directory with it is a complete bundle. The map is a value: ``MapBundle.observe``
returns the bundle with more measured (rate, need) pairs, ``MapBundle.with_map`` with a
refined map; ``save_map`` writes either back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from reduce_jax import files
from reduce_jax.config import ReduceConfig
from reduce_jax.data import Dataset
from reduce_jax.errors import ConfigError
from reduce_jax.stages import online, resilience, retraining

PyTree = Any

MAP_DIR = "map"  # in a study's workdir
FORMAT = "reduce_jax map bundle"
VERSION = 1
_JSON, _ARRAYS, _VARIABLES = "bundle.json", "map.npz", "variables"


class Recipe(NamedTuple):
    """How a chip is retrained and topped up (the study's settings, resolved).

    Attributes:
      optimizer, learning_rate, weight_decay: the retraining optimizer
        (``train.make_optimizer``).
      batch_size: training batch; eval_batch_size: evaluation batch.
      augment: training batches are augmented (``--augment`` resolved for the dataset).
      steps_per_epoch: steps of one epoch of the training split.
      topup_epochs, max_topup_epochs: top-up increment and cap (epochs).
      topup_steps, max_topup_steps: the same in steps.
      seed: the study's seed: the retraining's batch order is its ``retrain`` stream.
    """

    optimizer: str
    learning_rate: float
    weight_decay: float
    batch_size: int
    eval_batch_size: int
    augment: bool
    steps_per_epoch: int
    topup_epochs: float
    max_topup_epochs: float
    topup_steps: int
    max_topup_steps: int
    seed: int


class Split(NamedTuple):
    """How the validation split was drawn.

    Attributes:
      kind: ``held_out`` (``fraction`` of the training set, stratified, ``random_state``
        fixed: ``data.split_validation``) or ``given`` (the dataset's own).
      fraction: the share held out (None for ``given``).
      train_examples, val_examples: the sizes of the training and validation splits.
    """

    kind: str
    fraction: float | None
    train_examples: int
    val_examples: int


class Fingerprint(NamedTuple):
    """What a bundle belongs to.

    Attributes:
      model: sha256 of ``structure``.
      structure: ``(path, shape, dtype)`` of every variable of the model (params and
        BatchNorm statistics), in tree order.
      weights: sha256 of the baseline variables (dtype, shape and bytes of every leaf).
      data: sha256 of the training and test arrays (after the validation split is drawn).
      split: sha256 of the validation split's arrays.
    """

    model: str
    structure: tuple[tuple[str, tuple[int, ...], str], ...]
    weights: str
    data: str
    split: str

    @property
    def key(self) -> str:
        """One sha256 of all parts (keys the progress of chips retrained from the bundle)."""
        text = "|".join((self.model, self.weights, self.data, self.split))
        return hashlib.sha256(text.encode()).hexdigest()


def hardware_settings(study: dict) -> dict:
    """The settings of a study (``ReduceConfig.as_dict``) that make its chips' hardware, where
    they are not the defaults: ``arithmetic``, ``mitigation``, and for fault-aware chips the
    stuck-bit mix and the seed that draws the bits (``{}`` for float32 bypass)."""
    out = {}
    if study.get("arithmetic", "float32") != "float32":
        out["arithmetic"] = study["arithmetic"]
    if study.get("mitigation", "bypass") != "bypass":
        keep = ("mitigation", "stuck_site_probs", "stuck_p_one", "stuck_bits", "seed")
        out.update({k: study[k] for k in keep if k in study})
    return out


class MapBundle(NamedTuple):
    """A study's map and what it takes to use it on new chips.

    Attributes:
      version: the bundle format's version (``VERSION``).
      variables: the baseline's ``{"params", "batch_stats"}`` (numpy).
      rmap: the resilience map (``resilience.ResilienceMap``).
      array_shape: ``(R, C)`` of the systolic array.
      decision_target: what decisions on the validation split require (the target plus
        ``validation_margin``); test_target: what the test set is judged against.
      validation_margin: the margin between them.
      recipe: the retraining recipe; split: how the validation split was drawn.
      fingerprint: model structure, weights, data and split.
      model_id, dataset_id: the study's model and data (``inputs.Inputs``).
      fixed_epochs: per-chip amount of the fixed policy the study compared with.
      analysis_epochs: what the study's analysis cost (paid once).
      study: the study's settings (``ReduceConfig.as_dict``): they rebuild its model and data.
      observations: (rate, need) pairs measured since the study (the online map's input,
        ``stages.online``).
    """

    version: int
    variables: PyTree
    rmap: resilience.ResilienceMap
    array_shape: tuple[int, int]
    decision_target: float
    test_target: float
    validation_margin: float
    recipe: Recipe
    split: Split
    fingerprint: Fingerprint
    model_id: str
    dataset_id: str
    fixed_epochs: float
    analysis_epochs: float
    study: dict
    observations: online.Observations

    @property
    def key(self) -> str:
        """What chips served from the bundle depend on besides their maps: the fingerprint and
        the chips' hardware (``hardware_settings``). It keys a production workdir's ledger,
        resume and chip store, so chips of studies on other hardware never mix there; a float32
        bypass study's is its fingerprint's key."""
        hardware = hardware_settings(self.study)
        if not hardware:
            return self.fingerprint.key
        text = self.fingerprint.key + "|" + json.dumps(hardware, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def observe(self, rates, needed_steps) -> MapBundle:
        """The bundle with the pairs ``rates float[n]``, ``needed_steps float[n]`` added."""
        return self._replace(observations=self.observations.add(rates, needed_steps))

    def with_map(self, rmap: resilience.ResilienceMap) -> MapBundle:
        """The bundle with a refined map (same grid rates and measure)."""
        old = self.rmap
        if rmap.rate_measure != old.rate_measure or rmap.measured_rates.shape != (
            old.measured_rates.shape
        ):
            raise ValueError("a refined map keeps the bundle's rate measure and grid")
        return self._replace(rmap=rmap)


# Fingerprints ------------------------------------------------------------------------------


def _path(path: tuple) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def structure(variables: PyTree) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """``(path, shape, dtype)`` of every leaf of ``variables`` (arrays or
    ``ShapeDtypeStruct``), in tree order."""
    return tuple(
        (_path(p), tuple(int(d) for d in np.shape(x)), str(np.dtype(x.dtype)))
        for p, x in jax.tree.leaves_with_path(variables)
    )


def arrays_sha256(arrays) -> str:
    """sha256 of the dtype, shape and bytes of every array, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def fingerprint(abstract: PyTree, variables: PyTree, dataset: Dataset) -> Fingerprint:
    """The fingerprint of a model (its variables' ``abstract`` tree), its baseline
    ``variables`` and a ``dataset`` with its validation split."""
    struct = structure(abstract)
    data = (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels)
    return Fingerprint(
        model=hashlib.sha256(json.dumps(struct).encode()).hexdigest(),
        structure=struct,
        weights=arrays_sha256(jax.tree.leaves(variables)),
        data=arrays_sha256(data),
        split=arrays_sha256((dataset.val_images, dataset.val_labels)),
    )


def check_fingerprint(bundle: MapBundle, found: Fingerprint, where: dict[str, str]) -> None:
    """Refuses a model, weights, data or validation split that is not the bundle's.

    Args:
      bundle: the bundle; found: the fingerprint of what was given.
      where: part -> how it was given (``model``, ``weights``, ``data``, ``split``), for
        the message.

    Raises:
      ConfigError: one line naming the part that differs (the model: its first variable
        that differs).
    """
    mine = bundle.fingerprint
    if mine.model != found.model:
        have = {p: (s, d) for p, s, d in found.structure}
        need = {p: (s, d) for p, s, d in mine.structure}
        what = next(
            (
                f"variable {p} is {list(need[p][0])} {need[p][1]} in the map but "
                + (f"{list(have[p][0])} {have[p][1]}" if p in have else "missing")
                for p in need
                if have.get(p) != need[p]
            ),
            next((f"variable {p} is not in the map's model" for p in have if p not in need), ""),
        )
        raise ConfigError(f"{where['model']} is not the map's model ({bundle.model_id}): {what}")
    for part, name in (("weights", "baseline weights"), ("split", "validation split")):
        if getattr(mine, part) != getattr(found, part):
            raise ConfigError(
                f"{where[part]}: the {name} differ from the map's (sha256 "
                f"{getattr(found, part)[:12]} against {getattr(mine, part)[:12]})"
            )
    if mine.data != found.data:
        raise ConfigError(
            f"{where['data']}: the training and test data differ from the map's "
            f"({bundle.dataset_id}; sha256 {found.data[:12]} against {mine.data[:12]})"
        )


# The bundle of a study ---------------------------------------------------------------------


def of_study(
    cfg: ReduceConfig,
    rmap: resilience.ResilienceMap,
    variables: PyTree,
    abstract: PyTree,
    dataset: Dataset,
    *,
    policy: retraining.Verification,
    steps_per_epoch: int,
    fixed_epochs: float,
    analysis_epochs: float,
    augment: bool,
    validation_split: str,
    model_id: str,
    dataset_id: str,
) -> MapBundle:
    """A study's bundle, from its settings, map, baseline and data (``pipeline.run``).

    Args:
      cfg: the study's settings; rmap: its map; variables: its baseline.
      abstract: the model's variables, ``ShapeDtypeStruct`` leaves.
      dataset: the data with its validation split.
      policy: the study's targets and top-ups (in steps).
      steps_per_epoch: steps of one epoch; augment: ``--augment`` resolved.
      fixed_epochs: the fixed policy's per-chip amount; analysis_epochs: the analysis's
        cost (both as in the study's cost summary).
      validation_split: ``held_out`` or ``given``; model_id, dataset_id: as ``Inputs``.
    """
    variables = jax.tree.map(np.asarray, variables)
    spe = int(steps_per_epoch)
    recipe = Recipe(
        optimizer=cfg.optimizer,
        learning_rate=float(cfg.learning_rate),
        weight_decay=float(cfg.weight_decay),
        batch_size=int(cfg.batch_size),
        eval_batch_size=int(cfg.eval_batch_size),
        augment=bool(augment),
        steps_per_epoch=spe,
        topup_epochs=float(cfg.topup_epochs),
        max_topup_epochs=float(cfg.max_topup_epochs),
        topup_steps=int(policy.topup_steps),
        max_topup_steps=int(policy.max_topup_steps),
        seed=int(cfg.seed),
    )
    held = validation_split == "held_out"
    split = Split(
        kind=validation_split,
        fraction=float(cfg.validation_fraction) if held else None,
        train_examples=len(dataset.train_labels),
        val_examples=len(dataset.val_labels),
    )
    return MapBundle(
        version=VERSION,
        variables=variables,
        rmap=rmap,
        array_shape=(int(cfg.array_rows), int(cfg.array_cols)),
        decision_target=float(policy.decision_target),
        test_target=float(policy.test_target),
        validation_margin=float(cfg.validation_margin),
        recipe=recipe,
        split=split,
        fingerprint=fingerprint(abstract, variables, dataset),
        model_id=model_id,
        dataset_id=dataset_id,
        fixed_epochs=float(fixed_epochs),
        analysis_epochs=float(analysis_epochs),
        study=cfg.as_dict(),
        observations=online.Observations.empty(),
    )


# Disk --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs every save and restore at INFO; keep the run's log readable."""
    level = logging.get_verbosity()
    logging.set_verbosity(min(level, logging.WARNING))
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _checkpointer() -> ocp.StandardCheckpointer:
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


_MAP_ARRAYS = (
    "required_epochs",
    "required_steps",
    "statistic_accuracy",
    "amount_epochs",
    "amount_steps",
)


def save_map(path: str, bundle: MapBundle) -> None:
    """Writes ``bundle`` into the directory ``path`` (created; a bundle there is replaced).

    ``bundle.json`` is removed first and written last, atomically: a kill in between leaves
    a directory that ``load_map`` refuses, never a bundle that mixes two versions.
    """
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    meta = os.path.join(path, _JSON)
    if os.path.exists(meta):
        os.remove(meta)
    ckpt_dir = os.path.join(path, _VARIABLES)
    if os.path.exists(ckpt_dir):
        shutil.rmtree(ckpt_dir)
    with _quiet_orbax(), _checkpointer() as ckpt:
        # Without its empty collections (a model without BatchNorm): orbax restores a tree
        # only into the structure it saved, and ``_restore`` builds that from the leaves.
        ckpt.save(ckpt_dir, {k: v for k, v in bundle.variables.items() if jax.tree.leaves(v)})
        ckpt.wait_until_finished()
    rmap = bundle.rmap
    arrays = {name: np.asarray(getattr(rmap, name)) for name in _MAP_ARRAYS}
    arrays.update({f"weights/{m}": np.asarray(w) for m, w in rmap.weights.items()})
    arrays.update({f"grid_rates/{m}": np.asarray(r) for m, r in rmap.grid_rates.items()})
    arrays.update(
        observed_rates=bundle.observations.rates,
        observed_needed_steps=bundle.observations.needed_steps,
    )

    def write(f):
        np.savez(f, **arrays)

    files.replace_atomic(os.path.join(path, _ARRAYS), write, binary=True)
    fp = bundle.fingerprint
    files.write_json_atomic(
        meta,
        dict(
            format=FORMAT,
            version=bundle.version,
            array_shape=list(bundle.array_shape),
            decision_target=bundle.decision_target,
            test_target=bundle.test_target,
            validation_margin=bundle.validation_margin,
            rate_measure=rmap.rate_measure,
            statistic=rmap.statistic,
            interpolation=rmap.interpolation,
            recipe=bundle.recipe._asdict(),
            split=bundle.split._asdict(),
            fingerprint=dict(fp._asdict(), structure=[[p, list(s), d] for p, s, d in fp.structure]),
            model_id=bundle.model_id,
            dataset_id=bundle.dataset_id,
            fixed_epochs=bundle.fixed_epochs,
            analysis_epochs=bundle.analysis_epochs,
            study=bundle.study,
        ),
    )


def load_map(path: str) -> MapBundle:
    """The bundle in the directory ``path`` (a study's ``<workdir>/map``, or the workdir).

    Raises:
      ConfigError: one line naming ``path``: no bundle there, an unfinished one, a newer
        format version, a missing or unreadable part (``map.npz``, one of its arrays or a
        field), or baseline weights that do not match the bundle's checksum.
    """
    if os.path.isfile(os.path.join(path, MAP_DIR, _JSON)):
        path = os.path.join(path, MAP_DIR)
    meta_path = os.path.join(path, _JSON)
    if not os.path.isfile(meta_path):
        raise ConfigError(
            f"{path}: no map bundle ({_JSON} missing); give a study's <workdir>/{MAP_DIR} "
            "(studies write it since the bundle's first version; rerun the study to write it)"
        )
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{meta_path}: not a map bundle (format {meta.get('format')!r})")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise ConfigError(
            f"{meta_path}: bundle version {meta.get('version')!r}; this reduce_jax reads "
            f"versions up to {VERSION}"
        )
    try:
        fp = meta["fingerprint"]
        structure = tuple((p, tuple(s), d) for p, s, d in fp["structure"])
        fp = Fingerprint(**dict(fp, structure=structure))
        with np.load(os.path.join(path, _ARRAYS), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        by = lambda prefix: {  # noqa: E731
            k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(prefix + "/")
        }
        rmap = resilience.ResilienceMap(
            weights=by("weights"),
            grid_rates=by("grid_rates"),
            rate_measure=meta["rate_measure"],
            **{name: arrays[name] for name in _MAP_ARRAYS},
            statistic=meta["statistic"],
            interpolation=meta["interpolation"],
        )
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise _damaged(path, e) from None
    variables = _restore(os.path.abspath(os.path.join(path, _VARIABLES)), fp.structure)
    if arrays_sha256(jax.tree.leaves(variables)) != fp.weights:
        raise ConfigError(
            f"{path}/{_VARIABLES}: the baseline weights do not match the bundle's checksum "
            "(a damaged or replaced checkpoint)"
        )
    try:
        return MapBundle(
            version=meta["version"],
            variables=variables,
            rmap=rmap,
            array_shape=tuple(meta["array_shape"]),
            decision_target=meta["decision_target"],
            test_target=meta["test_target"],
            validation_margin=meta["validation_margin"],
            recipe=Recipe(**meta["recipe"]),
            split=Split(**meta["split"]),
            fingerprint=fp,
            model_id=meta["model_id"],
            dataset_id=meta["dataset_id"],
            fixed_epochs=meta["fixed_epochs"],
            analysis_epochs=meta["analysis_epochs"],
            study=meta["study"],
            observations=online.Observations(
                arrays["observed_rates"], arrays["observed_needed_steps"]
            ),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise _damaged(path, e) from None


def _damaged(path: str, e: Exception) -> ConfigError:
    """A bundle with a part missing or unreadable (a missing file, key or field)."""
    return ConfigError(
        f"{path}: a damaged map bundle ({type(e).__name__}: {e}); rerun the study to write it again"
    )


def _restore(ckpt_dir: str, struct) -> dict:
    """The variables ``{"params", "batch_stats"}`` (numpy) of the bundle's structure."""
    tree: dict = {}
    for path, shape, dtype in struct:
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.zeros(shape, dtype)
    try:
        with _quiet_orbax():
            restored = _checkpointer().restore(ckpt_dir, tree)
    except Exception as e:  # a missing or damaged checkpoint
        raise ConfigError(f"{ckpt_dir}: cannot restore ({type(e).__name__})") from None
    restored = jax.tree.map(np.asarray, restored)
    return {"batch_stats": {}, **restored}
