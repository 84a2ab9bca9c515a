"""Stuck-at bits inside the PEs of the int8 array: their effect, sampling and files.

A fault is ``(row, col, site, bit, value)``: in PE ``(row, col)`` the bit ``bit`` of a
register is stuck at ``value`` (0 or 1), whatever is written to it. The sites:

- ``weight`` (8 bits): the PE's weight register. Every int8 weight mapped to the PE
  (``W[k, n]`` with ``k mod R = row``, ``n mod C = col``, in every tile and layer) has the
  bit forced, in two's complement (bit 7 is the sign).
- ``product`` (16 bits): the multiplier's output. An int8 x int8 product fits a 16-bit
  two's-complement register (``|x * w| <= 2**14``), which the adder sign-extends to 32 bits;
  the bit is forced in that 16-bit register (bit 15 is the sign) for every product the PE
  computes.
- ``psum`` (32 bits): the partial sum the PE passes down its column, an int32. In a tile,
  the partial sum of column ``c`` enters row 0 as 0, and PE ``(r, c)`` passes down
  ``s_r = s_{r-1} + p_r``; a psum fault at ``(r, c)`` forces the bit of ``s_r`` (the sum of
  rows ``0..r``), and rows ``r+1..`` add their products to the forced value. Several
  faulty rows of a column act in row order. Tiles along ``K`` are added in int32 outside
  the array (a fault-free accumulator), so a psum fault corrupts every tile's partial sum
  of every output its column computes. Every adder wraps (two's complement).

The unused rows of an edge tile (``K`` not a multiple of ``R``) hold a zero weight and see a
zero input; their products (0, unless a product bit is stuck at 1) and psum registers are
still on the column's path, as in an array whose partial sums always leave at its last row.

A chip's faults are dense bit masks, ``StuckAt(and_mask, or_mask)``, ``int32[3, R, C]``
each (site axis in the order of ``SITES``): a register ``v`` of site ``s`` in PE ``(r, c)``
reads ``(v & and_mask[s, r, c]) | or_mask[s, r, c]``, sign-extended from the site's width.
A fault-free PE has ``and = -1``, ``or = 0``. A population carries a leading ``chips`` axis
and is ``vmap``-ped over it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from reduce_jax.errors import ConfigError
from reduce_jax.hardware import quant
from reduce_jax.hardware.faults import FaultMapError

SITES = ("weight", "product", "psum")
SITE_BITS = (8, 16, 32)  # register width of each site
WEIGHT, PRODUCT, PSUM = range(3)
BIT_DISTRIBUTIONS = ("uniform", "high", "msb")
CSV_FIELDS = ("chip", "row", "col", "site", "bit", "value")


class StuckAtError(FaultMapError):
    """A stuck-at fault file or value that cannot be used; the one-line message names it."""


class StuckAt(NamedTuple):
    """A chip's stuck-at faults as bit masks (a pytree; a population adds a leading axis).

    Attributes:
      and_mask: ``int32[..., 3, R, C]``: bits stuck at 0 are cleared (``-1`` = none).
      or_mask: ``int32[..., 3, R, C]``: bits stuck at 1 are set (``0`` = none).
    """

    and_mask: jax.Array
    or_mask: jax.Array


def no_faults(rows: int, cols: int) -> StuckAt:
    """A fault-free chip: ``StuckAt`` of ``int32[3, R, C]`` identity masks (numpy)."""
    shape = (len(SITES), rows, cols)
    return StuckAt(np.full(shape, -1, np.int32), np.zeros(shape, np.int32))


def faulty_pes(faults: StuckAt) -> jax.Array:
    """``bool[..., R, C]``: PEs with any stuck bit at any site (the map ``bypass`` removes)."""
    bad = (faults.and_mask != -1) | (faults.or_mask != 0)
    return jnp.any(bad, axis=-3)


def force_bits(v: jax.Array, and_mask: jax.Array, or_mask: jax.Array, width: int) -> jax.Array:
    """``int32``: ``(v & and) | or`` read as a ``width``-bit two's-complement register.

    ``v`` holds a ``width``-bit value sign-extended to int32; the result is sign-extended from
    bit ``width - 1`` again (so forcing the sign bit of an int8 weight gives a negative
    int8). Masks broadcast against ``v``.
    """
    f = (v.astype(jnp.int32) & and_mask) | or_mask
    if width >= 32:
        return f
    sign = 1 << (width - 1)
    return ((f & ((1 << width) - 1)) ^ sign) - sign


def _check_sites(sites: Sequence[str]) -> frozenset[str]:
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"unknown fault site {bad[0]!r}; allowed: {', '.join(SITES)}")
    return frozenset(sites)


def stuck_weights(w_q: jax.Array, faults: StuckAt) -> jax.Array:
    """``int8[K, N]``: a kernel matrix as the faulty weight registers hold it.

    Args:
      w_q: ``int8[K, N]``; faults: one chip's ``StuckAt`` (``[3, R, C]``).
    """
    rows, cols = faults.and_mask.shape[-2:]
    pe_row, pe_col = np.arange(w_q.shape[0]) % rows, np.arange(w_q.shape[1]) % cols
    a = faults.and_mask[WEIGHT][pe_row[:, None], pe_col[None, :]]
    o = faults.or_mask[WEIGHT][pe_row[:, None], pe_col[None, :]]
    return force_bits(w_q, a, o, SITE_BITS[WEIGHT]).astype(quant.INT_DTYPE)


def stuck_at_matmul(
    x_q: jax.Array, w_q: jax.Array, faults: StuckAt, sites: Sequence[str] = SITES
) -> jax.Array:
    """The integer product ``x_q @ w_q`` as a chip with stuck-at faults computes it, exactly.

    Weight faults force the weights, then (without product or psum faults) the product is
    ``quant.int_matmul``. With product or psum faults, each tile's column sums are computed
    row by row as the array does (a ``lax.scan`` over the ``R`` rows, vectorised over the
    batch, the tiles and the columns): product of row ``r``, forced; added to the sum of
    rows ``0..r-1``; the sum forced. The tiles' sums are then added in int32.

    Args:
      x_q: ``int8[B, K]``.
      w_q: ``int8[K, N]`` (a kernel's matrix view; ``K``, ``N`` need not be multiples of R, C).
      faults: one chip's ``StuckAt`` (``int32[3, R, C]`` each); ``vmap`` for a population.
      sites: the sites to simulate (static); faults at other sites are ignored. Leaving out
        ``product`` and ``psum`` when no chip has them keeps the fast matrix product.

    Returns:
      ``int32[B, N]``; equals ``quant.int_matmul`` for a fault-free chip.
    """
    sites = _check_sites(sites)
    rows, cols = faults.and_mask.shape[-2:]
    if "weight" in sites:
        w_q = stuck_weights(w_q, faults)
    if not sites & {"product", "psum"}:
        return quant.int_matmul(x_q, w_q, (rows, cols))
    x, w = quant.tile_operands(x_q, w_q, rows)  # [B, T, R], [T, R, N]
    col = np.arange(w_q.shape[1]) % cols
    # Row-major inputs; the carry is [T, N, B], the batch last (the long, vectorised axis).
    masks = tuple(m[site][:, col, None] for site in (PRODUCT, PSUM) for m in faults)  # [R, N, 1]

    def row_step(s, inputs):
        x_r, w_r, p_and, p_or, s_and, s_or = inputs  # [T, 1, B], [T, N, 1], 4 x [N, 1]
        p = x_r.astype(jnp.int32) * w_r.astype(jnp.int32)
        if "product" in sites:
            p = force_bits(p, p_and, p_or, SITE_BITS[PRODUCT])
        s = s + p
        if "psum" in sites:
            s = force_bits(s, s_and, s_or, SITE_BITS[PSUM])
        return s, None

    s0 = jnp.zeros((x.shape[1], w.shape[-1], x.shape[0]), jnp.int32)
    xs = jnp.transpose(x, (2, 1, 0))[:, :, None, :]  # [R, T, 1, B]
    ws = jnp.moveaxis(w, 1, 0)[..., None]  # [R, T, N, 1]
    s, _ = lax.scan(row_step, s0, (xs, ws, *masks))
    return jnp.sum(s, axis=0, dtype=jnp.int32).T


# ------------------------------------------------------------------------------ sampling


class StuckAtMix(NamedTuple):
    """What a faulty PE's stuck bit is: site mix, polarity, bit position.

    Attributes:
      site_probs: probabilities of ``weight``, ``product``, ``psum`` (sum 1).
      p_one: probability that the bit is stuck at 1 (else at 0).
      bits: ``uniform`` over the site's width, ``high`` (bit ``b`` with probability
        proportional to ``b + 1``: weighted to the high bits), or ``msb`` (the sign bit).
    """

    site_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    p_one: float = 0.5
    bits: str = "uniform"

    def validate(self) -> None:
        """Raises ``ConfigError`` with a one-line message for an invalid mix."""
        probs = tuple(float(p) for p in self.site_probs)
        if len(probs) != len(SITES) or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
            raise ConfigError(
                f"site mix {list(probs)} must be {len(SITES)} non-negative probabilities of "
                f"{', '.join(SITES)} summing to 1"
            )
        if not 0.0 <= float(self.p_one) <= 1.0:
            raise ConfigError(f"stuck-at-1 probability {self.p_one} is out of range [0, 1]")
        if self.bits not in BIT_DISTRIBUTIONS:
            raise ConfigError(
                f"bit distribution {self.bits!r} is not one of {', '.join(BIT_DISTRIBUTIONS)}"
            )


DEFAULT_MIX = StuckAtMix()


def bit_probs(width: int, bits: str) -> np.ndarray:
    """``float64[width]``: the probability of each bit position (``StuckAtMix.bits``)."""
    if bits == "uniform":
        p = np.ones(width)
    elif bits == "high":
        p = np.arange(1, width + 1, dtype=np.float64)
    elif bits == "msb":
        p = np.zeros(width)
        p[-1] = 1.0
    else:
        raise ConfigError(f"bit distribution {bits!r} is not one of {', '.join(BIT_DISTRIBUTIONS)}")
    return p / p.sum()


def _thresholds(p: np.ndarray, size: int) -> np.ndarray:
    """``float32[size]``: category ``i`` is drawn from ``u ~ U[0, 1)`` as the number of
    thresholds ``<= u``. The cumulative probabilities, with 2 (never reached) wherever no
    probability is left, so a category of probability 0 is never drawn, whatever the
    rounding."""
    p = np.asarray(p, np.float64)
    cdf = np.full(size, 2.0)
    left = p[::-1].cumsum()[::-1]  # probability of categories i..end
    for i in range(len(p) - 1):
        if left[i + 1] > 0:
            cdf[i] = p[: i + 1].sum()
    return cdf.astype(np.float32)


def _mix_arrays(mix: StuckAtMix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mix as arrays (traced, so one compilation serves every mix): site thresholds
    ``float32[3]``, ``p_one float32[]``, bit thresholds ``float32[3, 32]``."""
    bits = np.stack([_thresholds(bit_probs(w, mix.bits), 32) for w in SITE_BITS])
    return _thresholds(mix.site_probs, 3), np.float32(mix.p_one), bits


