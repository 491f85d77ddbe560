"""The sparse masking graph (Bell et al. 2020, SecAgg+) for large block groups.

Twelve sites contribute one block over a ring of degree k = 4 (``[aggregation.sparse]``
neighbours = 4): each masks with, and deals the shares of its secrets to, its four
neighbours; three shares rebuild a secret (``share_threshold``); every survivor must keep
two masked neighbours in the survivor set (``min_masked`` = l = 2); the survivor set
still needs t_b = 7 consistency signatures of the twelve. The guarantee tested here:
whatever the coordinator does, any value it can unmask that involves a site's input
involves at least l + 1 = 3 inputs, and a sum it does compute is exact.

The complete-graph attacks of ``test_secagg_malicious_coordinator.py`` run on a sparse
graph too (that module runs every test on both); the attacks below are the sparse graph's
own: hiding a site's neighbours, declaring them dropped, and forging, withholding or
replaying the signed statements of whom a site masked with.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_harness import FEDERATION, FEDERATION_SHA256, Federation
from test_secagg_malicious_coordinator import BLOCK, MaliciousCoordinator

from blossom_secure import crypto
from blossom_secure.config import load_federation
from blossom_secure.errors import AuthenticationError, PolicyError
from blossom_secure.secagg import (
    ConsistencyCheckError,
    InconsistentMessageError,
    SecAggParams,
    SiteStageMachine,
    SparseGraph,
    kdf,
)
from blossom_secure.secagg.groups import plan_blocks, round_graph_keys
from blossom_secure.secagg.masking import apply_masks
from blossom_secure.secagg.messages import MaskStatement, ShareKind
from blossom_secure.secagg.quantize import dequantize_sum
from blossom_secure.secagg.terms import secagg_params

SITES = tuple(f"s{i:02d}" for i in range(12))
GRAPH = SparseGraph(4, from_sites=8)
PARAMS = SecAggParams(max_weight=100, max_group_size=12, threshold=7, sparse=GRAPH)
L = 2  # GRAPH.min_masked
ROOT = Path(__file__).resolve().parents[2]


def keys_for(round_id: int):
    return round_graph_keys(federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256, round_id=round_id)


def attacker_until_masked_input() -> MaliciousCoordinator:
    attacker = MaliciousCoordinator(SITES, PARAMS)
    attacker.advertise()
    attacker.share({site: SITES for site in SITES})
    attacker.mask({site: SITES for site in SITES})
    assert attacker.refusals == {}
    return attacker


def unmask_all(attacker: MaliciousCoordinator, survivors: tuple[str, ...]) -> None:
    dropped = tuple(s for s in SITES if s not in survivors)
    for site in survivors:
        attacker.unmask(site, survivors=survivors, dropped=dropped, signatures=attacker.signatures_over(survivors))


def recover_sum(attacker: MaliciousCoordinator, sites: tuple[str, ...]) -> np.ndarray | None:
    """The sum of ``sites``' inputs, if what the attacker collected strips every mask from
    the sum of their masked vectors (each site's self mask, and every pairwise mask that
    does not cancel inside the set), else ``None``."""
    context = dict(federation_id=FEDERATION, round_id=attacker.fed.round_id, block=BLOCK)
    public = {s: attacker.decode(a).blocks[0].mask_public_key for s, a in attacker.adverts.items()}
    masked_with = {}
    total = None
    masks = []
    for site in sites:
        message = attacker.masked.get(site)
        if message is None or not message.blocks:
            return None
        vector = message.blocks[0].vector
        total = vector.copy() if total is None else total + vector
        seed = attacker.rebuild(site, ShareKind.SELF_MASK_SEED)
        if seed is None:
            return None
        masks.append((kdf.self_mask_key(seed, site=site, **context), -1))
        masked_with[site] = set(message.statements[0].peers)
    for site in sites:
        for peer in sorted(masked_with[site]):
            if peer in masked_with and site in masked_with[peer]:
                continue  # masked both ways inside the set: the two masks cancel
            own_key, peer_key = attacker.rebuild(site, ShareKind.MASK_KEY), attacker.rebuild(peer, ShareKind.MASK_KEY)
            if own_key is not None:
                secret = crypto.x25519_shared_secret(own_key, public[peer])
            elif peer_key is not None:
                secret = crypto.x25519_shared_secret(peer_key, public[site])
            else:
                return None
            key = kdf.pairwise_mask_key(secret, sites=(site, peer), **context)
            masks.append((key, -1 if site < peer else 1))
    apply_masks(total, masks)
    weighted, weight = dequantize_sum(total, params=PARAMS)
    if weight != sum(attacker.fed.contributions[s].weight for s in sites):
        return None
    return weighted


# ----------------------------------------------------------------- the terms


@pytest.mark.parametrize(("kwargs", "reason"), [
    (dict(neighbours=3), "even"),
    (dict(neighbours=0), "even"),
    (dict(neighbours=4, from_sites=5), "at least neighbours + 2"),
    (dict(neighbours=4, share_threshold=6), "share_threshold must be in 2..neighbours + 1"),
    (dict(neighbours=4, share_threshold=1), "share_threshold must be in 2..neighbours + 1"),
    (dict(neighbours=4, min_masked=0), "min_masked must be in 1..neighbours"),
    (dict(neighbours=4, min_masked=5), "min_masked must be in 1..neighbours"),
])
def test_bad_sparse_terms_refused(kwargs: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        SparseGraph(**kwargs)


def test_sparse_terms_default_from_the_degree() -> None:
    graph = SparseGraph(16)
    assert (graph.from_sites, graph.share_threshold, graph.min_masked) == (48, 9, 8)
    with pytest.raises(ValueError, match="must be at least min_contributors"):
        SecAggParams(max_group_size=12, min_contributors=4, sparse=SparseGraph(4, min_masked=2))


def test_only_blocks_with_enough_possible_signers_use_the_sparse_graph() -> None:
    """Public: from the federation file's terms (N_b), never from a round."""
    params = SecAggParams(max_weight=100, max_group_size=12, threshold=7, sparse=GRAPH,
                          block_groups={"encoder.image": SITES[:5]})
    assert params.is_sparse("fusion") and params.share_threshold("fusion") == 3
    assert not params.is_sparse("encoder.image") and params.share_threshold("encoder.image") == 4


