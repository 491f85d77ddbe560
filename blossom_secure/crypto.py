"""Every use of ``cryptography.hazmat`` in blossom_secure lives in this module.

The rest of the library calls these small functions with bytes in and bytes out, so the
primitives in use are visible in one place and can be reviewed and replaced together.

Identity keys are Ed25519 (RFC 8032). A site's long-term identity key signs its audit log
and its secure-aggregation key advertisements; the federation roster carries the public
halves.

TLS certificates for local trials of a deployment (a throwaway CA, a server certificate,
client certificates) are X.509 with ECDSA P-256 keys and SHA-256 signatures.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blossom_secure.errors import AuthenticationError

if TYPE_CHECKING:
    from cryptography import x509

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
    "x25519_shared_secrets",
    "LowOrderPointError",
    "IdentityKey",
    "generate_identity_key",
    "identity_key_from_pem",
    "identity_key_to_pem",
    "identity_public_key",
    "key_fingerprint",
    "public_key_from_pem",
    "public_key_to_pem",
    "sign",
    "verify_signature",
    "verify_signature_remembered",
    "NODE_AUTH_CURVE",
    "generate_node_auth_key",
    "node_auth_public_line",
    "node_auth_public_pem",
    "TLS_CLOCK_SKEW",
    "TLS_MAX_DAYS",
    "TlsCertificateInfo",
    "describe_tls_certificate",
    "generate_tls_ca",
    "issue_tls_certificate",
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


#: The curve of a SuperNode's Flower authentication key (Flower accepts NIST EC curves).
NODE_AUTH_CURVE = ec.SECP384R1
_NODE_AUTH_KEY_TYPE = "ecdsa-sha2-nistp384"


def generate_node_auth_key() -> bytes:
    """A new Flower SuperNode authentication key: EC P-384, OpenSSH private-key format
    (what ``flower-supernode --auth-supernode-private-key`` reads), unencrypted."""
    key = ec.generate_private_key(NODE_AUTH_CURVE())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def node_auth_public_line(private_key: bytes) -> str:
    """The OpenSSH public-key line (``ecdsa-sha2-nistp384 AAAA...``) of a node key.

    Raises:
        ValueError: not an OpenSSH EC P-384 private key.
    """
    try:
        key = serialization.load_ssh_private_key(private_key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not an OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, NODE_AUTH_CURVE):
        raise ValueError("not an EC P-384 key")
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def node_auth_public_pem(public_line: str) -> bytes:
    """A node key's public half as Flower registers it (SubjectPublicKeyInfo PEM), from its
    OpenSSH line.

    Raises:
        ValueError: not an OpenSSH ``ecdsa-sha2-nistp384`` public key line.
    """
    if not isinstance(public_line, str) or not public_line.startswith(_NODE_AUTH_KEY_TYPE + " ") \
            or len(public_line) > 1024:
        raise ValueError(f"must be an OpenSSH {_NODE_AUTH_KEY_TYPE} public key line")
    try:
        key = serialization.load_ssh_public_key(public_line.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a valid OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NODE_AUTH_CURVE):
        raise ValueError("not an EC P-384 public key")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_to_pem(public_key: bytes) -> bytes:
    """A raw 32-byte Ed25519 public key as PEM (SubjectPublicKeyInfo, ``BEGIN PUBLIC KEY``).

    Raises:
        ValueError: not a 32-byte Ed25519 public key.
    """
    if not isinstance(public_key, bytes | bytearray) or len(public_key) != ED25519_PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {ED25519_PUBLIC_KEY_BYTES} raw bytes")
    key = Ed25519PublicKey.from_public_bytes(bytes(public_key))
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_from_pem(data: bytes) -> bytes:
    """The raw 32-byte key of a PEM Ed25519 public key (SubjectPublicKeyInfo).

    Raises:
        ValueError: ``data`` is not a PEM Ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError("not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


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


#: Triples remembered by :func:`verify_signature_remembered`, and the longest message kept.
_REMEMBERED_SIGNATURES = 4096
_REMEMBERED_MESSAGE_BYTES = 4096


def verify_signature_remembered(public_key: bytes, message: bytes, signature: bytes) -> None:
    """:func:`verify_signature`, remembering the triples that verified in this process so
    that the same signature over the same message under the same key is checked once.

    For signatures that many parties in one process check in turn: every site of a
    federation run in one process (the embedded runtime, tests, benchmarks) checks every
    other site's key advertisement and consistency signatures, which would otherwise be
    ``n * n`` verifications for ``n`` distinct signatures.

    Raises:
        AuthenticationError: as :func:`verify_signature`.

    Notes:
        Ed25519 verification is a pure function of (key, message, signature), so a triple
        that verified once verifies again: remembering it changes no answer. Only
        successes are kept (a failure raises again every time), keyed by the exact bytes
        of all three (messages longer than 4 KiB are always verified afresh), in a bounded
        least-recently-used table; the table holds public values only.
    """
    if len(message) > _REMEMBERED_MESSAGE_BYTES:
        verify_signature(public_key, message, signature)
        return
    _verified_triple(bytes(public_key), bytes(message), bytes(signature))


@functools.lru_cache(maxsize=_REMEMBERED_SIGNATURES)
def _verified_triple(public_key: bytes, message: bytes, signature: bytes) -> bool:
    verify_signature(public_key, message, signature)
    return True


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
_ALL_ZERO_SECRET = bytes(X25519_KEY_BYTES)


class LowOrderPointError(ValueError):
    """An X25519 agreement is all zero: the peer's public key is a low-order point
    (RFC 7748 section 6.1), so the "secret" is known to everyone. A key of the wrong
    length is a plain :class:`ValueError` (the caller's mistake, not the peer's)."""

    def __init__(self) -> None:
        super().__init__("X25519 agreement is all zero (low-order public key)")


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
        ValueError: a key is not 32 bytes, or (:class:`LowOrderPointError`) the
            agreement is the all-zero value (the peer key is a low-order point). An
            all-zero result is never returned.

    Notes:
        RFC 7748 section 6.1: an all-zero shared secret means the peer chose a point of
        small order, which makes the "secret" known to everyone; it must be refused.
        OpenSSL already refuses it; the explicit check keeps that true whatever the backend.
    """
    return x25519_shared_secrets(private_key, (peer_public_key,))[0]


def x25519_shared_secrets(private_key: bytes, peer_public_keys: Sequence[bytes]) -> list[bytes]:
    """The X25519 agreements of one ``private_key`` with each of ``peer_public_keys``, in
    order: :func:`x25519_shared_secret` for many peers, loading the private key once.

    Raises:
        LowOrderPointError: an agreement is the all-zero value (that peer's key is a
            low-order point); nothing is returned then.
        ValueError: a key is not 32 bytes.

    Notes:
        Loading a raw X25519 private key costs about as much as an agreement (the
        backend derives its public key), so a site masking with ``k`` neighbours, or the
        coordinator rebuilding a dropped site's ``k`` pairwise masks, loads it once,
        not ``k`` times. The loaded key lives only for the call. The all-zero check is
        that of :func:`x25519_shared_secret` (RFC 7748 section 6.1).
    """
    if len(private_key) != X25519_KEY_BYTES or any(len(key) != X25519_KEY_BYTES for key in peer_public_keys):
        raise ValueError("X25519 keys are 32 bytes")
    loaded = X25519PrivateKey.from_private_bytes(bytes(private_key))
    secrets = []
    for peer_public_key in peer_public_keys:
        try:
            secret = loaded.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public_key)))
        except ValueError:
            raise LowOrderPointError() from None
        if secret == _ALL_ZERO_SECRET:
            raise LowOrderPointError()
        secrets.append(secret)
    return secrets


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


# --------------------------------------------------------------------------------------
# TLS certificates for local trials (X.509, ECDSA P-256, SHA-256).
#
# Used by ``blossom_secure.runtimes.flower.certificates`` (``blossom dev certificates``).
# PEM bytes in, PEM bytes out. A real deployment uses the hospital's and the coordinator's
# own PKI; these functions make a throwaway CA and the certificates it signs.
# --------------------------------------------------------------------------------------

#: Longest validity accepted, in days (the CA/Browser Forum's former limit for TLS leaves).
TLS_MAX_DAYS = 825
#: Certificates are valid from this long before they were made, for clocks that lag.
TLS_CLOCK_SKEW = timedelta(minutes=5)

_TLS_ORGANIZATION = "blossom_secure local trial"
_MAX_TLS_PEM_BYTES = 64 * 1024
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_URI_RE = re.compile(r"[a-z][a-z0-9+.-]*:[\x21-\x7e]{1,2000}")
_COMMON_NAME_RE = re.compile(r"[\x20-\x7e]{1,64}")


@dataclass(frozen=True)
class TlsCertificateInfo:
    """What an operator needs to know about a certificate, read back from its PEM.

    Attributes:
        common_name: The subject's common name.
        sha256_fingerprint: SHA-256 of the DER certificate as upper-case hex pairs joined
            by colons, as ``openssl x509 -noout -fingerprint -sha256`` prints it.
        not_before: Start of validity (UTC).
        not_after: End of validity (UTC).
        is_ca: Whether the certificate may sign other certificates.
        extended_key_usages: ``"serverAuth"`` and/or ``"clientAuth"`` (empty for the CA).
        dns_names: DNS names in the subject alternative name.
        ip_addresses: IP addresses in the subject alternative name, as text.
        uris: URIs in the subject alternative name.
    """

    common_name: str
    sha256_fingerprint: str
    not_before: datetime
    not_after: datetime
    is_ca: bool
    extended_key_usages: tuple[str, ...]
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    uris: tuple[str, ...]


def generate_tls_ca(common_name: str, *, days: int) -> tuple[bytes, bytes]:
    """Make a self-signed CA certificate and its private key, for local trials only.

    Args:
        common_name: The CA's subject common name (1-64 printable ASCII characters).
        days: Validity in days from now, 1..825 (it also starts 5 minutes in the past).

    Returns:
        ``(certificate_pem, private_key_pem)``; the key is unencrypted PKCS#8 PEM, so the
        caller must write it with mode 0600.

    Raises:
        ValueError: ``common_name`` or ``days`` is out of range.

    Notes:
        RFC 5280 section 4.2.1.9: ``BasicConstraints(ca=True, path_length=0)``, critical,
        so the CA signs leaf certificates only; section 4.2.1.3: key usage
        ``keyCertSign`` and ``cRLSign`` only, critical. The key is a fresh P-256 key from
        the operating system's CSPRNG, the serial number 159 random bits (RFC 5280
        section 4.1.2.2; CA/Browser Forum baseline requirements 7.1: at least 64 bits of
        CSPRNG output).
    """
    return _generate_tls_ca_at(common_name, days=days, now=_tls_now())


def issue_tls_certificate(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    *,
    common_name: str,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    uris: Sequence[str] = (),
    server: bool,
    days: int,
) -> tuple[bytes, bytes]:
    """Issue a TLS server or client certificate signed by a CA from :func:`generate_tls_ca`.

    Args:
        ca_cert_pem: The CA certificate (PEM).
        ca_key_pem: The CA's private key (unencrypted PKCS#8 PEM, ECDSA).
        common_name: The subject's common name (1-64 printable ASCII characters).
        dns_names: DNS names for the subject alternative name (lower-case LDH labels, no
            wildcards).
        ip_addresses: IPv4 or IPv6 addresses, as text, for the subject alternative name.
        uris: URIs for the subject alternative name (e.g. a site's identity).
        server: ``True`` for a server certificate (extended key usage ``serverAuth``
            only), ``False`` for a client certificate (``clientAuth`` only).
        days: Validity in days from now, 1..825, cut to the CA's own validity.

    Returns:
        ``(certificate_pem, private_key_pem)``; the key is unencrypted PKCS#8 PEM.

    Raises:
        ValueError: a name, address or ``days`` is invalid, there is no subject
            alternative name at all, the CA certificate or key cannot be read, the key is
            not the CA certificate's, the certificate is not a CA, or it has expired.

    Notes:
        RFC 5280 section 4.2.1.12: one extended key usage per certificate, so a server
        certificate is refused as a client certificate and the reverse. RFC 5480 section
        3: an EC end-entity key may carry only ``digitalSignature``, ``nonRepudiation``
        and ``keyAgreement``; ``keyEncipherment`` is for RSA key transport and is left
        out, and ``digitalSignature`` is all that ECDHE-ECDSA (TLS 1.2) and TLS 1.3 need.
        Hostname checks use the subject alternative name only (RFC 6125 section 6.4.4),
        so every name a client dials must be listed there.
    """
    return _issue_tls_certificate_at(
        ca_cert_pem, ca_key_pem, common_name=common_name, dns_names=dns_names, ip_addresses=ip_addresses,
        uris=uris, server=server, days=days, now=_tls_now(),
    )


def describe_tls_certificate(cert_pem: bytes) -> TlsCertificateInfo:
    """Read back a PEM certificate's names, validity, usages and fingerprint.

    Raises:
        ValueError: ``cert_pem`` is not one PEM X.509 certificate (or is over 64 KiB).
    """
    from cryptography import x509  # lazily: only the TLS helpers need it
    cert = _load_tls_certificate(cert_pem)
    try:
        ext_usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = tuple(name for oid, name in ((x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
                                              (x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"))
                       if oid in ext_usage)
    except x509.ExtensionNotFound:
        usages = ()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns, ips, uris = (), (), ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return TlsCertificateInfo(
        common_name=str(names[0].value) if names else "",
        sha256_fingerprint=":".join(digest[i : i + 2] for i in range(0, len(digest), 2)),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=is_ca,
        extended_key_usages=usages,
        dns_names=dns,
        ip_addresses=ips,
        uris=uris,
    )


def _tls_now() -> datetime:
    """The current time, to the second (X.509 times carry no fractions)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def _check_tls_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int):
        raise TypeError("days must be an int")
    if not 1 <= days <= TLS_MAX_DAYS:
        raise ValueError(f"validity must be 1..{TLS_MAX_DAYS} days, not {days}")


