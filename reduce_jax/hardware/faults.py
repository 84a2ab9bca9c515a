"""Fault maps of a population of chips: sampling models, and loading/saving files.

A fault map is ``bool[R, C]`` (True = faulty PE); a population is ``bool[chips, R, C]``.
Chip ``i`` is always sampled from ``fold_in(key, i)``, so its map does not depend on how
many chips are sampled.

Fault models (``rate`` is the mean fraction of faulty PEs over the population):

- ``bernoulli``: every PE faulty independently with probability ``rate``; the textbook
  model of permanent-fault studies of systolic arrays (Zhang et al., "Analyzing and
  mitigating the impact of permanent faults on a systolic array based neural network
  accelerator", VTS 2018). Chip rates vary only binomially around ``rate``.
- ``exact``: exactly ``round(rate * R * C)`` faulty PEs, uniformly placed; every chip at
  the same rate (what a resilience analysis at a fixed rate needs).
- ``clustered``: the negative-binomial yield model (Stapper, "Modeling of defects in
  integrated circuit photolithographic patterns", IBM J. Res. Dev. 1983; Koren and Koren,
  "Defect tolerance in VLSI circuits: techniques and yield analysis", Proc. IEEE 1998):
  the chip's defect density is ``rate * Gamma(alpha) / alpha``, so chips differ in rate
  (variance ``rate^2 / alpha`` on top of the binomial; small ``alpha`` = strong
  chip-to-chip variation), and the defects sit in spatial clusters.
- ``lines``: whole rows and columns of PEs fail (a broken link or shared bus in the
  array, the line defects that spare-row/column repair targets: Kuo and Fuchs, "Efficient
  spare allocation for reconfigurable arrays", IEEE Design & Test 1987), alone
  (``line_fraction = 1``) or mixed with independent PE faults; the number of failed lines
  varies from chip to chip.
"""

from __future__ import annotations

import csv
import functools
import os
import re
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FAULT_MODELS = ("bernoulli", "exact", "clustered", "lines")

# Clustered model: defects per cluster and relative cluster radius. A cluster of defects
# on a wafer covers a few neighbouring PEs; these values give visibly clustered maps on
# 16x16 to 256x256 arrays while keeping the exact per-chip count drawn from the yield model.
_DEFECTS_PER_CLUSTER = 6.0
_CLUSTER_SIGMA = 1.5


class FaultMapError(ValueError):
    """A fault-map file or value that cannot be used; the message names it."""


def _exact_map(key: jax.Array, rows: int, cols: int, count: jax.Array) -> jax.Array:
    """``bool[R, C]`` with exactly ``count`` faulty PEs, uniformly placed."""
    scores = jax.random.uniform(key, (rows * cols,))
    rank = jnp.argsort(jnp.argsort(scores))
    return (rank < count).reshape(rows, cols)


def _clustered_map(
    key: jax.Array, rows: int, cols: int, rate: jax.Array, alpha: float
) -> jax.Array:
    """Negative-binomial yield model with spatially clustered defects.

    The chip's defect density is ``rate * Gamma(alpha) / alpha`` (mean ``rate``; small
    ``alpha`` = strong clustering between chips, large ``alpha`` -> Poisson). The faulty
    PEs are the ``count`` PEs nearest to randomly placed cluster centres.
    """
    k_density, k_centres, k_jitter = jax.random.split(key, 3)
    density = rate * jax.random.gamma(k_density, alpha) / alpha
    count = jnp.clip(jnp.round(density * rows * cols), 0, rows * cols).astype(jnp.int32)
    max_centres = max(1, int(np.ceil(rows * cols / _DEFECTS_PER_CLUSTER)))
    num_centres = jnp.maximum(1, jnp.ceil(count / _DEFECTS_PER_CLUSTER)).astype(jnp.int32)
    centres = jax.random.uniform(k_centres, (max_centres, 2)) * jnp.array([rows, cols])
    r, c = jnp.meshgrid(jnp.arange(rows) + 0.5, jnp.arange(cols) + 0.5, indexing="ij")
    d2 = (r[..., None] - centres[:, 0]) ** 2 + (c[..., None] - centres[:, 1]) ** 2
    bumps = jnp.exp(-d2 / (2 * _CLUSTER_SIGMA**2))
    bumps = jnp.where(jnp.arange(max_centres) < num_centres, bumps, 0.0)
    score = bumps.sum(-1) + 1e-3 * jax.random.uniform(k_jitter, (rows, cols))
    rank = jnp.argsort(jnp.argsort(-score.reshape(-1)))
    return (rank < count).reshape(rows, cols)


