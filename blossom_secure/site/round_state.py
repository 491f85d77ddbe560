"""The site's secure-aggregation round state on disk.

A deployment runtime (Flower runs a ClientApp in a fresh process for every message) saves
the site's stage machine after every stage and restores it in the next process
(:meth:`SiteStageMachine.export_state`, :meth:`SiteStageMachine.from_state`). The bytes go
to one file per round in the site's own state folder, ``<state_dir>/secagg-round-<round>.json``,
created with mode 0600 in a folder created with mode 0700, and replaced atomically
(:func:`blossom_secure._fs.atomic_write`): a crash leaves the old state or the new one,
never a mix.

This is the I/O layer around the pure codec of :mod:`blossom_secure.secagg.site_state`
(the secure-aggregation core does no file I/O). The order that makes a restart safe is
the caller's: save the state returned after a stage *before* that stage's message
leaves the site, and discard it only once the round is over.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from blossom_secure._fs import atomic_write, fsync_dir
from blossom_secure.secagg.site_state import MAX_STATE_BYTES, SiteStateError

__all__ = ["discard_round_state", "load_round_state", "read_private_file", "round_state_path", "save_round_state"]

logger = logging.getLogger(__name__)

_FILE_MODE = 0o600
_DIR_MODE = 0o700
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def round_state_path(state_dir: Path, round_id: int) -> Path:
    """The state file of ``round_id`` in ``state_dir``: ``secagg-round-<round>.json``.

    Raises:
        ValueError: ``round_id`` is not an int in 0..2**64-1.
    """
    if not isinstance(round_id, int) or isinstance(round_id, bool) or not 0 <= round_id < 1 << 64:
        raise ValueError("round_id must be an int in 0..2**64-1")
    return Path(state_dir) / f"secagg-round-{round_id}.json"


def save_round_state(state_dir: Path, round_id: int, data: bytes) -> Path:
    """Write (or replace) the state of ``round_id``, atomically and durably.

    Args:
        state_dir: The site's state folder (created with mode 0700 if missing).
        round_id: The round.
        data: The bytes :meth:`SiteStageMachine.export_state` returned.

    Returns:
        The path written.

    Raises:
        TypeError: ``data`` is not bytes.
        ValueError: a bad ``round_id``, or ``data`` longer than ``MAX_STATE_BYTES``.
        OSError: the folder or file cannot be written (the old state is then intact).

    Notes:
        The file holds the round's private keys and seeds until the unmask stage is
        done: it is created 0600 (never readable by others, not even briefly, since the
        temporary file gets its mode before any byte is written) and fsynced, then
        renamed over the old one, and the rename fsynced, before this returns, so a
        message sent after it can never be followed by a restart from an older state.
    """
    path = round_state_path(state_dir, round_id)
    if not isinstance(data, bytes):
        raise TypeError("a state is bytes")
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"a state is at most {MAX_STATE_BYTES} bytes")
    path.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    atomic_write(path, data, mode=_FILE_MODE)
    logger.debug("saved the secure-aggregation state of round %d", round_id)
    return path


def load_round_state(state_dir: Path, round_id: int, *, max_bytes: int = MAX_STATE_BYTES) -> bytes | None:
    """Read the state of ``round_id``, or ``None`` if there is none.

    Args:
        state_dir: The site's state folder.
        round_id: The round.
        max_bytes: Length limit, checked before reading.

    Returns:
        The bytes to pass to :meth:`SiteStageMachine.from_state` (which checks them), or
        ``None`` if the file does not exist.

    Raises:
        ValueError: a bad ``round_id``.
        SiteStateError: the file is a symbolic link or not a regular file, is readable
            or writable by group or others, or is longer than ``max_bytes``.
        OSError: the file exists but cannot be read.
    """
    return read_private_file(round_state_path(state_dir, round_id), max_bytes=max_bytes)


def read_private_file(path: Path, *, max_bytes: int) -> bytes | None:
    """Read one of the site's private round files (keys, secrets, a saved update), or
    ``None`` if it does not exist.

    Raises:
        SiteStateError: the file is a symbolic link or not a regular file, is readable
            or writable by group or others, or is longer than ``max_bytes``.
        OSError: the file exists but cannot be read.

    Notes:
        Opened with ``O_NOFOLLOW`` and checked on the open descriptor (``fstat``), so a
        link or a swapped file cannot point the site at something else between the check
        and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SiteStateError(f"{path} is a symbolic link; a state file must be a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SiteStateError(f"{path} is not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise SiteStateError(
                f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; it holds this round's private keys and must "
                "be readable by its owner only (0600)"
            )
        if info.st_size > max_bytes:
            raise SiteStateError(f"{path} is {info.st_size} bytes, more than the limit of {max_bytes}")
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise SiteStateError(f"{path} is more than the limit of {max_bytes} bytes")
    return data


def discard_round_state(state_dir: Path, round_id: int) -> bool:
    """Delete the state of ``round_id`` once the round is over.

    Returns:
        Whether a file was deleted (``False`` if there was none).

    Raises:
        ValueError: a bad ``round_id``.
        OSError: the file exists but cannot be deleted.

    Notes:
        Discard only after the round is over (the unmask answer sent, or the round
        abandoned): a site that lost its state mid-round would start the round afresh,
        and only the coordinator's refusal of a second advertisement would stop it. The
        unlink is fsynced; the old blocks are not overwritten (on journaling file
        systems and SSDs overwriting does not reliably erase them); a state saved after
        the unmask stage holds no private key or seed any more.
    """
    path = round_state_path(state_dir, round_id)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    logger.debug("discarded the secure-aggregation state of round %d", round_id)
    return True
