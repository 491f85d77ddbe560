"""What a site does for one coordinator request, in a process of its own.

Flower's deployment engine runs the site's ClientApp in a fresh process for every message,
so a site's side of a round is a sequence of independent steps, each given the site folder
and the request's bytes and returning the reply's bytes (:func:`handle_request`). Between
steps everything lives in the site's own state folder (mode 0700):

* ``flower-round-<r>.json``: what the site answered for round ``r`` (the offer and finish
  replies, kept to send again byte for byte on a retry), the policy it was cleared under,
  whether it joined and contributes, and the layout it masks with;
* ``flower-update-<r>.npz``: the egress update (what the egress guard cleared; mode 0600,
  no pickle) until the masked input can no longer be asked for again;
* ``secagg-round-<r>.json``: the secure-aggregation stage machine's signed state
  (:mod:`blossom_secure.site.round_state`), saved *before* each message leaves.

The stages are the embedded runtime's, run by the same code:

* ``identify``: sign a fresh nonce, so the coordinator learns which transport node is
  which site from the roster key, never from the transport's own ids;
* ``offer`` (the round announcement with the global blocks): the site agent checks its
  policy, the public terms and its privacy ledger, reserves the budget durably, trains
  under DP (:meth:`blossom_secure.site.agent.SiteAgent.offer`), saves its blocks and its
  egress update, and answers with its signed key advertisement (joined), nothing
  (joined, nothing to share), or a decline;
* ``share_keys``, ``masked_input``, ``consistency``, ``unmask``: the
  :class:`~blossom_secure.secagg.site.SiteStageMachine` restored from its state answers
  the coordinator's protocol message; a repeated request gets
  :meth:`~blossom_secure.secagg.site.SiteStageMachine.resend`'s bytes, never a second
  answer. These steps never load the site's data or import torch: a light
  :class:`SiteContext` opens the site file, policy, identity key, roster and audit log;
* ``finish`` (the aggregated blocks and each block's outcome): keep the private blocks,
  take the new global values of the blocks aggregated with this site's update, evaluate,
  and answer with the round report if the policy lets it leave; the round's state is
  discarded.

Every reply is written to the site's audit log (its exact bytes: length and SHA-256)
before it is returned, and the coordinator is never trusted: every request is parsed with
size limits, checked against the site's own federation file and roster, and its round
must come after every round the site's verified audit log shows it answered.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from blossom_secure.audit import log as audit
from blossom_secure._fs import atomic_write, fsync_dir, load_arrays_npz, save_arrays_npz
from blossom_secure.exchange import BlockOutcome
from blossom_secure.blocks import is_head
from blossom_secure.config import FederationConfig, load_federation
from blossom_secure.site.config import SiteConfig, load_site
from blossom_secure.crypto import IdentityKey, identity_public_key, key_fingerprint
from blossom_secure.errors import BlossomError, PolicyError, Problem, ProtocolError
from blossom_secure.site.keys import load_identity_key, load_or_create_identity_key
from blossom_secure.site.egress import EGRESS_RECIPIENT, egress_block_bytes
from blossom_secure.site.round_identity import ANSWER_EVENTS, StaleRoundError, check_round_is_new, last_round_answered
from blossom_secure.site.round_state import discard_round_state, load_round_state, read_private_file, save_round_state
from blossom_secure import wire
from blossom_secure.roster import load_roster, roster_path
from blossom_secure.secagg import STAGE_NAMES, SecAggParams, SiteContribution, SiteStageMachine
from blossom_secure.secagg.errors import ReplayedMessageError, StageOrderError
from blossom_secure.secagg.site_state import SiteStateError
from blossom_secure.secagg.terms import federation_sha256, secagg_params

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MAX_REQUEST_BYTES",
    "PolicyChangedError",
    "SiteBusyError",
    "SiteContext",
    "SiteFiles",
    "StaleRoundError",
    "handle_request",
    "layout_block_sizes",
    "site_identity",
]

logger = logging.getLogger(__name__)

#: Longest request read (the header limit plus the longest protocol message).
MAX_REQUEST_BYTES = wire.MAX_HEADER_BYTES + 12 + SecAggParams.__dataclass_fields__["max_message_bytes"].default
#: The site agent's audit log file in the state folder (``site_agent.AUDIT_FILE``; a test
#: checks they agree, so that this module need not import torch to find it).
AUDIT_FILE = "audit.jsonl"

_LOCK_FILE = ".flower-step.lock"
_RECORD_VERSION = 1
_MAX_RECORD_BYTES = 16 << 20
_RECORD_RE = re.compile(r"flower-round-([0-9]{1,20})\.json")
_UPDATE_RE = re.compile(r"flower-update-([0-9]{1,20})\.npz")
_STATE_RE = re.compile(r"secagg-round-([0-9]{1,20})\.json")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_METHODS = {
    "share_keys": SiteStageMachine.share_keys,
    "masked_input": SiteStageMachine.masked_input,
    "consistency": SiteStageMachine.consistency_check,
    "unmask": SiteStageMachine.unmask,
}


class PolicyChangedError(BlossomError):
    """The site's policy file changed during a round: the update was cleared under
    another policy, so the site takes no further part in that round."""


class SiteBusyError(BlossomError):
    """Another step of this site held its state folder for longer than the timeout."""


@dataclass(frozen=True)
class SiteFiles:
    """Where a site's files are: its folder, its federation file and the roster.

    Attributes:
        site_dir: The site folder (``site.toml``, ``keys/``, ``state/``, its data).
        federation_file: The federation file, or ``None`` for the one the site file names.
        roster_file: The roster, or ``None`` for ``roster.toml`` beside the federation file.
        coordinator: The coordinator address this site is connected to, as its own
            ``join`` command set it (the SuperNode's node config; never from a message).
            The policy's ``[policy] coordinators`` must list it. ``None`` (in-process
            transports only): the federation file's ``coordinator`` is checked instead.
    """

    site_dir: Path
    federation_file: Path | None = None
    roster_file: Path | None = None
    coordinator: str | None = None

    def federation(self) -> FederationConfig:
        """The federation file, read and checked.

        Raises:
            PolicyError: the site file names none (and none was given), or it is invalid.
        """
        path = self.federation_file
        if path is None:
            bare = load_site(self.site_dir)
            if bare.federation_file is None:
                raise PolicyError([Problem(str(Path(self.site_dir) / "site.toml"), "site.federation",
                                           "names no federation file, and none was given")])
            path = bare.federation_file
        return load_federation(path)


def site_identity(files: SiteFiles) -> tuple[str, bytes]:
    """The site's id and raw Ed25519 public key, for the roster; creates the key on
    first use (mode 0600, never overwritten), as ``blossom-site init`` does.

    Raises:
        PolicyError: the site or federation file is invalid.
        KeyFileError: the key exists but cannot be used.
    """
    config = load_site(files.site_dir, federation=files.federation())
    key, _ = load_or_create_identity_key(config.keys_dir)
    return config.id, identity_public_key(key)


def layout_block_sizes(federation: FederationConfig) -> dict[str, int]:
    """Number of float32 values of every shareable block of the federation layout (every
    encoder and the fusion block; never a head), built from the layout alone.

    Notes:
        Building the blocks draws their initial values from torch's global generator;
        it is saved and restored around the build, so a seeded simulation trains exactly
        as it would had this not run.
    """
    import torch

    from blossom_secure.model import BlockModel

    with torch.random.fork_rng(devices=[]):
        model = BlockModel(federation.layout, federation.layout.modalities, ())
        sizes = model.block_sizes()
    return {block: int(n) for block, n in sizes.items() if not is_head(block)}


# ------------------------------------------------------------------------- the round record


@dataclass(frozen=True)
class _RoundRecord:
    """What a site answered in one round (``flower-round-<r>.json``)."""

    round_id: int
    federation_sha256: str
    policy_sha256: str
    offer_request_sha256: str
    offer_reply: bytes
    offer_message_type: str
    offer_blocks: tuple[str, ...]
    joined: bool
    declined: str | None
    declined_kind: str | None
    epsilon_total: float | None
    epsilon_nominal: bool
    contributing: bool
    block_sizes: Mapping[str, int]
    weight: int | None
    min_contributors: int | None
    secagg_error: str | None = None
    finish_request_sha256: str | None = None
    finish_reply: bytes | None = None
    finish_message_type: str | None = None

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        for name in ("offer_reply", "finish_reply"):
            doc[name] = None if doc[name] is None else base64.b64encode(doc[name]).decode("ascii")
        doc["offer_blocks"] = list(self.offer_blocks)
        doc["block_sizes"] = dict(self.block_sizes)
        doc["version"] = _RECORD_VERSION
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str) -> _RoundRecord:
        """Parse a record the site wrote itself (still checked: a damaged or edited file
        must stop the round, not steer it).

        Raises:
            SiteStateError: malformed, another version, or fields of the wrong type.
        """
        try:
            doc = json.loads(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise SiteStateError(f"{where} is not ASCII JSON") from None
        names = {f for f in cls.__dataclass_fields__} | {"version"}
        if not isinstance(doc, dict) or set(doc) != names or doc["version"] != _RECORD_VERSION:
            raise SiteStateError(f"{where} is not a version {_RECORD_VERSION} round record")
        try:
            for name in ("offer_reply", "finish_reply"):
                if doc[name] is not None:
                    doc[name] = base64.b64decode(doc[name], validate=True)
            doc["offer_blocks"] = tuple(doc["offer_blocks"])
            del doc["version"]
            record = cls(**doc)
        except (binascii.Error, TypeError, ValueError):
            raise SiteStateError(f"{where} holds a field of the wrong form") from None
        ok = (isinstance(record.round_id, int) and isinstance(record.joined, bool)
              and isinstance(record.contributing, bool) and isinstance(record.offer_reply, bytes)
              and isinstance(record.block_sizes, dict)
              and all(isinstance(k, str) and isinstance(v, int) for k, v in record.block_sizes.items())
              and all(isinstance(b, str) for b in record.offer_blocks)
              and (record.weight is None or isinstance(record.weight, int))
              and (record.min_contributors is None or isinstance(record.min_contributors, int)))
        if not ok:
            raise SiteStateError(f"{where} holds a field of the wrong type")
        return record


def _record_path(state_dir: Path, round_id: int) -> Path:
    return Path(state_dir) / f"flower-round-{round_id}.json"


def _update_path(state_dir: Path, round_id: int) -> Path:
    return Path(state_dir) / f"flower-update-{round_id}.npz"


def _load_record(state_dir: Path, round_id: int) -> _RoundRecord | None:
    path = _record_path(state_dir, round_id)
    data = read_private_file(path, max_bytes=_MAX_RECORD_BYTES)
    return None if data is None else _RoundRecord.from_bytes(data, where=str(path))


def _save_record(state_dir: Path, record: _RoundRecord) -> None:
    atomic_write(_record_path(state_dir, record.round_id), record.to_bytes(), mode=0o600)


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


# ------------------------------------------------------------------------------ audit helpers


def _egress_details(message_type: str, blocks: tuple[str, ...], sizes: Mapping[str, int], payload: bytes, *,
                    ring_bits: int = 32) -> dict:
    """The details of an ``egress`` record, as the site agent writes them (recipient and
    the bytes that carry each block's values included)."""
    details = {"message_type": message_type, "blocks": list(blocks), "shapes": {b: [int(sizes[b])] for b in blocks},
               "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(),
               "recipient": EGRESS_RECIPIENT}
    block_bytes = egress_block_bytes(message_type, tuple(blocks), sizes, len(payload), ring_bits=ring_bits)
    if block_bytes is not None:
        details["block_bytes"] = block_bytes
    return details


def _record_error(log: audit.AuditLog, round_id: int | None, exc: BaseException) -> None:
    """Best effort: an ``error`` record for ``exc`` (never hides the original error)."""
    try:
        log.append(audit.ERROR, round_id=round_id, policy_sha256=None,
                   details={"message": str(exc)[:1000] or type(exc).__name__, "error_type": type(exc).__name__})
    except Exception:  # noqa: BLE001 - the original error is what the caller must see
        logger.exception("could not record an error in the audit log")


def _record_secagg_outcome(log: audit.AuditLog, policy_sha256: str, round_id: int, *, error: str | None) -> None:
    """Write, once per round, a ``secagg_stage_completed`` record for each stage this site
    sent its message for (read back from its verified egress records) and, if the round
    stopped it, ``secagg_aborted`` with the reason: the records the embedded runtime writes
    (:meth:`blossom_secure.site.agent.SiteAgent.record_secagg_outcome`)."""
    _, records = log.verified_records(events=(audit.EGRESS, audit.SECAGG_STAGE_COMPLETED, audit.SECAGG_ABORTED))
    mine = [r for r in records if r["round_id"] == round_id]
    if any(r["event"] != audit.EGRESS for r in mine):
        return
    sent = [r["details"]["message_type"].removeprefix("secagg.") for r in mine
            if r["details"]["message_type"].startswith("secagg.")]
    for stage in dict.fromkeys(sent):
        log.append(audit.SECAGG_STAGE_COMPLETED, round_id=round_id, details={"stage": stage},
                   policy_sha256=policy_sha256)
    if error is not None:
        head = error.split(":", 1)[0].strip()
        log.append(audit.SECAGG_ABORTED, round_id=round_id, policy_sha256=policy_sha256,
                   details={"stage": head if head in STAGE_NAMES else "unknown", "reason": error[:2000]})


def _next_stage(log: audit.AuditLog, round_id: int) -> str:
    """The secure-aggregation stage after the last one this site sent a message for."""
    _, records = log.verified_records(events=(audit.EGRESS,))
    sent = [r["details"]["message_type"].removeprefix("secagg.") for r in records
            if r["round_id"] == round_id and r["details"]["message_type"].startswith("secagg.")]
    if not sent or sent[-1] not in STAGE_NAMES:
        return STAGE_NAMES[0]
    index = STAGE_NAMES.index(sent[-1]) + 1
    return STAGE_NAMES[index] if index < len(STAGE_NAMES) else "unknown"


# ----------------------------------------------------------------------------- the context


class SiteContext:
    """What a step needs besides the site's data: its files, key, roster, terms and audit log.

    Open it with :meth:`open` (a context manager: closing releases the audit log's lock).
    It never loads the site's data, its privacy ledger or torch: the secure-aggregation
    stages and the identity step need none of them (the round's privacy spend was
    reserved and recorded before the site joined; nothing after that spends any).

    Attributes:
        files: Where the site's files are.
        federation: The federation file.
        config: The site file (with its policy).
        identity_key: The site's Ed25519 identity key.
        roster: Site id to raw Ed25519 public key (the roster file).
        params: The secure-aggregation parameters (federation file and roster size).
        federation_sha256: The SHA-256 of the federation file (32 bytes).
        log: The site's audit log, open for appending.

    Notes:
        Every term the site relies on for its privacy (roster, thresholds, public groups,
        layout) comes from its own files here, never from a request, and the roster must
        hold this site's own key. Opening the audit log verifies it whole, so a step never
        appends to a log that was tampered with.
    """

    def __init__(self, *, files: SiteFiles, federation: FederationConfig, config: SiteConfig,
                 identity_key: IdentityKey, roster: Mapping[str, bytes], params: SecAggParams,
                 federation_digest: bytes, log: audit.AuditLog) -> None:
        self.files = files
        self.federation = federation
        self.config = config
        self.identity_key = identity_key
        self.roster = roster
        self.params = params
        self.federation_sha256 = federation_digest
        self.log = log

    @classmethod
    def open(cls, files: SiteFiles, *, federation: FederationConfig | None = None) -> SiteContext:
        """Open the site's files (no data) and its audit log.

        Raises:
            PolicyError: the site, policy, federation or roster file is invalid, the
                roster does not hold this site's key, or the federation's parameters are
                unusable.
            KeyFileError: no usable identity key (``blossom-site init`` creates it).
            AuditIntegrityError: the audit log does not verify.
            RuntimeError: the audit log is open elsewhere.
        """
        federation = files.federation() if federation is None else federation
        config = load_site(files.site_dir, federation=federation)
        key = load_identity_key(config.keys_dir)
        roster = _site_roster(files, federation, config, identity_public_key(key))
        params, digest = _terms(federation, roster)
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = audit.AuditLog.open(config.state_dir / AUDIT_FILE, site_id=config.id, signing_key=key)
        try:
            context = cls(files=files, federation=federation, config=config, identity_key=key, roster=roster,
                          params=params, federation_digest=digest, log=log)
            context._note_policy()
        except BaseException:
            log.close()
            raise
        return context

    def __enter__(self) -> SiteContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the audit log."""
        self.log.close()

    @property
    def site_id(self) -> str:
        return self.config.id

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    def record_egress(self, round_id: int | None, message_type: str, blocks: tuple[str, ...],
                      sizes: Mapping[str, int], payload: bytes) -> None:
        """Write the ``egress`` record of ``payload`` durably (before it is returned).

        Raises:
            OSError, RuntimeError, AuditIntegrityError: it could not be made durable (the
                payload must then not be sent).
        """
        self.log.append(audit.EGRESS, round_id=round_id, policy_sha256=self.config.policy.sha256,
                        details=_egress_details(message_type, blocks, sizes, payload,
                                                ring_bits=self.federation.aggregation.ring_bits))

    def refused(self, round_id: int | None, exc: ProtocolError) -> ProtocolError:
        """Record a refused request in the audit log (best effort); return ``exc`` to raise."""
        _record_error(self.log, round_id, exc)
        return exc

    def check_recipient(self, request: wire.Request) -> None:
        """Refuse (and record) a request addressed to another site.

        Raises:
            WrongRecipientError: it is.
        """
        try:
            wire.check_recipient(request, self.site_id)
        except ProtocolError as exc:
            raise self.refused(request.round_id, exc) from None

    def last_round_answered(self) -> int | None:
        """The last round the verified audit log shows this site joined or declined."""
        _, records = self.log.verified_records(events=ANSWER_EVENTS)
        return last_round_answered(records)

    def _note_policy(self) -> None:
        """Start an empty log as ``blossom-site init`` does; record the policy in force if
        it is not the one the log last recorded."""
        policy = self.config.policy
        details = {"policy_sha256": policy.sha256, "policy_file": policy.path.name,
                   "shareable": sorted(b for b in self.config.blocks if policy.is_shareable(b))}
        if self.log.last_seq is None:
            self.log.append(audit.SITE_INITIALISED, round_id=None, policy_sha256=None,
                            details={"key_fingerprint": key_fingerprint(identity_public_key(self.identity_key))})
            self.log.append(audit.POLICY_LOADED, round_id=None, policy_sha256=policy.sha256, details=details)
            return
        _, records = self.log.verified_records(events=(audit.POLICY_LOADED,))
        if not records or records[-1]["details"]["policy_sha256"] != policy.sha256:
            self.log.append(audit.POLICY_LOADED, round_id=None, policy_sha256=policy.sha256, details=details)

    def close_rounds_before(self, round_id: int) -> None:
        """Close every earlier round still on disk: record the outcome of one this site
        contributed to and never heard the end of, and delete its state, update and record.

        Notes:
            A round's secrets (the stage machine's state) and its raw update never outlive
            the next round's announcement, even when the coordinator stopped talking.
        """
        state_dir = self.state_dir
        rounds: set[int] = set()
        for path in state_dir.iterdir():
            for pattern in (_RECORD_RE, _UPDATE_RE, _STATE_RE):
                match = pattern.fullmatch(path.name)
                if match and int(match.group(1)) < round_id:
                    rounds.add(int(match.group(1)))
        for old in sorted(rounds):
            try:
                record = _load_record(state_dir, old)
            except SiteStateError as exc:
                logger.warning("round %d: %s; discarding it", old, exc)
                record = None
            if record is not None and record.contributing and record.finish_request_sha256 is None:
                error = record.secagg_error or (
                    f"{_next_stage(self.log, old)}: abandoned: no request of round {old} came before round "
                    f"{round_id} was announced")
                _record_secagg_outcome(self.log, self.config.policy.sha256, old, error=error)
            discard_round_state(state_dir, old)
            _discard(_update_path(state_dir, old))
            _discard(_record_path(state_dir, old))


def _site_roster(files: SiteFiles, federation: FederationConfig, config: SiteConfig,
                 public_key: bytes) -> Mapping[str, bytes]:
    roster = load_roster(roster_path(federation, files.roster_file), federation=federation)
    if roster.get(config.id) != public_key:
        where = str(roster_path(federation, files.roster_file))
        raise PolicyError([Problem(where, f"roster.sites.{config.id}",
                                   "does not hold this site's identity key (add it, out of band)")])
    return roster


def _terms(federation: FederationConfig, roster: Mapping[str, bytes]) -> tuple[SecAggParams, bytes]:
    try:
        return secagg_params(federation, roster_size=len(roster)), federation_sha256(federation)
    except ValueError as exc:
        raise PolicyError([Problem(str(federation.path), "aggregation", str(exc))]) from None


@contextlib.contextmanager
def _step_lock(state_dir: Path, *, timeout_s: float) -> Iterator[None]:
    """Hold the site's step lock: one step at a time touches its state folder."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
        if fcntl is not None:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SiteBusyError(f"another step held {state_dir} for over {timeout_s:g} s") from None
                    time.sleep(0.05)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- the steps


