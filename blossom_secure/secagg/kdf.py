"""Key derivation for secure aggregation: every key is HKDF-SHA256 with a purpose label.

Every derived key, associated-data string, commitment and signed digest starts from a
*label* that names the protocol and its version, the purpose, the federation, the round,
the block (or ``""``) and the parties, each field length-prefixed so that no two distinct
contexts can produce the same bytes. HKDF's salt is a per-round value derived from the
federation and round. Keys are 256 bits end to end: X25519 agreements and 256-bit seeds go
through HKDF into 256-bit AES and ChaCha20-Poly1305 keys; nothing is truncated or folded.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from enum import Enum

from blossom_secure import crypto

__all__ = [
    "FEDERATION_SHA256_BYTES",
    "PROTOCOL_LABEL",
    "Purpose",
    "consistency_payload",
    "graph_position_keys",
    "kdf_label",
    "mask_statement_payload",
    "pairwise_mask_key",
    "round_salt",
    "seed_commitment",
    "self_mask_key",
    "share_associated_data",
    "share_encryption_key",
    "signature_payload",
]

#: Names the protocol and its version in every label.
PROTOCOL_LABEL = b"blossom-secagg/v1"
#: Length of the federation file's SHA-256, bound into every signed or encrypted value.
FEDERATION_SHA256_BYTES = 32
_U16_MAX = 0xFFFF
_U64_MAX = (1 << 64) - 1


class Purpose(str, Enum):
    """What a derived value is for; its value is written into the label."""

    ROUND_SALT = "round-salt"
    PAIRWISE_MASK = "pairwise-mask"
    SELF_MASK = "self-mask"
    SHARE_ENCRYPTION = "share-encryption"
    SHARE_ASSOCIATED_DATA = "share-associated-data"
    SEED_COMMITMENT = "seed-commitment"
    SITE_MESSAGE_SIGNATURE = "site-message-signature"
    CONSISTENCY_CHECK = "consistency-check"
    NEIGHBOUR_GRAPH = "neighbour-graph"
    MASK_STATEMENT = "mask-statement"


@functools.lru_cache(maxsize=4096)
def _length_prefixed(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > _U16_MAX:
        raise ValueError("label field too long")
    return struct.pack(">H", len(data)) + data


def _check_round(round_id: int) -> None:
    if not isinstance(round_id, int) or isinstance(round_id, bool) or not 0 <= round_id <= _U64_MAX:
        raise ValueError("round_id must be an int in 0..2**64-1")


def _check_federation_sha256(federation_sha256: bytes) -> bytes:
    if not isinstance(federation_sha256, bytes) or len(federation_sha256) != FEDERATION_SHA256_BYTES:
        raise ValueError("federation_sha256 must be the 32-byte SHA-256 of the federation file")
    return federation_sha256


def kdf_label(*, purpose: Purpose, federation_id: str, round_id: int, block: str, parties: Sequence[str]) -> bytes:
    """The canonical label of a derivation (HKDF ``info``, AEAD associated data, ...).

    Layout: ``"blossom-secagg/v1" || lp(purpose) || lp(federation) || u64(round) ||
    lp(block) || u16(#parties) || lp(party)...`` where ``lp`` is a 2-byte big-endian
    length followed by the UTF-8 bytes.

    Raises:
        ValueError: a field is too long or ``round_id`` is out of range.
    """
    _check_round(round_id)
    if len(parties) > _U16_MAX:
        raise ValueError("too many parties")
    return b"".join(
        [
            PROTOCOL_LABEL,
            _length_prefixed(Purpose(purpose).value),
            _length_prefixed(federation_id),
            struct.pack(">Q", round_id),
            _length_prefixed(block),
            struct.pack(">H", len(parties)),
            *(_length_prefixed(party) for party in parties),
        ]
    )


def round_salt(*, federation_id: str, round_id: int) -> bytes:
    """The HKDF salt of every derivation in one round: SHA-256 of the round's label.

    Notes:
        A public value, computed once per (federation, round) and kept: a site masking
        with ``k`` neighbours, or the coordinator rebuilding masks, derives hundreds of
        keys with the same salt.
    """
    return _round_salt(federation_id, round_id)


@functools.lru_cache(maxsize=64, typed=True)
def _round_salt(federation_id: str, round_id: int) -> bytes:
    label = kdf_label(purpose=Purpose.ROUND_SALT, federation_id=federation_id, round_id=round_id, block="", parties=())
    return hashlib.sha256(label).digest()


def pairwise_mask_key(
    shared_secret: bytes, *, federation_id: str, round_id: int, block: str, sites: tuple[str, str]
) -> bytes:
    """The AES-256 key of the pairwise mask of two sites on one block.

    Notes:
        ``sites`` is put in sorted order so that both ends derive the same key from their
        X25519 agreement (Bonawitz et al. 2017, section 3, ``PRG(s_uv)``); the block in the
        label gives each block group independent masks.
    """
    low, high = sorted(sites)
    if low == high:
        raise ValueError("a pairwise mask needs two distinct sites")
    info = kdf_label(
        purpose=Purpose.PAIRWISE_MASK, federation_id=federation_id, round_id=round_id, block=block, parties=(low, high)
    )
    return crypto.hkdf_sha256(shared_secret, salt=round_salt(federation_id=federation_id, round_id=round_id), info=info)


def self_mask_key(seed: bytes, *, federation_id: str, round_id: int, block: str, site: str) -> bytes:
    """The AES-256 key of a site's self mask on one block, from its 256-bit seed."""
    info = kdf_label(
        purpose=Purpose.SELF_MASK, federation_id=federation_id, round_id=round_id, block=block, parties=(site,)
    )
    return crypto.hkdf_sha256(seed, salt=round_salt(federation_id=federation_id, round_id=round_id), info=info)


def share_encryption_key(
    shared_secret: bytes, *, federation_id: str, round_id: int, sender: str, recipient: str
) -> bytes:
    """The ChaCha20-Poly1305 key for shares from ``sender`` to ``recipient``.

    Notes:
        Directional (the label orders sender then recipient): the two directions of a pair
        never share a key, so a nonce is never reused under one key.
    """
    info = kdf_label(
        purpose=Purpose.SHARE_ENCRYPTION,
        federation_id=federation_id,
        round_id=round_id,
        block="",
        parties=(sender, recipient),
    )
    return crypto.hkdf_sha256(shared_secret, salt=round_salt(federation_id=federation_id, round_id=round_id), info=info)


def share_associated_data(
    *, federation_id: str, federation_sha256: bytes, round_id: int, sender: str, recipient: str
) -> bytes:
    """AEAD associated data binding federation, the federation file's hash, round, sender
    and recipient: the label followed by the 32-byte hash.

    Raises:
        ValueError: ``federation_sha256`` is not 32 bytes, or a label field is invalid.

    Notes:
        The label is self-delimiting (every field length-prefixed), so appending the
        fixed-length hash keeps the encoding injective. A site holding another version of
        the federation file (other thresholds, say) derives other associated data and
        cannot decrypt, so shares never cross federation terms.
    """
    label = kdf_label(
        purpose=Purpose.SHARE_ASSOCIATED_DATA,
        federation_id=federation_id,
        round_id=round_id,
        block="",
        parties=(sender, recipient),
    )
    return label + _check_federation_sha256(federation_sha256)


def consistency_payload(
    *, federation_id: str, federation_sha256: bytes, round_id: int, block: str, survivors: Sequence[str]
) -> bytes:
    """The bytes a site signs in the consistency check: the ``consistency-check`` label of
    (federation, round, block, sorted survivor set) followed by the federation file's hash.

    Raises:
        ValueError: ``survivors`` is empty or repeats a site, ``federation_sha256`` is not
            32 bytes, or a label field is invalid.

    Notes:
        Bonawitz et al. 2017, section 4 (ConsistencyCheck): each surviving user signs the
        set ``U3`` the server claims survived, and a user unmasks only with ``t`` such
        signatures over the same set. Here the set is per block group. The purpose label
        separates these signatures from the site-message signatures made with the same
        identity key.
    """
    ordered = tuple(sorted(survivors))
    if not ordered or len(set(ordered)) != len(ordered):
        raise ValueError("a survivor set is non-empty and names each site once")
    label = kdf_label(
        purpose=Purpose.CONSISTENCY_CHECK, federation_id=federation_id, round_id=round_id, block=block, parties=ordered
    )
    return label + _check_federation_sha256(federation_sha256)


def graph_position_keys(
    members: Sequence[str], *, federation_id: str, federation_sha256: bytes, round_id: int
) -> dict[str, bytes]:
    """Each member's place on the sparse masking graphs of a round: SHA-256 of the
    ``neighbour-graph`` label of (federation, round, the member), followed by the
    federation file's hash. The members of a block sit on a ring in the order of these
    keys; every block uses the same order, so a site's neighbours on different blocks
    are mostly the same sites (one share ciphertext each).

    Notes:
        A member's key depends on itself and public terms only, never on who else is in
        the group, so every party that forms the same group forms the same graph. The
        keys are public and the coordinator picks round numbers, so it can steer the
        graph; nothing private rests on the graph (docs/protocol.md, "Sparse masking
        graph"): it only spreads each member's neighbours over the ring so that random
        dropouts rarely leave one with too few.
    """
    digest = _check_federation_sha256(federation_sha256)
    return {site: _graph_position_key(federation_id, digest, round_id, site) for site in members}


@functools.lru_cache(maxsize=1 << 14)
def _graph_position_key(federation_id: str, federation_sha256: bytes, round_id: int, site: str) -> bytes:
    label = kdf_label(
        purpose=Purpose.NEIGHBOUR_GRAPH, federation_id=federation_id, round_id=round_id, block="", parties=(site,)
    )
    return hashlib.sha256(label + federation_sha256).digest()


def mask_statement_payload(
    *, federation_id: str, federation_sha256: bytes, round_id: int, block: str, site: str, peers: Sequence[str]
) -> bytes:
    """The bytes a site signs to state which peers it masked a block with on the sparse
    graph: the ``mask-statement`` label of (federation, round, block, the site, then its
    peers sorted) followed by the federation file's hash.

    Raises:
        ValueError: ``peers`` repeats a site or names ``site``, ``federation_sha256`` is
            not 32 bytes, or a label field is invalid.
    """
    ordered = tuple(sorted(peers))
    if len(set(ordered)) != len(ordered) or site in ordered:
        raise ValueError("a mask statement names each peer once, never the site itself")
    label = kdf_label(
        purpose=Purpose.MASK_STATEMENT, federation_id=federation_id, round_id=round_id, block=block,
        parties=(site, *ordered),
    )
    return label + _check_federation_sha256(federation_sha256)


def seed_commitment(seed: bytes, *, federation_id: str, round_id: int, block: str, site: str) -> bytes:
    """SHA-256 commitment to a self-mask seed, published (signed) in the advertisement.

    Notes:
        The seed is 256 uniformly random bits, so the hash hides it; it lets the
        coordinator check a seed rebuilt from shares, turning a corrupted share into a
        failed block instead of a wrong sum.
    """
    label = kdf_label(
        purpose=Purpose.SEED_COMMITMENT, federation_id=federation_id, round_id=round_id, block=block, parties=(site,)
    )
    return hashlib.sha256(label + seed).digest()


def signature_payload(message_prefix: bytes | memoryview) -> bytes:
    """The bytes a site signs for a message: the label of the purpose and SHA-256 of the
    encoded message up to its signature field."""
    return (
        PROTOCOL_LABEL
        + _length_prefixed(Purpose.SITE_MESSAGE_SIGNATURE.value)
        + hashlib.sha256(message_prefix).digest()
    )
