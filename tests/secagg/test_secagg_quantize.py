"""Quantisation: against an exact reference, the documented error bound, no wrap at extremes."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import secagg_reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from blossom_secure.secagg.masking import masked_ring_vector
from blossom_secure.secagg.params import SecAggParams
from blossom_secure.secagg.quantize import (
    dequantize_sum,
    quantize_into,
    validate_update,
)

float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)
PARAM_SETS = [
    SecAggParams(ring_bits=32, clip=1.0, max_weight=50, max_group_size=8),
    SecAggParams(ring_bits=32, clip=0.1, max_weight=7, max_group_size=5),
    SecAggParams(ring_bits=32, clip=3.3, scale_bits=4, max_weight=9, max_group_size=3),
    SecAggParams(ring_bits=64, clip=0.37, max_weight=1000, max_group_size=100),
    SecAggParams(ring_bits=64, clip=1.0, scale_bits=20, max_weight=10, max_group_size=10),
    # Q = round(clip * 2**s) beyond 2**24 (32-bit ring) or 2**53 (64-bit ring): the path that
    # clips at the float nearest clip and then clips the integers.
    SecAggParams(ring_bits=32, clip=0.1, max_weight=2, max_group_size=2),
    SecAggParams(ring_bits=64, clip=0.3, max_weight=1, max_group_size=2),
]


def quantize(values: list[float], weight: int, params: SecAggParams) -> list[int]:
    out = np.empty(len(values) + 1, dtype=params.ring_dtype)
    quantize_into(np.array(values, dtype=np.float32), weight=weight, params=params, out=out)
    return out.tolist()


@settings(max_examples=80, deadline=None)
@given(values=st.lists(float32s, min_size=1, max_size=40), params=st.sampled_from(PARAM_SETS), data=st.data())
def test_fast_quantisation_equals_exact_reference(
    values: list[float], params: SecAggParams, data: st.DataObject
) -> None:
    weight = data.draw(st.integers(1, params.max_weight))
    expected = ref.quantize_reference(
        values, clip=params.clip, scale_bits=params.scale_bits, weight=weight, ring_bits=params.ring_bits
    )
    assert quantize(values, weight, params) == expected


@settings(max_examples=60, deadline=None)
@given(params=st.sampled_from(PARAM_SETS), data=st.data())
def test_weighted_sum_error_within_documented_bound(params: SecAggParams, data: st.DataObject) -> None:
    sites = data.draw(st.integers(1, params.max_group_size))
    size = data.draw(st.integers(1, 12))
    updates = [data.draw(st.lists(float32s, min_size=size, max_size=size)) for _ in range(sites)]
    weights = [data.draw(st.integers(1, params.max_weight)) for _ in range(sites)]
    total = np.zeros(size + 1, dtype=params.ring_dtype)
    for update, weight in zip(updates, weights, strict=True):
        total += np.array(quantize(update, weight, params), dtype=params.ring_dtype)
    weighted, weight_sum = dequantize_sum(total, params=params)
    assert weight_sum == sum(weights)
    bound = Fraction(sum(weights), 2 ** (params.scale_bits + 1))
    clip = Fraction(params.clip)
    for i in range(size):
        exact = sum(w * min(max(Fraction(u[i]), -clip), clip) for u, w in zip(updates, weights, strict=True))
        error = abs(Fraction(float(weighted[i])) - exact)
        float_slack = abs(Fraction(float(weighted[i]))) * Fraction(1, 2**53)  # only a 64-bit ring sum above 2**53
        assert error <= bound + float_slack


@pytest.mark.parametrize("params", PARAM_SETS, ids=lambda p: f"{p.ring_bits}-{p.clip}")
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_largest_inputs_from_the_largest_group_do_not_wrap(params: SecAggParams, sign: float) -> None:
    extreme = [sign * 1e30, sign * params.clip]
    total = np.zeros(3, dtype=params.ring_dtype)
    for _ in range(params.max_group_size):
        total += np.array(quantize(extreme, params.max_weight, params), dtype=params.ring_dtype)
    weighted, weight_sum = dequantize_sum(total, params=params)
    q = round(Fraction(params.clip) * 2**params.scale_bits)
    expected = sign * params.max_group_size * params.max_weight * q / 2**params.scale_bits
    assert weighted.tolist() == pytest.approx([expected, expected], rel=2**-52)
    assert np.sign(weighted).tolist() == [sign, sign]
    assert weight_sum == params.max_group_size * params.max_weight


@pytest.mark.parametrize("params", PARAM_SETS)
def test_values_at_the_clip_and_at_half_steps_quantise_exactly(params: SecAggParams) -> None:
    """The edges where a shortcut would go wrong: either side of the clip, the float32
    values nearest the clip, half-way points between two quantisation steps (ties go to
    even), and the largest and smallest float32 values."""
    step = 2.0 ** -params.scale_bits
    clip32 = np.float32(params.clip)
    limit = round(Fraction(params.clip) / Fraction(step))
    values = [
        params.clip, -params.clip,
        float(np.nextafter(clip32, np.float32(np.inf))), float(np.nextafter(clip32, np.float32(0))),
        float(-np.nextafter(clip32, np.float32(np.inf))), float(-np.nextafter(clip32, np.float32(0))),
        (limit - 0.5) * step, (limit + 0.5) * step, -(limit - 0.5) * step, (limit - 1.5) * step,
        0.5 * step, 1.5 * step, 2.5 * step, -0.5 * step, -1.5 * step,
        float(np.finfo(np.float32).max), float(-np.finfo(np.float32).max),
        float(np.finfo(np.float32).smallest_subnormal),
        0.0, -0.0,
    ]
    values = [float(np.float32(value)) for value in values]
    for weight in (1, params.max_weight):
        expected = ref.quantize_reference(
            values, clip=params.clip, scale_bits=params.scale_bits, weight=weight, ring_bits=params.ring_bits
        )
        assert quantize(values, weight, params) == expected


def test_clip_that_is_not_a_float32_matches_exact_clipping() -> None:
    params = SecAggParams(clip=0.1, max_weight=7, max_group_size=5)
    assert quantize([1.0], 1, params)[0] == round(Fraction(0.1) * 2**params.scale_bits)


def test_fused_masking_without_masks_equals_quantisation() -> None:
    params = PARAM_SETS[0]
    update = (np.linspace(-2, 2, 200_003)).astype(np.float32)
    fused = masked_ring_vector(update, weight=3, params=params, masks=[])
    out = np.empty(update.shape[0] + 1, dtype=params.ring_dtype)
    quantize_into(update, weight=3, params=params, out=out)
    assert np.array_equal(fused, out)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_refused(bad: float) -> None:
    update = np.zeros(5, dtype=np.float32)
    update[3] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        validate_update(update, name="fusion")
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_into(update, weight=1, params=PARAM_SETS[0], out=np.empty(6, dtype="<u4"))


@pytest.mark.parametrize("weight", [0, -1, 51, True, 2.0])
def test_bad_weights_refused(weight: object) -> None:
    with pytest.raises(ValueError, match="weight"):
        quantize_into(np.zeros(2, np.float32), weight=weight, params=PARAM_SETS[0], out=np.empty(3, dtype="<u4"))  # type: ignore[arg-type]


def test_bad_update_types_refused() -> None:
    with pytest.raises(TypeError):
        validate_update(np.zeros(3, dtype=np.float64), name="fusion")
    with pytest.raises(TypeError):
        validate_update([0.0], name="fusion")
    with pytest.raises(ValueError, match="1-D"):
        validate_update(np.zeros((2, 2), dtype=np.float32), name="fusion")
    with pytest.raises(ValueError, match="layout"):
        validate_update(np.zeros(3, dtype=np.float32), name="fusion", size=4)


def test_bad_output_buffers_refused() -> None:
    with pytest.raises(ValueError):
        quantize_into(np.zeros(2, np.float32), weight=1, params=PARAM_SETS[0], out=np.empty(2, dtype="<u4"))
    with pytest.raises(ValueError):
        quantize_into(np.zeros(2, np.float32), weight=1, params=PARAM_SETS[0], out=np.empty(3, dtype="<u8"))
    with pytest.raises(ValueError):
        dequantize_sum(np.zeros(0, dtype="<u4"), params=PARAM_SETS[0])
