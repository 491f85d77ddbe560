"""The site's privacy ledger: every epsilon spent, durable before anything leaves.

The ledger keeps the DP-SGD history of the site, one entry per round trained, as
``(noise_multiplier, sample_rate, steps)``, the same triple Opacus accountants keep. The
total epsilon for the policy's delta is recomputed from the whole history with the
policy's Opacus accountant, so the ledger composes rounds correctly (RDP/PRV composition,
not a sum of per-round epsilons) and stays right if the policy's delta changes.

Ordering is what makes it safe:

1. :meth:`PrivacyLedger.reserve` computes the epsilon the site would have *after* the
   round; if that is over the budget it raises
   :class:`~blossom_secure.errors.PrivacyBudgetExceededError` and nothing changes;
2. otherwise it appends the entry and writes the ledger atomically (temporary file,
   fsync, rename, fsync of the folder) **before training starts**.

So the spend is on disk before any computation on patient data whose result could leave;
a crash at any later point (during training, between training and sending) can only
over-count a round that never released anything, never under-count one that did.

The file is JSON (never pickle) and small; a corrupt or foreign ledger is an error, not
a reason to start again from zero.

A deleted ledger, or one restored from an older copy, would also read as a smaller spend,
and nothing in the file itself can show it. The site's signed, hash-chained audit log can:
every trained round has a ``training_finished`` record with its DP-SGD terms. The site
agent therefore checks, at start-up and before every round, that the ledger holds every
round its verified audit log proves (:func:`load_reconciled_ledger`,
:func:`verify_ledger_covers`); a ledger behind the log is a :class:`LedgerError`. A ledger
ahead of the log (a round reserved, then a crash before its ``training_finished`` record)
over-counts and is accepted. :func:`rebuild_ledger` is the recovery
(``blossom-site ledger rebuild``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from blossom_secure._fs import atomic_write, fsync_dir
from blossom_secure.audit.log import ROUND_JOINED, TRAINING_FINISHED
from blossom_secure.errors import InputError, PrivacyBudgetExceededError, Problem
from blossom_secure.site.policy import ACCOUNTANTS, PrivacyTerms

__all__ = [
    "LedgerEntry",
    "LedgerError",
    "LedgerRebuild",
    "PrivacyLedger",
    "ProvenRound",
    "compute_epsilon",
    "load_reconciled_ledger",
    "noise_for_target",
    "proven_rounds",
    "rebuild_ledger",
    "verify_ledger_covers",
]

LEDGER_VERSION = 1
_MAX_LEDGER_BYTES = 16 << 20


class LedgerError(InputError):
    """The ledger file is unreadable, corrupt, or belongs to another site."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round's DP-SGD spend."""

    round_id: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_total: float
    time_utc: str
    #: ``os-csprng`` (noise secret: epsilon is a guarantee) or ``seeded-simulation`` (noise
    #: derivable from a public seed: epsilon is nominal). See :mod:`blossom_secure.site.dp_random`.
    randomness: str = "os-csprng"

    @property
    def is_nominal(self) -> bool:
        """Whether this round's epsilon is nominal (a seeded simulation), not a guarantee."""
        return self.randomness != "os-csprng"


def compute_epsilon(history: list[tuple[float, float, int]], *, accountant: str, delta: float) -> float:
    """Epsilon of a DP-SGD history ``[(noise_multiplier, sample_rate, steps), ...]`` at ``delta``.

    Uses Opacus's own accountant of the given kind, so the number is the one Opacus
    would report for the same training.
    """
    if not history:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), delta)
    from opacus.accountants import create_accountant

    acct = create_accountant(accountant)
    acct.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acct.get_epsilon(delta=delta))


#: Opacus's ``RDPAccountant.DEFAULT_ALPHAS`` (a test checks they are equal).
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


