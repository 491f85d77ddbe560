"""End to end: a 2-round federation of the (tiny) example sites, with DP, block-wise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from blossom_secure.runtimes.embedded.federation import simulate
from blossom_secure.site.ledger import PrivacyLedger
from blossom_secure.config import load_federation
from blossom_secure.site.config import load_site

pytestmark = pytest.mark.slow


def run(sites, tmp_path, **kwargs):
    args = dict(sites_root=sites, rounds=2, out_dir=tmp_path / "out", seed=0) | kwargs
    return simulate(**args)


def test_plaintext_run_that_every_policy_refuses_is_stopped_before_anything(copy_sites, tmp_path):
    from blossom_secure.errors import PolicyError

    sites = copy_sites()
    # plaintext: every example policy requires secure aggregation, so no site could train
    with pytest.raises(PolicyError, match="requires secure aggregation") as caught:
        run(sites, tmp_path, secure=False, mode="blockwise")
    assert len(caught.value.problems) == 4 and "without --plaintext" in str(caught.value)
    assert not list(sites.glob("*/state")) and not list(sites.glob("*/keys"))  # nothing recorded
    assert not (tmp_path / "out").exists()


def test_plaintext_round_when_policies_allow_it(copy_sites, tmp_path):
    sites = copy_sites()
    for policy in (sites.parent / "policies").glob("*.toml"):
        policy.write_text(policy.read_text().replace("required = true", "required = false"))
    result = run(sites, tmp_path, secure=False, mode="blockwise")
    doc = json.loads(result.metrics_path.read_text())
    rows = doc["metrics"]
    assert {r["round"] for r in rows} == {0, 1}
    assert {r["site"] for r in rows} == {"st-mary", "northgate", "riverside", "lakeside"}
    assert not any(r["declined"] for r in rows)
    for r in rows:
        assert r["metric"] == "accuracy" and 0 <= r["value"] <= 1 and r["epsilon"] > 0
    # groups: encoders and fusion are aggregated over the sites that hold and share them
    blocks = doc["blocks"]["1"]
    assert sorted(blocks["encoder.image"]["contributors"]) == ["lakeside", "northgate", "st-mary"]
    assert sorted(blocks["encoder.tabular"]["contributors"]) == ["lakeside", "riverside", "st-mary"]
    assert sorted(blocks["fusion"]["contributors"]) == ["northgate", "riverside", "st-mary"]  # lakeside keeps fusion
    assert not any(b.startswith("head.") for b in blocks)
    # final global blocks written; heads never among them
    with np.load(result.out_dir / "global_blocks.npz") as g:
        assert set(g.files) == {"encoder.image", "encoder.tabular", "fusion"}
        glob = {k: g[k] for k in g.files}
    # sites that contributed a block hold exactly the global value of it after the round
    with np.load(sites / "st-mary" / "state" / "blocks.npz") as s:
        assert np.array_equal(s["fusion"], glob["fusion"])
        assert "head.malignancy" in s.files
    with np.load(sites / "lakeside" / "state" / "blocks.npz") as s:
        assert not np.array_equal(s["fusion"], glob["fusion"])  # private fusion


def test_budget_exhaustion_declines_and_federation_goes_on(copy_sites, tmp_path):
    sites = copy_sites()
    for policy in (sites.parent / "policies").glob("*.toml"):
        policy.write_text(policy.read_text().replace("required = true", "required = false"))
    conservative = sites.parent / "policies" / "conservative.toml"
    fed = load_federation(sites / "federation.toml")
    lake = load_site(sites / "lakeside", federation=fed)
    text = conservative.read_text()
    # one round first, then lakeside's budget is set to allow that round only
    run(sites, tmp_path, secure=False, rounds=1)
    ledger = PrivacyLedger(sites / "lakeside" / "state" / "ledger.json", site_id="lakeside", terms=lake.policy.privacy)
    one_round = ledger.epsilon_spent
    conservative.write_text(re.sub(r"epsilon_budget = [0-9.]+", f"epsilon_budget = {one_round * 1.2:.4f}", text))
    # the same coordinator folder: its round counter numbers the new rounds 1 and 2
    result = simulate(sites_root=sites, rounds=2, out_dir=tmp_path / "out", seed=1, secure=False)
    assert result.round_ids == [1, 2] and result.sites_declined("privacy budget") == {"lakeside": [1, 2]}
    doc = json.loads(result.metrics_path.read_text())
    lake_rows = [r for r in doc["metrics"] if r["site"] == "lakeside"]
    assert all(r["declined"] == "privacy budget" for r in lake_rows)  # the category only; detail stays home
    others = [r for r in doc["metrics"] if r["site"] != "lakeside"]
    assert others and not any(r["declined"] for r in others)
    ledger = PrivacyLedger(sites / "lakeside" / "state" / "ledger.json", site_id="lakeside",
                           terms=load_site(sites / "lakeside", federation=fed).policy.privacy)
    assert len(ledger.entries) == 1  # nothing spent by the declined rounds


def test_crash_between_training_and_sending_never_under_counts(copy_sites, tmp_path, monkeypatch):
    sites = copy_sites()
    for policy in (sites.parent / "policies").glob("*.toml"):
        policy.write_text(policy.read_text().replace("required = true", "required = false"))
    import blossom_secure.site.agent as site_agent

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash("power cut after training, before anything is sent")

    monkeypatch.setattr(site_agent, "select_egress", crash)
    with pytest.raises(Crash):
        run(sites, tmp_path, secure=False, rounds=1)
    fed = load_federation(sites / "federation.toml")
    site = load_site(sites / "lakeside", federation=fed)  # the first site to train, then the crash
    ledger = PrivacyLedger(site.state_dir / "ledger.json", site_id=site.id, terms=site.policy.privacy)
    assert len(ledger.entries) == 1 and ledger.epsilon_spent > 0
    records = [json.loads(line) for line in (site.state_dir / "audit.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records][-3:] == ["round_joined", "training_finished", "error"]
    assert records[-1]["details"] == {"message": "power cut after training, before anything is sent",
                                      "error_type": "Crash"}
    assert not any(r["event"] == "egress" for r in records)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_local_mode_shares_nothing(copy_sites, tmp_path):
    sites = copy_sites()
    result = run(sites, tmp_path, mode="local", rounds=1)
    doc = json.loads(result.metrics_path.read_text())
    assert doc["blocks"]["0"] == {}
    assert not any(r["declined"] for r in doc["metrics"])


def test_full_model_needs_explicit_flag(copy_sites, tmp_path):
    sites = copy_sites()
    with pytest.raises(ValueError, match="allow-full-model"):
        run(sites, tmp_path, mode="full-model")
    result = run(sites, tmp_path, mode="full-model", allow_full_model=True, rounds=1)
    doc = json.loads(result.metrics_path.read_text())
    assert sorted(doc["blocks"]["0"]["head.malignancy"]["contributors"]) == ["lakeside", "northgate", "riverside",
                                                                               "st-mary"]
    assert doc["blocks"]["0"]["head.severity"]["contributors"] == ["lakeside"]


def test_paper_full_model_dilutes_a_block_with_the_sites_that_lack_it(tiny_sites_with_data, tmp_path):
    """The paper's baseline: a site without a block (riverside has no images; only
    lakeside has the severity task) sends it back as it received it, so the mean is over
    all four sites. Same seed, same training as the holders-only ``full-model``: the
    paper's mean is the holders' mean diluted by the initial value, exactly."""
    import shutil

    from blossom_secure.coordinator.rounds import initial_global_blocks

    runs = {}
    for mode in ("paper-full-model", "full-model"):
        dest = tmp_path / mode
        shutil.copytree(tiny_sites_with_data.parent / "policies", dest / "policies")
        shutil.copytree(tiny_sites_with_data, dest / "sites")
        with pytest.raises(ValueError, match="allow-full-model"):
            run(dest / "sites", dest, mode=mode, rounds=1)
        runs[mode] = run(dest / "sites", dest, mode=mode, allow_full_model=True, rounds=1, seed=5)
    doc = json.loads(runs["paper-full-model"].metrics_path.read_text())
    assert all(len(v["contributors"]) == 4 for v in doc["blocks"]["0"].values())
    init = initial_global_blocks(load_federation(tiny_sites_with_data / "federation.toml"), include_heads=True,
                                 seed=5)
    with (np.load(runs["paper-full-model"].out_dir / "global_blocks.npz") as paper,
          np.load(runs["full-model"].out_dir / "global_blocks.npz") as holders):
        for block, held_by in (("encoder.image", 3), ("encoder.tabular", 3), ("head.severity", 1), ("fusion", 4)):
            expected = (held_by * holders[block].astype(np.float64) + (4 - held_by) * init[block]) / 4
            assert np.abs(paper[block] - expected).max() < 1e-6, block
        assert np.abs(paper["encoder.image"] - holders["encoder.image"]).max() > 1e-4  # the dilution is visible


def _plaintext_allowed_copy(src, dest):
    import shutil

    shutil.copytree(src.parent / "policies", dest / "policies")
    shutil.copytree(src, dest / "sites")
    for policy in (dest / "policies").glob("*.toml"):
        policy.write_text(policy.read_text().replace("required = true", "required = false"))
    return dest / "sites"


def _secure_equals_plaintext(a: Path, b: Path, tmp_path: Path):
    """Run one secure round on ``a`` and one plaintext round on ``b`` (copies of one
    federation) and check that every shared block agrees within the quantisation bound;
    returns the secure run."""
    from blossom_secure.secagg.terms import secagg_params

    secure = simulate(sites_root=a, rounds=1, out_dir=tmp_path / "secure", seed=5, secure=True)
    plain = simulate(sites_root=b, rounds=1, out_dir=tmp_path / "plain", seed=5, secure=False)
    fed = load_federation(a / "federation.toml")
    params = secagg_params(fed, roster_size=4)
    # Each site's update is rounded to the nearest multiple of 2^-scale_bits; the weighted
    # mean of the rounding errors is at most half a step; float32 storage adds a little.
    bound = 2.0 ** -(params.scale_bits + 1) + 1e-6
    with np.load(secure.out_dir / "global_blocks.npz") as s, np.load(plain.out_dir / "global_blocks.npz") as p:
        assert set(s.files) == set(p.files) == {"encoder.image", "encoder.tabular", "fusion"}
        for block in s.files:
            diff = np.abs(s[block].astype(np.float64) - p[block].astype(np.float64)).max()
            assert diff <= bound, (block, diff, bound)
    # and the blocks really moved (the comparison is not between two untouched initial values)
    # the sites of b go on under their coordinator's folder (its round counter: round 1)
    init = simulate(sites_root=b, rounds=1, out_dir=tmp_path / "plain", seed=5, mode="local")
    with np.load(secure.out_dir / "global_blocks.npz") as s, np.load(init.out_dir / "global_blocks.npz") as i:
        assert any(np.abs(s[k] - i[k]).max() > 100 * bound for k in s.files)
    return secure


def test_secure_result_equals_plaintext_within_quantisation_bound(tiny_sites_with_data, tmp_path):
    a = _plaintext_allowed_copy(tiny_sites_with_data, tmp_path / "a")
    b = _plaintext_allowed_copy(tiny_sites_with_data, tmp_path / "b")
    _secure_equals_plaintext(a, b, tmp_path)


def test_sparse_graph_round_equals_plaintext_within_quantisation_bound(tiny_sites_with_data, tmp_path):
    """The sparse masking graph end to end, through real site agents: the demo federation
    without public groups (each block's possible signers: max_sites = 4) and with
    [aggregation.sparse] from 4 sites (a ring of degree 2, l = 2, so that lakeside's
    policy minimum of 3 is met). Every site sends its mask statements, every block is
    aggregated, and the result is the plaintext one within the bound."""
    copies = []
    for name in ("a", "b"):
        sites = _plaintext_allowed_copy(tiny_sites_with_data, tmp_path / name)
        fed = sites / "federation.toml"
        text = fed.read_text()
        head, _, tail = text.partition("[aggregation.groups]")
        tail = tail[tail.index("[synth]"):]
        fed.write_text(head + "[aggregation.sparse]\nneighbours = 2\nfrom_sites = 4\nmin_masked = 2\n\n" + tail)
        copies.append(sites)
    from blossom_secure.secagg.terms import secagg_params

    params = secagg_params(load_federation(copies[0] / "federation.toml"), roster_size=4)
    assert all(params.is_sparse(b) for b in ("encoder.image", "encoder.tabular", "fusion"))
    assert params.share_threshold("fusion") == 2 < params.block_threshold("fusion") == 3
    secure = _secure_equals_plaintext(*copies, tmp_path)
    doc = json.loads(secure.metrics_path.read_text())
    assert all(v["failure"] is None for r in doc["blocks"].values() for v in r.values())
    for site in ("st-mary", "northgate", "riverside", "lakeside"):
        records = [json.loads(line) for line in (copies[0] / site / "state" / "audit.jsonl").read_text().splitlines()]
        assert any(r["details"].get("message_type") == "secagg.masked_input" for r in records)


def test_audit_log_accounts_for_every_byte_sent(tiny_sites_with_data, tmp_path):
    import shutil

    shutil.copytree(tiny_sites_with_data.parent / "policies", tmp_path / "policies")
    sites = tmp_path / "sites"
    shutil.copytree(tiny_sites_with_data, sites)
    result = simulate(sites_root=sites, rounds=2, out_dir=tmp_path / "out", seed=0)
    doc = json.loads(result.metrics_path.read_text())
    fed = load_federation(sites / "federation.toml")
    for site_id in ("st-mary", "northgate", "riverside", "lakeside"):
        site = load_site(sites / site_id, federation=fed)
        records = [json.loads(line) for line in (site.state_dir / "audit.jsonl").read_text().splitlines()]
        for round_id in (0, 1):
            logged = sum(r["details"]["payload_bytes"] for r in records
                         if r["event"] == "egress" and r["round_id"] == round_id)
            received = doc["bytes_received"][str(round_id)][site_id]
            assert logged == received > 0, (site_id, round_id, logged, received)
        for round_id in (0, 1):
            stages = [r["details"]["stage"] for r in records
                      if r["event"] == "secagg_stage_completed" and r["round_id"] == round_id]
            assert stages == ["advertise_keys", "share_keys", "masked_input", "consistency", "unmask"], (site_id, stages)
        assert not any(r["event"] == "secagg_aborted" for r in records)
        for r in records:
            if r["event"] == "egress":
                assert r["details"]["message_type"].startswith("secagg.") or r["details"]["message_type"] == "report"
                assert all(site.policy.is_shareable(b) for b in r["details"]["blocks"])