def _lines_map(
    key: jax.Array, rows: int, cols: int, rate: jax.Array, line_fraction: jax.Array
) -> jax.Array:
    """Whole failed rows and columns, optionally mixed with independent PE faults.

    A broken link or shared bus takes out a line of PEs: every row and every column fails
    independently with probability ``q``, chosen so that lines cover ``line_fraction * rate``
    of the PEs on average (``1 - (1 - q)^2 = line_fraction * rate``). The remaining PEs fail
    independently with the probability that brings the mean faulty fraction to ``rate``.
    """
    k_rows, k_cols, k_pe = jax.random.split(key, 3)
    line_cover = jnp.clip(line_fraction * rate, 0.0, 1.0)
    q = 1.0 - jnp.sqrt(1.0 - line_cover)
    failed_rows = jax.random.bernoulli(k_rows, q, (rows, 1))
    failed_cols = jax.random.bernoulli(k_cols, q, (1, cols))
    p_pe = jnp.where(
        line_cover < 1.0, 1.0 - (1.0 - rate) / jnp.maximum(1.0 - line_cover, 1e-12), 0.0
    )
    pe = jax.random.bernoulli(k_pe, jnp.clip(p_pe, 0.0, 1.0), (rows, cols))
    return failed_rows | failed_cols | pe


def sample_fault_map(
    key: jax.Array,
    rows: int,
    cols: int,
    rate: float | jax.Array,
    model: str = "bernoulli",
    alpha: float = 2.0,
    line_fraction: float | jax.Array = 1.0,
) -> jax.Array:
    """One chip's fault map.

    Args:
      key: the chip's PRNG key.
      rows, cols: array size.
      rate: fault rate in [0, 1] (mean rate for ``clustered``); may be traced.
      model: one of ``FAULT_MODELS``.
      alpha: clustering parameter of the ``clustered`` model (> 0).
      line_fraction: share of the rate due to whole failed lines in the ``lines`` model
        (1 = lines only, 0 = independent PE faults only).

    Returns:
      ``bool[rows, cols]``.
    """
    rate = jnp.asarray(rate, jnp.float32)
    if model == "bernoulli":
        return jax.random.bernoulli(key, rate, (rows, cols))
    if model == "exact":
        count = jnp.round(rate * rows * cols).astype(jnp.int32)
        return _exact_map(key, rows, cols, count)
    if model == "clustered":
        return _clustered_map(key, rows, cols, rate, alpha)
    if model == "lines":
        return _lines_map(key, rows, cols, rate, jnp.asarray(line_fraction, jnp.float32))
    raise ValueError(f"unknown fault model {model!r}; allowed: {', '.join(FAULT_MODELS)}")


