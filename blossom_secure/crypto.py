"""Every use of ``cryptography.hazmat`` in blossom_secure lives in this module.

The rest of the library calls these small functions with bytes in and bytes out, so the
primitives in use are visible in one place and can be reviewed and replaced together.

Identity keys are Ed25519 (RFC 8032). A site's long-term identity key signs its audit log
and its secure-aggregation key advertisements; the federation roster carries the public
halves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blossom_secure.errors import AuthenticationError

__all__ = [
    "AEAD_KEY_BYTES",
    "AEAD_NONCE_BYTES",
    "AEAD_TAG_BYTES",
    "AES256_KEY_BYTES",
    "AES_BLOCK_BYTES",
    "ED25519_PUBLIC_KEY_BYTES",
    "ED25519_SIGNATURE_BYTES",
    "X25519_KEY_BYTES",
    "Ed25519PrivateKey",
    "aead_decrypt",
    "aead_encrypt",
    "aes256_ctr_keystream_writer",
    "generate_x25519_key_pair",
    "hkdf_sha256",
    "is_low_order_x25519_public_key",
    "x25519_public_key",
    "x25519_shared_secret",
    "IdentityKey",
    "generate_identity_key",
    "identity_key_from_pem",
    "identity_key_to_pem",
    "identity_public_key",
    "key_fingerprint",
    "sign",
    "verify_signature",
]

#: The type of a site's identity key, for modules that must not import ``cryptography``.
IdentityKey = Ed25519PrivateKey

ED25519_PUBLIC_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64


def generate_identity_key() -> Ed25519PrivateKey:
    """Make a fresh Ed25519 identity key from the operating system's CSPRNG."""
    return Ed25519PrivateKey.generate()


