"""Reviewing a site's audit log: what left the site, per round and per block, and the
privacy budget over time, as terminal tables and as one self-contained HTML page.

:func:`summarise` turns records into a :class:`Review`; :func:`review_table` renders it
as ``rich`` tables; :func:`write_html` writes a single HTML file with inline CSS and plots
embedded as base64 PNG (matplotlib, Agg canvas), with no scripts and nothing fetched from
the network.

The records should come from :func:`blossom_secure.audit.read_verified_records`:
:func:`summarise` checks that each record is well-formed, but it cannot check signatures
or the chain. The page states what was verified, with which key and when
(:class:`Verification`), or, without one, that nothing was.

Round numbers: a round's number is unique over the life of a federation (the
coordinator's counter; sites refuse a number they already answered), so a review has one
row per round. A log written before that held the same number for rounds of different
runs; each answer is then its own row (:attr:`RoundReview.occurrence`), never merged, and
the totals come from the last ``training_finished`` record in log order.

Every string taken from the log is data: it is escaped for HTML (``html.escape``), passed to
``rich`` as :class:`rich.text.Text` (never as markup), and control or invisible formatting
characters (terminal escapes, bidirectional overrides) are shown as ``\\uXXXX`` rather than
passed through, so that a crafted ``reason`` cannot run script, restyle the terminal, or
make one block name look like another.

Bytes per block: an egress record carries the size of the whole payload. When the record
has ``block_bytes`` those figures are used; when it names exactly one block the whole
payload is counted for that block; a message naming no block (key advertisements, shares)
is counted as protocol bytes; otherwise the payload is split between its blocks in
proportion to their element counts (from ``shapes``) and the figure is marked as estimated
(``~``). The site agent records ``block_bytes`` on every egress record (zero for messages
that carry keys, shares or signatures), so protocol bytes are never counted as model bytes.

Example:
    >>> _, records = read_verified_records(log_path, public_key=pk)   # doctest: +SKIP
    >>> review = summarise(records)                                   # doctest: +SKIP
    >>> for table in review_table(review, round_id=3):                # doctest: +SKIP
    ...     console.print(table)
    >>> write_html(review, Path("review.html"), site_id="st-mary",
    ...            epsilon_budget=8.0)                                # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from rich.table import Table
from rich.text import Text

from blossom_secure._fs import atomic_write
from blossom_secure.audit.log import (
    EGRESS,
    ERROR,
    LEDGER_REBUILT,
    POLICY_LOADED,
    ROUND_DECLINED,
    ROUND_JOINED,
    SECAGG_ABORTED,
    SECAGG_STAGE_COMPLETED,
    SITE_INITIALISED,
    TRAINING_FINISHED,
    Verification,
    _record_problems,
)
from blossom_secure.blocks import is_head
from blossom_secure.errors import AuditIntegrityError

__all__ = [
    "PROTOCOL_BYTES",
    "BlockTotal",
    "EgressMessage",
    "Incident",
    "LedgerRound",
    "LedgerView",
    "Verification",
    "epsilon_summary",
    "bytes_figure",
    "epsilon_figure",
    "ledger_only_rounds",
    "participation_figure",
    "PolicyInForce",
    "Review",
    "RoundReview",
    "Training",
    "review_table",
    "summarise",
    "write_html",
]

#: Name under which bytes that belong to no block (protocol messages) are counted.
PROTOCOL_BYTES = "(protocol)"


@dataclass(frozen=True)
class EgressMessage:
    """One message that left the site.

    Attributes:
        seq: The audit record's sequence number.
        time_utc: When it was recorded (just before it was sent).
        round_id: The round, or ``None``.
        message_type: The protocol message type.
        blocks: The blocks it carried.
        shapes: Block -> shape, for the blocks whose shape was recorded.
        payload_bytes: Size of the exact payload.
        payload_sha256: SHA-256 hex of the exact payload.
        recipient: Who it was addressed to, if recorded.
        block_bytes: Block -> bytes attributed to it (see the module documentation);
            the rest of ``payload_bytes`` is under :data:`PROTOCOL_BYTES`.
        estimated: Whether ``block_bytes`` was split by element count rather than recorded.
    """

    seq: int
    time_utc: str
    round_id: int | None
    message_type: str
    blocks: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    payload_bytes: int
    payload_sha256: str
    recipient: str | None
    block_bytes: Mapping[str, int]
    estimated: bool


@dataclass(frozen=True)
class Training:
    """Local DP training in one round (the last ``training_finished`` record of the round).

    Attributes:
        steps: Optimiser steps.
        epsilon_round: Epsilon spent in this round.
        epsilon_total: Epsilon spent in total after this round.
        delta: The delta of both epsilons.
        noise_multiplier: DP-SGD noise multiplier.
        sample_rate: Poisson sampling rate.
        nominal: The round was a seeded simulation: its noise follows from a public seed,
            so its epsilon is nominal, not a guarantee.
    """

    steps: int
    epsilon_round: float
    epsilon_total: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    nominal: bool = False


@dataclass(frozen=True)
class Incident:
    """An error, a secure-aggregation abort, or a rebuild of the privacy ledger.

    Attributes:
        seq: The audit record's sequence number.
        time_utc: When it was recorded.
        round_id: The round, or ``None``.
        kind: ``"error"``, ``"secagg_aborted"`` or ``"ledger_rebuilt"``.
        stage: The secure-aggregation stage, for an abort.
        text: The error message, abort reason, or what the ledger was rebuilt to.
    """

    seq: int
    time_utc: str
    round_id: int | None
    kind: str
    stage: str | None
    text: str


@dataclass(frozen=True)
class PolicyInForce:
    """A ``policy_loaded`` record.

    Attributes:
        seq: The audit record's sequence number.
        time_utc: When the policy was loaded.
        policy_sha256: SHA-256 hex of the policy file.
        shareable: Its shareable block names and patterns.
    """

    seq: int
    time_utc: str
    policy_sha256: str
    shareable: tuple[str, ...]


@dataclass(frozen=True)
class RoundReview:
    """What the site did in one round.

    Attributes:
        round_id: The round.
        joined: A ``round_joined`` record exists.
        declined: A ``round_declined`` record exists.
        decline_reasons: The reasons given for declining.
        training: The round's DP training, or ``None`` if none was recorded.
        egress: Messages that left the site in this round, in order.
        stages_completed: Secure-aggregation stages completed, in order.
        incidents: Errors and aborts in this round.
        policy_sha256s: Distinct policy hashes on the round's records, in order of
            appearance (more than one means the policy changed during the round).
        occurrence: 1 for a round number's first answer in the log; 2, 3, ... when the
            same number was answered again (a log written before round numbers were kept
            across runs: each answer is then its own row, never merged).
    """

    round_id: int
    joined: bool
    declined: bool
    decline_reasons: tuple[str, ...]
    training: Training | None
    egress: tuple[EgressMessage, ...]
    stages_completed: tuple[str, ...]
    incidents: tuple[Incident, ...]
    policy_sha256s: tuple[str, ...]
    occurrence: int = 1

    @property
    def label(self) -> str:
        """The round number, marked when the number was answered more than once."""
        return str(self.round_id) if self.occurrence == 1 else f"{self.round_id} (reused #{self.occurrence})"

    @property
    def status(self) -> str:
        """``"joined"``, ``"declined"``, ``"joined, aborted"`` (secure aggregation stopped),
        ``"joined, error"`` (an error or an interrupt was recorded), ``"joined and
        declined"`` or ``"no decision recorded"``."""
        if self.joined and self.declined:
            return "joined and declined"
        if self.declined:
            return "declined"
        if self.joined:
            if any(i.kind == SECAGG_ABORTED for i in self.incidents):
                return "joined, aborted"
            return "joined, error" if any(i.kind == ERROR for i in self.incidents) else "joined"
        return "no decision recorded"

    @property
    def payload_bytes(self) -> int:
        """Total bytes that left the site in this round."""
        return sum(m.payload_bytes for m in self.egress)

    @property
    def block_bytes(self) -> dict[str, int]:
        """Block (or :data:`PROTOCOL_BYTES`) -> bytes out in this round."""
        return _sum_block_bytes(self.egress)