def _tls_subject(common_name: str) -> x509.Name:
    from cryptography import x509  # lazily: only the TLS helpers need it
    if not isinstance(common_name, str) or not _COMMON_NAME_RE.fullmatch(common_name):
        raise ValueError("a common name is 1-64 printable ASCII characters")
    return x509.Name([
        x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, _TLS_ORGANIZATION),
        x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name),
    ])


def _tls_key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_tls_certificate(cert_pem: bytes) -> x509.Certificate:
    from cryptography import x509  # lazily: only the TLS helpers need it
    if not isinstance(cert_pem, bytes | bytearray) or len(cert_pem) > _MAX_TLS_PEM_BYTES:
        raise ValueError("not a PEM certificate of at most 64 KiB")
    try:
        return x509.load_pem_x509_certificate(bytes(cert_pem))
    except ValueError:
        raise ValueError("not a PEM X.509 certificate") from None


def _subject_alternative_name(dns_names: Sequence[str], ip_addresses: Sequence[str],
                              uris: Sequence[str]) -> x509.SubjectAlternativeName:
    from cryptography import x509  # lazily: only the TLS helpers need it
    for label, values in (("dns_names", dns_names), ("ip_addresses", ip_addresses), ("uris", uris)):
        if isinstance(values, str | bytes) or not all(isinstance(v, str) for v in values):
            raise TypeError(f"{label} must be a sequence of str")
    names: list[x509.GeneralName] = []
    for name in dict.fromkeys(dns_names):
        if len(name) > 253 or not _DNS_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a lower-case DNS name")
        names.append(x509.DNSName(name))
    addresses = []
    for text in ip_addresses:
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address") from None
    names.extend(x509.IPAddress(address) for address in dict.fromkeys(addresses))
    for uri in dict.fromkeys(uris):
        if not _URI_RE.fullmatch(uri):
            raise ValueError(f"{uri!r} is not an ASCII URI")
        names.append(x509.UniformResourceIdentifier(uri))
    if not names:
        raise ValueError("a certificate needs at least one DNS name, IP address or URI")
    return x509.SubjectAlternativeName(names)