def _draw(key: jax.Array, thresholds: jax.Array, shape) -> jax.Array:
    u = jax.random.uniform(key, shape)
    return jnp.sum(u[..., None] >= thresholds, axis=-1).astype(jnp.int32)


def sample_chip(key: jax.Array, fault_map: jax.Array, mix: StuckAtMix) -> StuckAt:
    """One stuck bit in each faulty PE of a chip.

    Args:
      key: the chip's PRNG key.
      fault_map: ``bool[R, C]``, True at the faulty PEs (``faults.sample_fault_map`` or a file).
      mix: site, polarity and bit distributions.

    Returns:
      ``StuckAt`` of ``int32[3, R, C]``; ``faulty_pes`` of it is ``fault_map``.
    """
    return _sample_chip(key, jnp.asarray(fault_map, bool), *_mix_arrays(mix))


def _sample_chip(key, fault_map, site_thresholds, p_one, bit_thresholds) -> StuckAt:
    shape = fault_map.shape
    k_site, k_value, k_bit = jax.random.split(key, 3)
    site = _draw(k_site, site_thresholds, shape)
    one = jax.random.bernoulli(k_value, p_one, shape)
    ands, ors = [], []
    for s in range(len(SITES)):
        bit = _draw(jax.random.fold_in(k_bit, s), bit_thresholds[s], shape)
        mask = jnp.left_shift(jnp.int32(1), bit)
        here = fault_map & (site == s)
        ands.append(jnp.where(here & ~one, ~mask, -1))
        ors.append(jnp.where(here & one, mask, 0))
    return StuckAt(jnp.stack(ands).astype(jnp.int32), jnp.stack(ors).astype(jnp.int32))