def handle_request(files: SiteFiles, untrusted_request: bytes, *, seed: int | None = None,
                   lock_timeout_s: float = 300.0) -> bytes:
    """Answer one coordinator request; return the reply's bytes.

    Args:
        files: Where the site's files are.
        untrusted_request: The request as received.
        seed: **Simulation only**, from the site's own configuration (never from the
            coordinator): seeds DP noise on a site with synthetic data, as
            :class:`~blossom_secure.site.agent.SiteAgent` explains. ``None`` in a
            deployment.
        lock_timeout_s: How long to wait for another step of this site to finish.

    Returns:
        The signed reply, already written to the audit log.

    Raises:
        MessageTooLargeError, MalformedMessageError, UnsupportedVersionError,
        UnknownFieldError: the request is not a well-formed envelope within the limit.
        WrongFederationError, WrongRecipientError: another federation, file or site.
        StaleRoundError: an announcement of a round not after the last one answered.
        ReplayedMessageError, StageOrderError, ProtocolError: the request does not fit
            the round in progress (the stage machine's refusals included).
        PolicyChangedError: the policy changed during the round.
        PolicyError, KeyFileError, DataError, LedgerError, AuditIntegrityError,
        SiteStateError: the site's own files are unusable.
        SiteBusyError: another step held the state folder too long.

    Notes:
        A step that raises has sent nothing. A secure-aggregation stage that fails stops
        this site's part in the round (as a dropout would), and the failure is recorded
        in the audit log with the stages completed.
    """
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError("seed must be an int or None")
    federation = files.federation()
    request = wire.decode_request(untrusted_request, federation_id=federation.id,
                                  federation_sha256=federation_sha256(federation), max_bytes=MAX_REQUEST_BYTES)
    config = load_site(files.site_dir, federation=federation)
    with _step_lock(config.state_dir, timeout_s=lock_timeout_s):
        if request.stage == "identify":
            return _identify(files, federation, request, untrusted_request)
        if request.stage == "offer":
            return _offer(files, federation, request, untrusted_request, seed=seed)
        if request.stage == "finish":
            return _finish(files, federation, request, untrusted_request, seed=seed)
        return _secagg(files, federation, request, untrusted_request)


