"""SecAggParams: validation, the no-wrap proof, thresholds."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blossom_secure.secagg.params import (
    SecAggParams,
    largest_safe_scale_bits,
    max_abs_quantized,
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
            threshold_fraction=1.0,
            min_contributors=1,
            max_message_bytes=10,
        )
    message = str(info.value)
    for field in (
        "ring_bits",
        "clip",
        "max_weight",
        "max_group_size",
        "threshold_fraction",
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
        {"threshold_fraction": 0.49},
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


@pytest.mark.parametrize("fraction", [0.5, 0.6, 2 / 3, 0.75, 0.99])
def test_threshold_is_a_strict_majority_and_at_least_two(fraction: float) -> None:
    params = SecAggParams(threshold_fraction=fraction)
    for n in range(2, 60):
        t = params.threshold(n)
        assert t >= 2 and 2 * t > n and t <= n


def test_threshold_refuses_groups_of_one() -> None:
    with pytest.raises(ValueError):
        SecAggParams().threshold(1)


def test_ring_dtypes() -> None:
    assert SecAggParams().ring_dtype.str == "<u4"
    assert SecAggParams(ring_bits=64).ring_dtype.str == "<u8"
    assert SecAggParams().quantisation_step() == 2.0**-14
