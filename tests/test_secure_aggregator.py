"""The secure aggregator behind the federation's Aggregator interface: it equals the
plaintext weighted mean within the quantisation bound, tolerates dropouts, and takes only
what the egress guard cleared."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from blossom_secure.exchange import Contribution

from blossom_secure.runtimes.embedded.aggregators import PlaintextAggregator
from blossom_secure.crypto import generate_identity_key, identity_public_key
from blossom_secure.site.egress import select_egress
from blossom_secure.secagg import SecAggParams
from blossom_secure.runtimes.embedded.aggregators import SecureAggregator
from tests.test_egress import make_policy

SITES = ("a", "b", "c", "d")
SIZES = {"encoder.image": 50, "fusion": 7}


def setup(drop_after=None):
    keys = {s: generate_identity_key() for s in SITES}
    params = SecAggParams(ring_bits=32, clip=1.0, max_weight=1000, max_group_size=4, min_contributors=2)  # t = 3
    agg = SecureAggregator(params=params, federation_sha256=hashlib.sha256(b"federation.toml").digest(),
                           roster={s: identity_public_key(k) for s, k in keys.items()},
                           identity_keys=keys, drop_after=drop_after)
    rng = np.random.default_rng(1)
    contributions = {
        s: Contribution(egress=select_egress(make_policy(["encoder.*", "fusion"]),
                                             {b: rng.uniform(-0.5, 0.5, n) for b, n in SIZES.items()}
                                             | {"head.t": np.ones(3)}),
                        weight=int(rng.integers(10, 200)), min_contributors=2)
        for s in SITES
    }
    return agg, params, contributions


def test_secure_mean_equals_plaintext_mean_within_bound():
    agg, params, contributions = setup()
    sent = []
    secure = agg.aggregate(federation_id="f", round_id=0, contributions=contributions, block_sizes=SIZES,
                           on_egress=lambda *a: sent.append(a))
    plain = PlaintextAggregator(min_contributors=2).aggregate(
        federation_id="f", round_id=0, contributions=contributions, block_sizes=SIZES, on_egress=None)
    for block in SIZES:
        assert secure[block].contributors == SITES and secure[block].weight_sum == plain[block].weight_sum
        diff = np.abs(secure[block].mean_update.astype(np.float64) - plain[block].mean_update).max()
        assert diff <= 2.0 ** -(params.scale_bits + 1) + 1e-6
    assert {kind for _, kind, _, _ in sent} == {"secagg.advertise_keys", "secagg.share_keys",
                                                 "secagg.masked_input", "secagg.consistency", "secagg.unmask"}
    assert not any(b.startswith("head.") for _, _, blocks, _ in sent for b in blocks)
    assert sum(len(p) for s, _, _, p in sent if s == "a") == agg.last_bytes_received["a"]


@pytest.mark.parametrize(("stage", "included"), [
    ("advertise_keys", ("a", "b", "c")),
    ("share_keys", ("a", "b", "c")),
    # d's masked input arrived before it dropped: it is in the sum, its self mask is
    # removed with the survivors' shares of its seed (Bonawitz et al. 2017, round 4).
    ("masked_input", ("a", "b", "c", "d")),
])
def test_dropout_leaves_the_survivors_mean(stage, included):
    agg, params, contributions = setup(drop_after={"d": stage})
    secure = agg.aggregate(federation_id="f", round_id=0, contributions=contributions, block_sizes=SIZES,
                           on_egress=None)
    survivors = {s: c for s, c in contributions.items() if s in included}
    plain = PlaintextAggregator(min_contributors=2).aggregate(
        federation_id="f", round_id=0, contributions=survivors, block_sizes=SIZES, on_egress=None)
    for block in SIZES:
        assert secure[block].contributors == included
        diff = np.abs(secure[block].mean_update.astype(np.float64) - plain[block].mean_update).max()
        assert diff <= 2.0 ** -(params.scale_bits + 1) + 1e-6


def test_too_many_dropouts_fail_the_block_cleanly():
    agg, _, contributions = setup(drop_after={"c": "share_keys", "d": "share_keys"})
    out = agg.aggregate(federation_id="f", round_id=0, contributions=contributions, block_sizes=SIZES, on_egress=None)
    for block in SIZES:
        assert out[block].mean_update is None and out[block].failure


def test_secagg_params_take_thresholds_and_max_sites_from_the_federation_file(tmp_path):
    from blossom_secure.config import load_federation
    from blossom_secure.secagg.terms import federation_sha256, secagg_params
    from tests.conftest import ROOT

    from tests.test_config import DEMO_GROUPS, without_tables

    path = tmp_path / "federation.toml"
    text = (ROOT / "sites" / "federation.toml").read_text()
    path.write_text(text)
    fed = load_federation(path)
    params = secagg_params(fed, roster_size=4)
    assert params.max_group_size == 4 and params.threshold == 3
    assert dict(params.block_groups) == DEMO_GROUPS
    assert {b: params.block_threshold(b) for b in DEMO_GROUPS} == {b: 2 for b in DEMO_GROUPS}
    text = without_tables(text, "groups", "thresholds")
    assert federation_sha256(fed) == hashlib.sha256(path.read_bytes()).digest()
    with pytest.raises(ValueError, match="more than max_sites"):
        secagg_params(fed, roster_size=5)
    path.write_text(text.replace("max_sites = 4 ", "max_sites = 5 ").replace("threshold = 3", "threshold = 4")
                    + '\n[aggregation.thresholds]\n"fusion" = 5\n')
    params = secagg_params(load_federation(path), roster_size=4)
    assert params.max_group_size == 5 and params.block_threshold("fusion") == 5
    assert params.block_threshold("encoder.image") == 4
    # Without max_sites or threshold the roster's size stands in, with the default rule.
    bare = "\n".join(line for line in text.splitlines() if not line.startswith(("max_sites", "threshold")))
    path.write_text(bare)
    params = secagg_params(load_federation(path), roster_size=6)
    assert params.max_group_size == 6 and params.threshold == 5


def test_a_federation_without_a_file_hash_cannot_aggregate_securely():
    import dataclasses

    from blossom_secure.config import load_federation
    from blossom_secure.secagg.terms import federation_sha256
    from tests.conftest import ROOT

    fed = load_federation(ROOT / "sites" / "federation.toml")
    for bad in ("", "0" * 63, "G" * 64, fed.sha256.upper()):
        with pytest.raises(ValueError, match="SHA-256"):
            federation_sha256(dataclasses.replace(fed, sha256=bad))
    with pytest.raises(ValueError, match="federation_sha256"):
        SecureAggregator(params=SecAggParams(max_group_size=4), federation_sha256=b"\x00" * 31, roster={},
                         identity_keys={})


def test_only_an_egress_is_accepted():
    agg, _, contributions = setup()
    bad = {s: Contribution(egress={"fusion": np.zeros(7, np.float32)}, weight=1, min_contributors=2) for s in SITES}
    with pytest.raises(TypeError, match="only an Egress"):
        agg.aggregate(federation_id="f", round_id=0, contributions=bad, block_sizes=SIZES, on_egress=None)


def test_site_outside_a_blocks_public_group_takes_no_part_and_the_others_go_on():
    """d offers fusion, but the federation's public group of fusion is {a, b, c}: nothing of
    d is sent, the reason is recorded, and a, b, c aggregate both blocks without it."""
    keys = {s: generate_identity_key() for s in SITES}
    params = SecAggParams(max_weight=1000, max_group_size=4, block_groups={"fusion": ("a", "b", "c")},
                          block_thresholds={"fusion": 2})
    agg = SecureAggregator(params=params, federation_sha256=hashlib.sha256(b"federation.toml").digest(),
                           roster={s: identity_public_key(k) for s, k in keys.items()}, identity_keys=keys)
    _, _, contributions = setup()
    sent = []
    out = agg.aggregate(federation_id="f", round_id=0, contributions=contributions, block_sizes=SIZES,
                        on_egress=lambda site, *a: sent.append(site))
    assert "public group of fusion" in agg.last_site_errors["d"]
    assert "d" not in sent and "d" not in agg.last_bytes_received
    assert out["fusion"].contributors == ("a", "b", "c") and out["encoder.image"].contributors == ("a", "b", "c")