@functools.lru_cache(maxsize=1)
def _rdp_analysis() -> Any:
    """Opacus's RDP analysis (``opacus/accountants/analysis/rdp.py``, numpy and scipy only).

    If Opacus is already imported, its module; otherwise the same file of the installed
    Opacus, loaded on its own, because importing the ``opacus`` package imports torch,
    and the operator's read-only commands (``budget``, ``audit review``) must answer in
    well under a second. The code run is Opacus's own, byte for byte (a test compares the
    results with Opacus's ``RDPAccountant``).
    """
    import importlib.util
    import sys

    loaded = sys.modules.get("opacus.accountants.analysis.rdp")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("opacus")  # finds the package without running it
    if package is None or not package.submodule_search_locations:
        raise ImportError("opacus is not installed")
    path = Path(next(iter(package.submodule_search_locations))) / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("blossom_secure.site._opacus_rdp_analysis", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Opacus ``RDPAccountant.get_epsilon`` for ``history``, with each mechanism's one-step
    RDP vector computed once per process.

    Notes:
        The arithmetic is Opacus's own, step for step: its accountant sums
        ``compute_rdp(q, sigma, steps, DEFAULT_ALPHAS)``, which is the one-step vector
        times ``steps``, over the history entries in order, then converts with
        ``get_privacy_spent``. Only the one-step vector is cached (it depends on
        ``(q, sigma)`` alone), so the result is bit-for-bit the accountant's, while a
        ledger of ``R`` rounds no longer recomputes ``R`` expensive RDP series per query.
    """
    rdp = sum([_rdp_one_step(q, s) * n for s, q, n in history])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = _rdp_analysis().get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    vector = _rdp_analysis().compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                         orders=list(RDP_ORDERS))
    vector.setflags(write=False)
    return vector


def noise_for_target(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The noise multiplier that gives ``target_epsilon`` for one round alone (Opacus's search)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))


class PrivacyLedger:
    """A site's durable privacy ledger (``<site>/state/ledger.json``).

    Args:
        path: The ledger file.
        site_id: The site it belongs to; a ledger of another site is refused.
        terms: The policy's privacy terms (accountant, delta, budget).
    """

    def __init__(self, path: Path, *, site_id: str, terms: PrivacyTerms) -> None:
        self.path = Path(path)
        self.site_id = site_id
        self.terms = terms
        #: Whether the ledger file existed when read (a missing file reads as no entries).
        self.file_found = self.path.exists()
        self.entries: list[LedgerEntry] = self._read()

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    @property
    def epsilon_spent(self) -> float:
        """Total epsilon so far, for the policy's delta and accountant."""
        return compute_epsilon(self.history, accountant=self.terms.accountant, delta=self.terms.delta)

    @property
    def epsilon_remaining(self) -> float:
        return max(0.0, self.terms.epsilon_budget - self.epsilon_spent)

    def projected_epsilon(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Total epsilon if one more round with these parameters were trained."""
        return compute_epsilon(self.history + [(noise_multiplier, sample_rate, steps)],
                               accountant=self.terms.accountant, delta=self.terms.delta)

    def reserve(self, *, round_id: int, noise_multiplier: float, sample_rate: float, steps: int,
                randomness: str = "os-csprng") -> LedgerEntry:
        """Record a round's spend durably, or refuse it.

        ``randomness`` says where the round's noise comes from (``os-csprng``, or
        ``seeded-simulation`` whose epsilon is nominal); it is stored with the entry.

        Returns:
            The new entry (with the new total epsilon).

        Raises:
            PrivacyBudgetExceededError: the round would take the site past its budget;
                the ledger is unchanged.
            ValueError: nonsensical parameters (caller misuse).
            LedgerError: the ledger cannot be written (the round must not proceed).
        """
        if not (noise_multiplier > 0 and 0 < sample_rate <= 1 and steps >= 1):
            raise ValueError("noise_multiplier > 0, 0 < sample_rate <= 1 and steps >= 1 are required")
        spent = self.epsilon_spent
        total = self.projected_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        if not math.isfinite(total) or total > self.terms.epsilon_budget:
            raise PrivacyBudgetExceededError(epsilon_spent=spent, epsilon_requested=total,
                                             epsilon_budget=self.terms.epsilon_budget)
        entry = LedgerEntry(round_id=round_id, noise_multiplier=float(noise_multiplier),
                            sample_rate=float(sample_rate), steps=int(steps), epsilon_total=total,
                            time_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                            randomness=randomness)
        self._write(self.entries + [entry])
        self.entries.append(entry)
        return entry

    # -- file I/O -------------------------------------------------------------------------

    def _read(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        where = str(self.path)
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise LedgerError([Problem(where, "", f"cannot read ledger ({exc.strerror or exc})")]) from None
        if len(raw) > _MAX_LEDGER_BYTES:
            raise LedgerError([Problem(where, "", "ledger file is implausibly large")])
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerError([Problem(where, "", f"ledger is not valid JSON ({exc})")]) from None
        problems: list[Problem] = []
        if not isinstance(data, dict) or set(data) != {"version", "site", "entries"}:
            raise LedgerError([Problem(where, "", "not a blossom_secure privacy ledger")])
        if data["version"] != LEDGER_VERSION:
            problems.append(Problem(where, "version", f"unsupported ledger version {data['version']!r}"))
        if data["site"] != self.site_id:
            problems.append(Problem(where, "site", f"ledger belongs to site {data['site']!r}, not {self.site_id!r}"))
        entries: list[LedgerEntry] = []
        if not isinstance(data["entries"], list):
            problems.append(Problem(where, "entries", "must be a list"))
        else:
            for i, item in enumerate(data["entries"]):
                try:
                    entry = LedgerEntry(**item)
                    valid = (isinstance(entry.round_id, int) and isinstance(entry.steps, int)
                             and all(isinstance(v, (int, float)) and math.isfinite(v) for v in
                                     (entry.noise_multiplier, entry.sample_rate, entry.epsilon_total))
                             and entry.noise_multiplier > 0 and 0 < entry.sample_rate <= 1 and entry.steps >= 1
                             and entry.randomness in ("os-csprng", "seeded-simulation"))
                except TypeError:
                    valid = False
                if not valid:
                    problems.append(Problem(where, f"entries[{i}]", "malformed ledger entry"))
                else:
                    entries.append(entry)
        if problems:
            raise LedgerError(problems)
        return entries

    def _write(self, entries: list[LedgerEntry]) -> None:
        data = {"version": LEDGER_VERSION, "site": self.site_id, "entries": [e.__dict__ for e in entries]}
        payload = json.dumps(data, indent=1, sort_keys=True).encode("utf-8") + b"\n"
        try:
            atomic_write(self.path, payload)
        except OSError as exc:
            raise LedgerError([Problem(str(self.path), "", f"cannot write ledger ({exc.strerror or exc})")]) from None


# -- reconciliation with the signed audit log ---------------------------------------------
#
# The ledger file can be deleted or replaced by an older copy by anyone who can write the
# site folder; the audit log cannot be changed without the site's key (it is signed and
# hash-chained). So the spend the ledger reports is checked against the rounds the verified
# audit log proves (its ``training_finished`` records), and a ledger behind the log is an
# error, never a smaller budget.

#: Fields of :class:`LedgerEntry` that reconciliation fills itself; any other field (such
#: as ``randomness``) is carried over from a ``training_finished`` record that has a detail
#: of the same name, so new entry fields need no change here.
_CORE_ENTRY_FIELDS = frozenset({"round_id", "noise_multiplier", "sample_rate", "steps", "epsilon_total", "time_utc"})
#: Relative slack when comparing an epsilon_total in the ledger with the one in the log
#: (both are the same double written as shortest round-trip JSON; the slack only absorbs
#: a writer that rounds).
_EPSILON_REL_TOL = 1e-9
#: At most this many problems are listed one by one in a reconciliation error.
_MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class ProvenRound:
    """One round's DP-SGD spend as a verified ``training_finished`` audit record proves it.

    Attributes:
        seq: The record's sequence number in the audit log.
        round_id: The round.
        noise_multiplier: DP-SGD noise multiplier of the round.
        sample_rate: Poisson sampling rate of the round.
        steps: Optimiser steps of the round.
        epsilon_total: The ledger's total after the round, as the record states it.
        time_utc: When the record was written (after training).
        carried: Details of the record that :class:`LedgerEntry` also has a field for
            (such as ``randomness``), as ``(name, value)`` pairs.
        accountant: The accountant ``epsilon_total`` was computed with, or ``None`` if the
            record does not say.
        delta: The delta ``epsilon_total`` was computed for.
    """

    seq: int
    round_id: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_total: float
    time_utc: str
    carried: tuple[tuple[str, object], ...] = ()
    accountant: str | None = None
    delta: float | None = None

    @property
    def terms(self) -> tuple[int, float, float, int]:
        """``(round_id, noise_multiplier, sample_rate, steps)``: what a ledger entry must match."""
        return (self.round_id, self.noise_multiplier, self.sample_rate, self.steps)

    def to_entry(self) -> LedgerEntry:
        """The ledger entry that records this round."""
        return LedgerEntry(round_id=self.round_id, noise_multiplier=self.noise_multiplier,
                           sample_rate=self.sample_rate, steps=self.steps, epsilon_total=self.epsilon_total,
                           time_utc=self.time_utc, **dict(self.carried))


def _entry_terms(entry: LedgerEntry) -> tuple[int, float, float, int]:
    return (entry.round_id, float(entry.noise_multiplier), float(entry.sample_rate), int(entry.steps))


def proven_rounds(records: Sequence[Mapping[str, Any]], *, audit_file: str) -> list[ProvenRound]:
    """The DP-SGD rounds that the ``training_finished`` records among ``records`` prove.

    Args:
        records: Audit records in log order, **verified** (from
            :meth:`blossom_secure.audit.AuditLog.verified_records` or
            :func:`blossom_secure.audit.read_verified_records`); other events are skipped.
        audit_file: The audit log's path, to name it in errors.

    Returns:
        One :class:`ProvenRound` per record with at least one step, in log order.

    Raises:
        LedgerError: a record proves a round trained without noise (infinite epsilon),
            which no ledger entry can hold.

    Notes:
        Only the audit log's signatures and hash chain make these records evidence, so the
        records must have been verified against the site's key; this function checks no
        signature. A record with zero steps spent nothing and is skipped.
    """
    carried_fields = sorted({f.name for f in fields(LedgerEntry)} - _CORE_ENTRY_FIELDS)
    rounds: list[ProvenRound] = []
    problems: list[Problem] = []
    for record in records:
        if record.get("event") != TRAINING_FINISHED:
            continue
        details = record["details"]
        if details["steps"] == 0:
            continue
        if not details["noise_multiplier"] > 0:
            problems.append(Problem(audit_file, f"seq {record['seq']}",
                                    "training_finished record proves a round trained without noise "
                                    "(infinite epsilon); no privacy ledger can hold it"))
            continue
        rounds.append(ProvenRound(
            seq=record["seq"], round_id=record["round_id"], noise_multiplier=float(details["noise_multiplier"]),
            sample_rate=float(details["sample_rate"]), steps=int(details["steps"]),
            epsilon_total=float(details["epsilon_total"]), time_utc=record["time_utc"],
            carried=tuple((name, details[name]) for name in carried_fields if name in details),
            accountant=details.get("accountant"), delta=float(details["delta"])))
    if problems:
        raise LedgerError(problems)
    return rounds


def _match(entries: Sequence[LedgerEntry], proven: Sequence[ProvenRound]) -> tuple[dict[int, int], list[int]]:
    """Pair each proven round with a distinct ledger entry of the same round and terms.

    Returns ``(ledger index -> proven index, indices of proven rounds left unpaired)``.
    Terms are compared exactly: both files hold the same doubles, written as shortest
    round-trip JSON. Pairing is by equal terms, so it is a multiset inclusion: order and
    the ledger's extra entries do not matter.
    """
    free: dict[tuple[int, float, float, int], deque[int]] = {}
    for j, entry in enumerate(entries):
        free.setdefault(_entry_terms(entry), deque()).append(j)
    paired: dict[int, int] = {}
    unpaired: list[int] = []
    for i, round_ in enumerate(proven):
        candidates = free.get(round_.terms)
        if candidates:
            paired[candidates.popleft()] = i
        else:
            unpaired.append(i)
    return paired, unpaired


def _is_below(ledger_epsilon: float, proven_epsilon: float) -> bool:
    return ledger_epsilon < proven_epsilon * (1.0 - _EPSILON_REL_TOL)


def _short_of(history: Sequence[tuple[float, float, int]],
              proven: Sequence[ProvenRound]) -> tuple[float, ProvenRound] | None:
    """A total the log proves (the largest per accountant and delta) that ``history``
    composes below, with what it composes to; ``None`` if it reaches every one.

    A ``training_finished`` record's ``epsilon_total`` is the ledger's total after that
    round, so it also counts every round reserved before it, those interrupted before
    their own record included: a ledger that drops one holds every proven round and still
    reads lower than the log. Records that do not name their accountant are not compared.
    """
    largest: dict[tuple[str, float], ProvenRound] = {}
    for p in proven:
        if p.accountant in ACCOUNTANTS and p.delta is not None:
            key = (p.accountant, p.delta)
            if key not in largest or p.epsilon_total > largest[key].epsilon_total:
                largest[key] = p
    for (accountant, delta), p in sorted(largest.items(), key=lambda item: item[1].seq):
        composed = compute_epsilon(list(history), accountant=accountant, delta=delta)
        if _is_below(composed, p.epsilon_total):
            return composed, p
    return None


def _capped(problems: list[Problem], where: str) -> list[Problem]:
    if len(problems) <= _MAX_LISTED_PROBLEMS:
        return problems
    more = len(problems) - _MAX_LISTED_PROBLEMS
    return problems[:_MAX_LISTED_PROBLEMS] + [Problem(where, "", f"... and {more} more")]


def _coverage_problems(ledger: PrivacyLedger, proven: Sequence[ProvenRound], audit_file: str) -> list[Problem]:
    where = str(ledger.path)
    if not proven:
        return []
    if not ledger.file_found:
        last = proven[-1]
        return [Problem(where, "", f"ledger file is missing, but the signed audit log {audit_file} proves "
                                   f"{len(proven)} trained round(s), epsilon_total {last.epsilon_total:.3f} at seq "
                                   f"{last.seq}; a missing ledger does not reset the budget "
                                   "(run `blossom-site ledger rebuild`)")]
    paired, unpaired = _match(ledger.entries, proven)
    problems = []
    for i in unpaired:
        p = proven[i]
        problems.append(Problem(where, f"round {p.round_id}",
                                f"missing: the signed audit log {audit_file} proves this round at seq {p.seq} "
                                f"(noise_multiplier {p.noise_multiplier}, sample_rate {p.sample_rate}, steps "
                                f"{p.steps}, epsilon_total {p.epsilon_total:.3f}); the ledger is behind the audit "
                                "log (deleted or restored from an older copy?)"))
    for j, i in sorted(paired.items()):
        entry, p = ledger.entries[j], proven[i]
        if _is_below(entry.epsilon_total, p.epsilon_total):
            problems.append(Problem(where, f"entries[{j}].epsilon_total",
                                    f"{entry.epsilon_total:.6g} is below the {p.epsilon_total:.6g} that the signed "
                                    f"audit log {audit_file} proves for round {p.round_id} at seq {p.seq}"))
    short = None if problems else _short_of(ledger.history, proven)
    if short is not None:
        composed, p = short
        problems.append(Problem(where, "", f"its rounds compose to epsilon {composed:.3f} ({p.accountant}, delta "
                                           f"{p.delta:g}), below the {p.epsilon_total:.3f} that the signed audit log "
                                           f"{audit_file} proves at seq {p.seq} (round {p.round_id}): a round "
                                           "reserved before it (joined, never finished) is missing"))
    problems = _capped(problems, where)
    if problems:
        problems.append(Problem(where, "", "the ledger is behind the signed audit log and must not be used; "
                                           "`blossom-site ledger rebuild` restores it from the log"))
    return problems


def verify_ledger_covers(ledger: PrivacyLedger, proven: Sequence[ProvenRound], *, audit_file: str) -> None:
    """Check that ``ledger`` holds every round the verified audit log proves.

    Every proven round must have its own ledger entry with the same round id,
    noise multiplier, sample rate and steps, and that entry's ``epsilon_total`` must not be
    below the one the log records; and the ledger's rounds, composed, must reach every
    total the log records (for the record's accountant and delta): a record's total also
    counts the rounds reserved before it that were interrupted before their own record,
    so such a round cannot be dropped either. Ledger entries the log does not prove are
    accepted:
    a round is reserved in the ledger (durably) before training and its
    ``training_finished`` record is written after, so a crash in between leaves the
    ledger ahead, which over-counts and is safe.

    Args:
        ledger: The site's ledger, as read from its file.
        proven: From :func:`proven_rounds` of the site's verified audit log.
        audit_file: The audit log's path, to name it in errors.

    Raises:
        LedgerError: the ledger file is missing while the log proves a round, or the
            ledger lacks a proven round, records a smaller epsilon for one, or composes
            below a total the log records; every problem is listed (up to 20), each
            naming the ledger file and the round.

    Notes:
        Rounds are compared by their ``(noise_multiplier, sample_rate, steps)`` history,
        the terms the accountant composes, not only by the epsilon number: a ledger whose
        total looks high enough but lacks a round would still under-count once the policy's
        delta or accountant changes. A missing ledger is an error only when the log proves
        a trained round: a site that has started but never trained has no ledger file
        (the file is first written by :meth:`PrivacyLedger.reserve`), and its
        ``site_initialised``, ``policy_loaded`` and ``round_declined`` records prove no
        spend. A round reserved but never finished released nothing (its update leaves
        only after its ``training_finished`` record), so the log cannot, and need not,
        prove it.
    """
    problems = _coverage_problems(ledger, proven, audit_file)
    if problems:
        raise LedgerError(problems)


def load_reconciled_ledger(path: Path, *, site_id: str, terms: PrivacyTerms,
                           records: Sequence[Mapping[str, Any]], audit_file: str) -> PrivacyLedger:
    """Read the site's ledger and check it against the site's verified audit records.

    Args:
        path: The ledger file.
        site_id: The site.
        terms: The policy's privacy terms.
        records: The site's verified audit records (at least its ``training_finished``
            ones), in log order.
        audit_file: The audit log's path, to name it in errors.

    Returns:
        The ledger, which holds every round the audit log proves.

    Raises:
        LedgerError: the ledger is unreadable, or behind the audit log (see
            :func:`verify_ledger_covers`).
    """
    ledger = PrivacyLedger(path, site_id=site_id, terms=terms)
    verify_ledger_covers(ledger, proven_rounds(records, audit_file=audit_file), audit_file=audit_file)
    return ledger


@dataclass(frozen=True)
class LedgerRebuild:
    """What :func:`rebuild_ledger` did.

    Attributes:
        path: The ledger file.
        entries: The entries of the rebuilt ledger (the existing ones if nothing changed).
        rounds_proven: Rounds the audit log proves (all in ``entries``): by their
            ``training_finished`` records, and ``rounds_restored`` more.
        rounds_kept: Entries kept from the previous ledger that the log does not prove
            (reserved, never finished).
        epsilon_total: The rebuilt spend, for the policy's delta and accountant.
        previous: ``"missing"``, ``"readable"`` or ``"unreadable"``: the ledger file before.
        previous_problem: Why the previous file was unreadable, else ``None``.
        backup: Where the previous file was copied before being replaced, else ``None``.
        changed: Whether the ledger file was written (``False``: it already held every
            round the log proves, or there is no ledger and the log proves no round).
        rounds_restored: Rounds the log shows joined and never finished (interrupted
            after their spend was reserved) that a later ``training_finished`` total
            counts, restored because the ledger lacked them.
    """

    path: Path
    entries: tuple[LedgerEntry, ...]
    rounds_proven: int
    rounds_kept: int
    epsilon_total: float
    previous: str
    previous_problem: str | None
    backup: Path | None
    changed: bool
    rounds_restored: int = 0


def _merge(entries: Sequence[LedgerEntry], proven: Sequence[ProvenRound]) -> tuple[list[LedgerEntry], int]:
    """Every proven round plus every ledger entry the log does not prove, in ledger order,
    each round the ledger lacks placed just before the entry of the next proven round it
    holds (at the end if none). Returns the entries and how many were kept unproven."""
    paired, _ = _match(entries, proven)
    ledger_of = {i: j for j, i in paired.items()}
    before: dict[int, list[int]] = {}
    anchor = len(entries)
    for i in reversed(range(len(proven))):
        if i in ledger_of:
            anchor = min(anchor, ledger_of[i])
        else:
            before.setdefault(anchor, []).insert(0, i)
    merged: list[LedgerEntry] = []
    for j, entry in enumerate(entries):
        merged.extend(proven[i].to_entry() for i in before.get(j, []))
        if j in paired and _is_below(entry.epsilon_total, proven[paired[j]].epsilon_total):
            entry = replace(entry, epsilon_total=proven[paired[j]].epsilon_total)
        merged.append(entry)
    merged.extend(proven[i].to_entry() for i in before.get(len(entries), []))
    return merged, len(entries) - len(paired)


def _interrupted_rounds(records: Sequence[Mapping[str, Any]],
                        proven: Sequence[ProvenRound]) -> list[tuple[Mapping[str, Any], ProvenRound]]:
    """The ``round_joined`` records of rounds that never finished (no ``training_finished``
    record with steps follows for that round), each with the first proven round after it
    (whose total counts its reserved spend); rounds with no proven round after them are
    left out (nothing in the log counts their spend)."""
    proven_seqs = {p.seq for p in proven}
    open_joins: dict[int, Mapping[str, Any]] = {}
    unfinished: list[Mapping[str, Any]] = []
    for record in records:
        if record.get("event") == ROUND_JOINED:
            if record["round_id"] in open_joins:  # a number answered twice (an old log)
                unfinished.append(open_joins[record["round_id"]])
            open_joins[record["round_id"]] = record
        elif record.get("seq") in proven_seqs:
            open_joins.pop(record["round_id"], None)
    unfinished.extend(open_joins.values())
    out = []
    for joined in sorted(unfinished, key=lambda r: r["seq"]):
        later = next((p for p in proven if p.seq > joined["seq"]), None)
        if later is not None:
            out.append((joined, later))
    return out


def _restore_interrupted(entries: Sequence[LedgerEntry], records: Sequence[Mapping[str, Any]],
                         proven: Sequence[ProvenRound], terms: PrivacyTerms) -> tuple[list[LedgerEntry], int]:
    """``entries`` plus one entry for each round the log shows joined and never finished
    that they lack, placed before the entry of the proven round that followed it, with that
    round's DP-SGD terms (the same policy and federation terms reserve the same); only if
    ``entries`` compose below a total the log proves. Returns the entries and how many
    were added."""
    if _short_of([_entry_terms(e)[1:] for e in entries], proven) is None:
        return list(entries), 0
    merged = list(entries)
    held = {e.round_id for e in entries}
    added = 0
    for joined, later in _interrupted_rounds(records, proven):
        if joined["round_id"] in held:
            continue
        at = next(j for j, e in enumerate(merged) if _entry_terms(e) == later.terms)
        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in merged[:at]]
        history.append((later.noise_multiplier, later.sample_rate, later.steps))
        merged.insert(at, LedgerEntry(
            round_id=joined["round_id"], noise_multiplier=later.noise_multiplier, sample_rate=later.sample_rate,
            steps=later.steps, epsilon_total=compute_epsilon(history, accountant=terms.accountant, delta=terms.delta),
            time_utc=joined["time_utc"], **dict(later.carried)))
        held.add(joined["round_id"])
        added += 1
    return merged, added


def rebuild_ledger(path: Path, *, site_id: str, terms: PrivacyTerms, records: Sequence[Mapping[str, Any]],
                   audit_file: str, record_rebuild: Callable[[dict[str, Any]], object]) -> LedgerRebuild:
    """Rebuild the site's ledger from its verified audit log, keeping any rounds it is ahead.

    The new ledger holds every round the log's ``training_finished`` records prove and, if
    the existing ledger file is readable, every entry of it that the log does not prove
    (rounds reserved but never finished: keeping them can only over-count). If those still
    compose below a total the log records, each round the log shows joined and never
    finished before that total is restored with the terms of the round that followed it.
    An unreadable ledger (corrupt, foreign) is rebuilt from the log alone and its bytes
    kept as a backup.

    Order: the new file is written beside the old one and read back with the ledger's own
    reader and checked against the log; then ``record_rebuild`` is called with the
    ``ledger_rebuilt`` audit details; then the previous file is copied to
    ``ledger.<time>.replaced.json`` and the new file renamed over it. If anything fails
    before the rename, the ledger is as it was.

    Call it with the site's audit log open (:meth:`blossom_secure.audit.AuditLog.open`
    takes the single-writer lock), so that no site agent reserves a round meanwhile.

    Args:
        path: The ledger file.
        site_id: The site.
        terms: The policy's privacy terms.
        records: The site's verified audit records, in log order (at least its
            ``training_finished`` and ``round_joined`` ones).
        audit_file: The audit log's path, to name it in errors.
        record_rebuild: Called with the details of the ``ledger_rebuilt`` audit record
            before the new ledger replaces the old one (it must append that record
            durably, or raise to stop the rebuild). Not called if nothing changes.

    Returns:
        What was done.

    Raises:
        LedgerError: a record the ledger cannot hold (see :func:`proven_rounds`), a
            total the log records that the rebuilt rounds still compose below, or the
            ledger cannot be written.
        Exception: whatever ``record_rebuild`` raises (the ledger is unchanged).

    Notes:
        Reserved rounds that never finished are kept rather than dropped because the
        agent's model kept training from them in memory; the log cannot prove them, and
        over-counting is the safe side. Nothing but the verified log (and a readable
        previous ledger, which only ever adds) decides the spend.
    """
    path = Path(path)
    proven = proven_rounds(records, audit_file=audit_file)
    previous_problem = None
    try:
        current: PrivacyLedger | None = PrivacyLedger(path, site_id=site_id, terms=terms)
    except LedgerError as exc:
        current, previous_problem = None, "; ".join(p.reason for p in exc.problems)
    previous = "unreadable" if current is None else "readable" if current.file_found else "missing"
    if current is not None and not _coverage_problems(current, proven, audit_file):
        return LedgerRebuild(path=path, entries=tuple(current.entries), rounds_proven=len(proven),
                             rounds_kept=len(current.entries) - len(_match(current.entries, proven)[0]),
                             epsilon_total=current.epsilon_spent, previous=previous, previous_problem=None,
                             backup=None, changed=False)
    entries, kept = _merge(current.entries if current is not None else [], proven)
    entries, restored = _restore_interrupted(entries, records, proven, terms)
    staged = path.with_name(f".{path.name}.rebuild.tmp")
    old_bytes = backup = None
    try:
        with suppress(FileNotFoundError):
            staged.unlink()  # left by an interrupted rebuild
        fresh = PrivacyLedger(staged, site_id=site_id, terms=terms)
        fresh._write(entries)
        fresh = PrivacyLedger(staged, site_id=site_id, terms=terms)  # read back with the real reader
        verify_ledger_covers(fresh, proven, audit_file=audit_file)
        new_bytes = staged.read_bytes()
        if previous != "missing":
            old_bytes = path.read_bytes()
        details: dict[str, Any] = {
            "rounds": len(fresh.entries), "rounds_proven": len(proven) + restored, "rounds_kept": kept,
            "epsilon_total": fresh.epsilon_spent, "delta": terms.delta, "accountant": terms.accountant,
            "ledger_sha256": hashlib.sha256(new_bytes).hexdigest(), "previous_ledger": previous,
        }
        if old_bytes is not None:
            details["previous_ledger_sha256"] = hashlib.sha256(old_bytes).hexdigest()
        record_rebuild(details)
        if old_bytes is not None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            backup = path.with_name(f"{path.stem}.{stamp}.replaced{path.suffix}")
            atomic_write(backup, old_bytes)
        os.replace(staged, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise LedgerError([Problem(str(path), "", f"cannot rebuild ledger ({exc.strerror or exc})")]) from None
    finally:
        with suppress(FileNotFoundError):
            staged.unlink()
    return LedgerRebuild(path=path, entries=tuple(fresh.entries), rounds_proven=len(proven) + restored,
                         rounds_kept=kept, epsilon_total=fresh.epsilon_spent, previous=previous,
                         previous_problem=previous_problem, backup=backup, changed=True, rounds_restored=restored)
