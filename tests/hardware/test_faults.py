"""Fault-map sampling models and fault-map files."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from reduce_jax.hardware import faults
from reduce_jax.hardware.faults import FaultMapError

KEY = jax.random.key(42)


# One cached jit with traced key, rates, alpha and first_chip: one compile per
# (chips, rows, cols, model). Direct calls are checked against this wrapper in
# ``test_same_key_same_maps_and_chip_independence``.
_sample_jit = jax.jit(
    faults.sample_fault_maps, static_argnames=("num_chips", "rows", "cols", "model")
)


def _sample(num_chips, rows, cols, rate, model, alpha=2.0, first_chip=0, key=KEY):
    rates = np.broadcast_to(np.asarray(rate, np.float32), (num_chips,))
    maps = _sample_jit(
        key,
        num_chips=num_chips,
        rows=rows,
        cols=cols,
        rate=rates,
        model=model,
        alpha=np.float32(alpha),
        first_chip=np.int32(first_chip),
    )
    return np.asarray(maps)


# ------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("model", faults.FAULT_MODELS)
def test_same_key_same_maps_and_chip_independence(model):
    # The public function, called directly (it compiles on every call) ...
    ten = np.asarray(faults.sample_fault_maps(KEY, 10, 16, 16, 0.2, model))
    assert ten.shape == (10, 16, 16) and ten.dtype == bool
    # The chips differ from each other (two chips may lose the same single line).
    assert len({m.tobytes() for m in ten}) >= (8 if model == "lines" else 10)
    # ... gives chip i the same map in a population of 400: independent of the size.
    many = _sample(400, 16, 16, 0.2, model)
    np.testing.assert_array_equal(many[:10], ten)
    np.testing.assert_array_equal(_sample(400, 16, 16, 0.2, model), many)
    # Another key gives other maps.
    assert not np.array_equal(_sample(400, 16, 16, 0.2, model, key=jax.random.key(7)), many)
    # first_chip slices the population.
    np.testing.assert_array_equal(_sample(400, 16, 16, 0.2, model, first_chip=4)[:396], many[4:])
    # Chip i is drawn from fold_in(key, i) (jitted: the eager clustered sampler is slow).
    sample_one = jax.jit(faults.sample_fault_map, static_argnums=(1, 2, 4))
    single = sample_one(jax.random.fold_in(KEY, 5), 16, 16, 0.2, model)
    np.testing.assert_array_equal(single, ten[5])


@pytest.mark.parametrize(
    "rows, cols, rate",
    [(16, 16, 0.1), (16, 16, 0.37), (16, 16, 0.0), (16, 16, 1.0), (7, 9, 0.37), (5, 3, 0.5)],
)
def test_exact_gives_round_p_rc_faults(rows, cols, rate):
    maps = _sample(400, rows, cols, rate, "exact")
    expected = round(rate * rows * cols)  # 26, 95, 0, 256, 23, 8 (7.5 rounds to even)
    np.testing.assert_array_equal(maps.sum(axis=(1, 2)), expected)
    if 0 < expected < rows * cols:  # placement varies between chips
        assert len({m.tobytes() for m in maps}) > 100


def test_exact_placement_is_uniform():
    maps = _sample(400, 16, 16, 0.25, "exact")  # 64 faults per chip
    per_pe = maps.mean(axis=0)
    # Each PE is faulty with probability 0.25; 400 chips -> std ~0.0217 per PE.
    assert np.all(np.abs(per_pe - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 400)), per_pe


def test_bernoulli_rate_within_statistical_tolerance():
    p, chips, rows, cols = 0.1, 400, 16, 16
    maps = _sample(chips, rows, cols, p, "bernoulli")
    n = chips * rows * cols
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(maps.mean() - p) < 4 * sigma, maps.mean()
    # Per-chip rates vary like a binomial: variance p(1-p)/(R*C).
    per_chip = maps.mean(axis=(1, 2))
    assert per_chip.var() == pytest.approx(p * (1 - p) / (rows * cols), rel=0.3)
    # Chips are independent: no PE is special.
    assert np.all(np.abs(maps.mean(axis=0) - p) < 5 * np.sqrt(p * (1 - p) / chips))


def test_clustered_mean_near_p_and_more_variable_than_bernoulli():
    p, chips, rows, cols = 0.1, 400, 16, 16
    clustered = _sample(chips, rows, cols, p, "clustered", alpha=2.0)
    bernoulli = _sample(chips, rows, cols, p, "bernoulli")
    assert clustered.mean() == pytest.approx(p, rel=0.25)
    var_c = clustered.mean(axis=(1, 2)).var()
    var_b = bernoulli.mean(axis=(1, 2)).var()
    assert var_c > 3 * var_b, (var_c, var_b)
    # Some chips come out (nearly) clean and some much worse than p: a yield-model spread.
    per_chip = clustered.mean(axis=(1, 2))
    assert per_chip.min() < p / 4 and per_chip.max() > 2 * p


def test_clustered_alpha_controls_spread():
    tight = _sample(400, 16, 16, 0.1, "clustered", alpha=100.0)
    loose = _sample(400, 16, 16, 0.1, "clustered", alpha=0.5)
    assert tight.mean() == pytest.approx(0.1, rel=0.1)
    assert loose.mean(axis=(1, 2)).var() > 5 * tight.mean(axis=(1, 2)).var()


def _faulty_neighbour_share(maps):
    """Mean share of faulty 4-neighbours of faulty PEs (outside the array counts as healthy)."""
    padded = np.pad(maps, ((0, 0), (1, 1), (1, 1))).astype(np.int64)
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2]
    neighbours = neighbours + padded[:, 1:-1, 2:]
    return neighbours[maps].mean() / 4


def test_clustered_faults_are_spatially_clustered():
    clustered = _sample(400, 16, 16, 0.1, "clustered", alpha=50.0)
    exact = _sample(400, 16, 16, 0.1, "exact")
    assert _faulty_neighbour_share(clustered) > 2 * _faulty_neighbour_share(exact)


def _sample_lines(num_chips, rows, cols, rate, line_fraction):
    return np.asarray(
        faults.sample_fault_maps(
            KEY, num_chips, rows, cols, rate, "lines", line_fraction=line_fraction
        )
    )


def _in_whole_line(m: np.ndarray) -> np.ndarray:
    """Which faulty PEs of ``m`` lie in a wholly faulty row or column."""
    return m & (m.all(1, keepdims=True) | m.all(0, keepdims=True))


@pytest.mark.parametrize("line_fraction", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_lines_mean_rate_matches(line_fraction, rate):
    maps = _sample_lines(2000, 16, 16, rate, line_fraction)
    chip_rates = maps.mean(axis=(1, 2))
    se = chip_rates.std() / np.sqrt(len(chip_rates))
    assert abs(chip_rates.mean() - rate) < max(5 * se, 1e-3), (chip_rates.mean(), rate)


def test_lines_only_produces_whole_lines():
    maps = _sample_lines(300, 16, 12, 0.2, 1.0)
    assert maps.any()
    for m in maps:
        np.testing.assert_array_equal(_in_whole_line(m), m)
    # Rows and columns both fail.
    assert any(m.all(1).any() for m in maps) and any(m.all(0).any() for m in maps)


def test_lines_mixed_with_pe_faults():
    maps = _sample_lines(1000, 16, 16, 0.2, 0.5)
    in_line = np.array([_in_whole_line(m).sum() for m in maps]).sum()
    total = maps.sum()
    # Lines cover half the rate on average; the PE faults the other half (some PE faults
    # fall into failed lines and count there).
    assert 0.4 < in_line / total < 0.65, in_line / total
    # Without lines it is independent PE faults: no chip loses a whole line.
    none = _sample_lines(300, 16, 16, 0.1, 0.0)
    assert not any(_in_whole_line(m).any() for m in none)


def test_lines_vary_more_between_chips_than_bernoulli():
    lines = _sample_lines(2000, 16, 16, 0.1, 1.0).mean(axis=(1, 2))
    bern = _sample(2000, 16, 16, 0.1, "bernoulli").mean(axis=(1, 2))
    assert lines.var() > 4 * bern.var()


def test_per_chip_rate_arrays():
    rates = np.full(400, 0.25)
    rates[:4] = [0.0, 0.05, 0.5, 1.0]
    maps = _sample(400, 16, 16, rates, "exact")
    np.testing.assert_array_equal(maps.sum(axis=(1, 2)), [0, 13, 128, 256] + [64] * 396)
    # A per-chip rate gives chip i the same map as a population-wide rate would.
    np.testing.assert_array_equal(maps[4:], _sample(400, 16, 16, 0.25, "exact")[4:])
    bern = _sample(400, 16, 16, [0.0, 1.0] * 100 + [0.5] * 200, "bernoulli")
    assert not bern[0:200:2].any() and bern[1:200:2].all()
    assert 0 < bern[200:].mean() < 1
    clus = _sample(400, 16, 16, [0.0] * 200 + [0.3] * 200, "clustered")
    assert not clus[:200].any() and clus[200:].any()
    # Direct call with a per-chip rate array (the public API, not the test wrapper).
    direct = faults.sample_fault_maps(KEY, 4, 8, 8, np.array([0.0, 0.5, 1.0, 0.25]), "exact")
    np.testing.assert_array_equal(np.asarray(direct).sum(axis=(1, 2)), [0, 32, 64, 16])


def test_unknown_model_rejected():
    with pytest.raises(ValueError, match="bernoulli"):
        faults.sample_fault_maps(KEY, 2, 4, 4, 0.1, "poisson")
    with pytest.raises(ValueError, match="poisson"):
        faults.sample_fault_map(KEY, 4, 4, 0.1, "poisson")


# ------------------------------------------------------------------------------- files


def _population():
    maps = np.zeros((5, 4, 6), bool)
    maps[1, 0, 0] = maps[1, 3, 5] = True
    maps[2] = True
    maps[3, 2, 1] = True
    return maps  # chips 0 and 4 (the last) have no faults


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_round_trip(tmp_path, suffix):
    maps = _population()
    path = str(tmp_path / f"maps{suffix}")
    faults.save_fault_maps(path, maps)
    loaded = faults.load_fault_maps(path)
    assert loaded.dtype == bool and loaded.shape == (5, 4, 6)
    np.testing.assert_array_equal(loaded, maps)
    np.testing.assert_array_equal(faults.load_fault_maps(path, rows=4, cols=6), maps)
    assert not (tmp_path / f"maps{suffix}.tmp").exists()


def test_round_trip_sampled(tmp_path):
    maps = _sample(400, 16, 16, 0.3, "clustered")[:10]
    for suffix in (".npz", ".csv"):
        path = str(tmp_path / f"s{suffix}")
        faults.save_fault_maps(path, maps)
        np.testing.assert_array_equal(faults.load_fault_maps(path, 16, 16), maps)
        assert maps.any()


def test_csv_format_and_zero_fault_chips(tmp_path):
    path = tmp_path / "maps.csv"
    faults.save_fault_maps(str(path), _population()[:2])
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#") and "chips=2" in lines[0]
    assert lines[1:] == ["chip,row,col", "1,0,0", "1,3,5"]
    # Without the comment the trailing fault-free chip is lost unless num_chips is given.
    bare = tmp_path / "bare.csv"
    bare.write_text("chip,row,col\n1,0,0\n1,3,5\n")
    assert faults.load_fault_maps(str(bare), rows=4, cols=6).shape == (2, 4, 6)
    assert faults.load_fault_maps(str(bare), rows=4, cols=6, num_chips=4).shape == (4, 4, 6)
    # A file with no faulty PE at all still has its chips.
    empty = str(tmp_path / "empty.csv")
    faults.save_fault_maps(empty, np.zeros((3, 2, 2), bool))
    np.testing.assert_array_equal(faults.load_fault_maps(empty), np.zeros((3, 2, 2), bool))


def test_npz_integer_zero_one_accepted(tmp_path):
    path = str(tmp_path / "ints.npz")
    np.savez(path, fault_maps=_population().astype(np.int8))
    np.testing.assert_array_equal(faults.load_fault_maps(path), _population())


def _rejects(path, match=None, **kwargs):
    with pytest.raises(FaultMapError) as info:
        faults.load_fault_maps(str(path), **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    assert "\n" not in message
    if match is not None:
        assert match in message, message
    return message


def test_bad_npz_files_rejected(tmp_path):
    two_d = tmp_path / "two_d.npz"
    np.savez(two_d, fault_maps=np.zeros((4, 4), bool))
    _rejects(two_d, "(4, 4)")

    halves = tmp_path / "float.npz"
    np.savez(halves, fault_maps=np.full((2, 4, 4), 0.5))
    _rejects(halves, "float64")

    twos = tmp_path / "twos.npz"
    np.savez(twos, fault_maps=np.full((2, 4, 4), 2, np.int32))
    _rejects(twos)

    no_chips = tmp_path / "empty.npz"
    np.savez(no_chips, fault_maps=np.zeros((0, 4, 4), bool))
    _rejects(no_chips)

    missing = tmp_path / "missing_key.npz"
    np.savez(missing, maps=_population())
    _rejects(missing, "fault_maps")

    truncated = tmp_path / "truncated.npz"
    faults.save_fault_maps(str(truncated), _sample(400, 16, 16, 0.3, "bernoulli")[:10])
    raw = truncated.read_bytes()
    for cut in (len(raw) // 2, 30, 3):
        truncated.write_bytes(raw[:cut])
        _rejects(truncated)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all")
    _rejects(garbage)


def test_wrong_array_size_rejected_npz(tmp_path):
    path = tmp_path / "maps.npz"
    faults.save_fault_maps(str(path), _population())  # 4 x 6
    message = _rejects(path, rows=8, cols=8)
    assert "4x6" in message and "8x8" in message
    _rejects(path, rows=4, cols=5)
    _rejects(path, rows=6)


def test_bad_csv_files_rejected(tmp_path):
    header = tmp_path / "header.csv"
    header.write_text("# chips=2 rows=4 cols=4\nchip,r,c\n0,1,1\n")
    _rejects(header, "chip,row,col")

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _rejects(empty, rows=4, cols=4)

    out_of_range = tmp_path / "range.csv"
    out_of_range.write_text("# chips=2 rows=4 cols=4\nchip,row,col\n0,1,1\n1,4,0\n")
    _rejects(out_of_range, "row=4")
    negative = tmp_path / "negative.csv"
    negative.write_text("chip,row,col\n0,1,-1\n")
    _rejects(negative, rows=4, cols=4)
    bad_chip = tmp_path / "chip.csv"
    bad_chip.write_text("# chips=2 rows=4 cols=4\nchip,row,col\n2,0,0\n")
    _rejects(bad_chip, "chip=2")

    not_ints = tmp_path / "not_ints.csv"
    not_ints.write_text("chip,row,col\n0,1,x\n")
    _rejects(not_ints, "'0,1,x'", rows=4, cols=4)
    short = tmp_path / "short.csv"
    short.write_text("chip,row,col\n0,1\n")
    _rejects(short, rows=4, cols=4)

    unknown_size = tmp_path / "size.csv"
    unknown_size.write_text("chip,row,col\n0,1,1\n")
    _rejects(unknown_size, "--array_rows")

    smaller = tmp_path / "smaller.csv"
    faults.save_fault_maps(str(smaller), _population())  # 4 x 6, PE (3, 5) of chip 1 faulty
    _rejects(smaller, rows=4, cols=5)


def test_wrong_array_size_rejected_csv(tmp_path):
    path = tmp_path / "maps.csv"
    faults.save_fault_maps(str(path), _population())  # comment says rows=4 cols=6
    _rejects(path, rows=8, cols=8)


def test_csv_bad_comment_rejected(tmp_path):
    path = tmp_path / "comment.csv"
    path.write_text("# chips=two rows=4 cols=4\nchip,row,col\n0,1,1\n")
    _rejects(path)


def test_missing_file_and_extension(tmp_path):
    _rejects(tmp_path / "nope.npz", "not found")
    txt = tmp_path / "maps.txt"
    txt.write_text("chip,row,col\n")
    _rejects(txt, ".npz or .csv")
    with pytest.raises(FaultMapError, match="maps.txt"):
        faults.save_fault_maps(str(txt), _population())


def test_save_rejects_non_3d():
    with pytest.raises(FaultMapError, match=r"\(4, 4\)"):
        faults.save_fault_maps("unused.npz", np.zeros((4, 4), bool))


# A CSV written by the test: the comment, the header, then the rows (the first row is line 3).
_CSV_HEAD = "# chips=2 rows=4 cols=5\nchip,row,col\n"


def _csv(tmp_path, body, head=_CSV_HEAD, name="maps.csv"):
    path = tmp_path / name
    path.write_text(head + body)
    return path


@pytest.mark.parametrize(
    "row, field", [("-1,1,1", "chip=-1"), ("0,-1,1", "row=-1"), ("0,1,-1", "col=-1")]
)
def test_csv_negative_value_names_line_and_value(tmp_path, row, field):
    message = _rejects(_csv(tmp_path, f"0,1,1\n{row}\n"))
    assert "line 4" in message and field in message and "-1" in message, message
    bounds = {"chip": "0..1", "row": "0..3", "col": "0..4"}[field.split("=")[0]]
    assert bounds in message, message
    # Without the comment the chip count comes from the rows: still that line and value.
    bare = _csv(tmp_path, f"{row}\n", head="chip,row,col\n", name="bare.csv")
    message = _rejects(bare, rows=4, cols=5)
    assert "line 2" in message and field in message, message


@pytest.mark.parametrize(
    "row, field, bounds",
    [("0,4,0", "row=4", "0..3"), ("1,0,5", "col=5", "0..4"), ("2,0,0", "chip=2", "0..1")],
)
def test_csv_value_past_the_array_names_line_value_and_range(tmp_path, row, field, bounds):
    message = _rejects(_csv(tmp_path, f"0,1,1\n\n{row}\n"))  # a blank line: line 5
    assert "line 5" in message and field in message and bounds in message, message
    # The array size given by the caller bounds the rows and columns just as well.
    if field != "chip=2":
        bare = _csv(tmp_path, f"{row}\n", head="chip,row,col\n", name="bare.csv")
        message = _rejects(bare, rows=4, cols=5)
        assert "line 2" in message and field in message and bounds in message, message
    # And num_chips bounds the chip ids.
    message = _rejects(
        _csv(tmp_path, "1,0,0\n", head="chip,row,col\n"), rows=4, cols=5, num_chips=1
    )
    assert "line 2" in message and "chip=1" in message and "0..0" in message, message


@pytest.mark.parametrize(
    "row, named",
    [("0,1.5,1", "row '1.5'"), ("0,1,x", "col 'x'"), ("0,,1", "row ''"), ("1e0,1,1", "chip '1e0'")],
)
def test_csv_non_integer_names_line_field_and_value(tmp_path, row, named):
    message = _rejects(_csv(tmp_path, f"{row}\n"))
    assert "line 3" in message and named in message and repr(row) in message, message


@pytest.mark.parametrize("row, count", [("0,1", 2), ("0", 1), ("0,1,1,1", 4), ("0,1,1,", 4)])
def test_csv_wrong_number_of_fields_rejected(tmp_path, row, count):
    message = _rejects(_csv(tmp_path, f"0,0,0\n{row}\n"))
    assert "line 4" in message and f"{count} field" in message and repr(row) in message, message


def test_csv_duplicate_row_names_both_lines(tmp_path):
    message = _rejects(_csv(tmp_path, "1,0,0\n0,2,2\n# a comment\n1,0,0\n"))
    assert "lines 3 and 6" in message and "chip=1,row=0,col=0" in message, message
    # Two files pasted together: the second header is refused with both its lines named.
    saved = tmp_path / "one.csv"
    faults.save_fault_maps(str(saved), _population())
    text = saved.read_text()
    twice = tmp_path / "twice.csv"
    twice.write_text(text + text)
    message = _rejects(twice)
    header = 1 + len(text.splitlines())
    assert f"line {header + 1}" in message and "line 2" in message, message


def test_csv_bad_declared_size_rejected(tmp_path):
    for comment in ("chips=2 rows=0 cols=5", "chips=-2 rows=4 cols=5", "chips=2 rows=4 cols=-5"):
        named = next(kv for kv in comment.split() if kv.split("=")[1] in ("0", "-2", "-5"))
        message = _rejects(_csv(tmp_path, "", head=f"# {comment}\nchip,row,col\n"))
        assert "line 1" in message and named in message, message


def test_csv_comments_blank_lines_and_spaces_accepted(tmp_path):
    path = _csv(tmp_path, " 1 , 0 ,4\n\n# chip 0 is fault-free\n1,3,0\r\n  \n")
    maps = faults.load_fault_maps(str(path), rows=4, cols=5)
    expected = np.zeros((2, 4, 5), bool)
    expected[1, 0, 4] = expected[1, 3, 0] = True
    np.testing.assert_array_equal(maps, expected)


def test_a_clustered_chip_with_one_centre_has_its_faults_in_one_blob_anywhere_on_the_array():
    # About 4 faulty PEs of 144: one cluster centre. Its faults are the PEs nearest to it,
    # a compact blob, and the centre is uniform over the array (as often in the top half of
    # the rows as in the bottom, the left half of the columns as the right).
    # A 12 x 12 array: a program of its own (the mapping from tests to code sees it run).
    maps = _sample(400, 12, 12, 0.03, "clustered", alpha=50.0)
    spread, top, left, count = [], 0, 0, 0
    for m in maps:
        r, c = np.nonzero(m)
        if not 0 < len(r) <= 6:
            continue
        spread.append(np.sqrt((r - r.mean()) ** 2 + (c - c.mean()) ** 2).max())
        top, left, count = top + (r < 6).sum(), left + (c < 6).sum(), count + len(r)
    assert len(spread) > 300 and max(spread) <= 2.5
    assert 0.35 < top / count < 0.65 and 0.35 < left / count < 0.65


def test_csv_comments_with_other_words_and_no_space_after_the_hash(tmp_path):
    path = tmp_path / "maps.csv"
    path.write_text("#chips=3\n# written by hand: rows=2 cols=3\nchip,row,col\n0,1,2\n")
    maps = faults.load_fault_maps(str(path))
    assert maps.shape == (3, 2, 3) and maps.sum() == 1 and maps[0, 1, 2]


def test_a_csv_comment_with_a_count_that_is_not_a_positive_integer_says_so(tmp_path):
    for value in ("two", "0"):
        path = tmp_path / f"comment_{value}.csv"
        path.write_text(f"# chips={value} rows=4 cols=4\nchip,row,col\n0,1,1\n")
        _rejects(path, rf"line 1: chips={value} in the comment is not a positive integer")


def test_a_csv_of_no_chips_is_refused(tmp_path):
    path = tmp_path / "header_only.csv"
    path.write_text("chip,row,col\n")
    _rejects(path, "no chips in the file", rows=4, cols=4)


def test_a_fault_spec_samples_each_chip_at_its_own_rate_with_its_settings():
    spec = faults.FaultSpec("lines", 8, 8, alpha=5.0, line_fraction=0.5)
    rates = [0.0, 0.1, 0.3]
    maps = spec.sample(KEY, rates)
    assert isinstance(maps, np.ndarray) and maps.shape == (3, 8, 8) and maps.dtype == bool
    expected = faults.sample_fault_maps(
        KEY, 3, 8, 8, np.array(rates), "lines", 5.0, line_fraction=0.5
    )
    np.testing.assert_array_equal(maps, expected)
    assert not maps[0].any()
    exact = faults.FaultSpec("exact", 8, 8).sample(KEY, [0.0, 0.125, 0.25])
    assert exact.sum(axis=(1, 2)).tolist() == [0, 8, 16]
