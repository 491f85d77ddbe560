"""A site's tamper-evident, append-only audit log.

Every outbound message, every privacy expenditure and every policy in force is recorded
here *before* it takes effect, so that the hospital can later check what left the site and
prove that the record of it has not been edited.

File format
===========

The log is a JSON Lines file (one record per line, each line ending in ``\\n``), mode
0600, appended to only. A record is a JSON object with exactly these fields:

=================  ==========================================================================
``format``         ``1`` (:data:`AUDIT_FORMAT`); any other value is rejected.
``seq``            Sequence number: ``0`` for the first record, then ``+1`` per record.
``time_utc``       When the record was built: ISO 8601 UTC with a ``Z`` suffix,
                   ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``.
``site_id``        The site's id (the federation roster's spelling); the same on every line.
``round_id``       The federation round the event belongs to (an integer >= 0) or ``null``.
``event``          One of :data:`EVENTS` (below).
``details``        A JSON object whose keys depend on ``event`` (below).
``policy_sha256``  Lower-case hex SHA-256 of the exact bytes of the policy file in force;
                   ``null`` only for ``site_initialised`` and ``error`` (no policy yet).
``prev_sha256``    Lower-case hex SHA-256 of the previous *line* (its canonical bytes,
                   signature included, without the newline); for ``seq`` 0 the genesis
                   value :data:`GENESIS_SHA256` (64 zeros).
``signature``      Lower-case hex Ed25519 signature (128 hex digits) by the site's identity
                   key over ``RECORD_SIGNING_CONTEXT || canonical_bytes(record without
                   "signature")``.
=================  ==========================================================================

Each line is exactly ``canonical_bytes(record)``; a line with any other spelling of the same
JSON (extra spaces, other key order, escapes) is rejected, so there is one byte string per
record and hashing the line is hashing the record.

Canonical JSON
==============

:func:`canonical_bytes` follows RFC 8785 (JSON Canonicalization Scheme, JCS), with I-JSON
(RFC 7493) limits:

* object keys sorted by their UTF-16 code units (RFC 8785 section 3.2.3); keys are strings;
* no whitespace; ``,`` and ``:`` as separators; output encoded as UTF-8;
* strings: ``"`` and ``\\`` escaped, ``\\b \\t \\n \\f \\r`` for those controls, every other
  character below U+0020 as ``\\u00xx`` (lower-case hex), everything else (non-ASCII
  included) written as itself; lone surrogates are rejected;
* integers: plain decimal, and only within +/-(2**53 - 1) so that every JSON reader sees
  the same number (larger integers are rejected, not rounded);
* floats: the ECMAScript ``Number.prototype.toString`` form that RFC 8785 section 3.2.2.3
  prescribes (shortest round-trip digits; ``1e+21``, ``1e-7``, ``0.000001``; an integral
  float such as ``3.0`` is written ``3``; ``-0.0`` is written ``0``); NaN and the
  infinities are rejected;
* ``true``, ``false``, ``null``; lists and tuples become arrays; nesting is limited to 32
  levels. Anything else raises ``TypeError``.

Because an integral float is written as an integer, a record read back from the file can
hold ``3`` where ``3.0`` was written; both have the same canonical bytes, so hashes and
signatures are unaffected.

Signatures and the hash chain
=============================

The signed message is the domain-separation label :data:`RECORD_SIGNING_CONTEXT`
(``b"blossom_secure/audit-record/v1\\x00"``) followed by the canonical bytes of the record
without its ``signature`` field. The label keeps an audit signature from ever being
accepted as a signature on anything else the same identity key signs (secure-aggregation
key advertisements). ``prev_sha256`` chains each record to the complete previous line, so
deleting, inserting or reordering records breaks the chain at the first affected line.

Verification checks every record's structure, canonical form, sequence and chain link, and
the checkpoint's signature, which binds (through the chain) every record it covers; a
record after the checkpoint is checked by its own signature. Each record's own signature
is also checked with ``every_signature=True`` and whenever anything fails, so that the
first bad record is named (:func:`verify_log`).

Checkpoint (truncation detection)
=================================

A signed checkpoint lives beside the log (:func:`checkpoint_path`: ``audit.jsonl`` ->
``audit.head.json``). It is one canonical JSON line with fields ``format``, ``site_id``,
``last_seq`` (``null`` for an empty log), ``last_record_sha256`` (the genesis value for an
empty log) and ``signature`` (Ed25519 over :data:`CHECKPOINT_SIGNING_CONTEXT` followed by
the canonical bytes of the other fields). It is replaced atomically after every append
(write a temporary file, fsync, rename, fsync the directory).

What this proves, and what it does not:

* Without the site's private key nobody can add, alter or reorder a record, or cut records
  off the end of the log without it showing: the checkpoint would name a later record.
* Someone who can write the files but holds no key *can* roll both files back together to
  an earlier consistent state (or delete both): the old checkpoint is validly signed.
  Detecting that needs a record held elsewhere, such as signed receipts kept by the
  coordinator; that is future work.
* The holder of the key (the site itself, or whoever stole the key) can rewrite history;
  the log protects against tampering by others and against accidents, not against the key
  holder.
* An append is two steps (the record, then the checkpoint). If a crash falls between them
  the checkpoint names the record before the last one. Verification accepts exactly that
  state, since the extra record carries a valid signature and so was written by the key
  holder; it reports it in :attr:`VerifyReport.checkpoint_seq`, and
  :meth:`AuditLog.open` brings the checkpoint up to date.

Events
======

Each event's ``details`` must have the required keys with the stated types, may have the
optional keys, and must have no others. Names of blocks follow
:func:`blossom_secure.blocks.is_valid_block_name`. "number" means a finite int or float;
"id" is ``[A-Za-z][A-Za-z0-9_.-]{0,63}``; "hex64" is 64 lower-case hex digits; "text" is a
string of 1 to 2000 characters.

===========================  ================================================================
``site_initialised``         ``key_fingerprint`` (str, :func:`crypto.key_fingerprint` of the
                             signing key; checked against it).
``policy_loaded``            ``policy_sha256`` (hex64, equal to the record's
                             ``policy_sha256``), ``shareable`` (list of at most 256 strings
                             of 1 to 64 characters: the policy's shareable block names and
                             patterns). Optional: ``policy_file`` (text).
``round_joined``             (none). Optional: ``model_version`` (id or int >= 0),
                             ``blocks_offered`` (list of distinct block names the site
                             offers to share this round). Needs a ``round_id``.
``round_declined``           ``reason`` (text). Needs a ``round_id``.
``training_finished``        ``steps`` (int >= 0), ``epsilon_round`` (number >= 0: what this
                             round added to the total),
                             ``epsilon_total`` (number >= 0), ``delta`` (number in (0, 1)),
                             ``noise_multiplier`` (number >= 0), ``sample_rate`` (number in
                             (0, 1]). Optional: ``accountant`` (id), ``max_grad_norm``
                             (number > 0), ``blocks`` (list of block names),
                             ``randomness`` (``os-csprng``: the noise was secret, the epsilon
                             is a guarantee; ``seeded-simulation``: the noise follows from a
                             public seed, the epsilon is nominal), ``epsilon_is_nominal``
                             (bool, true exactly for a seeded simulation), ``sampling``
                             (text: ``public`` when the sampling rate and steps were the
                             federation file's, ``training-set size`` when derived from the
                             site's count). Needs a
                             ``round_id``.
``egress``                   ``message_type`` (id), ``blocks`` (list of distinct block names,
                             may be empty), ``shapes`` (object: block -> list of int >= 0,
                             every key in ``blocks``), ``payload_bytes`` (int >= 0: length of
                             the exact payload sent), ``payload_sha256`` (hex64 of those
                             bytes). Optional: ``block_bytes`` (object: block -> int >= 0,
                             keys in ``blocks``, summing to at most ``payload_bytes``),
                             ``recipient`` (id).
``secagg_stage_completed``   ``stage`` (id). Needs a ``round_id``.
``secagg_aborted``           ``stage`` (id), ``reason`` (text). Needs a ``round_id``.
``error``                    ``message`` (text). Optional: ``error_type`` (id).
``ledger_rebuilt``           ``rounds`` (int >= 0: entries in the rebuilt privacy ledger),
                             ``rounds_proven`` (int >= 0: of those, rounds taken from this
                             log: its ``training_finished`` records, and rounds joined and
                             never finished that a later record's total counts),
                             ``rounds_kept`` (int >= 0:
                             reserved rounds kept from the previous ledger that this log does
                             not prove), ``epsilon_total`` (number >= 0: the rebuilt spend),
                             ``delta`` (number in (0, 1)), ``accountant`` (id),
                             ``ledger_sha256`` (hex64 of the exact bytes of the new ledger
                             file), ``previous_ledger`` (id: ``missing``, ``readable`` or
                             ``unreadable``). Optional: ``previous_ledger_sha256`` (hex64 of
                             the replaced file's bytes). Written before the new ledger
                             replaces the old one (``blossom-site ledger rebuild``).
===========================  ================================================================

``egress`` may name a ``head.*`` block: the log records what was sent, truthfully; keeping
heads on the site is the egress guard's job, and a review flags any head that left.

Limitations
===========

* Times are the site's clock, recorded as given; they are not required to increase.
* A line cut short by a crash during the write (no final newline) makes verification fail;
  the operator must inspect and repair it (nothing after it was acted on, because the write
  had not returned). A missing checkpoint beside a non-empty log likewise needs a person.
* Verification reads the whole log (streaming, constant memory); a very long log takes
  correspondingly long to open.
* The single-writer lock uses ``fcntl.flock`` (POSIX); elsewhere there is none.

Example:
    >>> key = crypto.generate_identity_key()                          # doctest: +SKIP
    >>> with AuditLog.open(Path("state/audit.jsonl"), site_id="st-mary",
    ...                    signing_key=key) as log:                    # doctest: +SKIP
    ...     log.append(ROUND_DECLINED, round_id=3,
    ...                details={"reason": "privacy budget exhausted"},
    ...                policy_sha256=policy.sha256)
    >>> verify_log(Path("state/audit.jsonl"),
    ...            public_key=crypto.identity_public_key(key))         # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import numbers
import os
import re
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

from blossom_secure import crypto
from blossom_secure.blocks import is_valid_block_name
from blossom_secure._fs import atomic_write, fsync_dir, remove_stale_temporaries
from blossom_secure.crypto import IdentityKey
from blossom_secure.errors import AuditIntegrityError, AuthenticationError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no advisory lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "AUDIT_FORMAT",
    "CHECKPOINT_SIGNING_CONTEXT",
    "EGRESS",
    "ERROR",
    "EVENTS",
    "EVENT_REQUIRED_DETAILS",
    "GENESIS_SHA256",
    "LEDGER_REBUILT",
    "MAX_RECORD_BYTES",
    "POLICY_LOADED",
    "RECORD_FIELDS",
    "RECORD_SIGNING_CONTEXT",
    "ROUND_DECLINED",
    "ROUND_JOINED",
    "SECAGG_ABORTED",
    "SECAGG_STAGE_COMPLETED",
    "SITE_INITIALISED",
    "TRAINING_FINISHED",
    "AuditLog",
    "Verification",
    "VerifyReport",
    "build_record",
    "canonical_bytes",
    "checkpoint_path",
    "read_records",
    "read_verified_records",
    "verify_log",
    "write_record",
]

logger = logging.getLogger(__name__)

#: Version of the record and checkpoint format.
AUDIT_FORMAT = 1
#: ``prev_sha256`` of the first record, and ``last_record_sha256`` of an empty log's checkpoint.
GENESIS_SHA256 = "0" * 64
#: Longest line (record plus newline) that is written or read.
MAX_RECORD_BYTES = 65536
#: Longest checkpoint file that is read.
MAX_CHECKPOINT_BYTES = 4096
#: Prefixed to a record's canonical bytes (without the signature) before signing.
RECORD_SIGNING_CONTEXT = b"blossom_secure/audit-record/v1\x00"
#: Prefixed to a checkpoint's canonical bytes (without the signature) before signing.
CHECKPOINT_SIGNING_CONTEXT = b"blossom_secure/audit-checkpoint/v1\x00"

#: The fields of a record, in the order they are documented.
RECORD_FIELDS: tuple[str, ...] = (
    "format",
    "seq",
    "time_utc",
    "site_id",
    "round_id",
    "event",
    "details",
    "policy_sha256",
    "prev_sha256",
    "signature",
)
_CHECKPOINT_FIELDS = frozenset({"format", "site_id", "last_seq", "last_record_sha256", "signature"})

SITE_INITIALISED = "site_initialised"
POLICY_LOADED = "policy_loaded"
ROUND_JOINED = "round_joined"
ROUND_DECLINED = "round_declined"
TRAINING_FINISHED = "training_finished"
EGRESS = "egress"
SECAGG_STAGE_COMPLETED = "secagg_stage_completed"
SECAGG_ABORTED = "secagg_aborted"
ERROR = "error"
LEDGER_REBUILT = "ledger_rebuilt"

_MAX_SAFE_INT = 2**53 - 1
_MAX_DEPTH = 32
_MAX_TEXT_CHARS = 2000
_MAX_LIST_ITEMS = 256
_MAX_DIMS = 16
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_RE = re.compile(r"[0-9a-f]{128}")
_SITE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # as in blossom_secure.config
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{4}(:[0-9a-f]{4}){7}")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_TIME_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?Z")


# --------------------------------------------------------------------------------------
# Canonical JSON (RFC 8785 / JCS)
# --------------------------------------------------------------------------------------

_STRING_ESCAPES: dict[int, str] = {c: f"\\u{c:04x}" for c in range(0x20)}
_STRING_ESCAPES.update({0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"})
_STRING_ESCAPES.update({0x22: '\\"', 0x5C: "\\\\"})


def canonical_bytes(obj: Any) -> bytes:
    """The canonical JSON encoding of ``obj`` (RFC 8785 / JCS rules, I-JSON limits).

    See the module documentation for the exact rules.

    Args:
        obj: A JSON value built from ``dict``/``Mapping`` (string keys), ``list``/``tuple``,
            ``str``, ``int``, ``float``, ``bool`` and ``None``.

    Returns:
        The UTF-8 bytes, with no trailing newline.

    Raises:
        TypeError: a value of another type, or a non-string object key.
        ValueError: NaN or an infinity, an integer beyond +/-(2**53 - 1), a lone surrogate
            in a string, or nesting deeper than 32 levels.

    Notes:
        A signature or hash is only meaningful over bytes that every honest writer and
        reader produce identically. Sorting keys, fixing the number format and refusing the
        values JSON readers disagree on (NaN, huge integers, unpaired surrogates) removes
        every degree of freedom, so one record has one encoding.
    """
    parts: list[str] = []
    _encode(obj, parts, 0)
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("string contains a lone surrogate (not valid Unicode)") from None


def _encode(obj: Any, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError(f"JSON nested deeper than {_MAX_DEPTH} levels")
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append('"' + obj.translate(_STRING_ESCAPES) + '"')
    elif isinstance(obj, int):
        if abs(obj) > _MAX_SAFE_INT:
            raise ValueError(f"integer {obj} is outside +/-(2**53 - 1)")
        out.append(str(int(obj)))
    elif isinstance(obj, float):
        out.append(_format_float(float(obj)))
    elif isinstance(obj, Mapping):
        items = []
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"object key {key!r} is not a string")
            items.append((key, value))
        if all(key.isascii() for key, _ in items):
            items.sort(key=lambda kv: kv[0])  # ASCII: code point order is UTF-16 order
        else:
            items.sort(key=lambda kv: kv[0].encode("utf-16-be", "surrogatepass"))
        out.append("{")
        for i, (key, value) in enumerate(items):
            if i:
                out.append(",")
            out.append('"' + key.translate(_STRING_ESCAPES) + '":')
            _encode(value, out, depth + 1)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _encode(value, out, depth + 1)
        out.append("]")
    else:
        raise TypeError(f"{type(obj).__name__} is not a JSON type")


def _format_float(x: float) -> str:
    """ECMAScript ``Number.prototype.toString`` of ``x`` (RFC 8785 section 3.2.2.3)."""
    if not math.isfinite(x):
        raise ValueError(f"{x!r} is not a finite number (JSON has no NaN or infinity)")
    if x == 0.0:
        return "0"  # also -0.0
    if x < 0:
        return "-" + _format_float(-x)
    # repr() gives the shortest digit string that round-trips (and, among those, the one
    # closest to x), which is exactly the digit string ECMAScript requires.
    mantissa, _, exp_text = repr(x).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = int_part + frac_part
    point = len(int_part) + (int(exp_text) if exp_text else 0)  # decimal point after `point` digits
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + digits
    exponent = n - 1
    sign = "+" if exponent >= 0 else "-"
    head = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{head}e{sign}{abs(exponent)}"


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record_signing_bytes(record: Mapping[str, Any]) -> bytes:
    unsigned = {k: v for k, v in record.items() if k != "signature"}
    return RECORD_SIGNING_CONTEXT + canonical_bytes(unsigned)


def _checkpoint_signing_bytes(checkpoint: Mapping[str, Any]) -> bytes:
    unsigned = {k: v for k, v in checkpoint.items() if k != "signature"}
    return CHECKPOINT_SIGNING_CONTEXT + canonical_bytes(unsigned)


# --------------------------------------------------------------------------------------
# Events and their details
# --------------------------------------------------------------------------------------

_Check = Callable[[Any], "str | None"]  # returns what is wrong, or None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if not 1 <= len(value) <= _MAX_TEXT_CHARS:
        return f"must have 1 to {_MAX_TEXT_CHARS} characters"
    return None


def _ident(value: Any) -> str | None:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        return "must be an identifier ([A-Za-z][A-Za-z0-9_.-], at most 64 characters)"
    return None


def _hex64(value: Any) -> str | None:
    if not isinstance(value, str) or not _HEX64_RE.fullmatch(value):
        return "must be 64 lower-case hex digits (a SHA-256)"
    return None


def _nonneg_int(value: Any) -> str | None:
    if type(value) is int and value >= 0:
        return None
    if not _is_int(value) or value < 0:
        return "must be an integer >= 0"
    return None


def _number(*, low: float, low_open: bool = False, high: float | None = None, high_open: bool = False) -> _Check:
    lo = "(" if low_open else "["
    hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
    problem = f"must be a finite number in {lo}{low:g}, {hi}"

    def check(value: Any) -> str | None:
        if not _is_number(value):
            return problem
        if (value <= low) if low_open else (value < low):
            return problem
        if high is not None and ((value >= high) if high_open else (value > high)):
            return problem
        return None

    return check


def _list_of(item: _Check, *, unique: bool = False) -> _Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return "must be a list"
        if len(value) > _MAX_LIST_ITEMS:
            return f"must have at most {_MAX_LIST_ITEMS} items"
        for i, entry in enumerate(value):
            problem = item(entry)
            if problem:
                return f"item {i} {problem}"
        if unique and len(set(value)) != len(value):
            return "must not repeat an item"
        return None

    return check


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


#: Where a round's DP noise came from (see :mod:`blossom_secure.site.dp_random`).
RANDOMNESS_KINDS = ("os-csprng", "seeded-simulation")


def _randomness(value: Any) -> str | None:
    return None if value in RANDOMNESS_KINDS else f"must be one of {', '.join(RANDOMNESS_KINDS)}"


@functools.lru_cache(maxsize=1024)  # a log names a handful of blocks, thousands of times
def _is_block_name_text(value: str) -> bool:
    # isprintable(): the block-name pattern ends in "$", which also accepts a final newline.
    return value.isprintable() and is_valid_block_name(value)


def _block_name(value: Any) -> str | None:
    if not isinstance(value, str) or not _is_block_name_text(value):
        return "must be a block name (encoder.<x>, fusion or head.<x>)"
    return None


def _short_text(value: Any) -> str | None:
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        return "must be a string of 1 to 64 characters"
    return None


def _fingerprint(value: Any) -> str | None:
    if not isinstance(value, str) or not _FINGERPRINT_RE.fullmatch(value):
        return "must be a key fingerprint (eight colon-separated groups of four hex digits)"
    return None


def _model_version(value: Any) -> str | None:
    if _is_int(value):
        return _nonneg_int(value)
    return _ident(value)


def _block_map(item: _Check) -> _Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return "must be an object keyed by block name"
        if len(value) > _MAX_LIST_ITEMS:
            return f"must have at most {_MAX_LIST_ITEMS} entries"
        for block, entry in value.items():
            if _block_name(block):
                return f"key {block!r} is not a block name"
            problem = item(entry)
            if problem:
                return f"entry {block!r} {problem}"
        return None

    return check


def _shape(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) > _MAX_DIMS:
        return f"must be a list of at most {_MAX_DIMS} dimensions"
    if any(_nonneg_int(d) for d in value):
        return "must list integer dimensions >= 0"
    return None


@dataclass(frozen=True)
class _EventSpec:
    required: Mapping[str, _Check]
    optional: Mapping[str, _Check]
    needs_round: bool
    policy_optional: bool
    #: Every check by key, and the required keys (derived: for the common case's one pass).
    checks: Mapping[str, _Check] = field(init=False)
    required_keys: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checks", {**self.required, **self.optional})
        object.__setattr__(self, "required_keys", frozenset(self.required))


_EVENT_SPECS: dict[str, _EventSpec] = {
    SITE_INITIALISED: _EventSpec({"key_fingerprint": _fingerprint}, {}, False, True),
    POLICY_LOADED: _EventSpec(
        {"policy_sha256": _hex64, "shareable": _list_of(_short_text)}, {"policy_file": _text}, False, False
    ),
    ROUND_JOINED: _EventSpec(
        {}, {"model_version": _model_version, "blocks_offered": _list_of(_block_name, unique=True)}, True, False
    ),
    ROUND_DECLINED: _EventSpec({"reason": _text}, {}, True, False),
    TRAINING_FINISHED: _EventSpec(
        {
            "steps": _nonneg_int,
            "epsilon_round": _number(low=0.0),
            "epsilon_total": _number(low=0.0),
            "delta": _number(low=0.0, low_open=True, high=1.0, high_open=True),
            "noise_multiplier": _number(low=0.0),
            "sample_rate": _number(low=0.0, low_open=True, high=1.0),
        },
        {
            "accountant": _ident,
            "max_grad_norm": _number(low=0.0, low_open=True),
            "blocks": _list_of(_block_name, unique=True),
            "randomness": _randomness,
            "epsilon_is_nominal": _bool,
            "sampling": _text,
        },
        True,
        False,
    ),
    EGRESS: _EventSpec(
        {
            "message_type": _ident,
            "blocks": _list_of(_block_name, unique=True),
            "shapes": _block_map(_shape),
            "payload_bytes": _nonneg_int,
            "payload_sha256": _hex64,
        },
        {"block_bytes": _block_map(_nonneg_int), "recipient": _ident},
        False,
        False,
    ),
    SECAGG_STAGE_COMPLETED: _EventSpec({"stage": _ident}, {}, True, False),
    SECAGG_ABORTED: _EventSpec({"stage": _ident, "reason": _text}, {}, True, False),
    ERROR: _EventSpec({"message": _text}, {"error_type": _ident}, False, True),
    LEDGER_REBUILT: _EventSpec(
        {
            "rounds": _nonneg_int,
            "rounds_proven": _nonneg_int,
            "rounds_kept": _nonneg_int,
            "epsilon_total": _number(low=0.0),
            "delta": _number(low=0.0, low_open=True, high=1.0, high_open=True),
            "accountant": _ident,
            "ledger_sha256": _hex64,
            "previous_ledger": _ident,
        },
        {"previous_ledger_sha256": _hex64},
        False,
        False,
    ),
}

#: Every event a record may carry.
EVENTS: tuple[str, ...] = tuple(_EVENT_SPECS)
#: The details keys each event requires (see the module documentation for their types).
EVENT_REQUIRED_DETAILS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {event: tuple(spec.required) for event, spec in _EVENT_SPECS.items()}
)


def _details_problems(
    event: str,
    details: Mapping[str, Any],
    *,
    round_id: int | None,
    policy_sha256: str | None,
    key_fingerprint: str | None,
) -> list[str]:
    """Everything wrong with ``details`` for ``event`` (and the event's needs of the record).

    ``key_fingerprint``, when given, is the fingerprint of the key that signs the record; a
    ``site_initialised`` record must name it.
    """
    spec = _EVENT_SPECS.get(event)
    if spec is None:
        return [f"unknown event {event!r} (known: {', '.join(EVENTS)})"]
    checks = spec.checks
    problems: list[str] = []
    if not (  # the common case, shown without building a message
        (round_id is not None or not spec.needs_round)
        and (policy_sha256 is not None or spec.policy_optional)
        and spec.required_keys <= details.keys()
        and all(key in checks and checks[key](value) is None for key, value in details.items())
    ):
        if spec.needs_round and round_id is None:
            problems.append(f"event {event!r} needs a round_id")
        if policy_sha256 is None and not spec.policy_optional:
            problems.append(f"event {event!r} needs the policy_sha256 of the policy in force")
        missing = sorted(set(spec.required) - set(details))
        unknown = sorted(set(details) - set(spec.required) - set(spec.optional))
        if missing:
            problems.append(f"details of {event!r} miss key(s): {', '.join(missing)}")
        if unknown:
            problems.append(f"details of {event!r} have unknown key(s): {', '.join(map(repr, unknown))}")
        for key, check in (*spec.required.items(), *spec.optional.items()):
            if key in details:
                problem = check(details[key])
                if problem:
                    problems.append(f"details[{key!r}] {problem}")
        if problems:
            return problems
    # Cross-field rules, once every field has the right type.
    if event == SITE_INITIALISED and key_fingerprint is not None:
        if details["key_fingerprint"] != key_fingerprint:
            problems.append("details['key_fingerprint'] is not the fingerprint of the signing key")
    elif event == POLICY_LOADED and details["policy_sha256"] != policy_sha256:
        problems.append("details['policy_sha256'] differs from the record's policy_sha256")
    elif event == EGRESS:
        blocks = set(details["blocks"])
        for key in ("shapes", "block_bytes"):
            stray = sorted(set(details.get(key, {})) - blocks)
            if stray:
                problems.append(f"details[{key!r}] names block(s) not in 'blocks': {', '.join(stray)}")
        if sum(details.get("block_bytes", {}).values()) > details["payload_bytes"]:
            problems.append("details['block_bytes'] sum to more than payload_bytes")
    return problems


def _plain_int(value: Any) -> Any:
    """``numpy.int64(3)`` -> ``3``; anything else (``None`` and wrong types included) as is."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _to_json_value(value: Any, depth: int = 0) -> Any:
    """A deep copy of ``value`` made of plain JSON types (Mapping -> dict, tuple -> list,
    integral numbers -> int, other real numbers -> float)."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"details nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, entry in value.items():
            if not isinstance(key, str):
                raise TypeError(f"details key {key!r} is not a string")
            out[key] = _to_json_value(entry, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json_value(entry, depth + 1) for entry in value]
    raise TypeError(f"{type(value).__name__} cannot be recorded in an audit record")


# --------------------------------------------------------------------------------------
# Records: structure, build, write
# --------------------------------------------------------------------------------------


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    match = _TIME_RE.fullmatch(value)
    if not match:
        return None
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "0").ljust(6, "0")),
            tzinfo=UTC,
        )
    except ValueError:
        return None


def _envelope_problems(record: Mapping[str, Any], *, signed: bool) -> list[str]:
    """What is wrong with the fields of ``record`` (not its details or signature)."""
    expected = set(RECORD_FIELDS) if signed else set(RECORD_FIELDS) - {"signature"}
    missing = [f for f in RECORD_FIELDS if f in expected and f not in record]
    unknown = sorted(set(record) - expected)
    problems = []
    if missing:
        problems.append(f"missing field(s): {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown field(s): {', '.join(map(repr, unknown))}")
    if problems:
        return problems
    if not _is_int(record["format"]) or record["format"] != AUDIT_FORMAT:
        problems.append(f"field 'format' must be {AUDIT_FORMAT}")
    if not _is_int(record["seq"]) or not 0 <= record["seq"] <= _MAX_SAFE_INT:
        problems.append("field 'seq' must be an integer >= 0")
    if _parse_time(record["time_utc"]) is None:
        problems.append("field 'time_utc' must be an ISO 8601 UTC time YYYY-MM-DDTHH:MM:SS[.ffffff]Z")
    if not isinstance(record["site_id"], str) or not _SITE_ID_RE.fullmatch(record["site_id"]):
        problems.append("field 'site_id' must be a site id ([a-z0-9][a-z0-9_-], at most 63 characters)")
    round_id = record["round_id"]
    if round_id is not None and (not _is_int(round_id) or not 0 <= round_id <= _MAX_SAFE_INT):
        problems.append("field 'round_id' must be an integer >= 0 or null")
    if not isinstance(record["event"], str):
        problems.append("field 'event' must be a string")
    if not isinstance(record["details"], dict):
        problems.append("field 'details' must be a JSON object")
    if record["policy_sha256"] is not None and _hex64(record["policy_sha256"]):
        problems.append("field 'policy_sha256' must be 64 lower-case hex digits or null")
    if _hex64(record["prev_sha256"]):
        problems.append("field 'prev_sha256' must be 64 lower-case hex digits")
    if signed and (not isinstance(record["signature"], str) or not _SIGNATURE_RE.fullmatch(record["signature"])):
        problems.append("field 'signature' must be 128 lower-case hex digits")
    return problems


def _record_problems(record: Any, *, signed: bool = True, key_fingerprint: str | None = None) -> list[str]:
    """Everything wrong with the structure and details of ``record`` (signature not checked)."""
    if not isinstance(record, Mapping):
        return ["a record must be a JSON object"]
    problems = _envelope_problems(record, signed=signed)
    if problems:
        return problems
    return _details_problems(
        record["event"],
        record["details"],
        round_id=record["round_id"],
        policy_sha256=record["policy_sha256"],
        key_fingerprint=key_fingerprint,
    )


def build_record(
    *,
    seq: int,
    time_utc: str,
    site_id: str,
    round_id: int | None,
    event: str,
    details: Mapping[str, Any],
    policy_sha256: str | None,
    prev_hash: str,
    signing_key: IdentityKey,
) -> dict[str, Any]:
    """Build and sign one audit record. Pure: no I/O, no clock.

    Args:
        seq: The record's sequence number (0 for the first record of a log).
        time_utc: When the event happens, ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``.
        site_id: The site's id.
        round_id: The round the event belongs to, or ``None``.
        event: One of :data:`EVENTS`.
        details: The event's details (see the module documentation); copied, never kept.
            Integral numbers (``numpy.int64`` included) become ``int``, other real numbers
            ``float``, tuples lists (``seq`` and ``round_id`` are normalised the same way).
        policy_sha256: Hex SHA-256 of the policy in force; ``None`` only for
            ``site_initialised`` and ``error``.
        prev_hash: SHA-256 hex of the previous line, or :data:`GENESIS_SHA256` for ``seq`` 0.
        signing_key: The site's Ed25519 identity key.

    Returns:
        The signed record, a new ``dict`` of plain JSON values whose canonical bytes are the
        line to write.

    Raises:
        TypeError: ``details`` is not a mapping or holds a value that is not JSON, or
            ``signing_key`` is not an Ed25519 private key.
        ValueError: any field or detail is missing, unknown, of the wrong type or out of
            range (every problem is listed in the message), or the line would be longer
            than :data:`MAX_RECORD_BYTES`.

    Notes:
        Building is separate from writing so that the record that is signed is exactly the
        record that is written, and so that the chain and signature rules can be tested
        with fixed times and keys. Details are validated here, before anything is signed,
        because a record that :func:`verify_log` would later reject must never reach the
        log; a site refusing to record an action also refuses to take it (the caller
        writes the record first).
    """
    if not isinstance(details, Mapping):
        raise TypeError("details must be a mapping")
    try:
        fingerprint = crypto.key_fingerprint(crypto.identity_public_key(signing_key))
    except (AttributeError, TypeError):
        raise TypeError("signing_key must be an Ed25519 private key") from None
    unsigned = {
        "format": AUDIT_FORMAT,
        "seq": _plain_int(seq),
        "time_utc": time_utc,
        "site_id": site_id,
        "round_id": _plain_int(round_id),
        "event": event,
        "details": _to_json_value(details),
        "policy_sha256": policy_sha256,
        "prev_sha256": prev_hash,
    }
    problems = _record_problems(unsigned, signed=False, key_fingerprint=fingerprint)
    if seq == 0 and not problems and prev_hash != GENESIS_SHA256:
        problems.append("the record with seq 0 must have prev_hash equal to the genesis value (GENESIS_SHA256)")
    if problems:
        raise ValueError("invalid audit record: " + "; ".join(problems))
    signature = crypto.sign(signing_key, RECORD_SIGNING_CONTEXT + canonical_bytes(unsigned))
    record = {**unsigned, "signature": signature.hex()}
    if len(canonical_bytes(record)) + 1 > MAX_RECORD_BYTES:
        raise ValueError(f"audit record would be longer than {MAX_RECORD_BYTES} bytes")
    return record


def write_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record to the log file and make it durable.

    The line is ``canonical_bytes(record) + b"\\n"``, written with ``O_APPEND`` and then
    fsync'd. The file must exist (:meth:`AuditLog.open` creates it).

    Args:
        path: The log file.
        record: A signed record from :func:`build_record`.

    Raises:
        ValueError: ``record`` is not a well-formed signed record, or is too long.
        OSError: the file is missing, is a symbolic link, or cannot be written or synced.
            The line may then be partly written; do not take the recorded action.

    Notes:
        Returning means the record is on stable storage (as far as the operating system's
        fsync promises), so the caller may now take the action it records: an egress
        record is written, then the message is sent, and a crash can lose an action but
        never the record of one. The signature is not checked here (the writer holds no
        public key); :func:`verify_log` checks it.
    """
    problems = _record_problems(record)
    if problems:
        raise ValueError("invalid audit record: " + "; ".join(problems))
    line = canonical_bytes(record) + b"\n"
    if len(line) > MAX_RECORD_BYTES:
        raise ValueError(f"audit record is longer than {MAX_RECORD_BYTES} bytes")
    fd = os.open(Path(path), os.O_WRONLY | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC)
    try:
        view = memoryview(line)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _json_int(text: str) -> int | float:
    """Integers beyond +/-(2**53 - 1) are read as floats, as every I-JSON reader must
    (RFC 8785 writes an integral double such as ``1e20`` without an exponent)."""
    value = int(text)
    if abs(value) <= _MAX_SAFE_INT:
        return value
    return _finite_float(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _loads(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, no out-of-range floats."""
    return json.loads(
        raw.decode("utf-8"),
        object_pairs_hook=_unique_keys,
        parse_constant=_reject_constant,
        parse_float=_finite_float,
        parse_int=_json_int,
    )


def _iter_lines(path: Path, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number, line without its newline)``, enforcing the size limit and a
    newline at the end of every line; from byte ``start`` (a line's start; numbers count
    from there) up to byte ``end`` (a line's start; ``None``: the end of the file)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        line_no = 0
        while end is None or position < end:
            raw = handle.readline(MAX_RECORD_BYTES)
            if not raw:
                return
            position += len(raw)
            line_no += 1
            if not raw.endswith(b"\n"):
                if len(raw) >= MAX_RECORD_BYTES:
                    raise AuditIntegrityError(
                        line=line_no, seq=None, reason=f"line is longer than {MAX_RECORD_BYTES} bytes"
                    )
                raise AuditIntegrityError(
                    line=line_no,
                    seq=None,
                    reason="last line is incomplete (no newline at the end): interrupted write or truncation",
                )
            yield line_no, raw[:-1]


def _parse_line(line_no: int, raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise AuditIntegrityError(line=line_no, seq=None, reason="empty line")
    try:
        value = _loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
        raise AuditIntegrityError(line=line_no, seq=None, reason=f"corrupt line: {reason}") from None
    if not isinstance(value, dict):
        raise AuditIntegrityError(line=line_no, seq=None, reason="corrupt line: not a JSON object")
    return value


def read_records(path: Path) -> list[dict[str, Any]]:
    """Parse the log without checking signatures, chain or checkpoint.

    Args:
        path: The log file.

    Returns:
        One ``dict`` per line, in file order (line ``i + 1`` is item ``i``).

    Raises:
        AuditIntegrityError: a line is longer than :data:`MAX_RECORD_BYTES`, empty, not
            UTF-8, not a JSON object (or has duplicate keys, NaN or infinities), or the last
            line has no newline. Names the line.
        FileNotFoundError: ``path`` does not exist.

    Notes:
        Nothing returned here is authenticated. Use :func:`read_verified_records` (or
        :func:`verify_log` first) before trusting the content.
    """
    return [_parse_line(line_no, raw) for line_no, raw in _iter_lines(Path(path))]


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """The result of a successful verification.

    Attributes:
        records: Number of records in the log.
        last_seq: Sequence number of the last record (``None`` for an empty log).
        last_hash: SHA-256 hex of the last line (:data:`GENESIS_SHA256` for an empty log).
        first_time: ``time_utc`` of the first record, or ``None``.
        last_time: ``time_utc`` of the last record, or ``None``.
        site_id: The site id on every record, or ``None`` for an empty log.
        checkpoint_seq: ``last_seq`` in the signed checkpoint: equal to ``last_seq``, or one
            less when an append was interrupted between the record and the checkpoint.
    """

    records: int
    last_seq: int | None
    last_hash: str
    first_time: str | None
    last_time: str | None
    site_id: str | None
    checkpoint_seq: int | None


@dataclass(frozen=True)
class Verification:
    """What was verified before the review was built (shown at the top of the HTML page).

    Attributes:
        key_fingerprint: Fingerprint of the public key the log was verified with.
        key_source: Where that key came from (the site's key file, a public-key file,
            a roster entry), in words.
        verified_at: When the verification ran (UTC, ISO 8601).
        records: Records verified.
        last_seq: The last record's sequence number, or ``None`` for an empty log.
        last_hash: SHA-256 of the last line (the chain head).
        pinned: Whether the key was compared with a fingerprint given out of band
            (``--fingerprint``).
        every_signature: Whether each record's own signature was checked too (otherwise
            the checkpoint's signature binds the records it covers through the chain).
        key_from: Where the key came from: ``public-key`` (given by the verifier),
            ``roster`` (the federation roster's entry for the site) or ``key-file`` (the
            site folder's own key file).
    """

    key_fingerprint: str
    key_source: str
    verified_at: str
    records: int
    last_seq: int | None
    last_hash: str
    pinned: bool = False
    every_signature: bool = False
    key_from: str = "public-key"


def checkpoint_path(log_path: Path) -> Path:
    """The signed checkpoint beside ``log_path``: ``audit.jsonl`` -> ``audit.head.json``
    (the log's name without its last suffix, then ``.head.json``).

    Raises:
        ValueError: ``log_path`` itself ends in ``.head.json`` (it could be another log's
            checkpoint).
    """
    log_path = Path(log_path)
    if log_path.name.endswith(".head.json"):
        raise ValueError(f"{log_path.name!r} cannot be an audit log name (it is a checkpoint name)")
    return log_path.with_name(f"{log_path.stem}.head.json")


def _check_public_key(public_key: Any) -> bytes:
    if not isinstance(public_key, (bytes, bytearray)):
        raise TypeError("public_key must be the raw 32-byte Ed25519 public key (bytes)")
    if len(public_key) != crypto.ED25519_PUBLIC_KEY_BYTES:
        raise ValueError(f"public_key must be {crypto.ED25519_PUBLIC_KEY_BYTES} bytes")
    return bytes(public_key)


def _plain_json_floats(value: Any) -> dict[float, int] | None:
    """What keeps ``json.dumps(value, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` from being exactly :func:`canonical_bytes` of ``value``: ``None``
    where that is not cheap to show (an integer beyond +/-(2**53 - 1), a non-finite float,
    an object key outside the Basic Multilingual Plane, where code point order and UTF-16
    order differ, nesting beyond :data:`_MAX_DEPTH`), otherwise each float whose ``repr`` is
    not its ECMAScript form (``1e-05`` for ``0.00001``) with the number of times it occurs.
    Strings need no check: both escape exactly ``"``, ``\\`` and the characters below
    U+0020, in the same spelling, and a lone surrogate fails the UTF-8 encoding that follows."""
    respelled: dict[float, int] = {}
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return None
        if type(item) is dict:
            children: Any = item.values()
            for key in item:
                if not key.isascii() and max(key) > "\uffff":
                    return None
        else:  # only objects and arrays are stacked
            children = item
        for child in children:
            kind = type(child)
            if kind is str or kind is bool or child is None:
                continue
            if kind is int:
                if -_MAX_SAFE_INT <= child <= _MAX_SAFE_INT:
                    continue
                return None
            if kind is float:
                if not math.isfinite(child):
                    return None
                if repr(child) != _format_float(child):
                    respelled[child] = respelled.get(child, 0) + 1
                continue
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
                continue
            return None
    return respelled


#: Digits and the characters a number token follows, all as ``0``; anything else as a space.
_NUMBER_RUNS = bytes(0x30 if chr(c) in "0123456789:,[-" else 0x20 for c in range(256))
#: 17 of those in a row: where an integer beyond +/-(2**53 - 1) may start (or a long run of
#: digits in a string, which the slower walk clears).
_LONG_RUN = b"0" * 17


class _FloatTokenReader(threading.local):
    """A JSON reader that notes the spelling of every number with a fraction or exponent
    it reads (one per thread)."""

    def __init__(self) -> None:
        self.floats: list[str] = []

        def number(token: str) -> float:
            self.floats.append(token)
            return float(token)

        self.decoder = json.JSONDecoder(parse_float=number)


_READER = _FloatTokenReader()
#: Python's re-encoding that is canonical but for some floats (see _fast_canonical_record).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _fast_canonical_record(raw: bytes) -> dict[str, Any] | None:
    """The record on a line that is already canonical, parsed by the C JSON reader; or
    ``None`` whenever that cannot be shown cheaply (then the strict reader and
    :func:`canonical_bytes` decide, and name the problem).

    Notes:
        A line is accepted here only if re-encoding the parsed value gives the line's exact
        bytes and that re-encoding is shown to be the canonical one: by
        :func:`_plain_json_floats`, or, for an ASCII line with no long digit run and at most :data:`_MAX_DEPTH` brackets in all
        (see :data:`_LONG_RUN`; so none of what that walk looks for), by checking each number with a fraction or
        exponent as the reader meets it. So duplicate keys (the re-encoding loses one), other
        spellings, NaN, huge numbers and non-canonical floats all fall through to the strict
        path.

        A float whose Python spelling differs from its ECMAScript one (``1e-05``,
        ``0.00001``) is respelled in the re-encoding: every number token of the re-encoding
        sits between one of ``:[,`` and one of ``,]}``, so the spellings found in that
        position are the number tokens, unless a string holds the same text between the same
        characters. The respelling is used only where the count found equals the number of
        times the float occurs in the value, so it never touches a string.
    """
    try:
        text = raw.decode("utf-8")
    except ValueError:
        return None
    if (not raw.isascii() or _LONG_RUN in raw.translate(_NUMBER_RUNS)
            or raw.count(b"{") + raw.count(b"[") > _MAX_DEPTH):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return None
        respelled = _plain_json_floats(value) if type(value) is dict else None
    else:
        reader = _READER
        reader.floats.clear()
        try:
            value = reader.decoder.decode(text)
        except (ValueError, RecursionError):
            return None
        respelled = {}
        for token in reader.floats:
            x = float(token)
            if not math.isfinite(x) or _format_float(x) != token:
                return None  # a float not spelt canonically in the line
            if repr(x) != token:
                respelled[x] = respelled.get(x, 0) + 1
    if respelled is None or type(value) is not dict:
        return None
    try:
        again = _ENCODER.encode(value).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return None
    for x, count in respelled.items():
        token_re = re.compile(rb"(?<=[:\[,])" + re.escape(repr(x).encode("ascii")) + rb"(?=[,\]}])")
        again, found = token_re.subn(_format_float(x).encode("ascii"), again)
        if found != count:
            return None
    return value if again == raw else None


#: The members after ``details`` of a canonical record, in their canonical (sorted) order,
#: with every rule :func:`_envelope_problems` checks but the calendar (group ``date``).
_CANONICAL_ENVELOPE = re.compile(
    rb',"event":"[^"\\]*","format":' + str(AUDIT_FORMAT).encode("ascii")
    + rb',"policy_sha256":(?:null|"[0-9a-f]{64}"),"prev_sha256":"[0-9a-f]{64}"'
    rb',"round_id":(?:null|0|[1-9][0-9]{0,15}),"seq":(?P<seq>0|[1-9][0-9]{0,15}),"signature":"[0-9a-f]{128}"'
    rb',"site_id":"[a-z0-9][a-z0-9_-]{0,62}"'
    rb',"time_utc":"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?Z"\}'
)


@functools.lru_cache(maxsize=4096)
def _is_date(text: bytes) -> bool:
    try:
        date.fromisoformat(text.decode("ascii"))
    except ValueError:
        return False
    return True


def _canonical_envelope_ok(raw: bytes, record: Mapping[str, Any]) -> bool:
    """Whether the envelope of ``record``, parsed from the canonical line ``raw``, passes
    every check of :func:`_envelope_problems` (then there is nothing to report), shown by
    one match on the line; ``False`` means only "not shown here".

    Notes:
        In a canonical line a ``"`` inside a string is always escaped, so the last
        ``,"event":"`` of the line starts the member that follows ``details`` (no later
        member can hold it), and as many members as :data:`RECORD_FIELDS`, starting with
        ``details`` and ending with the nine the match names, are exactly the record fields.
    """
    if len(record) != len(RECORD_FIELDS) or not raw.startswith(b'{"details":{'):
        return False
    match = _CANONICAL_ENVELOPE.fullmatch(raw, raw.rfind(b',"event":"'))
    return (match is not None and record["seq"] <= _MAX_SAFE_INT
            and (record["round_id"] is None or record["round_id"] <= _MAX_SAFE_INT) and _is_date(match["date"]))


#: A record's own signature sits between ``seq`` and ``site_id`` in its canonical bytes.
_SIGNATURE_MEMBER = re.compile(rb',"signature":"[0-9a-f]{128}"(?=,"site_id":)')


def _signing_bytes_of_line(raw: bytes, record: Mapping[str, Any]) -> bytes:
    """:func:`_record_signing_bytes` of a canonical line's record, cut from the line itself
    (a canonical object without one member is the same bytes without that member)."""
    members = _SIGNATURE_MEMBER.findall(raw)
    if len(members) != 1:
        return _record_signing_bytes(record)
    return RECORD_SIGNING_CONTEXT + raw.replace(members[0], b"", 1)


class _Chain:
    """Verifies records one line at a time: structure, canonical form, sequence, previous
    hash, site id, details; and signatures, every record's (``every_signature``) or, by
    default, the records the signed checkpoint does not cover (see :func:`verify_log`)."""

    def __init__(self, public_key: bytes, *, collect: bool, keep_events: frozenset[str] | None = None,
                 every_signature: bool = False) -> None:
        self.public_key = public_key
        self.fingerprint = crypto.key_fingerprint(public_key)
        self.records: list[dict[str, Any]] | None = [] if collect else None
        self.keep_events = keep_events
        self.every_signature = every_signature
        # the last two records whose own signature was not checked: (line, seq, raw, record)
        self.unchecked_tail: tuple[Any, ...] = (None, None)
        self.count = 0
        self.last_seq: int | None = None
        self.last_hash = GENESIS_SHA256
        self.last_prev_hash = GENESIS_SHA256
        self.site_id: str | None = None
        self.first_time: str | None = None
        self.last_time: str | None = None

    def feed(self, line_no: int, raw: bytes) -> None:
        record = _fast_canonical_record(raw)
        canonical_shown = record is not None
        if record is None:
            record = _parse_line(line_no, raw)
        seq = record.get("seq") if _is_int(record.get("seq")) else None
        if not (canonical_shown and _canonical_envelope_ok(raw, record)):
            problems = _envelope_problems(record, signed=True)
            if problems:
                raise AuditIntegrityError(line=line_no, seq=seq, reason="; ".join(problems))
        if not canonical_shown:
            try:
                canonical = canonical_bytes(record)
            except ValueError as exc:
                raise AuditIntegrityError(line=line_no, seq=seq, reason=f"cannot be canonicalised: {exc}") from None
            if canonical != raw:
                raise AuditIntegrityError(line=line_no, seq=seq,
                                          reason="record is not in canonical form (its bytes were changed)")
        if self.every_signature:
            self.check_signature(line_no, seq, raw, record)
        else:
            self.unchecked_tail = (self.unchecked_tail[-1], (line_no, seq, raw, record))
        reason = None
        if self.last_seq is None:
            if seq != 0:
                reason = f"first record has sequence number {seq}, expected 0 (records missing from the start)"
            elif record["prev_sha256"] != GENESIS_SHA256:
                reason = "previous-hash of the first record is not the genesis value"
        elif seq > self.last_seq + 1:
            reason = f"sequence number {seq} follows {self.last_seq} (record missing or out of order)"
        elif seq <= self.last_seq:
            reason = f"sequence number {seq} follows {self.last_seq} (record out of order or repeated)"
        elif record["prev_sha256"] != self.last_hash:
            reason = f"previous-hash does not match line {line_no - 1}"
        if reason is None and self.site_id is not None and record["site_id"] != self.site_id:
            reason = f"site id {record['site_id']!r} differs from {self.site_id!r} on line 1"
        if reason is not None:
            raise AuditIntegrityError(line=line_no, seq=seq, reason=reason)
        problems = _details_problems(
            record["event"],
            record["details"],
            round_id=record["round_id"],
            policy_sha256=record["policy_sha256"],
            key_fingerprint=self.fingerprint,
        )
        if problems:
            raise AuditIntegrityError(line=line_no, seq=seq, reason="; ".join(problems))
        self.count += 1
        self.last_seq = seq
        self.last_prev_hash = record["prev_sha256"]
        self.last_hash = hashlib.sha256(raw).hexdigest()
        self.site_id = record["site_id"]
        self.last_time = record["time_utc"]
        if self.first_time is None:
            self.first_time = self.last_time
        if self.records is not None and (self.keep_events is None or record["event"] in self.keep_events):
            self.records.append(record)

    def check_signature(self, line_no: int, seq: int | None, raw: bytes, record: Mapping[str, Any]) -> None:
        """Verify one record's own signature.

        Raises:
            AuditIntegrityError: it does not verify.
        """
        try:
            crypto.verify_signature(self.public_key, _signing_bytes_of_line(raw, record),
                                    bytes.fromhex(record["signature"]))
        except AuthenticationError:
            raise AuditIntegrityError(line=line_no, seq=seq, reason="signature does not verify (record changed or "
                                                                    "forged, or signed with another key)") from None

    def finish(self, head_path: Path) -> VerifyReport:
        """Compare the verified log with its signed checkpoint; check the own signature of
        every record the checkpoint does not cover (an append interrupted before its
        checkpoint) unless every signature was checked already."""
        tail_line = max(self.count, 1)
        name = head_path.name

        def fail(reason: str, *, line: int = tail_line, seq: int | None = self.last_seq) -> AuditIntegrityError:
            return AuditIntegrityError(line=line, seq=seq, reason=reason)

        try:
            with open(head_path, "rb") as handle:
                raw = handle.read(MAX_CHECKPOINT_BYTES + 1)
        except FileNotFoundError:
            if self.count == 0:
                return self._report(None)
            raise fail(f"signed checkpoint {name} is missing, so the end of the log cannot be checked") from None
        if len(raw) > MAX_CHECKPOINT_BYTES or not raw.endswith(b"\n"):
            raise fail(f"checkpoint {name} is corrupt (too long or no final newline)")
        try:
            head = _loads(raw[:-1])
        except (ValueError, RecursionError):
            raise fail(f"checkpoint {name} is corrupt (not valid JSON)") from None
        if not isinstance(head, dict) or set(head) != _CHECKPOINT_FIELDS:
            raise fail(f"checkpoint {name} is corrupt (wrong fields)")
        last_seq = head["last_seq"]
        if (
            head["format"] != AUDIT_FORMAT
            or not _is_int(head["format"])
            or (last_seq is not None and (not _is_int(last_seq) or not 0 <= last_seq <= _MAX_SAFE_INT))
            or _hex64(head["last_record_sha256"])
            or not isinstance(head["signature"], str)
            or not _SIGNATURE_RE.fullmatch(head["signature"])
            or not isinstance(head["site_id"], str)
        ):
            raise fail(f"checkpoint {name} is corrupt (malformed field)")
        if canonical_bytes(head) != raw[:-1]:
            raise fail(f"checkpoint {name} is not in canonical form (its bytes were changed)")
        try:
            crypto.verify_signature(self.public_key, _checkpoint_signing_bytes(head), bytes.fromhex(head["signature"]))
        except AuthenticationError:
            raise fail(f"checkpoint {name}: signature does not verify (changed, forged, or another key)") from None
        if self.site_id is not None and head["site_id"] != self.site_id:
            raise fail(f"checkpoint {name} is for site {head['site_id']!r}, the log for {self.site_id!r}")
        log_end = -1 if self.last_seq is None else self.last_seq
        head_end = -1 if last_seq is None else last_seq
        if head_end > log_end:
            where = "log is empty" if self.last_seq is None else f"log ends at seq {self.last_seq}"
            raise fail(
                f"{where} but the signed checkpoint records seq {last_seq} (truncated)",
                line=self.count + 1,
                seq=log_end + 1,
            )
        if head_end == log_end:
            if head["last_record_sha256"] != self.last_hash:
                raise fail("hash of the last record does not match the signed checkpoint (tail replaced)")
        elif head_end == log_end - 1:
            # An append interrupted between writing the record and the checkpoint.
            if head["last_record_sha256"] != self.last_prev_hash:
                raise fail(
                    "hash of the record before the last does not match the signed checkpoint (tail replaced)",
                    line=self.count - 1 if self.count > 1 else 1,
                    seq=last_seq,
                )
            if not self.every_signature:  # the last record is not covered by the checkpoint
                self.check_signature(*self.unchecked_tail[-1])
        else:
            raise fail(
                f"the signed checkpoint records seq {last_seq} but the log continues to seq {self.last_seq} "
                "(checkpoint rolled back)",
                line=head_end + 3,
                seq=head_end + 2,
            )
        return self._report(last_seq)

    def _report(self, checkpoint_seq: int | None) -> VerifyReport:
        return VerifyReport(
            records=self.count,
            last_seq=self.last_seq,
            last_hash=self.last_hash,
            first_time=self.first_time,
            last_time=self.last_time,
            site_id=self.site_id,
            checkpoint_seq=checkpoint_seq,
        )


def _verify(
    path: Path, public_key: bytes, *, collect: bool, keep_events: frozenset[str] | None = None,
    every_signature: bool = False, workers: int = 1,
) -> tuple[VerifyReport, list[dict[str, Any]]]:
    path = Path(path)
    head_path = checkpoint_path(path)
    public_key = _check_public_key(public_key)
    if not path.exists():
        if head_path.exists():
            raise AuditIntegrityError(
                line=1, seq=0, reason=f"log file is missing but its signed checkpoint {head_path.name} exists (deleted)"
            )
        raise FileNotFoundError(f"no audit log at {path}")
    try:
        chain = None
        if workers > 1 and not collect and not every_signature:
            chain = _feed_in_parallel(path, public_key, workers)
        if chain is None:
            chain = _Chain(public_key, collect=collect, keep_events=keep_events, every_signature=every_signature)
            for line_no, raw in _iter_lines(path):
                chain.feed(line_no, raw)
        report = chain.finish(head_path)
    except AuditIntegrityError:
        if every_signature:
            raise
        # Something is wrong: go through again checking every record's own signature too,
        # so that the error names the first bad record exactly as a full check would.
        return _verify(path, public_key, collect=collect, keep_events=keep_events, every_signature=True)
    return report, chain.records or []


#: A log shorter than this is verified in one process (forking would cost more than it saves).
PARALLEL_MIN_BYTES = 1 << 20


class _ChainBroken(Exception):
    """A part verified in parallel did not check out (the caller then verifies in one
    process, which names the first problem exactly)."""


def _split_points(path: Path, parts: int) -> list[tuple[int, bytes]]:
    """Up to ``parts - 1`` places to split the log at: ``(offset, line)`` where ``line`` is
    the whole line that ends at ``offset`` (the last line of the part before), so the part
    that starts there knows the hash and seq it continues from."""
    size = path.stat().st_size
    points: list[tuple[int, bytes]] = []
    with open(path, "rb") as handle:
        for k in range(1, parts):
            handle.seek(max(size * k // parts, points[-1][0] if points else 0))
            handle.readline(MAX_RECORD_BYTES)  # the rest of the line the probe fell in
            line = handle.readline(MAX_RECORD_BYTES)
            if not line.endswith(b"\n"):
                break
            points.append((handle.tell(), line[:-1]))
    return points


def _line_position(line: bytes) -> tuple[int, str]:
    """The seq and hash of a canonical log line (where a part of the log that follows it
    continues from).

    Raises:
        _ChainBroken: not a canonical record line.
    """
    match = _CANONICAL_ENVELOPE.fullmatch(line, max(line.rfind(b',"event":"'), 0))
    if match is None:
        raise _ChainBroken
    return int(match["seq"]), hashlib.sha256(line).hexdigest()


def _feed_part(chain: _Chain, path: Path, start: int, end: int | None, after: tuple[int, str] | None) -> None:
    """Feed ``chain`` the lines from byte ``start`` to ``end``, continuing from the seq
    and hash ``after`` (``None``: the log's first line)."""
    if after is not None:
        chain.last_seq, chain.last_hash = after
    for line_no, raw in _iter_lines(path, start, end):
        chain.feed(line_no, raw)


def _part_summary(chain: _Chain) -> dict[str, Any]:
    return {"count": chain.count, "last_seq": chain.last_seq, "last_hash": chain.last_hash,
            "site_id": chain.site_id, "first_time": chain.first_time}


def _feed_in_parallel(path: Path, public_key: bytes, workers: int) -> _Chain | None:
    """The chain of the whole log, its parts checked in ``workers`` processes at once; or
    ``None`` where that is not possible or not worth it (small log, no ``os.fork``, threads
    running) or a part did not check out: then the caller checks the log in one process.

    Notes:
        Each part is checked exactly as in one process, starting from the hash and seq of
        the line before it; afterwards the seq each part started from must be the seq its
        predecessor ended at and every part must name the same site, so the parts verify
        together exactly when the whole log does. A forked child sends back only its
        summary (JSON, through a pipe) and exits without running any of the parent's
        clean-up.
    """
    if (not hasattr(os, "fork") or threading.active_count() > 1
            or path.stat().st_size < PARALLEL_MIN_BYTES):
        return None
    try:
        points = [(offset, _line_position(line)) for offset, line in _split_points(path, workers)]
    except _ChainBroken:
        return None
    if not points:
        return None
    starts: list[tuple[int, tuple[int, str] | None]] = [(0, None), *points]
    children: list[tuple[int, int]] = []
    try:
        for index, (start, previous) in enumerate(starts[:-1]):
            end = starts[index + 1][0]
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: check one part, report, leave
                status = 1
                try:
                    os.close(read_end)
                    chain = _Chain(public_key, collect=False)
                    _feed_part(chain, path, start, end, previous)
                    with os.fdopen(write_end, "wb") as out:
                        out.write(json.dumps(_part_summary(chain)).encode("utf-8"))
                    status = 0
                except BaseException:  # noqa: BLE001 - any failure: the parent checks in one process
                    pass
                finally:
                    os._exit(status)
            os.close(write_end)
            children.append((pid, read_end))
        last = _Chain(public_key, collect=False)
        _feed_part(last, path, starts[-1][0], None, starts[-1][1])
        summaries = []
        for pid, read_end in children:
            with os.fdopen(read_end, "rb") as pipe:
                raw = pipe.read()
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise _ChainBroken
            summaries.append(json.loads(raw))
        children = []
    except (_ChainBroken, AuditIntegrityError, ValueError, OSError):
        return None
    finally:
        for pid, read_end in children:
            with suppress(OSError):
                os.close(read_end)
            with suppress(OSError):
                os.waitpid(pid, 0)
    parts = [*summaries, _part_summary(last)]
    for before, (_, after) in zip(parts, starts[1:]):  # each part ends where the next one continues from
        if (before["last_seq"], before["last_hash"]) != after:
            return None
    if any(part["site_id"] != parts[0]["site_id"] or part["count"] == 0 for part in parts):
        return None
    last.count = sum(part["count"] for part in parts)
    last.first_time = parts[0]["first_time"]
    return last


def verify_log(path: Path, *, public_key: bytes, every_signature: bool = False, workers: int = 1) -> VerifyReport:
    """Check every record, the hash chain and the signed checkpoint.

    Args:
        path: The log file; its checkpoint is :func:`checkpoint_path` of it.
        public_key: The site's raw 32-byte Ed25519 identity public key, from the site's key
            file or the federation roster (never from the log itself).
        every_signature: Also check every record's own signature, not only those the
            signed checkpoint does not cover (slower; the same verdict; see Notes).
        workers: Check parts of a log of :data:`PARALLEL_MIN_BYTES` or more in this many
            processes at once (forked; where ``os.fork`` exists and no other thread runs).
            The same verdict; on any problem the log is checked again in one process, so the
            error names the first bad record as always.

    Returns:
        What was verified.

    Raises:
        AuditIntegrityError: the first problem found, naming its line and, where readable,
            its seq: a corrupt, over-long or incomplete line; missing or unknown fields;
            a malformed field; a line not in canonical form; a signature that does not
            verify (edited, forged, or signed with another key); a sequence gap ("record
            missing or out of order") or step back ("out of order or repeated"); a
            previous-hash mismatch; a site
            id change; invalid details; a missing, corrupt or forged checkpoint; a log
            shorter than its checkpoint ("truncated"); a log deleted beside its checkpoint.
        FileNotFoundError: neither the log nor its checkpoint exists.
        TypeError: ``public_key`` is not bytes.
        ValueError: ``public_key`` is not 32 bytes.

    Notes:
        Every record is authenticated by the site's key. The signed checkpoint names the
        SHA-256 of the last line it covers, and every line holds the SHA-256 of the line
        before it, so the checkpoint's one signature binds every record up to it: changing,
        inserting, removing or reordering any of them changes a hash the chain or the
        checkpoint holds (this rests on SHA-256's second-preimage resistance, as the chain
        itself does). A record after the checkpoint (an append interrupted before its
        checkpoint) is checked by its own signature. That, and checking parts of a large
        log in parallel (``workers``), makes a 10,000-record log verify in well under a
        second, where one Ed25519 verification per record would not
        (``benchmarks/operator_commands.py``). With ``every_signature`` (or on any failure,
        to name the first bad record exactly) each record's own signature is checked too.

        Records are checked in file order and verification stops at the first bad one, so
        everything before the reported line is intact and signed. On a failure the
        signature of each record is checked before its chain link, so that an edited
        record is reported as such rather than as a chain break. See the module
        documentation for what the checkpoint does and does not prove: a consistent
        rollback of both files by someone without the key is not detectable here.
    """
    report, _ = _verify(path, public_key, collect=False, every_signature=every_signature, workers=workers)
    return report


def read_verified_records(path: Path, *, public_key: bytes,
                          every_signature: bool = False) -> tuple[VerifyReport, list[dict[str, Any]]]:
    """Verify the log as :func:`verify_log` does and return its records from the same read.

    Args:
        path: The log file.
        public_key: The site's raw 32-byte Ed25519 identity public key.
        every_signature: As :func:`verify_log`.

    Returns:
        The verification report and the records, in order.

    Raises:
        AuditIntegrityError: as :func:`verify_log`.
        FileNotFoundError: as :func:`verify_log`.
        TypeError: as :func:`verify_log`.
        ValueError: as :func:`verify_log`.

    Notes:
        The records returned are the ones that were verified (no second read of a file that
        could change in between), so a review built from them is a review of a verified log.
    """
    return _verify(path, public_key, collect=True, every_signature=every_signature)


# --------------------------------------------------------------------------------------
# The log
# --------------------------------------------------------------------------------------


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _write_checkpoint(
    path: Path, *, site_id: str, last_seq: int | None, last_hash: str, signing_key: IdentityKey
) -> None:
    body = {"format": AUDIT_FORMAT, "site_id": site_id, "last_seq": last_seq, "last_record_sha256": last_hash}
    signature = crypto.sign(signing_key, CHECKPOINT_SIGNING_CONTEXT + canonical_bytes(body))
    atomic_write(path, canonical_bytes({**body, "signature": signature.hex()}) + b"\n")


def _lock(fd: int, path: Path) -> None:
    if fcntl is None:  # pragma: no cover - not POSIX
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(f"audit log {path} is already open for appending (another site agent?)") from None


_OPEN_TOKEN = object()


class AuditLog:
    """An open, verified audit log that records can be appended to.

    Make one with :meth:`AuditLog.open`; close it (or use it as a context manager) to
    release its lock. Appends from several threads are serialised; a second process (or a
    second ``AuditLog`` on the same file) is refused while this one is open.

    Notes:
        One writer per log keeps the chain linear: two writers would both chain onto the
        same last record and the log would fork. The lock is an advisory ``flock`` on the
        log file (POSIX; without ``fcntl`` there is no lock). The signing key is held only
        to sign; it is never written, logged or put in ``repr``.
    """

    def __init__(
        self,
        *,
        _token: object,
        path: Path,
        site_id: str,
        signing_key: IdentityKey,
        lock_file: BinaryIO,
        last_seq: int | None,
        last_hash: str,
    ) -> None:
        if _token is not _OPEN_TOKEN:
            raise TypeError("use AuditLog.open() to open an audit log")
        self._path = path
        self._head_path = checkpoint_path(path)
        self._site_id = site_id
        self._signing_key = signing_key
        self._public_key = crypto.identity_public_key(signing_key)
        self._lock_file: BinaryIO | None = lock_file
        self._last_seq = last_seq
        self._last_hash = last_hash
        self._mutex = threading.Lock()
        self._failed = False

    @classmethod
    def open(cls, path: Path, *, site_id: str, signing_key: IdentityKey) -> AuditLog:
        """Open a site's audit log, creating it if absent, verifying it if present.

        Args:
            path: The log file (its checkpoint is :func:`checkpoint_path` of it).
            site_id: The site's id; must match the id on the existing records.
            signing_key: The site's Ed25519 identity key. Its public half verifies the
                existing log; the key itself signs new records and checkpoints.

        Returns:
            The open log, positioned after its last record.

        Raises:
            AuditIntegrityError: the existing log does not verify against the key (see
                :func:`verify_log`), or the log is missing but its checkpoint exists.
            TypeError: ``signing_key`` is not an Ed25519 private key.
            ValueError: ``site_id`` is malformed, or differs from the one in the log.
            RuntimeError: the log is already open for appending.
            OSError: the log or checkpoint cannot be created, read or written.

        Notes:
            A log that does not verify is never appended to: new records chained onto a
            tampered log would lend it credibility, and the first bad record must stay the
            first. Creating the log also writes a signed checkpoint for the empty log, so
            that deleting every record later shows as truncation. If the last append was
            interrupted between its record and its checkpoint, the checkpoint is brought up
            to date here (the record is validly signed, so nothing was forged). A checkpoint
            write killed before its rename leaves a ``.audit.head.json.*.tmp`` file; those
            are removed here, under the lock (no other writer can be mid-write).
        """
        path = Path(path)
        if not isinstance(site_id, str) or not _SITE_ID_RE.fullmatch(site_id):
            raise ValueError("site_id must be a site id ([a-z0-9][a-z0-9_-], at most 63 characters)")
        try:
            public_key = crypto.identity_public_key(signing_key)
        except (AttributeError, TypeError):
            raise TypeError("signing_key must be an Ed25519 private key") from None
        head_path = checkpoint_path(path)
        if not path.exists() and head_path.exists():
            raise AuditIntegrityError(
                line=1, seq=0, reason=f"log file is missing but its signed checkpoint {head_path.name} exists (deleted)"
            )
        created = False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        # A file object, so that the lock is released if the log is dropped unclosed.
        lock_file = os.fdopen(fd, "ab" if created else "rb", buffering=0)
        locked = False
        try:
            _lock(fd, path)
            locked = True
            # a checkpoint write killed between its temporary file and the rename leaves the
            # temporary behind; only the lock holder writes checkpoints, so any is stale
            for stale in remove_stale_temporaries(head_path):
                logger.info("removed a stale checkpoint temporary %s", stale.name)
            if created:
                os.fsync(fd)
                fsync_dir(path.parent)
                _write_checkpoint(
                    head_path, site_id=site_id, last_seq=None, last_hash=GENESIS_SHA256, signing_key=signing_key
                )
                last_seq, last_hash = None, GENESIS_SHA256
                logger.info("created audit log %s for site %s", path, site_id)
            else:
                report, _ = _verify(path, public_key, collect=False)
                if report.site_id is not None and report.site_id != site_id:
                    raise ValueError(f"audit log {path} belongs to site {report.site_id!r}, not {site_id!r}")
                if report.checkpoint_seq != report.last_seq or not head_path.exists():
                    _write_checkpoint(
                        head_path,
                        site_id=site_id,
                        last_seq=report.last_seq,
                        last_hash=report.last_hash,
                        signing_key=signing_key,
                    )
                    if report.records:
                        logger.warning(
                            "audit log %s: brought the checkpoint up to date after an interrupted append", path
                        )
                last_seq, last_hash = report.last_seq, report.last_hash
                logger.info("opened audit log %s: %d verified records", path, report.records)
        except BaseException:
            lock_file.close()
            if created and locked:
                for leftover in (path, head_path):
                    with suppress(FileNotFoundError):
                        os.unlink(leftover)
            raise
        return cls(
            _token=_OPEN_TOKEN,
            path=path,
            site_id=site_id,
            signing_key=signing_key,
            lock_file=lock_file,
            last_seq=last_seq,
            last_hash=last_hash,
        )

    @property
    def path(self) -> Path:
        """The log file."""
        return self._path

    @property
    def last_seq(self) -> int | None:
        """Sequence number of the last record, or ``None`` while the log is empty."""
        return self._last_seq

    @property
    def last_hash(self) -> str:
        """SHA-256 hex of the last line (:data:`GENESIS_SHA256` while the log is empty)."""
        return self._last_hash

    def verified_records(self, *, events: Collection[str] | None = None) -> tuple[VerifyReport, list[dict[str, Any]]]:
        """Verify the log on disk again, as :func:`verify_log` does, and return its records.

        Args:
            events: Return only records of these events (all records if ``None``); every
                record is verified either way.

        Returns:
            The verification report and the records kept, in log order.

        Raises:
            AuditIntegrityError: the file does not verify (see :func:`verify_log`), or it
                verifies but does not end at the record this writer appended last (it was
                replaced or rolled back while open).
            ValueError: ``events`` names an unknown event.
            RuntimeError: the log is closed, or an earlier append failed part-way.
            OSError: the file cannot be read.

        Notes:
            The file is read again rather than trusting what this object remembers, so a
            caller that acts on the records (the site agent reconciling its privacy ledger
            before a round) acts only on records whose signatures, chain and checkpoint
            verified now. Appends are held off (the writer's lock) while it reads, so the
            file must end exactly where this writer left it.
        """
        keep = None if events is None else frozenset(events)
        if keep is not None and not keep <= set(EVENTS):
            raise ValueError(f"unknown event(s): {', '.join(sorted(keep - set(EVENTS)))}")
        with self._mutex:
            if self._lock_file is None:
                raise RuntimeError("audit log is closed")
            if self._failed:
                raise RuntimeError("an earlier append failed part-way; reopen the audit log to verify it")
            report, records = _verify(self._path, self._public_key, collect=True, keep_events=keep)
            if report.last_seq != self._last_seq or report.last_hash != self._last_hash:
                raise AuditIntegrityError(
                    line=max(report.records, 1),
                    seq=report.last_seq,
                    reason="the log verifies but does not end at the record this site agent wrote last "
                    "(replaced or rolled back while open)",
                )
            return report, records

    def append(
        self,
        event: str,
        *,
        round_id: int | None,
        details: Mapping[str, Any],
        policy_sha256: str | None,
    ) -> dict[str, Any]:
        """Record ``event`` durably. Call it *before* the action it records.

        Args:
            event: One of :data:`EVENTS`.
            round_id: The round, or ``None``.
            details: The event's details (see the module documentation).
            policy_sha256: Hex SHA-256 of the policy in force (``None`` only for
                ``site_initialised`` and ``error``).

        Returns:
            The record as written.

        Raises:
            TypeError: as :func:`build_record`.
            ValueError: as :func:`build_record`; nothing was written.
            RuntimeError: the log is closed, or an earlier append failed part-way (reopen
                it, which verifies it, to go on).
            OSError: writing the record or the checkpoint failed. Do not take the action:
                the record may or may not be on disk, and this log refuses further appends.

        Notes:
            Order: build and sign (pure), append the line and fsync it, then replace the
            signed checkpoint atomically. When this returns the record is on stable
            storage, so an egress record written before sending can never be lost to a
            crash after the bytes left the site.
        """
        return self._append_at_time(_utc_now(), event, round_id=round_id, details=details, policy_sha256=policy_sha256)

    def _append_at_time(
        self,
        time_utc: str,
        event: str,
        *,
        round_id: int | None,
        details: Mapping[str, Any],
        policy_sha256: str | None,
    ) -> dict[str, Any]:
        """:meth:`append` with the time given (a seam for tests and vectors)."""
        with self._mutex:
            if self._lock_file is None:
                raise RuntimeError("audit log is closed")
            if self._failed:
                raise RuntimeError("an earlier append failed part-way; reopen the audit log to verify it")
            seq = 0 if self._last_seq is None else self._last_seq + 1
            record = build_record(
                seq=seq,
                time_utc=time_utc,
                site_id=self._site_id,
                round_id=round_id,
                event=event,
                details=details,
                policy_sha256=policy_sha256,
                prev_hash=self._last_hash,
                signing_key=self._signing_key,
            )
            self._failed = True
            write_record(self._path, record)
            self._last_seq = seq
            self._last_hash = _sha256_hex(canonical_bytes(record))
            _write_checkpoint(
                self._head_path,
                site_id=self._site_id,
                last_seq=seq,
                last_hash=self._last_hash,
                signing_key=self._signing_key,
            )
            self._failed = False
            logger.debug("audit record %d: %s (round %s)", seq, event, round_id)
            return record

    def close(self) -> None:
        """Release the log's lock. Appending afterwards raises ``RuntimeError``."""
        with self._mutex:
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AuditLog(path={str(self._path)!r}, site_id={self._site_id!r}, last_seq={self._last_seq})"
