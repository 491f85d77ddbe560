"""The privacy ledger: Opacus-exact epsilons, durable before release, budget enforced."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from blossom_secure.errors import PrivacyBudgetExceededError
from blossom_secure.policy import PrivacyTerms
from blossom_secure.privacy import LedgerError, PrivacyLedger, compute_epsilon, noise_for_target
from blossom_secure.training import plan_round


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
        from blossom_secure.policy import PrivacyTerms
        from blossom_secure.privacy import PrivacyLedger
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