def _identify(files: SiteFiles, federation: FederationConfig, request: wire.Request, untrusted: bytes) -> bytes:
    with SiteContext.open(files, federation=federation) as ctx:
        reply = wire.encode_reply(request=request, untrusted_request=untrusted, site_id=ctx.site_id,
                                  identity_key=ctx.identity_key)
        ctx.record_egress(None, "identify", (), {}, reply)
        return reply


def _offer(files: SiteFiles, federation: FederationConfig, request: wire.Request, untrusted: bytes, *,
           seed: int | None) -> bytes:
    request_sha256 = hashlib.sha256(untrusted).hexdigest()
    r = request.round_id
    with SiteContext.open(files, federation=federation) as ctx:
        ctx.check_recipient(request)
        record = _load_record(ctx.state_dir, r)
        if record is not None:
            if record.offer_request_sha256 != request_sha256:
                raise ctx.refused(r, ReplayedMessageError(f"offer: round {r} was already announced, with another "
                                                          "request"))
            ctx.record_egress(r, record.offer_message_type, record.offer_blocks, record.block_sizes,
                              record.offer_reply)
            return record.offer_reply
        _, answered = ctx.log.verified_records(events=ANSWER_EVENTS)
        try:
            check_round_is_new(answered, r)
        except StaleRoundError as exc:
            raise ctx.refused(r, exc) from None
        ctx.close_rounds_before(r)
        roster, params, digest = ctx.roster, ctx.params, ctx.federation_sha256
    sizes = layout_block_sizes(federation)
    from blossom_secure.site.agent import SiteAgent

    agent = SiteAgent(files.site_dir, federation, seed=seed)
    try:
        try:
            return _offer_with_agent(agent, request, untrusted, request_sha256, roster=roster, params=params,
                                     digest=digest, sizes=sizes, coordinator=files.coordinator)
        except Exception as exc:
            _record_error(agent.audit, r, exc)
            raise
    finally:
        agent.audit.close()


