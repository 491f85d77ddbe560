"""The secure-aggregation primitives added to blossom_secure.crypto, and the KDF labels'
documented errors."""

from __future__ import annotations

import os

import pytest

from blossom_secure import crypto
from blossom_secure.errors import AuthenticationError
from blossom_secure.secagg import kdf

# RFC 7748 section 6.1
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_matches_rfc7748() -> None:
    assert crypto.x25519_public_key(ALICE_PRIVATE) == ALICE_PUBLIC
    assert crypto.x25519_public_key(BOB_PRIVATE) == BOB_PUBLIC
    assert crypto.x25519_shared_secret(ALICE_PRIVATE, BOB_PUBLIC) == SHARED
    assert crypto.x25519_shared_secret(BOB_PRIVATE, ALICE_PUBLIC) == SHARED


def test_fresh_key_pairs_agree_and_differ() -> None:
    (a_private, a_public), (b_private, b_public) = crypto.generate_x25519_key_pair(), crypto.generate_x25519_key_pair()
    assert a_public != b_public and crypto.x25519_public_key(a_private) == a_public
    assert crypto.x25519_shared_secret(a_private, b_public) == crypto.x25519_shared_secret(b_private, a_public)


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little")])
def test_all_zero_agreement_refused(point: bytes) -> None:
    assert crypto.is_low_order_x25519_public_key(point)
    with pytest.raises(ValueError, match="all zero"):
        crypto.x25519_shared_secret(ALICE_PRIVATE, point)
    assert not crypto.is_low_order_x25519_public_key(BOB_PUBLIC)


def test_many_agreements_with_one_private_key_equal_one_at_a_time() -> None:
    peers = [crypto.generate_x25519_key_pair()[1] for _ in range(5)] + [BOB_PUBLIC]
    secrets = crypto.x25519_shared_secrets(ALICE_PRIVATE, peers)
    assert secrets == [crypto.x25519_shared_secret(ALICE_PRIVATE, peer) for peer in peers]
    assert secrets[-1] == SHARED
    assert crypto.x25519_shared_secrets(ALICE_PRIVATE, []) == []


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little")])
def test_many_agreements_refuse_a_low_order_point_anywhere(point: bytes) -> None:
    with pytest.raises(ValueError, match="all zero"):
        crypto.x25519_shared_secrets(ALICE_PRIVATE, [BOB_PUBLIC, point, BOB_PUBLIC])


def test_signature_remembered_for_one_key_and_message_never_passes_a_forgery_or_another_sites_message() -> None:
    key = crypto.generate_identity_key()
    public = crypto.identity_public_key(key)
    message = os.urandom(40)
    signature = crypto.sign(key, message)
    forged = bytes([signature[0] ^ 1]) + signature[1:]
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            crypto.verify_signature_remembered(public, message, forged)
    hits = crypto._verified_triple.cache_info().hits
    crypto.verify_signature_remembered(public, message, signature)
    crypto.verify_signature_remembered(public, message, signature)
    assert crypto._verified_triple.cache_info().hits == hits + 1
    for bad in ((public, message + b"x", signature), (crypto.identity_public_key(crypto.generate_identity_key()),
                message, signature), (public, message, forged), (public[:31], message, signature)):
        with pytest.raises(AuthenticationError):
            crypto.verify_signature_remembered(*bad)
    long_message = os.urandom(5000)
    crypto.verify_signature_remembered(public, long_message, crypto.sign(key, long_message))
    with pytest.raises(AuthenticationError):
        crypto.verify_signature_remembered(public, long_message, signature)


def test_x25519_key_lengths_checked() -> None:
    with pytest.raises(ValueError):
        crypto.x25519_public_key(bytes(31))
    with pytest.raises(ValueError):
        crypto.x25519_shared_secret(ALICE_PRIVATE, bytes(33))
    with pytest.raises(ValueError):
        crypto.is_low_order_x25519_public_key(bytes(5))
    with pytest.raises(ValueError):
        crypto.x25519_shared_secrets(bytes(31), [BOB_PUBLIC])
    with pytest.raises(ValueError):
        crypto.x25519_shared_secrets(ALICE_PRIVATE, [BOB_PUBLIC, bytes(31)])