@pytest.fixture
def federation_file(tmp_path: Path) -> Path:
    text = (ROOT / "sites" / "federation.toml").read_text()
    path = tmp_path / "federation.toml"
    path.write_text(text.replace("[aggregation.groups]", "[aggregation.sparse]\n{sparse}\n\n[aggregation.groups]", 1))
    return path


def test_federation_file_declares_the_sparse_graph(federation_file: Path) -> None:
    federation_file.write_text(federation_file.read_text().replace("{sparse}", "neighbours = 2\nfrom_sites = 4"))
    federation = load_federation(federation_file)
    assert dict(federation.aggregation.sparse) == {"neighbours": 2, "from_sites": 4, "share_threshold": 2,
                                                   "min_masked": 1}
    params = secagg_params(federation, roster_size=4)
    assert params.sparse == SparseGraph(2, from_sites=4)
    assert not params.is_sparse("fusion")  # its public group has 3 sites, fewer than from_sites


@pytest.mark.parametrize(("body", "key", "reason"), [
    ("neighbours = 3", "aggregation.sparse.neighbours", "must be even"),
    ("from_sites = 8", "aggregation.sparse.neighbours", "required key is missing"),
    ("neighbours = 4\nfrom_sites = 5", "aggregation.sparse.from_sites", "at least neighbours + 2"),
    ("neighbours = 4\nshare_threshold = 9", "aggregation.sparse.share_threshold", "must not exceed neighbours + 1"),
    ("neighbours = 4\nmin_masked = 5", "aggregation.sparse.min_masked", "must not exceed neighbours"),
    ("neighbours = 4\nfanout = 2", "aggregation.sparse.fanout", "unknown key"),
])
def test_bad_sparse_section_refused_with_file_key_and_reason(federation_file: Path, body: str, key: str,
                                                             reason: str) -> None:
    federation_file.write_text(federation_file.read_text().replace("{sparse}", body))
    with pytest.raises(PolicyError) as info:
        load_federation(federation_file)
    found = [p for p in info.value.problems if p.key == key]
    assert found and reason in found[0].reason and found[0].file == str(federation_file), info.value.problems


