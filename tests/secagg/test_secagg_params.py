"""SecAggParams: validation, the no-wrap proof, thresholds."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blossom_secure.secagg.params import (
    SecAggParams,
    default_group_threshold,
    default_threshold,
    largest_safe_scale_bits,
    max_abs_quantized,
    min_threshold,
)


def test_defaults_resolve_scale_bits_to_the_largest_safe_value() -> None:
    params = SecAggParams()
    assert params.scale_bits == 14
    assert params.max_group_size * params.max_weight * max_abs_quantized(params.clip, 14) <= 2**31 - 1
    assert params.max_group_size * params.max_weight * max_abs_quantized(params.clip, 15) > 2**31 - 1


@settings(max_examples=60, deadline=None)
@given(
    ring_bits=st.sampled_from([32, 64]),
    clip=st.floats(min_value=1e-6, max_value=1e3, allow_nan=False),
    max_weight=st.integers(1, 10**6),
    max_group_size=st.integers(2, 5000),
)
def test_resolved_scale_bits_is_maximal_and_cannot_wrap(
    ring_bits: int, clip: float, max_weight: int, max_group_size: int
) -> None:
    best = largest_safe_scale_bits(ring_bits=ring_bits, clip=clip, max_weight=max_weight, max_group_size=max_group_size)
    kwargs = dict(ring_bits=ring_bits, clip=clip, max_weight=max_weight, max_group_size=max_group_size)
    if best is None or clip * 2.0**best < 1:
        with pytest.raises(ValueError):
            SecAggParams(**kwargs)
        return
    params = SecAggParams(**kwargs)
    assert params.scale_bits == best
    worst = max_group_size * max_weight * math.ceil(clip * 2**best)
    assert worst <= 2 ** (ring_bits - 1) - 1
    with pytest.raises(ValueError, match="could wrap"):
        SecAggParams(scale_bits=best + 1, **kwargs)


def test_wrapping_parameters_refused_naming_the_bound() -> None:
    with pytest.raises(
        ValueError, match=r"max_group_size \* max_weight \* ceil\(clip \* 2\*\*scale_bits\) <= 2\*\*31 - 1"
    ):
        SecAggParams(scale_bits=20)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as info:
        SecAggParams(
            ring_bits=48,
            clip=float("nan"),
            max_weight=0,
            max_group_size=1,
            threshold="3",
            block_thresholds={"head.mortality": 3},
            min_contributors=1,
            max_message_bytes=10,
        )
    message = str(info.value)
    for field in (
        "ring_bits",
        "clip",
        "max_weight",
        "max_group_size",
        "threshold",
        "block_thresholds",
        "min_contributors",
        "max_message_bytes",
    ):
        assert field in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 0.0},
        {"clip": -1.0},
        {"clip": float("inf")},
        {"clip": True},
        {"clip": "1"},
        {"ring_bits": 32.0},
        {"scale_bits": -1},
        {"scale_bits": 1.5},
        {"max_weight": True},
        {"threshold": 50},
        {"threshold": 101},
        {"threshold": True},
        {"max_group_size": 6, "threshold": 3},
        {"max_group_size": 6, "min_contributors": 5, "threshold": 4},
        {"max_group_size": 6, "block_thresholds": {"fusion": 3}},
        {"max_group_size": 6, "block_thresholds": {"fusion": 7}},
        {"max_group_size": 6, "block_thresholds": {"head.mortality": 4}},
        {"max_group_size": 6, "block_thresholds": {"Fusion": 4}},
        {"max_group_size": 6, "block_thresholds": [("fusion", 4)]},
        {"min_contributors": 200},
        {"max_message_bytes": 2**31},
    ],
)
def test_bad_values_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SecAggParams(**kwargs)


def test_construction_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        SecAggParams(32)  # type: ignore[misc]


def test_default_threshold_is_two_thirds_of_max_sites_plus_one() -> None:
    for n in range(2, 200):
        t = default_threshold(n)
        assert t == (2 * n) // 3 + 1 and 2 * t > n and t <= n and t >= 2
        assert SecAggParams(max_group_size=n, max_weight=10).threshold == t
        assert min_threshold(n) == n // 2 + 1 <= t
    assert SecAggParams(max_group_size=4, max_weight=10).threshold == 3
    assert default_threshold(6, min_contributors=6) == 6
    with pytest.raises(ValueError):
        default_threshold(1)


@settings(max_examples=80, deadline=None)
@given(max_sites=st.integers(2, 300), data=st.data())
def test_every_accepted_threshold_is_a_strict_majority_of_max_sites(max_sites: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(2, max_sites + 2))
    kwargs = dict(max_group_size=max_sites, max_weight=10, threshold=threshold)
    if max_sites // 2 + 1 <= threshold <= max_sites:
        params = SecAggParams(**kwargs)
        assert params.block_threshold("fusion") == threshold
        assert 2 * params.block_threshold("fusion") > max_sites
    else:
        with pytest.raises(ValueError, match="threshold"):
            SecAggParams(**kwargs)


def test_block_thresholds_override_the_federation_threshold() -> None:
    params = SecAggParams(max_group_size=6, max_weight=10, threshold=4, block_thresholds={"fusion": 6})
    assert params.threshold == 4
    assert params.block_threshold("fusion") == 6
    assert params.block_threshold("encoder.image") == 4
    with pytest.raises(TypeError):
        params.block_thresholds["fusion"] = 2  # type: ignore[index]


def test_threshold_below_a_majority_is_refused_naming_why() -> None:
    with pytest.raises(ValueError, match="more than half of max_group_size"):
        SecAggParams(max_group_size=4, max_weight=10, threshold=2)


def test_ring_dtypes() -> None:
    assert SecAggParams().ring_dtype.str == "<u4"
    assert SecAggParams(ring_bits=64).ring_dtype.str == "<u8"
    assert SecAggParams().quantisation_step() == 2.0**-14


# ---------------------------------------------------------------- block groups


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ({"head.mortality": ("a", "b")}, "not a shareable block"),
        ({"Fusion": ("a", "b")}, "not a shareable block"),
        ({"fusion": "ab"}, "sequence of site ids"),
        ({"fusion": ("a", "b c")}, "not a valid site id"),
        ({"fusion": ("a", "a", "b")}, "names a site twice"),
        ({"fusion": ("a",)}, "at least 2 sites"),
        ({"fusion": tuple("abcdefg")}, "more sites than max_group_size"),
        ([("fusion", ("a", "b"))], "block_groups must be a mapping"),
    ],
)
def test_bad_block_groups_refused(groups: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SecAggParams(max_group_size=6, max_weight=10, block_groups=groups)


def test_group_thresholds_are_checked_against_the_group() -> None:
    groups = {"fusion": ("a", "b", "c", "d")}
    assert SecAggParams(max_group_size=10, max_weight=10, block_groups=groups, block_thresholds={"fusion": 3})
    for bad, match in ((2, "more than half of .P_b. of fusion .4., at least 3"), (5, "must not exceed .P_b.")):
        with pytest.raises(ValueError, match=match):
            SecAggParams(max_group_size=10, max_weight=10, block_groups=groups, block_thresholds={"fusion": bad})
    with pytest.raises(ValueError, match="at least min_contributors"):
        SecAggParams(max_group_size=10, max_weight=10, min_contributors=4, block_groups=groups,
                     block_thresholds={"fusion": 3})


def test_group_default_threshold_and_membership() -> None:
    params = SecAggParams(max_group_size=10, max_weight=10, block_groups={"fusion": ["e", "a", "c", "b", "d"]})
    assert params.block_groups["fusion"] == ("a", "b", "c", "d", "e")
    assert params.block_threshold("fusion") == default_group_threshold(5) == 4
    assert params.block_threshold("encoder.image") == params.threshold == 7
    assert params.is_group_member("fusion", "a") and not params.is_group_member("fusion", "z")
    assert params.is_group_member("encoder.image", "z") and params.block_group("encoder.image") is None
    with pytest.raises(TypeError):
        params.block_groups["fusion"] = ("a", "b")  # type: ignore[index]
    for n in range(2, 60):
        t = default_group_threshold(n)
        assert t == (2 * n) // 3 + 1 and 2 * t > n and t <= n
    assert default_group_threshold(3, min_contributors=5) == 3  # capped: such a block never aggregates
    with pytest.raises(ValueError):
        default_group_threshold(1)