@dataclass(frozen=True)
class BlockTotal:
    """Everything that left the site for one block (or :data:`PROTOCOL_BYTES`).

    Attributes:
        block: The block name.
        rounds: Rounds in which it left the site.
        messages: Messages that carried it.
        payload_bytes: Bytes attributed to it.
        estimated: Whether part of ``payload_bytes`` was split by element count.
    """

    block: str
    rounds: tuple[int, ...]
    messages: int
    payload_bytes: int
    estimated: bool


@dataclass(frozen=True)
class Review:
    """A summary of an audit log.

    Attributes:
        site_id: The site on the records (``None`` if there are none).
        records: Number of records summarised.
        first_time: Time of the first record, or ``None``.
        last_time: Time of the last record, or ``None``.
        key_fingerprints: Identity key fingerprints from ``site_initialised`` records.
        policies: Every policy loaded, in order.
        rounds: Per-round summaries, in round order (in log order where a round number
            was answered more than once).
        unrounded_egress: Messages that left outside any round.
        incidents: Every error, abort and ledger rebuild, in order.
        block_totals: Per-block totals over the whole log, by block name, with
            :data:`PROTOCOL_BYTES` last.
        last_training: The last ``training_finished`` record in log order (its
            ``epsilon_total`` is the spend the log proves), or ``None``.
    """

    site_id: str | None
    records: int
    first_time: str | None
    last_time: str | None
    key_fingerprints: tuple[str, ...]
    policies: tuple[PolicyInForce, ...]
    rounds: tuple[RoundReview, ...]
    unrounded_egress: tuple[EgressMessage, ...]
    incidents: tuple[Incident, ...]
    block_totals: tuple[BlockTotal, ...]
    last_training: Training | None = None

    @property
    def payload_bytes(self) -> int:
        """Total bytes that left the site."""
        return sum(t.payload_bytes for t in self.block_totals)

    @property
    def heads_sent(self) -> tuple[EgressMessage, ...]:
        """Messages that carried a task head (``head.*``). Heads must never leave a site,
        so anything here is a policy violation to investigate."""
        everything = [m for r in self.rounds for m in r.egress] + list(self.unrounded_egress)
        return tuple(m for m in everything if any(is_head(b) for b in m.blocks))

    @property
    def nominal_rounds(self) -> int:
        """Rounds whose epsilon is nominal (seeded simulations)."""
        return sum(1 for r in self.rounds if r.training is not None and r.training.nominal)

    @property
    def epsilon_total(self) -> float | None:
        """Epsilon spent in total according to the last ``training_finished`` record in log
        order (the latest spend the log proves), or ``None``."""
        return None if self.last_training is None else self.last_training.epsilon_total

    def round(self, round_id: int) -> RoundReview:
        """The summary of ``round_id`` (its first answer, if the number was reused).

        Raises:
            ValueError: the log has no record for that round.
        """
        return self.rounds_numbered(round_id)[0]

    def rounds_numbered(self, round_id: int) -> tuple[RoundReview, ...]:
        """Every row of ``round_id``: one, or more in a log where the number was reused.

        Raises:
            ValueError: the log has no record for that round.
        """
        found = tuple(entry for entry in self.rounds if entry.round_id == round_id)
        if not found:
            raise ValueError(f"the audit log has no record for round {round_id}")
        return found


@dataclass(frozen=True)
class LedgerRound:
    """One entry of the site's privacy ledger, as a review shows it.

    Attributes:
        round_id: The round the spend was reserved for.
        epsilon_total: The site's total after this round, for the policy's delta and
            accountant (the number ``blossom-site budget`` shows).
        nominal: The round was a seeded simulation (its epsilon is nominal).
    """

    round_id: int
    epsilon_total: float
    nominal: bool = False