def _offer_with_agent(agent, request: wire.Request, untrusted: bytes, request_sha256: str, *,
                      roster: Mapping[str, bytes], params: SecAggParams, digest: bytes,
                      sizes: Mapping[str, int], coordinator: str | None) -> bytes:
    r = request.round_id
    state_dir = agent.config.state_dir
    global_blocks = wire.decode_blocks(request.blocks, request.body, expected_sizes=sizes)
    offer = agent.offer(round_id=r, global_blocks=global_blocks, secure=True, coordinator=coordinator)
    agent.save_blocks()  # the trained private blocks, for the finish step's process
    advert = b""
    blocks: tuple[str, ...] = ()
    error = None
    contributing = False
    c = offer.contribution
    if c is not None and len(c.egress):
        contribution = SiteContribution(blocks=dict(c.egress), weight=c.weight, min_contributors=c.min_contributors)
        try:
            machine = SiteStageMachine(site_id=agent.id, federation_id=agent.federation.id, federation_sha256=digest,
                                       round_id=r, roster=roster, identity_key=agent.identity_key,
                                       block_sizes=sizes, params=params, contribution=contribution)
        except ValueError as exc:  # e.g. outside a block's public group: nothing is sent
            error = f"advertise_keys: {exc}; nothing sent"
        else:
            advert = machine.advertise_keys()
            blocks = machine.last_message_blocks
            contributing = True
            save_arrays_npz(_update_path(state_dir, r), {b: v for b, v in contribution.blocks.items()})
            save_round_state(state_dir, r, machine.export_state())
    joined = offer.declined is None
    reply = wire.encode_reply(request=request, untrusted_request=untrusted, site_id=agent.id,
                              identity_key=agent.identity_key, body=advert, joined=joined)
    message_type = "secagg.advertise_keys" if contributing else "offer"
    epsilon = offer.epsilon_total if math.isfinite(offer.epsilon_total) else None
    record = _RoundRecord(
        round_id=r, federation_sha256=digest.hex(), policy_sha256=agent.policy.sha256,
        offer_request_sha256=request_sha256, offer_reply=reply, offer_message_type=message_type, offer_blocks=blocks,
        joined=joined, declined=offer.declined, declined_kind=offer.declined_kind, epsilon_total=epsilon,
        epsilon_nominal=offer.epsilon_nominal, contributing=contributing, block_sizes=dict(sizes),
        weight=c.weight if c is not None else None, min_contributors=c.min_contributors if c is not None else None,
        secagg_error=error)
    _save_record(state_dir, record)
    agent.audit.append(audit.EGRESS, round_id=r, policy_sha256=agent.policy.sha256,
                       details=_egress_details(message_type, blocks, sizes, reply,
                                               ring_bits=agent.federation.aggregation.ring_bits))
    if error is not None:
        logger.warning("site %s takes no part in the secure aggregation of round %d: %s", agent.id, r, error)
        _record_secagg_outcome(agent.audit, agent.policy.sha256, r, error=error)
    return reply


