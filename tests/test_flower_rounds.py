"""The deployment runtime's round, without Flower: the coordinator's driver
(:mod:`blossom_secure.coordinator.steps`) sends each request to the
site's step (:mod:`blossom_secure.site.steps`) in this process (the real processes, one
per request as Flower runs a ClientApp, are in ``test_flower_deployment``), and the result is the embedded
runtime's, every site's audit log verifies and accounts for every byte the coordinator
took, and a dropout after the masked input does not stop the round."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from blossom_secure.audit import log as audit
from blossom_secure.errors import BlossomError
from blossom_secure.config import load_federation
from blossom_secure.site.config import load_site, site_dirs
from blossom_secure.runtimes.embedded.federation import simulate
from blossom_secure.site import steps as site_steps
from blossom_secure.coordinator.checkpoint import load_checkpoint, save_checkpoint
from blossom_secure.coordinator.steps import RoundCoordinator, metrics_document
from blossom_secure.roster import load_roster, write_roster
from blossom_secure.site.steps import (
    PolicyChangedError,
    SiteFiles,
    StaleRoundError,
    handle_request,
    site_identity,
)
from blossom_secure.secagg.errors import StageOrderError
from blossom_secure.secagg.terms import secagg_params

pytestmark = pytest.mark.slow

SEED = 5
STAGES = ["advertise_keys", "share_keys", "masked_input", "consistency", "unmask"]


def flower_copy(src: Path, dest: Path) -> Path:
    """A fresh copy of the tiny federation, its sites initialised and listed in a roster."""
    shutil.copytree(src.parent / "policies", dest / "policies")
    shutil.copytree(src, dest / "sites", ignore=shutil.ignore_patterns("keys", "state"))
    sites = dest / "sites"
    federation = load_federation(sites / "federation.toml")
    keys = dict(site_identity(SiteFiles(d)) for d in site_dirs(sites))
    write_roster(sites / "roster.toml", federation=federation, keys=keys)
    return sites


@pytest.fixture(scope="module")
def embedded(tiny_sites_with_data, tmp_path_factory):
    """One secure round of the embedded runtime (same seed): the reference."""
    dest = tmp_path_factory.mktemp("embedded")
    shutil.copytree(tiny_sites_with_data.parent / "policies", dest / "policies")
    shutil.copytree(tiny_sites_with_data, dest / "sites")
    result = simulate(sites_root=dest / "sites", rounds=1, out_dir=dest / "out", seed=SEED, secure=True)
    with np.load(result.out_dir / "global_blocks.npz") as g:
        blocks = {k: g[k] for k in g.files}
    return result.rounds[0], blocks


class InProcess:
    """``send`` calling each site's step in this process; ``drop`` stops a site after a stage."""

    def __init__(self, sites: Path, *, drop_after: dict[str, str] | None = None) -> None:
        self.files = {sid: SiteFiles(d) for d in site_dirs(sites)
                      for sid in [load_site(d).id]}
        self.drop_after = dict(drop_after or {})
        self.gone: set[str] = set()
        self.sent: list[tuple[str, str, bytes, bytes]] = []  # (stage, site, request, reply)
        self.refused: list[tuple[str, str, BlossomError]] = []
        self.after = None  # called as after(stage, site) once a site has answered

    def answer(self, site: str, request: bytes) -> bytes:
        return handle_request(self.files[site], request, seed=SEED)

    def __call__(self, stage: str, requests):
        replies = {}
        for site, request in sorted(requests.items()):
            if site in self.gone:
                continue
            try:
                replies[site] = self.answer(site, request)
            except BlossomError as exc:  # a refusal: no reply, as over Flower
                self.refused.append((stage, site, exc))
                continue
            self.sent.append((stage, site, request, replies[site]))
            if self.drop_after.get(site) == stage:
                self.gone.add(site)
            if self.after is not None:
                self.after(stage, site)
        return replies


def coordinator_for(sites: Path) -> RoundCoordinator:
    federation = load_federation(sites / "federation.toml")
    return RoundCoordinator(federation, load_roster(sites / "roster.toml", federation=federation), seed=SEED)


