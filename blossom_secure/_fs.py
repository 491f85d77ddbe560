"""Durable file writes."""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import suppress
from pathlib import Path

import numpy as np

__all__ = ["atomic_write", "fsync_dir", "load_arrays_npz", "save_arrays_npz"]


def fsync_dir(directory: Path) -> None:
    """Make a rename or file creation in ``directory`` durable."""
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - not POSIX
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a uniquely named temporary file in the same folder
    (created with ``mode``), fsync, rename, fsync the folder. Readers and crashes see the
    old or the new content, never a mix; a failed write leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def save_arrays_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write named arrays as one ``.npz`` file, atomically (numeric arrays only, no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(a) for name, a in arrays.items()})
    atomic_write(path, buf.getvalue())


def load_arrays_npz(path: Path) -> dict[str, np.ndarray]:
    """Read an ``.npz`` file written by :func:`save_arrays_npz`; never unpickles.

    Raises:
        ValueError: the file holds object arrays (which would need pickle) or is not an npz.
    """
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
