"""Property tests of the whole protocol: masks cancel for any groups and any dropouts.

The oracle below restates the protocol's rules from docs/protocol.md independently of
the implementation: which blocks go ahead after advertising, and which survive dropouts
(including dropouts between the masked input and the consistency check, and after it).
Thresholds are public: ``t_b`` comes from the parameters, never from a group's size.
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_harness import FEDERATION, FEDERATION_SHA256, make_keys, update_for

from blossom_secure.secagg import (
    DROP_POINTS,
    SecAggParams,
    SiteContribution,
    run_secure_aggregation,
)

SIZES = {"encoder.image": 5, "encoder.tabular": 3, "fusion": 1}
SITES = [f"h{i}" for i in range(7)]
KEYS, ROSTER = make_keys(SITES)
# max_sites = 7: thresholds must be at least 4; one block gets its own threshold.
PARAMS = SecAggParams(max_weight=20, max_group_size=7, threshold=4, block_thresholds={"encoder.tabular": 5}, clip=0.5)
STAGE_ORDER = {
    None: 5,
    "unmask": 5,
    "consistency": 4,
    "masked_input": 3,
    "share_keys": 2,
    "advertise_keys": 1,
    "start": 0,
}


def threshold(block: str, params: SecAggParams) -> int:
    """The public threshold: the per-block override, else the federation's."""
    return dict(params.block_thresholds).get(block, params.threshold)


def oracle(offers: dict, minimums: dict, drops: dict, params: SecAggParams) -> dict[str, tuple[str, ...] | None]:
    """Block -> the contributors whose sum must come out, or None if it must fail."""
    reached = {site: STAGE_ORDER[drops.get(site)] for site in offers}
    outcome = {}
    for block in SIZES:
        group = sorted(site for site, blocks in offers.items() if block in blocks and reached[site] >= 1)
        changed = True
        while changed:
            kept = [s for s in group if max(minimums[s], params.min_contributors) <= len(group)]
            changed, group = kept != group, kept
        t = threshold(block, params)
        if not max(params.min_contributors, t) <= len(group) <= params.max_group_size:
            outcome[block] = None
            continue

        def enough(members: list[str], t: int = t) -> bool:
            return len(members) >= max(t, params.min_contributors, *(minimums[s] for s in members))

        shared = [s for s in group if reached[s] >= 2]
        contributors = [s for s in shared if reached[s] >= 3]
        signers = [s for s in contributors if reached[s] >= 4]
        responders = [s for s in signers if reached[s] >= 5]
        ok = enough(shared) and enough(contributors) and len(signers) >= t and len(responders) >= t
        outcome[block] = tuple(contributors) if ok else None
    return outcome


def expected_sum(contributions: dict, block: str, contributors: tuple[str, ...], params: SecAggParams) -> np.ndarray:
    scale = 2.0**params.scale_bits
    total = np.zeros(SIZES[block])
    for site in contributors:
        clipped = np.clip(contributions[site].blocks[block].astype(np.float64), -params.clip, params.clip)
        total += contributions[site].weight * np.rint(clipped * scale)
    return total / scale


def run_and_check(
    offers: dict,
    minimums: dict,
    weights: dict,
    drops: dict,
    params: SecAggParams = PARAMS,
    keys: tuple[dict, dict] = (KEYS, ROSTER),
) -> None:
    contributions = {
        site: SiteContribution(
            blocks={b: update_for(site, b, SIZES[b]) * 40 for b in blocks},
            weight=weights[site],
            min_contributors=minimums[site],
        )
        for site, blocks in offers.items()
    }
    result = run_secure_aggregation(
        federation_id=FEDERATION,
        federation_sha256=FEDERATION_SHA256,
        round_id=9,
        roster=keys[1],
        identity_keys=keys[0],
        contributions=contributions,
        block_sizes=SIZES,
        params=params,
        drop_after={s: p for s, p in drops.items() if p is not None},
    )
    assert not result.site_errors
    expected = oracle(offers, minimums, drops, params)
    for block, contributors in expected.items():
        outcome = result.blocks[block]
        if contributors is None:
            assert outcome.weighted_sum is None and outcome.weight_sum is None and outcome.failure
            assert outcome.contributors == ()
        else:
            assert outcome.failure is None, outcome.failure
            assert outcome.contributors == contributors
            assert outcome.weight_sum == sum(weights[s] for s in contributors)
            assert np.array_equal(outcome.weighted_sum, expected_sum(contributions, block, contributors, params))


