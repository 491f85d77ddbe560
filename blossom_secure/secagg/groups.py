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
* The *masking graph* of a block: the complete graph of ``E_b``, or, for a block that
  the federation's sparse terms cover (``params.is_sparse(b)``), a ring of ``E_b`` in
  the order of public position keys where each member is joined to the ``k / 2`` nearest
  on each side (a Harary graph, Bell et al. 2020). A member deals the shares of its
  secrets to its graph neighbours and masks with them only; on the sparse graph every
  member of ``M_b`` (or ``C_b``) must keep at least ``l = min_masked`` neighbours in it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence

from blossom_secure import crypto
from blossom_secure.secagg import kdf
from blossom_secure.blocks import is_valid_block_name
from blossom_secure.secagg.errors import OutsideBlockGroupError
from blossom_secure.secagg.messages import is_valid_identifier
from blossom_secure.secagg.params import SecAggParams

#: The position keys of members on the sparse graphs of a round: ``members -> {member:
#: key}`` (:func:`blossom_secure.secagg.kdf.graph_position_keys` bound to the round).
GraphKeys = Callable[[Sequence[str]], Mapping[str, bytes]]

__all__ = [
    "BlockPlan",
    "GraphKeys",
    "block_shortfall",
    "neighbours",
    "plan_blocks",
    "round_graph_keys",
    "share_x_coordinates",
    "validate_block_sizes",
    "validate_roster",
    "verify_offer",
]


def _ring_neighbours(order: tuple[str, ...], index: int, half: int) -> tuple[str, ...]:
    """The neighbours (sorted) of the member at ``index`` of a ring where each member is
    joined to the ``half`` nearest on either side (everyone, on a ring that small)."""
    n = len(order)
    if n - 1 <= 2 * half:
        return tuple(sorted(site for i, site in enumerate(order) if i != index))
    return tuple(sorted(order[(index + d) % n] for d in range(-half, half + 1) if d))


@functools.lru_cache(maxsize=256)
def _short_of_neighbours(
    order: tuple[str, ...], half: int, min_masked: int, members: tuple[str, ...]
) -> tuple[str, int] | None:
    position = {site: index for index, site in enumerate(order)}
    present = set(members)
    for site in members:
        kept = sum(peer in present for peer in _ring_neighbours(order, position[site], half))
        if kept < min_masked:
            return site, kept
    return None


class _Ring:
    """A block's sparse masking graph: its members on a ring in the order of their
    position keys, each joined to the ``half`` nearest on either side."""

    __slots__ = ("order", "position", "half", "min_masked", "_cache")

    def __init__(self, members: Sequence[str], keys: Mapping[str, bytes], half: int, min_masked: int) -> None:
        self.order = tuple(sorted(members, key=lambda site: (keys[site], site)))
        self.position = {site: index for index, site in enumerate(self.order)}
        self.half = half
        self.min_masked = min_masked
        self._cache: dict[str, tuple[str, ...]] = {}

    def neighbours(self, site: str) -> tuple[str, ...]:
        found = self._cache.get(site)
        if found is None:
            found = self._cache[site] = _ring_neighbours(self.order, self.position[site], self.half)
        return found

    def short_of_neighbours(self, members: tuple[str, ...]) -> tuple[str, int] | None:
        """The first of ``members`` with fewer than ``min_masked`` neighbours among them,
        and how many it has; ``None`` if none. Remembered per set of members: every site
        of a federation run in one process asks it of the same sets."""
        return _short_of_neighbours(self.order, self.half, self.min_masked, members)


class BlockPlan:
    """The effective groups of a round, fixed after the advertisements.

    Attributes:
        groups: Block name to its effective group (sorted site ids), for the blocks that
            go ahead.
        thresholds: Block name to its public threshold ``t_b`` (group size and
            consistency-check signatures).
        share_thresholds: Block name to the shares needed to rebuild a member's secret:
            ``t_b``, or the sparse graph's ``share_threshold``.
        failures: Block name to the reason it is not aggregated, for the others.
        minimums: Site id to its advertised policy minimum.
        graphs: Block name to its sparse masking graph, for the blocks masked over one.
    """

    __slots__ = ("groups", "thresholds", "share_thresholds", "failures", "minimums", "graphs")

    def __init__(
        self,
        groups: dict[str, tuple[str, ...]],
        thresholds: dict[str, int],
        failures: dict[str, str],
        minimums: dict[str, int],
        *,
        share_thresholds: dict[str, int] | None = None,
        graphs: dict[str, _Ring] | None = None,
    ) -> None:
        self.groups = groups
        self.thresholds = thresholds
        self.share_thresholds = dict(thresholds) if share_thresholds is None else share_thresholds
        self.failures = failures
        self.minimums = minimums
        self.graphs = {} if graphs is None else graphs

    def blocks_of(self, site: str) -> tuple[str, ...]:
        """The blocks that ``site`` aggregates this round (sorted)."""
        return tuple(block for block, members in sorted(self.groups.items()) if site in members)

    def block_neighbours(self, block: str, site: str) -> tuple[str, ...]:
        """``site``'s neighbours on ``block``'s masking graph (sorted): the other members
        of its group, or its neighbours on the sparse graph. They hold the shares of its
        secrets and it masks with them."""
        graph = self.graphs.get(block)
        if graph is not None:
            return graph.neighbours(site)
        return tuple(s for s in self.groups[block] if s != site)

    def holds_shares_of(self, block: str, holder: str, peer: str) -> bool:
        """Whether ``holder`` holds shares of ``peer``'s secrets of ``block``: ``peer`` is
        itself or its neighbour on the block's masking graph (both in the group)."""
        members = self.groups[block]
        if holder not in members or peer not in members:
            return False
        graph = self.graphs.get(block)
        return peer == holder or graph is None or peer in graph.neighbours(holder)

    def common_blocks(self, site_a: str, site_b: str) -> tuple[str, ...]:
        """The blocks on whose masking graph the two sites are neighbours (sorted)."""
        return tuple(b for b in sorted(self.groups) if site_a != site_b and self.holds_shares_of(b, site_a, site_b))


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


