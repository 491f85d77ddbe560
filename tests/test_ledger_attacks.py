"""Attacks on a site's privacy ledger file, against the real site agent and commands.

The ledger (``state/ledger.json``) is a plain file: deleting it, or restoring an older
copy, must not give the site its privacy budget back. The signed audit log proves every
trained round (``training_finished``), so the agent refuses to start, or to take part in a
round, with a ledger behind it, and ``blossom-site ledger rebuild`` restores the spend.

The histories here are written through the real ``PrivacyLedger`` and ``AuditLog`` with the
site's own key, in the order ``SiteAgent.offer`` writes them, so no training is needed;
one test trains for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blossom_secure.audit import log as audit
from blossom_secure.config import load_federation
from blossom_secure.site.config import load_site
from blossom_secure.crypto import identity_public_key, key_fingerprint
from blossom_secure.site.keys import load_or_create_identity_key
from blossom_secure.site.ledger import LedgerError, PrivacyLedger
from blossom_secure.site.agent import SiteAgent
from tests.test_cli import assert_clean_failure, cli

SITE = "riverside"  # clinical data only: the fastest example site


def spend(site_dir: Path, rounds: list[int], *, finish: bool = True) -> list:
    """Record ``rounds`` as the site agent does (reserve, round_joined, training_finished)."""
    fed = load_federation(site_dir.parent / "federation.toml")
    site = load_site(site_dir, federation=fed)
    key, _ = load_or_create_identity_key(site.keys_dir)
    site.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    privacy = site.policy.privacy
    ledger = PrivacyLedger(site.state_dir / "ledger.json", site_id=site.id, terms=privacy)
    entries = []
    with audit.AuditLog.open(site.state_dir / "audit.jsonl", site_id=site.id, signing_key=key) as log:
        if log.last_seq is None:
            log.append(audit.SITE_INITIALISED, round_id=None, policy_sha256=None,
                       details={"key_fingerprint": key_fingerprint(identity_public_key(key))})
        for round_id in rounds:
            spent_before = ledger.epsilon_spent
            entry = ledger.reserve(round_id=round_id, noise_multiplier=privacy.noise_multiplier, sample_rate=0.1,
                                   steps=20)
            log.append(audit.ROUND_JOINED, round_id=round_id, details={}, policy_sha256=site.policy.sha256)
            if finish:
                log.append(audit.TRAINING_FINISHED, round_id=round_id, policy_sha256=site.policy.sha256, details={
                    "steps": 20, "epsilon_round": entry.epsilon_total - spent_before,
                    "epsilon_total": entry.epsilon_total, "delta": privacy.delta,
                    "noise_multiplier": privacy.noise_multiplier, "sample_rate": 0.1,
                    "accountant": privacy.accountant, "max_grad_norm": privacy.max_grad_norm})
            entries.append(entry)
    return entries


def state(site_dir: Path) -> Path:
    return site_dir / "state"


@pytest.fixture
def site_dir(copy_sites) -> Path:
    return copy_sites() / SITE


# -- the site agent ------------------------------------------------------------------------


@pytest.mark.slow
def test_deleting_the_ledger_does_not_reset_the_budget(site_dir):
    fed = load_federation(site_dir.parent / "federation.toml")
    entries = spend(site_dir, [0, 1])
    (state(site_dir) / "ledger.json").unlink()
    log_before = (state(site_dir) / "audit.jsonl").read_bytes()
    with pytest.raises(LedgerError) as info:
        SiteAgent(site_dir, fed)
    message = str(info.value)
    assert "ledger.json" in message and "ledger file is missing" in message
    assert "audit.jsonl" in message and f"{entries[-1].epsilon_total:.3f}" in message
    # nothing half-written: no empty ledger, no record added, the log's lock released
    assert not (state(site_dir) / "ledger.json").exists()
    assert (state(site_dir) / "audit.jsonl").read_bytes() == log_before
    key, _ = load_or_create_identity_key(site_dir / "keys")
    audit.AuditLog.open(state(site_dir) / "audit.jsonl", site_id=SITE, signing_key=key).close()


@pytest.mark.slow
def test_restoring_an_old_ledger_does_not_reset_the_budget(site_dir):
    fed = load_federation(site_dir.parent / "federation.toml")
    spend(site_dir, [0])
    backup = (state(site_dir) / "ledger.json").read_bytes()
    spend(site_dir, [1, 2])
    (state(site_dir) / "ledger.json").write_bytes(backup)
    with pytest.raises(LedgerError) as info:
        SiteAgent(site_dir, fed)
    assert [p.key for p in info.value.problems][:2] == ["round 1", "round 2"]
    assert (state(site_dir) / "ledger.json").read_bytes() == backup


@pytest.mark.slow
def test_ledger_ahead_of_audit_log_after_crash_is_accepted_by_the_agent(site_dir):
    fed = load_federation(site_dir.parent / "federation.toml")
    entries = spend(site_dir, [0]) + spend(site_dir, [1], finish=False)
    agent = SiteAgent(site_dir, fed)
    try:
        assert agent.ledger.entries == entries
    finally:
        agent.audit.close()


@pytest.mark.slow
def test_deleting_the_ledger_while_the_agent_runs_stops_the_next_round(site_dir):
    fed = load_federation(site_dir.parent / "federation.toml")
    spend(site_dir, [0])
    agent = SiteAgent(site_dir, fed)
    try:
        (state(site_dir) / "ledger.json").unlink()
        log_before = (state(site_dir) / "audit.jsonl").read_bytes()
        with pytest.raises(LedgerError, match="ledger file is missing"):
            agent.offer(round_id=1, global_blocks={}, secure=True)
        assert (state(site_dir) / "audit.jsonl").read_bytes() == log_before  # not joined, not declined
        assert not (state(site_dir) / "ledger.json").exists()  # nothing reserved
    finally:
        agent.audit.close()


@pytest.mark.slow
def test_site_agent_checks_its_ledger_every_round_and_rebuild_recovers(site_dir):
    """The one test that trains: two real rounds, an old ledger restored, the next round
    refused, the ledger rebuilt with the command, the spend back."""
    fed = load_federation(site_dir.parent / "federation.toml")
    agent = SiteAgent(site_dir, fed)
    try:
        first = agent.offer(round_id=0, global_blocks={}, secure=True)
        assert first.declined is None, first.declined
        backup = (state(site_dir) / "ledger.json").read_bytes()
        second = agent.offer(round_id=1, global_blocks={}, secure=True)
        assert second.declined is None and second.epsilon_total > first.epsilon_total
        spent = [(e.round_id, e.noise_multiplier, e.sample_rate, e.steps, e.epsilon_total,
                  getattr(e, "randomness", None)) for e in agent.ledger.entries]
        (state(site_dir) / "ledger.json").write_bytes(backup)
        with pytest.raises(LedgerError, match="round 1: missing"):
            agent.offer(round_id=2, global_blocks={}, secure=True)
    finally:
        agent.audit.close()
    proc = cli("blossom-site", "ledger", "rebuild", str(site_dir))
    assert proc.returncode == 0, proc.stderr
    again = SiteAgent(site_dir, fed)
    try:
        assert again.ledger.epsilon_spent == pytest.approx(second.epsilon_total, rel=1e-12)
        assert [(e.round_id, e.noise_multiplier, e.sample_rate, e.steps, e.epsilon_total,
                 getattr(e, "randomness", None)) for e in again.ledger.entries] == spent
    finally:
        again.audit.close()


# -- the commands --------------------------------------------------------------------------


def test_cli_ledger_behind_exits_2_and_rebuild_restores_it(tiny_sites, tmp_path):
    site = tiny_sites / "st-mary"
    entries = spend(site, [0, 1, 2])
    (state(site) / "ledger.json").unlink()

    behind = cli("blossom-site", "budget", str(site))
    assert_clean_failure(behind, 2)
    assert "ledger.json" in behind.stderr and "ledger file is missing" in behind.stderr
    assert "blossom-site ledger rebuild" in behind.stderr

    rebuilt = cli("blossom-site", "ledger", "rebuild", str(site))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "Traceback" not in rebuilt.stdout + rebuilt.stderr
    assert "3 rounds: 3 proven" in rebuilt.stdout and "previous ledger: missing" in rebuilt.stdout
    assert f"epsilon {entries[-1].epsilon_total:.3f}" in rebuilt.stdout

    budget = cli("blossom-site", "budget", str(site))
    assert budget.returncode == 0, budget.stderr
    assert f"spent {entries[-1].epsilon_total:.3f}" in budget.stdout

    assert cli("blossom-site", "audit", "verify", str(site)).returncode == 0
    html = tmp_path / "review.html"
    review = cli("blossom-site", "audit", "review", str(site), "--html", str(html))
    assert review.returncode == 0, review.stderr
    assert "ledger_rebuilt" in html.read_text()

    again = cli("blossom-site", "ledger", "rebuild", str(site))
    assert again.returncode == 0 and "nothing changed" in again.stdout


def test_deleting_the_ledger_after_an_interrupted_round_does_not_drop_its_spend(tiny_sites):
    """Round 1 was reserved and interrupted; round 2's signed total counts it. After the
    ledger is deleted, the rebuild restores round 1, and budget shows the log's total."""
    site = tiny_sites / "st-mary"
    spend(site, [0])
    spend(site, [1], finish=False)
    last = spend(site, [2])[-1]
    (state(site) / "ledger.json").unlink()
    rebuilt = cli("blossom-site", "ledger", "rebuild", str(site))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "3 rounds: 2 proven" in rebuilt.stdout and "1 interrupted round(s) restored" in rebuilt.stdout
    budget = cli("blossom-site", "budget", str(site))
    assert budget.returncode == 0, budget.stderr
    assert f"spent {last.epsilon_total:.3f}" in budget.stdout
    rows = [line for line in budget.stdout.splitlines() if line.startswith("│")]
    assert [int(line.split("│")[1]) for line in rows] == [0, 1, 2]
    assert [line.split("│")[-2].strip() for line in rows] == ["finished", "interrupted (counted)", "finished"]
    assert "round(s) 1: reserved before training and never finished" in budget.stdout
    # the ledger without round 1 again: refused, never the smaller number
    data = json.loads((state(site) / "ledger.json").read_text())
    data["entries"] = [e for e in data["entries"] if e["round_id"] != 1]
    (state(site) / "ledger.json").write_text(json.dumps(data))
    behind = cli("blossom-site", "budget", str(site))
    assert_clean_failure(behind, 2)
    assert "a round reserved before it (joined, never finished) is missing" in " ".join(behind.stderr.split())


