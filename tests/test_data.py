"""Tests for reduce_jax.data: built-in datasets, IDX parsing and CIFAR pickles."""

import gzip
import os
import pickle
import tarfile

import numpy as np
import pytest

from reduce_jax import data
from reduce_jax.data import DATASETS, Dataset, DatasetError, load_dataset, validate_dataset_files


def _raises(match_substring, fn, *args):
    """Calls fn(*args), expects DatasetError with a one-line message containing the substring."""
    with pytest.raises(DatasetError) as info:
        fn(*args)
    message = str(info.value)
    assert match_substring in message, message
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- built-in sets


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


def test_mnist5k_shapes_dtypes_ranges(mnist5k):
    ds = mnist5k
    assert ds.name == "mnist5k" and ds.num_classes == 10
    assert ds.train_images.shape == (4000, 28, 28, 1)
    assert ds.test_images.shape == (1000, 28, 28, 1)
    assert ds.train_labels.shape == (4000,) and ds.test_labels.shape == (1000,)
    assert ds.image_shape == (28, 28, 1)
    for images in (ds.train_images, ds.test_images):
        assert images.dtype == np.float32
        assert images.min() == 0.0 and images.max() == 1.0
    for labels in (ds.train_labels, ds.test_labels):
        assert labels.dtype == np.int32
        assert set(np.unique(labels)) == set(range(10))


def test_mnist5k_stratified(mnist5k):
    test_counts = np.bincount(mnist5k.test_labels, minlength=10)
    total = test_counts + np.bincount(mnist5k.train_labels, minlength=10)
    share = test_counts / total
    assert np.all((share >= 0.17) & (share <= 0.23)), share


def test_mnist5k_deterministic(mnist5k):
    again = load_dataset("mnist5k")
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(mnist5k, field), getattr(again, field))
    # Train and test are disjoint: no test image appears in train.
    train_rows = {row.tobytes() for row in mnist5k.train_images[:, ::4, ::4, 0]}
    hits = sum(row.tobytes() in train_rows for row in mnist5k.test_images[:, ::4, ::4, 0])
    assert hits < 5  # allow the odd coincidental duplicate at 7x7 subsampling


def test_digits_shapes():
    ds = load_dataset("digits")
    assert ds.train_images.shape == (1437, 8, 8, 1)
    assert ds.test_images.shape == (360, 8, 8, 1)
    assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
    assert ds.train_images.dtype == np.float32 and ds.test_labels.dtype == np.int32
    assert ds.train_images.min() == 0.0 and ds.train_images.max() == 1.0
    assert np.all(np.bincount(ds.test_labels, minlength=10) >= 35)


def test_unknown_name_and_missing_data_dir(tmp_path):
    message = _raises("'imagenet'", load_dataset, "imagenet")
    assert all(name in message for name in DATASETS)
    for name in ("mnist", "cifar10", "cifar100"):
        _raises("--data_dir", load_dataset, name)
        _raises("--data_dir", validate_dataset_files, name, None)
    _raises("not a directory", load_dataset, "mnist", str(tmp_path / "nope"))
    validate_dataset_files("mnist5k")
    validate_dataset_files("digits", None)


def test_dataset_shape_mismatch_raises():
    images = np.zeros((3, 4, 4, 1), np.float32)
    labels = np.zeros((3,), np.int32)
    with pytest.raises(DatasetError):
        Dataset(images, labels[:2], images, labels, num_classes=10, name="x")
    with pytest.raises(DatasetError):
        Dataset(images, labels, np.zeros((3, 5, 5, 1), np.float32), labels, 10, "x")


# ----------------------------------------------------------------------------------- IDX


