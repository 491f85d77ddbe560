"""The deployment's ServerApp and ClientApp on Flower's simulation engine (Ray): one virtual
SuperNode per site folder. One round of the tiny federation equals the embedded runtime's
(same seeds) and every site's audit log verifies and accounts for every byte the
coordinator took. Which site a virtual SuperNode is comes from the simulation's own
settings, never from the coordinator, and a deployed SuperNode's ``site-dir`` wins.

The round needs ``flwr[simulation]`` (the ``simulation`` extra) and Ray's start-up:
marked ``slow``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import flwr  # noqa: F401 - the flower extra is part of the README install; missing it is a failure

from blossom_secure.config import load_federation
from blossom_secure.coordinator.steps import metrics_document
from blossom_secure.errors import PolicyError
from blossom_secure.roster import load_roster
from blossom_secure.runtimes.flower.apps import SIMULATION_SEED_ENV, SIMULATION_SITES_ENV, node_site
from blossom_secure.runtimes.flower.simulation import prepare_sites, run_simulation
from blossom_secure.secagg.terms import secagg_params
from blossom_secure.site.config import load_site, site_dirs
from tests.test_flower_rounds import SEED, embedded, flower_copy, records_of  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


# ------------------------------------------------------------- which site a node answers for


def test_virtual_supernode_is_the_sorted_site_folder_of_its_partition(tiny_sites):
    env = {SIMULATION_SITES_ENV: str(tiny_sites), SIMULATION_SEED_ENV: "5"}
    dirs = site_dirs(tiny_sites)
    assert [d.name for d in dirs] == ["lakeside", "northgate", "riverside", "st-mary"]  # by path, not by id
    for i, d in enumerate(dirs):
        files, seed = node_site({"partition-id": i, "num-partitions": len(dirs)}, env)
        assert (files.site_dir, files.federation_file, files.roster_file, seed) == (d, None, None, 5)
    files, seed = node_site({"partition-id": 0, "num-partitions": len(dirs)}, {SIMULATION_SITES_ENV: str(tiny_sites)})
    assert seed is None


def test_deployed_supernode_site_dir_wins_over_simulation_settings(tiny_sites, tmp_path):
    env = {SIMULATION_SITES_ENV: str(tmp_path / "elsewhere"), SIMULATION_SEED_ENV: "9"}
    own = tiny_sites / "st-mary"
    files, seed = node_site({"site-dir": str(own), "coordinator": "127.0.0.1:9092", "partition-id": 0,
                             "num-partitions": 4}, env)
    assert (files.site_dir, files.coordinator, seed) == (own, "127.0.0.1:9092", None)


def test_deployed_supernode_that_names_no_coordinator_answers_nothing(tiny_sites):
    """Without the address its own join command connected it to, a site could only check the
    federation file's word for who the coordinator is: refused."""
    with pytest.raises(ValueError, match="'coordinator'"):
        node_site({"site-dir": str(tiny_sites / "st-mary")}, {})


def test_node_with_partition_keys_but_no_simulation_environment_answers_for_no_site(tiny_sites):
    # what a coordinator controls (run config, messages) is not an input: without the
    # simulation's own environment, Flower's partition keys name no folder
    with pytest.raises(ValueError, match=SIMULATION_SITES_ENV):
        node_site({"partition-id": 0, "num-partitions": 4}, {})
    with pytest.raises(ValueError, match="site-dir"):
        node_site({}, {SIMULATION_SITES_ENV: str(tiny_sites)})


@pytest.mark.parametrize("node,env_seed,message", [
    ({"partition-id": 4, "num-partitions": 4}, "", "partition-id"),
    ({"partition-id": -1, "num-partitions": 4}, "", "partition-id"),
    ({"partition-id": "0", "num-partitions": 4}, "", "partition-id"),
    ({"partition-id": True, "num-partitions": 4}, "", "partition-id"),
    ({"partition-id": 0, "num-partitions": 5}, "", "holds 4 site folders"),
    ({"partition-id": 0, "num-partitions": 4}, "-3", SIMULATION_SEED_ENV),
    ({"partition-id": 0, "num-partitions": 4}, "1e3", SIMULATION_SEED_ENV),
])
def test_simulation_settings_that_do_not_fit_the_node_are_refused(tiny_sites, node, env_seed, message):
    env = {SIMULATION_SITES_ENV: str(tiny_sites)}
    if env_seed:
        env[SIMULATION_SEED_ENV] = env_seed
    with pytest.raises(ValueError, match=message):
        node_site(node, env)


# ------------------------------------------------------------------------------ preparation


def test_prepare_writes_a_roster_from_the_sites_keys_and_checks_an_existing_one(tiny_sites):
    prepared = prepare_sites(tiny_sites)
    assert prepared.roster_written and prepared.first_round == 0
    assert prepared.site_dirs == tuple(site_dirs(tiny_sites.resolve()))
    federation = load_federation(tiny_sites / "federation.toml")
    roster = load_roster(prepared.roster_file, federation=federation)
    assert sorted(roster) == sorted(prepared.site_ids) == sorted(load_site(d).id for d in prepared.site_dirs)
    assert not prepare_sites(tiny_sites).roster_written  # the same roster, read and checked
    # a roster whose key for a site is not the site's own key: refused, nothing started
    other = tiny_sites.parent / "other"
    shutil.copytree(tiny_sites, other / "sites", ignore=shutil.ignore_patterns("keys", "state", "roster.toml"))
    shutil.copytree(tiny_sites.parent / "policies", other / "policies")
    prepare_sites(other / "sites")
    shutil.copy(other / "sites" / "roster.toml", tiny_sites / "roster.toml")
    with pytest.raises(PolicyError, match="not the key in the site's keys"):
        prepare_sites(tiny_sites)