def sample_fault_maps(
    key: jax.Array,
    num_chips: int,
    rows: int,
    cols: int,
    rate: float | jax.Array,
    model: str = "bernoulli",
    alpha: float = 2.0,
    first_chip: int = 0,
    line_fraction: float = 1.0,
) -> jax.Array:
    """Fault maps of ``num_chips`` chips; chip ``i`` from ``fold_in(key, first_chip + i)``.

    Args:
      key: PRNG key of the population.
      num_chips: number of chips.
      rows, cols: array size.
      rate: scalar rate, or ``float[num_chips]`` per-chip rates.
      model: one of ``FAULT_MODELS``.
      alpha: clustering parameter of the ``clustered`` model.
      first_chip: id of the first chip (to sample a slice of a larger population).
      line_fraction: share of the rate from whole failed lines (``lines`` model).

    Returns:
      ``bool[num_chips, rows, cols]``.
    """
    if model not in FAULT_MODELS:
        raise ValueError(f"unknown fault model {model!r}; allowed: {', '.join(FAULT_MODELS)}")
    rates = jnp.broadcast_to(jnp.asarray(rate, jnp.float32), (num_chips,))
    ids = first_chip + jnp.arange(num_chips)
    return _sample_many(
        key,
        ids,
        rates,
        jnp.asarray(alpha, jnp.float32),
        jnp.asarray(line_fraction, jnp.float32),
        rows,
        cols,
        model,
    )


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _sample_many(key, ids, rates, alpha, line_fraction, rows, cols, model):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    return jax.vmap(lambda k, r: sample_fault_map(k, rows, cols, r, model, alpha, line_fraction))(
        keys, rates
    )


class FaultSpec(NamedTuple):
    """A fault model on an ``rows x cols`` array (the arguments of ``sample_fault_maps``)."""

    model: str
    rows: int
    cols: int
    alpha: float = 2.0
    line_fraction: float = 1.0

    def sample(self, key: jax.Array, rates) -> np.ndarray:
        """Maps ``bool[n, R, C]`` of ``n = len(rates)`` chips, chip ``i`` at ``rates[i]`` from
        ``fold_in(key, i)``."""
        rates = np.asarray(rates, np.float64)
        maps = sample_fault_maps(
            key,
            len(rates),
            self.rows,
            self.cols,
            rates,
            self.model,
            self.alpha,
            line_fraction=self.line_fraction,
        )
        return np.asarray(maps)


# --------------------------------------------------------------------------- files


def save_fault_maps(path: str, fault_maps: np.ndarray) -> None:
    """Write ``bool[chips, R, C]`` as ``.npz`` (key ``fault_maps``) or ``.csv`` (chip,row,col)."""
    maps = np.asarray(fault_maps, bool)
    if maps.ndim != 3:
        raise FaultMapError(f"fault maps must be bool[chips, R, C], got shape {maps.shape}")
    tmp = path + ".tmp"
    if path.endswith(".npz"):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, fault_maps=maps)
    elif path.endswith(".csv"):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            f.write(f"# chips={maps.shape[0]} rows={maps.shape[1]} cols={maps.shape[2]}\n")
            w.writerow(["chip", "row", "col"])
            for chip, r, c in zip(*np.nonzero(maps), strict=True):
                w.writerow([int(chip), int(r), int(c)])
    else:
        raise FaultMapError(f"{path}: fault-map files must end in .npz or .csv")
    os.replace(tmp, path)


def _check_shape(path: str, maps: np.ndarray, rows: int | None, cols: int | None) -> None:
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise FaultMapError(
            f"{path}: expected a non-empty bool[chips, R, C] array, got shape {maps.shape}"
        )
    if (rows is not None and maps.shape[1] != rows) or (cols is not None and maps.shape[2] != cols):
        raise FaultMapError(
            f"{path}: maps are {maps.shape[1]}x{maps.shape[2]} but the array is "
            f"{rows}x{cols} (--array_rows x --array_cols)"
        )


def _load_npz(path: str, rows: int | None, cols: int | None) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "fault_maps" not in data.files:
                found = ", ".join(data.files) or "none"
                raise FaultMapError(f"{path}: no array named 'fault_maps' (found: {found})")
            raw = data["fault_maps"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, FaultMapError):
            raise
        raise FaultMapError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if raw.dtype != bool:
        if raw.dtype.kind in "iu" and raw.size and np.isin(raw, (0, 1)).all():
            raw = raw.astype(bool)
        else:
            raise FaultMapError(
                f"{path}: 'fault_maps' must be boolean (or 0/1 integers), got dtype {raw.dtype}"
            )
    _check_shape(path, raw, rows, cols)
    return raw