def test_ledger_rebuild_refuses_a_tampered_audit_log(tiny_sites):
    site = tiny_sites / "st-mary"
    spend(site, [0, 1])
    (state(site) / "ledger.json").unlink()
    log = state(site) / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    index = max(i for i, line in enumerate(lines) if b'"training_finished"' in line)
    record = json.loads(lines[index])
    record["details"]["epsilon_total"] = 0.01  # "we spent almost nothing"
    lines[index] = audit.canonical_bytes(record) + b"\n"
    log.write_bytes(b"".join(lines))
    proc = cli("blossom-site", "ledger", "rebuild", str(site))
    assert_clean_failure(proc, 1)
    assert f"line {index + 1}" in proc.stderr and "signature does not verify" in proc.stderr
    assert not (state(site) / "ledger.json").exists()
    assert log.read_bytes() == b"".join(lines)


def test_ledger_rebuild_refuses_while_the_agent_holds_the_log(tiny_sites):
    site = tiny_sites / "st-mary"
    spend(site, [0])
    key, _ = load_or_create_identity_key(site / "keys")
    with audit.AuditLog.open(state(site) / "audit.jsonl", site_id="st-mary", signing_key=key):
        proc = cli("blossom-site", "ledger", "rebuild", str(site))
    assert_clean_failure(proc, 2)
    assert "stop the site agent" in proc.stderr


def test_ledger_rebuild_without_an_audit_log(tiny_sites):
    site = tiny_sites / "st-mary"
    load_or_create_identity_key(site / "keys")
    proc = cli("blossom-site", "ledger", "rebuild", str(site))
    assert_clean_failure(proc, 2)
    assert "audit.jsonl" in proc.stderr and "nothing to rebuild" in proc.stderr
