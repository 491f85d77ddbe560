"""The privacy ledger: Opacus-exact epsilons, durable before release, budget enforced."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from dataclasses import fields

import pytest

from blossom_secure import crypto
from blossom_secure.audit import log as audit
from blossom_secure.errors import PrivacyBudgetExceededError
from blossom_secure.site.policy import PrivacyTerms
from blossom_secure.site.ledger import (
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    compute_epsilon,
    load_reconciled_ledger,
    noise_for_target,
    proven_rounds,
    rebuild_ledger,
    verify_ledger_covers,
)
from blossom_secure.site.training import plan_round


def terms(budget: float = 8.0, accountant: str = "rdp", noise: float | None = 1.0, target: float | None = None):
    return PrivacyTerms(accountant=accountant, delta=1e-5, max_grad_norm=1.0, epsilon_budget=budget,
                        noise_multiplier=noise, target_epsilon_per_round=target)


def test_pinned_epsilons_match_opacus():
    # Known values for delta = 1e-5 (Opacus 1.6), recomputed independently with Opacus's
    # RDP accountant stepping one round at a time.
    from opacus.accountants import RDPAccountant

    assert compute_epsilon([(1.0, 0.01, 1000)], accountant="rdp", delta=1e-5) == pytest.approx(2.1014, abs=1e-3)
    assert compute_epsilon([(1.1, 0.032, 300)], accountant="rdp", delta=1e-5) == pytest.approx(3.349, abs=2e-3)
    acct = RDPAccountant()
    for _ in range(10):
        for _ in range(10):
            acct.step(noise_multiplier=1.0, sample_rate=0.1)
    ours = compute_epsilon([(1.0, 0.1, 10)] * 10, accountant="rdp", delta=1e-5)
    assert ours == pytest.approx(acct.get_epsilon(delta=1e-5), rel=1e-9)


def test_rounds_compose_not_add():
    one = compute_epsilon([(1.0, 0.1, 10)], accountant="rdp", delta=1e-5)
    ten = compute_epsilon([(1.0, 0.1, 10)] * 10, accountant="rdp", delta=1e-5)
    assert one < ten < 10 * one


def test_noise_for_target_hits_target():
    sigma = noise_for_target(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=10, accountant="rdp")
    assert compute_epsilon([(sigma, 0.1, 10)], accountant="rdp", delta=1e-5) == pytest.approx(1.0, abs=0.02)


def test_plan_matches_opacus_poisson_loader():
    plan = plan_round(150, batch_size=16, epochs=2, terms=terms())
    assert plan.sample_rate == pytest.approx(1 / 10) and plan.steps == 20
    with pytest.raises(ValueError):
        plan_round(0, batch_size=16, epochs=1, terms=terms())


def test_reserve_is_durable_before_returning(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, site_id="a", terms=terms())
    entry = ledger.reserve(round_id=0, noise_multiplier=1.0, sample_rate=0.1, steps=10)
    reread = PrivacyLedger(path, site_id="a", terms=terms())
    assert reread.entries == [entry]
    assert reread.epsilon_spent == pytest.approx(entry.epsilon_total)
    assert not list(tmp_path.glob(".*.tmp"))


def test_crash_after_reserve_never_under_counts(tmp_path):
    """A process that reserves, trains, and dies before sending still has its spend on disk."""
    path = tmp_path / "ledger.json"
    script = textwrap.dedent(f"""
        import os
        from blossom_secure.site.policy import PrivacyTerms
        from blossom_secure.site.ledger import PrivacyLedger
        terms = PrivacyTerms(accountant="rdp", delta=1e-5, max_grad_norm=1.0, epsilon_budget=8.0,
                             noise_multiplier=1.0, target_epsilon_per_round=None)
        ledger = PrivacyLedger({str(path)!r}, site_id="a", terms=terms)
        ledger.reserve(round_id=0, noise_multiplier=1.0, sample_rate=0.1, steps=10)
        # ... training would happen here; the process dies before anything is sent:
        os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    ledger = PrivacyLedger(path, site_id="a", terms=terms())
    assert ledger.epsilon_spent == pytest.approx(compute_epsilon([(1.0, 0.1, 10)], accountant="rdp", delta=1e-5))