def _secagg(files: SiteFiles, federation: FederationConfig, request: wire.Request, untrusted: bytes) -> bytes:
    stage, r = request.stage, request.round_id
    with SiteContext.open(files, federation=federation) as ctx:
        ctx.check_recipient(request)
        record = _load_record(ctx.state_dir, r)
        if record is None or not record.contributing:
            raise ctx.refused(r, StageOrderError(f"{stage}: this site has no secure aggregation of round {r} in "
                                                 "progress"))
        if record.finish_request_sha256 is not None:
            raise ctx.refused(r, StageOrderError(f"{stage}: round {r} is finished"))
        if record.secagg_error is not None:
            raise ctx.refused(r, StageOrderError(f"{stage}: this site stopped round {r} ({record.secagg_error})"))
        try:
            reply, blocks = _answer(ctx, record, request, untrusted)
            ctx.record_egress(r, f"secagg.{stage}", blocks, record.block_sizes, reply)
        except Exception as exc:
            reason = f"{stage}: {type(exc).__name__}: {exc}"
            logger.warning("site %s stops round %d: %s", ctx.site_id, r, reason)
            try:
                _save_record(ctx.state_dir, replace(record, secagg_error=reason[:2000]))
                _record_secagg_outcome(ctx.log, ctx.config.policy.sha256, r, error=reason)
            except Exception:  # noqa: BLE001 - the original error is what the caller must see
                logger.exception("site %s could not record the end of round %d", ctx.site_id, r)
            raise
        return reply