def sample_stuck_at(
    key: jax.Array, fault_maps: jax.Array, mix: StuckAtMix = DEFAULT_MIX, first_chip: int = 0
) -> StuckAt:
    """Stuck bits for a population's faulty PEs; chip ``i`` from ``fold_in(key, first_chip+i)``.

    The faulty PEs come from any fault model or file (``faults.sample_fault_maps``), so the
    PE rate and spatial model are today's; this draws what is stuck in each faulty PE. Use a
    key of its own (not the maps' key) so the maps stay those the float32 study samples.

    Args:
      key: PRNG key of the population's stuck bits.
      fault_maps: ``bool[chips, R, C]``.
      mix: a ``StuckAtMix`` (validated here).
      first_chip: id of the first chip (a slice of a larger population).

    Returns:
      ``StuckAt`` of ``int32[chips, 3, R, C]``.
    """
    mix.validate()
    ids = first_chip + jnp.arange(fault_maps.shape[0])
    return _sample_many(key, ids, jnp.asarray(fault_maps, bool), *_mix_arrays(mix))


@jax.jit
def _sample_many(key, ids, fault_maps, site_thresholds, p_one, bit_thresholds):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    return jax.vmap(lambda k, m: _sample_chip(k, m, site_thresholds, p_one, bit_thresholds))(
        keys, fault_maps
    )