@dataclass(frozen=True)
class LedgerView:
    """The site's privacy ledger, reconciled with the verified log it is shown beside.

    Attributes:
        path: The ledger file.
        rounds: Its entries, in order.
        epsilon_spent: Its total (the number ``blossom-site budget`` shows).
    """

    path: str
    rounds: tuple[LedgerRound, ...]
    epsilon_spent: float


def ledger_only_rounds(review: Review, ledger: LedgerView) -> tuple[LedgerRound, ...]:
    """The ledger entries that the log shows no training for: rounds reserved before
    training and never finished (interrupted or failed). They stay counted (a crash can
    only over-count); a review shows them beside the log's rounds."""
    trained: dict[int, int] = {}
    for entry in review.rounds:
        if entry.training is not None:
            trained[entry.round_id] = trained.get(entry.round_id, 0) + 1
    out = []
    for item in ledger.rounds:
        if trained.get(item.round_id, 0) > 0:
            trained[item.round_id] -= 1
        else:
            out.append(item)
    return tuple(out)


# --------------------------------------------------------------------------------------
# Summarising
# --------------------------------------------------------------------------------------


def _elements(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _attribute_bytes(
    payload_bytes: int,
    blocks: tuple[str, ...],
    shapes: Mapping[str, tuple[int, ...]],
    recorded: Mapping[str, int] | None,
) -> tuple[dict[str, int], bool]:
    """Split a message's bytes between its blocks and :data:`PROTOCOL_BYTES`."""
    if recorded is not None:
        out = {b: recorded.get(b, 0) for b in blocks}
        estimated = False
    elif len(blocks) == 1:
        out = {blocks[0]: payload_bytes}
        estimated = False
    elif not blocks:
        out = {}
        estimated = False
    else:
        weights = {b: _elements(shapes[b]) if b in shapes else 0 for b in blocks}
        total = sum(weights.values())
        if total == 0:
            weights = dict.fromkeys(blocks, 1)
            total = len(blocks)
        # Largest-remainder apportionment: integers that sum exactly to payload_bytes.
        exact = {b: payload_bytes * w / total for b, w in weights.items()}
        out = {b: math.floor(v) for b, v in exact.items()}
        left = payload_bytes - sum(out.values())
        for b in sorted(blocks, key=lambda b: (out[b] - exact[b], b))[:left]:
            out[b] += 1
        estimated = True
    rest = payload_bytes - sum(out.values())
    if rest:
        out[PROTOCOL_BYTES] = rest
    return out, estimated


def _sum_block_bytes(messages: Iterable[EgressMessage]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for message in messages:
        for block, count in message.block_bytes.items():
            totals[block] = totals.get(block, 0) + count
    return dict(sorted(totals.items(), key=lambda kv: (kv[0] == PROTOCOL_BYTES, kv[0])))


@dataclass
class _RoundBuilder:
    round_id: int
    occurrence: int = 1
    joined: bool = False
    declined: bool = False
    decline_reasons: list[str] = field(default_factory=list)
    training: Training | None = None
    egress: list[EgressMessage] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    incidents: list[Incident] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)


def summarise(records: Sequence[Mapping[str, Any]]) -> Review:
    """Summarise audit records per round and per block.

    Args:
        records: Records in log order, ideally from
            :func:`~blossom_secure.audit.read_verified_records`. Record ``i`` is taken to
            be on line ``i + 1`` when naming a bad one.

    Returns:
        The review.

    Raises:
        AuditIntegrityError: a record is malformed (missing or unknown fields, wrong
            types, invalid details) or names a different site than the first record.

    Notes:
        Structure is re-checked here so that a review of an unverified file cannot be fed
        values of unexpected types; signatures and the chain are not (no key is given), so
        a review is only as trustworthy as the verification that preceded it.
    """
    site_id: str | None = None
    fingerprints: list[str] = []
    policies: list[PolicyInForce] = []
    builders: list[_RoundBuilder] = []  # in order of first appearance
    current: dict[int, _RoundBuilder] = {}  # round id -> the row records of that round now go to
    unrounded: list[EgressMessage] = []
    incidents: list[Incident] = []
    last_training: Training | None = None
    for index, record in enumerate(records):
        problems = _record_problems(record)
        seq = record.get("seq") if isinstance(record, Mapping) else None
        if problems:
            raise AuditIntegrityError(
                line=index + 1, seq=seq if isinstance(seq, int) else None, reason="; ".join(problems)
            )
        if site_id is None:
            site_id = record["site_id"]
        elif record["site_id"] != site_id:
            raise AuditIntegrityError(
                line=index + 1, seq=seq, reason=f"site id {record['site_id']!r} differs from {site_id!r}"
            )
        event, details, round_id = record["event"], record["details"], record["round_id"]
        time_utc = record["time_utc"]
        builder = None
        if round_id is not None:
            builder = current.get(round_id)
            if builder is not None and event in (ROUND_JOINED, ROUND_DECLINED) and (builder.joined or builder.declined):
                # the number was answered before (a log from before round numbers were kept
                # across runs): a new row, so two rounds are never merged into one
                builder = None
                occurrence = current[round_id].occurrence + 1
            else:
                occurrence = 1
            if builder is None:
                builder = _RoundBuilder(round_id=round_id, occurrence=occurrence)
                builders.append(builder)
                current[round_id] = builder
            policy = record["policy_sha256"]
            if policy is not None and policy not in builder.policies:
                builder.policies.append(policy)
        if event == SITE_INITIALISED:
            fingerprints.append(details["key_fingerprint"])
        elif event == POLICY_LOADED:
            policies.append(PolicyInForce(seq, time_utc, details["policy_sha256"], tuple(details["shareable"])))
        elif event == ROUND_JOINED:
            builder.joined = True
        elif event == ROUND_DECLINED:
            builder.declined = True
            builder.decline_reasons.append(details["reason"])
        elif event == TRAINING_FINISHED:
            builder.training = last_training = Training(
                steps=details["steps"],
                epsilon_round=float(details["epsilon_round"]),
                epsilon_total=float(details["epsilon_total"]),
                delta=float(details["delta"]),
                noise_multiplier=float(details["noise_multiplier"]),
                sample_rate=float(details["sample_rate"]),
                nominal=bool(details.get("epsilon_is_nominal", False)),
            )
        elif event == EGRESS:
            blocks = tuple(details["blocks"])
            shapes = {b: tuple(s) for b, s in details["shapes"].items()}
            block_bytes, estimated = _attribute_bytes(
                details["payload_bytes"], blocks, shapes, details.get("block_bytes")
            )
            message = EgressMessage(
                seq=seq,
                time_utc=time_utc,
                round_id=round_id,
                message_type=details["message_type"],
                blocks=blocks,
                shapes=MappingProxyType(shapes),
                payload_bytes=details["payload_bytes"],
                payload_sha256=details["payload_sha256"],
                recipient=details.get("recipient"),
                block_bytes=MappingProxyType(block_bytes),
                estimated=estimated,
            )
            (builder.egress if builder is not None else unrounded).append(message)
        elif event == SECAGG_STAGE_COMPLETED:
            builder.stages.append(details["stage"])
        elif event in (SECAGG_ABORTED, ERROR, LEDGER_REBUILT):
            if event == LEDGER_REBUILT:
                text = (
                    f"privacy ledger rebuilt from this log: {details['rounds']} rounds "
                    f"({details['rounds_proven']} proven here, {details['rounds_kept']} kept as reserved), "
                    f"epsilon {_fmt_eps(float(details['epsilon_total']))} at delta {details['delta']:g}; "
                    f"previous ledger {details['previous_ledger']}"
                )
            else:
                text = details["reason"] if event == SECAGG_ABORTED else details["message"]
            incident = Incident(
                seq=seq,
                time_utc=time_utc,
                round_id=round_id,
                kind=event,
                stage=details.get("stage"),
                text=text,
            )
            incidents.append(incident)
            if builder is not None:
                builder.incidents.append(incident)
    round_reviews = tuple(
        RoundReview(
            round_id=b.round_id,
            occurrence=b.occurrence,
            joined=b.joined,
            declined=b.declined,
            decline_reasons=tuple(b.decline_reasons),
            training=b.training,
            egress=tuple(b.egress),
            stages_completed=tuple(b.stages),
            incidents=tuple(b.incidents),
            policy_sha256s=tuple(b.policies),
        )
        for b in (builders if any(b.occurrence > 1 for b in builders) else sorted(builders, key=lambda b: b.round_id))
    )
    all_egress = [m for r in round_reviews for m in r.egress] + unrounded
    return Review(
        site_id=site_id,
        records=len(records),
        first_time=records[0]["time_utc"] if records else None,
        last_time=records[-1]["time_utc"] if records else None,
        key_fingerprints=tuple(fingerprints),
        policies=tuple(policies),
        rounds=round_reviews,
        unrounded_egress=tuple(unrounded),
        incidents=tuple(incidents),
        block_totals=_block_totals(all_egress),
        last_training=last_training,
    )


def _block_totals(messages: Sequence[EgressMessage]) -> tuple[BlockTotal, ...]:
    rounds: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    estimated: dict[str, bool] = {}
    for message in messages:
        for block in message.block_bytes:
            if message.round_id is not None:
                rounds.setdefault(block, set()).add(message.round_id)
            counts[block] = counts.get(block, 0) + 1
            estimated[block] = estimated.get(block, False) or (message.estimated and block != PROTOCOL_BYTES)
    return tuple(
        BlockTotal(
            block=block,
            rounds=tuple(sorted(rounds.get(block, ()))),
            messages=counts[block],
            payload_bytes=total,
            estimated=estimated[block],
        )
        for block, total in _sum_block_bytes(messages).items()
    )


# --------------------------------------------------------------------------------------
# Text helpers (the log is data)
# --------------------------------------------------------------------------------------

_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _visible(value: object) -> str:
    """``str(value)`` with control and invisible formatting characters shown as escapes."""
    text = str(value)
    if all(unicodedata.category(c) not in _HIDDEN_CATEGORIES for c in text):
        return text
    return "".join(
        (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        if unicodedata.category(c) in _HIDDEN_CATEGORIES
        else c
        for c in text
    )


def _fmt_bytes(count: int) -> str:
    value, unit = float(count), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"


def _fmt_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _fmt_eps(value: float | None) -> str:
    """An epsilon as every surface shows it (budget, the demo table, review): 3 decimals."""
    return "-" if value is None else f"{value:.3f}"


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _egress_blocks_text(message: EgressMessage) -> str:
    if not message.blocks:
        return "(none)"
    parts = []
    for block in message.blocks:
        shape = message.shapes.get(block)
        parts.append(block + (" " + _fmt_shape(shape) if shape is not None else ""))
    return ", ".join(parts)


def _egress_bytes_text(message: EgressMessage) -> str:
    return _fmt_bytes(message.payload_bytes) + (" (~split)" if message.estimated else "")


@dataclass(frozen=True)
class _RoundLine:
    """One row of the rounds table, for the terminal and the HTML page alike."""

    round_id: int
    label: str
    status: str
    reasons: str
    epsilon_round: str
    epsilon_total: str
    delta: str
    steps: str
    stages: str
    messages: int
    payload_bytes: int
    policies: str


def _round_lines(review: Review, ledger: LedgerView | None, rounds: Sequence[RoundReview]) -> list[_RoundLine]:
    """The rounds table: one row per round answer in the log, and, with the ledger, the
    spend it holds for rounds the log shows no training for (reserved, never finished)."""
    reserved: dict[int, list[LedgerRound]] = {}
    if ledger is not None:
        for item in ledger_only_rounds(review, ledger):
            reserved.setdefault(item.round_id, []).append(item)
    shown = {r.round_id for r in rounds}
    lines = []
    for entry in rounds:
        t = entry.training
        reasons = list(entry.decline_reasons) + [
            f"{i.kind} at {i.stage}: {i.text}" if i.stage else f"{i.kind}: {i.text}" for i in entry.incidents
        ]
        total = _fmt_epsilon(t.epsilon_total if t else None, t)
        if t is None and entry.joined and reserved.get(entry.round_id):
            item = reserved[entry.round_id].pop(0)
            total = f"{_fmt_eps(item.epsilon_total)} (reserved in the ledger; no training record)"
        lines.append(_RoundLine(
            round_id=entry.round_id, label=entry.label, status=entry.status, reasons="; ".join(reasons) or "-",
            epsilon_round=_fmt_epsilon(t.epsilon_round if t else None, t), epsilon_total=total,
            delta=_fmt_number(t.delta if t else None), steps="-" if t is None else str(t.steps),
            stages=", ".join(entry.stages_completed) or "-", messages=len(entry.egress),
            payload_bytes=entry.payload_bytes, policies=", ".join(p[:12] for p in entry.policy_sha256s) or "-"))
    everything = len(rounds) == len(review.rounds)
    for round_id, items in reserved.items():
        if not everything and round_id not in shown:
            continue
        for item in items:
            lines.append(_RoundLine(
                round_id=round_id, label=str(round_id), status="reserved in the ledger only",
                reasons="the ledger holds a spend for this round that the audit log does not show (counted)",
                epsilon_round="-", epsilon_total=_fmt_eps(item.epsilon_total), delta="-", steps="-", stages="-",
                messages=0, payload_bytes=0, policies="-"))
    if any(r.occurrence > 1 for r in review.rounds):
        return lines  # a log with reused round numbers: in log order, as the spend grew
    return sorted(lines, key=lambda line: line.round_id)


def epsilon_summary(review: Review, ledger: LedgerView | None, epsilon_budget: float | None) -> str:
    """Epsilon spent against the budget: the ledger's number (as ``budget`` shows it) when
    the ledger was read, and what the signed log proves."""
    budget = "" if epsilon_budget is None else f" of the budget {epsilon_budget:g}"
    logged = review.epsilon_total
    if ledger is None:
        return f"{_fmt_eps(logged)}{budget} (the signed audit log; the privacy ledger was not read)"
    text = f"{_fmt_eps(ledger.epsilon_spent)}{budget} (privacy ledger {ledger.path})"
    extra = ledger_only_rounds(review, ledger)
    rounds = ", ".join(str(e.round_id) for e in extra)
    if logged is not None and math.isclose(logged, ledger.epsilon_spent, rel_tol=1e-9, abs_tol=5e-4):
        if extra:
            return (text + f"; the signed audit log proves the same (its later totals include the spend reserved "
                    f"for round(s) {rounds}, whose training did not finish)")
        return text + "; the signed audit log proves the same"
    if extra:
        return (text + f"; the signed audit log proves {_fmt_eps(logged)}: the ledger also counts the spend "
                f"reserved for round(s) {rounds}, whose training did not finish (a crash or an interrupt only "
                "ever over-counts)")
    return text + f"; the signed audit log proves {_fmt_eps(logged)} (computed at the delta then in force)"


# --------------------------------------------------------------------------------------
# Terminal tables
# --------------------------------------------------------------------------------------


def _cell(value: object) -> Text:
    """A table cell that ``rich`` never parses as markup."""
    return Text(_visible(value))


def review_table(review: Review, *, round_id: int | None = None, ledger: LedgerView | None = None,
                 max_messages: int | None = None) -> list[Table]:
    """The review as ``rich`` tables: rounds, egress messages, and bytes per block.

    Args:
        review: From :func:`summarise`.
        round_id: Show only this round (its block totals included); ``None`` shows all.
        ledger: The site's privacy ledger, reconciled with the log; its spend for rounds
            the log shows no training for is shown with them. ``None``: not shown.
        max_messages: Show only the last this many egress messages (the title says how
            many there are; a terminal cannot usefully scroll through thousands);
            ``None``: all. Totals always cover every message.

    Returns:
        Three tables, in order: rounds (status, reason, epsilon, delta, bytes out), egress
        messages (blocks with shapes, bytes, full SHA-256 of each payload), and per-block
        totals.

    Raises:
        ValueError: ``round_id`` does not appear in the log.

    Notes:
        Every value from the log is passed as :class:`rich.text.Text` with control
        characters escaped, so that ``[bold]`` or terminal escape sequences in a reason
        are shown, not obeyed.
    """
    if round_id is None:
        rounds = review.rounds
        messages = [m for r in rounds for m in r.egress] + list(review.unrounded_egress)
        totals = review.block_totals
        scope = "all rounds"
    else:
        rounds = review.rounds_numbered(round_id)
        messages = [m for r in rounds for m in r.egress]
        totals = _block_totals(messages)
        scope = f"round {round_id}"

    rounds_table = Table(title=f"Rounds ({scope})")
    for name, justify in (
        ("Round", "right"),
        ("Status", "left"),
        ("Reason", "left"),
        ("Epsilon (round)", "right"),
        ("Epsilon (total)", "right"),
        ("Delta", "right"),
        ("Messages out", "right"),
        ("Bytes out", "right"),
    ):
        rounds_table.add_column(Text(name), justify=justify, overflow="fold")
    for line in _round_lines(review, ledger, rounds):
        rounds_table.add_row(
            _cell(line.label),
            _cell(line.status),
            _cell(line.reasons),
            _cell(line.epsilon_round),
            _cell(line.epsilon_total),
            _cell(line.delta),
            _cell(line.messages),
            _cell(_fmt_bytes(line.payload_bytes)),
        )

    shown = messages
    if max_messages is not None and len(messages) > max_messages:
        shown = messages[-max_messages:]
        egress_title = (f"Egress messages ({scope}: the last {max_messages} of {len(messages)}; --round R or --html "
                        "FILE shows every one)")
    else:
        egress_title = f"Egress messages ({scope})"
    egress_table = Table(title=egress_title)
    for name, justify in (
        ("Round", "right"),
        ("Seq", "right"),
        ("Time (UTC)", "left"),
        ("Message", "left"),
        ("Blocks [shape]", "left"),
        ("Bytes", "right"),
        ("Payload SHA-256", "left"),
    ):
        egress_table.add_column(Text(name), justify=justify, overflow="fold")
    for message in shown:
        egress_table.add_row(
            _cell("-" if message.round_id is None else message.round_id),
            _cell(message.seq),
            _cell(message.time_utc),
            _cell(message.message_type),
            _cell(_egress_blocks_text(message)),
            _cell(_egress_bytes_text(message)),
            _cell(message.payload_sha256),
        )

    blocks_table = Table(title=f"Bytes out per block ({scope})")
    for name, justify in (("Block", "left"), ("Rounds", "right"), ("Messages", "right"), ("Bytes out", "right")):
        blocks_table.add_column(Text(name), justify=justify, overflow="fold")
    for total in totals:
        blocks_table.add_row(
            _cell(total.block),
            _cell(len(total.rounds)),
            _cell(total.messages),
            _cell(("~" if total.estimated else "") + _fmt_bytes(total.payload_bytes)),
        )
    return [rounds_table, egress_table, blocks_table]


# --------------------------------------------------------------------------------------
# HTML report
# --------------------------------------------------------------------------------------

#: Above this many rounds the plots draw areas and lines instead of one bar per round.
_MANY_ROUNDS = 60

_JOINED_COLOUR = "#2e7d32"
_DECLINED_COLOUR = "#c62828"
_OTHER_COLOUR = "#f9a825"


def _participation(review: Review) -> tuple[int, int, int]:
    """``(joined, declined, other)`` rows of the review: the same counts in the summary and
    in the chart's legend."""
    declined = sum(1 for r in review.rounds if r.declined)
    joined = sum(1 for r in review.rounds if r.joined and not r.declined)
    return joined, declined, len(review.rounds) - joined - declined


def _legend_below(figure: Any, axes: Any, handles: Any = None, labels: Any = None) -> None:
    """The legend under the plot, outside the axes, so that it never covers a bar."""
    if handles is None:
        handles, labels = axes.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small",
                      frameon=False)


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _new_figure() -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(8, 3.6), layout="constrained")


