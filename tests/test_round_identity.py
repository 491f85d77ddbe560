"""A round has one identity over the life of a federation: the coordinator's round number
only increases across runs, and a site refuses a number it already answered; every surface
(demo table, metrics.json, budget, review, HTML) shows that numbering and the ledger's totals
after any number of runs, interruptions and restarts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from blossom_secure.audit import log as audit
from blossom_secure.audit.report import summarise
from blossom_secure.config import load_federation
from blossom_secure.coordinator.counter import RoundCounterError, read_next_round, write_next_round
from blossom_secure.crypto import identity_public_key
from blossom_secure.runtimes.embedded.federation import simulate
from blossom_secure.site.config import load_site
from blossom_secure.site.keys import load_identity_key
from blossom_secure.site.ledger import load_reconciled_ledger
from blossom_secure.site.round_identity import StaleRoundError, check_round_is_new, last_round_answered
from tests.test_cli import cli

SITES = ("lakeside", "northgate", "riverside", "st-mary")


def verified(site_dir: Path):
    fed = load_federation(site_dir.parent / "federation.toml")
    site = load_site(site_dir, federation=fed)
    log_path = site.state_dir / "audit.jsonl"
    _, records = audit.read_verified_records(log_path, public_key=identity_public_key(load_identity_key(site.keys_dir)))
    ledger = load_reconciled_ledger(site.state_dir / "ledger.json", site_id=site.id, terms=site.policy.privacy,
                                    records=records, audit_file=str(log_path))
    return site, records, ledger


def state_bytes(sites: Path) -> dict[str, bytes]:
    return {str(p.relative_to(sites)): p.read_bytes() for p in sorted(sites.glob("*/state/*")) if p.is_file()}


# -- the pure parts ---------------------------------------------------------------------------


def test_round_counter_round_trip_and_refusals(tmp_path):
    path = tmp_path / "coordinator-state.json"
    assert read_next_round(path, "fed") == 0
    write_next_round(path, "fed", 7)
    assert read_next_round(path, "fed") == 7
    with pytest.raises(RoundCounterError, match="'fed', not 'other'"):
        read_next_round(path, "other")
    for bad in ('{"format": 1, "federation": "fed", "next_round": -1}', '{"format": 2}', "not json", "[]",
                '{"format": 1, "federation": "fed", "next_round": true}'):
        path.write_text(bad)
        with pytest.raises(RoundCounterError):
            read_next_round(path, "fed")
    with pytest.raises(ValueError):
        write_next_round(path, "fed", -1)


def test_replayed_or_restarted_round_number_is_refused():
    records = [{"event": "round_joined", "round_id": 4}, {"event": "round_declined", "round_id": 5},
               {"event": "training_finished", "round_id": 9}]
    assert last_round_answered(records) == 5
    check_round_is_new(records, 6)
    for stale in (0, 5):
        with pytest.raises(StaleRoundError) as caught:
            check_round_is_new(records, stale)
        assert caught.value.last_answered == 5 and caught.value.round_id == stale
    check_round_is_new([], 0)


# -- the embedded federation, run after run ------------------------------------------------------


@pytest.mark.slow
def test_three_runs_one_interrupted_then_every_surface_agrees_with_the_ledger(copy_sites, tmp_path, monkeypatch):
    import blossom_secure.site.agent as site_agent

    sites = copy_sites()
    for policy in (sites.parent / "policies").glob("*.toml"):  # room for every round: no budget declines
        policy.write_text(re.sub(r"epsilon_budget = [0-9.]+", "epsilon_budget = 50.0", policy.read_text()))
    out = tmp_path / "out"
    first = simulate(sites_root=sites, rounds=1, out_dir=out, seed=0)
    assert first.round_ids == [0]

    # Run 2 is interrupted in its second round, while northgate trains (after lakeside
    # trained that round, before riverside and st-mary heard of it).
    real_train = site_agent.train_dp
    calls = []

    def train_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(site_agent, "train_dp", train_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        simulate(sites_root=sites, rounds=2, out_dir=out, seed=0)
    monkeypatch.setattr(site_agent, "train_dp", real_train)
    assert read_next_round(out / "coordinator-state.json", "blossom-demo") == 3
    # metrics.json is the last finished run's, as the operator guide says
    assert json.loads((out / "metrics.json").read_text())["round_ids"] == [0]

    third = simulate(sites_root=sites, rounds=1, out_dir=out, seed=0)
    assert third.round_ids == [3]  # round 2 is never announced again
    doc = json.loads(third.metrics_path.read_text())
    assert doc["round_ids"] == [3] and {r["round"] for r in doc["metrics"]} == {3}

    answered = {"lakeside": [0, 1, 2, 3], "northgate": [0, 1, 2, 3], "riverside": [0, 1, 3], "st-mary": [0, 1, 3]}
    for site_id in SITES:
        site, records, ledger = verified(sites / site_id)
        review = summarise(records)
        assert [r.round_id for r in review.rounds] == answered[site_id]  # one row per round, no reuse
        assert all(r.occurrence == 1 for r in review.rounds)
        trained = [r.round_id for r in review.rounds if r.training is not None]
        interrupted = [2] if site_id == "northgate" else []
        assert [e.round_id for e in ledger.entries] == sorted(trained + interrupted)
        # the log's last total is the ledger's (the interrupted round stays counted in both)
        assert review.epsilon_total == pytest.approx(ledger.epsilon_spent, rel=1e-9)
        metrics_eps = {r["epsilon"] for r in doc["metrics"] if r["site"] == site_id}
        assert metrics_eps and all(e == pytest.approx(ledger.epsilon_spent, rel=1e-9) for e in metrics_eps)
        if site_id == "northgate":
            assert trained == [0, 1, 3]
            assert review.round(2).status == "joined, error"
            assert review.round(2).incidents[0].text == "interrupted (KeyboardInterrupt) during the round"
        assert sorted(trained + interrupted) == answered[site_id]

    # the operator's commands: the same numbering and the same totals as the ledger
    _, _, ledger = verified(sites / "northgate")
    total = f"{ledger.epsilon_spent:.3f}"
    budget = cli("blossom-site", "budget", str(sites / "northgate"))
    assert budget.returncode == 0, budget.stderr
    rows = [line for line in budget.stdout.splitlines() if re.match(r"^│\s+\d+ │", line)]
    assert [int(line.split("│")[1]) for line in rows] == [0, 1, 2, 3]
    assert f"spent {total} of" in budget.stdout
    html = tmp_path / "northgate.html"
    review = cli("blossom-site", "audit", "review", str(sites / "northgate"), "--html", str(html))
    assert review.returncode == 0, review.stderr
    flat = " ".join(review.stdout.split())
    assert f"epsilon spent: {total} of the budget" in flat and "the signed audit log proves the same" in flat
    assert "joined, error" in flat and "reused" not in flat
    page = html.read_text()
    assert f"{total} of the budget" in page and "VERIFIED at" in page


@pytest.mark.slow
def test_a_second_coordinator_folder_cannot_reuse_round_numbers(copy_sites, tmp_path):
    sites = copy_sites()
    simulate(sites_root=sites, rounds=1, out_dir=tmp_path / "out", seed=0)
    before = state_bytes(sites)
    with pytest.raises(RoundCounterError, match="already answered a round as late as"):
        simulate(sites_root=sites, rounds=1, out_dir=tmp_path / "elsewhere", seed=0)
    assert state_bytes(sites) == before  # nothing recorded, reserved or trained
    assert not (tmp_path / "elsewhere").exists()
    proc = cli("blossom", "simulate", "--sites", str(sites), "--out", str(tmp_path / "elsewhere"), "--rounds", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "coordinator-state.json: next_round:" in proc.stderr
    assert state_bytes(sites) == before


@pytest.mark.slow
def test_a_site_agent_refuses_a_round_it_already_answered(copy_sites, tmp_path):
    from blossom_secure.site.agent import SiteAgent

    sites = copy_sites()
    simulate(sites_root=sites, rounds=1, out_dir=tmp_path / "out", seed=0)
    fed = load_federation(sites / "federation.toml")
    agent = SiteAgent(sites / "riverside", fed, seed=0)
    try:
        ledger_before = (sites / "riverside" / "state" / "ledger.json").read_bytes()
        with pytest.raises(StaleRoundError):
            agent.offer(round_id=0, global_blocks={}, secure=True)
        assert (sites / "riverside" / "state" / "ledger.json").read_bytes() == ledger_before
        _, records = agent.audit.verified_records()
        assert records[-1]["event"] == "error" and records[-1]["details"]["error_type"] == "StaleRoundError"
        answers = [r for r in records if r["event"] in ("round_joined", "round_declined") and r["round_id"] == 0]
        assert len(answers) == 1  # the first run's answer only
    finally:
        agent.audit.close()


@pytest.mark.slow
def test_demo_table_numbers_rounds_as_the_audit_tools_do(copy_sites, tmp_path):
    sites = copy_sites()
    out = tmp_path / "run"
    for expected in ("round 0", "round 1"):
        proc = cli("blossom", "simulate", "--sites", str(sites), "--out", str(out), "--rounds", "1")
        assert proc.returncode == 0, proc.stderr
        titles = re.findall(r"^round \d+", proc.stdout, flags=re.M)
        assert titles == [expected]
    review = cli("blossom-site", "audit", "review", str(sites / "st-mary"))
    rows = [line for line in review.stdout.splitlines() if re.match(r"^│\s+\d+ │ joined", line)]
    assert [int(line.split("│")[1]) for line in rows] == [0, 1]