def map_fingerprint(key: jax.Array, fault_map: jax.Array) -> jax.Array:
    """``uint32[]``: a hash of a PE map, the sum of one random 32-bit word of ``key`` per
    faulty PE, wrapping (two different maps collide with probability ``2**-32``)."""
    fault_map = jnp.asarray(fault_map, bool)
    words = jax.random.bits(key, fault_map.shape, jnp.uint32)
    return jnp.sum(jnp.where(fault_map, words, jnp.uint32(0)), dtype=jnp.uint32)


def from_map(key: jax.Array, fault_map: jax.Array, mix: StuckAtMix = DEFAULT_MIX) -> StuckAt:
    """One stuck bit in each faulty PE of a chip known only by its PE map (a pure function of
    ``key`` and the map, so every stage that meets the chip sees the same bits).

    The chip's key is ``fold_in(key, map_fingerprint(key', map))``: chips with different maps
    draw independently; a chip seen again (in the analysis, the policies, a later production
    call) has the same stuck bits.

    Args:
      key: the run's stuck-at key.
      fault_map: ``bool[R, C]``; mix: validated by the caller (``StuckAtMix.validate``).

    Returns:
      ``StuckAt`` of ``int32[3, R, C]``; ``faulty_pes`` of it is ``fault_map``.
    """
    k_hash, k_draw = jax.random.split(key)
    chip_key = jax.random.fold_in(k_draw, map_fingerprint(k_hash, fault_map))
    return sample_chip(chip_key, fault_map, mix)


def mix_sites(mix: StuckAtMix) -> tuple[str, ...]:
    """The sites a mix can put a stuck bit in (probability > 0), in ``SITES`` order."""
    return tuple(s for s, p in zip(SITES, mix.site_probs, strict=True) if float(p) > 0)


# -------------------------------------------------------------------- tables and masks