def _answer(ctx: SiteContext, record: _RoundRecord, request: wire.Request,
            untrusted: bytes) -> tuple[bytes, tuple[str, ...]]:
    """Restore the stage machine, answer (or send the same answer again), save, sign."""
    stage, r = request.stage, request.round_id
    if record.policy_sha256 != ctx.config.policy.sha256:
        raise PolicyChangedError(f"the policy changed since round {r} was joined; the update was cleared under "
                                 "the one in force then")
    state = load_round_state(ctx.state_dir, r)
    if state is None:
        raise SiteStateError(f"the secure-aggregation state of round {r} is missing")
    update = _update_path(ctx.state_dir, r)
    contribution = None
    if update.exists():
        contribution = SiteContribution(blocks=load_arrays_npz(update), weight=record.weight,
                                        min_contributors=record.min_contributors)
    machine = SiteStageMachine.from_state(
        state, site_id=ctx.site_id, federation_id=ctx.federation.id, federation_sha256=ctx.federation_sha256,
        round_id=r, roster=ctx.roster, identity_key=ctx.identity_key, block_sizes=record.block_sizes,
        params=ctx.params, contribution=contribution)
    if machine.stage == stage:
        message = machine.resend(request.body)  # the same bytes again, or a refusal; never a new answer
    else:
        message = _METHODS[stage](machine, request.body)
        save_round_state(ctx.state_dir, r, machine.export_state())  # before the message leaves
        if stage == "consistency":
            _discard(update)  # the masked input can no longer be asked for: the raw update goes
    reply = wire.encode_reply(request=request, untrusted_request=untrusted, site_id=ctx.site_id,
                              identity_key=ctx.identity_key, body=message)
    return reply, machine.last_message_blocks


