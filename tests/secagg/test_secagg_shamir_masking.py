"""Shamir sharing and mask expansion: properties and fast-against-reference checks."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import secagg_reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from blossom_secure.secagg import shamir
from blossom_secure.secagg.masking import CHUNK_BYTES, apply_masks, expand_mask


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(1, 9), data=st.data())
def test_any_t_shares_rebuild_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    ys = shamir.split(secret, threshold=t, xs=xs)
    subset = data.draw(st.lists(st.sampled_from(range(n)), min_size=t, max_size=n, unique=True))
    points = [(xs[i], ys[i]) for i in subset]
    rebuilt = shamir.reconstruct([p[0] for p in points], [p[1] for p in points])
    assert rebuilt == int.from_bytes(secret, "big")
    assert ref.shamir_reconstruct_reference(points) == rebuilt


def test_fewer_than_t_shares_do_not_rebuild_the_secret() -> None:
    secret = os.urandom(32)
    xs = list(range(1, 8))
    ys = shamir.split(secret, threshold=4, xs=xs)
    for subset in itertools.combinations(range(7), 3):
        assert shamir.reconstruct([xs[i] for i in subset], [ys[i] for i in subset]) != int.from_bytes(secret, "big")


def test_lagrange_coefficients_are_cached_per_survivor_set() -> None:
    shamir.lagrange_coefficients_at_zero.cache_clear()
    xs = (3, 5, 8)
    first = shamir.lagrange_coefficients_at_zero(xs)
    assert shamir.lagrange_coefficients_at_zero(xs) is first
    assert shamir.lagrange_coefficients_at_zero.cache_info().hits == 1


@pytest.mark.parametrize(
    ("secret", "threshold", "xs"),
    [
        (b"short", 1, [1]),
        (bytes(32), 0, [1]),
        (bytes(32), 3, [1, 2]),
        (bytes(32), 1, [0]),
        (bytes(32), 2, [1, 1]),
        (bytes(32), 1, [shamir.PRIME]),
    ],
)
def test_bad_split_arguments_refused(secret: bytes, threshold: int, xs: list[int]) -> None:
    with pytest.raises(ValueError):
        shamir.split(secret, threshold=threshold, xs=xs)


def test_bad_share_encodings_refused() -> None:
    with pytest.raises(ValueError):
        shamir.share_from_bytes(bytes(65))
    with pytest.raises(ValueError):
        shamir.share_from_bytes(shamir.PRIME.to_bytes(66, "big"))
    with pytest.raises(ValueError):
        shamir.reconstruct([1, 2], [1])
    with pytest.raises(ValueError):
        shamir.reconstruct([1], [shamir.PRIME])


@pytest.mark.parametrize("dtype", ["<u4", "<u8"])
@pytest.mark.parametrize("count", [0, 1, 3, 4, CHUNK_BYTES // 4 - 1, CHUNK_BYTES // 4 + 5, 3 * CHUNK_BYTES // 8 + 1])
def test_chunked_expansion_equals_ecb_reference(dtype: str, count: int) -> None:
    key = os.urandom(32)
    bits = 32 if dtype == "<u4" else 64
    assert expand_mask(key, count=count, dtype=dtype).tolist() == ref.mask_reference(key, count, bits)


def test_masks_with_opposite_signs_cancel() -> None:
    vector = np.arange(100_001, dtype="<u4")
    keys = [os.urandom(32) for _ in range(5)]
    apply_masks(vector, [(k, 1) for k in keys] + [(k, -1) for k in reversed(keys)])
    assert np.array_equal(vector, np.arange(100_001, dtype="<u4"))


@pytest.mark.parametrize("dtype", ["<u4", "<u8"])
def test_slices_masked_separately_equal_whole_vector(dtype: str) -> None:
    masks = [(os.urandom(32), 1), (os.urandom(32), -1)]
    whole = np.zeros(70_000, dtype=dtype)
    apply_masks(whole, masks)
    pieces = np.zeros(70_000, dtype=dtype)
    apply_masks(pieces[:40_000], masks)
    apply_masks(pieces[40_000:], masks, first_element=40_000)
    assert np.array_equal(whole, pieces)


def test_bad_mask_arguments_refused() -> None:
    with pytest.raises(ValueError):
        apply_masks(np.zeros(4, dtype=np.float32), [])
    with pytest.raises(ValueError):
        apply_masks(np.zeros(4, dtype="<u4"), [(os.urandom(32), 2)])
    with pytest.raises(ValueError):
        apply_masks(np.zeros(4, dtype="<u4"), [(os.urandom(16), 1)])
    with pytest.raises(ValueError):
        apply_masks(np.zeros(4, dtype="<u4"), [], first_element=3)
    read_only = np.zeros(4, dtype="<u4")
    read_only.flags.writeable = False
    with pytest.raises(ValueError):
        apply_masks(read_only, [])
    with pytest.raises(ValueError):
        expand_mask(os.urandom(32), count=-1, dtype="<u4")
    with pytest.raises(ValueError):
        expand_mask(os.urandom(32), count=1, dtype="<i4")