def test_hkdf_arguments_checked() -> None:
    with pytest.raises(ValueError):
        crypto.hkdf_sha256(b"k", salt=b"", info=b"i")
    with pytest.raises(ValueError):
        crypto.hkdf_sha256(b"k", salt=b"s", info=b"i", length=0)
    with pytest.raises(ValueError):
        crypto.hkdf_sha256(b"k", salt=b"s", info=b"i", length=255 * 32 + 1)


def test_aead_round_trip_and_every_failure_is_one_opaque_error() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    ciphertext = crypto.aead_encrypt(key, nonce, b"shares", b"context")
    assert crypto.aead_decrypt(key, nonce, ciphertext, b"context") == b"shares"
    tampered = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    for args in [
        (os.urandom(32), nonce, ciphertext, b"context"),
        (key, os.urandom(12), ciphertext, b"context"),
        (key, nonce, tampered, b"context"),
        (key, nonce, ciphertext, b"other context"),
        (key, nonce, ciphertext[:10], b"context"),
        (key[:16], nonce, ciphertext, b"context"),
    ]:
        with pytest.raises(AuthenticationError) as info:
            crypto.aead_decrypt(*args)
        assert str(info.value) == "authentication failed"
    with pytest.raises(ValueError):
        crypto.aead_encrypt(key, nonce[:8], b"x", b"")


def test_keystream_writer_continues_its_stream_and_checks_arguments() -> None:
    key = os.urandom(32)
    whole, out = bytearray(64), bytearray(64 + 16)
    crypto.aes256_ctr_keystream_writer(key)(bytes(64), whole)
    write = crypto.aes256_ctr_keystream_writer(key)
    write(bytes(32), out)
    first = bytes(out[:32])
    write(bytes(32), out)
    assert first + bytes(out[:32]) == bytes(whole)
    crypto.aes256_ctr_keystream_writer(key, first_block=2)(bytes(32), out)
    assert bytes(out[:32]) == bytes(whole[32:])
    with pytest.raises(ValueError):
        crypto.aes256_ctr_keystream_writer(key[:16])
    with pytest.raises(ValueError):
        crypto.aes256_ctr_keystream_writer(key, first_block=-1)


def test_kdf_label_errors() -> None:
    with pytest.raises(ValueError):
        kdf.kdf_label(purpose=kdf.Purpose.SELF_MASK, federation_id="f", round_id=-1, block="", parties=())
    with pytest.raises(ValueError):
        kdf.kdf_label(purpose=kdf.Purpose.SELF_MASK, federation_id="f" * 70_000, round_id=1, block="", parties=())
    with pytest.raises(ValueError):
        kdf.pairwise_mask_key(bytes(32), federation_id="f", round_id=1, block="fusion", sites=("a", "a"))


def test_pairwise_keys_are_symmetric_and_share_keys_directional() -> None:
    secret = os.urandom(32)
    context = {"federation_id": "f", "round_id": 1}
    assert kdf.pairwise_mask_key(secret, block="fusion", sites=("a", "b"), **context) == kdf.pairwise_mask_key(
        secret, block="fusion", sites=("b", "a"), **context
    )
    assert kdf.share_encryption_key(secret, sender="a", recipient="b", **context) != kdf.share_encryption_key(
        secret, sender="b", recipient="a", **context
    )


def test_federation_bound_values_refuse_a_bad_hash_and_bad_survivor_sets() -> None:
    digest = bytes(32)
    context = dict(federation_id="f", round_id=1)
    for bad in (b"", bytes(31), bytes(33), "00" * 32):
        with pytest.raises(ValueError):
            kdf.share_associated_data(federation_sha256=bad, sender="a", recipient="b", **context)
        with pytest.raises(ValueError):
            kdf.consistency_payload(federation_sha256=bad, block="fusion", survivors=("a", "b"), **context)
    for survivors in ((), ("a", "a")):
        with pytest.raises(ValueError):
            kdf.consistency_payload(federation_sha256=digest, block="fusion", survivors=survivors, **context)
    one = kdf.consistency_payload(federation_sha256=digest, block="fusion", survivors=("b", "a"), **context)
    assert one == kdf.consistency_payload(federation_sha256=digest, block="fusion", survivors=("a", "b"), **context)
    assert one != kdf.consistency_payload(federation_sha256=bytes([1]) + digest[1:], block="fusion",
                                          survivors=("a", "b"), **context)
    assert one != kdf.consistency_payload(federation_sha256=digest, block="fusion", survivors=("a", "b", "c"),
                                          **context)