def _idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path, payload, gz):
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_mnist(directory, gz=False, n_train=20, n_test=10):
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for name, array in arrays.items():
        _write(directory / name, _idx_bytes(array, 0x803 if array.ndim == 3 else 0x801), gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz=gz)
    validate_dataset_files("mnist", str(tmp_path))
    ds = load_dataset("mnist", str(tmp_path))
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
    assert ds.train_images.shape == (20, 28, 28, 1) and ds.test_images.shape == (10, 28, 28, 1)
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(
        np.rint(ds.train_images[..., 0] * 255).astype(np.uint8), arrays["train-images-idx3-ubyte"]
    )
    np.testing.assert_array_equal(
        np.rint(ds.test_images[..., 0] * 255).astype(np.uint8), arrays["t10k-images-idx3-ubyte"]
    )
    np.testing.assert_array_equal(ds.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert ds.train_images.max() <= 1.0 and ds.train_images.min() >= 0.0


def test_idx_truncated(tmp_path):
    _write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    _raises("train-images-idx3-ubyte", load_dataset, "mnist", str(tmp_path))


def test_idx_wrong_magic(tmp_path):
    _write_mnist(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes((0x803).to_bytes(4, "big") + path.read_bytes()[4:])
    message = _raises("t10k-labels-idx1-ubyte", load_dataset, "mnist", str(tmp_path))
    assert "magic" in message


def test_idx_missing_file(tmp_path):
    _write_mnist(tmp_path, gz=True)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    for fn in (load_dataset, validate_dataset_files):
        message = _raises("t10k-labels-idx1-ubyte", fn, "mnist", str(tmp_path))
        assert str(tmp_path) in message and "train-images-idx3-ubyte" in message


def test_idx_count_mismatch_and_bad_gzip(tmp_path):
    _write_mnist(tmp_path)
    labels = np.zeros(19, np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 0x801))
    _raises("train-labels-idx1-ubyte", load_dataset, "mnist", str(tmp_path))
    os.remove(tmp_path / "train-labels-idx1-ubyte")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    _raises("train-labels-idx1-ubyte.gz", load_dataset, "mnist", str(tmp_path))


# --------------------------------------------------------------------------------- CIFAR


_CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
    ),
    "cifar100": (
        "cifar-100-python.tar.gz",
        "cifar-100-python",
        ["train"],
        ["test"],
        b"fine_labels",
    ),
}


