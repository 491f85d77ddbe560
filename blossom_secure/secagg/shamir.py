"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

Secrets are 32-byte strings (an X25519 private key, a 256-bit self-mask seed) read as
big-endian integers. The field is the Mersenne prime ``P = 2**521 - 1``: every 256-bit
secret is a field element without reduction (so no secret is ever folded), its primality
is classical (no primality certificate to check), and a share is 66 bytes.

A share is the value ``y = f(x)`` of a random polynomial ``f`` of degree ``t - 1`` with
``f(0) = secret`` at a holder's non-zero ``x``. Any ``t`` shares give ``f(0)`` by Lagrange
interpolation; any ``t - 1`` shares are uniformly distributed and independent of the secret.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "lagrange_coefficients_at_zero",
    "reconstruct",
    "share_from_bytes",
    "share_to_bytes",
    "split",
]

#: The field modulus, the Mersenne prime 2^521 - 1.
PRIME = (1 << 521) - 1
#: Bytes of a secret.
SECRET_BYTES = 32
#: Bytes of an encoded share value (big-endian, fixed length).
SHARE_BYTES = 66


def _check_points(xs: Sequence[int]) -> None:
    if not xs:
        raise ValueError("at least one share holder is needed")
    if len(set(xs)) != len(xs):
        raise ValueError("share holders' x-coordinates must be distinct")
    if any(not isinstance(x, int) or isinstance(x, bool) or not 0 < x < PRIME for x in xs):
        raise ValueError("x-coordinates must be ints in 1..P-1")


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> list[int]:
    """Share ``secret`` among holders at ``xs`` so that any ``threshold`` recover it.

    Args:
        secret: 32 bytes.
        threshold: ``t``, with ``1 <= t <= len(xs)``.
        xs: Distinct non-zero x-coordinates, one per holder.

    Returns:
        The share values ``f(x)``, in the order of ``xs``.

    Raises:
        ValueError: the secret is not 32 bytes, or bad ``threshold`` or ``xs``.

    Notes:
        The ``t - 1`` coefficients come from :func:`secrets.randbelow`, uniform on the
        field, which makes every set of fewer than ``t`` shares independent of the secret
        (Shamir 1979; used for key recovery in Bonawitz et al. 2017, section 3).
    """
    _check_points(xs)
    if not isinstance(threshold, int) or not 1 <= threshold <= len(xs):
        raise ValueError("threshold must be an int in 1..len(xs)")
    if len(secret) != SECRET_BYTES:
        raise ValueError("a secret is 32 bytes")
    coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return _split_with_coefficients(int.from_bytes(secret, "big"), coefficients, xs)


def _split_with_coefficients(secret: int, coefficients: Sequence[int], xs: Sequence[int]) -> list[int]:
    """Evaluate ``secret + c1 x + c2 x^2 + ...`` at each ``x`` (Horner). A private seam so
    that test vectors can fix the coefficients."""
    polynomial = [secret, *coefficients]
    values = []
    for x in xs:
        acc = 0
        for coefficient in reversed(polynomial):
            acc = (acc * x + coefficient) % PRIME
        values.append(acc)
    return values


@functools.lru_cache(maxsize=256)
def lagrange_coefficients_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange basis values ``l_i(0) = prod_{j != i} x_j / (x_j - x_i)`` mod P.

    Cached: one computation per survivor set serves every secret shared among it.

    Raises:
        ValueError: ``xs`` empty, not distinct, or out of range.
    """
    _check_points(xs)
    coefficients = []
    for i, x_i in enumerate(xs):
        numerator = 1
        denominator = 1
        for j, x_j in enumerate(xs):
            if j != i:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        coefficients.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(coefficients)


def reconstruct(xs: Sequence[int], ys: Sequence[int]) -> int:
    """Interpolate ``f(0)`` from the shares ``(xs[i], ys[i])``.

    With at least ``t`` correct shares this is the secret; with fewer it is a value
    unrelated to it, so callers must check the result (a public key, a commitment).

    Raises:
        ValueError: lengths differ, bad ``xs``, or a value outside the field.
    """
    if len(xs) != len(ys):
        raise ValueError("one value per x-coordinate")
    if any(not isinstance(y, int) or not 0 <= y < PRIME for y in ys):
        raise ValueError("share values must be field elements")
    coefficients = lagrange_coefficients_at_zero(tuple(xs))
    return sum(c * y for c, y in zip(coefficients, ys, strict=True)) % PRIME


def share_to_bytes(value: int) -> bytes:
    """Encode a share value as 66 big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Decode a 66-byte share value.

    Raises:
        ValueError: not 66 bytes, or not a field element.
    """
    if len(data) != SHARE_BYTES:
        raise ValueError("a share value is 66 bytes")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("share value is not a field element")
    return value
