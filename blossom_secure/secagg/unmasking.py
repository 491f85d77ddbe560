"""Mask removal at the coordinator: which masks, derived where, regenerated on which core.

After the unmask stage the coordinator holds, for one block, the sum ``S`` of the
contributors' masked inputs, the rebuilt self-mask seed of every contributor ``u`` in
``C``, and the rebuilt mask private key of every site ``d`` in ``D`` that shared keys but
sent no masked input (a *dropped* site). The pairwise masks among contributors cancel,
so what is left besides the inputs is::

    sum_{u in C} PRG(b_u)  +  sum_{d in D} sum_{u in C} (+1 if u < d else -1) PRG(s_{u,d})

Removing it costs ``|C| * (1 + |D|)`` keystreams of the block's length: each dropped site
costs one mask regeneration per contributor (its neighbours in the block's group), each
preceded by one X25519 agreement and one HKDF derivation, the dropped site's private key
loaded once for all of them. Every keystream is regenerated exactly once, chunk by chunk
in a single pass over the vector (:func:`blossom_secure.secagg.masking.apply_masks`).

The keystreams can be split into ``parts`` of equal count: the first is removed in this
process while an executor (a process pool: ``cryptography`` holds the GIL while it writes
a keystream, so threads do not run in parallel) regenerates the others, each worker
deriving its own keys and returning the signed sum of its masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from blossom_secure import crypto
from blossom_secure.secagg import kdf
from blossom_secure.secagg.errors import AllZeroSharedSecretError
from blossom_secure.secagg.masking import _check_vector, apply_masks

__all__ = ["DroppedSite", "MaskContext", "remove_masks", "removal_masks"]

#: Fewest keystreams worth a worker: a worker's part comes back as a whole vector through
#: the executor's pipe, which costs about as much as regenerating ten to twenty keystreams.
MIN_KEYSTREAMS_PER_PART = 32


@dataclass(frozen=True)
class MaskContext:
    """Where the masks of one block come from: the label fields of their keys."""

    federation_id: str
    round_id: int
    block: str


@dataclass(frozen=True)
class DroppedSite:
    """A site that shared keys but sent no masked input, with its rebuilt mask key.

    Attributes:
        site: The dropped site's id.
        mask_private_key: Its mask private key for the block, rebuilt from shares and
            checked against its signed public key by the caller.
        contributors: ``(site id, mask public key)`` of the contributors whose pairwise
            masks with it are to be removed.
    """

    site: str
    mask_private_key: bytes
    contributors: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class _Part:
    """Some of the keystreams to remove: self-mask keys and some dropped sites' pairs."""

    self_mask_keys: tuple[bytes, ...]
    dropped: tuple[DroppedSite, ...]

    @property
    def keystreams(self) -> int:
        return len(self.self_mask_keys) + sum(len(site.contributors) for site in self.dropped)


def removal_masks(
    self_mask_keys: Sequence[bytes], dropped: Sequence[DroppedSite], context: MaskContext
) -> list[tuple[bytes, int]]:
    """The ``(key, sign)`` pairs that remove these masks from a block's sum.

    Raises:
        AllZeroSharedSecretError: a contributor's mask public key is a low-order point.
        ValueError: an X25519 key is not 32 bytes.

    Notes:
        A contributor ``u`` added ``+PRG(s_{u,d})`` if ``u < d`` and ``-PRG(s_{u,d})``
        otherwise (Bonawitz et al. 2017, section 4); its removal carries the opposite
        sign. The self masks were all added, so they are all subtracted.
    """
    masks = [(key, -1) for key in self_mask_keys]
    label_fields = {"federation_id": context.federation_id, "round_id": context.round_id, "block": context.block}
    for site in dropped:
        try:
            secrets = crypto.x25519_shared_secrets(site.mask_private_key, [key for _, key in site.contributors])
        except crypto.LowOrderPointError:
            raise AllZeroSharedSecretError("an X25519 agreement with a contributor's mask key is all zero") from None
        for (peer, _), secret in zip(site.contributors, secrets, strict=True):
            key = kdf.pairwise_mask_key(secret, sites=(site.site, peer), **label_fields)
            masks.append((key, 1 if peer > site.site else -1))
    return masks