def _cifar_batch(seed, n, label_key, num_classes):
    rng = np.random.default_rng(seed)
    batch_data = rng.integers(0, 200, (n, 3072), dtype=np.uint8)
    pixels = batch_data.reshape(n, 3, 32, 32)
    pixels[0, 0, 0, 1] = 255  # red channel of pixel (row 0, col 1) of image 0
    pixels[0, 1, 2, 3] = 201  # green channel of pixel (row 2, col 3)
    pixels[0, 2, 31, 0] = 202  # blue channel of pixel (row 31, col 0)
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    return {
        b"batch_label": b"testing batch",
        label_key: labels,
        b"data": batch_data,
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def _write_cifar(directory, name, as_archive, n=4, protocol=pickle.HIGHEST_PROTOCOL):
    """Writes tiny CIFAR batches; returns {member: batch dict}."""
    archive, folder, train, test, label_key = _CIFAR_LAYOUT[name]
    num_classes = 10 if name == "cifar10" else 100
    batches = {m: _cifar_batch(i, n, label_key, num_classes) for i, m in enumerate(train + test)}
    (directory / folder).mkdir()
    for member, batch in batches.items():
        (directory / folder / member).write_bytes(pickle.dumps(batch, protocol=protocol))
    if as_archive:
        with tarfile.open(directory / archive, "w:gz") as tar:
            tar.add(directory / folder, arcname=folder)
        for member in batches:
            os.remove(directory / folder / member)
        os.rmdir(directory / folder)
    return batches


@pytest.mark.parametrize("as_archive", [False, True], ids=["folder", "archive"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_load(tmp_path, name, as_archive):
    batches = _write_cifar(tmp_path, name, as_archive)
    _, _, train, test, label_key = _CIFAR_LAYOUT[name]
    validate_dataset_files(name, str(tmp_path))
    ds = load_dataset(name, str(tmp_path))
    assert ds.name == name and ds.num_classes == (10 if name == "cifar10" else 100)
    assert ds.train_images.shape == (4 * len(train), 32, 32, 3)
    assert ds.test_images.shape == (4, 32, 32, 3) and ds.image_shape == (32, 32, 3)
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    # NHWC conversion of known pixels in the first training image.
    assert ds.train_images[0, 0, 1, 0] == 1.0
    assert ds.train_images[0, 2, 3, 1] == np.float32(201) / np.float32(255)
    assert ds.train_images[0, 31, 0, 2] == np.float32(202) / np.float32(255)
    # Full round trip, batches concatenated in order.
    expected = np.concatenate([batches[m][b"data"] for m in train])
    expected = expected.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.rint(ds.train_images * 255).astype(np.uint8), expected)
    np.testing.assert_array_equal(ds.train_labels, sum((batches[m][label_key] for m in train), []))
    np.testing.assert_array_equal(ds.test_labels, batches[test[0]][label_key])


def test_cifar_legacy_numpy_core_pickle(tmp_path):
    """Original CIFAR pickles (Python 2, old numpy) reference numpy.core.multiarray."""
    _, folder, _, _, _ = _CIFAR_LAYOUT["cifar100"]
    _write_cifar(tmp_path, "cifar100", as_archive=False, protocol=2)
    for member in ("train", "test"):
        path = tmp_path / folder / member
        raw = path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        path.write_bytes(raw)
    assert b"numpy.core.multiarray" in (tmp_path / folder / "train").read_bytes()
    ds = load_dataset("cifar100", str(tmp_path))
    assert ds.train_images[0, 0, 1, 0] == 1.0


def test_cifar_malformed_pickle_folder(tmp_path):
    _write_cifar(tmp_path, "cifar10", as_archive=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    _raises("data_batch_3", load_dataset, "cifar10", str(tmp_path))


def test_cifar_malformed_pickle_archive(tmp_path):
    _write_cifar(tmp_path, "cifar100", as_archive=False)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"this is not a pickle")
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-100-python", arcname="cifar-100-python")
    for member in ("train", "test"):
        os.remove(tmp_path / "cifar-100-python" / member)
    os.rmdir(tmp_path / "cifar-100-python")
    message = _raises("cifar-100-python/test", load_dataset, "cifar100", str(tmp_path))
    assert "cifar-100-python.tar.gz" in message


@pytest.mark.parametrize(
    "batch, expected",
    [
        ({b"labels": [0] * 4}, "b'data'"),
        ({b"data": np.zeros((4, 3072), np.uint8)}, "b'labels'"),
        ({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, "3072"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "b'labels'"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, "0..9"),
        ([1, 2, 3], "dict"),
    ],
)
def test_cifar_bad_contents(tmp_path, batch, expected):
    _write_cifar(tmp_path, "cifar10", as_archive=False)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch))
    message = _raises("test_batch", load_dataset, "cifar10", str(tmp_path))
    assert expected in message


def test_cifar_pickle_with_code_is_rejected(tmp_path):
    _write_cifar(tmp_path, "cifar10", as_archive=False)
    payload = pickle.dumps({b"data": data.DatasetError("x"), b"labels": []})
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(payload)
    message = _raises("data_batch_1", load_dataset, "cifar10", str(tmp_path))
    assert "not allowed" in message


def test_cifar_missing_files(tmp_path):
    for name in ("cifar10", "cifar100"):
        for fn in (load_dataset, validate_dataset_files):
            _raises(_CIFAR_LAYOUT[name][0], fn, name, str(tmp_path))
    _write_cifar(tmp_path, "cifar10", as_archive=False)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_5")
    for fn in (load_dataset, validate_dataset_files):
        _raises("data_batch_5", fn, "cifar10", str(tmp_path))


def test_cifar_archive_missing_member(tmp_path):
    _write_cifar(tmp_path, "cifar10", as_archive=False)
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for member in os.listdir(tmp_path / "cifar-10-batches-py"):
        os.remove(tmp_path / "cifar-10-batches-py" / member)
    os.rmdir(tmp_path / "cifar-10-batches-py")
    _raises("cifar-10-batches-py/test_batch", load_dataset, "cifar10", str(tmp_path))


def test_validation_split_is_stratified_disjoint_and_deterministic(digits):
    split = data.split_validation(digits, 0.1)
    assert len(split.val_labels) == round(0.1 * len(digits.train_labels))
    assert len(split.train_labels) + len(split.val_labels) == len(digits.train_labels)
    # Every training image lands in exactly one of the two parts.
    flat = lambda x: {bytes(row) for row in x.reshape(len(x), -1)}  # noqa: E731
    train, val = flat(split.train_images), flat(split.val_images)
    assert not train & val and train | val == flat(digits.train_images)
    # Stratified: each class's share of the validation split is its share of the training set.
    for c in range(10):
        share = np.mean(digits.train_labels == c)
        assert abs(np.mean(split.val_labels == c) - share) < 0.02
    again = data.split_validation(digits, 0.1)
    np.testing.assert_array_equal(again.val_labels, split.val_labels)
    np.testing.assert_array_equal(again.val_images, split.val_images)
    np.testing.assert_array_equal(split.test_images, digits.test_images)  # untouched


def test_validation_split_refuses_what_cannot_be_stratified():
    one_of_a_kind = data.Dataset(
        train_images=np.zeros((5, 2, 2, 1), np.float32),
        train_labels=np.array([0, 0, 0, 0, 1], np.int32),
        test_images=np.zeros((2, 2, 2, 1), np.float32),
        test_labels=np.array([0, 1], np.int32),
        num_classes=2,
        name="tiny",
    )
    with pytest.raises(data.DatasetError, match="--validation_fraction=0.4"):
        data.split_validation(one_of_a_kind, 0.4)


# --------------------------------------------------------------------- your own arrays, npz


def _arrays(n=6, shape=(4, 4, 1), dtype=np.uint8, classes=3):
    rng = np.random.default_rng(0)
    x = (rng.random((n, *shape)) * 255).astype(dtype)
    y = np.arange(n) % classes
    return dict(x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])


