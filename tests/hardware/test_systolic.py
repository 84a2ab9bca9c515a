"""Mapping of kernels onto the R x C array, fault masks and fault rates."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reduce_jax.hardware import systolic
from reduce_jax.stages import grouping

# ----------------------------------------------------------------------- hand-computed masks


def test_dense_kernel_5x3_on_2x2_single_fault():
    # PE (0, 1) faulty: rows k = 0, 2, 4 (k mod 2 == 0) of column n = 1 (n mod 2 == 1).
    fault = np.array([[False, True], [False, False]])
    expected = np.array(
        [
            [1, 0, 1],
            [1, 1, 1],
            [1, 0, 1],
            [1, 1, 1],
            [1, 0, 1],
        ],
        np.float32,
    )
    mask = systolic.kernel_mask((5, 3), jnp.asarray(fault))
    assert mask.shape == (5, 3) and mask.dtype == jnp.float32
    np.testing.assert_array_equal(mask, expected)


def test_dense_kernel_5x3_on_2x2_diagonal_faults():
    fault = np.array([[True, False], [False, True]])
    expected = np.array(
        [
            [0, 1, 0],
            [1, 0, 1],
            [0, 1, 0],
            [1, 0, 1],
            [0, 1, 0],
        ],
        np.float32,
    )
    np.testing.assert_array_equal(systolic.kernel_mask((5, 3), jnp.asarray(fault)), expected)


def test_dense_kernel_5x3_on_3x2_non_square_array():
    # k mod 3 = 0,1,2,0,1 ; n mod 2 = 0,1,0. Faulty PEs: (0, 0) and (2, 1).
    fault = np.zeros((3, 2), bool)
    fault[0, 0] = fault[2, 1] = True
    expected = np.array(
        [
            [0, 1, 0],
            [1, 1, 1],
            [1, 0, 1],
            [0, 1, 0],
            [1, 1, 1],
        ],
        np.float32,
    )
    np.testing.assert_array_equal(systolic.kernel_mask((5, 3), jnp.asarray(fault)), expected)


def test_conv_kernel_2x2x3x2_on_5x2_literal():
    # im2col view is [12, 2] with row k = i*6 + j*3 + c (HWIO, row-major).
    # PE (1, 1) faulty -> k in {1, 6, 11}, output 1: (0,0,1,1), (1,0,0,1), (1,1,2,1).
    # PE (4, 0) faulty -> k in {4, 9}, output 0:     (0,1,1,0), (1,1,0,0).
    fault = np.zeros((5, 2), bool)
    fault[1, 1] = fault[4, 0] = True
    expected = np.ones((2, 2, 3, 2), np.float32)
    for idx in [(0, 0, 1, 1), (1, 0, 0, 1), (1, 1, 2, 1), (0, 1, 1, 0), (1, 1, 0, 0)]:
        expected[idx] = 0.0
    mask = systolic.kernel_mask((2, 2, 3, 2), jnp.asarray(fault))
    assert mask.shape == (2, 2, 3, 2)
    np.testing.assert_array_equal(mask, expected)
    assert systolic.matrix_shape((2, 2, 3, 2)) == (12, 2)
    assert systolic.num_tiles((2, 2, 3, 2), 5, 2) == 3  # ceil(12/5) * ceil(2/2)


def test_conv_kernel_loops_edge_tiles():
    # 3x3x2 conv with 5 outputs -> im2col [18, 5] on a 4x3 array: edge tiles on both dims.
    kh, kw, cin, cout, rows, cols = 3, 3, 2, 5, 4, 3
    fault = np.zeros((rows, cols), bool)
    fault[0, 2] = fault[3, 0] = fault[1, 1] = True
    expected = np.ones((kh, kw, cin, cout), np.float32)
    k = 0
    for i in range(kh):
        for j in range(kw):
            for c in range(cin):
                for o in range(cout):
                    if fault[k % rows, o % cols]:
                        expected[i, j, c, o] = 0.0
                k += 1
    mask = systolic.kernel_mask((kh, kw, cin, cout), jnp.asarray(fault))
    np.testing.assert_array_equal(mask, expected)
    assert systolic.num_tiles((kh, kw, cin, cout), rows, cols) == 5 * 2


def test_kernel_mask_needs_two_dims():
    with pytest.raises(ValueError):
        systolic.kernel_mask((7,), jnp.zeros((2, 2), bool))


def test_pe_load_and_tiles_by_hand():
    params = {"kernel": jax.ShapeDtypeStruct((5, 3), jnp.float32)}
    # rows k mod 2: 3 and 2 weights; cols n mod 2: 2 and 1 weights.
    np.testing.assert_array_equal(systolic.pe_load(params, 2, 2), [[6, 3], [4, 2]])
    assert systolic.num_tiles((5, 3), 2, 2) == 6
    (info,) = systolic.describe_mapping(params, 2, 2)
    assert info["matrix"] == (5, 3) and info["tiles"] == 6
    assert info["utilisation"] == pytest.approx(15 / 24)


# ----------------------------------------------------------------------- masks of a pytree


def _params():
    """A params tree with Dense and Conv kernels (edge tiles on a 4x4 array) and non-kernels."""
    return {
        "conv": {"kernel": jnp.full((3, 3, 1, 6), 0.5), "bias": jnp.full((6,), 0.5)},
        "fc": {"kernel": jnp.full((10, 7), 0.5), "bias": jnp.full((7,), 0.5)},
        "norm": {"scale": jnp.full((7,), 2.0), "offset": jnp.full((7,), 0.5)},
        "half": {"kernel": jnp.full((5, 6), 1.0, jnp.bfloat16)},
    }


def test_weight_masks_ones_for_non_kernels_and_dtypes():
    fault = jnp.ones((4, 4), bool)  # every PE faulty
    masks = systolic.weight_masks(_params(), fault)
    chex.assert_trees_all_equal_shapes_and_dtypes(masks, _params())
    for leaf in (masks["conv"]["bias"], masks["fc"]["bias"]):
        np.testing.assert_array_equal(leaf, 1.0)
    np.testing.assert_array_equal(masks["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(masks["norm"]["offset"], 1.0)
    for leaf in (masks["conv"]["kernel"], masks["fc"]["kernel"], masks["half"]["kernel"]):
        np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0.0)


def _bernoulli(seed, p, shape):
    """Fault maps with each PE faulty with probability ``p``, from numpy: a jax.random draw
    compiles a program for every new shape, which costs more than these tests."""
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def test_weight_masks_vmap_over_chips_equals_loop():
    fault_maps = _bernoulli(3, 0.3, (5, 4, 4))
    params = _params()
    batched = jax.vmap(systolic.weight_masks, in_axes=(None, 0))(params, fault_maps)
    chex.assert_tree_shape_prefix(batched, (5,))
    for i in range(5):
        single = systolic.weight_masks(params, fault_maps[i])
        chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], batched), single)


def test_weight_masks_jit_equals_eager():
    fault = _bernoulli(4, 0.4, (4, 4))
    params = _params()
    eager = systolic.weight_masks(params, fault)
    jitted = jax.jit(systolic.weight_masks)(params, fault)
    chex.assert_trees_all_equal(jitted, eager)
    # The mask actually depends on the fault map (not a constant folded at trace time).
    other = jax.jit(systolic.weight_masks)(params, ~fault)
    assert not np.array_equal(other["fc"]["kernel"], eager["fc"]["kernel"])


def _zeroed_fraction(params, masks):
    zeros = total = 0
    for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
        if systolic.is_kernel_path(path):
            zeros += int(np.sum(np.asarray(m, np.float32) == 0))
            total += m.size
    return zeros / total


def test_effective_fault_rate_counts_zeroed_kernel_weights():
    params = _params()
    fault_maps = _bernoulli(5, 0.25, (6, 4, 4))
    rates = jax.vmap(systolic.effective_fault_rate, in_axes=(None, 0))(params, fault_maps)
    assert rates.shape == (6,)
    for i in range(6):
        masks = systolic.weight_masks(params, fault_maps[i])
        expected = _zeroed_fraction(params, masks)
        assert float(systolic.effective_fault_rate(params, fault_maps[i])) == pytest.approx(
            expected, abs=1e-6
        )
        assert float(rates[i]) == pytest.approx(expected, abs=1e-6)
    # The layers do not fill whole tiles here, so the rates differ from the PE rate somewhere.
    pe_rates = systolic.pe_fault_rate(fault_maps)
    assert not np.allclose(rates, pe_rates, atol=1e-4)


def test_effective_fault_rate_equals_pe_rate_for_whole_tiles():
    params = {
        "a": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros((4,))},
        "b": {"kernel": jnp.zeros((2, 2, 1, 8))},  # im2col [4, 8]
        "c": {"kernel": jnp.zeros((12, 12))},
    }
    fault_maps = _bernoulli(6, 0.3, (8, 4, 4))
    for fault in fault_maps:
        assert float(systolic.effective_fault_rate(params, fault)) == pytest.approx(
            float(np.mean(np.asarray(fault))), abs=1e-6
        )
        masks = systolic.weight_masks(params, fault)
        assert _zeroed_fraction(params, masks) == pytest.approx(float(np.mean(fault)), abs=1e-9)


def test_effective_fault_rate_without_kernels_raises():
    with pytest.raises(ValueError, match="kernel"):
        systolic.effective_fault_rate({"bias": jnp.zeros(3)}, jnp.zeros((2, 2), bool))


def test_pe_fault_rate_batched():
    maps = np.zeros((3, 2, 5), bool)
    maps[1, 0, :2] = True
    maps[2] = True
    np.testing.assert_allclose(systolic.pe_fault_rate(maps), [0.0, 0.2, 1.0])


def test_is_kernel_path_on_flax_params(tiny_mlp_params):
    names = {
        "/".join(p.key for p in path): systolic.is_kernel_path(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tiny_mlp_params)[0]
    }
    assert names == {
        "fc1/kernel": True,
        "fc1/bias": False,
        "out/kernel": True,
        "out/bias": False,
    }
    assert not systolic.is_kernel_path(())


# ----------------------------------------------------------------------- property tests

_conv_shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 9))
_dense_shapes = st.tuples(st.integers(1, 30), st.integers(1, 30))
_shapes = st.one_of(_dense_shapes, _conv_shapes)
_dims = st.integers(1, 7)


@st.composite
def _shape_and_faults(draw, nested=False):
    shape = draw(_shapes)
    rows, cols = draw(_dims), draw(_dims)
    bits = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    fault = np.array(bits, bool).reshape(rows, cols)
    if not nested:
        return shape, fault
    extra = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    return shape, fault, fault | np.array(extra, bool).reshape(rows, cols)


@settings(max_examples=50, deadline=None)
@given(_shape_and_faults())
def test_every_weight_maps_to_exactly_one_pe(case):
    shape, fault = case
    rows, cols = fault.shape
    k, n = systolic.matrix_shape(shape)
    assert k * n == int(np.prod(shape))
    pe_row, pe_col = systolic.pe_coordinates(shape, rows, cols)
    pe_row, pe_col = np.broadcast_arrays(pe_row, pe_col)
    assert pe_row.shape == (k, n)
    assert pe_row.min() >= 0 and pe_row.max() < rows
    assert pe_col.min() >= 0 and pe_col.max() < cols
    counts = np.zeros((rows, cols), np.int64)
    np.add.at(counts, (pe_row.ravel(), pe_col.ravel()), 1)
    assert counts.sum() == k * n  # each weight counted once
    load = systolic.pe_load({"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}, rows, cols)
    np.testing.assert_array_equal(counts, load)
    # The tiles cover the matrix: no PE holds more weights than there are tiles.
    assert load.max() <= systolic.num_tiles(shape, rows, cols)


@settings(max_examples=25, deadline=None)
@given(_shape_and_faults(nested=True))
def test_mask_zeroes_exactly_faulty_pes_and_more_faults_never_give_a_larger_mask(case):
    # Compiling the gather for a new shape dominates the cost, so both properties share
    # one example (fault_a is a subset of fault_b, same shapes).
    shape, fault_a, fault_b = case
    rows, cols = fault_a.shape
    assert np.all(fault_b >= fault_a)
    params = {"layer": {"kernel": jnp.ones(shape), "bias": jnp.ones(shape[-1:])}}
    mask_a = systolic.weight_masks(params, jnp.asarray(fault_a))
    mask_b = systolic.weight_masks(params, jnp.asarray(fault_b))
    kernel_a = np.asarray(mask_a["layer"]["kernel"])
    assert kernel_a.shape == tuple(shape)
    assert set(np.unique(kernel_a)) <= {0.0, 1.0}
    k, n = systolic.matrix_shape(shape)
    matrix = kernel_a.reshape(k, n)
    for kk, nn in itertools.product(range(k), range(n)):
        assert matrix[kk, nn] == (0.0 if fault_a[kk % rows, nn % cols] else 1.0)
    # The number of zeroed weights is the load on the faulty PEs.
    load = systolic.pe_load(params, rows, cols)
    assert int((kernel_a == 0).sum()) == int(load[fault_a].sum())
    # Monotone: more faulty PEs never unmask a weight.
    assert np.all(np.asarray(mask_b["layer"]["kernel"]) <= kernel_a)
    assert int((np.asarray(mask_b["layer"]["kernel"]) == 0).sum()) == int(load[fault_b].sum())
    np.testing.assert_array_equal(mask_a["layer"]["bias"], 1.0)
    np.testing.assert_array_equal(mask_b["layer"]["bias"], 1.0)


@settings(max_examples=25, deadline=None)
@given(
    members=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    rate=st.floats(0.0, 0.5),
)
def test_fused_map_is_superset_and_its_masks_bypass_every_member(members, seed, rate):
    maps = np.random.default_rng(seed).random((members, 4, 6)) < rate
    fused = np.asarray(grouping.fuse(maps))
    assert fused.shape == (4, 6)
    for m in maps:
        assert not (m & ~fused).any()  # superset
    params = {"dense": {"kernel": np.ones((9, 7), np.float32)}}
    fused_mask = np.asarray(systolic.weight_masks(params, fused)["dense"]["kernel"])
    for m in maps:
        member_mask = np.asarray(systolic.weight_masks(params, m)["dense"]["kernel"])
        assert (fused_mask <= member_mask).all()


def test_rates_and_loads_are_float64_as_documented():
    rng = np.random.default_rng(0)
    params = {
        "fc1": {"kernel": rng.normal(size=(64, 16)).astype(np.float32), "bias": np.ones(16)},
        "fc2": {"kernel": rng.normal(size=(16, 10)).astype(np.float32)},
    }
    load = systolic.magnitude_load(params, 8, 8)
    assert load.dtype == np.float64
    assert load.sum() == pytest.approx(2.0, abs=1e-12)  # normalised in float64, per kernel
    maps = rng.random((5, 8, 8)) < 0.2
    rates = systolic.chip_rates({"pe": np.full((8, 8), 1 / 64), "load": load / 2}, maps)
    for rate in rates.values():
        assert rate.dtype == np.float64 and rate.shape == (5,)
    np.testing.assert_allclose(rates["pe"], maps.mean(axis=(1, 2)), rtol=1e-6)


def test_kernels_in_a_list_of_layers_are_named_by_their_index():
    params = {"layers": [{"kernel": np.zeros((3, 4))}, {"kernel": np.zeros((4, 2))}]}
    names = [m["name"] for m in systolic.describe_mapping(params, 2, 2)]
    assert names == ["layers/[0]/kernel", "layers/[1]/kernel"]


def test_check_mappable_names_a_grouped_convolution_and_a_kernel_of_another_rank():
    conv = {"block": {"conv": {"kernel": np.zeros((3, 3, 4, 8))}}}
    systolic.check_mappable(conv, {("params", "block", "conv", "kernel"): 4})  # 4 channels in
    with pytest.raises(
        systolic.MappingError,
        match=r"^parameter params/block/conv/kernel \[3, 3, 4, 8\] is a grouped or depthwise "
        r"convolution \(16 input channels, 4 per group\)",
    ):
        systolic.check_mappable(conv, {("params", "block", "conv", "kernel"): 16})
    with pytest.raises(
        systolic.MappingError, match=r"^parameter params/k/kernel has shape \[2, 2, 2\]"
    ):
        systolic.check_mappable({"k": {"kernel": np.zeros((2, 2, 2))}})