def plan_blocks(
    offers: Mapping[str, Iterable[str]],
    minimums: Mapping[str, int],
    params: SecAggParams,
    *,
    graph_keys: GraphKeys | None = None,
) -> BlockPlan:
    """Form the effective group of every advertised block, and its masking graph.

    Args:
        offers: Site id to the blocks it advertised.
        minimums: Site id to its policy minimum (the federation's minimum also applies).
            On the sparse graph a site's input is guaranteed to be unmasked only with at
            least ``min_masked + 1`` others, so a site whose minimum exceeds that
            withholds a sparse block.
        params: The round's parameters.
        graph_keys: The members' position keys on a sparse graph; needed when a block
            the sites offer is sparse (``params.is_sparse``).

    Returns:
        The plan: groups and thresholds of the blocks that go ahead, reasons for the rest.

    Raises:
        OutsideBlockGroupError: a site offers a block whose public group does not hold
            it (an honest coordinator refuses such an advertisement, so a site seeing one
            refuses the round).

    Notes:
        Each block has its own keys, seeds and threshold, so each block is an independent
        instance of Bonawitz et al. 2017 and shares revealed for one block never help with
        another. Its masking graph is the complete graph of its group, or, for a sparse
        block, a ring of degree ``k`` (Bell et al. 2020); whichever graph it is, the
        survivor set and the consistency check stay those of the whole group.
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
    share_thresholds: dict[str, int] = {}
    graphs: dict[str, _Ring] = {}
    for block in sorted(advertised):
        members = sorted(advertised[block])
        sparse = params.is_sparse(block)
        while True:
            floor = min(len(members), int(params.sparse.min_masked) + 1) if sparse else len(members)
            kept = [s for s in members if max(minimums[s], params.min_contributors) <= floor]
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
            share_thresholds[block] = params.share_threshold(block)
            if sparse:
                if graph_keys is None:
                    raise ValueError(f"{block} is masked over the sparse graph: position keys are needed")
                graphs[block] = _Ring(members, graph_keys(members), int(params.sparse.neighbours) // 2,
                                      int(params.sparse.min_masked))
    return BlockPlan(groups, thresholds, failures, {s: int(minimums[s]) for s in offers},
                     share_thresholds=share_thresholds, graphs=graphs)


def round_graph_keys(*, federation_id: str, federation_sha256: bytes, round_id: int) -> GraphKeys:
    """The members' position keys on the sparse graphs of one round
    (:func:`blossom_secure.secagg.kdf.graph_position_keys` bound to it), for
    :func:`plan_blocks`."""
    return functools.partial(
        kdf.graph_position_keys, federation_id=federation_id, federation_sha256=federation_sha256, round_id=round_id
    )


def block_shortfall(
    members: Iterable[str], *, plan: BlockPlan, block: str, params: SecAggParams, stage: str
) -> str | None:
    """Why a block cannot go on with ``members`` (a subset of its effective group), or
    ``None`` if it can.

    The block needs at least ``t_b`` members (to rebuild every secret it needs) and as
    many as the federation's and every remaining member's minimum. On the sparse graph,
    every member must also keep at least ``min_masked`` of its graph neighbours among
    ``members``.
    """
    members = tuple(members)
    threshold = plan.thresholds[block]
    if len(members) < threshold:
        return f"fewer than t survivors: {len(members)} {stage}, t = {threshold}"
    required = _required(members, plan.minimums, params)
    if len(members) < required:
        return f"fewer than min_contributors survivors: {len(members)} {stage}, {required} required"
    graph = plan.graphs.get(block)
    if graph is not None:
        short = graph.short_of_neighbours(members)
        if short is not None:
            site, kept = short
            return (
                f"fewer than l neighbours on the sparse graph: {site} has {kept} that {stage}, l = {graph.min_masked}"
            )
    return None


def neighbours(site: str, plan: BlockPlan) -> tuple[str, ...]:
    """The other sites that are ``site``'s neighbours on the masking graph of at least one
    of its blocks (sorted): the sites it deals shares to and receives shares from."""
    found: set[str] = set()
    for block in plan.blocks_of(site):
        found.update(plan.block_neighbours(block, site))
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