@st.composite
def rounds(draw: st.DrawFn) -> tuple[dict, dict, dict, dict]:
    # Groups must reach the public threshold (4 or 5 of 7) to aggregate at all, so sites
    # offer each block with probability 3/4 and drop with probability 1/3.
    sites = draw(st.lists(st.sampled_from(SITES), min_size=2, max_size=7, unique=True))
    offers = {
        s: tuple(b for b in sorted(SIZES) if draw(st.sampled_from([True, True, True, False]))) for s in sites
    }
    minimums = {s: draw(st.sampled_from([1, 2, 2, 2, 3, 4, 5])) for s in sites}
    weights = {s: draw(st.integers(1, PARAMS.max_weight)) for s in sites}
    drops = {s: draw(st.sampled_from([None] * 12 + list(DROP_POINTS))) for s in sites}
    return offers, minimums, weights, drops


@settings(max_examples=120, deadline=None)
@given(rounds())
def test_unmasked_sum_equals_plain_sum_for_any_groups_and_dropouts(case: tuple[dict, dict, dict, dict]) -> None:
    run_and_check(*case)


def test_every_dropout_pattern_of_one_group_of_five() -> None:
    """Exhaustive over a federation of five (max_sites = 5, t = 3), one block: two sites
    stop at any point each (6**2 patterns), with every choice of which two (10)."""
    sites = SITES[:5]
    keys = ({s: KEYS[s] for s in sites}, {s: ROSTER[s] for s in sites})
    params = SecAggParams(max_weight=20, max_group_size=5, threshold=3, clip=0.5)
    offers = {s: ("fusion",) for s in sites}
    minimums = {s: 2 for s in sites}
    weights = {s: i + 1 for i, s in enumerate(sites)}
    for pair in itertools.combinations(sites, 2):
        for pattern in itertools.product([None, *DROP_POINTS[:-1]], repeat=2):
            run_and_check(offers, minimums, weights, dict(zip(pair, pattern, strict=True)), params, keys)


def test_every_dropout_pattern_of_one_group_of_three() -> None:
    """Exhaustive: three sites, one block, each stopping at any point (6**3 patterns);
    with t = 3 any dropout after advertising fails the block cleanly."""
    sites = SITES[:3]
    keys = ({s: KEYS[s] for s in sites}, {s: ROSTER[s] for s in sites})
    params = SecAggParams(max_weight=20, max_group_size=3, clip=0.5)
    assert params.threshold == 3
    offers = {s: ("fusion",) for s in sites}
    weights = {s: i + 1 for i, s in enumerate(sites)}
    for pattern in itertools.product([None, *DROP_POINTS[:-1]], repeat=3):
        run_and_check(offers, {s: 2 for s in sites}, weights, dict(zip(sites, pattern, strict=True)), params, keys)


def test_fewer_than_t_survivors_gives_no_sum() -> None:
    sites = SITES[:6]  # t = 4
    offers = {s: ("encoder.image",) for s in sites}
    drops = {"h0": "share_keys", "h1": "share_keys", "h2": "masked_input"}
    contributions = {
        s: SiteContribution(blocks={"encoder.image": update_for(s, "encoder.image", 5)}, weight=1) for s in sites
    }
    result = run_secure_aggregation(
        federation_id=FEDERATION,
        federation_sha256=FEDERATION_SHA256,
        round_id=9,
        roster=ROSTER,
        identity_keys=KEYS,
        contributions=contributions,
        block_sizes=SIZES,
        params=PARAMS,
        drop_after=drops,
    )
    block = result.blocks["encoder.image"]
    assert block.weighted_sum is None and block.failure.startswith("fewer than t survivors")
    assert oracle(offers, {s: 2 for s in sites}, drops, PARAMS)["encoder.image"] is None


def test_sixty_four_bit_ring_sums_exactly() -> None:
    params = SecAggParams(ring_bits=64, max_weight=1000, max_group_size=7, threshold=4)
    offers = {s: ("encoder.image", "fusion") for s in SITES[:5]}
    run_and_check(offers, {s: 2 for s in offers}, {s: 999 for s in offers}, {"h2": "masked_input"}, params)


def test_dropout_between_masked_input_and_consistency_check_keeps_the_input() -> None:
    """A site that sent masked input but never signed is still a survivor: its input is in
    the sum and its self mask is removed with the other signers' shares of its seed."""
    offers = {s: ("fusion",) for s in SITES[:5]}
    run_and_check(offers, {s: 2 for s in offers}, {s: 3 for s in offers}, {"h1": "masked_input"})
    run_and_check(offers, {s: 2 for s in offers}, {s: 3 for s in offers}, {"h1": "consistency"})
