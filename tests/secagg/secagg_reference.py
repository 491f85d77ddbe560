"""Slow, independent reference computations for the secure-aggregation vectors and tests.

Written differently from the library on purpose: HKDF from ``hmac`` per RFC 5869, the
CTR keystream as AES-ECB over explicit counter blocks, labels with ``struct`` in one
expression, quantisation with exact ``Fraction`` arithmetic, Shamir with ``pow`` per
term and Lagrange with Fermat inverses. Never imported by the library.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from fractions import Fraction

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MERSENNE_521 = 2**521 - 1


def hkdf_reference(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with HMAC-SHA256, step by step."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def label_reference(purpose: str, federation_id: str, round_id: int, block: str, parties: list[str]) -> bytes:
    """The documented label layout, built with ``struct``."""

    def lp(text: str) -> bytes:
        raw = text.encode()
        return struct.pack(f">H{len(raw)}s", len(raw), raw)

    return (
        b"blossom-secagg/v1"
        + lp(purpose)
        + lp(federation_id)
        + struct.pack(">Q", round_id)
        + lp(block)
        + struct.pack(">H", len(parties))
        + b"".join(lp(p) for p in parties)
    )


def round_salt_reference(federation_id: str, round_id: int) -> bytes:
    return hashlib.sha256(label_reference("round-salt", federation_id, round_id, "", [])).digest()


def keystream_reference(key: bytes, nbytes: int, first_block: int = 0) -> bytes:
    """AES-256-CTR keystream computed as AES-256-ECB of the 128-bit big-endian counters."""
    blocks = -(-nbytes // 16)
    counters = b"".join((first_block + i).to_bytes(16, "big") for i in range(blocks))
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - ECB of counters IS the CTR reference
    return (encryptor.update(counters) + encryptor.finalize())[:nbytes]


def mask_reference(key: bytes, count: int, ring_bits: int) -> list[int]:
    """The mask as Python ints: little-endian words of the keystream."""
    size = ring_bits // 8
    stream = keystream_reference(key, count * size)
    return [int.from_bytes(stream[i * size : (i + 1) * size], "little") for i in range(count)]


def quantize_reference(values: list[float], *, clip: float, scale_bits: int, weight: int, ring_bits: int) -> list[int]:
    """``w * round_half_even(clip(x) * 2**s) mod 2**b`` for each value, then ``w``."""
    out = []
    for value in values:
        exact = min(max(Fraction(value), -Fraction(clip)), Fraction(clip)) * Fraction(2) ** scale_bits
        out.append((weight * round(exact)) % (1 << ring_bits))
    return [*out, weight % (1 << ring_bits)]


def dequantize_reference(ring_values: list[int], *, scale_bits: int, ring_bits: int) -> tuple[list[Fraction], int]:
    """Two's-complement reading of each element over ``2**s``; the last is the weight."""
    signed = [v - (1 << ring_bits) if v >= 1 << (ring_bits - 1) else v for v in ring_values[:-1]]
    return [Fraction(v, 2**scale_bits) for v in signed], ring_values[-1]


def shamir_eval_reference(secret: int, coefficients: list[int], x: int) -> int:
    """``f(x) = secret + sum c_i x^i`` mod 2^521 - 1, term by term."""
    return (secret + sum(c * pow(x, i + 1, MERSENNE_521) for i, c in enumerate(coefficients))) % MERSENNE_521


def shamir_reconstruct_reference(points: list[tuple[int, int]]) -> int:
    """Lagrange interpolation at 0 with Fermat inverses."""
    total = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator *= -x_j
                denominator *= x_i - x_j
        total += y_i * numerator * pow(denominator % MERSENNE_521, MERSENNE_521 - 2, MERSENNE_521)
    return total % MERSENNE_521
