"""Atomic file writers: JSON, text and CSV are written to a temporary name in the same
directory, flushed and fsynced, then ``os.replace``d, so an interrupted run never leaves a
truncated file and a repeated run never destroys the previous one before the new one is whole.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os


def _check_finite(obj, path: str = "$") -> None:
    """Raises ``ValueError`` naming the key path of the first NaN or infinite float."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite value {obj!r} at {path}; convert inf to None first")
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_finite(value, f"{path}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_finite(value, f"{path}[{i}]")


def replace_atomic(path: str, write, binary: bool = False, tmp_suffix: str = ".tmp") -> None:
    """Calls ``write(file)`` on ``path + tmp_suffix``, fsyncs, then renames onto ``path``."""
    tmp = path + tmp_suffix
    kwargs = {} if binary else {"encoding": "utf-8", "newline": ""}
    try:
        with open(tmp, "wb" if binary else "w", **kwargs) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    """Writes ``obj`` as JSON (``indent=1``) to ``path`` atomically.

    Args:
      path: destination file.
      obj: JSON-serialisable plain Python values, with no NaN or infinity.

    Raises:
      ValueError: a float is NaN or infinite (the message names its key path, e.g.
        ``$.resilience.accuracy[0][1][2]``). ``path`` is left untouched.
      TypeError: ``obj`` is not serialisable. ``path`` is left untouched.
    """
    _check_finite(obj)
    # Serialise fully before touching the disk, so a failure leaves no temporary file.
    text = json.dumps(obj, indent=1, allow_nan=False)
    replace_atomic(path, lambda f: f.write(text + "\n"))


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    replace_atomic(path, lambda f: f.write(text))


def write_csv_atomic(path: str, rows: list[dict]) -> None:
    """Writes ``rows`` as CSV atomically; the header is the first row's keys, ``None`` -> ``""``.

    An empty ``rows`` writes an empty file.
    """
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)  # DictWriter writes None as an empty cell.
    write_text_atomic(path, buf.getvalue())
