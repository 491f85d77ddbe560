"""Typed protocol messages and their canonical, versioned, size-limited binary encoding.

Wire format (all integers big-endian, except ring vectors which are little-endian)::

    message  = "BSSA" version:u16 type:u8 envelope field* [signature]
    envelope = 1 federation-id:text 2 federation-sha256:32 bytes 3 round:u64 4 party:text
    field    = tag:u8 value            (every field of the type, once, in tag order)
    signature= 0xFF ed25519-signature:64 bytes  (site-to-coordinator messages only)

The envelope (tags 1-4) is the same for every type and defined once, in ``_ENVELOPE``;
``federation-sha256`` is the SHA-256 of the federation file, so every message, signed
ones included, is bound to the exact public terms (thresholds, quantisation, layout) of
the federation it belongs to.

A value is one of: ``u16``/``u64``; ``text`` (u16 length, UTF-8); ``fixed`` (raw bytes of
a length set by the field); ``blob`` (u32 length, bytes); ``list`` (u32 count, then the
items); ``record`` (its sub-values in order); ``ring`` (bits:u8, count:u32, the elements).
Every message of a given content has exactly one encoding: lists are strictly sorted,
nothing is optional, and the decoder refuses anything else (unknown tag, missing or
repeated field, trailing bytes, wrong version, unsorted or duplicate list entries, an
identifier outside its alphabet). The length limit is checked before any parsing.

Site messages are signed with the site's Ed25519 identity key over
:func:`blossom_secure.secagg.kdf.signature_payload` of all bytes before the signature. The
decoder checks the sender against the roster and the signature *before* it parses the
body or compares the federation and round, so a forged message is always the one opaque
:class:`AuthenticationError`.
"""

from __future__ import annotations

import functools
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

from blossom_secure import crypto
from blossom_secure.blocks import is_head, is_valid_block_name
from blossom_secure.crypto import Ed25519PrivateKey
from blossom_secure.secagg.errors import (
    AuthenticationError,
    MalformedMessageError,
    MessageTooLargeError,
    UnknownFieldError,
    UnknownSenderError,
    UnsupportedVersionError,
    WrongFederationError,
    WrongRecipientError,
    WrongRoundError,
)
from blossom_secure.secagg.kdf import FEDERATION_SHA256_BYTES, signature_payload
from blossom_secure.secagg.shamir import SHARE_BYTES

__all__ = [
    "MAGIC",
    "WIRE_VERSION",
    "AdvertiseKeys",
    "BlockKeys",
    "BlockShares",
    "BlockSignature",
    "BlockSignatures",
    "BlockSurvivors",
    "ConsistencyRequest",
    "ConsistencyResponse",
    "EncryptedShare",
    "EncryptedShares",
    "KeyBundle",
    "MaskedBlock",
    "MaskedInput",
    "MaskStatement",
    "MessageType",
    "RevealedShare",
    "ShareDelivery",
    "ShareKind",
    "SharePlaintext",
    "SiteSignature",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_coordinator_message",
    "decode_share_plaintext",
    "decode_advertisement_remembered",
    "decode_site_message",
    "encode_coordinator_message",
    "encode_share_plaintext",
    "encode_site_message",
    "is_valid_identifier",
    "peek_message_type",
]

MAGIC = b"BSSA"
#: Version 2 added the federation file's hash to the envelope and the consistency check;
#: version 3 the mask statements of the sparse masking graph.
WIRE_VERSION = 3
_HEADER = struct.Struct(">4sHB")
_SIGNATURE_TAG = 0xFF
_SIGNATURE_TRAILER_BYTES = 1 + crypto.ED25519_SIGNATURE_BYTES
_IDENTIFIER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NONCE_BYTES = crypto.AEAD_NONCE_BYTES
_MAX_CIPHERTEXT_BYTES = 1 << 20


def is_valid_identifier(value: object) -> bool:
    """Whether ``value`` can be a site or federation id: 1-64 characters from
    ``[A-Za-z0-9._-]``, starting with a letter or digit (the whole string: a trailing
    newline is refused)."""
    return isinstance(value, str) and _IDENTIFIER_RE.fullmatch(value) is not None


class MessageType(IntEnum):
    """The message types; the stage a message belongs to follows from its type."""

    ADVERTISE_KEYS = 1
    KEY_BUNDLE = 2
    ENCRYPTED_SHARES = 3
    SHARE_DELIVERY = 4
    MASKED_INPUT = 5
    UNMASK_REQUEST = 6
    UNMASK_RESPONSE = 7
    SHARE_PLAINTEXT = 8
    CONSISTENCY_REQUEST = 9
    CONSISTENCY_RESPONSE = 10


class ShareKind(IntEnum):
    """Which of a peer's secrets a revealed share belongs to."""

    SELF_MASK_SEED = 1
    MASK_KEY = 2


# ---------------------------------------------------------------------------- codecs


