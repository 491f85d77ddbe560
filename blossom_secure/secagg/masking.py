"""Mask expansion: AES-256-CTR keystreams added into ring vectors in place.

A mask is the AES-256-CTR keystream of a 256-bit key derived by HKDF (see
:mod:`blossom_secure.secagg.kdf`), read as little-endian ring elements (uint32 or uint64).
Adding a mask is ring addition, which numpy's unsigned arithmetic does modulo 2^b.

Speed: the vector is processed in chunks of :data:`CHUNK_BYTES` that stay in the CPU
cache; for each chunk every mask's keystream is written (``update_into``, no allocation)
into one small preallocated buffer and added or subtracted in place. Each cipher context
continues its stream from chunk to chunk, so the result is identical to expanding every
mask over the whole vector, while memory is crossed once instead of twice per mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from blossom_secure import crypto
from blossom_secure.secagg.params import SecAggParams
from blossom_secure.secagg.quantize import ChunkQuantizer, check_weight

__all__ = [
    "CHUNK_BYTES",
    "apply_masks",
    "expand_mask",
    "masked_ring_vector",
]

#: Bytes of the vector processed per pass over the masks (fits in L2 with its keystream).
CHUNK_BYTES = 256 * 1024
_RING_DTYPES = (np.dtype("<u4"), np.dtype("<u8"))


def _check_vector(vector: np.ndarray) -> None:
    if not isinstance(vector, np.ndarray) or vector.dtype not in _RING_DTYPES or vector.ndim != 1:
        raise ValueError("a ring vector is a 1-D little-endian uint32 or uint64 array")
    if not vector.flags.writeable or not vector.flags.c_contiguous:
        raise ValueError("a ring vector must be writeable and contiguous")


def apply_masks(
    vector: np.ndarray,
    masks: Sequence[tuple[bytes, int]],
    *,
    fill: Callable[[int, np.ndarray], None] | None = None,
    first_element: int = 0,
) -> None:
    """Add ``sum(sign * PRG(key))`` into ``vector`` in place (modulo 2^b).

    Args:
        vector: The ring vector (or a slice of one, see ``first_element``).
        masks: ``(key, sign)`` pairs: a 32-byte AES-256 key and ``+1`` or ``-1``.
        fill: If given, called as ``fill(start, chunk)`` to write each chunk's plain
            values before its masks are added (used to fuse quantisation with masking).
        first_element: Index in the full mask of ``vector[0]``; a multiple of the number
            of ring elements per AES block, so that slices of one vector can be masked
            separately.

    Raises:
        ValueError: bad vector, key, sign or ``first_element``.

    Notes:
        ``PRG(key)`` is the AES-256-CTR keystream of a single-use 256-bit key, the
        pseudorandom generator of Bonawitz et al. 2017 (section 3): full-strength keys
        from HKDF, never a seed folded to fewer bits or a non-cryptographic generator.
    """
    _check_vector(vector)
    itemsize = vector.dtype.itemsize
    if first_element < 0 or (first_element * itemsize) % crypto.AES_BLOCK_BYTES:
        raise ValueError("first_element must start an AES block")
    writers = []
    for key, sign in masks:
        if sign not in (1, -1):
            raise ValueError("a mask sign is +1 or -1")
        writers.append((crypto.aes256_ctr_keystream_writer(key, first_block=first_element * itemsize // 16), sign > 0))
    chunk_elements = CHUNK_BYTES // itemsize
    zeros = memoryview(bytearray(CHUNK_BYTES))
    keystream = bytearray(CHUNK_BYTES + crypto.AES_BLOCK_BYTES)
    keystream_values = np.frombuffer(keystream, dtype=vector.dtype, count=chunk_elements)
    for start in range(0, vector.shape[0], chunk_elements):
        part = vector[start : start + chunk_elements]
        count = part.shape[0]
        if fill is not None:
            fill(start, part)
        plain = zeros if count == chunk_elements else zeros[: count * itemsize]
        stream = keystream_values if count == chunk_elements else keystream_values[:count]
        for write, positive in writers:
            write(plain, keystream)
            if positive:
                np.add(part, stream, out=part)
            else:
                np.subtract(part, stream, out=part)


def expand_mask(key: bytes, *, count: int, dtype: np.dtype | str) -> np.ndarray:
    """The first ``count`` ring elements of the mask of ``key`` (a fresh array).

    Raises:
        ValueError: bad key, ``count`` or ``dtype``.
    """
    dtype = np.dtype(dtype)
    if dtype not in _RING_DTYPES:
        raise ValueError("dtype must be <u4 or <u8")
    if count < 0:
        raise ValueError("count must be >= 0")
    vector = np.zeros(count, dtype=dtype)
    apply_masks(vector, [(key, 1)])
    return vector


def masked_ring_vector(
    update: np.ndarray,
    *,
    weight: int,
    params: SecAggParams,
    masks: Sequence[tuple[bytes, int]],
) -> np.ndarray:
    """Quantise ``update`` with its weight and add ``masks``, in one cache-friendly pass.

    Args:
        update: Finite float32 1-D update.
        weight: Integer weight in ``1..params.max_weight``.
        params: The round's parameters.
        masks: ``(key, sign)`` pairs, as for :func:`apply_masks`.

    Returns:
        A fresh ring vector of ``len(update) + 1`` elements: ``w * q + masks`` and
        ``w + masks`` last.

    Raises:
        ValueError: a bad weight, a non-finite update, or a bad mask.
    """
    check_weight(weight, params)
    size = update.shape[0]
    vector = np.empty(size + 1, dtype=params.ring_dtype)
    quantizer = ChunkQuantizer(update, weight=weight, params=params)

    def fill(start: int, chunk: np.ndarray) -> None:
        if start + chunk.shape[0] > size:
            chunk[-1] = weight
            chunk = chunk[:-1]
        if chunk.shape[0]:
            quantizer.fill(start, chunk)

    apply_masks(vector, masks, fill=fill)
    return vector