def test_budget_exhaustion_refuses_and_changes_nothing(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, site_id="a", terms=terms(budget=5.0))
    ledger.reserve(round_id=0, noise_multiplier=1.0, sample_rate=0.1, steps=10)
    before = path.read_bytes()
    with pytest.raises(PrivacyBudgetExceededError) as info:
        ledger.reserve(round_id=1, noise_multiplier=0.5, sample_rate=0.5, steps=100)
    assert info.value.epsilon_requested > 5.0 and info.value.epsilon_budget == 5.0
    assert path.read_bytes() == before
    assert len(ledger.entries) == 1


def test_nonsense_parameters_are_misuse(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", site_id="a", terms=terms())
    with pytest.raises(ValueError):
        ledger.reserve(round_id=1, noise_multiplier=1.0, sample_rate=0.0, steps=10)
    with pytest.raises(ValueError):
        ledger.reserve(round_id=1, noise_multiplier=0.0, sample_rate=0.1, steps=10)


def test_every_training_counts_even_a_repeated_round_id(tmp_path):
    # A later run of the federation starts its round numbers again; the spend still adds up.
    ledger = PrivacyLedger(tmp_path / "l.json", site_id="a", terms=terms())
    ledger.reserve(round_id=0, noise_multiplier=1.0, sample_rate=0.1, steps=10)
    ledger.reserve(round_id=0, noise_multiplier=1.0, sample_rate=0.1, steps=10)
    assert ledger.epsilon_spent == pytest.approx(compute_epsilon([(1.0, 0.1, 10)] * 2, accountant="rdp", delta=1e-5))


def test_ledger_of_another_site_refused(tmp_path):
    path = tmp_path / "l.json"
    PrivacyLedger(path, site_id="a", terms=terms()).reserve(round_id=0, noise_multiplier=1.0, sample_rate=0.1, steps=1)
    with pytest.raises(LedgerError, match="belongs to site 'a'"):
        PrivacyLedger(path, site_id="b", terms=terms())


@pytest.mark.parametrize("content", [b"not json", b"{}", b'{"version": 1, "site": "a", "entries": [{"round_id": 0}]}',
                                     b'{"version": 1, "site": "a", "entries": [{"round_id": 0, "noise_multiplier": -1,'
                                     b' "sample_rate": 0.1, "steps": 1, "epsilon_total": 0.1, "time_utc": "x"}]}'])
def test_corrupt_ledger_is_an_error_not_a_reset(tmp_path, content):
    path = tmp_path / "l.json"
    path.write_bytes(content)
    with pytest.raises(LedgerError):
        PrivacyLedger(path, site_id="a", terms=terms())


def test_delta_change_recomputes_from_history(tmp_path):
    path = tmp_path / "l.json"
    PrivacyLedger(path, site_id="a", terms=terms()).reserve(round_id=0, noise_multiplier=1.0, sample_rate=0.1, steps=10)
    loose = PrivacyTerms(accountant="rdp", delta=1e-3, max_grad_norm=1.0, epsilon_budget=8.0,
                         noise_multiplier=1.0, target_epsilon_per_round=None)
    assert PrivacyLedger(path, site_id="a", terms=loose).epsilon_spent < PrivacyLedger(path, site_id="a", terms=terms()).epsilon_spent
    assert json.loads(path.read_text())["entries"][0]["steps"] == 10


def test_prv_accountant_supported(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", site_id="a", terms=terms(accountant="prv"))
    entry = ledger.reserve(round_id=0, noise_multiplier=1.0, sample_rate=0.1, steps=10)
    assert 0 < entry.epsilon_total < compute_epsilon([(1.0, 0.1, 10)], accountant="rdp", delta=1e-5) + 0.5


# -- reconciliation with the signed audit log ----------------------------------------------
#
# Attacks on the ledger file (deleting it, restoring an older copy, editing it) against the
# site's signed audit log, built through the real PrivacyLedger and AuditLog classes in the
# order SiteAgent.offer uses them: reserve (durable), round_joined, train, training_finished.

SITE_KEY = crypto.generate_identity_key()
SITE_PUBLIC_KEY = crypto.identity_public_key(SITE_KEY)
POLICY_SHA = "ab" * 32


class SiteState:
    """A site's ``ledger.json`` and ``audit.jsonl``, written as the site agent writes them."""

    def __init__(self, root, *, site_id: str = "st-mary", privacy=None) -> None:
        self.ledger_path = root / "ledger.json"
        self.log_path = root / "audit.jsonl"
        self.site_id = site_id
        self.terms = privacy or terms(budget=50.0)
        with self.open_log() as log:
            log.append(audit.SITE_INITIALISED, round_id=None, policy_sha256=None,
                       details={"key_fingerprint": crypto.key_fingerprint(SITE_PUBLIC_KEY)})
            log.append(audit.POLICY_LOADED, round_id=None, policy_sha256=POLICY_SHA,
                       details={"policy_sha256": POLICY_SHA, "shareable": ["encoder.*"]})

    def open_log(self) -> audit.AuditLog:
        return audit.AuditLog.open(self.log_path, site_id=self.site_id, signing_key=SITE_KEY)

    def train(self, round_id: int, *, noise: float = 1.0, rate: float = 0.1, steps: int = 10,
              finish: bool = True) -> LedgerEntry:
        """Reserve a round and record it; ``finish=False`` is a crash before training_finished."""
        ledger = PrivacyLedger(self.ledger_path, site_id=self.site_id, terms=self.terms)
        spent_before = ledger.epsilon_spent
        entry = ledger.reserve(round_id=round_id, noise_multiplier=noise, sample_rate=rate, steps=steps)
        with self.open_log() as log:
            log.append(audit.ROUND_JOINED, round_id=round_id, details={}, policy_sha256=POLICY_SHA)
            if finish:
                log.append(audit.TRAINING_FINISHED, round_id=round_id, policy_sha256=POLICY_SHA, details={
                    "steps": steps, "epsilon_round": max(0.0, entry.epsilon_total - spent_before),
                    "epsilon_total": entry.epsilon_total, "delta": self.terms.delta,
                    "noise_multiplier": noise, "sample_rate": rate, "accountant": self.terms.accountant,
                    "max_grad_norm": self.terms.max_grad_norm})
        return entry

    def decline(self, round_id: int) -> None:
        with self.open_log() as log:
            log.append(audit.ROUND_DECLINED, round_id=round_id, details={"reason": "not today"},
                       policy_sha256=POLICY_SHA)

    def records(self) -> list[dict]:
        _, records = audit.read_verified_records(self.log_path, public_key=SITE_PUBLIC_KEY)
        return records

    def reconciled(self) -> PrivacyLedger:
        return load_reconciled_ledger(self.ledger_path, site_id=self.site_id, terms=self.terms,
                                      records=self.records(), audit_file=str(self.log_path))

    def rebuild(self, record=None):
        with self.open_log() as log:
            _, records = log.verified_records(events=(audit.TRAINING_FINISHED, audit.ROUND_JOINED))

            def append(details):
                log.append(audit.LEDGER_REBUILT, round_id=None, details=details, policy_sha256=POLICY_SHA)

            return rebuild_ledger(self.ledger_path, site_id=self.site_id, terms=self.terms, records=records,
                                  audit_file=str(self.log_path), record_rebuild=record or append)

    def edit_ledger(self, change) -> None:
        data = json.loads(self.ledger_path.read_text())
        change(data["entries"])
        self.ledger_path.write_text(json.dumps(data))


def history_epsilon(entries, t=None) -> float:
    t = t or terms()
    return compute_epsilon([(e.noise_multiplier, e.sample_rate, e.steps) for e in entries],
                           accountant=t.accountant, delta=t.delta)


def test_consistent_ledger_and_audit_log_reconcile(tmp_path):
    site = SiteState(tmp_path)
    entries = [site.train(0), site.train(1, noise=1.3, rate=0.05, steps=40)]
    site.decline(2)
    ledger = site.reconciled()
    assert ledger.entries == entries
    assert ledger.epsilon_spent == pytest.approx(entries[-1].epsilon_total, rel=1e-12)


def test_deleted_ledger_is_behind_the_audit_log(tmp_path):
    site = SiteState(tmp_path)
    site.train(0)
    last = site.train(1)
    site.ledger_path.unlink()
    with pytest.raises(LedgerError) as info:
        site.reconciled()
    message = str(info.value)
    assert str(site.ledger_path) in message and "ledger file is missing" in message
    assert str(site.log_path) in message and "2 trained round(s)" in message
    assert f"{last.epsilon_total:.3f}" in message and "blossom-site ledger rebuild" in message
    assert not site.ledger_path.exists()  # nothing written


def test_restored_old_ledger_names_the_rounds_it_lacks(tmp_path):
    site = SiteState(tmp_path)
    site.train(0)
    old = site.ledger_path.read_bytes()
    site.train(1)
    site.train(2)
    site.ledger_path.write_bytes(old)
    with pytest.raises(LedgerError) as info:
        site.reconciled()
    keys = [p.key for p in info.value.problems]
    assert keys[:2] == ["round 1", "round 2"]
    assert all(p.file == str(site.ledger_path) for p in info.value.problems)
    assert "behind the audit log" in info.value.problems[0].reason
    assert str(site.log_path) in info.value.problems[0].reason
    assert site.ledger_path.read_bytes() == old


def test_ledger_ahead_of_audit_log_after_crash_is_accepted(tmp_path):
    """Reserved (durably) before training, crash before training_finished: over-counts, accepted."""
    site = SiteState(tmp_path)
    site.train(0)
    site.train(1, finish=False)  # the crash
    ledger = site.reconciled()
    assert [e.round_id for e in ledger.entries] == [0, 1]
    site.train(2)  # and the site goes on: an unproven round in the middle is accepted too
    ledger = site.reconciled()
    assert [e.round_id for e in ledger.entries] == [0, 1, 2]
    assert ledger.epsilon_spent == pytest.approx(history_epsilon(ledger.entries, site.terms), rel=1e-12)


def test_ledger_with_other_terms_for_a_proven_round_is_behind(tmp_path):
    # The epsilon number alone is not enough: the (noise, rate, steps) history must match.
    site = SiteState(tmp_path)
    site.train(0)
    site.train(1, steps=40)

    def fewer_steps(entries):
        entries[1]["steps"] = 10

    site.edit_ledger(fewer_steps)
    with pytest.raises(LedgerError, match="round 1: missing"):
        site.reconciled()


def test_ledger_with_a_smaller_epsilon_total_is_behind(tmp_path):
    site = SiteState(tmp_path)
    site.train(0)
    site.train(1)

    def smaller(entries):
        entries[1]["epsilon_total"] = entries[1]["epsilon_total"] / 2

    site.edit_ledger(smaller)
    with pytest.raises(LedgerError) as info:
        site.reconciled()
    assert info.value.problems[0].key == "entries[1].epsilon_total"
    assert "below" in info.value.problems[0].reason


def test_a_repeated_round_id_must_appear_as_often_as_the_log_proves_it(tmp_path):
    # A second run of the federation numbers its rounds from 0 again.
    site = SiteState(tmp_path)
    site.train(0)
    site.train(0)
    site.edit_ledger(lambda entries: entries.pop())
    with pytest.raises(LedgerError, match="round 0: missing"):
        site.reconciled()


def test_missing_ledger_without_a_trained_round_is_accepted(tmp_path):
    # A site that started, loaded its policy and declined rounds has never written a ledger.
    site = SiteState(tmp_path)
    site.decline(0)
    with site.open_log() as log:
        log.append(audit.ROUND_JOINED, round_id=1, details={}, policy_sha256=POLICY_SHA)  # no training followed
    ledger = site.reconciled()
    assert ledger.entries == [] and not ledger.file_found


def test_reconciliation_error_lists_at_most_twenty_rounds(tmp_path):
    site = SiteState(tmp_path, privacy=terms(budget=1000.0))
    site.ledger_path.write_text(json.dumps({"version": 1, "site": "st-mary", "entries": []}))
    old = site.ledger_path.read_bytes()
    for r in range(25):
        site.train(r, noise=5.0, steps=1)
    site.ledger_path.write_bytes(old)
    with pytest.raises(LedgerError) as info:
        site.reconciled()
    assert len(info.value.problems) == 22 and "and 5 more" in info.value.problems[20].reason


def test_proven_rounds_skip_other_events_and_steps_zero(tmp_path):
    site = SiteState(tmp_path)
    site.train(0)
    with site.open_log() as log:
        log.append(audit.TRAINING_FINISHED, round_id=1, policy_sha256=POLICY_SHA, details={
            "steps": 0, "epsilon_round": 0.0, "epsilon_total": 0.5, "delta": 1e-5,
            "noise_multiplier": 1.0, "sample_rate": 0.1})
    rounds = proven_rounds(site.records(), audit_file="audit.jsonl")
    assert [(r.round_id, r.steps) for r in rounds] == [(0, 10)]


def test_a_proven_round_without_noise_cannot_be_held(tmp_path):
    site = SiteState(tmp_path)
    with site.open_log() as log:
        log.append(audit.TRAINING_FINISHED, round_id=0, policy_sha256=POLICY_SHA, details={
            "steps": 5, "epsilon_round": 0.0, "epsilon_total": 0.0, "delta": 1e-5,
            "noise_multiplier": 0, "sample_rate": 0.1})
    with pytest.raises(LedgerError, match="seq 2: training_finished record proves a round trained without noise"):
        proven_rounds(site.records(), audit_file="audit.jsonl")


def test_proven_rounds_carry_other_ledger_entry_fields():
    # A field LedgerEntry has beyond the DP-SGD terms (the seeded-simulation marker) is taken
    # from the record's details when present, and left at its default otherwise.
    extra = sorted({f.name for f in fields(LedgerEntry)} - {"round_id", "noise_multiplier", "sample_rate",
                                                             "steps", "epsilon_total", "time_utc"})
    assert extra == ["randomness"]
    record = {"event": "training_finished", "seq": 7, "round_id": 3, "time_utc": "2026-03-01T12:00:00Z",
              "details": {"steps": 10, "epsilon_round": 1.0, "epsilon_total": 1.0, "delta": 1e-5,
                          "noise_multiplier": 1.0, "sample_rate": 0.1, "randomness": "seeded-simulation"}}
    (seeded,) = proven_rounds([record], audit_file="audit.jsonl")
    assert seeded.to_entry().randomness == "seeded-simulation"
    del record["details"]["randomness"]
    (plain,) = proven_rounds([record], audit_file="audit.jsonl")
    assert plain.to_entry().randomness == LedgerEntry.__dataclass_fields__["randomness"].default


def test_ledger_rebuild_restores_the_spend_from_the_audit_log(tmp_path):
    site = SiteState(tmp_path)
    entries = [site.train(0), site.train(1, noise=1.3), site.train(2, rate=0.2)]
    site.ledger_path.unlink()
    result = site.rebuild()
    assert result.changed and result.previous == "missing" and result.backup is None
    assert (result.rounds_proven, result.rounds_kept) == (3, 0)
    ledger = site.reconciled()
    assert [(e.round_id, e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries] == \
        [(e.round_id, e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    assert ledger.epsilon_spent == pytest.approx(entries[-1].epsilon_total, rel=1e-12)
    assert result.epsilon_total == pytest.approx(entries[-1].epsilon_total, rel=1e-12)
    # The rebuild is in the (still verifying) audit log, tied to the exact bytes written.
    last = site.records()[-1]
    assert last["event"] == audit.LEDGER_REBUILT
    assert last["details"]["ledger_sha256"] == hashlib.sha256(site.ledger_path.read_bytes()).hexdigest()
    assert last["details"]["previous_ledger"] == "missing" and last["details"]["rounds"] == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_ledger_rebuild_keeps_rounds_the_ledger_is_ahead(tmp_path):
    site = SiteState(tmp_path)
    site.train(0)
    crashed = site.train(1, finish=False)  # reserved, never finished: the log cannot prove it
    old = site.ledger_path.read_bytes()
    site.train(2)
    site.ledger_path.write_bytes(old)  # an older copy restored: behind (round 2) and ahead (round 1)
    with pytest.raises(LedgerError, match="round 2: missing"):
        site.reconciled()
    result = site.rebuild()
    assert (result.rounds_proven, result.rounds_kept) == (2, 1)
    assert [e.round_id for e in result.entries] == [0, 1, 2]
    assert result.entries[1] == crashed
    assert result.previous == "readable" and result.backup.read_bytes() == old
    assert site.reconciled().epsilon_spent == pytest.approx(history_epsilon(result.entries, site.terms))


def test_dropping_an_interrupted_rounds_entry_is_behind_the_audit_log(tmp_path):
    """Round 1 was reserved, then interrupted (no training_finished of its own); round 2's
    signed total counts it. A ledger without it holds every proven round, yet reads lower
    than the log proves: refused, not a smaller spend."""
    site = SiteState(tmp_path)
    site.train(0)
    site.train(1, finish=False)
    last = site.train(2)
    site.edit_ledger(lambda entries: entries.pop(1))
    with pytest.raises(LedgerError, match="below the .* that the signed audit log .* proves at seq") as caught:
        site.reconciled()
    assert "round 2" in str(caught.value) and f"{last.epsilon_total:.3f}" in str(caught.value)


def test_ledger_rebuild_restores_an_interrupted_round_that_a_later_total_counts(tmp_path):
    site = SiteState(tmp_path)
    site.train(0)
    interrupted = site.train(1, finish=False)
    last = site.train(2)
    site.ledger_path.unlink()
    result = site.rebuild()
    assert (result.rounds_proven, result.rounds_restored, result.rounds_kept) == (3, 1, 0)
    assert [e.round_id for e in result.entries] == [0, 1, 2]
    restored = result.entries[1]
    assert (restored.noise_multiplier, restored.sample_rate, restored.steps) == \
        (interrupted.noise_multiplier, interrupted.sample_rate, interrupted.steps)
    assert site.reconciled().epsilon_spent == pytest.approx(last.epsilon_total, rel=1e-12)
    assert site.records()[-1]["details"]["rounds_proven"] == 3


def test_ledger_rebuild_cannot_count_an_interrupted_last_round(tmp_path):
    """Nothing in the log counts the spend of a round interrupted after the last
    training_finished record: the rebuild holds the proven rounds (as documented)."""
    site = SiteState(tmp_path)
    proven = site.train(0)
    site.train(1, finish=False)
    site.ledger_path.unlink()
    result = site.rebuild()
    assert [e.round_id for e in result.entries] == [0] and result.rounds_restored == 0
    assert result.epsilon_total == pytest.approx(proven.epsilon_total, rel=1e-12)


def test_ledger_rebuild_of_an_unreadable_ledger_uses_the_log_and_keeps_its_bytes(tmp_path):
    site = SiteState(tmp_path)
    site.train(0)
    site.ledger_path.write_bytes(b"not json")
    result = site.rebuild()
    assert result.previous == "unreadable" and "not valid JSON" in result.previous_problem
    assert result.backup.read_bytes() == b"not json"
    assert [e.round_id for e in site.reconciled().entries] == [0]


def test_ledger_rebuild_of_a_consistent_ledger_changes_nothing(tmp_path):
    site = SiteState(tmp_path)
    site.train(0)
    site.train(1, finish=False)
    before = site.ledger_path.read_bytes(), site.log_path.read_bytes()
    result = site.rebuild()
    assert not result.changed and (result.rounds_proven, result.rounds_kept) == (1, 1)
    assert (site.ledger_path.read_bytes(), site.log_path.read_bytes()) == before


def test_ledger_rebuild_that_cannot_be_recorded_changes_nothing(tmp_path):
    site = SiteState(tmp_path)
    site.train(0)
    site.train(1)
    site.edit_ledger(lambda entries: entries.pop())
    before = site.ledger_path.read_bytes(), site.log_path.read_bytes()

    def refuse(details):
        raise RuntimeError("audit log unavailable")

    with pytest.raises(RuntimeError, match="audit log unavailable"):
        site.rebuild(record=refuse)
    assert (site.ledger_path.read_bytes(), site.log_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.head.json", "audit.jsonl", "ledger.json"]


def test_verify_ledger_covers_accepts_an_empty_log(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", site_id="a", terms=terms())
    verify_ledger_covers(ledger, [], audit_file="audit.jsonl")


def test_ledger_rebuild_puts_a_missing_round_back_in_its_place(tmp_path):
    site = SiteState(tmp_path)
    for r in range(3):
        site.train(r, steps=10 + r)
    site.edit_ledger(lambda entries: entries.pop(1))
    result = site.rebuild()
    assert [(e.round_id, e.steps) for e in result.entries] == [(0, 10), (1, 11), (2, 12)]


def test_rdp_epsilon_without_importing_torch_equals_opacus_accountant():
    """budget and audit review load Opacus's RDP analysis file on its own (the opacus
    package imports torch); the numbers must be Opacus's RDPAccountant's, bit for bit."""
    import subprocess
    import sys

    from opacus.accountants.rdp import RDPAccountant

    from blossom_secure.site.ledger import RDP_ORDERS, compute_epsilon

    assert list(RDP_ORDERS) == RDPAccountant.DEFAULT_ALPHAS
    history = [(1.1, 0.125, 8)] * 3 + [(1.3, 0.34, 3), (0.9, 0.01, 100)]
    accountant = RDPAccountant()
    accountant.history = list(history)
    assert compute_epsilon(history, accountant="rdp", delta=1e-5) == accountant.get_epsilon(delta=1e-5)
    probe = ("import sys\nfrom blossom_secure.site.ledger import compute_epsilon\n"
             f"print(repr(compute_epsilon({history!r}, accountant='rdp', delta=1e-5)), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == [repr(accountant.get_epsilon(delta=1e-5)), "False"]