def test_fresh_is_refused_for_a_site_with_patient_data(tiny_sites):
    site_file = tiny_sites / "riverside" / "site.toml"
    text = site_file.read_text()
    site_file.write_text(text[:text.index("[synth]")])
    with pytest.raises(PolicyError, match="synthetic"):
        prepare_sites(tiny_sites, fresh=True)


def test_prepare_refuses_sites_that_cannot_form_the_simulation(tiny_sites):
    lone = tiny_sites.parent / "lone"
    lone.mkdir()
    shutil.copy(tiny_sites / "federation.toml", lone / "federation.toml")
    shutil.copytree(tiny_sites / "st-mary", lone / "st-mary")
    with pytest.raises(PolicyError, match="at least 2"):
        prepare_sites(lone)
    # a site bound to another federation file, and two folders with one site id
    shutil.copytree(tiny_sites / "st-mary", tiny_sites / "st-mary-copy")
    other = tiny_sites / "riverside" / "site.toml"
    shutil.copy(tiny_sites / "federation.toml", tiny_sites / "other-federation.toml")
    other.write_text(other.read_text().replace('federation = "../federation.toml"',
                                               'federation = "../other-federation.toml"'))
    with pytest.raises(PolicyError) as refused:
        prepare_sites(tiny_sites)
    reasons = sorted((Path(p.file).parent.name, p.key) for p in refused.value.problems)
    assert reasons == [("riverside", "site.federation"), ("st-mary-copy", "site.id")]


def test_prepare_refuses_a_roster_site_without_a_folder(tiny_sites):
    prepare_sites(tiny_sites)
    shutil.rmtree(tiny_sites / "riverside")
    with pytest.raises(PolicyError, match="no site folder has this id"):
        prepare_sites(tiny_sites)


def test_command_refuses_bad_arguments_in_one_line(tiny_sites, tmp_path, capsys):
    from blossom_secure.runtimes.flower.simulation import main

    assert main(["--sites", str(tiny_sites), "--out", str(tmp_path / "out"), "--rounds", "0"]) == 2
    assert main(["--sites", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "rounds must be at least 1" in err and "Traceback" not in err


def test_command_reports_a_failed_run_in_one_line_with_exit_4(tiny_sites, tmp_path, capsys, monkeypatch):
    from blossom_secure.runtimes.flower import simulation

    def failed(**kwargs):
        raise RuntimeError("only 3 of 4 sites proved their identity in time\nmore detail")

    monkeypatch.setattr(simulation, "run_simulation", failed)
    assert simulation.main(["--sites", str(tiny_sites), "--out", str(tmp_path / "out")]) == 4
    err = capsys.readouterr().err.strip()
    assert err == "error: the run failed: only 3 of 4 sites proved their identity in time"


# ---------------------------------------------------------------------------- the round


@pytest.mark.slow
def test_one_round_on_flowers_simulation_engine_equals_embedded_runtime(tiny_sites_with_data, tmp_path, embedded):
    sites = flower_copy(tiny_sites_with_data, tmp_path)
    timed: list[int] = []
    metrics = run_simulation(sites_root=sites, out_dir=tmp_path / "out", rounds=1, seed=SEED, num_cpus=2,
                             client_num_cpus=1.0, stage_timeout_s=300.0,
                             on_round=lambda round_id, seconds: timed.append(round_id))
    assert timed == [0]
    doc = json.loads(metrics.read_text())
    reference_report, reference_blocks = embedded
    assert doc["blocks"]["0"] == reference_report.blocks
    federation = load_federation(sites / "federation.toml")
    roster = load_roster(sites / "roster.toml", federation=federation)
    bound = 2.0 ** -(secagg_params(federation, roster_size=len(roster)).scale_bits + 1) + 1e-6
    with np.load(metrics.parent / "global_blocks.npz") as g:
        assert set(g.files) == set(reference_blocks) == {"encoder.image", "encoder.tabular", "fusion"}
        for block in g.files:
            assert np.abs(g[block].astype(np.float64) - reference_blocks[block]).max() <= bound, block
    # the same training and evaluation as the embedded runtime: the same released reports
    assert doc["metrics"] == metrics_document(federation, roster, [reference_report], seed=SEED)["metrics"]
    for site_dir in site_dirs(sites):
        records = records_of(site_dir, roster)  # verifies the whole log against the roster key
        site_id = records[0]["site_id"]
        logged = sum(r["details"]["payload_bytes"] for r in records if r["event"] == "egress" and r["round_id"] == 0)
        assert logged == doc["bytes_received"]["0"][site_id] > 0
        assert any(r["event"] == "egress" and r["details"]["message_type"] == "identify" for r in records)
