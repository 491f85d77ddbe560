"""Block-wise aggregation in plaintext: groups, minimums, weighted means, message checks."""

from __future__ import annotations

import numpy as np
import pytest

from blossom_secure.exchange import Contribution, decode_plain_update, settle_groups

from blossom_secure.runtimes.embedded.aggregators import PlaintextAggregator

from blossom_secure.site.egress import encode_plain_update
from blossom_secure.site.egress import select_egress
from blossom_secure.errors import ProtocolError
from tests.test_egress import make_policy


def contribution(blocks: dict, weight: int, minimum: int = 2, shareable=("encoder.*", "fusion")) -> Contribution:
    return Contribution(egress=select_egress(make_policy(shareable), blocks), weight=weight, min_contributors=minimum)


def test_each_block_is_averaged_over_its_holders_only():
    contributions = {
        "a": contribution({"encoder.image": np.array([1.0, 1.0]), "fusion": np.array([3.0])}, weight=1),
        "b": contribution({"encoder.image": np.array([3.0, 5.0]), "fusion": np.array([0.0])}, weight=3),
        "c": contribution({"encoder.tabular": np.array([2.0]), "fusion": np.array([6.0])}, weight=2),
        "d": contribution({"encoder.tabular": np.array([4.0]), "head.x": np.array([9.0])}, weight=2),
    }
    sent = []
    out = PlaintextAggregator(min_contributors=2).aggregate(
        federation_id="f", round_id=0, contributions=contributions,
        block_sizes={"encoder.image": 2, "encoder.tabular": 1, "fusion": 1},
        on_egress=lambda *a: sent.append(a))
    assert out["encoder.image"].contributors == ("a", "b")
    assert np.allclose(out["encoder.image"].mean_update, [(1 + 9) / 4, (1 + 15) / 4])
    assert np.allclose(out["encoder.tabular"].mean_update, [3.0])
    assert np.allclose(out["fusion"].mean_update, [(3 + 0 + 12) / 6])
    assert "head.x" not in out
    assert {(s, blocks) for s, _, blocks, _ in sent} == {
        ("a", ("encoder.image",)), ("b", ("encoder.image",)), ("a", ("fusion",)), ("b", ("fusion",)),
        ("c", ("fusion",)), ("c", ("encoder.tabular",)), ("d", ("encoder.tabular",))}


def test_block_below_minimum_is_not_aggregated_and_not_sent():
    contributions = {"a": contribution({"fusion": np.ones(1)}, 1), "b": contribution({"encoder.image": np.ones(1)}, 1)}
    sent = []
    out = PlaintextAggregator(min_contributors=2).aggregate(
        federation_id="f", round_id=0, contributions=contributions, block_sizes={"fusion": 1, "encoder.image": 1},
        on_egress=lambda *a: sent.append(a))
    assert out["fusion"].mean_update is None and "fewer than the minimum" in out["fusion"].failure
    assert sent == []


def test_site_minimum_withdrawal_cascades():
    # c insists on groups of 3: fusion has 3 members so c stays; encoder.image has 2 so c
    # withdraws, leaving 1 -> not aggregated at all.
    contributions = {
        "a": contribution({"fusion": np.ones(1), "encoder.image": np.ones(1)}, 1),
        "b": contribution({"fusion": np.ones(1)}, 1),
        "c": contribution({"fusion": np.ones(1), "encoder.image": np.ones(1)}, 1, minimum=3),
    }
    groups, failures = settle_groups(contributions, min_contributors=2)
    assert groups == {"fusion": ("a", "b", "c")}
    assert "encoder.image" in failures


def test_site_that_cannot_record_egress_does_not_send():
    contributions = {s: contribution({"fusion": np.full(1, float(i))}, 1) for i, s in enumerate("abc")}

    def hook(site, kind, blocks, payload):
        if site == "b":
            raise OSError("disk full")

    out = PlaintextAggregator(min_contributors=2).aggregate(
        federation_id="f", round_id=0, contributions=contributions, block_sizes={"fusion": 1}, on_egress=hook)
    assert out["fusion"].contributors == ("a", "c") and np.allclose(out["fusion"].mean_update, [1.0])


def _payload(**overrides):
    egress = select_egress(make_policy(["fusion"]), {"fusion": np.arange(3, dtype=np.float32)})
    args = dict(federation_id="f", round_id=2, site_id="s", block="fusion", egress=egress, weight=5) | overrides
    return encode_plain_update(**args)


def test_plain_update_round_trip():
    block, weight, values = decode_plain_update(_payload(), federation_id="f", round_id=2, site_id="s",
                                                block_sizes={"fusion": 3})
    assert (block, weight, values.tolist()) == ("fusion", 5, [0.0, 1.0, 2.0])


@pytest.mark.parametrize(("payload", "expect"), [
    (b"", "truncated"),
    (b"\xff\xff\xff\xff", "header length"),
    (b"\x03\x00\x00\x00abc", "not JSON"),
])
def test_malformed_plain_update_rejected(payload, expect):
    with pytest.raises(ProtocolError, match=expect):
        decode_plain_update(payload, federation_id="f", round_id=2, site_id="s", block_sizes={"fusion": 3})


@pytest.mark.parametrize(("kwargs", "expect"), [
    (dict(federation_id="g"), "wrong federation"),
    (dict(round_id=3), "wrong federation, round"),
    (dict(site_id="t"), "sender"),
    (dict(block_sizes={"fusion": 4}), "wrong size"),
])
def test_plain_update_for_wrong_context_rejected(kwargs, expect):
    args = dict(federation_id="f", round_id=2, site_id="s", block_sizes={"fusion": 3}) | kwargs
    with pytest.raises(ProtocolError, match=expect):
        decode_plain_update(_payload(), **args)


def test_plain_update_with_trailing_bytes_rejected():
    with pytest.raises(ProtocolError, match="body length"):
        decode_plain_update(_payload() + b"\x00", federation_id="f", round_id=2, site_id="s", block_sizes={"fusion": 3})
