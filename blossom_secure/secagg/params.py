"""Protocol parameters of secure aggregation, and the proof that a sum cannot wrap.

Each site quantises its clipped update to fixed point, multiplies it by its integer weight,
and adds it, masked, into the ring Z_2^b (b = ``ring_bits``). The coordinator only ever sees
the sum modulo 2^b, so the parameters must guarantee that the true (signed) sum of the
largest possible inputs fits in the signed range of the ring; otherwise the sum would
silently wrap into a wrong value. :class:`SecAggParams` proves this at construction from
exact integer arithmetic and refuses parameters that could wrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = [
    "MAX_SCALE_BITS",
    "SecAggParams",
    "largest_safe_scale_bits",
    "max_abs_quantized",
]

#: The most fractional bits accepted (2**MAX_SCALE_BITS stays finite in float32).
MAX_SCALE_BITS = 120
_MIN_MESSAGE_BYTES = 4096
_MAX_MESSAGE_BYTES = (1 << 31) - 1
_MAX_GROUP_SIZE = 1 << 16


def max_abs_quantized(clip: float, scale_bits: int) -> int:
    """An upper bound on ``|round(x * 2**scale_bits)|`` for every ``|x| <= clip``.

    It is ``ceil(clip * 2**scale_bits)``, computed exactly from the binary value of
    ``clip``: rounding to nearest never moves a value past the next integer up.
    """
    return math.ceil(Fraction(clip) * (Fraction(2) ** scale_bits))


def _wrap_bound(ring_bits: int) -> int:
    """The largest magnitude of a signed value that the ring Z_2^ring_bits represents
    unambiguously on both sides of zero: ``2**(ring_bits - 1) - 1``."""
    return (1 << (ring_bits - 1)) - 1


def _cannot_wrap(*, ring_bits: int, clip: float, scale_bits: int, max_weight: int, max_group_size: int) -> bool:
    return max_group_size * max_weight * max_abs_quantized(clip, scale_bits) <= _wrap_bound(ring_bits)


def largest_safe_scale_bits(*, ring_bits: int, clip: float, max_weight: int, max_group_size: int) -> int | None:
    """The most fractional bits for which the sum provably cannot wrap, or ``None``.

    ``None`` means that not even integer quantisation (``scale_bits = 0``) is safe.
    """
    for scale_bits in range(MAX_SCALE_BITS, -1, -1):
        if _cannot_wrap(
            ring_bits=ring_bits, clip=clip, scale_bits=scale_bits, max_weight=max_weight, max_group_size=max_group_size
        ):
            return scale_bits
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class SecAggParams:
    """The parameters of a secure-aggregation round, validated and proven not to wrap.

    Args:
        ring_bits: Size of the ring Z_2^ring_bits the masked vectors live in: 32 or 64.
            64 doubles the upload but leaves 32 more bits for precision and weights.
        clip: Each update coordinate is clipped to ``[-clip, clip]`` before quantisation.
        scale_bits: Fixed-point fractional bits (a value ``x`` becomes
            ``round(x * 2**scale_bits)``). ``None`` picks the largest value that provably
            cannot wrap; after construction the field always holds the value in force.
        max_weight: Upper bound on a site's sample-count weight.
        max_group_size: Upper bound on the number of sites in a block group. A block that
            more sites contribute is not aggregated (its sum could wrap).
        threshold_fraction: Shamir threshold of a block group of ``n`` sites:
            ``t = max(2, floor(threshold_fraction * n) + 1)``; at least 0.5 so that
            ``t > n / 2``, below 1 so that ``t <= n``.
        min_contributors: The federation's minimum number of contributors to a block (at
            least 2); a smaller group is not aggregated, since its sum would be (close to)
            one site's update. Each site may demand more.
        max_message_bytes: Longest protocol message accepted, checked before parsing.

    Raises:
        ValueError: listing every problem found, among them parameters whose sum could
            wrap (naming the bound ``max_group_size * max_weight *
            ceil(clip * 2**scale_bits) <= 2**(ring_bits - 1) - 1``).

    Notes:
        The no-wrap proof: a site sends ``w * q`` per coordinate with ``|q| <=
        ceil(clip * 2**scale_bits)`` and ``1 <= w <= max_weight``; at most
        ``max_group_size`` sites are summed, so the true sum ``S`` has ``|S| <=
        max_group_size * max_weight * ceil(clip * 2**scale_bits)``. When that is at most
        ``2**(b-1) - 1``, reading the ring sum as a two's-complement integer recovers ``S``
        exactly. The weights (summed beside the updates) are positive and bounded by
        ``max_group_size * max_weight``, which the same inequality bounds since
        ``ceil(clip * 2**scale_bits) >= 1``. The threshold ``t > n/2`` is the guard of
        Bonawitz et al. 2017 (section 4) against a coordinator obtaining both the mask-key
        shares and the self-mask shares of one site from disjoint halves of its group.
    """

    ring_bits: int = 32
    clip: float = 1.0
    scale_bits: int | None = None
    max_weight: int = 1000
    max_group_size: int = 100
    threshold_fraction: float = 0.5
    min_contributors: int = 2
    max_message_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        problems = self._basic_problems()
        if problems:
            raise ValueError("invalid SecAggParams: " + "; ".join(problems))
        scale_bits = self.scale_bits
        bound = f"max_group_size * max_weight * ceil(clip * 2**scale_bits) <= 2**{self.ring_bits - 1} - 1"
        if scale_bits is None:
            scale_bits = largest_safe_scale_bits(
                ring_bits=self.ring_bits, clip=self.clip, max_weight=self.max_weight, max_group_size=self.max_group_size
            )
            if scale_bits is None:
                raise ValueError(f"invalid SecAggParams: no scale_bits >= 0 satisfies the no-wrap bound {bound}")
            object.__setattr__(self, "scale_bits", scale_bits)
        elif not _cannot_wrap(
            ring_bits=self.ring_bits,
            clip=self.clip,
            scale_bits=scale_bits,
            max_weight=self.max_weight,
            max_group_size=self.max_group_size,
        ):
            worst = self.max_group_size * self.max_weight * max_abs_quantized(self.clip, scale_bits)
            raise ValueError(
                f"invalid SecAggParams: the sum could wrap: {bound} fails "
                f"({self.max_group_size} * {self.max_weight} * {max_abs_quantized(self.clip, scale_bits)} = {worst})"
            )
        if Fraction(self.clip) * Fraction(2) ** scale_bits < 1:
            raise ValueError(
                "invalid SecAggParams: clip * 2**scale_bits must be at least 1 (one quantisation step); "
                "raise scale_bits or clip"
            )

    def _basic_problems(self) -> list[str]:
        problems: list[str] = []
        if self.ring_bits not in (32, 64) or not _is_int(self.ring_bits):
            problems.append("ring_bits must be 32 or 64")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)):
            problems.append("clip must be a number")
        elif not (math.isfinite(self.clip) and self.clip > 0):
            problems.append("clip must be finite and > 0")
        else:
            object.__setattr__(self, "clip", float(self.clip))
        if self.scale_bits is not None and not (_is_int(self.scale_bits) and 0 <= self.scale_bits <= MAX_SCALE_BITS):
            problems.append(f"scale_bits must be None or an int in 0..{MAX_SCALE_BITS}")
        if not (_is_int(self.max_weight) and self.max_weight >= 1):
            problems.append("max_weight must be an int >= 1")
        if not (_is_int(self.max_group_size) and 2 <= self.max_group_size <= _MAX_GROUP_SIZE):
            problems.append(f"max_group_size must be an int in 2..{_MAX_GROUP_SIZE}")
        if isinstance(self.threshold_fraction, bool) or not isinstance(self.threshold_fraction, (int, float)):
            problems.append("threshold_fraction must be a number")
        elif not 0.5 <= self.threshold_fraction < 1:
            problems.append("threshold_fraction must be in [0.5, 1) so that n/2 < t <= n")
        if not (_is_int(self.min_contributors) and self.min_contributors >= 2):
            problems.append("min_contributors must be an int >= 2 (a sum over one site is that site's update)")
        elif _is_int(self.max_group_size) and self.min_contributors > self.max_group_size:
            problems.append("min_contributors must not exceed max_group_size")
        if not (_is_int(self.max_message_bytes) and _MIN_MESSAGE_BYTES <= self.max_message_bytes <= _MAX_MESSAGE_BYTES):
            problems.append(f"max_message_bytes must be an int in {_MIN_MESSAGE_BYTES}..{_MAX_MESSAGE_BYTES}")
        return problems

    @property
    def ring_dtype(self) -> np.dtype:
        """The little-endian unsigned dtype of ring elements (``<u4`` or ``<u8``)."""
        return np.dtype("<u4") if self.ring_bits == 32 else np.dtype("<u8")

    @property
    def ring_bytes(self) -> int:
        """Bytes per ring element."""
        return self.ring_bits // 8

    def threshold(self, group_size: int) -> int:
        """The Shamir threshold ``t`` of a block group of ``group_size`` sites.

        ``t = max(2, floor(threshold_fraction * n) + 1, floor(n / 2) + 1)``, computed
        from the exact binary value of ``threshold_fraction`` so that every party
        computes the same ``t``.

        Raises:
            ValueError: ``group_size`` is less than 2.
        """
        if not _is_int(group_size) or group_size < 2:
            raise ValueError("a block group has at least 2 sites")
        fraction_t = math.floor(Fraction(self.threshold_fraction) * group_size) + 1
        return max(2, fraction_t, group_size // 2 + 1)

    def quantisation_step(self) -> float:
        """The fixed-point resolution ``2**-scale_bits``."""
        return math.ldexp(1.0, -int(self.scale_bits or 0))
