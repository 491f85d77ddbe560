"""Mask removal at the coordinator: one regeneration per (dropped site, contributor),
split into parts on an executor, equal to the straightforward removal and to the plain sum."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import NoReturn

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_harness import Federation

from blossom_secure import crypto
from blossom_secure.secagg import AllZeroSharedSecretError, SecAggParams, kdf
from blossom_secure.secagg.masking import CHUNK_BYTES, expand_mask
from blossom_secure.secagg.quantize import quantize_into
from blossom_secure.secagg.site import mask_block
from blossom_secure.secagg import unmasking
from blossom_secure.secagg.unmasking import DroppedSite, MaskContext, _split_removals, remove_masks

CONTEXT = MaskContext("fed-test", 4, "fusion")


@pytest.fixture(autouse=True)
def _small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split even the few keystreams of a test into parts."""
    monkeypatch.setattr(unmasking, "MIN_KEYSTREAMS_PER_PART", 1)
PARAMS = SecAggParams(max_weight=100, max_group_size=8, clip=0.5)
SIZES = [1, 5, CHUNK_BYTES // 4 + 3]


class Group:
    """A block group whose members mask with each other; some of them drop before masking."""

    def __init__(self, members: int, dropped: set[int], size: int) -> None:
        self.sites = [f"m{i}" for i in range(members)]
        self.keys = {site: crypto.generate_x25519_key_pair() for site in self.sites}
        self.seeds = {site: os.urandom(32) for site in self.sites}
        self.dropped = [site for i, site in enumerate(self.sites) if i in dropped]
        self.contributors = [site for site in self.sites if site not in self.dropped]
        # Deterministic test data (not secret).
        self.updates = {
            site: np.linspace(-0.7 + 0.1 * i, 0.6, size, dtype=np.float32) for i, site in enumerate(self.sites)
        }
        self.size = size

    def masked_sum(self) -> np.ndarray:
        total = np.zeros(self.size + 1, dtype=PARAMS.ring_dtype)
        for site in self.contributors:
            total += mask_block(
                self.updates[site], weight=3, params=PARAMS, federation_id=CONTEXT.federation_id,
                round_id=CONTEXT.round_id, block=CONTEXT.block, site_id=site, seed=self.seeds[site],
                mask_private_key=self.keys[site][0],
                peer_mask_public_keys={peer: self.keys[peer][1] for peer in self.sites if peer != site},
            )
        return total

    def plain_sum(self) -> np.ndarray:
        total = np.zeros(self.size + 1, dtype=PARAMS.ring_dtype)
        for site in self.contributors:
            vector = np.empty(self.size + 1, dtype=PARAMS.ring_dtype)
            quantize_into(self.updates[site], weight=3, params=PARAMS, out=vector)
            total += vector
        return total

    def self_mask_keys(self) -> list[bytes]:
        return [
            kdf.self_mask_key(self.seeds[site], federation_id=CONTEXT.federation_id, round_id=CONTEXT.round_id,
                              block=CONTEXT.block, site=site)
            for site in self.contributors
        ]

    def dropped_sites(self) -> list[DroppedSite]:
        peers = tuple((site, self.keys[site][1]) for site in self.contributors)
        return [DroppedSite(site, self.keys[site][0], peers) for site in self.dropped]

    def straightforward_removal(self, total: np.ndarray) -> np.ndarray:
        """The removal written out: every mask expanded over the whole vector on its own,
        one agreement at a time."""
        result = total.copy()
        for key in self.self_mask_keys():
            result -= expand_mask(key, count=result.shape[0], dtype=result.dtype)
        for site in self.dropped:
            for peer in self.contributors:
                secret = crypto.x25519_shared_secret(self.keys[site][0], self.keys[peer][1])
                key = kdf.pairwise_mask_key(secret, federation_id=CONTEXT.federation_id, round_id=CONTEXT.round_id,
                                            block=CONTEXT.block, sites=(site, peer))
                mask = expand_mask(key, count=result.shape[0], dtype=result.dtype)
                if peer < site:
                    result -= mask
                else:
                    result += mask
        return result


@st.composite
def groups(draw: st.DrawFn) -> Group:
    members = draw(st.integers(2, 6))
    dropped = draw(st.sets(st.integers(0, members - 1), max_size=members - 1))
    return Group(members, dropped, draw(st.sampled_from(SIZES)))


@settings(max_examples=30, deadline=None)
@given(group=groups(), parts=st.integers(1, 5))
def test_removal_in_parts_equals_the_straightforward_one_and_the_plain_sum(group: Group, parts: int) -> None:
    total = group.masked_sum()
    expected = group.straightforward_removal(total)
    assert np.array_equal(expected, group.plain_sum())
    alone = total.copy()
    remove_masks(alone, self_mask_keys=group.self_mask_keys(), dropped=group.dropped_sites(), context=CONTEXT)
    assert np.array_equal(alone, expected)
    with ThreadPoolExecutor(max_workers=2) as executor:
        split = total.copy()
        remove_masks(split, self_mask_keys=group.self_mask_keys(), dropped=group.dropped_sites(), context=CONTEXT,
                     executor=executor, parts=parts)
    assert np.array_equal(split, expected)


def test_few_keystreams_stay_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unmasking, "MIN_KEYSTREAMS_PER_PART", 32)

    class Refusing(ThreadPoolExecutor):
        def submit(self, *args: object, **kwargs: object) -> NoReturn:
            raise AssertionError("a part of under 32 keystreams went to the executor")

    group = Group(6, {0, 1}, 10)  # 4 * (1 + 2) = 12 keystreams
    total = group.masked_sum()
    with Refusing(max_workers=1) as executor:
        remove_masks(total, self_mask_keys=group.self_mask_keys(), dropped=group.dropped_sites(), context=CONTEXT,
                     executor=executor, parts=2)
    assert np.array_equal(total, group.plain_sum())


