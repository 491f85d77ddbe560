"""Block groups: who aggregates which block with whom, and when a block must stop.

Pure functions over site ids, shared by the site and coordinator stage machines so that
both reach the same decisions from the same signed advertisements.

* The *public group* ``P_b`` of a block, where the federation file declares one
  (``params.block_group(b)``), is the set of sites allowed to contribute it. An
  advertisement of the block by any other site is refused (:func:`verify_offer`), so
  every group below lies within it, and so does every survivor set and signer.
* The *advertised group* of a block is every site that advertised it.
* The *effective group* ``E_b`` drops, until nothing changes, every member whose own
  policy minimum exceeds the group's size (that site withholds the block); the block is
  not aggregated if fewer than ``params.min_contributors`` or than its public threshold
  ``t_b = params.block_threshold(b)`` remain, or more than ``params.max_group_size`` (its
  sum could wrap). The effective group fixes who holds shares of whose secrets; ``t_b``
  never depends on it, so a coordinator that shows a site a smaller group cannot lower
  the threshold.
* The *mask group* ``M_b`` is ``E_b`` less the sites that sent no shares; the
  *contributors* ``C_b`` are ``M_b`` less the sites that sent no masked input. Each must
  still have at least ``t_b`` members and meet every remaining member's minimum, else the
  block stops: no masked input is sent for it, or no self-mask share is revealed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from blossom_secure import crypto
from blossom_secure.blocks import is_valid_block_name
from blossom_secure.secagg.errors import OutsideBlockGroupError
from blossom_secure.secagg.messages import is_valid_identifier
from blossom_secure.secagg.params import SecAggParams

__all__ = [
    "BlockPlan",
    "block_shortfall",
    "neighbours",
    "plan_blocks",
    "share_x_coordinates",
    "validate_block_sizes",
    "validate_roster",
    "verify_offer",
]


class BlockPlan:
    """The effective groups of a round, fixed after the advertisements.

    Attributes:
        groups: Block name to its effective group (sorted site ids), for the blocks that
            go ahead.
        thresholds: Block name to its Shamir threshold ``t_b``.
        failures: Block name to the reason it is not aggregated, for the others.
        minimums: Site id to its advertised policy minimum.
    """

    __slots__ = ("groups", "thresholds", "failures", "minimums")

    def __init__(
        self,
        groups: dict[str, tuple[str, ...]],
        thresholds: dict[str, int],
        failures: dict[str, str],
        minimums: dict[str, int],
    ) -> None:
        self.groups = groups
        self.thresholds = thresholds
        self.failures = failures
        self.minimums = minimums

    def blocks_of(self, site: str) -> tuple[str, ...]:
        """The blocks that ``site`` aggregates this round (sorted)."""
        return tuple(block for block, members in sorted(self.groups.items()) if site in members)

    def common_blocks(self, site_a: str, site_b: str) -> tuple[str, ...]:
        """The blocks whose effective group holds both sites (sorted)."""
        return tuple(b for b, members in sorted(self.groups.items()) if site_a in members and site_b in members)


def _required(members: Iterable[str], minimums: Mapping[str, int], params: SecAggParams) -> int:
    return max([params.min_contributors, *(minimums[site] for site in members)])


def verify_offer(site: str, blocks: Iterable[str], params: SecAggParams) -> None:
    """Check that ``site`` may contribute every one of ``blocks``: each is either without
    a declared group or has ``site`` in its public group ``P_b``.

    Raises:
        OutsideBlockGroupError: a block whose public group does not hold ``site``.
    """
    for block in blocks:
        if not params.is_group_member(block, site):
            raise OutsideBlockGroupError(
                f"{site} offers {block}, but is not in its public group (the federation file's [aggregation.groups])"
            )


def plan_blocks(offers: Mapping[str, Iterable[str]], minimums: Mapping[str, int], params: SecAggParams) -> BlockPlan:
    """Form the effective group of every advertised block.

    Args:
        offers: Site id to the blocks it advertised.
        minimums: Site id to its policy minimum (the federation's minimum also applies).
        params: The round's parameters.

    Returns:
        The plan: groups and thresholds of the blocks that go ahead, reasons for the rest.

    Raises:
        OutsideBlockGroupError: a site offers a block whose public group does not hold
            it (an honest coordinator refuses such an advertisement, so a site seeing one
            refuses the round).

    Notes:
        Masking only within a block's group restricts the graph of pairwise masks, as the
        sparse neighbourhoods of Bell et al. 2020 do; here each group is a complete graph
        with its own keys, seeds and threshold, so each block is an independent instance
        of Bonawitz et al. 2017 and shares revealed for one block never help with another.
        The threshold comes from the public ``params`` alone: the group a site sees is
        whatever the coordinator put in its key bundle, and a group smaller than ``t_b``
        (a group of two, say, where the coordinator holds one accomplice's view) is
        refused, never shared with a lower threshold. ``params`` guarantees ``2 t_b >
        max_group_size``, and the stage machines refuse a roster larger than that, so
        ``t_b`` is more than half of any group a site can be shown; for a block with a
        declared group ``P_b``, ``2 t_b > |P_b|`` and every group is refused unless it
        lies within ``P_b``, so again ``t_b`` is more than half of any group.
    """
    advertised: dict[str, list[str]] = {}
    for site in sorted(offers):
        verify_offer(site, offers[site], params)
        for block in offers[site]:
            advertised.setdefault(block, []).append(site)
    groups: dict[str, tuple[str, ...]] = {}
    thresholds: dict[str, int] = {}
    failures: dict[str, str] = {}
    for block in sorted(advertised):
        members = sorted(advertised[block])
        while True:
            kept = [s for s in members if max(minimums[s], params.min_contributors) <= len(members)]
            if kept == members:
                break
            members = kept
        threshold = params.block_threshold(block)
        if len(members) < params.min_contributors:
            failures[block] = (
                f"fewer than min_contributors: {len(advertised[block])} site(s) offered it, "
                "not enough to meet the federation's and the sites' minimums"
            )
        elif len(members) < threshold:
            failures[block] = (
                f"fewer than t: a group of {len(members)} site(s), the federation's threshold is t = {threshold}"
            )
        elif len(members) > params.max_group_size:
            failures[block] = (
                f"more contributors ({len(members)}) than max_group_size ({params.max_group_size}): the sum could wrap"
            )
        else:
            groups[block] = tuple(members)
            thresholds[block] = threshold
    return BlockPlan(groups, thresholds, failures, {s: int(minimums[s]) for s in offers})


def block_shortfall(
    members: Iterable[str], *, plan: BlockPlan, block: str, params: SecAggParams, stage: str
) -> str | None:
    """Why a block cannot go on with ``members`` (a subset of its effective group), or
    ``None`` if it can.

    The block needs at least ``t_b`` members (to rebuild every secret it needs) and as
    many as the federation's and every remaining member's minimum.
    """
    members = tuple(members)
    threshold = plan.thresholds[block]
    if len(members) < threshold:
        return f"fewer than t survivors: {len(members)} {stage}, t = {threshold}"
    required = _required(members, plan.minimums, params)
    if len(members) < required:
        return f"fewer than min_contributors survivors: {len(members)} {stage}, {required} required"
    return None


def neighbours(site: str, plan: BlockPlan) -> tuple[str, ...]:
    """The other sites that share at least one effective group with ``site`` (sorted)."""
    found: set[str] = set()
    for members in plan.groups.values():
        if site in members:
            found.update(members)
    found.discard(site)
    return tuple(sorted(found))


def share_x_coordinates(roster: Iterable[str]) -> dict[str, int]:
    """Each site's Shamir x-coordinate: 1 + its index in the sorted roster."""
    return {site: index + 1 for index, site in enumerate(sorted(roster))}


def validate_roster(roster: Mapping[str, bytes]) -> None:
    """Check a federation roster: valid site ids, 32-byte Ed25519 public keys, no key
    used twice.

    Raises:
        ValueError: describing the first problem.
    """
    if not isinstance(roster, Mapping) or not roster:
        raise ValueError("roster must be a non-empty mapping of site id to public key")
    for site, key in roster.items():
        if not is_valid_identifier(site):
            raise ValueError(f"roster site id {site!r} is not a valid identifier")
        if not isinstance(key, bytes) or len(key) != crypto.ED25519_PUBLIC_KEY_BYTES:
            raise ValueError(f"roster key of {site} must be 32 raw bytes")
    if len(set(roster.values())) != len(roster):
        raise ValueError("two roster entries share one public key")


def validate_block_sizes(block_sizes: Mapping[str, int]) -> None:
    """Check a block layout: valid block names and positive sizes.

    Task heads may appear in the layout (it describes the whole model) but are never
    aggregated: no site may contribute one and no message can carry one.

    Raises:
        ValueError: describing the first problem.
    """
    if not isinstance(block_sizes, Mapping):
        raise ValueError("block_sizes must be a mapping of block name to size")
    for block, size in block_sizes.items():
        if not is_valid_block_name(block):
            raise ValueError(f"{block!r} is not a valid block name")
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size < 1 << 31:
            raise ValueError(f"size of {block} must be an int in 1..2**31-1")