def _finish(files: SiteFiles, federation: FederationConfig, request: wire.Request, untrusted: bytes, *,
            seed: int | None) -> bytes:
    request_sha256 = hashlib.sha256(untrusted).hexdigest()
    r = request.round_id
    with SiteContext.open(files, federation=federation) as ctx:
        ctx.check_recipient(request)
        record = _load_record(ctx.state_dir, r)
        if record is None:
            raise ctx.refused(r, StageOrderError(f"finish: this site did not answer the announcement of round {r}"))
        if record.finish_request_sha256 is not None:
            if record.finish_request_sha256 != request_sha256 or record.finish_reply is None:
                raise ctx.refused(r, ReplayedMessageError(f"finish: round {r} was already finished, with another "
                                                          "request"))
            ctx.record_egress(r, record.finish_message_type or "round_finished", (), {}, record.finish_reply)
            return record.finish_reply
        if record.contributing:
            _record_secagg_outcome(ctx.log, ctx.config.policy.sha256, r, error=record.secagg_error)
    from blossom_secure.site.agent import SiteAgent

    agent = SiteAgent(files.site_dir, federation, seed=seed)
    try:
        try:
            return _finish_with_agent(agent, record, request, untrusted, request_sha256)
        except Exception as exc:
            _record_error(agent.audit, r, exc)
            raise
    finally:
        agent.audit.close()