def _no_data(axes: Any, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="#555555")
    axes.set_xticks([])
    axes.set_yticks([])


def epsilon_figure(review: Review, epsilon_budget: float | None) -> Any:
    """The epsilon plot (a matplotlib ``Figure``): per round, and in total against the budget."""
    figure = _new_figure()
    axes = figure.add_subplot()
    trained = [r for r in review.rounds if r.training is not None]
    if trained:
        position = {id(r): i for i, r in enumerate(review.rounds)}
        xs = [position[id(r)] for r in trained]
        if len(review.rounds) <= _MANY_ROUNDS:
            axes.bar(xs, [r.training.epsilon_round for r in trained], color="#90caf9", label="epsilon spent in round")
        else:
            axes.vlines(xs, 0, [r.training.epsilon_round for r in trained], colors="#90caf9",
                        label="epsilon spent in round")
        axes.plot(
            xs, [r.training.epsilon_total for r in trained], marker="o" if len(xs) <= _MANY_ROUNDS else None,
            color="#1565c0", label="epsilon spent in total"
        )
        axes.set_xlabel("round")
        axes.set_ylabel("epsilon")
        step = max(1, math.ceil(len(review.rounds) / 30))
        axes.set_xticks(list(range(len(review.rounds)))[::step], [r.label for r in review.rounds][::step])
    else:
        _no_data(axes, "no training recorded")
    if epsilon_budget is not None:
        axes.axhline(epsilon_budget, color=_DECLINED_COLOUR, linestyle="--", label=f"budget ({epsilon_budget:g})")
    if trained or epsilon_budget is not None:
        top = max([epsilon_budget or 0.0] + [r.training.epsilon_total for r in trained])
        axes.set_ylim(0, top * 1.1 if top > 0 else 1.0)
        _legend_below(figure, axes)
    axes.set_title("Privacy spent over rounds")
    return figure


