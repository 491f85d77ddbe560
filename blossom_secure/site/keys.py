"""The site's identity key on disk.

The key is an Ed25519 private key in ``<site>/keys/identity.pem`` (PKCS#8 PEM), created on
first use with file mode 0600 inside a 0700 folder, never overwritten. Its public half is
what the federation roster carries; its fingerprint is what operators compare by eye.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from blossom_secure.crypto import IdentityKey, generate_identity_key, identity_key_from_pem, identity_key_to_pem
from blossom_secure.errors import InputError, Problem

__all__ = ["IDENTITY_KEY_FILE", "KeyFileError", "create_identity_key", "load_identity_key", "load_or_create_identity_key"]

logger = logging.getLogger(__name__)

IDENTITY_KEY_FILE = "identity.pem"
_MAX_KEY_BYTES = 4096


class KeyFileError(InputError):
    """The identity key file is missing, unreadable, malformed, or readable by others."""


def create_identity_key(keys_dir: Path) -> IdentityKey:
    """Create a new identity key in ``keys_dir``; refuse if one exists.

    Raises:
        KeyFileError: a key file already exists there, or it cannot be written.

    Notes:
        The file is created with ``O_CREAT | O_EXCL`` and mode 0600, so an existing key is
        never replaced, and the key is never readable by other users, not even briefly.
    """
    keys_dir = Path(keys_dir)
    path = keys_dir / IDENTITY_KEY_FILE
    key = generate_identity_key()
    pem = identity_key_to_pem(key)
    try:
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError([Problem(str(path), "", "an identity key already exists; it is never overwritten")]) from None
    except OSError as exc:
        raise KeyFileError([Problem(str(path), "", f"cannot create key file ({exc.strerror or exc})")]) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise KeyFileError([Problem(str(path), "", f"cannot write key file ({exc.strerror or exc})")]) from None
    logger.info("created identity key %s", path)
    return key


def load_identity_key(keys_dir: Path) -> IdentityKey:
    """Load the identity key from ``keys_dir``.

    Raises:
        KeyFileError: missing, unreadable, too large, not an Ed25519 PKCS#8 PEM key, or
            readable by group/others (a leaked key must not be used silently).
    """
    path = Path(keys_dir) / IDENTITY_KEY_FILE
    try:
        info = path.stat()
        if info.st_size > _MAX_KEY_BYTES:
            raise KeyFileError([Problem(str(path), "", "key file is too large to be an Ed25519 key")])
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError([Problem(str(path), "", "identity key not found (run `blossom-site init`)")]) from None
    except OSError as exc:
        raise KeyFileError([Problem(str(path), "", f"cannot read key file ({exc.strerror or exc})")]) from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise KeyFileError([Problem(str(path), "", f"key file mode is {stat.S_IMODE(info.st_mode):04o}; "
                                                   "it must be readable by its owner only (chmod 600)")])
    try:
        return identity_key_from_pem(data)
    except ValueError as exc:
        raise KeyFileError([Problem(str(path), "", str(exc))]) from None


def load_or_create_identity_key(keys_dir: Path) -> tuple[IdentityKey, bool]:
    """Load the identity key, creating it on first use. Returns ``(key, created)``."""
    if (Path(keys_dir) / IDENTITY_KEY_FILE).exists():
        return load_identity_key(keys_dir), False
    return create_identity_key(keys_dir), True