def test_from_arrays_scales_uint8_keeps_float_and_infers_classes():
    a = _arrays()
    ds = Dataset.from_arrays(*a.values(), name="mine")
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images, a["x_train"].astype(np.float32) / 255)
    assert ds.num_classes == 3 and ds.image_shape == (4, 4, 1) and ds.name == "mine"
    f = _arrays(dtype=np.float64)
    ds = Dataset.from_arrays(*f.values(), num_classes=5)
    np.testing.assert_array_equal(ds.test_images, f["x_test"].astype(np.float32))
    assert ds.num_classes == 5


@pytest.mark.parametrize(
    "change, needle",
    [
        (
            dict(x_train=np.zeros((6, 4, 4, 1), np.int16)),
            "x_train must be uint8 (scaled to [0, 1]) or float images [N, H, W, C], or "
            "[N, H, W] (one channel added); got int16[6, 4, 4, 1]",
        ),
        (dict(x_test=np.zeros((4, 16), np.float32)), "x_test must be uint8"),
        (dict(x_test=np.zeros((4, 4, 4, 1, 1), np.uint8)), "got uint8[4, 4, 4, 1, 1]"),
        (dict(x_val=np.zeros((3, 4, 4, 1), np.uint8)), "give both x_val and y_val"),
        (
            dict(x_val=np.zeros((3, 4, 4, 1), np.uint8), y_val=np.arange(2)),
            "x_val has 3 images and y_val 2 labels",
        ),
        (
            dict(x_val=np.zeros((3, 5, 4, 1), np.uint8), y_val=np.arange(3)),
            "x_train images are [4, 4, 1] but x_val images are [5, 4, 1]",
        ),
        (dict(y_train=np.zeros(6, np.float32)), "y_train must be integer labels"),
        (dict(y_test=np.zeros((4, 1), int)), "y_test must be integer labels [N]"),
        (dict(y_train=np.zeros(5, int)), "x_train has 6 images and y_train 5 labels"),
        (dict(x_test=np.zeros((4, 5, 4, 1), np.uint8)), "x_train images are [4, 4, 1]"),
        (dict(x_train=np.full((6, 4, 4, 1), np.nan)), "x_train has NaN or infinite"),
        (dict(y_test=np.array([0, 1, 2, -1])), "y_test has labels in [-1, 2]"),
        (dict(num_classes=2), "y_train has labels in [0, 2], outside [0, 2)"),
        (dict(num_classes=1), "num_classes=1 must be >= 2"),
        (dict(x_train=np.zeros((0, 4, 4, 1), np.uint8), y_train=np.zeros(0, int)), "at least 1"),
    ],
)
def test_from_arrays_names_the_bad_array(change, needle):
    a = _arrays()
    num_classes = change.pop("num_classes", None)
    val = {k: change.pop(k) for k in ("x_val", "y_val") if k in change}
    arrays = {**a, **change}.values()
    _raises(needle, lambda: Dataset.from_arrays(*arrays, **val, num_classes=num_classes))


def test_from_arrays_adds_a_channel_to_images_without_one():
    a = _arrays(shape=(4, 4, 1))
    flat = {k: v[..., 0] if k[0] == "x" else v for k, v in a.items()}  # uint8[N, 4, 4]
    ds = Dataset.from_arrays(*flat.values())
    assert ds.image_shape == (4, 4, 1) and ds.train_images.dtype == np.float32
    np.testing.assert_array_equal(ds.train_images, a["x_train"].astype(np.float32) / 255)
    floats = Dataset.from_arrays(
        *{k: v / 255.0 if k[0] == "x" else v for k, v in flat.items()}.values()
    )
    np.testing.assert_allclose(floats.test_images, ds.test_images, atol=1e-6)