def bytes_figure(review: Review) -> Any:
    """The bytes plot (a matplotlib ``Figure``): bytes out per block per round, protocol apart."""
    figure = _new_figure()
    axes = figure.add_subplot()
    rounds = list(review.rounds)
    blocks = [t.block for t in review.block_totals]
    if any(r.egress for r in rounds):
        largest = max(r.payload_bytes for r in rounds)
        scale, unit = next(
            ((s, u) for s, u in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")) if largest >= s), (1, "B")
        )
        positions = list(range(len(rounds)))
        bottoms = [0.0] * len(rounds)
        stacks, colours = [], []
        for index, block in enumerate(blocks):
            heights = [r.block_bytes.get(block, 0) / scale for r in rounds]
            colour = "#9e9e9e" if block == PROTOCOL_BYTES else f"C{index % 10}"
            if len(rounds) <= _MANY_ROUNDS:
                axes.bar(positions, heights, bottom=bottoms, label=block, color=colour)
            stacks.append(heights)
            colours.append(colour)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        if len(rounds) > _MANY_ROUNDS:  # one filled area per block: thousands of bars take seconds to draw
            axes.stackplot(positions, stacks, labels=blocks, colors=colours, step="mid")
        if len(rounds) <= 30:
            axes.set_xticks(positions, [r.label for r in rounds])
        else:
            step = math.ceil(len(rounds) / 30)
            axes.set_xticks(positions[::step], [r.label for r in rounds[::step]])
        axes.set_xlabel("round")
        axes.set_ylabel(f"bytes out ({unit})")
        _legend_below(figure, axes)
    else:
        _no_data(axes, "nothing left the site in any round")
    axes.set_title("Bytes out per block per round")
    return figure


def participation_figure(review: Review) -> Any:
    """The participation plot (a matplotlib ``Figure``): each round joined or declined."""
    from matplotlib.patches import Patch

    figure = _new_figure()
    axes = figure.add_subplot()
    if review.rounds:

        def colour(entry: RoundReview) -> str:
            if entry.declined:
                return _DECLINED_COLOUR
            return _JOINED_COLOUR if entry.joined else _OTHER_COLOUR

        positions = list(range(len(review.rounds)))
        if len(positions) <= _MANY_ROUNDS:
            axes.bar(positions, [1] * len(positions), color=[colour(r) for r in review.rounds], width=0.8)
        else:  # one line per round, drawn as a single collection
            axes.vlines(positions, 0, 1, colors=[colour(r) for r in review.rounds],
                        linewidth=max(0.5, 400 / len(positions)))
        joined, declined, other = _participation(review)
        handles = [
            Patch(color=_JOINED_COLOUR, label=f"joined ({joined})"),
            Patch(color=_DECLINED_COLOUR, label=f"declined ({declined})"),
        ]
        if other:
            handles.append(Patch(color=_OTHER_COLOUR, label=f"no decision recorded ({other})"))
        _legend_below(figure, axes, handles, [h.get_label() for h in handles])
        axes.set_ylim(0, 1.05)
        axes.set_yticks([])
        axes.set_xlabel("round")
        if len(positions) <= 30:
            axes.set_xticks(positions, [r.label for r in review.rounds])
        else:
            step = math.ceil(len(positions) / 30)
            axes.set_xticks(positions[::step], [r.label for r in review.rounds[::step]])
    else:
        _no_data(axes, "no rounds recorded")
    axes.set_title("Rounds joined and declined")
    return figure


def _h(value: object) -> str:
    """Escape a value from the log for HTML text or a quoted attribute."""
    return html.escape(_visible(value), quote=True)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_h(alt)}">'


