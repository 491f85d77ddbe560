"""What crosses between a site and the coordinator in one round, shared by both sides.

A site offers a :class:`Contribution` (the blocks its egress guard cleared, its public
weight, its own minimum group size); the coordinator turns the contributions of a round into
one :class:`BlockOutcome` per block: the weighted mean over the sites that hold and share
the block (BLOSSOM's block-wise rule), never over fewer than ``min_contributors`` sites (a
sum over one site is that site's update). :func:`settle_groups` decides who sends which
block; :func:`decode_plain_update` reads the plaintext format that
:func:`blossom_secure.site.egress.encode_plain_update` writes (for tests and explicitly
requested plaintext runs; secure rounds use :mod:`blossom_secure.secagg`).

:class:`Aggregator` is the interface a runtime uses: the embedded runtime implements it in
:mod:`blossom_secure.runtimes.embedded.aggregators`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from blossom_secure.errors import ProtocolError

__all__ = [
    "PLAIN_UPDATE_VERSION",
    "Aggregator",
    "BlockOutcome",
    "Contribution",
    "EgressHook",
    "decode_plain_update",
    "settle_groups",
]

#: ``hook(site_id, message_type, block_names, payload)``: called for every message a site
#: sends, before it is delivered; the site's audit log records it durably there.
EgressHook = Callable[[str, str, tuple[str, ...], bytes], None]

PLAIN_UPDATE_VERSION = 1
_MAX_HEADER_BYTES = 4096


@dataclass(frozen=True)
class Contribution:
    """What one site offers in a round.

    Attributes:
        egress: The block updates its policy cleared to leave (the site's egress guard's
            :class:`~blossom_secure.site.egress.Egress`; nothing else may be sent).
        weight: Its sample count (training patients).
        min_contributors: The smallest group its policy lets a block be summed over.
    """

    egress: Mapping[str, np.ndarray]
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