def records_of(site_dir: Path, roster) -> list[dict]:
    """The site's audit records, after verifying the whole log against its roster key."""
    site = load_site(site_dir)
    path = site_dir / "state" / site_steps.AUDIT_FILE
    audit.verify_log(path, public_key=roster[site.id])
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_equals_embedded(coordinator: RoundCoordinator, report, embedded) -> None:
    reference_report, reference_blocks = embedded
    params = secagg_params(coordinator.federation, roster_size=len(coordinator.roster))
    bound = 2.0 ** -(params.scale_bits + 1) + 1e-6  # as test_federation's secure-vs-plaintext bound
    assert set(coordinator.global_blocks) == set(reference_blocks) == {"encoder.image", "encoder.tabular", "fusion"}
    for block, value in reference_blocks.items():
        diff = np.abs(coordinator.global_blocks[block].astype(np.float64) - value.astype(np.float64)).max()
        assert diff <= bound, (block, diff, bound)
    assert report.blocks == reference_report.blocks
    assert report.sites == reference_report.sites  # the same reports: same training, same evaluation


def assert_audit_accounts_for_every_byte(sites: Path, coordinator: RoundCoordinator, reports) -> None:
    for site_dir in site_dirs(sites):
        records = records_of(site_dir, coordinator.roster)
        site_id = records[0]["site_id"]
        for report in reports:
            logged = sum(r["details"]["payload_bytes"] for r in records
                         if r["event"] == "egress" and r["round_id"] == report.round_id)
            assert logged == report.bytes_received[site_id] > 0, (site_id, report.round_id)


def test_round_with_steps_in_process_equals_embedded_runtime(tiny_sites_with_data, tmp_path, embedded):
    sites = flower_copy(tiny_sites_with_data, tmp_path)
    coordinator = coordinator_for(sites)
    send = InProcess(sites)
    report = coordinator.run_round(0, send)
    assert coordinator.last_site_errors == {}
    assert_equals_embedded(coordinator, report, embedded)
    assert_audit_accounts_for_every_byte(sites, coordinator, [report])
    for site_dir in site_dirs(sites):
        records = records_of(site_dir, coordinator.roster)
        stages = [r["details"]["stage"] for r in records if r["event"] == "secagg_stage_completed"]
        assert stages == STAGES
        assert not any(r["event"] in ("secagg_aborted", "error") for r in records)
        state = site_dir / "state"
        assert not list(state.glob("secagg-round-*.json")) and not list(state.glob("flower-update-*.npz"))
    # the same finish request again: the same bytes, never a second report
    stage, site, request, reply = send.sent[-1]
    assert stage == "finish" and handle_request(send.files[site], request, seed=SEED) == reply
    # an unmask request after the round is over: refused
    unmask = next(item for item in send.sent if item[0] == "unmask" and item[1] == site)
    with pytest.raises(StageOrderError):
        handle_request(send.files[site], unmask[2], seed=SEED)
    doc = metrics_document(coordinator.federation, coordinator.roster, [report], seed=SEED)
    path = save_checkpoint(tmp_path / "out", coordinator.federation, [report], coordinator.global_blocks, doc)
    assert {r["site"] for r in json.loads(path.read_text())["metrics"]} == set(coordinator.roster)
    # a restarted coordinator continues from exactly these blocks and keeps the report
    resumed = load_checkpoint(tmp_path / "out", coordinator.federation, block_sizes=coordinator.block_sizes)
    assert resumed.last_round == 0 and resumed.reports == [report]
    assert all(np.array_equal(resumed.global_blocks[b], v) for b, v in coordinator.global_blocks.items())


