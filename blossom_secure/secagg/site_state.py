"""A site's secure-aggregation round state as bytes: canonical, versioned, signed JSON.

Flower runs a ClientApp in a fresh process for every message, so a site's
:class:`~blossom_secure.secagg.site.SiteStageMachine` is saved between the stages of a
round, in the site's own folder, and restored in the next process
(:meth:`SiteStageMachine.export_state` and :meth:`SiteStageMachine.from_state`). This
module is the codec of that state, pure like the rest of the core (bytes in, bytes out);
:mod:`blossom_secure.site.round_state` writes, reads and deletes the files.

Format, version 1: one JSON object, canonical (keys sorted, no whitespace, ASCII only,
integers only, no floats), every byte string in standard base64 with padding, so one state
has exactly one encoding::

    {"version": 1,
     "federation_id", "federation_sha256", "round_id", "site_id",   the binding
     "roster_sha256", "terms_sha256", "contribution_sha256",
     "stage":   "new" | "advertise_keys" | ... | "unmask"          (the last stage done)
     "sent":    [{"stage", "request_sha256", "message_sha256", "message"}]   one per stage done
     "secrets": null | {"share_private_key", "blocks": [{"block", "mask_private_key", "seed"}]}
     "shared":  null | {"advertisements": [...], "own_shares": [{"block", "mask_key_share", "seed_share"}]}
     "masked":  null | {"share_senders", "held": [{"peer", "block", "mask_key_share", "seed_share"}],
                        "mask_groups": [{"block", "sites"}], "signed": [{"block", "sites"}]}
     "revealed": [{"peer", "block", "kind"}],
     "signature": Ed25519 signature of the site's identity key over the rest}

Which sections are present follows from the stage, exactly as in the machine: secrets from
``advertise_keys`` to ``consistency`` (forgotten after unmasking), the accepted
advertisements and the site's own shares from ``share_keys``, the shares received, groups
and survivor sets signed from ``masked_input``, and the kinds of share revealed after
``unmask``. The decoder checks, in order: the length limit (before parsing), strict JSON
(no duplicate keys, floats, NaN), the canonical form, the version, the exact set of fields,
the site, the signature, the rest of the binding (federation, its file's hash, round,
roster, layout and parameters), then every field (type, length, alphabet, canonical order,
presence for the stage). Never pickle, never eval.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from blossom_secure import crypto
from blossom_secure.blocks import is_head, is_valid_block_name
from blossom_secure.crypto import Ed25519PrivateKey
from blossom_secure.errors import AuthenticationError, BlossomError
from blossom_secure.secagg import shamir
from blossom_secure.secagg.errors import ReplayedMessageError
from blossom_secure.secagg.kdf import FEDERATION_SHA256_BYTES, PROTOCOL_LABEL
from blossom_secure.secagg.messages import ShareKind, is_valid_identifier
from blossom_secure.secagg.params import SecAggParams

__all__ = [
    "MAX_STATE_BYTES",
    "STATE_STAGES",
    "STATE_VERSION",
    "BlockSecret",
    "HeldShare",
    "SentMessage",
    "SiteRoundState",
    "SiteStateError",
    "StageAlreadyAnsweredError",
    "decode_site_state",
    "encode_site_state",
    "roster_sha256",
    "terms_sha256",
]

#: The version of the state format written and the only one read.
STATE_VERSION = 1
#: The longest state accepted (checked before parsing) and written.
MAX_STATE_BYTES = 64 * 1024 * 1024
#: The stages a state can be at: ``"new"``, then ``site.STAGE_NAMES`` in order.
STATE_STAGES = ("new", "advertise_keys", "share_keys", "masked_input", "consistency", "unmask")

_SIGNATURE_PURPOSE = b"site-round-state"
_KEY_BYTES = crypto.X25519_KEY_BYTES
_SEED_BYTES = 32
_DIGEST_BYTES = 32
_MAX_INT_DIGITS = 20
_KINDS = {ShareKind.SELF_MASK_SEED: "self_mask_seed", ShareKind.MASK_KEY: "mask_key"}
_KINDS_BY_NAME = {name: kind for kind, name in _KINDS.items()}

_TOP_FIELDS = frozenset(
    {
        "version",
        "federation_id",
        "federation_sha256",
        "round_id",
        "site_id",
        "roster_sha256",
        "terms_sha256",
        "contribution_sha256",
        "stage",
        "sent",
        "secrets",
        "shared",
        "masked",
        "revealed",
        "signature",
    }
)


class SiteStateError(BlossomError, ValueError):
    """A saved round state cannot be used: malformed, oversized, another version, not
    signed by this site, bound to another federation, round, site, roster, layout,
    parameters or contribution, or inconsistent with itself.

    The site's own file is at fault (corrupted, tampered with, or the wrong one), not a
    peer; the message names the field and the reason. Also a ``ValueError``.
    """


class StageAlreadyAnsweredError(ReplayedMessageError):
    """The site already answered this stage and cannot send that answer again byte for
    byte (its masked input is not kept; see :meth:`SiteStageMachine.resend`). It never
    sends another answer instead."""


@dataclass(frozen=True)
class SentMessage:
    """A message the site produced.

    Attributes:
        stage: The stage it answered (a name from ``STATE_STAGES``, not ``"new"``).
        request_sha256: SHA-256 of the coordinator's request it answered, as received
            (``None`` for the advertisement, which answers no request).
        message_sha256: SHA-256 of the message.
        message: The message, or ``None`` for the masked input (not kept; it is rebuilt
            and checked against ``message_sha256`` to send it again).
    """

    stage: str
    request_sha256: bytes | None
    message_sha256: bytes
    message: bytes | None


@dataclass(frozen=True)
class BlockSecret:
    """One block's secrets: its X25519 mask private key and its self-mask seed."""

    block: str
    mask_private_key: bytes
    seed: bytes


