"""Durable file writes."""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where arrays are written: reading an audit log needs none
    import numpy as np

__all__ = ["atomic_write", "fsync_dir", "load_arrays_npz", "remove_stale_temporaries", "save_arrays_npz",
           "unwritable_reason"]


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


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves beside ``path`` when it is
    killed (SIGKILL, power cut) between creating and renaming one (``.<name>.<random>.tmp``).

    Call it only while holding whatever lock makes the caller the one writer of ``path``
    (the audit log's lock, for its checkpoint), so that no write in progress is removed.
    Returns the files removed.
    """
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and not entry.is_symlink() and entry.is_file():
            with suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    if removed:
        fsync_dir(path.parent)
    return removed


def unwritable_reason(directory: Path, files: tuple[str, ...] = ()) -> str | None:
    """Why ``directory`` (and the named files in it that exist) cannot be written, or ``None``.

    Probes without changing anything that exists: a folder is probed by creating and
    removing an empty temporary file in it (or, if it does not exist yet, in the nearest
    folder above it that does); an existing file by opening it for appending and closing
    it. Call it before a command changes anything, so that an unwritable folder is an
    input error reported up front, not a failure half-way through.
    """
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            return f"{directory}: no folder above it exists"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe}: is not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=probe)
    except OSError as exc:
        return f"{probe}: cannot be written ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(name)
    if probe == directory:
        for file_name in files:
            path = directory / file_name
            if not path.exists():
                continue
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
            except OSError as exc:
                return f"{path}: cannot be written ({exc.strerror or exc})"
            os.close(fd)
    return None


def save_arrays_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write named arrays as one ``.npz`` file, atomically (numeric arrays only, no pickle)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(a) for name, a in arrays.items()})
    atomic_write(path, buf.getvalue())


def load_arrays_npz(path: Path) -> dict[str, np.ndarray]:
    """Read an ``.npz`` file written by :func:`save_arrays_npz`; never unpickles.

    Raises:
        ValueError: the file holds object arrays (which would need pickle) or is not an npz.
    """
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