def _finish_with_agent(agent, record: _RoundRecord, request: wire.Request, untrusted: bytes,
                       request_sha256: str) -> bytes:
    from blossom_secure.site.egress import select_report

    r = request.round_id
    state_dir = agent.config.state_dir
    global_blocks = wire.decode_blocks(request.blocks, request.body, expected_sizes=record.block_sizes)
    outcomes = {e.block: BlockOutcome(block=e.block, contributors=e.contributors, mean_update=None, weight_sum=0,
                                      failure=e.failure) for e in request.outcomes}
    metrics = agent.finish_round(round_id=r, outcomes=outcomes, global_blocks=global_blocks)
    # As SiteAgent.round_report, but the audit log records the reply envelope that carries
    # the report (the exact bytes that leave), not the report alone.
    report = select_report(
        agent.policy, site_id=agent.id, round_id=r, declined=record.declined_kind if record.declined else None,
        tasks=metrics, majority_class_rate={t: agent.chance_accuracy(t) for t in metrics},
        epsilon_total=record.epsilon_total, epsilon_nominal=record.epsilon_nominal)
    reply = wire.encode_reply(request=request, untrusted_request=untrusted, site_id=agent.id,
                              identity_key=agent.identity_key, body=report.payload if report is not None else b"")
    message_type = "report" if report is not None else "round_finished"
    _save_record(state_dir, replace(record, finish_request_sha256=request_sha256, finish_reply=reply,
                                    finish_message_type=message_type))
    agent.audit.append(audit.EGRESS, round_id=r, policy_sha256=agent.policy.sha256,
                       details=_egress_details(message_type, (), {}, reply))
    discard_round_state(state_dir, r)
    _discard(_update_path(state_dir, r))
    return reply