_CSV_FIELDS = ("chip", "row", "col")
_CSV_INTEGER = re.compile(r"[+-]?[0-9]+")
# Fast path: three integers of up to 18 digits (well inside int64), spaces allowed.
_CSV_ROW = re.compile(",".join([r"\s*([+-]?[0-9]{1,18})\s*"] * 3))


def _csv_comment(path: str, lineno: int, line: str) -> dict[str, int]:
    """``# chips=N rows=R cols=C`` -> ``{"chips": N, "rows": R, "cols": C}`` (any subset)."""
    out = {}
    for kv in line[1:].split():
        if "=" not in kv:
            continue
        name, value = kv.split("=", 1)
        if name in ("chips", "rows", "cols"):
            if not _CSV_INTEGER.fullmatch(value) or int(value) <= 0:
                raise FaultMapError(
                    f"{path}: line {lineno}: {name}={value} in the comment is not a positive "
                    "integer"
                )
            out[name] = int(value)
    return out


def _csv_row(path: str, lineno: int, line: str) -> tuple[int, int, int]:
    """One data line ``chip,row,col`` -> three integers (signs are checked later)."""
    match = _CSV_ROW.fullmatch(line)
    if match:
        chip, r, c = (int(g) for g in match.groups())
        return chip, r, c
    # Not three integers: say which part is wrong.
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != 3:
        raise FaultMapError(
            f"{path}: line {lineno}: {line!r} has {len(fields)} "
            f"field{'s' if len(fields) != 1 else ''}; expected 3 (chip,row,col)"
        )
    for name, field in zip(_CSV_FIELDS, fields, strict=True):
        if not _CSV_INTEGER.fullmatch(field):
            raise FaultMapError(
                f"{path}: line {lineno}: {name} {field!r} in {line!r} is not an integer"
            )
    chip, r, c = (int(f) for f in fields)
    for name, value in zip(_CSV_FIELDS, (chip, r, c), strict=True):
        if abs(value) >= 2**62:  # far past any array, and would overflow int64
            raise FaultMapError(f"{path}: line {lineno}: {name}={value} is out of range")
    return chip, r, c


def _check_csv_entries(
    path: str, line_of: np.ndarray, arr: np.ndarray, bounds: tuple[int | None, int, int]
) -> None:
    """Refuses the first entry (in file order) that is out of range or repeats an earlier one.

    Args:
      path: the file, for messages.
      line_of: ``int64[E]`` line number of each entry.
      arr: ``int64[E, 3]`` entries ``(chip, row, col)``.
      bounds: exclusive upper bounds of chip, row and col; ``None`` = no upper bound.
    """
    upper = np.array([b if b is not None else np.iinfo(np.int64).max for b in bounds])
    bad = (arr < 0) | (arr >= upper)
    if bad.any():
        i, field = np.argwhere(bad)[0]  # row-major: the first line, then its first bad field
        bound = bounds[field]
        allowed = f"0..{bound - 1}" if bound is not None else "0 or more"
        raise FaultMapError(
            f"{path}: line {line_of[i]}: {_CSV_FIELDS[field]}={arr[i, field]} is out of range "
            f"(allowed {allowed})"
        )
    if len(arr):
        _, first, inverse = np.unique(arr, axis=0, return_index=True, return_inverse=True)
        earlier = first[inverse.reshape(-1)]
        repeats = earlier != np.arange(len(arr))
        if repeats.any():
            j = int(np.argmax(repeats))
            chip, r, c = arr[j]
            raise FaultMapError(
                f"{path}: lines {line_of[earlier[j]]} and {line_of[j]} both list "
                f"chip={chip},row={r},col={c}; duplicate rows are refused "
                "(a concatenated or corrupted file?)"
            )