def _html_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, numeric: Iterable[int] = ()) -> str:
    numeric = set(numeric)
    head = "".join(f"<th>{_h(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_h(c)}</td>' if i in numeric else f"<td>{_h(c)}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(headers)}" class="empty">none</td></tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 72rem; padding: 0 1rem; color: #212121; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; }
.note { background: #fff8e1; border-left: 4px solid #f9a825; padding: .5rem 1rem; }
.verified { background: #e8f5e9; border-left: 4px solid #2e7d32; padding: .5rem 1rem; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: .25rem 1rem; }
dl.summary dt { font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { border: 1px solid #e0e0e0; padding: .3rem .5rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td { overflow-wrap: anywhere; }
td.empty { color: #757575; font-style: italic; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0; }
"""


def write_html(review: Review, path: Path, *, site_id: str, epsilon_budget: float | None,
               ledger: LedgerView | None = None, verification: Verification | None = None) -> None:
    """Write the review as one self-contained HTML page (atomically).

    The page has three plots (epsilon over rounds against the budget, bytes out per block
    per round, rounds joined and declined), then tables of rounds, egress messages with
    payload digests, per-block totals, policies loaded, and errors and aborts.

    Args:
        review: From :func:`summarise`.
        path: Where to write the page; replaced atomically (temporary file, fsync, rename).
        site_id: The site the report is for (shown in the title).
        epsilon_budget: The policy's epsilon budget, drawn as a line; ``None`` if unknown.
        ledger: The site's privacy ledger, reconciled with the log: the summary then
            gives its total (as ``blossom-site budget`` does) beside what the log proves,
            and the rounds table its spend for rounds the log shows no training for.
        verification: What was verified before the review was built, with which key and
            when: stated at the top of the page. ``None``: the page says that it checked
            no signature.

    Raises:
        ValueError: ``site_id`` differs from the site on the records, or
            ``epsilon_budget`` is not a positive finite number.
        OSError: the page cannot be written.

    Notes:
        The page loads nothing: CSS is inline, plots are ``data:image/png;base64`` images,
        and there is no JavaScript; a Content-Security-Policy meta tag forbids scripts and
        remote loads as a second line of defence. Every string from the log is escaped
        with :func:`html.escape`, after control and bidirectional-override characters are
        made visible: the log is data, and a reviewer's browser must not run it.
    """
    if review.site_id is not None and review.site_id != site_id:
        raise ValueError(f"the records are for site {review.site_id!r}, not {site_id!r}")
    if epsilon_budget is not None:
        if isinstance(epsilon_budget, bool) or not isinstance(epsilon_budget, (int, float)):
            raise ValueError("epsilon_budget must be a number or None")
        if not math.isfinite(epsilon_budget) or epsilon_budget <= 0:
            raise ValueError("epsilon_budget must be a positive finite number")
    page = _render_html(review, site_id=site_id, epsilon_budget=epsilon_budget, ledger=ledger,
                        verification=verification)
    atomic_write(Path(path), page.encode("utf-8"))


def _fmt_epsilon(value: float | None, training: Training | None) -> str:
    """An epsilon, marked ``(nominal)`` when it comes from a seeded simulation."""
    text = _fmt_eps(value)
    return text + " (nominal)" if value is not None and training is not None and training.nominal else text


def _verification_text(verification: Verification | None) -> str:
    if verification is None:
        return ("NOT VERIFIED: this page summarises the audit records it was given and did not check their "
                "signatures, hash chain or checkpoint. Run blossom-site audit verify and rely on this page only if "
                "it passes.")
    span = "an empty log" if verification.last_seq is None else f"seq 0..{verification.last_seq}"
    if verification.pinned:
        pinned = " The key matched the fingerprint given out of band (--fingerprint)."
    elif verification.key_from == "roster":
        pinned = (" The key is the roster's entry for the site: compare this fingerprint with the one the site's "
                  "operator gave out of band when it joined (blossom-site init prints it).")
    elif verification.key_from == "key-file":
        pinned = (" The key is the site folder's own key file, which whoever could change the log could also "
                  "replace: for an independent check, verify with the roster's key or a key recorded out of band "
                  "(--roster or --public-key, with --fingerprint).")
    else:
        pinned = (" Compare this fingerprint with the one recorded out of band (the federation roster, or the one "
                  "the site's operator gave when it joined).")
    what = ("every record's Ed25519 signature, the hash chain and the signed checkpoint" if verification.every_signature
            else "the hash chain and the Ed25519-signed checkpoint that binds every record through it (and the own "
                 "signature of any record after the checkpoint)")
    return (f"VERIFIED at {verification.verified_at}: {what}, {verification.records} records ({span}, chain head "
            f"{verification.last_hash[:16]}...), with the public key {verification.key_fingerprint} from "
            f"{verification.key_source}." + pinned)


def _render_html(review: Review, *, site_id: str, epsilon_budget: float | None, ledger: LedgerView | None = None,
                 verification: Verification | None = None) -> str:
    generated = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    joined, declined, other = _participation(review)
    deltas = sorted({r.training.delta for r in review.rounds if r.training is not None})
    participation = f"{joined} / {declined}" + (f" ({other} with no decision recorded)" if other else "")
    protocol = sum(t.payload_bytes for t in review.block_totals if t.block == PROTOCOL_BYTES)
    summary = [
        ("Records", f"{review.records} ({review.first_time or '-'} to {review.last_time or '-'})"),
        ("Identity key fingerprint (recorded at init)", ", ".join(review.key_fingerprints) or "not recorded"),
        ("Rounds", f"{len(review.rounds)} answered"
         + (f"; {sum(r.occurrence > 1 for r in review.rounds)} round number(s) answered more than once (a log from "
            "before round numbers were kept across runs): each answer is its own row"
            if any(r.occurrence > 1 for r in review.rounds) else "")),
        ("Rounds joined / declined", participation),
        ("Bytes out", f"{_fmt_bytes(review.payload_bytes)} ({review.payload_bytes} bytes): "
                      f"{_fmt_bytes(review.payload_bytes - protocol)} of model blocks, "
                      f"{_fmt_bytes(protocol)} of protocol messages (keys, shares, signatures, reports)"),
        ("Epsilon spent", epsilon_summary(review, ledger, epsilon_budget)),
        (
            "DP noise",
            "from the OS CSPRNG in every round (each epsilon is a guarantee)" if not review.nominal_rounds else
            f"{review.nominal_rounds} round(s) were seeded simulations: their epsilon is NOMINAL "
            "(the noise follows from a public seed; not a privacy guarantee)",
        ),
        ("Delta", ", ".join(f"{d:g}" for d in deltas) or "-"),
        (
            "Task heads sent",
            ", ".join(f"seq {m.seq}: {', '.join(b for b in m.blocks if is_head(b))}" for m in review.heads_sent)
            or "none",
        ),
    ]
    summary_html = "".join(f"<dt>{_h(k)}</dt><dd>{_h(v)}</dd>" for k, v in summary)

    rounds_rows = [
        (line.label, line.status, line.reasons, line.epsilon_round, line.epsilon_total, line.delta, line.steps,
         line.stages, line.messages, line.payload_bytes, line.policies)
        for line in _round_lines(review, ledger, review.rounds)
    ]
    egress_rows = [
        (
            "-" if m.round_id is None else m.round_id,
            m.seq,
            m.time_utc,
            m.message_type,
            m.recipient or "-",
            _egress_blocks_text(m),
            f"{m.payload_bytes}" + (" (~split)" if m.estimated else ""),
            m.payload_sha256,
        )
        for m in [m for r in review.rounds for m in r.egress] + list(review.unrounded_egress)
    ]
    block_rows = [
        (
            t.block,
            ", ".join(str(r) for r in t.rounds) or "-",
            t.messages,
            ("~" if t.estimated else "") + str(t.payload_bytes),
        )
        for t in review.block_totals
    ]
    policy_rows = [(p.seq, p.time_utc, p.policy_sha256, ", ".join(p.shareable) or "(nothing)") for p in review.policies]
    incident_rows = [
        ("-" if i.round_id is None else i.round_id, i.seq, i.time_utc, i.kind, i.stage or "-", i.text)
        for i in review.incidents
    ]

    sections = [
        "<h2>Privacy spent over rounds</h2>",
        _img(_png(epsilon_figure(review, epsilon_budget)), "Epsilon spent per round and in total, against the budget"),
        "<h2>Bytes out per block per round</h2>",
        _img(_png(bytes_figure(review)), "Bytes that left the site per round, stacked by block"),
        "<h2>Rounds joined and declined</h2>",
        _img(_png(participation_figure(review)), "Rounds joined and declined"),
        "<h2>Rounds</h2>",
        _html_table(
            (
                "Round",
                "Status",
                "Reason declined, errors",
                "Epsilon (round)",
                "Epsilon (total)",
                "Delta",
                "Steps",
                "Secure-aggregation stages",
                "Messages out",
                "Bytes out",
                "Policy (SHA-256 prefix)",
            ),
            rounds_rows,
            numeric=(0, 3, 4, 5, 6, 8, 9),
        ),
        "<h2>Egress messages</h2>",
        _html_table(
            ("Round", "Seq", "Time (UTC)", "Message", "Recipient", "Blocks [shape]", "Bytes", "Payload SHA-256"),
            egress_rows,
            numeric=(0, 1, 6),
        ),
        "<h2>Bytes out per block</h2>",
        _html_table(("Block", "Rounds", "Messages", "Bytes out"), block_rows, numeric=(2, 3)),
        "<h2>Policies loaded</h2>",
        _html_table(("Seq", "Time (UTC)", "Policy SHA-256", "Shareable"), policy_rows, numeric=(0,)),
        "<h2>Errors, aborts and ledger rebuilds</h2>",
        _html_table(
            ("Round", "Seq", "Time (UTC)", "Kind", "Stage", "Message or reason"), incident_rows, numeric=(0, 1)
        ),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Audit review: {_h(site_id)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>Audit review: site <code>{_h(site_id)}</code></h1>\n"
        f'<p class="{"verified" if verification is not None else "note"}">{_h(_verification_text(verification))}</p>\n'
        f'<p>Generated {_h(generated)}. Bytes marked ~ were split between the blocks of one message by element '
        "count (records written before byte counts per block were recorded); every other figure is as recorded. "
        "Bytes that carry no block values (keys, shares, signatures, reports) are counted as "
        f"<code>{_h(PROTOCOL_BYTES)}</code>.</p>\n"
        f'<dl class="summary">{summary_html}</dl>\n' + "\n".join(sections) + "\n</body>\n</html>\n"
    )
