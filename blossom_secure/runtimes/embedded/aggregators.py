"""The embedded runtime's aggregators: every site and the coordinator in one process.

:class:`PlaintextAggregator` sends each site's :class:`~blossom_secure.site.egress.Egress`
to the coordinator in the clear (for tests and explicitly requested runs);
:class:`SecureAggregator` computes each block's weighted sum with the pairwise-masked
protocol of :mod:`blossom_secure.secagg` (Bonawitz et al. 2017, per block group): the
coordinator learns the sum over the sites that contributed the block, never one site's
update. Only an ``Egress`` (what the policy cleared) is handed to either, so the egress
guard stays the single gate for what leaves. Both implement
:class:`blossom_secure.exchange.Aggregator`; only bytes cross from a site's side to the
coordinator's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from blossom_secure.crypto import IdentityKey
from blossom_secure.errors import BlossomError
from blossom_secure.exchange import BlockOutcome, Contribution, EgressHook, decode_plain_update, settle_groups
from blossom_secure.secagg import SecAggParams, SiteContribution, run_secure_aggregation
from blossom_secure.secagg.terms import block_outcome
from blossom_secure.site.egress import Egress, encode_plain_update

__all__ = ["PlaintextAggregator", "SecureAggregator"]

logger = logging.getLogger(__name__)


class PlaintextAggregator:
    """Block-wise weighted mean with updates sent in the clear.

    The coordinator sees every site's update: use only where that is acceptable (tests,
    baselines, a federation of one organisation). A site whose policy requires secure
    aggregation declines a plaintext round.

    Args:
        min_contributors: The federation's minimum group size per block (>= 2).
    """

    secure = False

    def __init__(self, *, min_contributors: int) -> None:
        if min_contributors < 2:
            raise ValueError("min_contributors must be at least 2")
        self.min_contributors = min_contributors
        self.last_bytes_received: dict[str, int] = {}
        self.last_site_errors: dict[str, str] = {}

    def aggregate(self, *, federation_id: str, round_id: int, contributions: Mapping[str, Contribution],
                  block_sizes: Mapping[str, int], on_egress: EgressHook | None) -> dict[str, BlockOutcome]:
        self.last_bytes_received = {}
        self.last_site_errors = {}
        groups, failures = settle_groups(contributions, min_contributors=self.min_contributors)
        outcomes = {b: BlockOutcome(block=b, contributors=(), mean_update=None, weight_sum=0, failure=why)
                    for b, why in failures.items()}
        for block, group in groups.items():
            total, weight_sum, senders = None, 0, []
            for site in group:
                c = contributions[site]
                payload = encode_plain_update(federation_id=federation_id, round_id=round_id, site_id=site,
                                              block=block, egress=c.egress, weight=c.weight)
                if on_egress is not None:
                    try:
                        on_egress(site, "plain_update", (block,), payload)
                    except (BlossomError, OSError):  # the site could not record it: it must not send
                        logger.warning("site %s could not record its egress of %s; not sent", site, block)
                        self.last_site_errors[site] = f"could not record the egress of {block}; not sent"
                        continue
                # --- the coordinator's side: only bytes cross --------------------------------
                self.last_bytes_received[site] = self.last_bytes_received.get(site, 0) + len(payload)
                got_block, weight, values = decode_plain_update(
                    payload, federation_id=federation_id, round_id=round_id, site_id=site, block_sizes=block_sizes)
                part = weight * values.astype(np.float64)
                total = part if total is None else total + part
                weight_sum += weight
                senders.append(site)
            if len(senders) < self.min_contributors:
                outcomes[block] = BlockOutcome(block=block, contributors=(), mean_update=None, weight_sum=0,
                                               failure="too few sites delivered their update")
            else:
                outcomes[block] = BlockOutcome(block=block, contributors=tuple(senders),
                                               mean_update=(total / weight_sum).astype(np.float32),
                                               weight_sum=weight_sum)
        return outcomes


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