def _load_csv(path: str, rows: int | None, cols: int | None, num_chips: int | None) -> np.ndarray:
    try:
        with open(path, newline="") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FaultMapError(f"{path}: cannot read as text ({e})") from e
    declared: dict[str, int] = {}
    header_line = 0
    entries = []  # (chip, row, col)
    entry_lines = []
    for lineno, line in enumerate(lines, start=1):
        if line.startswith("#"):
            declared.update(_csv_comment(path, lineno, line))
        elif not line.strip():
            continue
        elif [h.strip() for h in line.split(",")] == list(_CSV_FIELDS):
            if header_line:
                raise FaultMapError(
                    f"{path}: line {lineno}: a second header 'chip,row,col' (the first is on "
                    f"line {header_line}); concatenated files are refused"
                )
            header_line = lineno
        elif not header_line:
            raise FaultMapError(f"{path}: line {lineno}: expected the header 'chip,row,col'")
        else:
            entries.append(_csv_row(path, lineno, line))
            entry_lines.append(lineno)
    if not header_line:
        raise FaultMapError(f"{path}: expected a header line 'chip,row,col'")
    for name, given in (("rows", rows), ("cols", cols), ("chips", num_chips)):
        if given is not None and name in declared and declared[name] != given:
            raise FaultMapError(
                f"{path}: the file declares {name}={declared[name]} but {given} was expected"
                + (" (--array_rows x --array_cols)" if name != "chips" else "")
            )
    rows = rows if rows is not None else declared.get("rows")
    cols = cols if cols is not None else declared.get("cols")
    if rows is None or cols is None:
        raise FaultMapError(f"{path}: array size unknown; pass --array_rows and --array_cols")
    # Without a chip count (argument or comment) every chip id >= 0 is allowed and the count
    # is the largest id + 1.
    known_chips = num_chips or declared.get("chips")
    arr = np.array(entries, np.int64).reshape(-1, 3)
    _check_csv_entries(path, np.array(entry_lines, np.int64), arr, (known_chips, rows, cols))
    chips = known_chips or (int(arr[:, 0].max()) + 1 if len(arr) else 0)
    if chips <= 0:
        raise FaultMapError(f"{path}: no chips in the file")
    maps = np.zeros((chips, rows, cols), bool)
    maps[arr[:, 0], arr[:, 1], arr[:, 2]] = True
    return maps


def load_fault_maps(
    path: str, rows: int | None = None, cols: int | None = None, num_chips: int | None = None
) -> np.ndarray:
    """Read and validate a fault-map file.

    Args:
      path: ``.npz`` with a ``fault_maps`` array ``bool[chips, R, C]``, or ``.csv`` with a
        header ``chip,row,col`` and one row per faulty PE (optionally preceded by a comment
        ``# chips=N rows=R cols=C``, which lets chips without faults be counted). Each row
        is three integers with ``0 <= chip < N``, ``0 <= row < R``, ``0 <= col < C``; a
        PE listed twice or a second header line is refused (a concatenated or corrupted
        file).
      rows, cols: expected array size (required for CSV files without the comment).
      num_chips: number of chips for CSV files (default: from the comment, else max chip + 1).

    Returns:
      ``bool[chips, R, C]`` (numpy).

    Raises:
      FaultMapError: one-line message naming the file (for CSV rows the line number and
        the bad value) and what was expected.
    """
    if not os.path.isfile(path):
        raise FaultMapError(f"{path}: fault-map file not found (expected .npz or .csv)")
    if path.endswith(".npz"):
        return _load_npz(path, rows, cols)
    if path.endswith(".csv"):
        maps = _load_csv(path, rows, cols, num_chips)
        _check_shape(path, maps, rows, cols)
        return maps
    raise FaultMapError(f"{path}: fault-map files must end in .npz or .csv")
