"""Stuck-at bits in the PEs: the faulty product against a bit-level simulation of the array,
vmap over chips, sampling, and the CSV files."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reduce_jax.hardware import faults, quant, stuck_at

WIDTH = {"weight": 8, "product": 16, "psum": 32}

# ---------------------------------------------------------- bit-level reference (Python)


def _wrap(v: int, width: int) -> int:
    """A Python int read as a ``width``-bit two's-complement register."""
    v &= (1 << width) - 1
    return v - (1 << width) if v >> (width - 1) else v


def _force(v: int, width: int, stuck: list[tuple[int, int]]) -> int:
    u = v & ((1 << width) - 1)
    for bit, value in stuck:
        u = u | (1 << bit) if value else u & ~(1 << bit)
    return _wrap(u, width)


def reference(x, w, rows, cols, fault_list):
    """The array simulated PE by PE: every tile, every column, rows 0..R-1 in order.

    ``fault_list``: ``(row, col, site, bit, value)`` tuples. Python ints throughout.
    """
    b_size, k_size = x.shape
    n_size = w.shape[1]
    stuck = {}
    for r, c, site, bit, value in fault_list:
        stuck.setdefault((r, c, site), []).append((bit, value))
    out = np.zeros((b_size, n_size), np.int64)
    tiles = -(-k_size // rows)
    for b in range(b_size):
        for n in range(n_size):
            c = n % cols
            acc = 0
            for t in range(tiles):
                s = 0  # the partial sum entering row 0 of the column
                for r in range(rows):
                    k = t * rows + r
                    xv = int(x[b, k]) if k < k_size else 0
                    wv = int(w[k, n]) if k < k_size else 0
                    wv = _force(wv, 8, stuck.get((r, c, "weight"), []))
                    p = _force(xv * wv, 16, stuck.get((r, c, "product"), []))
                    s = _force(_wrap(s + p, 32), 32, stuck.get((r, c, "psum"), []))
                acc = _wrap(acc + s, 32)  # tiles added outside the array
            out[b, n] = acc
    return out


def _masks(fault_list, rows, cols) -> stuck_at.StuckAt:
    table = [(0, r, c, stuck_at.SITES.index(s), b, v) for r, c, s, b, v in fault_list]
    return jax.tree.map(lambda m: m[0], stuck_at.table_to_masks(table, 1, rows, cols))


def _int8(rng, shape):
    return rng.integers(-127, 128, size=shape).astype(np.int8)


matmul = jax.jit(stuck_at.stuck_at_matmul, static_argnames="sites")

# ------------------------------------------------------------- one stuck bit of each site


@pytest.mark.parametrize("site", stuck_at.SITES)
@pytest.mark.parametrize("value", [0, 1])
@pytest.mark.parametrize("bit_from_top", [1, 3])  # the sign bit, and a bit below it
def test_one_stuck_bit_against_bit_level_simulation(site, value, bit_from_top):
    rng = np.random.default_rng(stuck_at.SITES.index(site) * 10 + value * 4 + bit_from_top)
    rows, cols = 3, 2
    x, w = _int8(rng, (4, 8)), _int8(rng, (8, 5))  # K, N not multiples of R, C
    # W[1, 1] sits on PE (1, 1): all ones (-1) under a stuck 0, all zeros under a stuck 1, so
    # its weight register and its products x * W[1, 1] (x = 1) see the fault.
    w[1, 1], x[:, 1] = (0 if value else -1), 1
    fault = [(1, 1, site, WIDTH[site] - bit_from_top, value)]
    out = matmul(x, w, _masks(fault, rows, cols))
    expected = reference(x, w, rows, cols, fault)
    np.testing.assert_array_equal(out, expected)
    # The fault acts: columns n = 1, 3 (n mod 2 = 1) differ from the fault-free product,
    # the others do not.
    clean = x.astype(np.int64) @ w.astype(np.int64)
    np.testing.assert_array_equal(out[:, [0, 2, 4]], clean[:, [0, 2, 4]])
    assert np.any(np.asarray(out)[:, [1, 3]] != clean[:, [1, 3]])


def test_psum_fault_is_forced_before_the_rows_below_add_their_products():
    # One column, R = 2, one tile: s0 = x0*w0 = 3, forced bit 0 -> 2; s1 = 2 + x1*w1 = 12.
    x = np.array([[1, 2]], np.int8)
    w = np.array([[3], [5]], np.int8)
    out = matmul(x, w, _masks([(0, 0, "psum", 0, 0)], 2, 1))
    assert int(out[0, 0]) == 12
    # At the last row the bit is forced on the column's output: 13 -> 12 as well, but a
    # stuck-at-1 in bit 1 at row 0 gives (3 | 2) + 10 = 13, at row 1 (13 | 2) = 15.
    assert int(matmul(x, w, _masks([(0, 0, "psum", 1, 1)], 2, 1))[0, 0]) == 13
    assert int(matmul(x, w, _masks([(1, 0, "psum", 1, 1)], 2, 1))[0, 0]) == 15


def test_unused_rows_of_an_edge_tile_still_carry_the_column():
    # K = 1 on R = 2: row 1 holds no weight, but its product and psum are on the path.
    x = np.array([[3]], np.int8)
    w = np.array([[4]], np.int8)
    assert int(matmul(x, w, _masks([(1, 0, "product", 4, 1)], 2, 1))[0, 0]) == 12 + 16
    assert int(matmul(x, w, _masks([(1, 0, "psum", 31, 1)], 2, 1))[0, 0]) == 12 - 2**31
    assert int(matmul(x, w, _masks([(1, 0, "weight", 0, 1)], 2, 1))[0, 0]) == 12


@settings(max_examples=50, deadline=None)
@given(
    width=st.sampled_from([8, 16, 32]),
    data=st.data(),
)
def test_force_bits_matches_the_python_register(width, data):
    lo, hi = -(2 ** (width - 1)), 2 ** (width - 1) - 1
    values = data.draw(st.lists(st.integers(lo, hi), min_size=1, max_size=8))
    stuck = data.draw(
        st.lists(
            st.tuples(st.integers(0, width - 1), st.integers(0, 1)),
            max_size=3,
            unique_by=lambda t: t[0],
        )
    )
    table = [(0, 0, 0, 2, b, v) for b, v in stuck]  # psum site: all 32 bits addressable
    m = stuck_at.table_to_masks(table, 1, 1, 1)
    out = stuck_at.force_bits(
        jnp.asarray(values, jnp.int32), m.and_mask[0, 2, 0, 0], m.or_mask[0, 2, 0, 0], width
    )
    np.testing.assert_array_equal(out, [_force(v, width, stuck) for v in values])


def test_weight_sign_bit_stuck_at_one_makes_int8_negative():
    w = np.array([[0, 5, -3]], np.int8)
    out = stuck_at.stuck_weights(w, _masks([(0, 0, "weight", 7, 1)], 1, 1))
    assert out.dtype == jnp.int8
    np.testing.assert_array_equal(out, [[-128, 5 - 128, -3]])


def test_sites_not_simulated_are_ignored_and_no_faults_is_the_plain_product():
    rng = np.random.default_rng(5)
    x, w = _int8(rng, (3, 10)), _int8(rng, (10, 7))
    fault = [(0, 1, "weight", 6, 1), (2, 0, "product", 14, 1), (1, 2, "psum", 20, 0)]
    only_weight = matmul(x, w, _masks(fault, 4, 3), sites=("weight",))
    np.testing.assert_array_equal(only_weight, reference(x, w, 4, 3, fault[:1]))
    clean = matmul(x, w, jax.tree.map(jnp.asarray, stuck_at.no_faults(4, 3)))
    np.testing.assert_array_equal(clean, quant.int_matmul(x, w, (4, 3)))
    with pytest.raises(ValueError, match="unknown fault site 'mac'"):
        stuck_at.stuck_at_matmul(x, w, _masks(fault, 4, 3), sites=("mac",))


@st.composite
def _cases(draw):
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    k, n, b = draw(st.integers(1, 11)), draw(st.integers(1, 7)), draw(st.integers(1, 3))
    keys = draw(
        st.lists(
            st.tuples(
                st.integers(0, rows - 1), st.integers(0, cols - 1), st.sampled_from(stuck_at.SITES)
            ),
            max_size=6,
        )
    )
    fault_list, seen = [], set()
    for r, c, site in keys:
        bit = draw(st.integers(0, WIDTH[site] - 1))
        if (r, c, site, bit) not in seen:
            seen.add((r, c, site, bit))
            fault_list.append((r, c, site, bit, draw(st.integers(0, 1))))
    return rows, cols, k, n, b, fault_list, draw(st.integers(0, 2**31))


@settings(max_examples=25, deadline=None)
@given(_cases())
def test_several_faults_against_bit_level_simulation(case):
    rows, cols, k, n, b, fault_list, seed = case
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(b, k)).astype(np.int8)
    w = rng.integers(-128, 128, size=(k, n)).astype(np.int8)
    out = stuck_at.stuck_at_matmul(x, w, _masks(fault_list, rows, cols))
    np.testing.assert_array_equal(out, reference(x, w, rows, cols, fault_list))