def _split_removals(self_mask_keys: Sequence[bytes], dropped: Sequence[DroppedSite], parts: int) -> list[_Part]:
    """Cut the keystreams into at most ``parts`` parts whose counts differ by at most one
    (a dropped site's contributors may be spread over several parts); none is empty
    unless there is nothing to remove.

    Raises:
        ValueError: ``parts`` < 1.
    """
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError("parts must be an int >= 1")
    items: list[tuple[int, int]] = [(-1, index) for index in range(len(self_mask_keys))]
    items += [(site, index) for site in range(len(dropped)) for index in range(len(dropped[site].contributors))]
    count = min(parts, len(items)) or 1
    bounds = [len(items) * i // count for i in range(count + 1)]
    result = []
    for start, stop in zip(bounds, bounds[1:], strict=False):
        keys = tuple(self_mask_keys[index] for site, index in items[start:stop] if site < 0)
        chosen: dict[int, list[int]] = {}
        for site, index in items[start:stop]:
            if site >= 0:
                chosen.setdefault(site, []).append(index)
        sites = tuple(
            DroppedSite(
                dropped[site].site,
                dropped[site].mask_private_key,
                tuple(dropped[site].contributors[index] for index in indices),
            )
            for site, indices in chosen.items()
        )
        result.append(_Part(keys, sites))
    return result


def remove_masks(
    accumulator: np.ndarray,
    *,
    self_mask_keys: Sequence[bytes],
    dropped: Sequence[DroppedSite],
    context: MaskContext,
    executor: Executor | None = None,
    parts: int = 1,
) -> None:
    """Subtract every contributor's self mask and every dropped site's pairwise masks
    from a block's sum, in place; on an exception the sum is left unchanged.

    Args:
        accumulator: The block's ring vector: the sum of the masked inputs.
        self_mask_keys: The contributors' self-mask AES keys (checked by the caller
            against their commitments).
        dropped: The dropped sites, with the contributors whose masks with each remain.
        context: The block's federation, round and name (the pairwise key labels).
        executor: Regenerates all parts but the first in parallel with this process;
            ``None``: everything here.
        parts: The most parts when ``executor`` is given (typically the cores); fewer
            when a part would hold under :data:`MIN_KEYSTREAMS_PER_PART` keystreams.

    Raises:
        AllZeroSharedSecretError: a contributor's mask public key is a low-order point.
        ValueError: a bad accumulator, key (not 32 bytes) or ``parts``.

    Notes:
        The dropped sites' mask private keys and the self-mask keys travel to the
        executor's workers, which are this process's own children, in the same trust
        domain (pickled by the standard library; nothing untrusted is ever unpickled).
    """
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError("parts must be an int >= 1")
    keystreams = len(self_mask_keys) + sum(len(site.contributors) for site in dropped)
    worth = max(1, keystreams // MIN_KEYSTREAMS_PER_PART)
    split = _split_removals(self_mask_keys, dropped, min(parts, worth) if executor is not None else 1)
    if executor is None or len(split) == 1:
        masks = removal_masks(split[0].self_mask_keys, split[0].dropped, context)
        apply_masks(accumulator, masks)
        return
    _check_vector(accumulator)
    futures: list[Future[np.ndarray]] = [
        executor.submit(_part_sum, accumulator.shape[0], accumulator.dtype.str, part, context) for part in split[1:]
    ]
    try:
        total = accumulator.copy()
        apply_masks(total, removal_masks(split[0].self_mask_keys, split[0].dropped, context))
        for future in futures:
            np.add(total, future.result(), out=total)
    finally:
        for future in futures:
            future.cancel()
    np.copyto(accumulator, total)


def _part_sum(count: int, dtype: str, part: _Part, context: MaskContext) -> np.ndarray:
    """Worker: the signed sum of one part's removal masks over ``count`` elements."""
    vector = np.zeros(count, dtype=dtype)
    apply_masks(vector, removal_masks(part.self_mask_keys, part.dropped, context))
    return vector