def test_removal_split_across_a_process_pool_equals_one_process() -> None:
    group = Group(5, {1, 3}, SIZES[-1])
    total = group.masked_sum()
    with ProcessPoolExecutor(max_workers=2) as executor:
        remove_masks(total, self_mask_keys=group.self_mask_keys(), dropped=group.dropped_sites(), context=CONTEXT,
                     executor=executor, parts=3)
    assert np.array_equal(total, group.plain_sum())


@settings(max_examples=40, deadline=None)
@given(contributors=st.integers(0, 6), dropped=st.lists(st.integers(0, 6), max_size=4), parts=st.integers(1, 9))
def test_parts_hold_every_keystream_once_and_are_balanced(contributors: int, dropped: list[int], parts: int) -> None:
    keys = [bytes([i]) * 32 for i in range(contributors)]
    sites = [
        DroppedSite(f"d{i}", bytes([100 + i]) * 32, tuple((f"c{j}", bytes([200 + j]) * 32) for j in range(count)))
        for i, count in enumerate(dropped)
    ]
    split = _split_removals(keys, sites, parts)
    total = contributors + sum(dropped)
    assert len(split) == max(1, min(parts, total))
    counts = [part.keystreams for part in split]
    assert sum(counts) == total and max(counts) - min(counts) <= 1
    assert sorted(key for part in split for key in part.self_mask_keys) == sorted(keys)
    pairs = sorted((site.site, site.mask_private_key, peer) for part in split for site in part.dropped
                   for peer in site.contributors)
    assert pairs == sorted((site.site, site.mask_private_key, peer) for site in sites for peer in site.contributors)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_low_order_contributor_key_refused_and_the_sum_left_unchanged(parts: int) -> None:
    group = Group(4, {0}, 100)
    total = group.masked_sum()
    before = total.copy()
    (site,) = group.dropped_sites()
    bad = DroppedSite(site.site, site.mask_private_key, (*site.contributors[:-1], ("m9", bytes(32))))
    with ThreadPoolExecutor(max_workers=2) as executor, pytest.raises(AllZeroSharedSecretError):
        remove_masks(total, self_mask_keys=group.self_mask_keys(), dropped=[bad], context=CONTEXT,
                     executor=executor, parts=parts)
    assert np.array_equal(total, before)


def test_bad_parts_keys_and_sums_refused() -> None:
    vector = np.zeros(4, dtype="<u4")
    for parts in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="parts"):
            remove_masks(vector, self_mask_keys=[], dropped=[], context=CONTEXT, parts=parts)  # type: ignore[arg-type]
    short = DroppedSite("d0", bytes(31), (("c0", bytes(range(32))),))
    with pytest.raises(ValueError, match="32 bytes"):
        remove_masks(vector, self_mask_keys=[], dropped=[short], context=CONTEXT)
    read_only = np.zeros(4, dtype="<u4")
    read_only.flags.writeable = False
    keys = [os.urandom(32), os.urandom(32)]
    with ThreadPoolExecutor(max_workers=2) as executor:
        for bad in (read_only, np.zeros(4, dtype=np.float32), np.zeros((2, 2), dtype="<u4")):
            for pool in (None, executor):
                with pytest.raises(ValueError, match="ring vector"):
                    remove_masks(bad, self_mask_keys=keys, dropped=[], context=CONTEXT, executor=pool, parts=2)


# ------------------------------------------------------------ the coordinator, end to end


def _twin_round(federation: Federation, dropped: tuple[str, ...], executor: ThreadPoolExecutor, parts: int) -> dict:
    """Run the federation's round, sites in ``dropped`` gone after sharing keys, and feed
    the same messages to a twin coordinator that removes masks in parts."""
    twin = federation.new_coordinator(unmask_executor=executor, unmask_parts=parts)
    steps = [
        (federation.advertise, "adverts"),
        (federation.share, "shares"),
        (lambda: federation.mask(skip=dropped), "masked"),
        (federation.check, "signatures"),
        (federation.unmask, "responses"),
    ]
    for step, kept in steps:
        step()
        for message in getattr(federation, kept).values():
            twin.receive(message)
        twin.close_stage()
    return twin.results()


@settings(max_examples=12, deadline=None)
@given(dropped=st.sets(st.sampled_from(["s0", "s1", "s2", "s3", "s4"]), max_size=2), parts=st.integers(1, 4))
def test_coordinator_removing_masks_in_parts_gives_the_exact_sum_for_any_dropouts(dropped: set, parts: int) -> None:
    sites = {f"s{i}": ("encoder.image", "fusion") for i in range(5)}
    federation = Federation(sites, sizes={"encoder.image": 3000, "fusion": 7})
    with ThreadPoolExecutor(max_workers=2) as executor:
        twin = _twin_round(federation, tuple(sorted(dropped)), executor, parts)
    serial = federation.coordinator.results()
    contributors = tuple(site for site in sorted(sites) if site not in dropped)
    for block in ("encoder.image", "fusion"):
        assert serial[block].failure is None and twin[block].failure is None
        assert serial[block].contributors == twin[block].contributors == contributors
        assert np.array_equal(twin[block].weighted_sum, serial[block].weighted_sum)
        assert np.array_equal(twin[block].weighted_sum, federation.expected_sum(block, contributors))
        assert twin[block].weight_sum == sum(federation.contributions[site].weight for site in contributors)