@dataclass(frozen=True)
class HeldShare:
    """The shares a site holds of ``peer``'s two secrets for ``block`` (66 bytes each)."""

    peer: str
    block: str
    mask_key_share: bytes
    seed_share: bytes


@dataclass(frozen=True)
class SiteRoundState:
    """Everything a site's stage machine needs to go on from where it stopped.

    Attributes:
        federation_id, federation_sha256, round_id, site_id: What the state is bound to.
        roster_sha256: :func:`roster_sha256` of the roster.
        terms_sha256: :func:`terms_sha256` of the layout and parameters.
        contribution_sha256: SHA-256 of the contribution (its updates, weight and policy
            minimum) the site advertised and masks.
        stage: Index in ``STATE_STAGES`` of the last stage done (0: nothing done).
        sent: One record per stage done, in order.
        share_private_key: The X25519 key that receives shares (stages 1-4, else ``None``).
        block_secrets: Per contributed block, sorted (stages 1-4, else empty).
        advertisements: Every advertisement accepted, signed, sorted (stages 2-4, else
            ``None``).
        own_shares: This site's shares of its own secrets (``peer`` is the site), sorted
            by block (stages 2-4).
        share_senders: The sites that shared keys, sorted (stages 3-4, else ``None``).
        held: Every share held, sorted by (peer, block) (stages 3-4).
        mask_groups: Block to the group it masked with, for each block sent (stages 3-4).
        signed: Block to the survivor set signed (stage 4).
        revealed: (peer, block, kind) of every share revealed (stage 5), sorted.
    """

    federation_id: str
    federation_sha256: bytes
    round_id: int
    site_id: str
    roster_sha256: bytes
    terms_sha256: bytes
    contribution_sha256: bytes
    stage: int
    sent: tuple[SentMessage, ...]
    share_private_key: bytes | None = None
    block_secrets: tuple[BlockSecret, ...] = ()
    advertisements: tuple[bytes, ...] | None = None
    own_shares: tuple[HeldShare, ...] = ()
    share_senders: tuple[str, ...] | None = None
    held: tuple[HeldShare, ...] = ()
    mask_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    signed: tuple[tuple[str, tuple[str, ...]], ...] = ()
    revealed: tuple[tuple[str, str, ShareKind], ...] = ()


# ------------------------------------------------------------------------ digests


