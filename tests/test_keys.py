"""The identity key file: created once, mode 0600, never overwritten, refused if exposed."""

from __future__ import annotations

import os
import stat

import pytest

from blossom_secure.crypto import identity_public_key, key_fingerprint, sign, verify_signature
from blossom_secure.errors import AuthenticationError
from blossom_secure.site.keys import KeyFileError, create_identity_key, load_identity_key, load_or_create_identity_key


def test_created_with_owner_only_mode_and_reloads(tmp_path):
    key, created = load_or_create_identity_key(tmp_path / "keys")
    assert created
    path = tmp_path / "keys" / "identity.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    again, created = load_or_create_identity_key(tmp_path / "keys")
    assert not created and identity_public_key(again) == identity_public_key(key)


def test_never_overwritten(tmp_path):
    create_identity_key(tmp_path)
    before = (tmp_path / "identity.pem").read_bytes()
    with pytest.raises(KeyFileError, match="never overwritten"):
        create_identity_key(tmp_path)
    assert (tmp_path / "identity.pem").read_bytes() == before


def test_group_readable_key_refused(tmp_path):
    create_identity_key(tmp_path)
    os.chmod(tmp_path / "identity.pem", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_identity_key(tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"])
def test_malformed_key_refused(tmp_path, content):
    path = tmp_path / "identity.pem"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError):
        load_identity_key(tmp_path)


def test_missing_key(tmp_path):
    with pytest.raises(KeyFileError, match="blossom-site init"):
        load_identity_key(tmp_path)


def test_signatures_verify_and_forgeries_fail_opaquely(tmp_path):
    key = create_identity_key(tmp_path)
    public = identity_public_key(key)
    sig = sign(key, b"message")
    verify_signature(public, b"message", sig)
    for bad in [(public, b"messagf", sig), (public, b"message", sig[:-1] + bytes([sig[-1] ^ 1])),
                (public[:-1], b"message", sig), (bytes(32), b"message", sig)]:
        with pytest.raises(AuthenticationError) as info:
            verify_signature(*bad)
        assert str(info.value) == "authentication failed"
    assert len(key_fingerprint(public).split(":")) == 8
