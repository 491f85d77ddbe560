"""Fixed-point quantisation of clipped, weighted updates into the ring Z_2^b, and back.

A site turns each float32 coordinate ``x`` into ``w * round(clip(x) * 2**s) mod 2**b``
(``w`` its integer weight, ``s = scale_bits``, rounding half to even) and appends ``w``
itself, so that the weight sum comes out of the secure sum beside the weighted update sum.

Error bound: rounding moves each ``clip(x) * 2**s`` by at most 1/2, so each coordinate of
the dequantised weighted sum differs from ``sum_i w_i * clip(x_i)`` by at most
``(sum_i w_i) * 2**-(s + 1)``; the weighted mean ``weighted_sum / weight_sum`` is within
``2**-(s + 1)`` of the exact weighted mean of the clipped updates. With a 32-bit ring the
conversions are exact; with a 64-bit ring a sum beyond 2**53 also carries float64's
relative rounding of 2**-53.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from blossom_secure.secagg.params import SecAggParams

__all__ = [
    "ChunkQuantizer",
    "check_weight",
    "dequantize_sum",
    "quantize_into",
    "validate_update",
]


def validate_update(update: object, *, name: str, size: int | None = None) -> None:
    """Check that ``update`` is a finite 1-D float32 array (of ``size`` elements).

    Raises:
        TypeError: not a numpy array of dtype float32.
        ValueError: not 1-D, wrong size, or containing NaN or infinity.
    """
    if not isinstance(update, np.ndarray) or update.dtype != np.float32:
        raise TypeError(f"update of {name} must be a numpy float32 array")
    if update.ndim != 1:
        raise ValueError(f"update of {name} must be 1-D")
    if size is not None and update.shape[0] != size:
        raise ValueError(f"update of {name} has {update.shape[0]} values, the layout says {size}")
    if not np.isfinite(update).all():
        raise ValueError(f"update of {name} contains NaN or infinity")


def _smallest_float32_at_least(value: float) -> np.float32:
    """The smallest float32 that is >= ``value``."""
    candidate = np.float32(value)
    if float(candidate) < value:
        candidate = np.nextafter(candidate, np.float32(np.inf))
    return candidate


class ChunkQuantizer:
    """Quantises one update, a chunk at a time, into a ring vector being masked.

    Args:
        update: The float32 1-D update (validated by the caller).
        weight: The site's weight, ``1..params.max_weight``.
        params: The round's parameters.

    Notes:
        Working on chunks that stay in cache lets the site quantise and mask in one pass
        over memory. The arithmetic is done in float32 for a 32-bit ring (float64 for a
        64-bit ring), which is exact here: multiplying by ``2**s`` only changes the
        exponent, and rounding to an integer is exact. ``clip`` itself may not be a
        float32; with ``Q = round(clip * 2**s)`` computed exactly (half to even),
        ``round(clamp(y, clip * 2**s)) == round(clamp(y, Q))`` for every ``y``, because
        rounding is monotone and ``round(Q) = Q = round(clip * 2**s)``. So ``x`` is
        clipped to ``[-Q / 2**s, Q / 2**s]`` (exact bounds), scaled and rounded: the
        result equals ``round(clip_exact(x) * 2**s)`` for every input, in four passes
        with the weight. That needs ``Q`` exact in the working float (below ``2**24``,
        or ``2**53``); otherwise the values are clipped to the smallest float >= ``clip``,
        scaled and rounded, and the integers clipped to ``[-Q, Q]``. The no-wrap proof keeps
        ``|q| <= 2**30`` and ``|w * q| < 2**31`` (32-bit ring), so the integer weight
        product is exact.
    """

    __slots__ = ("_update", "_weight", "_low", "_high", "_scale", "_float", "_signed", "_scratch", "_limit", "_fast")

    def __init__(self, update: np.ndarray, *, weight: int, params: SecAggParams) -> None:
        self._update = update
        self._weight = int(weight)
        scale_bits = int(params.scale_bits or 0)
        limit = round(Fraction(params.clip) * Fraction(2) ** scale_bits)
        if params.ring_bits == 32:
            self._float = np.dtype(np.float32)
            self._signed = np.dtype(np.int32)
            high = _smallest_float32_at_least(params.clip)
            self._fast = limit < 1 << 24
        else:
            self._float = np.dtype(np.float64)
            self._signed = np.dtype(np.int64)
            high = np.float64(params.clip)
            self._fast = limit < 1 << 53
        self._scale = self._float.type(math.ldexp(1.0, scale_bits))
        bound = math.ldexp(limit, -scale_bits)
        self._fast = self._fast and float(self._float.type(bound)) == bound
        if self._fast:
            self._high = self._float.type(bound)
            self._limit: int | None = None
        else:
            self._high = high
            self._limit = limit if float(high) != params.clip else None
        self._low = -self._high
        self._scratch = np.empty(0, dtype=self._float)

    def fill(self, start: int, out: np.ndarray) -> None:
        """Write the quantised, weighted values of ``update[start:start + len(out)]`` into
        ``out`` (a ring-dtype view).

        Raises:
            ValueError: the chunk contains NaN or infinity.
        """
        count = out.shape[0]
        if self._scratch.shape[0] < count:
            self._scratch = np.empty(count, dtype=self._float)
        source = self._update[start : start + count]
        if not np.isfinite(source).all():
            raise ValueError("update contains NaN or infinity")
        work = self._scratch[:count]
        signed = out.view(self._signed)
        if self._fast:
            np.clip(source, self._low, self._high, out=work)
            np.multiply(work, self._scale, out=work)
            np.rint(work, out=work)
            np.multiply(work, self._weight, out=signed, dtype=self._signed, casting="unsafe")
            return
        np.clip(source, self._low, self._high, out=work)
        np.multiply(work, self._scale, out=work)
        np.rint(work, out=work)
        np.copyto(signed, work, casting="unsafe")
        if self._limit is not None:
            np.clip(signed, -self._limit, self._limit, out=signed)
        if self._weight != 1:
            np.multiply(signed, self._weight, out=signed)


def quantize_into(update: np.ndarray, *, weight: int, params: SecAggParams, out: np.ndarray) -> None:
    """Write the ring vector of one block: ``len(update)`` weighted fixed-point values,
    then the weight.

    Args:
        update: Finite float32 1-D update.
        weight: Integer weight in ``1..params.max_weight``.
        params: The round's parameters.
        out: Ring-dtype array of ``len(update) + 1`` elements.

    Raises:
        ValueError: bad weight, wrong ``out`` shape or dtype, or a non-finite update.
    """
    check_weight(weight, params)
    if out.dtype != params.ring_dtype or out.shape != (update.shape[0] + 1,):
        raise ValueError("out must be a ring vector of len(update) + 1 elements")
    ChunkQuantizer(update, weight=weight, params=params).fill(0, out[:-1])
    out[-1] = weight


def check_weight(weight: object, params: SecAggParams) -> None:
    """Check that ``weight`` is an int in ``1..params.max_weight``.

    Raises:
        ValueError: it is not.
    """
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= params.max_weight:
        raise ValueError(f"weight must be an int in 1..{params.max_weight}")


def dequantize_sum(ring_sum: np.ndarray, *, params: SecAggParams) -> tuple[np.ndarray, int]:
    """Turn an unmasked ring sum back into ``(weighted_sum, weight_sum)``.

    Args:
        ring_sum: The unmasked sum of ring vectors (``block size + 1`` elements).
        params: The round's parameters.

    Returns:
        The float64 weighted sum of the dequantised clipped updates, and the integer sum
        of the weights (the last element).

    Raises:
        ValueError: ``ring_sum`` is not a non-empty ring-dtype vector.

    Notes:
        Reading the ring elements as two's-complement integers is the exact inverse of the
        modular reduction because :class:`SecAggParams` proved ``|S| <= 2**(b-1) - 1``.
    """
    if ring_sum.dtype != params.ring_dtype or ring_sum.ndim != 1 or ring_sum.shape[0] < 1:
        raise ValueError("ring_sum must be a non-empty ring vector")
    signed = ring_sum[:-1].view(np.int32 if params.ring_bits == 32 else np.int64)
    # One pass: the conversion to float64, then a power-of-two scaling (exact, as ldexp).
    weighted = np.multiply(signed, math.ldexp(1.0, -int(params.scale_bits or 0)), dtype=np.float64)
    return weighted, int(ring_sum[-1])
