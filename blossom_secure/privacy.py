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
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from blossom_secure._fs import atomic_write
from blossom_secure.errors import InputError, PrivacyBudgetExceededError, Problem
from blossom_secure.policy import PrivacyTerms

__all__ = ["LedgerEntry", "LedgerError", "PrivacyLedger", "compute_epsilon", "noise_for_target"]

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
    from opacus.accountants.analysis import rdp as rdp_analysis
    from opacus.accountants.rdp import RDPAccountant

    rdp = sum([_rdp_one_step(q, s) * n for s, q, n in history])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis
    from opacus.accountants.rdp import RDPAccountant

    vector = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                      orders=RDPAccountant.DEFAULT_ALPHAS)
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

    def reserve(self, *, round_id: int, noise_multiplier: float, sample_rate: float, steps: int) -> LedgerEntry:
        """Record a round's spend durably, or refuse it.

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
                            time_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
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
                             and entry.noise_multiplier > 0 and 0 < entry.sample_rate <= 1 and entry.steps >= 1)
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