def test_site_dropped_after_masked_input_does_not_stop_the_round(tiny_sites_with_data, tmp_path):
    sites = flower_copy(tiny_sites_with_data, tmp_path)
    coordinator = coordinator_for(sites)
    send = InProcess(sites, drop_after={"riverside": "masked_input"})
    first = coordinator.run_round(0, send)
    # riverside's input is in both of its blocks (its self mask removed from t = 2 survivors' shares)
    assert first.blocks["encoder.tabular"] == {"contributors": ["lakeside", "riverside", "st-mary"], "failure": None}
    assert first.blocks["fusion"] == {"contributors": ["northgate", "riverside", "st-mary"], "failure": None}
    assert first.blocks["encoder.image"]["failure"] is None
    assert first.sites["riverside"]["joined"] and not first.sites["riverside"]["reported"]
    assert all(first.sites[s]["reported"] for s in ("lakeside", "northgate", "st-mary"))
    assert_audit_accounts_for_every_byte(sites, coordinator, [first])
    riverside = send.files["riverside"]
    state = riverside.site_dir / "state"
    assert (state / "secagg-round-0.json").exists()
    # the masked input asked for again (a retry): the same bytes, rebuilt from the saved state
    _, _, request, reply = next(item for item in send.sent if item[:2] == ("masked_input", "riverside"))
    assert handle_request(riverside, request, seed=SEED) == reply
    # the next round's announcement closes round 0 at riverside: stages recorded, secrets gone
    send.gone.clear()
    send.drop_after.clear()
    second = coordinator.run_round(1, send)
    assert all(b["failure"] is None for b in second.blocks.values())
    assert all(v["reported"] for v in second.sites.values())
    assert not (state / "secagg-round-0.json").exists() and not (state / "flower-update-0.npz").exists()
    records = records_of(riverside.site_dir, coordinator.roster)
    round0 = [(r["event"], r["details"].get("stage")) for r in records if r["round_id"] == 0
              and r["event"].startswith("secagg")]
    assert round0 == [("secagg_stage_completed", s) for s in STAGES[:3]] + [("secagg_aborted", "consistency")]
    for site_dir in site_dirs(sites):
        records_of(site_dir, coordinator.roster)  # every log verifies
    # an old announcement replayed: refused before anything is trained or spent
    ledger_before = (sites / "st-mary" / "state" / "ledger.json").read_bytes()
    with pytest.raises(StaleRoundError):
        handle_request(send.files["st-mary"], _offer_of_round(coordinator, 0, "st-mary"), seed=SEED)
    assert (sites / "st-mary" / "state" / "ledger.json").read_bytes() == ledger_before


def _offer_of_round(coordinator: RoundCoordinator, round_id: int, site: str) -> bytes:
    from blossom_secure import wire

    spec, body = wire.encode_blocks(coordinator.global_blocks)
    return coordinator._request("offer", round_id, site, body=body, blocks=spec)


def test_site_whose_policy_changes_mid_round_stops_and_says_why(tiny_sites_with_data, tmp_path):
    sites = flower_copy(tiny_sites_with_data, tmp_path)
    coordinator = coordinator_for(sites)
    send = InProcess(sites)
    site_file = sites / "riverside" / "site.toml"
    edited = sites.parent / "policies" / "standard-edited.toml"
    edited.write_text((sites.parent / "policies" / "standard.toml").read_text() + "# edited mid-round\n")

    def edit_policy(stage: str, site: str) -> None:
        if (stage, site) == ("offer", "riverside"):  # after riverside joined and advertised its keys
            site_file.write_text(site_file.read_text().replace("standard.toml", "standard-edited.toml"))

    send.after = edit_policy
    report = coordinator.run_round(0, send)
    assert [(stage, site, type(exc)) for stage, site, exc in send.refused] == [
        ("share_keys", "riverside", PolicyChangedError)]
    assert report.sites["riverside"]["joined"] and report.sites["riverside"]["reported"]  # finished on its own terms
    assert "riverside" not in report.blocks["fusion"]["contributors"]
    assert report.blocks["fusion"]["failure"] is None  # st-mary and northgate: t = 2
    records = records_of(sites / "riverside", coordinator.roster)
    outcome = [(r["event"], r["details"]["stage"]) for r in records if r["event"].startswith("secagg")]
    assert outcome == [("secagg_stage_completed", "advertise_keys"), ("secagg_aborted", "share_keys")]
    aborted = next(r for r in records if r["event"] == "secagg_aborted")
    assert "PolicyChangedError" in aborted["details"]["reason"]
    assert any(r["event"] == "policy_loaded" and r["details"]["policy_file"] == "standard-edited.toml"
               for r in records)


