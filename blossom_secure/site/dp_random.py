"""The randomness of DP-SGD: Gaussian noise and Poisson sampling from a keyed cipher stream.

Differential privacy holds only if the noise is unpredictable to whoever sees the released
update. So every random draw of a site's DP-SGD step (which patients are in a batch, and the
Gaussian noise added to the clipped gradient sum) comes from one AES-256-CTR keystream
(:func:`blossom_secure.crypto.aes256_ctr_keystream_writer`), and the key decides what the
guarantee is worth:

* :meth:`DPRandomness.from_os_csprng`: a fresh 256-bit key from the operating system's
  CSPRNG (``secrets.token_bytes``) for every round. This is the only source under which a
  ledger entry or an audit ``training_finished`` record states an epsilon as a guarantee
  (``randomness = "os-csprng"``).
* :meth:`DPRandomness.seeded_simulation`: the key is derived from a seed, the site id and
  the round, so a run can be repeated bit for bit. Anyone who knows the seed can regenerate
  the noise and subtract it, so the epsilon of such a round is **nominal** (what the same
  training would have cost with secret noise), never a guarantee; the ledger and audit log
  say so (``randomness = "seeded-simulation"``). Only sites with synthetic data (a
  ``[synth]`` section) may run seeded.

Notes:
    Opacus's own ``secure_mode`` needs ``torchcsprng``, which cannot be installed for current
    torch; without it Opacus draws from torch's Mersenne Twister. This module replaces both
    of Opacus's random sources (sampler and noise) rather than seeding that generator.

    Normals are drawn by the Box-Muller transform from 53-bit uniforms in float64, and each
    noise coordinate is the sum of four such normals divided by two (still N(0, 1)), the
    mitigation Opacus's ``secure_mode`` applies against floating-point attacks on the
    Gaussian sampler (Holohan and Braghin 2021, section 5.1, with n = 2). The result is
    rounded to the parameter's float32.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from blossom_secure import crypto

__all__ = ["OS_CSPRNG", "RANDOMNESS_KINDS", "SEEDED_SIMULATION", "DPRandomness", "PoissonBatchSampler"]

#: ``randomness`` value of a round whose noise came from the OS CSPRNG (epsilon is a guarantee).
OS_CSPRNG = "os-csprng"
#: ``randomness`` value of a seeded simulation round (epsilon is nominal).
SEEDED_SIMULATION = "seeded-simulation"
RANDOMNESS_KINDS = (OS_CSPRNG, SEEDED_SIMULATION)

_CHUNK_BYTES = 1 << 20
#: Coordinates whose noise :meth:`DPRandomness.gaussian_like_each` draws in one pass.
_GROUP_COORDINATES = 1 << 18
_SEED_LABEL = b"blossom_secure/v1/dp-sgd-seeded-simulation"


class DPRandomness:
    """One round's random source for DP-SGD (sampling and noise), a keyed AES-256-CTR stream.

    Build it with :meth:`from_os_csprng` or :meth:`seeded_simulation`; ``kind`` says which.
    """

    def __init__(self, key: bytes, *, kind: str) -> None:
        if kind not in RANDOMNESS_KINDS:
            raise ValueError(f"kind must be one of {RANDOMNESS_KINDS}")
        self.kind = kind
        self._write = crypto.aes256_ctr_keystream_writer(key)
        self._zeros = bytearray(_CHUNK_BYTES)
        self._out = bytearray(_CHUNK_BYTES + 16)

    @classmethod
    def from_os_csprng(cls) -> DPRandomness:
        """A fresh key from the operating system's CSPRNG: the noise is secret."""
        return cls(secrets.token_bytes(crypto.AES256_KEY_BYTES), kind=OS_CSPRNG)

    @classmethod
    def seeded_simulation(cls, seed: int, *, site_id: str, round_id: int) -> DPRandomness:
        """A key derived from a public seed: reproducible, and **not private**.

        Raises:
            ValueError: ``seed`` is not a non-negative int.
        """
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError("seed must be a non-negative int")
        material = b"|".join([_SEED_LABEL, str(seed).encode(), site_id.encode(), str(int(round_id)).encode()])
        return cls(hashlib.sha256(material).digest(), kind=SEEDED_SIMULATION)

    @property
    def is_private(self) -> bool:
        """Whether an epsilon computed for this round is a guarantee (not nominal)."""
        return self.kind == OS_CSPRNG

    def random_bytes(self, n: int) -> bytes:
        """The next ``n`` bytes of the keystream."""
        return bytes(self._keystream(n))

    def _keystream(self, n: int) -> bytearray:
        """The next ``n`` bytes of the keystream, written straight into a new buffer (the
        cipher needs one block of room past its output, so the last chunk goes through a
        scratch buffer)."""
        out = bytearray(n)
        view = memoryview(out)
        done = 0
        while done < n:
            take = min(_CHUNK_BYTES, n - done)
            if n - done >= take + crypto.AES_BLOCK_BYTES:
                self._write(memoryview(self._zeros)[:take], view[done:])
            else:
                self._write(memoryview(self._zeros)[:take], memoryview(self._out))
                view[done:done + take] = memoryview(self._out)[:take]
            done += take
        return out

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 values uniform on the open interval (0, 1), 53 bits each."""
        words = np.frombuffer(self._keystream(8 * n), dtype="<u8")
        words >>= np.uint64(11)
        values = words.astype(np.float64)
        values += 0.5
        values *= 2.0 ** -53
        return values

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` float64 draws of N(0, 1) (sum of four Box-Muller normals, halved)."""
        pairs = math.ceil(n / 2)
        total = np.zeros(2 * pairs, dtype=np.float64)
        for _ in range(4):
            u1 = self.uniform(pairs)
            u2 = self.uniform(pairs)
            radius = np.sqrt(-2.0 * np.log(u1))
            angle = 2.0 * math.pi * u2
            total[:pairs] += radius * np.cos(angle)
            total[pairs:] += radius * np.sin(angle)
        return total[:n] / 2.0

    def gaussian_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """Noise of standard deviation ``std`` with the shape, dtype and device of ``reference``."""
        noise = self.standard_normal(reference.numel()) * float(std)
        return _as_tensor_like(noise, reference)

    def gaussian_like_each(self, references: Sequence[torch.Tensor], std: float) -> list[torch.Tensor]:
        """Noise for every tensor of ``references``, in order: the same values, drawn from
        the same stretch of the stream, as one :meth:`gaussian_like` call per tensor.

        The keystream and the Box-Muller transform run over groups of tensors together (up
        to about 260,000 coordinates per group, so memory stays bounded), instead of a
        few dozen small calls per tensor: a DP-SGD step over a model with many small
        parameter tensors spends most of its noise time in the calls, not the arithmetic.
        """
        out: list[torch.Tensor] = []
        group: list[torch.Tensor] = []
        size = 0
        for ref in references:
            if group and size + ref.numel() > _GROUP_COORDINATES:
                out += self._gaussian_group(group, std)
                group, size = [], 0
            group.append(ref)
            size += ref.numel()
        if group:
            out += self._gaussian_group(group, std)
        return out

    def _gaussian_group(self, references: list[torch.Tensor], std: float) -> list[torch.Tensor]:
        # One gaussian_like(ref) consumes, per round r of four, ``p = ceil(n / 2)`` uniforms u1
        # then p uniforms u2. Draw the whole group's uniforms at once (the same stream, in the
        # same order), then gather every round's u1 and u2 of all tensors side by side.
        sizes = [ref.numel() for ref in references]
        pairs = [math.ceil(n / 2) for n in sizes]
        total_pairs = sum(pairs)
        u = self.uniform(8 * total_pairs)
        first = np.empty((4, total_pairs), dtype=np.int64)  # index of each u1, by round
        start, column = 0, 0
        for p in pairs:
            for r in range(4):
                first[r, column:column + p] = np.arange(start + 2 * r * p, start + (2 * r + 1) * p)
            start += 8 * p
            column += p
        # The same operations as standard_normal, in the same order, done in place.
        radius = np.log(u[first])
        radius *= -2.0
        np.sqrt(radius, out=radius)
        angle = u[first + np.repeat(pairs, pairs)[None, :]]
        angle *= 2.0 * math.pi
        cos_total = np.zeros(total_pairs, dtype=np.float64)
        sin_total = np.zeros(total_pairs, dtype=np.float64)
        term = np.empty(total_pairs, dtype=np.float64)
        for r in range(4):  # the same additions, in the same order, as standard_normal
            np.cos(angle[r], out=term)
            term *= radius[r]
            cos_total += term
            np.sin(angle[r], out=term)
            term *= radius[r]
            sin_total += term
        out = []
        column = 0
        for ref, n, p in zip(references, sizes, pairs, strict=True):
            normal = np.concatenate([cos_total[column:column + p], sin_total[column:column + p]])[:n]
            normal /= 2.0
            normal *= float(std)
            out.append(_as_tensor_like(normal, ref))
            column += p
        return out