def masks_to_table(faults: StuckAt) -> np.ndarray:
    """The faults of a population as rows ``(chip, row, col, site, bit, value)``.

    Args:
      faults: ``StuckAt`` of ``int32[chips, 3, R, C]``.

    Returns:
      ``int64[F, 6]`` sorted by chip, row, col, site, bit (``site`` an index into
      ``SITES``). A bit both cleared and set reads as stuck at 1, as the masks apply it.
    """
    a = np.asarray(faults.and_mask).astype(np.int64) & 0xFFFFFFFF
    o = np.asarray(faults.or_mask).astype(np.int64) & 0xFFFFFFFF
    rows = []
    for s, width in enumerate(SITE_BITS):
        for b in range(width):
            one = (o[:, s] >> b) & 1 == 1
            zero = ((a[:, s] >> b) & 1 == 0) & ~one
            for value, where in ((0, zero), (1, one)):
                chip, r, c = np.nonzero(where)
                rows.append(
                    np.stack(
                        [
                            chip,
                            r,
                            c,
                            np.full_like(chip, s),
                            np.full_like(chip, b),
                            np.full_like(chip, value),
                        ],
                        1,
                    )
                )
    table = np.concatenate(rows).astype(np.int64).reshape(-1, 6)
    chip, r, c, s, b = table[:, :5].T
    return table[np.lexsort((b, s, c, r, chip))]


def table_to_masks(table: np.ndarray, num_chips: int, rows: int, cols: int) -> StuckAt:
    """``StuckAt`` of ``int32[chips, 3, R, C]`` (numpy) from rows ``int[F, 6]`` (validated)."""
    t = np.asarray(table, np.int64).reshape(-1, 6)
    a = np.full((num_chips, len(SITES), rows, cols), 0xFFFFFFFF, np.int64)
    o = np.zeros_like(a)
    chip, r, c, s, b, v = t.T
    bit = np.left_shift(np.int64(1), b)
    np.bitwise_and.at(a, (chip[v == 0], s[v == 0], r[v == 0], c[v == 0]), ~bit[v == 0])
    np.bitwise_or.at(o, (chip[v == 1], s[v == 1], r[v == 1], c[v == 1]), bit[v == 1])

    def to_int32(m):
        return (m & 0xFFFFFFFF).astype(np.uint32).view(np.int32)

    return StuckAt(to_int32(a), to_int32(o))


# -------------------------------------------------------------------------------- files

_INTEGER = re.compile(r"\s*[+-]?[0-9]{1,18}\s*")


def save_stuck_at(path: str, faults: StuckAt) -> None:
    """Writes a population's faults as CSV ``chip,row,col,site,bit,value`` (atomically).

    A comment ``# chips=N rows=R cols=C`` comes first, so chips without faults are counted.
    """
    if not path.endswith(".csv"):
        raise StuckAtError(f"{path}: stuck-at fault files must end in .csv")
    chips, _, rows, cols = np.shape(faults.and_mask)
    table = masks_to_table(faults)
    lines = [f"# chips={chips} rows={rows} cols={cols}", ",".join(CSV_FIELDS)]
    lines += [f"{ch},{r},{c},{SITES[s]},{b},{v}" for ch, r, c, s, b, v in table.tolist()]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _comment(path: str, lineno: int, line: str) -> dict[str, int]:
    out = {}
    for kv in line[1:].split():
        name, _, value = kv.partition("=")
        if name in ("chips", "rows", "cols"):
            if not _INTEGER.fullmatch(value) or int(value) <= 0:
                raise StuckAtError(
                    f"{path}: line {lineno}: {name}={value} in the comment is not a positive "
                    "integer"
                )
            out[name] = int(value)
    return out


def _row(path: str, lineno: int, line: str) -> list[int]:
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != len(CSV_FIELDS):
        raise StuckAtError(
            f"{path}: line {lineno}: {line!r} has {len(fields)} fields; expected "
            f"{len(CSV_FIELDS)} ({','.join(CSV_FIELDS)})"
        )
    out = []
    for name, field in zip(CSV_FIELDS, fields, strict=True):
        if name == "site":
            if field not in SITES:
                raise StuckAtError(
                    f"{path}: line {lineno}: site {field!r} is not one of {', '.join(SITES)}"
                )
            out.append(SITES.index(field))
        elif not _INTEGER.fullmatch(field):
            raise StuckAtError(f"{path}: line {lineno}: {name} {field!r} is not an integer")
        else:
            out.append(int(field))
    return out


