"""The federation file's public secure-aggregation terms, read the same way by every party.

:func:`secagg_params` turns the file into protocol parameters, :func:`federation_sha256` is
the digest bound into every protocol message, and :func:`block_outcome` turns one block's
protocol result into the :class:`~blossom_secure.exchange.BlockOutcome` both runtimes
report.
"""

from __future__ import annotations

import numpy as np

from blossom_secure.config import FederationConfig
from blossom_secure.exchange import BlockOutcome
from blossom_secure.secagg.params import SecAggParams, SparseGraph

__all__ = ["block_outcome", "federation_sha256", "secagg_params"]


def secagg_params(federation: FederationConfig, *, roster_size: int) -> SecAggParams:
    """Protocol parameters from the federation file (quantisation range, ring, minimums,
    the public bound on sites, the public block groups and the Shamir thresholds).

    Args:
        federation: The federation file.
        roster_size: Number of sites in the roster. It stands in for ``max_sites`` only
            when the file declares none, and may never exceed a declared one.

    Raises:
        ValueError: the roster is larger than ``max_sites``, thresholds that are not a
            strict majority of it (or of the block's declared group), or parameters under
            which a sum could wrap (the message names the bound).

    Notes:
        Every party derives the thresholds from this file only (Bonawitz et al. 2017,
        section 4: ``t`` is a public parameter of the protocol), never from what the
        coordinator shows of a round; the file's SHA-256 is bound into every message.
        Without ``threshold`` the default is ``floor(2 * max_sites / 3) + 1``
        (:func:`blossom_secure.secagg.params.default_threshold`). A block with a public
        group ``P_b`` (``[aggregation.groups]``) is aggregated among members of ``P_b``
        only, with a threshold that is a strict majority of ``|P_b|`` (default
        :func:`blossom_secure.secagg.params.default_group_threshold`): only members can
        sign for it, so ``2 t_b > |P_b|`` keeps two survivor sets from both passing the
        consistency check.
    """
    ag = federation.aggregation
    max_sites = ag.max_sites if ag.max_sites is not None else max(2, roster_size)
    if roster_size > max_sites:
        raise ValueError(f"the roster has {roster_size} sites, more than max_sites = {max_sites}")
    return SecAggParams(ring_bits=ag.ring_bits, clip=ag.clip, max_weight=ag.max_weight,
                        max_group_size=max_sites, threshold=ag.threshold, block_thresholds=dict(ag.thresholds),
                        block_groups=dict(ag.groups), min_contributors=ag.min_contributors,
                        sparse=SparseGraph(**ag.sparse) if ag.sparse is not None else None)


def federation_sha256(federation: FederationConfig) -> bytes:
    """The 32-byte SHA-256 of the federation file, as bound into every protocol message.

    Raises:
        ValueError: the configuration carries no valid hash (it was not read from a file).
    """
    digest = federation.sha256
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("the federation configuration carries no SHA-256 of its file")
    return bytes.fromhex(digest)


def block_outcome(block: str, result) -> BlockOutcome:
    """A block's :class:`BlockOutcome` from its secure-aggregation result: the weighted mean
    of the contributors' updates, or the failure (no sum, no mean)."""
    if result.failure is not None or result.weighted_sum is None or not result.weight_sum:
        return BlockOutcome(block=block, contributors=tuple(result.contributors), mean_update=None,
                            weight_sum=0, failure=result.failure or "not aggregated")
    return BlockOutcome(block=block, contributors=tuple(result.contributors),
                        mean_update=(result.weighted_sum / result.weight_sum).astype(np.float32),
                        weight_sum=int(result.weight_sum))