#: Where numpy's conversion from float64 is torch's (one correctly rounded step; a half
#: float is left to torch, which rounds through float32).
_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}


def _as_tensor_like(values: np.ndarray, reference: torch.Tensor) -> torch.Tensor:
    """float64 ``values`` as a tensor shaped like ``reference``, in its dtype and on its
    device: rounded by numpy where it has the dtype (the same round-to-nearest-even as
    torch's conversion, without torch's per-call overhead), else by torch."""
    dtype = _NUMPY_FLOATS.get(reference.dtype)
    if dtype is not None:
        tensor = torch.from_numpy(values.astype(dtype, copy=False))
    else:
        tensor = torch.from_numpy(values).to(dtype=reference.dtype)
    return tensor.to(device=reference.device).view_as(reference)


class PoissonBatchSampler:
    """Poisson sampling for DP-SGD: each example joins each batch independently with
    probability ``sample_rate``, drawn from a :class:`DPRandomness` stream.

    It is a batch sampler for :class:`torch.utils.data.DataLoader` (it yields lists of
    indices, possibly empty) with ``steps`` batches per pass, the sampling Opacus's
    ``UniformWithReplacementSampler`` does, with the random source replaced.
    """

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int, randomness: DPRandomness) -> None:
        if num_samples < 1 or not 0.0 < sample_rate <= 1.0 or steps < 1:
            raise ValueError("need num_samples >= 1, 0 < sample_rate <= 1 and steps >= 1")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.randomness = randomness

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            keep = self.randomness.uniform(self.num_samples) < self.sample_rate
            yield np.flatnonzero(keep).tolist()
