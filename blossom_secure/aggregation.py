"""Block-wise aggregation: each shared block becomes the weighted mean of the updates of
the sites that hold and share it.

The coordinator never averages a block over sites that do not have it (BLOSSOM's
block-wise rule), and never over fewer than ``min_contributors`` sites (a sum over one
site is that site's update). Each site also states its own minimum (its policy's
``min_contributors``); a site withholds a block whose group is smaller.

:class:`Aggregator` is the interface a runtime uses; :class:`PlaintextAggregator` sends
each site's :class:`~blossom_secure.egress.Egress` to the coordinator in the clear (for
tests and explicitly requested runs); :class:`blossom_secure.secure_aggregator.SecureAggregator`
implements the same interface with pairwise-masked secure aggregation.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from blossom_secure.egress import Egress
from blossom_secure.errors import BlossomError, ProtocolError

__all__ = [
    "Aggregator",
    "BlockOutcome",
    "Contribution",
    "EgressHook",
    "PlaintextAggregator",
    "decode_plain_update",
    "encode_plain_update",
    "settle_groups",
]

#: ``hook(site_id, message_type, block_names, payload)``: called for every message a site
#: sends, before it is delivered; the site's audit log records it durably there.
EgressHook = Callable[[str, str, tuple[str, ...], bytes], None]

logger = logging.getLogger(__name__)

PLAIN_UPDATE_VERSION = 1
_MAX_HEADER_BYTES = 4096


@dataclass(frozen=True)
class Contribution:
    """What one site offers in a round.

    Attributes:
        egress: The block updates its policy cleared to leave.
        weight: Its sample count (training patients).
        min_contributors: The smallest group its policy lets a block be summed over.
    """

    egress: Egress
    weight: int
    min_contributors: int


@dataclass(frozen=True)
class BlockOutcome:
    """The result for one block in one round.

    Attributes:
        block: The block name.
        contributors: The sites whose update is in the result.
        mean_update: Weighted mean of their updates (``None`` if not aggregated).
        weight_sum: Sum of their weights.
        failure: Why the block was not aggregated (``None`` if it was).
    """

    block: str
    contributors: tuple[str, ...]
    mean_update: np.ndarray | None
    weight_sum: int
    failure: str | None = None


class Aggregator(Protocol):
    """Turns the sites' contributions of one round into per-block outcomes."""

    secure: bool
    #: Per site, the bytes of its messages the coordinator took delivery of in the last
    #: ``aggregate`` call, counted on the coordinator's side.
    last_bytes_received: dict[str, int]
    #: Per site, why it stopped taking part in the last ``aggregate`` call (if it did).
    last_site_errors: dict[str, str]

    def aggregate(self, *, federation_id: str, round_id: int, contributions: Mapping[str, Contribution],
                  block_sizes: Mapping[str, int], on_egress: EgressHook | None) -> dict[str, BlockOutcome]:
        ...


def settle_groups(contributions: Mapping[str, Contribution], *, min_contributors: int
                  ) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """Decide, per block, which sites send it.

    A site withholds a block whose group is smaller than its own minimum; withdrawals can
    shrink groups further, so this repeats until nothing changes. Returns
    ``(groups, failures)``: the members per aggregated block, and a reason per block that
    will not be aggregated.
    """
    members: dict[str, set[str]] = {}
    for site, c in contributions.items():
        for block in c.egress:
            members.setdefault(block, set()).add(site)
    changed = True
    while changed:
        changed = False
        for block, group in members.items():
            leaving = {s for s in group if len(group) < contributions[s].min_contributors}
            if leaving:
                group -= leaving
                changed = True
    groups, failures = {}, {}
    for block in sorted(members):
        group = members[block]
        if len(group) < min_contributors:
            failures[block] = (f"{len(group)} contributor(s), fewer than the minimum of {min_contributors}: "
                               "a sum over so few sites would reveal a site's update")
        else:
            groups[block] = tuple(sorted(group))
    return groups, failures


def encode_plain_update(*, federation_id: str, round_id: int, site_id: str, block: str, egress: Egress,
                        weight: int) -> bytes:
    """One block's update as a plaintext message: a length-prefixed canonical JSON header
    then the float32 values (little-endian).

    Raises:
        TypeError: ``egress`` is not an :class:`Egress` (nothing else may be sent).
    """
    if not isinstance(egress, Egress):
        raise TypeError("only an Egress made by select_egress can be sent")
    values = egress[block]
    header = json.dumps({"v": PLAIN_UPDATE_VERSION, "type": "plain_update", "federation": federation_id,
                         "round": round_id, "site": site_id, "block": block, "weight": int(weight),
                         "n": int(values.size)}, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + values.astype("<f4").tobytes()


def decode_plain_update(untrusted_payload: bytes, *, federation_id: str, round_id: int, site_id: str,
                        block_sizes: Mapping[str, int]) -> tuple[str, int, np.ndarray]:
    """Parse and check a plaintext update. Returns ``(block, weight, values)``.

    Raises:
        ProtocolError: malformed, wrong version/federation/round/site, unknown block, or a
            size that does not match the federation layout.
    """
    if len(untrusted_payload) < 4:
        raise ProtocolError("plain update: truncated")
    (hlen,) = struct.unpack_from("<I", untrusted_payload)
    if hlen > _MAX_HEADER_BYTES or 4 + hlen > len(untrusted_payload):
        raise ProtocolError("plain update: bad header length")
    try:
        header = json.loads(untrusted_payload[4:4 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("plain update: header is not JSON") from None
    expected = {"v", "type", "federation", "round", "site", "block", "weight", "n"}
    if not isinstance(header, dict) or set(header) != expected:
        raise ProtocolError("plain update: unexpected header fields")
    if header["v"] != PLAIN_UPDATE_VERSION or header["type"] != "plain_update":
        raise ProtocolError("plain update: unsupported version or type")
    if header["federation"] != federation_id or header["round"] != round_id or header["site"] != site_id:
        raise ProtocolError("plain update: wrong federation, round or sender")
    block, weight, n = header["block"], header["weight"], header["n"]
    if block not in block_sizes or n != block_sizes[block]:
        raise ProtocolError("plain update: unknown block or wrong size")
    if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
        raise ProtocolError("plain update: bad weight")
    body = untrusted_payload[4 + hlen:]
    if len(body) != 4 * n:
        raise ProtocolError("plain update: body length does not match header")
    values = np.frombuffer(body, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise ProtocolError("plain update: non-finite values")
    return block, weight, values


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
