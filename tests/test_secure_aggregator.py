"""The secure aggregator behind the federation's Aggregator interface: it equals the
plaintext weighted mean within the quantisation bound, tolerates dropouts, and takes only
what the egress guard cleared."""

from __future__ import annotations

import numpy as np
import pytest

from blossom_secure.aggregation import Contribution, PlaintextAggregator
from blossom_secure.crypto import generate_identity_key, identity_public_key
from blossom_secure.egress import select_egress
from blossom_secure.secagg import SecAggParams
from blossom_secure.secure_aggregator import SecureAggregator
from tests.test_egress import make_policy

SITES = ("a", "b", "c", "d")
SIZES = {"encoder.image": 50, "fusion": 7}


def setup(drop_after=None):
    keys = {s: generate_identity_key() for s in SITES}
    params = SecAggParams(ring_bits=32, clip=1.0, max_weight=1000, max_group_size=4, min_contributors=2)
    agg = SecureAggregator(params=params, roster={s: identity_public_key(k) for s, k in keys.items()},
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
                                                 "secagg.masked_input", "secagg.unmask"}
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


def test_only_an_egress_is_accepted():
    agg, _, contributions = setup()
    bad = {s: Contribution(egress={"fusion": np.zeros(7, np.float32)}, weight=1, min_contributors=2) for s in SITES}
    with pytest.raises(TypeError, match="only an Egress"):
        agg.aggregate(federation_id="f", round_id=0, contributions=bad, block_sizes=SIZES, on_egress=None)
