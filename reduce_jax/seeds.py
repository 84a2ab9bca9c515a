"""A study repeated over seeds: every run's headline numbers with their mean and spread.

``run_seeds(cfg, n)`` runs Reduce with seeds ``cfg.seed .. cfg.seed + n - 1`` (each seed
draws its own baseline initialisation and data order, fault maps and batch orders), each
into ``<workdir>/seed_<s>`` (so each is resumable on its own), and writes
``<workdir>/seeds.json``: for every metric of ``METRICS``, the values per seed, their mean
and their standard deviation (``ddof=1``; None for a single seed or a missing value).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from reduce_jax import files
from reduce_jax.config import ReduceConfig

# Paths into summary.json ("policies.*" expands to every policy the runs have).
METRICS = (
    "baseline_accuracy",
    "baseline_test_accuracy",
    "cost.reduce_epochs",
    "cost.savings_fraction",
    "cost.chips_meeting_target",
    "cost.chips_meeting_target_test",
    "cost.grouped_epochs",
    "cost.grouped_chips_meeting_target",
    "policies.*.train_epochs",
    "policies.*.compute_epochs",
    "policies.*.chips_meeting_target",
    "policies.*.chips_meeting_target_test",
    "policies.break_even_vs_cheapest",
    "policies.break_even_vs_fixed",
    "policies.break_even_vs_adaptive",
    "predictor_study.reduce_over_oracle",
    "predictor_study.reduce_missed",
)


def _get(summary: dict, path: str):
    node = summary
    for key in path.split("."):
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return node


def _paths(summaries: list[dict]) -> list[str]:
    """``METRICS`` with ``policies.*`` expanded to the policies of the runs."""
    names = []
    for s in summaries:
        names += [k for k, v in (s.get("policies") or {}).items() if isinstance(v, dict)]
    names = list(dict.fromkeys(names))
    out = []
    for m in METRICS:
        if "*" not in m:
            out.append(m)
            continue
        # The analysis is a cost, not a policy: it serves no chips.
        shown = [n for n in names if n != "analysis" or "chips" not in m]
        out += [m.replace("*", n) for n in shown]
    return out


def spread(values: list[float | None]) -> dict:
    """``{"values", "mean", "std"}`` of one metric over seeds (None where a run has none:
    then the mean and std are over the others; None if fewer than 1 / 2 remain)."""
    present = np.array([v for v in values if v is not None], np.float64)
    return dict(
        values=values,
        mean=float(present.mean()) if len(present) else None,
        std=float(present.std(ddof=1)) if len(present) > 1 else None,
    )


def aggregate(summaries: list[dict]) -> dict:
    """Every metric of ``METRICS`` over the runs' ``summary.json`` dicts (``spread``)."""
    return {p: spread([_get(s, p) for s in summaries]) for p in _paths(summaries)}


def table(metrics: dict) -> str:
    """The aggregate as text, one metric a line: ``name  mean +- std  (values)``."""
    width = max(len(k) for k in metrics)
    lines = []
    for name, m in metrics.items():
        if m["mean"] is None:
            continue
        std = f" +- {m['std']:.4g}" if m["std"] is not None else ""
        values = ", ".join("-" if v is None else f"{v:.4g}" for v in m["values"])
        lines.append(f"{name:<{width}}  {m['mean']:.4g}{std}  ({values})")
    return "\n".join(lines)


def run_seeds(cfg: ReduceConfig, n: int, overwrite: bool = False) -> dict:
    """Runs the study for ``n`` seeds from ``cfg.seed`` and writes ``seeds.json``.

    Returns:
      ``{"seeds", "workdirs", "metrics"}`` (what ``seeds.json`` holds).
    """
    from reduce_jax import pipeline  # the runs' heavy imports, only when they run

    if n < 1:
        raise ValueError(f"--seeds={n} must be >= 1")
    seeds = [cfg.seed + i for i in range(n)]
    workdirs = [os.path.join(cfg.workdir, f"seed_{s}") for s in seeds]
    summaries = []
    for s, w in zip(seeds, workdirs, strict=True):
        logging.info("seed %d (%d of %d) in %s", s, len(summaries) + 1, n, w)
        run = pipeline.run(dataclasses.replace(cfg, seed=s, workdir=w), overwrite=overwrite)
        summaries.append(run.to_json())
    out = dict(seeds=seeds, workdirs=workdirs, metrics=aggregate(summaries))
    files.write_json_atomic(os.path.join(cfg.workdir, "seeds.json"), out)
    return out
