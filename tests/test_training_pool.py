"""Sites of a round trained in worker processes (the embedded runtime's training pool):
the same round as one site after the other, and a site whose training fails in a worker is
recorded and raised like one that fails in the coordinator's process."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from blossom_secure.audit import log as audit
from blossom_secure.config import load_federation
from blossom_secure.crypto import identity_public_key
from blossom_secure.runtimes.embedded.federation import Coordinator, make_aggregator, simulate
from blossom_secure.runtimes.embedded.training_pool import TrainingPool
from blossom_secure.site.agent import SiteAgent
from blossom_secure.site.config import AUDIT_FILE, site_dirs


@pytest.fixture
def one_torch_thread():
    """Both arms with one torch thread (a worker's), so their float sums add in one order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _events(site_dir: Path) -> list[dict]:
    records = audit.read_records(site_dir / "state" / AUDIT_FILE)
    return [{k: r[k] for k in ("round_id", "event")} | {"details": r["details"]} for r in records
            if r["event"] in (audit.ROUND_JOINED, audit.TRAINING_FINISHED, audit.ERROR)]


@pytest.mark.slow
def test_sites_trained_in_worker_processes_give_the_round_of_one_process(tmp_path, tiny_sites_with_data,
                                                                         one_torch_thread):
    """Two secure rounds of the seeded tiny federation with 2 workers: the same metrics,
    global blocks, ledger epsilons and audit training records as with none."""
    runs = {}
    for workers in (1, 2):
        root = tmp_path / f"w{workers}"
        shutil.copytree(tiny_sites_with_data.parent / "policies", root / "policies")
        shutil.copytree(tiny_sites_with_data, root / "sites")
        simulate(sites_root=root / "sites", rounds=2, out_dir=root / "out", seed=3, workers=workers)
        metrics = json.loads((root / "out" / "metrics.json").read_text())
        blocks = dict(np.load(root / "out" / "global_blocks.npz"))
        events = {d.name: _events(d) for d in site_dirs(root / "sites")}
        runs[workers] = (metrics, blocks, events)
    (m1, b1, e1), (m2, b2, e2) = runs[1], runs[2]
    assert json.dumps(m1, sort_keys=True) == json.dumps(m2, sort_keys=True)
    assert b1.keys() == b2.keys() and all(np.array_equal(b1[k], b2[k]) for k in b1)
    assert e1 == e2
    assert all(any(e["event"] == audit.TRAINING_FINISHED for e in events) for events in e2.values())


def test_a_site_whose_training_fails_in_a_worker_records_it_and_the_others_finish(copy_sites):
    """One site's training data lose their labels after it joined: its DP training raises
    in the worker. The round stops with that error, the site's log records it, and the
    other sites, which trained, record their training (their epsilon was spent) before the
    error is raised."""
    sites = copy_sites()
    federation = load_federation(sites / "federation.toml")
    agents = [SiteAgent(d, federation, seed=1) for d in site_dirs(sites)]
    broken = next(a for a in agents if a.refusal(secure=True) is None)
    broken.tensors = dataclasses.replace(broken.tensors, labels={})
    try:
        with TrainingPool(2) as pool:
            coordinator = Coordinator(federation, agents, mode="blockwise", seed=1, pool=pool,
                                      aggregator=make_aggregator(federation, agents, secure=True))
            with pytest.raises(KeyError):
                coordinator.run_round(0)
    finally:
        for agent in agents:
            agent.audit.close()
    for agent in agents:
        _, records = audit.read_verified_records(agent.config.state_dir / AUDIT_FILE,
                                                 public_key=identity_public_key(agent.identity_key))
        events = [r["event"] for r in records if r["round_id"] == 0]
        if agent is broken:
            assert events == [audit.ROUND_JOINED, audit.ERROR]
            assert records[-1]["details"]["error_type"] == "KeyError"
        elif agent.refusal(secure=True) is None:
            assert events == [audit.ROUND_JOINED, audit.TRAINING_FINISHED]


def test_a_pool_needs_two_workers():
    for workers in (0, 1, True, 2.0):
        with pytest.raises(ValueError, match="at least 2 workers"):
            TrainingPool(workers)


def test_simulate_refuses_a_bad_worker_count(tiny_sites):
    for workers in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="workers"):
            simulate(sites_root=tiny_sites, rounds=1, out_dir=tiny_sites.parent / "out", workers=workers)


@pytest.mark.parametrize("value", ["0", "two"])
def test_simulate_command_refuses_a_bad_worker_count_before_anything_runs(tiny_sites, value):
    from tests.test_cli import cli

    done = cli("blossom", "simulate", "--sites", str(tiny_sites), "--out", str(tiny_sites.parent / "out"), "--workers", value)
    assert done.returncode == 2, done.stderr
    assert "--workers" in done.stderr and "Traceback" not in done.stderr
    assert not (tiny_sites.parent / "out").exists()