def _check_entries(path: str, line_of: list[int], t: np.ndarray, bounds: dict) -> None:
    """Refuses the first row (in file order) with a value out of range, or a repeated bit."""
    for i, (chip, r, c, s, b, v) in enumerate(t.tolist()):
        checks = (
            ("chip", chip, bounds["chips"]),
            ("row", r, bounds["rows"]),
            ("col", c, bounds["cols"]),
            ("bit", b, SITE_BITS[s]),
            ("value", v, 2),
        )
        for name, value, upper in checks:
            if value < 0 or (upper is not None and value >= upper):
                allowed = f"0..{upper - 1}" if upper is not None else "0 or more"
                where = f" for site {SITES[s]}" if name == "bit" else ""
                raise StuckAtError(
                    f"{path}: line {line_of[i]}: {name}={value} is out of range{where} "
                    f"(allowed {allowed})"
                )
    seen: dict[tuple, int] = {}
    for i, (chip, r, c, s, b, _) in enumerate(t.tolist()):
        key = (chip, r, c, s, b)
        if key in seen:
            raise StuckAtError(
                f"{path}: lines {seen[key]} and {line_of[i]} both list chip={chip},row={r},"
                f"col={c},site={SITES[s]},bit={b}; a bit is stuck at one value only"
            )
        seen[key] = line_of[i]


def load_stuck_at(
    path: str, rows: int | None = None, cols: int | None = None, num_chips: int | None = None
) -> StuckAt:
    """Reads and validates a stuck-at fault file.

    Args:
      path: a ``.csv`` file: an optional comment ``# chips=N rows=R cols=C``, the header
        ``chip,row,col,site,bit,value``, then one row per stuck bit with ``0 <= chip < N``,
        ``0 <= row < R``, ``0 <= col < C``, ``site`` one of ``SITES``, ``bit`` below the
        site's width (8, 16, 32) and ``value`` 0 or 1. A PE may have several stuck bits; a
        bit listed twice (or a second header) is refused.
      rows, cols: the array size (required unless the comment gives it).
      num_chips: the number of chips (default: the comment's, else the largest chip + 1).

    Returns:
      ``StuckAt`` of ``int32[chips, 3, R, C]`` (numpy).

    Raises:
      StuckAtError: one line naming the file, the line, the value and what is allowed.
    """
    if not path.endswith(".csv"):
        raise StuckAtError(f"{path}: stuck-at fault files must end in .csv")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StuckAtError(f"{path}: cannot read the stuck-at fault file ({e})") from e
    declared: dict[str, int] = {}
    header = 0
    entries, line_of = [], []
    for lineno, line in enumerate(lines, start=1):
        if line.startswith("#"):
            declared.update(_comment(path, lineno, line))
        elif not line.strip():
            continue
        elif [h.strip() for h in line.split(",")] == list(CSV_FIELDS):
            if header:
                raise StuckAtError(
                    f"{path}: line {lineno}: a second header (the first is on line {header}); "
                    "concatenated files are refused"
                )
            header = lineno
        elif not header:
            raise StuckAtError(f"{path}: line {lineno}: expected the header {','.join(CSV_FIELDS)}")
        else:
            entries.append(_row(path, lineno, line))
            line_of.append(lineno)
    if not header:
        raise StuckAtError(f"{path}: expected a header line {','.join(CSV_FIELDS)}")
    for name, given in (("rows", rows), ("cols", cols), ("chips", num_chips)):
        if given is not None and name in declared and declared[name] != given:
            raise StuckAtError(
                f"{path}: the file declares {name}={declared[name]} but {given} was expected"
            )
    rows = rows if rows is not None else declared.get("rows")
    cols = cols if cols is not None else declared.get("cols")
    if rows is None or cols is None:
        raise StuckAtError(f"{path}: array size unknown; give rows and cols (or the comment)")
    known = num_chips or declared.get("chips")
    table = np.array(entries, np.int64).reshape(-1, 6)
    _check_entries(path, line_of, table, {"chips": known, "rows": rows, "cols": cols})
    chips = known or (int(table[:, 0].max()) + 1 if len(table) else 0)
    if chips <= 0:
        raise StuckAtError(f"{path}: no chips in the file (give the comment # chips=N)")
    return table_to_masks(table, chips, rows, cols)
