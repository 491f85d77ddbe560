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

__all__ = ["SecureAggregator", "secagg_params"]

logger = logging.getLogger(__name__)


def secagg_params(federation: FederationConfig, *, max_group_size: int) -> SecAggParams:
    """Protocol parameters from the federation file (quantisation range, ring, minimums).

    Raises:
        ValueError: parameters under which a sum could wrap (the message names the bound).
    """
    ag = federation.aggregation
    return SecAggParams(ring_bits=ag.ring_bits, clip=ag.clip, max_weight=ag.max_weight,
                        max_group_size=max(2, max_group_size), min_contributors=ag.min_contributors)


class SecureAggregator:
    """Block-wise weighted means by secure aggregation over in-process sites.

    Args:
        params: Protocol parameters.
        roster: Site id -> Ed25519 identity public key (the federation roster).
        identity_keys: The identity keys of the sites simulated in this process; each
            site's stage machine uses only its own.
        drop_after: Optional site -> stage after which it stops answering (experiments,
            tests of dropout tolerance).
    """

    secure = True

    def __init__(self, *, params: SecAggParams, roster: Mapping[str, bytes], identity_keys: Mapping[str, IdentityKey],
                 drop_after: Mapping[str, str] | None = None) -> None:
        self.params = params
        self.roster = dict(roster)
        self.identity_keys = dict(identity_keys)
        self.drop_after = dict(drop_after or {})
        self.last_site_errors: dict[str, str] = {}
        self.last_bytes_received: dict[str, int] = {}

    def aggregate(self, *, federation_id: str, round_id: int, contributions: Mapping[str, Contribution],
                  block_sizes: Mapping[str, int], on_egress: EgressHook | None) -> dict[str, BlockOutcome]:
        inputs = {}
        for site, c in contributions.items():
            if not isinstance(c.egress, Egress):
                raise TypeError("only an Egress made by select_egress can be sent")
            if len(c.egress):
                inputs[site] = SiteContribution(blocks=c.egress, weight=c.weight, min_contributors=c.min_contributors)
        self.last_bytes_received = {}
        self.last_site_errors = {}
        if not inputs:
            return {}
        offered = {b for c in inputs.values() for b in c.blocks}
        result = run_secure_aggregation(
            federation_id=federation_id, round_id=round_id, roster=self.roster,
            identity_keys={s: self.identity_keys[s] for s in inputs}, contributions=inputs,
            block_sizes={b: n for b, n in block_sizes.items() if b in offered}, params=self.params,
            drop_after={s: v for s, v in self.drop_after.items() if s in inputs} or None, on_egress=on_egress)
        self.last_site_errors = dict(result.site_errors)
        self.last_bytes_received = dict(result.bytes_received)
        for site, error in result.site_errors.items():
            logger.warning("secure aggregation, round %d: site %s stopped: %s", round_id, site, error)
        outcomes = {}
        for block, r in result.blocks.items():
            if r.failure is not None or r.weighted_sum is None or not r.weight_sum:
                outcomes[block] = BlockOutcome(block=block, contributors=tuple(r.contributors), mean_update=None,
                                               weight_sum=0, failure=r.failure or "not aggregated")
            else:
                outcomes[block] = BlockOutcome(block=block, contributors=tuple(r.contributors),
                                               mean_update=(r.weighted_sum / r.weight_sum).astype(np.float32),
                                               weight_sum=int(r.weight_sum))
        return outcomes