class _Writer:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []

    def raw(self, data: bytes | memoryview) -> None:
        self.parts.append(data)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: memoryview, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def take(self, count: int) -> memoryview:
        if count < 0 or self.end - self.pos < count:
            raise MalformedMessageError("message is truncated")
        view = self.data[self.pos : self.pos + count]
        self.pos += count
        return view

    def remaining(self) -> int:
        return self.end - self.pos


class _Codec:
    min_bytes = 1

    def write(self, writer: _Writer, value: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def read(self, reader: _Reader) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class _UInt(_Codec):
    def __init__(self, size: int) -> None:
        self.size = size
        self.min_bytes = size
        self.limit = 1 << (8 * size)

    def write(self, writer: _Writer, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.limit:
            raise ValueError("integer out of range")
        writer.raw(value.to_bytes(self.size, "big"))

    def read(self, reader: _Reader) -> int:
        return int.from_bytes(reader.take(self.size), "big")


class _Text(_Codec):
    min_bytes = 2

    def write(self, writer: _Writer, value: str) -> None:
        writer.raw(_text_bytes(value))

    def read(self, reader: _Reader) -> str:
        size = int.from_bytes(reader.take(2), "big")
        try:
            return bytes(reader.take(size)).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise MalformedMessageError("text is not UTF-8") from None


@functools.lru_cache(maxsize=4096)
def _text_bytes(value: str) -> bytes:
    """A text's encoding (2-byte length, UTF-8); remembered, since a round's messages
    spell the same few site ids and block names thousands of times."""
    data = value.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError("text too long")
    return len(data).to_bytes(2, "big") + data


class _Fixed(_Codec):
    def __init__(self, size: int) -> None:
        self.size = size
        self.min_bytes = size

    def write(self, writer: _Writer, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != self.size:
            raise ValueError(f"expected {self.size} bytes")
        writer.raw(value)

    def read(self, reader: _Reader) -> bytes:
        return bytes(reader.take(self.size))


class _Blob(_Codec):
    min_bytes = 4

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def write(self, writer: _Writer, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) > self.max_bytes:
            raise ValueError("blob too long")
        writer.raw(len(value).to_bytes(4, "big"))
        writer.raw(value)

    def read(self, reader: _Reader) -> bytes:
        size = int.from_bytes(reader.take(4), "big")
        if size > self.max_bytes:
            raise MalformedMessageError("blob too long")
        return bytes(reader.take(size))


class _List(_Codec):
    min_bytes = 4

    def __init__(self, item: _Codec) -> None:
        self.item = item

    def write(self, writer: _Writer, value: tuple) -> None:
        writer.raw(len(value).to_bytes(4, "big"))
        for item in value:
            self.item.write(writer, item)

    def read(self, reader: _Reader) -> tuple:
        count = int.from_bytes(reader.take(4), "big")
        if count * self.item.min_bytes > reader.remaining():
            raise MalformedMessageError("list count exceeds the message")
        if type(self.item) is _Text:
            return _read_texts(reader, count)
        return tuple(self.item.read(reader) for _ in range(count))


def _read_texts(reader: _Reader, count: int) -> tuple[str, ...]:
    """``count`` texts, as ``_Text.read`` reads them one by one (same checks, same
    errors), in one loop: lists of site ids are most of what a coordinator message holds."""
    data, pos, end = reader.data, reader.pos, reader.end
    found = []
    for _ in range(count):
        if end - pos < 2:
            raise MalformedMessageError("message is truncated")
        size = (data[pos] << 8) | data[pos + 1]
        pos += 2
        if end - pos < size:
            raise MalformedMessageError("message is truncated")
        try:
            found.append(bytes(data[pos : pos + size]).decode("utf-8", errors="strict"))
        except UnicodeDecodeError:
            raise MalformedMessageError("text is not UTF-8") from None
        pos += size
    reader.pos = pos
    return tuple(found)


class _Record(_Codec):
    """A dataclass whose fields are written in order, without tags."""

    def __init__(self, cls: type, codecs: tuple[_Codec, ...]) -> None:
        self.cls = cls
        self.codecs = codecs
        self.names = tuple(f.name for f in fields(cls))
        self.min_bytes = sum(c.min_bytes for c in codecs)

    def write(self, writer: _Writer, value: Any) -> None:
        for name, codec in zip(self.names, self.codecs, strict=True):
            codec.write(writer, getattr(value, name))

    def read(self, reader: _Reader) -> Any:
        values = [codec.read(reader) for codec in self.codecs]
        return _construct(self.cls, values)


class _RingVector(_Codec):
    min_bytes = 5

    def write(self, writer: _Writer, value: np.ndarray) -> None:
        vector = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        writer.raw(bytes([vector.dtype.itemsize * 8]) + vector.shape[0].to_bytes(4, "big"))
        writer.raw(memoryview(vector.view(np.uint8)))

    def read(self, reader: _Reader) -> np.ndarray:
        bits = reader.take(1)[0]
        if bits not in (32, 64):
            raise MalformedMessageError("ring vector must have 32 or 64-bit elements")
        count = int.from_bytes(reader.take(4), "big")
        if count * (bits // 8) > reader.remaining():
            raise MalformedMessageError("ring vector exceeds the message")
        data = reader.take(count * (bits // 8))
        return np.frombuffer(data, dtype="<u4" if bits == 32 else "<u8", count=count)


def _construct(cls: type, values: list[Any]) -> Any:
    try:
        return cls(*values)
    except (ValueError, TypeError) as exc:
        raise MalformedMessageError(f"invalid {cls.__name__}: {exc}") from None


# ----------------------------------------------------------------------- validation


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise ValueError(reason)


def _require_identifier(value: object, what: str) -> None:
    if not (isinstance(value, str) and _is_identifier_text(value)):
        raise ValueError(f"{what} is not a valid identifier")


def _require_block(value: object) -> None:
    if not (isinstance(value, str) and _is_shareable_block_text(value)):
        raise ValueError("not a shareable block name")


# A round's messages name the same few sites and blocks thousands of times (an unmask
# response holds one share per peer and block): their checks are remembered.
@functools.lru_cache(maxsize=1024)
def _is_identifier_text(value: str) -> bool:
    return is_valid_identifier(value)


@functools.lru_cache(maxsize=256)
def _is_shareable_block_text(value: str) -> bool:
    return is_valid_block_name(value) and not is_head(value)


def _require_sorted_unique(keys: list, what: str) -> None:
    _require(all(a < b for a, b in zip(keys, keys[1:])), f"{what} must be strictly sorted (canonical, no duplicates)")


def _require_envelope(message: Any, party_field: str) -> None:
    _require_identifier(message.federation_id, "federation_id")
    _require(
        isinstance(message.federation_sha256, bytes) and len(message.federation_sha256) == FEDERATION_SHA256_BYTES,
        "federation_sha256 must be 32 bytes",
    )
    _require(isinstance(message.round_id, int) and 0 <= message.round_id < 1 << 64, "round_id out of range")
    _require_identifier(getattr(message, party_field), party_field)


def _require_signature(value: object) -> None:
    _require(isinstance(value, bytes) and len(value) == crypto.ED25519_SIGNATURE_BYTES, "a signature is 64 bytes")


def _require_site_set(sites: tuple, what: str) -> None:
    for site in sites:
        _require_identifier(site, what)
    _require_sorted_unique(list(sites), what)


# ------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class BlockKeys:
    """A site's per-block public material in its advertisement.

    Attributes:
        block: The block name.
        mask_public_key: X25519 public key for this block's pairwise masks (32 bytes).
        seed_commitment: SHA-256 commitment to the block's self-mask seed.
    """

    block: str
    mask_public_key: bytes
    seed_commitment: bytes

    def __post_init__(self) -> None:
        _require_block(self.block)


@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 1, site to coordinator: fresh public keys for this round, signed.

    Attributes:
        federation_id, federation_sha256, round_id, site_id: Where it belongs (the
            federation, the hash of its federation file, the round) and who sends it.
        share_public_key: X25519 public key used to encrypt shares to this site.
        min_contributors: The site's own policy minimum for a block group.
        blocks: One entry per contributed block, sorted by block name.
    """

    TYPE: ClassVar[MessageType] = MessageType.ADVERTISE_KEYS
    federation_id: str
    federation_sha256: bytes
    round_id: int
    site_id: str
    share_public_key: bytes
    min_contributors: int
    blocks: tuple[BlockKeys, ...]

    def __post_init__(self) -> None:
        _require_envelope(self, "site_id")
        _require(self.min_contributors >= 1, "min_contributors must be >= 1")
        _require_sorted_unique([b.block for b in self.blocks], "blocks")


@dataclass(frozen=True)
class KeyBundle:
    """Stage 2 request, coordinator to site: every advertisement received, as sent.

    Attributes:
        advertisements: The signed advertisement messages, byte for byte, sorted.
    """

    TYPE: ClassVar[MessageType] = MessageType.KEY_BUNDLE
    federation_id: str
    federation_sha256: bytes
    round_id: int
    recipient: str
    advertisements: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _require_envelope(self, "recipient")
        _require_sorted_unique(list(self.advertisements), "advertisements")


@dataclass(frozen=True)
class EncryptedShare:
    """One AEAD ciphertext of shares; ``peer`` is the recipient (in
    :class:`EncryptedShares`) or the sender (in :class:`ShareDelivery`)."""

    peer: str
    nonce: bytes
    ciphertext: bytes

    def __post_init__(self) -> None:
        _require_identifier(self.peer, "peer")


@dataclass(frozen=True)
class EncryptedShares:
    """Stage 2, site to coordinator: one ciphertext per neighbour, sorted by recipient."""

    TYPE: ClassVar[MessageType] = MessageType.ENCRYPTED_SHARES
    federation_id: str
    federation_sha256: bytes
    round_id: int
    site_id: str
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _require_envelope(self, "site_id")
        _require_sorted_unique([s.peer for s in self.shares], "shares")


@dataclass(frozen=True)
class ShareDelivery:
    """Stage 3 request, coordinator to site: who completed stage 2, and the ciphertexts
    addressed to this site (sorted by sender)."""

    TYPE: ClassVar[MessageType] = MessageType.SHARE_DELIVERY
    federation_id: str
    federation_sha256: bytes
    round_id: int
    recipient: str
    share_senders: tuple[str, ...]
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _require_envelope(self, "recipient")
        for site in self.share_senders:
            _require_identifier(site, "share sender")
        _require_sorted_unique(list(self.share_senders), "share_senders")
        _require_sorted_unique([s.peer for s in self.shares], "shares")


@dataclass(frozen=True, eq=False)
class MaskedBlock:
    """A block's masked ring vector (block size + 1 elements: the weight is last)."""

    block: str
    vector: np.ndarray

    def __post_init__(self) -> None:
        _require_block(self.block)
        _require(
            isinstance(self.vector, np.ndarray)
            and self.vector.ndim == 1
            and self.vector.dtype in (np.dtype("<u4"), np.dtype("<u8")),
            "vector must be a 1-D ring vector",
        )


@dataclass(frozen=True)
class MaskStatement:
    """A site's signed statement of the peers it masked one block with, on the sparse
    masking graph (:func:`blossom_secure.secagg.kdf.mask_statement_payload`)."""

    site: str
    block: str
    peers: tuple[str, ...]
    signature: bytes

    def __post_init__(self) -> None:
        _require_identifier(self.site, "site")
        _require_block(self.block)
        _require_site_set(self.peers, "peers")
        _require(self.site not in self.peers, "a site does not mask with itself")
        _require_signature(self.signature)


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Stage 3, site to coordinator: the masked vectors, sorted by block, and for each
    block on the sparse graph the sender's mask statement (sorted by block)."""

    TYPE: ClassVar[MessageType] = MessageType.MASKED_INPUT
    federation_id: str
    federation_sha256: bytes
    round_id: int
    site_id: str
    blocks: tuple[MaskedBlock, ...]
    statements: tuple[MaskStatement, ...] = ()

    def __post_init__(self) -> None:
        _require_envelope(self, "site_id")
        _require_sorted_unique([b.block for b in self.blocks], "blocks")
        _require(all(s.site == self.site_id for s in self.statements), "a mask statement is the sender's own")
        _require_sorted_unique([s.block for s in self.statements], "statements")
        _require({s.block for s in self.statements} <= {b.block for b in self.blocks},
                 "a mask statement is for a block the message carries")


@dataclass(frozen=True)
class BlockSurvivors:
    """One block's survivor set (``U3`` of its group), as the coordinator claims it."""

    block: str
    survivors: tuple[str, ...]

    def __post_init__(self) -> None:
        _require_block(self.block)
        _require(len(self.survivors) > 0, "a survivor set is not empty")
        _require_site_set(self.survivors, "survivors")


@dataclass(frozen=True)
class ConsistencyRequest:
    """Stage 4 request, coordinator to site: per block the site sent masked input for,
    the set of group members whose masked input arrived, for the site to sign; and, for
    the blocks on the sparse graph, the mask statements of the survivors whose shares the
    site holds (sorted by block, then site)."""

    TYPE: ClassVar[MessageType] = MessageType.CONSISTENCY_REQUEST
    federation_id: str
    federation_sha256: bytes
    round_id: int
    recipient: str
    blocks: tuple[BlockSurvivors, ...]
    statements: tuple[MaskStatement, ...] = ()

    def __post_init__(self) -> None:
        _require_envelope(self, "recipient")
        _require_sorted_unique([b.block for b in self.blocks], "blocks")
        _require_sorted_unique([(s.block, s.site) for s in self.statements], "statements")


@dataclass(frozen=True)
class BlockSignature:
    """A site's Ed25519 signature over one block's survivor set
    (:func:`blossom_secure.secagg.kdf.consistency_payload`)."""

    block: str
    signature: bytes

    def __post_init__(self) -> None:
        _require_block(self.block)
        _require_signature(self.signature)


@dataclass(frozen=True)
class ConsistencyResponse:
    """Stage 4, site to coordinator: its signatures over the survivor sets, sorted by
    block."""

    TYPE: ClassVar[MessageType] = MessageType.CONSISTENCY_RESPONSE
    federation_id: str
    federation_sha256: bytes
    round_id: int
    site_id: str
    signatures: tuple[BlockSignature, ...]

    def __post_init__(self) -> None:
        _require_envelope(self, "site_id")
        _require_sorted_unique([s.block for s in self.signatures], "signatures")


@dataclass(frozen=True)
class SiteSignature:
    """One site's consistency-check signature, as the coordinator forwards it."""

    site: str
    signature: bytes

    def __post_init__(self) -> None:
        _require_identifier(self.site, "site")
        _require_signature(self.signature)


@dataclass(frozen=True)
class BlockSignatures:
    """The consistency-check signatures collected for one block, sorted by signer."""

    block: str
    signatures: tuple[SiteSignature, ...]

    def __post_init__(self) -> None:
        _require_block(self.block)
        _require_sorted_unique([s.site for s in self.signatures], "signatures")


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 5 request, coordinator to site: the sites whose masked input arrived
    (``survivors``), those that shared keys but sent no masked input (``dropped``), and
    per block the consistency-check signatures collected over the block's survivor set."""

    TYPE: ClassVar[MessageType] = MessageType.UNMASK_REQUEST
    federation_id: str
    federation_sha256: bytes
    round_id: int
    recipient: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    consistency: tuple[BlockSignatures, ...]

    def __post_init__(self) -> None:
        _require_envelope(self, "recipient")
        _require_site_set(self.survivors, "survivors")
        _require_site_set(self.dropped, "dropped")
        _require_sorted_unique([b.block for b in self.consistency], "consistency")


@dataclass(frozen=True)
class RevealedShare:
    """One share a survivor reveals: of ``peer``'s self-mask seed or mask key for ``block``."""

    peer: str
    block: str
    kind: ShareKind
    value: bytes

    def __post_init__(self) -> None:
        _require_identifier(self.peer, "peer")
        _require_block(self.block)
        if type(self.kind) is not ShareKind:
            object.__setattr__(self, "kind", ShareKind(self.kind))


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 5, site to coordinator: the revealed shares, sorted by (peer, block)."""

    TYPE: ClassVar[MessageType] = MessageType.UNMASK_RESPONSE
    federation_id: str
    federation_sha256: bytes
    round_id: int
    site_id: str
    shares: tuple[RevealedShare, ...]

    def __post_init__(self) -> None:
        _require_envelope(self, "site_id")
        _require_sorted_unique([(s.peer, s.block) for s in self.shares], "shares")


@dataclass(frozen=True)
class BlockShares:
    """Inside a share ciphertext: the recipient's shares of the sender's two secrets for
    one block."""

    block: str
    mask_key_share: bytes
    seed_share: bytes

    def __post_init__(self) -> None:
        _require_block(self.block)


@dataclass(frozen=True)
class SharePlaintext:
    """The plaintext of one share ciphertext (never sent in the clear)."""

    TYPE: ClassVar[MessageType] = MessageType.SHARE_PLAINTEXT
    federation_id: str
    federation_sha256: bytes
    round_id: int
    sender: str
    recipient: str
    blocks: tuple[BlockShares, ...]

    def __post_init__(self) -> None:
        _require_envelope(self, "sender")
        _require_identifier(self.recipient, "recipient")
        _require_sorted_unique([b.block for b in self.blocks], "blocks")


_TEXT = _Text()
_U16 = _UInt(2)
_U64 = _UInt(8)
_KEY = _Fixed(crypto.X25519_KEY_BYTES)
_DIGEST = _Fixed(32)
_SIGNATURE = _Fixed(crypto.ED25519_SIGNATURE_BYTES)
_SHARE = _Fixed(SHARE_BYTES)
_ENCRYPTED_SHARE = _Record(EncryptedShare, (_TEXT, _Fixed(_NONCE_BYTES), _Blob(_MAX_CIPHERTEXT_BYTES)))
_MASK_STATEMENT = _Record(MaskStatement, (_TEXT, _TEXT, _List(_TEXT), _SIGNATURE))
_BLOCK_SIGNATURES = _Record(BlockSignatures, (_TEXT, _List(_Record(SiteSignature, (_TEXT, _SIGNATURE)))))


class _KindCodec(_Codec):
    def write(self, writer: _Writer, value: ShareKind) -> None:
        writer.raw(bytes([int(value)]))

    def read(self, reader: _Reader) -> ShareKind:
        kind = _SHARE_KINDS.get(reader.take(1)[0])
        if kind is None:
            raise MalformedMessageError("unknown share kind")
        return kind


_SHARE_KINDS = {int(kind): kind for kind in ShareKind}


#: The envelope, fields 1-4 of every message: (tag, attribute, codec); the attribute of
#: field 4 (the party) is ``_ENVELOPE_PARTY[type]``.
_ENVELOPE: tuple[tuple[int, str | None, _Codec], ...] = (
    (1, "federation_id", _TEXT),
    (2, "federation_sha256", _DIGEST),
    (3, "round_id", _U64),
    (4, None, _TEXT),
)
#: Per type: the body fields (tag, attribute, codec), after the envelope.
_BODY: dict[type, tuple[tuple[int, str, _Codec], ...]] = {
    AdvertiseKeys: (
        (5, "share_public_key", _KEY),
        (6, "min_contributors", _U16),
        (7, "blocks", _List(_Record(BlockKeys, (_TEXT, _KEY, _DIGEST)))),
    ),
    KeyBundle: ((5, "advertisements", _List(_Blob(1 << 16))),),
    EncryptedShares: ((5, "shares", _List(_ENCRYPTED_SHARE)),),
    ShareDelivery: ((5, "share_senders", _List(_TEXT)), (6, "shares", _List(_ENCRYPTED_SHARE))),
    MaskedInput: (
        (5, "blocks", _List(_Record(MaskedBlock, (_TEXT, _RingVector())))),
        (6, "statements", _List(_MASK_STATEMENT)),
    ),
    ConsistencyRequest: (
        (5, "blocks", _List(_Record(BlockSurvivors, (_TEXT, _List(_TEXT))))),
        (6, "statements", _List(_MASK_STATEMENT)),
    ),
    ConsistencyResponse: ((5, "signatures", _List(_Record(BlockSignature, (_TEXT, _SIGNATURE)))),),
    UnmaskRequest: (
        (5, "survivors", _List(_TEXT)),
        (6, "dropped", _List(_TEXT)),
        (7, "consistency", _List(_BLOCK_SIGNATURES)),
    ),
    UnmaskResponse: ((5, "shares", _List(_Record(RevealedShare, (_TEXT, _TEXT, _KindCodec(), _SHARE)))),),
    SharePlaintext: ((5, "recipient", _TEXT), (6, "blocks", _List(_Record(BlockShares, (_TEXT, _SHARE, _SHARE))))),
}
_ENVELOPE_PARTY = {
    AdvertiseKeys: "site_id",
    EncryptedShares: "site_id",
    MaskedInput: "site_id",
    ConsistencyResponse: "site_id",
    UnmaskResponse: "site_id",
    KeyBundle: "recipient",
    ShareDelivery: "recipient",
    ConsistencyRequest: "recipient",
    UnmaskRequest: "recipient",
    SharePlaintext: "sender",
}
_SITE_MESSAGES = (AdvertiseKeys, EncryptedShares, MaskedInput, ConsistencyResponse, UnmaskResponse)
_COORDINATOR_MESSAGES = (KeyBundle, ShareDelivery, ConsistencyRequest, UnmaskRequest)
_BY_TYPE: dict[int, type] = {cls.TYPE: cls for cls in _BODY}

SiteMessage = AdvertiseKeys | EncryptedShares | MaskedInput | ConsistencyResponse | UnmaskResponse
CoordinatorMessage = KeyBundle | ShareDelivery | ConsistencyRequest | UnmaskRequest


# --------------------------------------------------------------------- encode/decode


def _encode_unsigned(message: Any) -> bytes:
    cls = type(message)
    writer = _Writer()
    writer.raw(_HEADER.pack(MAGIC, WIRE_VERSION, int(cls.TYPE)))
    for tag, name, codec in (*_ENVELOPE, *_BODY[cls]):
        writer.raw(bytes([tag]))
        codec.write(writer, getattr(message, name or _ENVELOPE_PARTY[cls]))
    return writer.getvalue()


def encode_site_message(message: SiteMessage, identity_key: Ed25519PrivateKey) -> bytes:
    """Encode and sign a site-to-coordinator message.

    Raises:
        TypeError: not a site message.
        ValueError: a field cannot be encoded.
    """
    if not isinstance(message, _SITE_MESSAGES):
        raise TypeError("not a site message")
    body = _encode_unsigned(message)
    signature = crypto.sign(identity_key, signature_payload(body))
    return body + bytes([_SIGNATURE_TAG]) + signature


def encode_coordinator_message(message: CoordinatorMessage) -> bytes:
    """Encode a coordinator-to-site message.

    Raises:
        TypeError: not a coordinator message.
    """
    if not isinstance(message, _COORDINATOR_MESSAGES):
        raise TypeError("not a coordinator message")
    return _encode_unsigned(message)


def encode_share_plaintext(message: SharePlaintext) -> bytes:
    """Encode the plaintext of a share ciphertext."""
    if not isinstance(message, SharePlaintext):
        raise TypeError("not a share plaintext")
    return _encode_unsigned(message)


def peek_message_type(untrusted_message: bytes, *, max_bytes: int) -> MessageType:
    """The type named in a message's header (nothing else is checked or trusted).

    Raises:
        MessageTooLargeError, MalformedMessageError, UnsupportedVersionError.
    """
    view = _checked_view(untrusted_message, max_bytes)
    return MessageType(_read_header(view))


def _checked_view(untrusted_message: bytes, max_bytes: int) -> memoryview:
    if not isinstance(untrusted_message, (bytes, bytearray, memoryview)):
        raise MalformedMessageError("a message is bytes")
    view = memoryview(untrusted_message).cast("B")
    if view.nbytes > max_bytes:
        raise MessageTooLargeError(f"message of {view.nbytes} bytes exceeds the limit of {max_bytes}")
    return view


def _read_header(view: memoryview) -> int:
    if view.nbytes < _HEADER.size:
        raise MalformedMessageError("message is truncated")
    magic, version, type_code = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise MalformedMessageError("not a secure-aggregation message")
    if version != WIRE_VERSION:
        raise UnsupportedVersionError(f"wire version {version} is not supported")
    if type_code not in _BY_TYPE:
        raise MalformedMessageError("unknown message type")
    return type_code


def _known_tags(cls: type) -> set[int]:
    return {*(t for t, _, _ in _ENVELOPE), *(t for t, _, _ in _BODY[cls])}


def _read_field(reader: _Reader, cls: type, tag: int, codec: _Codec) -> Any:
    got = reader.take(1)[0]
    if got != tag:
        if got not in _known_tags(cls):
            raise UnknownFieldError(f"unknown field tag {got} in {cls.__name__}")
        raise MalformedMessageError(f"field {got} out of order in {cls.__name__} (expected {tag})")
    return codec.read(reader)


def _read_envelope(reader: _Reader, cls: type) -> tuple[str, bytes, int, str]:
    federation_id, federation_sha256, round_id, party = (
        _read_field(reader, cls, tag, codec) for tag, _name, codec in _ENVELOPE
    )
    return federation_id, federation_sha256, round_id, party


def _check_context(
    envelope: tuple[str, bytes, int, str], *, expected_federation: str, expected_sha256: bytes, expected_round: int
) -> None:
    federation_id, federation_sha256, round_id, _party = envelope
    if federation_id != expected_federation:
        raise WrongFederationError("message belongs to another federation")
    if federation_sha256 != expected_sha256:
        raise WrongFederationError("message is bound to another version of the federation file (its SHA-256 differs)")
    if round_id != expected_round:
        raise WrongRoundError(f"message belongs to round {round_id}, not {expected_round}")


def _read_body(reader: _Reader, cls: type, envelope: tuple[str, bytes, int, str]) -> Any:
    values = list(envelope)
    for tag, _name, codec in _BODY[cls]:
        values.append(_read_field(reader, cls, tag, codec))
    if reader.remaining():
        extra = reader.take(1)[0]
        if extra not in _known_tags(cls):
            raise UnknownFieldError(f"unknown field tag {extra} in {cls.__name__}")
        raise MalformedMessageError(f"repeated field or trailing bytes after {cls.__name__}")
    return _construct(cls, values)


def decode_site_message(
    untrusted_message: bytes,
    *,
    federation_id: str,
    federation_sha256: bytes,
    round_id: int,
    roster: Mapping[str, bytes],
    max_bytes: int,
) -> SiteMessage:
    """Check and decode a signed site-to-coordinator message.

    Order of checks: length limit; header (magic, version, type); envelope (federation,
    federation file hash, round, sender); sender in ``roster``; signature; federation,
    federation file hash and round; body.

    Args:
        untrusted_message: The bytes as received.
        federation_id, federation_sha256, round_id: The expected context (the federation,
            the SHA-256 of its federation file, the round).
        roster: Site id to raw Ed25519 public key.
        max_bytes: Length limit.

    Raises:
        MessageTooLargeError: longer than ``max_bytes``.
        UnsupportedVersionError: another wire version.
        MalformedMessageError: not a canonical encoding (or not a site message).
        UnknownFieldError: a field tag this type does not define.
        UnknownSenderError: the sender is not in the roster.
        AuthenticationError: missing or invalid signature.
        WrongFederationError: another federation, or another version of its file.
        WrongRoundError: another round.

    Notes:
        Like Fernet checking its MAC before decrypting, the signature is checked before
        the body is parsed or the context compared, and every signature failure is the
        same opaque error. Binding federation and round inside the signed bytes is what
        makes a message replayed from another round or federation detectable (Bonawitz
        et al. 2017 assume such authenticated channels between sites and server). A
        signature that already verified in this process is not checked again
        (:func:`blossom_secure.crypto.verify_signature_remembered`): every site run in
        one process checks the same advertisements.
    """
    view = _checked_view(untrusted_message, max_bytes)
    cls = _BY_TYPE[_read_header(view)]
    if cls not in _SITE_MESSAGES:
        raise MalformedMessageError(f"{cls.__name__} is not a site message")
    reader = _Reader(view, _HEADER.size, view.nbytes)
    envelope = _read_envelope(reader, cls)
    sender = envelope[3]
    if sender not in roster:
        raise UnknownSenderError("sender is not in the federation roster")
    body_end = view.nbytes - _SIGNATURE_TRAILER_BYTES
    if body_end < reader.pos or view[body_end] != _SIGNATURE_TAG:
        raise AuthenticationError()
    payload = signature_payload(view[:body_end])
    crypto.verify_signature_remembered(roster[sender], payload, bytes(view[body_end + 1 :]))
    _check_context(
        envelope, expected_federation=federation_id, expected_sha256=federation_sha256, expected_round=round_id
    )
    reader.end = body_end
    return _read_body(reader, cls, envelope)


#: Advertisements remembered by :func:`decode_advertisement_remembered`.
_REMEMBERED_ADVERTISEMENTS = 4096
_remembered_advertisements: OrderedDict[tuple, tuple[AdvertiseKeys, bytes]] = OrderedDict()
_remembered_lock = threading.Lock()


def decode_advertisement_remembered(
    untrusted_message: bytes,
    *,
    federation_id: str,
    federation_sha256: bytes,
    round_id: int,
    roster: Mapping[str, bytes],
    max_bytes: int,
) -> SiteMessage:
    """:func:`decode_site_message`, remembering the advertisements it accepted in this
    process (the oldest forgotten first), so that the same bytes in the same context under
    the same sender key are decoded once.

    For the key bundle, which every site of a federation run in one process (the embedded
    runtime, tests, benchmarks) decodes in full: ``n * n`` decodes of ``n`` distinct
    advertisements otherwise.

    Raises:
        As :func:`decode_site_message` (a message that is not an advertisement is decoded
        and returned, never remembered).

    Notes:
        Decoding is a pure function of the bytes, the context and the sender's roster
        key, and the decoded message is immutable, so a remembered one is the answer the
        decoder would give again. Only successes are kept, in a bounded table of public
        values.
    """
    key = (bytes(untrusted_message), federation_id, federation_sha256, round_id)
    with _remembered_lock:
        found = _remembered_advertisements.get(key)
    if found is not None and len(key[0]) <= max_bytes and roster.get(found[0].site_id) == found[1]:
        return found[0]
    message = decode_site_message(
        untrusted_message,
        federation_id=federation_id,
        federation_sha256=federation_sha256,
        round_id=round_id,
        roster=roster,
        max_bytes=max_bytes,
    )
    if isinstance(message, AdvertiseKeys):
        with _remembered_lock:
            _remembered_advertisements[key] = (message, roster[message.site_id])
            if len(_remembered_advertisements) > _REMEMBERED_ADVERTISEMENTS:
                _remembered_advertisements.popitem(last=False)
    return message


def decode_coordinator_message(
    untrusted_message: bytes,
    *,
    federation_id: str,
    federation_sha256: bytes,
    round_id: int,
    recipient: str,
    max_bytes: int,
) -> CoordinatorMessage:
    """Check and decode a coordinator-to-site message addressed to ``recipient``.

    Raises:
        MessageTooLargeError, UnsupportedVersionError, MalformedMessageError,
        UnknownFieldError: as for :func:`decode_site_message`.
        WrongFederationError: another federation, or another version of its file.
        WrongRoundError: another round.
        WrongRecipientError: addressed to another site.
    """
    view = _checked_view(untrusted_message, max_bytes)
    cls = _BY_TYPE[_read_header(view)]
    if cls not in _COORDINATOR_MESSAGES:
        raise MalformedMessageError(f"{cls.__name__} is not a coordinator message")
    reader = _Reader(view, _HEADER.size, view.nbytes)
    envelope = _read_envelope(reader, cls)
    _check_context(
        envelope, expected_federation=federation_id, expected_sha256=federation_sha256, expected_round=round_id
    )
    if envelope[3] != recipient:
        raise WrongRecipientError("message is addressed to another site")
    return _read_body(reader, cls, envelope)


def decode_share_plaintext(
    untrusted_plaintext: bytes,
    *,
    federation_id: str,
    federation_sha256: bytes,
    round_id: int,
    sender: str,
    recipient: str,
) -> SharePlaintext:
    """Decode a decrypted share plaintext and check its context.

    Raises:
        MalformedMessageError: not a canonical share plaintext, or its sender or recipient
            differ from those the ciphertext was authenticated for.
        WrongFederationError: another federation, or another version of its file.
        WrongRoundError: another round.
    """
    view = _checked_view(untrusted_plaintext, _MAX_CIPHERTEXT_BYTES)
    cls = _BY_TYPE[_read_header(view)]
    if cls is not SharePlaintext:
        raise MalformedMessageError("not a share plaintext")
    reader = _Reader(view, _HEADER.size, view.nbytes)
    envelope = _read_envelope(reader, cls)
    _check_context(
        envelope, expected_federation=federation_id, expected_sha256=federation_sha256, expected_round=round_id
    )
    message = _read_body(reader, cls, envelope)
    if message.sender != sender or message.recipient != recipient:
        raise MalformedMessageError("share plaintext names other parties than its ciphertext")
    return message