# ----------------------------------------------------------------- the graph


def test_graph_is_a_ring_of_degree_k_the_same_for_every_party() -> None:
    offers = {site: ("fusion",) for site in SITES}
    minimums = dict.fromkeys(SITES, 2)
    plan = plan_blocks(offers, minimums, PARAMS, graph_keys=keys_for(4))
    again = plan_blocks(offers, minimums, PARAMS, graph_keys=keys_for(4))
    for site in SITES:
        found = plan.block_neighbours("fusion", site)
        assert len(found) == 4 and site not in found and found == again.block_neighbours("fusion", site)
        assert all(site in plan.block_neighbours("fusion", peer) for peer in found)  # symmetric
    other_round = plan_blocks(offers, minimums, PARAMS, graph_keys=keys_for(5))
    assert any(plan.block_neighbours("fusion", s) != other_round.block_neighbours("fusion", s) for s in SITES)
    params = SecAggParams(max_weight=100, max_group_size=8, threshold=5, sparse=SparseGraph(4, from_sites=6))
    small = plan_blocks({s: ("fusion",) for s in SITES[:5]}, minimums, params, graph_keys=keys_for(4))
    assert small.block_neighbours("fusion", "s00") == SITES[1:5]  # k + 1 members: the complete graph


def test_a_site_whose_minimum_exceeds_l_plus_one_withholds_a_sparse_block() -> None:
    """Its input is only guaranteed to be unmasked with l + 1 = 3 inputs: a policy minimum
    of 4 cannot be met, whatever the group's size."""
    minimums = {**dict.fromkeys(SITES, 2), "s03": 4}
    plan = plan_blocks({site: ("fusion",) for site in SITES}, minimums, PARAMS, graph_keys=keys_for(4))
    assert "s03" not in plan.groups["fusion"] and len(plan.groups["fusion"]) == 11


def test_each_site_masks_with_and_deals_shares_to_its_k_neighbours_only() -> None:
    fed = Federation({site: ("encoder.image", "fusion") for site in SITES}, params=PARAMS)
    fed.run()
    for site in SITES:
        recipients = fed.coordinator._shares[site].shares
        assert len(recipients) == 4  # one ring order for every block: the same four neighbours
    results = fed.coordinator.results()
    for block in ("encoder.image", "fusion"):
        assert results[block].failure is None and results[block].contributors == SITES
        assert np.array_equal(results[block].weighted_sum, fed.expected_sum(block, SITES))


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_any_dropouts_give_the_exact_sum_or_no_sum(data: st.DataObject) -> None:
    """Sites gone before sharing keys, before masking, before signing or before unmasking:
    the block's sum is exact over the sites whose masked input arrived, or there is none."""
    stages = {}
    for site in SITES:
        stages[site] = data.draw(st.sampled_from(["stays"] * 6 + ["share", "mask", "check", "unmask"]), label=site)
    fed = Federation({site: ("fusion",) for site in SITES}, params=PARAMS)
    fed.advertise()
    fed.share(skip=tuple(s for s, stage in stages.items() if stage == "share"))
    fed.mask(skip=tuple(s for s, stage in stages.items() if stage in ("share", "mask")))
    fed.check(skip=tuple(s for s, stage in stages.items() if stage in ("share", "mask", "check")))
    fed.unmask(skip=tuple(s for s, stage in stages.items() if stage != "stays"))
    result = fed.coordinator.results()["fusion"]
    sent = tuple(s for s in SITES if stages[s] in ("stays", "check", "unmask"))
    if result.failure is None:
        assert result.contributors == sent
        assert np.array_equal(result.weighted_sum, fed.expected_sum("fusion", sent))
    else:
        assert result.weighted_sum is None and result.weight_sum is None


# ----------------------------------------------------------------- the attacks