def test_weight_faults_in_a_convolution_follow_the_hwio_mapping():
    rng = np.random.default_rng(6)
    x = _int8(rng, (2, 5, 5, 3))
    kernel = _int8(rng, (3, 3, 3, 4))
    chip = _masks([(2, 1, "weight", 7, 1), (0, 3, "weight", 2, 0)], 4, 4)
    f = functools.partial(stuck_at.stuck_at_matmul, faults=chip, sites=("weight",))
    out = quant.conv_as_matmul(x, kernel, lambda a, b: f(a, b))
    forced = np.asarray(stuck_at.stuck_weights(kernel.reshape(27, 4), chip)).reshape(kernel.shape)
    ref = jax.lax.conv_general_dilated(
        x.astype(np.float32),
        forced.astype(np.float32),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_array_equal(out, np.asarray(ref).astype(np.int64))
    assert not np.array_equal(forced, kernel)


# ----------------------------------------------------------------------- population, vmap


def _population(num_chips=6, rows=4, cols=3, rate=0.3, mix=stuck_at.DEFAULT_MIX, first=0):
    maps = faults.sample_fault_maps(jax.random.key(0), num_chips + first, rows, cols, rate)
    return maps[first:], stuck_at.sample_stuck_at(jax.random.key(1), maps[first:], mix, first)


def test_vmap_over_chips_equals_a_loop():
    maps, pop = _population()
    rng = np.random.default_rng(7)
    x, w = _int8(rng, (3, 9)), _int8(rng, (9, 5))
    batched = jax.jit(jax.vmap(stuck_at.stuck_at_matmul, in_axes=(None, None, 0)))(x, w, pop)
    assert batched.shape == (6, 3, 5)
    for i in range(6):
        chip = jax.tree.map(lambda m, i=i: m[i], pop)
        np.testing.assert_array_equal(batched[i], stuck_at.stuck_at_matmul(x, w, chip))
    table = stuck_at.masks_to_table(pop)
    for i in range(6):
        rows_i = [(r, c, stuck_at.SITES[s], b, v) for ch, r, c, s, b, v in table if ch == i]
        np.testing.assert_array_equal(batched[i], reference(x, w, 4, 3, rows_i))


def test_sampled_faults_sit_on_the_fault_map_one_bit_each_and_do_not_depend_on_population():
    maps, pop = _population(num_chips=6)
    np.testing.assert_array_equal(stuck_at.faulty_pes(pop), maps)
    table = stuck_at.masks_to_table(pop)
    assert len(table) == int(np.sum(maps))  # one stuck bit per faulty PE
    _, tail = _population(num_chips=2, first=4)
    same = jax.tree.map(np.array_equal, jax.tree.map(lambda m: m[4:], pop), tail)
    assert all(jax.tree.leaves(same))


@pytest.mark.parametrize(
    "mix,site,value,bits",
    [
        (stuck_at.StuckAtMix((1.0, 0.0, 0.0), 1.0, "msb"), 0, {1}, {7}),
        (stuck_at.StuckAtMix((0.0, 1.0, 0.0), 0.0, "msb"), 1, {0}, {15}),
        (stuck_at.StuckAtMix((0.0, 0.0, 1.0), 0.5, "uniform"), 2, {0, 1}, None),
    ],
)
def test_site_polarity_and_bit_mixes(mix, site, value, bits):
    _, pop = _population(num_chips=8, rows=16, cols=16, rate=0.5, mix=mix)
    table = stuck_at.masks_to_table(pop)
    assert set(table[:, 3]) == {site}
    assert set(table[:, 5]) == value
    if bits is not None:
        assert set(table[:, 4]) == bits


def test_high_bit_weighting_shifts_bits_up():
    mixes = [stuck_at.StuckAtMix((0.0, 0.0, 1.0), 0.5, b) for b in ("uniform", "high")]
    means = []
    for mix in mixes:
        _, pop = _population(num_chips=8, rows=16, cols=16, rate=0.5, mix=mix)
        means.append(stuck_at.masks_to_table(pop)[:, 4].mean())
    # Uniform over 0..31 has mean 15.5; P(b) proportional to b + 1 has mean 21.
    assert abs(means[0] - 15.5) < 1.5 and abs(means[1] - 21.0) < 1.5


@pytest.mark.parametrize(
    "mix,message",
    [
        (stuck_at.StuckAtMix((0.5, 0.5, 0.5)), "summing to 1"),
        (stuck_at.StuckAtMix(p_one=1.5), "out of range"),
        (stuck_at.StuckAtMix(bits="low"), "not one of uniform, high, msb"),
    ],
)
def test_bad_mixes_are_refused(mix, message):
    with pytest.raises(stuck_at.ConfigError, match=message):
        stuck_at.sample_stuck_at(jax.random.key(0), np.zeros((1, 2, 2), bool), mix)


# ---------------------------------------------------------------------------- CSV files


def test_table_and_masks_round_trip():
    table = np.array(
        [[0, 1, 2, 0, 7, 1], [0, 1, 2, 0, 3, 0], [1, 0, 0, 2, 31, 1], [2, 2, 1, 1, 15, 0]]
    )
    masks = stuck_at.table_to_masks(table, 3, 3, 3)
    assert masks.and_mask.dtype == np.int32 and masks.and_mask.shape == (3, 3, 3, 3)
    back = stuck_at.masks_to_table(masks)
    np.testing.assert_array_equal(back, table[np.lexsort(table[:, 4::-1].T)])


def test_csv_round_trip(tmp_path):
    _, pop = _population(rate=0.5)
    path = str(tmp_path / "stuck.csv")
    stuck_at.save_stuck_at(path, pop)
    lines = open(path).read().splitlines()
    assert lines[:2] == ["# chips=6 rows=4 cols=3", "chip,row,col,site,bit,value"]
    loaded = stuck_at.load_stuck_at(path)
    for got, want in zip(loaded, pop, strict=True):
        np.testing.assert_array_equal(got, want)
    assert loaded.and_mask.shape == (6, 3, 4, 3)


BAD_ROWS = [
    ("0,0,0,weight,8,1", "line 3: bit=8 is out of range for site weight (allowed 0..7)"),
    ("0,0,0,product,16,0", "line 3: bit=16 is out of range for site product (allowed 0..15)"),
    ("0,0,0,psum,32,0", "line 3: bit=32 is out of range for site psum (allowed 0..31)"),
    ("0,0,0,psum,3,2", "line 3: value=2 is out of range (allowed 0..1)"),
    ("0,2,0,psum,3,1", "line 3: row=2 is out of range (allowed 0..1)"),
    ("0,0,-1,psum,3,1", "line 3: col=-1 is out of range (allowed 0..1)"),
    ("3,0,0,psum,3,1", "line 3: chip=3 is out of range (allowed 0..2)"),
    ("0,0,0,adder,3,1", "line 3: site 'adder' is not one of weight, product, psum"),
    ("0,0,0,psum,x,1", "line 3: bit 'x' is not an integer"),
    ("0,0,0,psum,3", "line 3: '0,0,0,psum,3' has 5 fields; expected 6"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_csv_rows_give_one_line_errors(tmp_path, row, message):
    path = tmp_path / "bad.csv"
    path.write_text(f"# chips=3 rows=2 cols=2\nchip,row,col,site,bit,value\n{row}\n")
    with pytest.raises(stuck_at.StuckAtError) as e:
        stuck_at.load_stuck_at(str(path))
    assert str(e.value).startswith(f"{path}: {message}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("chip,row,col,site,bit,value\n0,0,0,psum,3,1\n0,0,0,psum,3,0\n", "lines 2 and 3 both"),
        ("0,0,0,psum,3,1\n", "line 1: expected the header"),
        ("# rows=2 cols=2\n", "expected a header line"),
        ("# rows=3 cols=2\nchip,row,col,site,bit,value\n", "declares rows=3 but 2"),
        ("chip,row,col,site,bit,value\nchip,row,col,site,bit,value\n", "a second header"),
    ],
)
def test_bad_csv_files(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(stuck_at.StuckAtError, match=message):
        stuck_at.load_stuck_at(str(path), rows=2, cols=2)


def test_faults_of_one_pe_at_several_bits_load_together(tmp_path):
    path = tmp_path / "two.csv"
    path.write_text("chip,row,col,site,bit,value\n0,1,0,psum,3,1\n0,1,0,psum,4,0\n")
    m = stuck_at.load_stuck_at(str(path), rows=2, cols=2)
    assert m.or_mask[0, 2, 1, 0] == 8 and m.and_mask[0, 2, 1, 0] == ~16
    assert not np.asarray(stuck_at.faulty_pes(m))[0, 0].any()