def identity_public_key(private_key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``private_key``."""
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def identity_key_to_pem(private_key: Ed25519PrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM (the file itself is mode 0600)."""
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def identity_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    """Parse a PKCS#8 PEM Ed25519 private key.

    Raises:
        ValueError: ``data`` is not an unencrypted PKCS#8 PEM Ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("not an unencrypted PKCS#8 PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


def sign(private_key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of ``message``."""
    return private_key.sign(message)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature.

    Raises:
        AuthenticationError: the key is malformed or the signature does not verify.
            Opaque on purpose: the caller learns only that it failed.
    """
    if len(public_key) != ED25519_PUBLIC_KEY_BYTES or len(signature) != ED25519_SIGNATURE_BYTES:
        raise AuthenticationError()
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise AuthenticationError() from None


def key_fingerprint(public_key: bytes) -> str:
    """A short, human-comparable fingerprint: SHA-256 of the raw public key, first 16 bytes,
    as colon-separated hex groups of two bytes (``ab12:cd34:...``)."""
    digest = hashlib.sha256(public_key).hexdigest()[:32]
    return ":".join(digest[i : i + 4] for i in range(0, 32, 4))


# --------------------------------------------------------------------------------------
# Secure-aggregation primitives (X25519, HKDF-SHA256, ChaCha20-Poly1305, AES-256-CTR).
#
# Used by ``blossom_secure.secagg``; bytes in, bytes out. Keys are raw bytes so that the
# protocol can Shamir-share them; they come only from the operating system's CSPRNG.
# --------------------------------------------------------------------------------------

X25519_KEY_BYTES = 32
AEAD_KEY_BYTES = 32
AEAD_NONCE_BYTES = 12
AEAD_TAG_BYTES = 16
AES256_KEY_BYTES = 32
AES_BLOCK_BYTES = 16
_HKDF_MAX_BYTES = 255 * 32


def generate_x25519_key_pair() -> tuple[bytes, bytes]:
    """Make a fresh X25519 key pair from the operating system's CSPRNG.

    Returns:
        ``(private_key, public_key)``, each 32 raw bytes (RFC 7748).
    """
    private_key = X25519PrivateKey.generate()
    private_raw = private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public_raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private_raw, public_raw


def x25519_public_key(private_key: bytes) -> bytes:
    """The raw 32-byte X25519 public key of the raw 32-byte ``private_key``.

    Raises:
        ValueError: ``private_key`` is not 32 bytes.
    """
    if len(private_key) != X25519_KEY_BYTES:
        raise ValueError("an X25519 private key is 32 bytes")
    key = X25519PrivateKey.from_private_bytes(bytes(private_key))
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_shared_secret(private_key: bytes, peer_public_key: bytes) -> bytes:
    """The X25519 agreement (RFC 7748) between ``private_key`` and ``peer_public_key``.

    Raises:
        ValueError: a key is not 32 bytes, or the agreement is the all-zero value (the
            peer key is a low-order point). An all-zero result is never returned.

    Notes:
        RFC 7748 section 6.1: an all-zero shared secret means the peer chose a point of
        small order, which makes the "secret" known to everyone; it must be refused.
        OpenSSL already refuses it; the explicit check keeps that true whatever the backend.
    """
    if len(private_key) != X25519_KEY_BYTES or len(peer_public_key) != X25519_KEY_BYTES:
        raise ValueError("X25519 keys are 32 bytes")
    try:
        secret = X25519PrivateKey.from_private_bytes(bytes(private_key)).exchange(
            X25519PublicKey.from_public_bytes(bytes(peer_public_key))
        )
    except ValueError:
        raise ValueError("X25519 agreement is all zero (low-order public key)") from None
    if secret == bytes(X25519_KEY_BYTES):
        raise ValueError("X25519 agreement is all zero (low-order public key)")
    return secret


def is_low_order_x25519_public_key(public_key: bytes) -> bool:
    """Whether ``public_key`` is an X25519 point whose agreement with any key is all zero.

    A clamped X25519 scalar is a multiple of the cofactor 8, so a point of order dividing
    8 gives the all-zero result with *every* private key: one agreement with a throwaway
    key decides it.

    Raises:
        ValueError: ``public_key`` is not 32 bytes.
    """
    if len(public_key) != X25519_KEY_BYTES:
        raise ValueError("an X25519 public key is 32 bytes")
    try:
        secret = X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(bytes(public_key)))
    except ValueError:
        return True
    return secret == bytes(X25519_KEY_BYTES)


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with ``salt``, expand with the purpose label ``info``.

    Raises:
        ValueError: ``length`` is not in 1..8160, or ``salt`` is empty.
    """
    if not 1 <= length <= _HKDF_MAX_BYTES:
        raise ValueError("HKDF-SHA256 output length must be 1..8160 bytes")
    if not salt:
        raise ValueError("HKDF salt must not be empty")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=bytes(salt), info=bytes(info)).derive(bytes(ikm))


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 (RFC 8439) encryption; returns ciphertext with its 16-byte tag.

    Raises:
        ValueError: the key is not 32 bytes or the nonce not 12 bytes.
    """
    if len(key) != AEAD_KEY_BYTES or len(nonce) != AEAD_NONCE_BYTES:
        raise ValueError("ChaCha20-Poly1305 takes a 32-byte key and a 12-byte nonce")
    return ChaCha20Poly1305(bytes(key)).encrypt(bytes(nonce), bytes(plaintext), bytes(associated_data))


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 decryption; the tag is checked before anything is returned.

    Raises:
        AuthenticationError: wrong key, nonce, associated data, or a tampered ciphertext,
            or inputs of the wrong length. Opaque on purpose.
    """
    if len(key) != AEAD_KEY_BYTES or len(nonce) != AEAD_NONCE_BYTES or len(ciphertext) < AEAD_TAG_BYTES:
        raise AuthenticationError()
    try:
        return ChaCha20Poly1305(bytes(key)).decrypt(bytes(nonce), bytes(ciphertext), bytes(associated_data))
    except InvalidTag:
        raise AuthenticationError() from None


def aes256_ctr_keystream_writer(key: bytes, *, first_block: int = 0) -> Callable[[memoryview, memoryview], int]:
    """A writer of the AES-256-CTR keystream of ``key``, starting at counter ``first_block``.

    The counter block is the 128-bit big-endian block index (the initial counter is zero,
    so block ``i`` of the keystream is ``AES-256(key, i)``). The returned callable is the
    cipher context's ``update_into(zeros, out)``: it encrypts ``zeros`` (a buffer of zero
    bytes) into the preallocated ``out`` (at least ``len(zeros) + 15`` bytes), which writes
    the next ``len(zeros)`` keystream bytes without allocating, and returns the count.
    Successive calls continue the stream.

    Raises:
        ValueError: the key is not 32 bytes or ``first_block`` is not in [0, 2**128).

    Notes:
        CTR with a fixed initial counter is safe because every key is used for exactly one
        stream: keys are derived per (round, block, purpose, parties) by HKDF.
    """
    if len(key) != AES256_KEY_BYTES:
        raise ValueError("an AES-256 key is 32 bytes")
    if not 0 <= first_block < 1 << 128:
        raise ValueError("counter block out of range")
    counter = first_block.to_bytes(AES_BLOCK_BYTES, "big")
    return Cipher(algorithms.AES(bytes(key)), modes.CTR(counter)).encryptor().update_into