def test_supernode_pointed_at_an_unlisted_coordinator_declines_the_round(tiny_sites_with_data, tmp_path):
    """A site's SuperNode connected to an address its policy does not list (a hijacked DNS
    name, an operator's typo) declines before it reserves budget or trains, even though the
    federation file's ``coordinator`` ("embedded") is listed; the reason is in its audit log."""
    from dataclasses import replace

    from tests.conftest import allow_coordinators

    sites = flower_copy(tiny_sites_with_data, tmp_path)
    allow_coordinators(sites, "127.0.0.1:9092")
    coordinator = coordinator_for(sites)
    send = InProcess(sites)
    send.files = {s: replace(f, coordinator="127.0.0.1:9092") for s, f in send.files.items()}
    send.files["riverside"] = replace(send.files["riverside"], coordinator="10.66.6.6:9092")
    report = coordinator.run_round(0, send)
    assert not report.sites["riverside"]["joined"]
    assert all(report.sites[s]["joined"] for s in ("lakeside", "northgate", "st-mary"))
    records = records_of(sites / "riverside", coordinator.roster)
    declined = [r for r in records if r["event"] == "round_declined"]
    assert len(declined) == 1 and "'10.66.6.6:9092' is not allowed by the policy" in declined[0]["details"]["reason"]
    assert not any(r["event"] == "training_finished" for r in records)

    def charged_rounds(site: str) -> list[int]:
        path = sites / site / "state" / "ledger.json"
        return [e["round_id"] for e in json.loads(path.read_text())["entries"]] if path.exists() else []

    assert charged_rounds("northgate") == [0] and charged_rounds("riverside") == []


def test_audit_file_name_is_the_site_agents():
    from blossom_secure.site.agent import AUDIT_FILE

    assert site_steps.AUDIT_FILE == AUDIT_FILE


def test_deployed_coordinator_unmasks_in_a_process_pool_with_the_same_round(tiny_sites_with_data, tmp_path,
                                                                            monkeypatch):
    """The ServerApp's coordinator removes masks in a pool of worker processes
    (``unmask_pool``): with a site dropped after sharing keys (so its pairwise masks are
    regenerated and removed) the round gives the same global blocks, bit for bit, and the
    same report as a coordinator working alone, and the pool did part of the work."""
    from blossom_secure.coordinator.steps import unmask_pool
    from blossom_secure.secagg import unmasking

    monkeypatch.setattr(unmasking, "MIN_KEYSTREAMS_PER_PART", 1)  # split even the tiny blocks
    runs = {}
    for name in ("alone", "pool"):
        sites = flower_copy(tiny_sites_with_data, tmp_path / name)
        federation = load_federation(sites / "federation.toml")
        roster = load_roster(sites / "roster.toml", federation=federation)
        pool, parts = unmask_pool(2) if name == "pool" else (None, 1)
        submitted = []
        if pool is not None:
            real_submit = pool.submit
            monkeypatch.setattr(pool, "submit", lambda *a, **k: submitted.append(a[0]) or real_submit(*a, **k))
        try:
            coordinator = RoundCoordinator(federation, roster, seed=SEED, unmask_executor=pool, unmask_parts=parts)
            report = coordinator.run_round(0, InProcess(sites, drop_after={"riverside": "share_keys"}))
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        runs[name] = (report, coordinator.global_blocks, submitted)
    (alone, alone_blocks, _), (pooled, pooled_blocks, submitted) = runs["alone"], runs["pool"]
    assert submitted, "the pool regenerated no part of the masks"
    assert pooled.blocks == alone.blocks and pooled.sites == alone.sites
    assert any(b["failure"] is None and "riverside" not in b["contributors"] for b in pooled.blocks.values())
    assert all(np.array_equal(pooled_blocks[b], alone_blocks[b]) for b in alone_blocks)


def test_unmask_pool_on_one_core_is_none():
    from blossom_secure.coordinator.steps import unmask_pool

    assert unmask_pool(1) == (None, 1)
