"""The site's keys on disk, created on first use, never overwritten, owner-only.

* ``<site>/keys/identity.pem``: the site's Ed25519 identity key (PKCS#8 PEM). Its public
  half is what the federation roster's ``[roster.sites]`` carries; its fingerprint is what
  operators compare by eye. It signs every protocol message and the audit log.
* ``<site>/keys/flower-node.key``: the SuperNode's Flower authentication key (EC P-384,
  OpenSSH format, as ``flower-supernode --auth-supernode-private-key`` reads it). Its
  public half goes in the roster's ``[roster.node_keys]``; a coordinator that enables
  SuperNode authentication registers it, and its SuperLink then refuses any SuperNode
  without a registered key. It authenticates the transport only, never a protocol message.

Each file is created with mode 0600 inside a 0700 folder.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from blossom_secure.crypto import (
    IdentityKey,
    generate_identity_key,
    generate_node_auth_key,
    identity_key_from_pem,
    identity_key_to_pem,
    node_auth_public_line,
)
from blossom_secure.errors import InputError, Problem

__all__ = ["IDENTITY_KEY_FILE", "NODE_KEY_FILE", "KeyFileError", "create_identity_key", "load_identity_key",
           "load_or_create_identity_key", "load_or_create_node_key"]

logger = logging.getLogger(__name__)

IDENTITY_KEY_FILE = "identity.pem"
NODE_KEY_FILE = "flower-node.key"
_MAX_KEY_BYTES = 4096

T = TypeVar("T")


class KeyFileError(InputError):
    """A key file is missing, unreadable, malformed, or readable by others."""


def _create(path: Path, data: bytes, what: str) -> None:
    """Write ``data`` to a new file ``path`` (``O_EXCL``, mode 0600, fsync); never replaces one."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError([Problem(str(path), "", f"{what} already exists; it is never overwritten")]) from None
    except OSError as exc:
        raise KeyFileError([Problem(str(path), "", f"cannot create key file ({exc.strerror or exc})")]) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise KeyFileError([Problem(str(path), "", f"cannot write key file ({exc.strerror or exc})")]) from None
    logger.info("created %s %s", what, path)


def _load(path: Path, parse: Callable[[bytes], T], *, missing: str) -> T:
    """Read an owner-only key file and parse it; every failure is a :class:`KeyFileError`."""
    try:
        info = path.stat()
        if info.st_size > _MAX_KEY_BYTES:
            raise KeyFileError([Problem(str(path), "", "key file is too large to be a key")])
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError([Problem(str(path), "", missing)]) from None
    except OSError as exc:
        raise KeyFileError([Problem(str(path), "", f"cannot read key file ({exc.strerror or exc})")]) from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise KeyFileError([Problem(str(path), "", f"key file mode is {stat.S_IMODE(info.st_mode):04o}; "
                                                   "it must be readable by its owner only (chmod 600)")])
    try:
        return parse(data)
    except ValueError as exc:
        raise KeyFileError([Problem(str(path), "", str(exc))]) from None


def create_identity_key(keys_dir: Path) -> IdentityKey:
    """Create a new identity key in ``keys_dir``; refuse if one exists.

    Raises:
        KeyFileError: a key file already exists there, or it cannot be written.

    Notes:
        The file is created with ``O_CREAT | O_EXCL`` and mode 0600, so an existing key is
        never replaced, and the key is never readable by other users, not even briefly.
    """
    key = generate_identity_key()
    _create(Path(keys_dir) / IDENTITY_KEY_FILE, identity_key_to_pem(key), "an identity key")
    return key


def load_identity_key(keys_dir: Path) -> IdentityKey:
    """Load the identity key from ``keys_dir``.

    Raises:
        KeyFileError: missing, unreadable, too large, not an Ed25519 PKCS#8 PEM key, or
            readable by group/others (a leaked key must not be used silently).
    """
    return _load(Path(keys_dir) / IDENTITY_KEY_FILE, identity_key_from_pem,
                 missing="identity key not found (run `blossom-site init`)")


def load_or_create_identity_key(keys_dir: Path) -> tuple[IdentityKey, bool]:
    """Load the identity key, creating it on first use. Returns ``(key, created)``."""
    if (Path(keys_dir) / IDENTITY_KEY_FILE).exists():
        return load_identity_key(keys_dir), False
    return create_identity_key(keys_dir), True


def load_or_create_node_key(keys_dir: Path) -> tuple[Path, str]:
    """The SuperNode's Flower authentication key, created on first use.

    Returns:
        ``(path, public_line)``: the private key file (for ``flower-supernode``) and its
        OpenSSH public-key line (for the roster's ``[roster.node_keys]``).

    Raises:
        KeyFileError: unreadable, not an EC P-384 OpenSSH key, or readable by others.
    """
    path = Path(keys_dir) / NODE_KEY_FILE
    if not path.exists():
        _create(path, generate_node_auth_key(), "a SuperNode key")
    return path, _load(path, node_auth_public_line, missing="SuperNode key not found")