def test_declaring_a_targets_neighbours_dropped_recovers_nothing() -> None:
    """Every input arrived; the coordinator asks everyone to sign a survivor set without
    s00's four neighbours (eight sites, more than t_b = 7), so that it would rebuild their
    mask keys and strip s00's masks. No honest site signs a set in which a survivor keeps
    fewer than l = 2 of its neighbours: no share of s00's seed is revealed."""
    attacker = attacker_until_masked_input()
    survivors = tuple(s for s in SITES if s not in attacker.inbox["s00"])
    assert len(survivors) == 8
    attacker.check({site: survivors for site in survivors})
    assert attacker.signatures == {}
    unmask_all(attacker, survivors)
    assert not any(share.peer == "s00" and share.kind is ShareKind.SELF_MASK_SEED for _, share in attacker.revealed)
    assert attacker.recovers_nobody()


def test_hiding_a_targets_neighbours_at_share_delivery_recovers_nothing() -> None:
    """s00 is told that three of its four neighbours did not share keys, so that it would
    mask with one; it keeps fewer than l = 2 masked neighbours and withholds the block."""
    attacker = MaliciousCoordinator(SITES, PARAMS)
    attacker.advertise()
    attacker.share({site: SITES for site in SITES})
    hidden = sorted(peer for peer, answer in attacker.shares.items()
                    if any(share.peer == "s00" for share in answer.shares))[:3]
    attacker.mask({site: tuple(s for s in SITES if site != "s00" or s not in hidden) for site in SITES})
    assert attacker.masked["s00"].blocks == () and attacker.masked["s00"].statements == ()
    survivors = tuple(s for s in SITES if s != "s00")
    attacker.check({site: SITES for site in survivors})
    unmask_all(attacker, SITES)
    assert attacker.recovers_nobody()


def test_survivor_set_keeping_fewer_than_l_of_the_peers_a_target_masked_with_is_refused() -> None:
    """The view attack the mask statements stop. s00 is told one neighbour, b, did not
    share keys, so it masks with the other three; the survivor set then drops two of those
    three but keeps b. On everyone's graph s00 still has two neighbours in the set (b and
    the third), so a check of the graph alone passes; but s00 masked with only one of
    them, and its input would come out in a sum of two. Its signed statement shows it:
    the holders of its shares refuse to sign (b, because the statement leaves it out)."""
    attacker = MaliciousCoordinator(SITES, PARAMS)
    attacker.advertise()
    attacker.share({site: SITES for site in SITES})
    neighbours = sorted(peer for peer, answer in attacker.shares.items()
                        if any(share.peer == "s00" for share in answer.shares))
    hidden, kept = neighbours[0], neighbours[1:]
    attacker.mask({site: tuple(s for s in SITES if site != "s00" or s != hidden) for site in SITES})
    assert attacker.masked["s00"].statements[0].peers == tuple(kept)
    survivors = tuple(s for s in SITES if s not in kept[:2])
    attacker.check({site: survivors for site in survivors})
    assert isinstance(attacker.refusals[hidden], InconsistentMessageError), attacker.refusals
    assert isinstance(attacker.refusals[kept[2]], ConsistencyCheckError), attacker.refusals
    unmask_all(attacker, survivors)
    assert not any(share.peer == "s00" and share.kind is ShareKind.SELF_MASK_SEED for _, share in attacker.revealed)
    assert attacker.recovers_nobody()


def _check_with(attacker: MaliciousCoordinator, holder: str, replace) -> None:
    genuine = attacker.statements_for(holder, SITES)
    attacker.check({holder: SITES}, statements={holder: replace(genuine)})


def test_forged_mask_statement_refused() -> None:
    """s00's statement with its peers changed (it masked with all four; the coordinator
    claims it masked with two): the signature does not verify."""
    attacker = attacker_until_masked_input()
    holder = sorted(attacker.inbox["s00"])[0]

    def forge(genuine):
        return tuple(MaskStatement(s.site, s.block, s.peers[:2], s.signature) if s.site == "s00" else s
                     for s in genuine)

    _check_with(attacker, holder, forge)
    assert isinstance(attacker.refusals[holder], AuthenticationError) and holder not in attacker.signatures


def test_mask_statement_withheld_refused() -> None:
    attacker = attacker_until_masked_input()
    holder = sorted(attacker.inbox["s00"])[0]
    _check_with(attacker, holder, lambda genuine: tuple(s for s in genuine if s.site != "s00"))
    assert isinstance(attacker.refusals[holder], InconsistentMessageError) and holder not in attacker.signatures