def test_from_arrays_keeps_a_given_validation_split():
    a = _arrays(classes=4)
    x_val, y_val = a["x_train"][:3, ..., 0], np.array([3, 0, 1])  # [N, H, W] uint8 too
    ds = Dataset.from_arrays(*a.values(), x_val=x_val, y_val=y_val)
    assert ds.num_classes == 4 and ds.val_images.shape == (3, 4, 4, 1)
    np.testing.assert_array_equal(ds.val_images[..., 0], x_val.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.val_labels, y_val)
    assert len(ds.train_labels) == 6  # nothing held out of the training set
    with pytest.raises(ValueError, match="already has a validation split"):
        data.split_validation(ds, 0.1)


def test_packaged_datasets_refuse_a_data_dir(tmp_path):
    for name in data.PACKAGED:
        for fn in (validate_dataset_files, load_dataset):
            message = _raises(
                f"--data_dir={tmp_path} is given but --dataset={name}", fn, name, str(tmp_path)
            )
            assert "reads no files" in message and "npz" in message


def test_constructor_validates_dtypes_and_labels():
    x, y = np.zeros((3, 4, 4, 1), np.float32), np.array([0, 1, 2])
    Dataset(x, y, x, y, num_classes=3)
    _raises("dataset 'u': train_images must be float", Dataset, x.astype(np.uint8), y, x, y, 3, "u")
    _raises("dataset 'arrays': test_labels has labels in [0, 2]", Dataset, x, y[:3] % 2, x, y, 2)


def test_npz_dataset_loads_and_names_file_and_key(tmp_path):
    a = _arrays()
    np.savez(tmp_path / "ok.npz", **a)
    validate_dataset_files("npz", str(tmp_path / "ok.npz"))
    ds = load_dataset("npz", str(tmp_path / "ok.npz"))
    assert ds.name == "npz" and ds.num_classes == 3 and ds.train_images.max() <= 1.0
    np.testing.assert_array_equal(ds.test_labels, a["y_test"])
    np.savez(tmp_path / "short.npz", **{k: v for k, v in a.items() if k != "x_test"})
    for fn in (validate_dataset_files, load_dataset):
        _raises("short.npz: missing array 'x_test'", fn, "npz", str(tmp_path / "short.npz"))
    np.savez(tmp_path / "bad.npz", **dict(a, y_train=a["y_train"] + 0.5))
    _raises(
        "bad.npz: y_train must be integer labels", load_dataset, "npz", str(tmp_path / "bad.npz")
    )
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _raises(
        "junk.npz: not a readable .npz", validate_dataset_files, "npz", str(tmp_path / "junk.npz")
    )
    _raises("--data_dir=FILE.npz", validate_dataset_files, "npz", None)
    _raises("is not a file", validate_dataset_files, "npz", str(tmp_path))


def test_npz_dataset_with_uint8_images_without_channels_and_its_own_validation_split(tmp_path):
    a = _arrays(n=8, classes=4)
    flat = {k: v[..., 0] if k[0] == "x" else v for k, v in a.items()}
    np.savez(tmp_path / "hw.npz", **flat)
    ds = load_dataset("npz", str(tmp_path / "hw.npz"))
    assert ds.image_shape == (4, 4, 1) and ds.val_images is None
    np.testing.assert_array_equal(ds.train_images, a["x_train"].astype(np.float32) / 255)
    np.savez(tmp_path / "val.npz", **flat, x_val=flat["x_test"][:2], y_val=np.array([1, 3]))
    validate_dataset_files("npz", str(tmp_path / "val.npz"))
    ds = load_dataset("npz", str(tmp_path / "val.npz"))
    assert ds.val_images.shape == (2, 4, 4, 1) and list(ds.val_labels) == [1, 3]
    np.savez(tmp_path / "half.npz", **flat, y_val=np.array([1, 3]))
    for fn in (validate_dataset_files, load_dataset):
        _raises("half.npz: holds only one of x_val, y_val", fn, "npz", str(tmp_path / "half.npz"))
    np.savez(tmp_path / "int.npz", **dict(flat, x_train=flat["x_train"].astype(np.int32)))
    _raises("int.npz: x_train must be uint8", load_dataset, "npz", str(tmp_path / "int.npz"))