def _lp(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(">H", len(data)) + data


def roster_sha256(roster: Mapping[str, bytes]) -> bytes:
    """SHA-256 of a roster (site ids and Ed25519 public keys, sorted by site id).

    Raises:
        ValueError: a site id or key of the wrong type.
    """
    digest = hashlib.sha256(PROTOCOL_LABEL + _lp("site-state-roster") + struct.pack(">I", len(roster)))
    for site in sorted(roster):
        key = roster[site]
        if not isinstance(site, str) or not isinstance(key, bytes):
            raise ValueError("a roster maps site ids to raw public keys")
        digest.update(_lp(site) + _lp(key.hex()))
    return digest.digest()


def terms_sha256(block_sizes: Mapping[str, int], params: SecAggParams) -> bytes:
    """SHA-256 of the public terms a round runs under besides the roster: the layout and
    every protocol parameter (``clip`` by its exact binary value)."""
    document = {
        "block_sizes": {block: int(size) for block, size in block_sizes.items()},
        "ring_bits": params.ring_bits,
        "clip": float(params.clip).hex(),
        "scale_bits": params.scale_bits,
        "max_weight": params.max_weight,
        "max_group_size": params.max_group_size,
        "threshold": params.threshold,
        "block_thresholds": {block: int(t) for block, t in params.block_thresholds.items()},
        "block_groups": {block: list(group) for block, group in params.block_groups.items()},
        "min_contributors": params.min_contributors,
        "max_message_bytes": params.max_message_bytes,
        **({"sparse": params.sparse.as_document()} if params.sparse is not None else {}),
    }
    return hashlib.sha256(PROTOCOL_LABEL + _lp("site-state-terms") + _dumps(document)).digest()


# -------------------------------------------------------------------------- encode


def _dumps(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _signature_payload(body: bytes) -> bytes:
    """What the identity key signs: the protocol label, the purpose ``site-round-state``
    (length-prefixed, so never equal to the payload of a message or consistency
    signature made with the same key), and SHA-256 of the canonical state without its
    signature."""
    purpose = struct.pack(">H", len(_SIGNATURE_PURPOSE)) + _SIGNATURE_PURPOSE
    return PROTOCOL_LABEL + purpose + hashlib.sha256(body).digest()


def _sign_document(document: Mapping[str, Any], identity_key: Ed25519PrivateKey) -> bytes:
    """Sign a state document (without ``signature``) and return its canonical bytes.

    A private seam: tests use it to make validly signed states with bad fields.
    """
    body = dict(document)
    body.pop("signature", None)
    signature = crypto.sign(identity_key, _signature_payload(_dumps(body)))
    return _dumps({**body, "signature": _b64(signature)})


def _held_document(share: HeldShare, *, with_peer: bool) -> dict[str, Any]:
    entry = {
        "block": share.block,
        "mask_key_share": _b64(share.mask_key_share),
        "seed_share": _b64(share.seed_share),
    }
    if with_peer:
        entry["peer"] = share.peer
    return entry


def _groups_document(groups: tuple[tuple[str, tuple[str, ...]], ...]) -> list[dict[str, Any]]:
    return [{"block": block, "sites": list(sites)} for block, sites in groups]


def encode_site_state(state: SiteRoundState, identity_key: Ed25519PrivateKey) -> bytes:
    """Encode and sign ``state`` with the site's identity key.

    Returns:
        The canonical JSON bytes (at most :data:`MAX_STATE_BYTES`).

    Raises:
        ValueError: the state is not well formed for its stage, or too large to be read
            back (the encoder runs the decoder's checks, so nothing is written that
            cannot be read).
    """
    stage = state.stage
    document: dict[str, Any] = {
        "version": STATE_VERSION,
        "federation_id": state.federation_id,
        "federation_sha256": _b64(state.federation_sha256),
        "round_id": state.round_id,
        "site_id": state.site_id,
        "roster_sha256": _b64(state.roster_sha256),
        "terms_sha256": _b64(state.terms_sha256),
        "contribution_sha256": _b64(state.contribution_sha256),
        "stage": STATE_STAGES[stage] if isinstance(stage, int) and 0 <= stage < len(STATE_STAGES) else None,
        "sent": [
            {
                "stage": record.stage,
                "request_sha256": None if record.request_sha256 is None else _b64(record.request_sha256),
                "message_sha256": _b64(record.message_sha256),
                "message": None if record.message is None else _b64(record.message),
            }
            for record in state.sent
        ],
        "secrets": None,
        "shared": None,
        "masked": None,
        "revealed": [
            {"peer": peer, "block": block, "kind": _KINDS[ShareKind(kind)]} for peer, block, kind in state.revealed
        ],
    }
    if state.share_private_key is not None:
        document["secrets"] = {
            "share_private_key": _b64(state.share_private_key),
            "blocks": [
                {"block": s.block, "mask_private_key": _b64(s.mask_private_key), "seed": _b64(s.seed)}
                for s in state.block_secrets
            ],
        }
    if state.advertisements is not None:
        document["shared"] = {
            "advertisements": [_b64(advert) for advert in state.advertisements],
            "own_shares": [_held_document(share, with_peer=False) for share in state.own_shares],
        }
    if state.share_senders is not None:
        document["masked"] = {
            "share_senders": list(state.share_senders),
            "held": [_held_document(share, with_peer=True) for share in state.held],
            "mask_groups": _groups_document(state.mask_groups),
            "signed": _groups_document(state.signed),
        }
    encoded = _sign_document(document, identity_key)
    try:
        _Checker(_parse(encoded, MAX_STATE_BYTES)).state()
    except SiteStateError as exc:
        raise ValueError(f"cannot encode this state: {exc}") from None
    return encoded


# -------------------------------------------------------------------------- decode


def _parse(data: bytes, max_bytes: int) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SiteStateError("a saved state is bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise SiteStateError(f"the state is {len(data)} bytes, more than the limit of {max_bytes}")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in items:
            if key in result:
                raise SiteStateError(f"field {key!r} appears twice")
            result[key] = value
        return result

    def refuse_float(text: str) -> Any:
        raise SiteStateError(f"a number that is not an integer ({text[:20]!r})")

    def refuse_constant(text: str) -> Any:
        raise SiteStateError(f"{text} is not allowed")

    def small_int(text: str) -> int:
        if len(text) > _MAX_INT_DIGITS:
            raise SiteStateError("an integer is too long")
        return int(text)

    try:
        document = json.loads(
            data.decode("ascii"),
            object_pairs_hook=pairs,
            parse_float=refuse_float,
            parse_constant=refuse_constant,
            parse_int=small_int,
        )
    except SiteStateError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SiteStateError("the state is not ASCII JSON (truncated or corrupted?)") from None
    if not isinstance(document, dict):
        raise SiteStateError("the state is not a JSON object")
    if _dumps(document) != data:
        raise SiteStateError("the state is not in canonical form (sorted keys, no whitespace)")
    return document


def decode_site_state(
    data: bytes,
    *,
    site_id: str,
    identity_public_key: bytes,
    federation_id: str,
    federation_sha256: bytes,
    round_id: int,
    roster_sha256: bytes,
    terms_sha256: bytes,
    max_bytes: int = MAX_STATE_BYTES,
) -> SiteRoundState:
    """Check and decode a saved state against the terms the site holds.

    Args:
        data: The bytes read from the site's state file.
        site_id: This site (from its own site file).
        identity_public_key: This site's Ed25519 public key (the roster's entry).
        federation_id, federation_sha256, round_id: The round the caller is in.
        roster_sha256, terms_sha256: :func:`roster_sha256` and :func:`terms_sha256` of
            the roster, layout and parameters the caller holds.
        max_bytes: Length limit, checked before parsing.

    Returns:
        The state, every field checked for syntax, canonical order and presence at its
        stage. Whether its secrets, messages and shares agree with each other is checked
        by :meth:`SiteStageMachine.from_state`.

    Raises:
        SiteStateError: oversized, not strict canonical JSON, another version, unknown or
            missing fields, not signed by ``identity_public_key``, bound to another site,
            federation, federation file, round, roster or terms, or a field of the wrong
            type, length, alphabet or order, or present at the wrong stage.

    Notes:
        The terms a site relies on for its privacy (thresholds, groups, roster) come from
        the caller, never from the state: the state only carries their digests, and is
        refused if they differ. The signature makes any change to the file (a rolled back
        stage, a swapped seed) a refusal rather than a different answer; it cannot stop a
        whole older file being put back, which only the file system can (see
        :mod:`blossom_secure.site.round_state`).
    """
    document = _parse(data, max_bytes)
    version = document.get("version")
    if type(version) is not int or version != STATE_VERSION:
        raise SiteStateError(f"state version {version!r} is not supported (this reads version {STATE_VERSION})")
    unknown = sorted(set(document) - _TOP_FIELDS)
    if unknown:
        raise SiteStateError(f"unknown field(s) in the state: {', '.join(unknown)}")
    missing = sorted(_TOP_FIELDS - set(document))
    if missing:
        raise SiteStateError(f"missing field(s) in the state: {', '.join(missing)}")
    if document["site_id"] != site_id:
        raise SiteStateError(f"the state belongs to site {str(document['site_id'])[:64]!r}, not {site_id!r}")
    checker = _Checker(document)
    signature = checker.b64(document["signature"], "signature", crypto.ED25519_SIGNATURE_BYTES)
    body = {key: value for key, value in document.items() if key != "signature"}
    try:
        crypto.verify_signature(identity_public_key, _signature_payload(_dumps(body)), signature)
    except AuthenticationError:
        raise SiteStateError(
            "the state's signature does not verify with this site's identity key (changed since it was saved)"
        ) from None
    state = checker.state()
    for name, got, expected in (
        ("federation_id", state.federation_id, federation_id),
        ("federation_sha256", state.federation_sha256, federation_sha256),
        ("round_id", state.round_id, round_id),
        ("roster_sha256", state.roster_sha256, roster_sha256),
        ("terms_sha256", state.terms_sha256, terms_sha256),
    ):
        if got != expected:
            raise SiteStateError(f"the state is bound to another {name.removesuffix('_sha256')} ({name} differs)")
    return state


class _Checker:
    """Field-by-field validation of a parsed state document."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    # ------------------------------------------------------------- primitives

    @staticmethod
    def fields(value: Any, expected: frozenset[str] | set[str], where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise SiteStateError(f"{where} must be an object")
        unknown = sorted(set(value) - expected)
        if unknown:
            raise SiteStateError(f"unknown field(s) in {where}: {', '.join(unknown)}")
        missing = sorted(set(expected) - set(value))
        if missing:
            raise SiteStateError(f"missing field(s) in {where}: {', '.join(missing)}")
        return value

    @staticmethod
    def b64(value: Any, where: str, size: int | None = None) -> bytes:
        if not isinstance(value, str):
            raise SiteStateError(f"{where} must be a base64 string")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise SiteStateError(f"{where} is not base64") from None
        if _b64(data) != value:
            raise SiteStateError(f"{where} is not canonical base64")
        if size is not None and len(data) != size:
            raise SiteStateError(f"{where} must be {size} bytes, not {len(data)}")
        return data

    @staticmethod
    def identifier(value: Any, where: str) -> str:
        if not is_valid_identifier(value):
            raise SiteStateError(f"{where} is not a valid identifier")
        return value

    @staticmethod
    def block(value: Any, where: str) -> str:
        if not is_valid_block_name(value) or is_head(value):
            raise SiteStateError(f"{where} is not a shareable block name")
        return value

    @staticmethod
    def array(value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise SiteStateError(f"{where} must be a list")
        return value

    @staticmethod
    def sorted_unique(keys: list[Any], where: str) -> None:
        if not all(a < b for a, b in zip(keys, keys[1:])):
            raise SiteStateError(f"{where} must be strictly sorted (canonical, no duplicates)")

    def sites(self, value: Any, where: str) -> tuple[str, ...]:
        sites = tuple(self.identifier(site, where) for site in self.array(value, where))
        self.sorted_unique(list(sites), where)
        return sites

    def share(self, value: Any, where: str) -> bytes:
        data = self.b64(value, where, shamir.SHARE_BYTES)
        try:
            shamir.share_from_bytes(data)
        except ValueError:
            raise SiteStateError(f"{where} is not a field element") from None
        return data

    def held(self, value: Any, where: str, *, peer: str | None) -> HeldShare:
        names = {"block", "mask_key_share", "seed_share"} | ({"peer"} if peer is None else set())
        entry = self.fields(value, names, where)
        return HeldShare(
            peer=self.identifier(entry["peer"], f"{where}.peer") if peer is None else peer,
            block=self.block(entry["block"], f"{where}.block"),
            mask_key_share=self.share(entry["mask_key_share"], f"{where}.mask_key_share"),
            seed_share=self.share(entry["seed_share"], f"{where}.seed_share"),
        )

    def groups(self, value: Any, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        groups = []
        for i, item in enumerate(self.array(value, where)):
            entry = self.fields(item, {"block", "sites"}, f"{where}[{i}]")
            sites = self.sites(entry["sites"], f"{where}[{i}].sites")
            if not sites:
                raise SiteStateError(f"{where}[{i}].sites is empty")
            groups.append((self.block(entry["block"], f"{where}[{i}].block"), sites))
        self.sorted_unique([block for block, _ in groups], where)
        return tuple(groups)

    # ---------------------------------------------------------------- state

    def state(self) -> SiteRoundState:
        document = self.fields(self.document, _TOP_FIELDS, "the state")
        round_id = document["round_id"]
        if type(round_id) is not int or not 0 <= round_id < 1 << 64:
            raise SiteStateError("round_id must be an integer in 0..2**64-1")
        if document["stage"] not in STATE_STAGES:
            raise SiteStateError(f"stage {document['stage']!r} is not one of {', '.join(STATE_STAGES)}")
        stage = STATE_STAGES.index(document["stage"])
        site_id = self.identifier(document["site_id"], "site_id")
        self.b64(document["signature"], "signature", crypto.ED25519_SIGNATURE_BYTES)
        sections: dict[str, Any] = {}
        sections.update(self._secrets(document["secrets"], stage))
        sections.update(self._shared(document["shared"], stage, site_id))
        sections.update(self._masked(document["masked"], stage))
        return SiteRoundState(
            federation_id=self.identifier(document["federation_id"], "federation_id"),
            federation_sha256=self.b64(document["federation_sha256"], "federation_sha256", FEDERATION_SHA256_BYTES),
            round_id=round_id,
            site_id=site_id,
            roster_sha256=self.b64(document["roster_sha256"], "roster_sha256", _DIGEST_BYTES),
            terms_sha256=self.b64(document["terms_sha256"], "terms_sha256", _DIGEST_BYTES),
            contribution_sha256=self.b64(document["contribution_sha256"], "contribution_sha256", _DIGEST_BYTES),
            stage=stage,
            sent=self._sent(document["sent"], stage),
            revealed=self._revealed(document["revealed"], stage),
            **sections,
        )

    def _present(self, value: Any, name: str, stage: int, first: int, last: int) -> bool:
        wanted = first <= stage <= last
        if (value is not None) != wanted:
            state = "present" if wanted else "null"
            raise SiteStateError(f"{name} must be {state} at stage {STATE_STAGES[stage]}")
        return wanted

    def _sent(self, value: Any, stage: int) -> tuple[SentMessage, ...]:
        records = []
        items = self.array(value, "sent")
        if len(items) != stage:
            raise SiteStateError(f"sent must hold one record per stage done ({stage}), not {len(items)}")
        for i, item in enumerate(items):
            where = f"sent[{i}]"
            entry = self.fields(item, {"stage", "request_sha256", "message_sha256", "message"}, where)
            name = STATE_STAGES[i + 1]
            if entry["stage"] != name:
                raise SiteStateError(f"{where}.stage must be {name!r}")
            if (entry["request_sha256"] is None) != (name == "advertise_keys"):
                raise SiteStateError(f"{where}.request_sha256 must be null for the advertisement only")
            if (entry["message"] is None) != (name == "masked_input"):
                raise SiteStateError(f"{where}.message must be null for the masked input only")
            request = None if entry["request_sha256"] is None else self.b64(
                entry["request_sha256"], f"{where}.request_sha256", _DIGEST_BYTES
            )
            digest = self.b64(entry["message_sha256"], f"{where}.message_sha256", _DIGEST_BYTES)
            message = None if entry["message"] is None else self.b64(entry["message"], f"{where}.message")
            if message is not None and hashlib.sha256(message).digest() != digest:
                raise SiteStateError(f"{where}.message does not match its SHA-256")
            records.append(SentMessage(name, request, digest, message))
        return tuple(records)

    def _secrets(self, value: Any, stage: int) -> dict[str, Any]:
        if not self._present(value, "secrets", stage, 1, 4):
            return {}
        entry = self.fields(value, {"share_private_key", "blocks"}, "secrets")
        secrets = []
        for i, item in enumerate(self.array(entry["blocks"], "secrets.blocks")):
            where = f"secrets.blocks[{i}]"
            block = self.fields(item, {"block", "mask_private_key", "seed"}, where)
            secrets.append(
                BlockSecret(
                    block=self.block(block["block"], f"{where}.block"),
                    mask_private_key=self.b64(block["mask_private_key"], f"{where}.mask_private_key", _KEY_BYTES),
                    seed=self.b64(block["seed"], f"{where}.seed", _SEED_BYTES),
                )
            )
        self.sorted_unique([s.block for s in secrets], "secrets.blocks")
        return {
            "share_private_key": self.b64(entry["share_private_key"], "secrets.share_private_key", _KEY_BYTES),
            "block_secrets": tuple(secrets),
        }

    def _shared(self, value: Any, stage: int, site_id: str) -> dict[str, Any]:
        if not self._present(value, "shared", stage, 2, 4):
            return {}
        entry = self.fields(value, {"advertisements", "own_shares"}, "shared")
        adverts = [
            self.b64(advert, f"shared.advertisements[{i}]")
            for i, advert in enumerate(self.array(entry["advertisements"], "shared.advertisements"))
        ]
        self.sorted_unique(adverts, "shared.advertisements")
        own = [
            self.held(item, f"shared.own_shares[{i}]", peer=site_id)
            for i, item in enumerate(self.array(entry["own_shares"], "shared.own_shares"))
        ]
        self.sorted_unique([s.block for s in own], "shared.own_shares")
        return {"advertisements": tuple(adverts), "own_shares": tuple(own)}

    def _masked(self, value: Any, stage: int) -> dict[str, Any]:
        if not self._present(value, "masked", stage, 3, 4):
            return {}
        entry = self.fields(value, {"share_senders", "held", "mask_groups", "signed"}, "masked")
        held = [
            self.held(item, f"masked.held[{i}]", peer=None)
            for i, item in enumerate(self.array(entry["held"], "masked.held"))
        ]
        self.sorted_unique([(s.peer, s.block) for s in held], "masked.held")
        signed = self.groups(entry["signed"], "masked.signed")
        if signed and stage < 4:
            raise SiteStateError("masked.signed must be empty before the consistency stage is done")
        return {
            "share_senders": self.sites(entry["share_senders"], "masked.share_senders"),
            "held": tuple(held),
            "mask_groups": self.groups(entry["mask_groups"], "masked.mask_groups"),
            "signed": signed,
        }

    def _revealed(self, value: Any, stage: int) -> tuple[tuple[str, str, ShareKind], ...]:
        revealed = []
        for i, item in enumerate(self.array(value, "revealed")):
            where = f"revealed[{i}]"
            entry = self.fields(item, {"peer", "block", "kind"}, where)
            if entry["kind"] not in _KINDS_BY_NAME:
                raise SiteStateError(f"{where}.kind must be one of {', '.join(sorted(_KINDS_BY_NAME))}")
            revealed.append(
                (
                    self.identifier(entry["peer"], f"{where}.peer"),
                    self.block(entry["block"], f"{where}.block"),
                    _KINDS_BY_NAME[entry["kind"]],
                )
            )
        self.sorted_unique([(peer, block) for peer, block, _ in revealed], "revealed")
        if revealed and stage < 5:
            raise SiteStateError("revealed must be empty before the unmask stage is done")
        return tuple(revealed)