def test_mask_statement_replayed_from_another_round_refused() -> None:
    """A statement s00 genuinely signed in round 3, with the same peers: the payload binds
    the round, so it does not verify for round 4."""
    attacker = attacker_until_masked_input()
    holder = sorted(attacker.inbox["s00"])[0]

    def replay(genuine):
        found = []
        for s in genuine:
            if s.site == "s00":
                payload = kdf.mask_statement_payload(federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256,
                                                     round_id=3, block=BLOCK, site="s00", peers=s.peers)
                s = MaskStatement("s00", BLOCK, s.peers, crypto.sign(attacker.fed.keys["s00"], payload))
            found.append(s)
        return tuple(found)

    _check_with(attacker, holder, replay)
    assert isinstance(attacker.refusals[holder], AuthenticationError) and holder not in attacker.signatures


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_no_value_the_coordinator_unmasks_involves_fewer_than_l_plus_one_inputs(data: st.DataObject) -> None:
    """Every input arrived; the coordinator picks any survivor set of at least t_b sites,
    asks everyone in it to sign it and unmasks with whatever signatures it got. Then for
    every set of at most l = 2 sites it tries to strip the masks from their sum: never.
    A sum over the whole set, where it can strip the masks, is exact (and with nobody
    left out it can: ``test_recover_sum_finds_the_sum_the_protocol_gives``)."""
    attacker = attacker_until_masked_input()
    left_out = data.draw(st.sets(st.sampled_from(SITES), max_size=5), label="declared dropped")
    survivors = tuple(s for s in SITES if s not in left_out)
    attacker.check({site: survivors for site in survivors})
    unmask_all(attacker, survivors)
    for size in range(1, L + 1):
        for sites in itertools.combinations(SITES, size):
            assert recover_sum(attacker, sites) is None, sites
    total = recover_sum(attacker, survivors)
    if total is not None:
        assert np.abs(total - true_sum(attacker, survivors)).max() < 1e-3


def true_sum(attacker: MaliciousCoordinator, sites: tuple[str, ...]) -> np.ndarray:
    return sum(attacker.fed.contributions[s].weight * attacker.fed.contributions[s].blocks[BLOCK].astype(np.float64)
               for s in sites)


def test_recover_sum_finds_the_sum_the_protocol_gives() -> None:
    """Control for the attacks above: with an honest round, ``recover_sum`` strips every
    mask from the sum of all twelve inputs (within the quantisation bound), and from no
    smaller set."""
    attacker = attacker_until_masked_input()
    attacker.check({site: SITES for site in SITES})
    unmask_all(attacker, SITES)
    assert attacker.refusals == {}
    total = recover_sum(attacker, SITES)
    assert total is not None
    assert np.abs(total - true_sum(attacker, SITES)).max() <= 12 * 100 * 2.0 ** -(PARAMS.scale_bits + 1) + 1e-6
    assert all(recover_sum(attacker, SITES[:size]) is None for size in range(1, len(SITES)))


def test_sites_restarted_from_their_state_at_every_stage_give_the_same_sum() -> None:
    """A deployed site answers each stage in a fresh process, restored from its signed
    state: on the sparse graph too, it holds, checks and reveals exactly what it would have
    in one process (s05 gone before its masked input, so mask keys are revealed too)."""
    fed = Federation({site: ("fusion",) for site in SITES}, params=PARAMS)
    for step in ("advertise", "share", "mask", "check", "unmask"):
        for site in SITES:
            machine = fed.sites[site]
            state = machine.export_state()
            restored = SiteStageMachine.from_state(
                state, site_id=site, federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256,
                round_id=fed.round_id, roster=fed.roster, identity_key=fed.keys[site], block_sizes=fed.sizes,
                params=fed.params, contribution=fed.contributions[site])
            assert restored.export_state() == state
            fed.sites[site] = restored
        getattr(fed, step)(skip=("s05",) if step in ("mask", "check", "unmask") else ())
    result = fed.coordinator.results()["fusion"]
    contributors = tuple(s for s in SITES if s != "s05")
    assert result.failure is None and result.contributors == contributors
    assert np.array_equal(result.weighted_sum, fed.expected_sum("fusion", contributors))
