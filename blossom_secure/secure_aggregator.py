"""Secure aggregation behind the :class:`~blossom_secure.aggregation.Aggregator` interface.

Each block's weighted sum is computed with the pairwise-masked protocol of
:mod:`blossom_secure.secagg` (Bonawitz et al. 2017, per block group): the coordinator learns
the sum over the sites that contributed the block, never one site's update. Only an
:class:`~blossom_secure.egress.Egress` (what the policy cleared) is handed to the protocol,
so the egress guard stays the single gate for what leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from blossom_secure.aggregation import BlockOutcome, Contribution, EgressHook
from blossom_secure.config import FederationConfig
from blossom_secure.crypto import IdentityKey
from blossom_secure.egress import Egress
from blossom_secure.secagg import SecAggParams, SiteContribution, run_secure_aggregation

__all__ = ["SecureAggregator", "block_outcome", "federation_sha256", "secagg_params"]

logger = logging.getLogger(__name__)


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
                        block_groups=dict(ag.groups), min_contributors=ag.min_contributors)


def federation_sha256(federation: FederationConfig) -> bytes:
    """The 32-byte SHA-256 of the federation file, as bound into every protocol message.

    Raises:
        ValueError: the configuration carries no valid hash (it was not read from a file).
    """
    digest = federation.sha256
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("the federation configuration carries no SHA-256 of its file")
    return bytes.fromhex(digest)


class SecureAggregator:
    """Block-wise weighted means by secure aggregation over in-process sites.

    Args:
        params: Protocol parameters.
        federation_sha256: The 32-byte SHA-256 of the federation file (see
            :func:`federation_sha256`), bound into every protocol message.
        roster: Site id -> Ed25519 identity public key (the federation roster).
        identity_keys: The identity keys of the sites simulated in this process; each
            site's stage machine uses only its own.
        drop_after: Optional site -> stage after which it stops answering (experiments,
            tests of dropout tolerance).

    Notes:
        A site whose egress holds a block whose public group (``params.block_group``)
        does not hold it takes no part in the round: nothing of it is sent, the reason is
        in ``last_site_errors``, and the other sites go on. (Its stage machine would
        refuse the contribution anyway; checking here keeps one site's mistake from
        stopping the whole in-process round.)
    """

    secure = True

    def __init__(self, *, params: SecAggParams, federation_sha256: bytes, roster: Mapping[str, bytes],
                 identity_keys: Mapping[str, IdentityKey], drop_after: Mapping[str, str] | None = None) -> None:
        if not isinstance(federation_sha256, bytes) or len(federation_sha256) != 32:
            raise ValueError("federation_sha256 must be the 32-byte SHA-256 of the federation file")
        self.params = params
        self.federation_sha256 = federation_sha256
        self.roster = dict(roster)
        self.identity_keys = dict(identity_keys)
        self.drop_after = dict(drop_after or {})
        self.last_site_errors: dict[str, str] = {}
        self.last_bytes_received: dict[str, int] = {}

    def aggregate(self, *, federation_id: str, round_id: int, contributions: Mapping[str, Contribution],
                  block_sizes: Mapping[str, int], on_egress: EgressHook | None) -> dict[str, BlockOutcome]:
        inputs = {}
        refused = {}
        for site, c in contributions.items():
            if not isinstance(c.egress, Egress):
                raise TypeError("only an Egress made by select_egress can be sent")
            outside = sorted(b for b in c.egress if not self.params.is_group_member(b, site))
            if outside:
                # The federation file's public groups do not let this site contribute these
                # blocks: it takes no part in the round (nothing of it is sent), the others go on.
                refused[site] = (f"advertise_keys: not in the public group of {', '.join(outside)} "
                                 "([aggregation.groups] of the federation file): nothing sent")
            elif len(c.egress):
                inputs[site] = SiteContribution(blocks=c.egress, weight=c.weight, min_contributors=c.min_contributors)
        self.last_bytes_received = {}
        self.last_site_errors = dict(refused)
        for site, error in refused.items():
            logger.warning("secure aggregation, round %d: site %s stopped: %s", round_id, site, error)
        if not inputs:
            return {}
        offered = {b for c in inputs.values() for b in c.blocks}
        result = run_secure_aggregation(
            federation_id=federation_id, federation_sha256=self.federation_sha256, round_id=round_id,
            roster=self.roster,
            identity_keys={s: self.identity_keys[s] for s in inputs}, contributions=inputs,
            block_sizes={b: n for b, n in block_sizes.items() if b in offered}, params=self.params,
            drop_after={s: v for s, v in self.drop_after.items() if s in inputs} or None, on_egress=on_egress)
        self.last_site_errors = {**refused, **result.site_errors}
        self.last_bytes_received = dict(result.bytes_received)
        for site, error in result.site_errors.items():
            logger.warning("secure aggregation, round %d: site %s stopped: %s", round_id, site, error)
        return {block: block_outcome(block, r) for block, r in result.blocks.items()}


def block_outcome(block: str, result) -> BlockOutcome:
    """A block's :class:`BlockOutcome` from its secure-aggregation result: the weighted mean
    of the contributors' updates, or the failure (no sum, no mean)."""
    if result.failure is not None or result.weighted_sum is None or not result.weight_sum:
        return BlockOutcome(block=block, contributors=tuple(result.contributors), mean_update=None,
                            weight_sum=0, failure=result.failure or "not aggregated")
    return BlockOutcome(block=block, contributors=tuple(result.contributors),
                        mean_update=(result.weighted_sum / result.weight_sum).astype(np.float32),
                        weight_sum=int(result.weight_sum))