def _generate_tls_ca_at(common_name: str, *, days: int, now: datetime) -> tuple[bytes, bytes]:
    """:func:`generate_tls_ca` at the time ``now`` (a seam for tests)."""
    from cryptography import x509  # lazily: only the TLS helpers need it
    _check_tls_days(days)
    subject = _tls_subject(common_name)
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - TLS_CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _tls_key_to_pem(key)


def _issue_tls_certificate_at(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    *,
    common_name: str,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    uris: Sequence[str],
    server: bool,
    days: int,
    now: datetime,
) -> tuple[bytes, bytes]:
    """:func:`issue_tls_certificate` at the time ``now`` (a seam for tests)."""
    from cryptography import x509  # lazily: only the TLS helpers need it
    _check_tls_days(days)
    subject = _tls_subject(common_name)
    alt_names = _subject_alternative_name(dns_names, ip_addresses, uris)
    ca_cert = _load_tls_certificate(ca_cert_pem)
    if not isinstance(ca_key_pem, bytes | bytearray) or len(ca_key_pem) > _MAX_TLS_PEM_BYTES:
        raise ValueError("the CA key is not a PEM private key of at most 64 KiB")
    try:
        ca_key = serialization.load_pem_private_key(bytes(ca_key_pem), password=None)
    except (ValueError, TypeError):
        raise ValueError("the CA key is not an unencrypted PKCS#8 PEM private key") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if ca_key.public_key().public_bytes(*public) != ca_cert.public_key().public_bytes(*public):
        raise ValueError("the CA key does not belong to the CA certificate")
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise ValueError("the CA certificate is not a CA (no basic constraints or key identifier)") from None
    if not constraints.ca:
        raise ValueError("the CA certificate is not a CA")
    not_before = max(now - TLS_CLOCK_SKEW, ca_cert.not_valid_before_utc)
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError("the CA certificate has expired")
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(alt_names, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _tls_key_to_pem(key)
