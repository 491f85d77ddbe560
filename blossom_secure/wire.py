"""The deployment runtime's envelope: one request from the coordinator, one reply from a site.

Flower's deployment engine (and the pipes of the tests) move opaque bytes. Each exchange
of a round is one request to one site and one reply from it, both in this envelope::

    envelope = "BLSMRT" 0x00 0x01   header-length:u32 (big-endian)   header   body
    header   = canonical JSON (keys sorted, no whitespace, ASCII, integers only)

A **request** header names the stage, the federation (its id and the SHA-256 of its
file), the round and the recipient; the round announcement (``offer``) and the end of the
round (``finish``) add the shape of the global blocks carried in the body (float32,
little-endian, concatenated in the header's order) and, for ``finish``, each block's
outcome. A secure-aggregation request carries the coordinator's protocol message
(:mod:`blossom_secure.secagg.messages`) as its body, unchanged: the site's stage machine
checks it exactly as in the embedded runtime.

A **reply** header binds the stage, federation, round, the site, the SHA-256 of the request
it answers and the SHA-256 of its body, and is signed with the site's Ed25519 identity key
over ``"blossom_secure/runtime-envelope/v1\\0" || SHA-256(header without signature)``. So
the coordinator knows which site answered from the roster, never from the transport's
node ids, and an old or relayed reply cannot answer a new request. The body is the site's
protocol message, its round report, or nothing.

Everything here is pure (bytes in, bytes out). Decoders check, in order: the length limit,
the magic, the header length, strict JSON (no duplicate keys, no floats, no NaN), the
canonical form, the version, the exact set of fields for the kind and stage, then each
field; a reply's sender, signature and body digest; the federation, round, recipient and
request digest. Nothing is unpickled or evaluated.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from blossom_secure import crypto
from blossom_secure.blocks import is_head, is_valid_block_name
from blossom_secure.crypto import Ed25519PrivateKey
from blossom_secure.secagg.errors import (
    AuthenticationError,
    InconsistentMessageError,
    MalformedMessageError,
    MessageTooLargeError,
    UnknownFieldError,
    UnknownSenderError,
    UnsupportedVersionError,
    WrongFederationError,
    WrongRecipientError,
    WrongRoundError,
)
from blossom_secure.secagg.messages import is_valid_identifier

__all__ = [
    "ENVELOPE_VERSION",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "REPLY_SIGNING_CONTEXT",
    "SECAGG_STAGES",
    "STAGES",
    "BlockResultEntry",
    "Reply",
    "Request",
    "check_recipient",
    "decode_blocks",
    "decode_reply",
    "decode_request",
    "encode_blocks",
    "encode_reply",
    "encode_request",
    "peek_request",
]

#: First bytes of every envelope.
MAGIC = b"BLSMRT\x00\x01"
#: The header version written and the only one read.
ENVELOPE_VERSION = 1
#: Longest header accepted (checked before parsing).
MAX_HEADER_BYTES = 256 * 1024
#: Prefixed to SHA-256 of a reply's header (without its signature) before signing. Unlike
#: every other label the identity key signs under (audit records and checkpoints,
#: secure-aggregation messages and states), so a reply signature is never anything else.
REPLY_SIGNING_CONTEXT = b"blossom_secure/runtime-envelope/v1\x00"
#: The stages of a round, in order, after ``identify`` (which binds transport nodes to sites).
STAGES = ("identify", "offer", "share_keys", "masked_input", "consistency", "unmask", "finish")
#: The stages whose body is a secure-aggregation message (the advertisement rides on ``offer``).
SECAGG_STAGES = ("share_keys", "masked_input", "consistency", "unmask")

_PREFIX = struct.Struct(">8sI")
_MAX_ROUND = (1 << 63) - 1
_NONCE_BYTES = 32
_MAX_BLOCKS = 256
_MAX_BLOCK_VALUES = 1 << 30
_MAX_FAILURE_CHARS = 2000
_HEX = frozenset("0123456789abcdef")
_COMMON = frozenset({"version", "kind", "stage", "federation_id", "federation_sha256", "round_id"})
_REQUEST_EXTRA = {
    "identify": frozenset({"nonce"}),
    "offer": frozenset({"recipient", "blocks"}),
    "finish": frozenset({"recipient", "blocks", "outcomes"}),
}
_REPLY_FIELDS = _COMMON | {"site_id", "request_sha256", "body_sha256", "signature"}


@dataclass(frozen=True)
class BlockResultEntry:
    """One block's outcome as the ``finish`` request states it.

    Attributes:
        block: The block name.
        contributors: The sites whose update is in the aggregate (sorted; empty if failed).
        failure: Why the block was not aggregated, or ``None``.
    """

    block: str
    contributors: tuple[str, ...]
    failure: str | None


@dataclass(frozen=True)
class Request:
    """A decoded coordinator request (its fields are still the coordinator's claims).

    Attributes:
        stage: One of :data:`STAGES`.
        federation_id, federation_sha256, round_id: What the request is bound to.
        recipient: The site addressed (``None`` for ``identify``).
        nonce: 32 fresh bytes (``identify`` only).
        blocks: ``(block, number of float32 values)`` of the body (``offer``, ``finish``).
        outcomes: Each block's outcome (``finish`` only).
        body: The body bytes (a protocol message, float32 values, or nothing).
    """

    stage: str
    federation_id: str
    federation_sha256: bytes
    round_id: int
    recipient: str | None
    nonce: bytes | None
    blocks: tuple[tuple[str, int], ...]
    outcomes: tuple[BlockResultEntry, ...]
    body: bytes


@dataclass(frozen=True)
class Reply:
    """A decoded, authenticated site reply.

    Attributes:
        stage, federation_id, federation_sha256, round_id: What it answers.
        site_id: The site whose identity key signed it (checked against the roster).
        request_sha256: SHA-256 of the request it answers.
        joined: For ``offer``: whether the site joined the round (``None`` otherwise).
        body: The site's protocol message, round report, or nothing.
    """

    stage: str
    federation_id: str
    federation_sha256: bytes
    round_id: int
    site_id: str
    request_sha256: bytes
    joined: bool | None
    body: bytes


# ----------------------------------------------------------------------------- JSON


def _dumps(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedMessageError(f"envelope header: duplicate key {key!r}")
        out[key] = value
    return out


def _no_float(text: str) -> Any:
    raise MalformedMessageError("envelope header: a number that is not an integer")


def _no_constant(text: str) -> Any:
    raise MalformedMessageError(f"envelope header: {text} is not JSON")


def _split(untrusted: bytes, max_bytes: int) -> tuple[dict[str, Any], bytes, bytes]:
    """Check the framing and return ``(header document, header bytes, body)``."""
    if not isinstance(untrusted, bytes | bytearray | memoryview):
        raise TypeError("an envelope is bytes")
    data = bytes(untrusted)
    if len(data) > max_bytes:
        raise MessageTooLargeError(f"the envelope is {len(data)} bytes, more than the limit of {max_bytes}")
    if len(data) < _PREFIX.size:
        raise MalformedMessageError("the envelope is shorter than its prefix")
    magic, header_bytes = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MalformedMessageError("not a blossom_secure runtime envelope")
    if header_bytes > MAX_HEADER_BYTES or _PREFIX.size + header_bytes > len(data):
        raise MalformedMessageError("the envelope header length is out of range")
    raw = data[_PREFIX.size : _PREFIX.size + header_bytes]
    try:
        document = json.loads(
            raw.decode("ascii"), object_pairs_hook=_strict_object, parse_float=_no_float, parse_constant=_no_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedMessageError("the envelope header is not ASCII JSON") from None
    if not isinstance(document, dict):
        raise MalformedMessageError("the envelope header is not a JSON object")
    if _dumps(document) != raw:
        raise MalformedMessageError("the envelope header is not in canonical form")
    version = document.get("version")
    if version != ENVELOPE_VERSION or isinstance(version, bool):
        raise UnsupportedVersionError(f"envelope version {version!r}; this release reads {ENVELOPE_VERSION}")
    return document, raw, data[_PREFIX.size + header_bytes :]


def _frame(document: Mapping[str, Any], body: bytes) -> bytes:
    header = _dumps(document)
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"the envelope header would be {len(header)} bytes, over {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, len(header)) + header + bytes(body)


def _fields(document: Mapping[str, Any], expected: frozenset[str], what: str) -> None:
    unknown = sorted(set(document) - expected)
    if unknown:
        raise UnknownFieldError(f"{what}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(expected - set(document))
    if missing:
        raise MalformedMessageError(f"{what}: missing field(s) {', '.join(missing)}")


def _int(value: Any, where: str, *, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise MalformedMessageError(f"{where} must be an integer in 0..{maximum}")
    return value


def _identifier(value: Any, where: str) -> str:
    if not is_valid_identifier(value):
        raise MalformedMessageError(f"{where} is not a valid identifier")
    return value


def _hex(value: Any, where: str, size: int) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size or not set(value) <= _HEX:
        raise MalformedMessageError(f"{where} must be {2 * size} lower-case hex digits")
    return bytes.fromhex(value)


def _stage(value: Any) -> str:
    if value not in STAGES:
        raise MalformedMessageError(f"stage must be one of {', '.join(STAGES)}")
    return value


def _check_context(document: Mapping[str, Any], *, federation_id: str, federation_sha256: bytes) -> int:
    if _identifier(document["federation_id"], "federation_id") != federation_id:
        raise WrongFederationError(f"the envelope belongs to federation {document['federation_id']!r}")
    if _hex(document["federation_sha256"], "federation_sha256", 32) != federation_sha256:
        raise WrongFederationError("the envelope is bound to another version of the federation file")
    return _int(document["round_id"], "round_id", maximum=_MAX_ROUND)


# -------------------------------------------------------------------------- blocks


def encode_blocks(blocks: Mapping[str, np.ndarray]) -> tuple[tuple[tuple[str, int], ...], bytes]:
    """The ``blocks`` field and body of an ``offer`` or ``finish`` request.

    Args:
        blocks: Block name to values (any shape; sent flattened as float32).

    Returns:
        ``((block, size), ...)`` sorted by block name, and the float32 little-endian
        values concatenated in that order.

    Raises:
        ValueError: a name that is not a shareable block (a task head never travels
            here), a value that is not finite, or too many blocks.
    """
    if len(blocks) > _MAX_BLOCKS:
        raise ValueError(f"at most {_MAX_BLOCKS} blocks")
    spec = []
    parts = []
    for name in sorted(blocks):
        if not is_valid_block_name(name) or is_head(name):
            raise ValueError(f"{name!r} is not a shareable block")
        values = np.ascontiguousarray(np.asarray(blocks[name], dtype="<f4").reshape(-1))
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: values must be finite")
        spec.append((name, int(values.size)))
        parts.append(values.tobytes())
    return tuple(spec), b"".join(parts)


def decode_blocks(
    spec: Sequence[tuple[str, int]], untrusted_body: bytes, *, expected_sizes: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """The block values of an ``offer`` or ``finish`` request, checked against the layout.

    Args:
        spec: The request's ``blocks`` field (already checked for form by the decoder).
        untrusted_body: The request's body.
        expected_sizes: The receiver's own layout (from its federation file): block name to
            number of values. Every block named must be in it with exactly that size.

    Returns:
        Block name to a new float32 1-D array.

    Raises:
        InconsistentMessageError: a block outside the layout, a size that differs from
            it, a body of the wrong length, or a value that is not finite.
    """
    total = 0
    for name, size in spec:
        if expected_sizes.get(name) != size:
            raise InconsistentMessageError(f"block {name} is not in the layout with {size} values")
        total += size
    if len(untrusted_body) != 4 * total:
        raise InconsistentMessageError(f"the body holds {len(untrusted_body)} bytes, not {4 * total}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, size in spec:
        values = np.frombuffer(untrusted_body, dtype="<f4", count=size, offset=offset).astype(np.float32)
        if not np.isfinite(values).all():
            raise InconsistentMessageError(f"block {name} holds values that are not finite")
        out[name] = values
        offset += 4 * size
    return out


def _blocks_field(value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list) or len(value) > _MAX_BLOCKS:
        raise MalformedMessageError(f"blocks must be a list of at most {_MAX_BLOCKS} entries")
    spec = []
    for i, entry in enumerate(value):
        if not isinstance(entry, list) or len(entry) != 2:
            raise MalformedMessageError(f"blocks[{i}] must be [name, size]")
        name, size = entry
        if not is_valid_block_name(name) or is_head(name):
            raise MalformedMessageError(f"blocks[{i}] does not name a shareable block")
        spec.append((name, _int(size, f"blocks[{i}].size", maximum=_MAX_BLOCK_VALUES)))
    names = [name for name, _ in spec]
    if names != sorted(set(names)):
        raise MalformedMessageError("blocks must be sorted by name, without repeats")
    return tuple(spec)


def _outcomes_field(value: Any, blocks: tuple[tuple[str, int], ...]) -> tuple[BlockResultEntry, ...]:
    if not isinstance(value, list) or len(value) > _MAX_BLOCKS:
        raise MalformedMessageError(f"outcomes must be a list of at most {_MAX_BLOCKS} entries")
    entries = []
    carried = {name for name, _ in blocks}
    for i, item in enumerate(value):
        where = f"outcomes[{i}]"
        if not isinstance(item, dict):
            raise MalformedMessageError(f"{where} must be an object")
        _fields(item, frozenset({"block", "contributors", "failure"}), where)
        block = item["block"]
        if not is_valid_block_name(block) or is_head(block):
            raise MalformedMessageError(f"{where}.block does not name a shareable block")
        contributors = item["contributors"]
        if not isinstance(contributors, list) or len(contributors) > 1 << 16:
            raise MalformedMessageError(f"{where}.contributors must be a list of site ids")
        for site in contributors:
            _identifier(site, f"{where}.contributors[]")
        if contributors != sorted(set(contributors)):
            raise MalformedMessageError(f"{where}.contributors must be sorted, without repeats")
        failure = item["failure"]
        if failure is not None and (not isinstance(failure, str) or not 0 < len(failure) <= _MAX_FAILURE_CHARS):
            raise MalformedMessageError(f"{where}.failure must be null or 1 to {_MAX_FAILURE_CHARS} characters")
        if failure is None and (not contributors or block not in carried):
            raise InconsistentMessageError(f"{where}: an aggregated block needs contributors and its new value")
        if failure is not None and contributors:
            raise InconsistentMessageError(f"{where}: a failed block has no contributors")
        entries.append(BlockResultEntry(block, tuple(contributors), failure))
    names = [e.block for e in entries]
    if names != sorted(set(names)):
        raise MalformedMessageError("outcomes must be sorted by block, without repeats")
    return tuple(entries)


# ------------------------------------------------------------------------- requests


def encode_request(
    *,
    stage: str,
    federation_id: str,
    federation_sha256: bytes,
    round_id: int,
    recipient: str | None,
    body: bytes = b"",
    nonce: bytes | None = None,
    blocks: Sequence[tuple[str, int]] = (),
    outcomes: Sequence[BlockResultEntry] = (),
) -> bytes:
    """Encode a coordinator request (see the module documentation for each stage's fields).

    Raises:
        ValueError: fields that do not fit the stage (the encoder runs the decoder, so it
            never produces an envelope a site would refuse for its form).
    """
    document: dict[str, Any] = {
        "version": ENVELOPE_VERSION,
        "kind": "request",
        "stage": stage,
        "federation_id": federation_id,
        "federation_sha256": federation_sha256.hex(),
        "round_id": round_id,
    }
    if stage == "identify":
        document["nonce"] = (nonce or b"").hex()
    else:
        document["recipient"] = recipient
    if stage in ("offer", "finish"):
        document["blocks"] = [[name, int(size)] for name, size in blocks]
    if stage == "finish":
        document["outcomes"] = [
            {"block": e.block, "contributors": list(e.contributors), "failure": e.failure} for e in outcomes
        ]
    encoded = _frame(document, body)
    try:
        decode_request(encoded, federation_id=federation_id, federation_sha256=federation_sha256,
                       max_bytes=len(encoded))
    except (MalformedMessageError, WrongFederationError, InconsistentMessageError) as exc:
        raise ValueError(f"cannot encode this request: {exc}") from None
    return encoded


def peek_request(untrusted_request: bytes, *, max_bytes: int) -> tuple[str, int]:
    """The stage and round a request claims, from its header only (to find the site's
    round state before the full checks).

    Raises:
        MessageTooLargeError, MalformedMessageError, UnsupportedVersionError: as
            :func:`decode_request`.
    """
    document, _, _ = _split(untrusted_request, max_bytes)
    if document.get("kind") != "request":
        raise MalformedMessageError("not a request")
    return _stage(document.get("stage")), _int(document.get("round_id"), "round_id", maximum=_MAX_ROUND)


def decode_request(
    untrusted_request: bytes, *, federation_id: str, federation_sha256: bytes, max_bytes: int
) -> Request:
    """Check and decode a coordinator request.

    Args:
        untrusted_request: The bytes as received.
        federation_id, federation_sha256: The receiver's own federation (its file's
            SHA-256), never the request's.
        max_bytes: Length limit, checked before parsing.

    Returns:
        The request. Its round, recipient, blocks and body still need the receiver's
        checks (:func:`decode_blocks`, the site's stage machine).

    Raises:
        MessageTooLargeError: longer than ``max_bytes``.
        MalformedMessageError: not a canonical envelope, or a field of the wrong form.
        UnsupportedVersionError: another envelope version.
        UnknownFieldError: a field the stage does not define.
        WrongFederationError: another federation, or another version of its file.
        InconsistentMessageError: a ``finish`` outcome that contradicts the blocks carried.

    Notes:
        Requests are not signed (the coordinator has no identity key in this design);
        TLS carries them, and nothing in one is trusted: the site checks the federation
        against its own file, the round against its own audit log and state, and the body
        with its own stage machine, which verifies every site signature inside it.
    """
    document, _, body = _split(untrusted_request, max_bytes)
    if document.get("kind") != "request":
        raise MalformedMessageError("not a request")
    stage = _stage(document.get("stage"))
    _fields(document, _COMMON | _REQUEST_EXTRA.get(stage, frozenset({"recipient"})), f"{stage} request")
    round_id = _check_context(document, federation_id=federation_id, federation_sha256=federation_sha256)
    recipient = None if stage == "identify" else _identifier(document["recipient"], "recipient")
    nonce = _hex(document["nonce"], "nonce", _NONCE_BYTES) if stage == "identify" else None
    blocks = _blocks_field(document["blocks"]) if stage in ("offer", "finish") else ()
    outcomes = _outcomes_field(document["outcomes"], blocks) if stage == "finish" else ()
    if stage not in ("offer", "finish") and stage not in SECAGG_STAGES and body:
        raise MalformedMessageError(f"a {stage} request has no body")
    return Request(stage, federation_id, federation_sha256, round_id, recipient, nonce, blocks, outcomes, body)


def check_recipient(request: Request, site_id: str, *, round_id: int | None = None) -> None:
    """Refuse a request addressed to another site (or, if given, for another round).

    Raises:
        WrongRecipientError: ``request.recipient`` is another site.
        WrongRoundError: ``round_id`` is given and differs from the request's.
    """
    if request.recipient is not None and request.recipient != site_id:
        raise WrongRecipientError(f"the request is addressed to {request.recipient!r}")
    if round_id is not None and request.round_id != round_id:
        raise WrongRoundError(f"the request is for round {request.round_id}, not {round_id}")


# --------------------------------------------------------------------------- replies


def _reply_payload(document: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in document.items() if k != "signature"}
    return REPLY_SIGNING_CONTEXT + hashlib.sha256(_dumps(body)).digest()


def encode_reply(
    *,
    request: Request,
    untrusted_request: bytes,
    site_id: str,
    identity_key: Ed25519PrivateKey,
    body: bytes = b"",
    joined: bool | None = None,
) -> bytes:
    """A site's signed reply to ``request``.

    Args:
        request: The decoded request (its stage, federation and round are echoed).
        untrusted_request: The request's bytes as received (their SHA-256 is bound).
        site_id: This site's id.
        identity_key: This site's Ed25519 identity key.
        body: The site's protocol message or round report (or nothing).
        joined: For ``offer`` only: whether the site joined the round.

    Raises:
        ValueError: ``joined`` given for another stage than ``offer``, or missing for it.

    Notes:
        The signature covers the header, which holds SHA-256 of the body and of the
        request: a coordinator (or anyone on the path) can neither change the body nor
        present the reply as the answer to another request, and it learns the sender
        from the roster key that verifies, not from the transport.
    """
    if (joined is None) == (request.stage == "offer"):
        raise ValueError("joined is given exactly for an offer reply")
    document: dict[str, Any] = {
        "version": ENVELOPE_VERSION,
        "kind": "reply",
        "stage": request.stage,
        "federation_id": request.federation_id,
        "federation_sha256": request.federation_sha256.hex(),
        "round_id": request.round_id,
        "site_id": site_id,
        "request_sha256": hashlib.sha256(untrusted_request).hexdigest(),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    if joined is not None:
        document["joined"] = bool(joined)
    document["signature"] = crypto.sign(identity_key, _reply_payload(document)).hex()
    return _frame(document, body)


def decode_reply(
    untrusted_reply: bytes,
    *,
    roster: Mapping[str, bytes],
    federation_id: str,
    federation_sha256: bytes,
    round_id: int,
    stage: str,
    request: bytes,
    max_bytes: int,
) -> Reply:
    """Check and decode a site's reply to ``request``.

    Args:
        untrusted_reply: The bytes as received.
        roster: Site id to raw Ed25519 public key (the federation roster).
        federation_id, federation_sha256, round_id, stage: What the reply must answer.
        request: The request sent (the reply must carry its SHA-256).
        max_bytes: Length limit, checked before parsing.

    Returns:
        The reply, its sender authenticated by the roster key.

    Raises:
        MessageTooLargeError, MalformedMessageError, UnsupportedVersionError,
        UnknownFieldError: not a canonical reply envelope within the limit.
        UnknownSenderError: the sender is not in the roster.
        AuthenticationError: the signature does not verify, or the body is not the one
            signed (one opaque error).
        WrongFederationError, WrongRoundError: another federation, file or round.
        InconsistentMessageError: another stage, or the answer to another request.
    """
    document, _, body = _split(untrusted_reply, max_bytes)
    if document.get("kind") != "reply":
        raise MalformedMessageError("not a reply")
    got_stage = _stage(document.get("stage"))
    _fields(document, _REPLY_FIELDS | ({"joined"} if got_stage == "offer" else set()), f"{got_stage} reply")
    site_id = _identifier(document["site_id"], "site_id")
    signature = _hex(document["signature"], "signature", crypto.ED25519_SIGNATURE_BYTES)
    body_sha256 = _hex(document["body_sha256"], "body_sha256", 32)
    request_sha256 = _hex(document["request_sha256"], "request_sha256", 32)
    if site_id not in roster:
        raise UnknownSenderError(f"{site_id!r} is not in the roster")
    crypto.verify_signature(roster[site_id], _reply_payload(document), signature)
    if hashlib.sha256(body).digest() != body_sha256:
        raise AuthenticationError()
    got_round = _check_context(document, federation_id=federation_id, federation_sha256=federation_sha256)
    if got_round != round_id:
        raise WrongRoundError(f"a reply for round {got_round}, not {round_id}")
    if got_stage != stage:
        raise InconsistentMessageError(f"a {got_stage} reply to a {stage} request")
    if request_sha256 != hashlib.sha256(request).digest():
        raise InconsistentMessageError(f"{site_id} answered another request")
    joined = document.get("joined")
    if got_stage == "offer" and not isinstance(joined, bool):
        raise MalformedMessageError("joined must be true or false")
    if got_stage == "offer" and not joined and body:
        raise InconsistentMessageError(f"{site_id} declined but sent a message")
    return Reply(got_stage, federation_id, federation_sha256, got_round, site_id, request_sha256, joined, body)

