"""Protocol parameters of secure aggregation, and the proof that a sum cannot wrap.

Each site quantises its clipped update to fixed point, multiplies it by its integer weight,
and adds it, masked, into the ring Z_2^b (b = ``ring_bits``). The coordinator only ever sees
the sum modulo 2^b, so the parameters must guarantee that the true (signed) sum of the
largest possible inputs fits in the signed range of the ring; otherwise the sum would
silently wrap into a wrong value. :class:`SecAggParams` proves this at construction from
exact integer arithmetic and refuses parameters that could wrap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType

import numpy as np

from blossom_secure.blocks import is_head, is_valid_block_name
from blossom_secure.secagg.messages import is_valid_identifier

__all__ = [
    "MAX_SCALE_BITS",
    "SecAggParams",
    "SparseGraph",
    "default_group_threshold",
    "default_threshold",
    "largest_safe_scale_bits",
    "max_abs_quantized",
    "min_threshold",
]

#: The most fractional bits accepted (2**MAX_SCALE_BITS stays finite in float32).
MAX_SCALE_BITS = 120
_MIN_MESSAGE_BYTES = 4096
_MAX_MESSAGE_BYTES = (1 << 31) - 1
_MAX_GROUP_SIZE = 1 << 16


def max_abs_quantized(clip: float, scale_bits: int) -> int:
    """An upper bound on ``|round(x * 2**scale_bits)|`` for every ``|x| <= clip``.

    It is ``ceil(clip * 2**scale_bits)``, computed exactly from the binary value of
    ``clip``: rounding to nearest never moves a value past the next integer up.
    """
    return math.ceil(Fraction(clip) * (Fraction(2) ** scale_bits))


def _wrap_bound(ring_bits: int) -> int:
    """The largest magnitude of a signed value that the ring Z_2^ring_bits represents
    unambiguously on both sides of zero: ``2**(ring_bits - 1) - 1``."""
    return (1 << (ring_bits - 1)) - 1


def _cannot_wrap(*, ring_bits: int, clip: float, scale_bits: int, max_weight: int, max_group_size: int) -> bool:
    return max_group_size * max_weight * max_abs_quantized(clip, scale_bits) <= _wrap_bound(ring_bits)


def largest_safe_scale_bits(*, ring_bits: int, clip: float, max_weight: int, max_group_size: int) -> int | None:
    """The most fractional bits for which the sum provably cannot wrap, or ``None``.

    ``None`` means that not even integer quantisation (``scale_bits = 0``) is safe.
    """
    for scale_bits in range(MAX_SCALE_BITS, -1, -1):
        if _cannot_wrap(
            ring_bits=ring_bits, clip=clip, scale_bits=scale_bits, max_weight=max_weight, max_group_size=max_group_size
        ):
            return scale_bits
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SparseGraph:
    """The public terms of the sparse masking graph (Bell et al. 2020, SecAgg+), for large
    block groups; the federation file's ``[aggregation.sparse]``.

    A block whose possible signers number ``N_b >= from_sites`` (``N_b``: the size of its
    public group ``P_b``, else ``max_sites``) is masked over a ``neighbours``-regular
    graph instead of the complete graph of its group: each member masks with, and deals
    the Shamir shares of its secrets to, its ``neighbours`` graph neighbours only, with
    threshold ``share_threshold``. The survivor set and its consistency check stay
    global (``t_b`` signatures, ``2 t_b > N_b``).

    Args:
        neighbours: ``k``, the graph's degree: even, at least 2.
        from_sites: ``N_b`` from which a block uses the graph. ``None``: ``3 * k`` (below
            that, a member would still mask with a third of its group or more).
        share_threshold: ``t_k``, shares needed to rebuild a member's secret, out of its
            ``k + 1`` holders (its neighbours and itself). ``None``: ``floor(k / 2) + 1``.
        min_masked: ``l``, the fewest neighbours in the survivor set that every survivor
            must have masked with, else no honest member reveals a share of the block.
            ``None``: ``floor(k / 2)``.

    Notes:
        What the graph guarantees, whatever graph it is (docs/protocol.md, "Sparse
        masking graph"): with ``c`` members colluding with the coordinator, ``c <
        share_threshold`` and ``c <= 2 t_b - N_b - 1``, any value the coordinator can
        unmask that involves an honest member's input involves at least ``min_masked + 1
        - c`` honest inputs. The complete graph guarantees ``t_b`` inputs and tolerates
        ``2 t_b - N_b - 1`` colluders; the graph trades that for ``k + 1`` instead of
        ``n`` masks and shares per member.
    """

    neighbours: int
    from_sites: int | None = None
    share_threshold: int | None = None
    min_masked: int | None = None

    def __post_init__(self) -> None:
        k = self.neighbours
        if not (_is_int(k) and k >= 2 and k % 2 == 0):
            raise ValueError("sparse graph: neighbours must be an even int >= 2")
        defaults = {"from_sites": 3 * k, "share_threshold": k // 2 + 1, "min_masked": k // 2}
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
            elif not _is_int(getattr(self, name)):
                raise ValueError(f"sparse graph: {name} must be an int")
        if self.from_sites < k + 2:
            raise ValueError(f"sparse graph: from_sites must be at least neighbours + 2 ({k + 2}): "
                             "a smaller group is a complete graph already")
        if not 2 <= self.share_threshold <= k + 1:
            raise ValueError(f"sparse graph: share_threshold must be in 2..neighbours + 1 ({k + 1}): "
                             "a secret has neighbours + 1 holders")
        if not 1 <= self.min_masked <= k:
            raise ValueError(f"sparse graph: min_masked must be in 1..neighbours ({k})")

    def as_document(self) -> dict[str, int]:
        """The terms as a plain mapping (for hashes and reports)."""
        return {"neighbours": self.neighbours, "from_sites": int(self.from_sites),
                "share_threshold": int(self.share_threshold), "min_masked": int(self.min_masked)}


def min_threshold(max_sites: int) -> int:
    """The smallest Shamir threshold accepted for a federation of at most ``max_sites``
    sites: a strict majority, ``floor(max_sites / 2) + 1``.

    Raises:
        ValueError: ``max_sites`` is not an int >= 2.
    """
    if not _is_int(max_sites) or max_sites < 2:
        raise ValueError("max_sites must be an int >= 2")
    return max_sites // 2 + 1


def default_threshold(max_sites: int, min_contributors: int = 2) -> int:
    """The default Shamir threshold of a federation of at most ``max_sites`` sites:
    ``max(min_contributors, floor(2 * max_sites / 3) + 1)``.

    Raises:
        ValueError: ``max_sites`` is not an int >= 2.

    Notes:
        Bonawitz et al. 2017 (section 6, active adversary) prove the protocol with its
        consistency check private against a server colluding with fewer than a third of
        the users when ``t > 2n/3``. The reason, with ``n`` replaced by the public bound
        ``max_sites``: two survivor sets that each carry ``t`` signatures share at least
        ``2t - max_sites`` signers, and an honest site signs one set per block and round,
        so while fewer than ``2t - max_sites`` sites collude with the coordinator, every
        honest site that reveals shares of a block does so for the same survivor set.
        ``floor(2 * max_sites / 3) + 1`` tolerates about ``max_sites / 3`` colluders and
        ``max_sites - t`` dropouts per block.
    """
    if not _is_int(max_sites) or max_sites < 2:
        raise ValueError("max_sites must be an int >= 2")
    return max(min_contributors, (2 * max_sites) // 3 + 1)


def default_group_threshold(group_size: int, min_contributors: int = 2) -> int:
    """The default Shamir threshold of a block whose public group ``P_b`` has
    ``group_size`` sites: ``min(group_size, max(min_contributors, floor(2 * group_size / 3)
    + 1))``.

    Raises:
        ValueError: ``group_size`` is not an int >= 2.

    Notes:
        The same rule as :func:`default_threshold`, with the public group in place of
        ``max_sites``: only members of ``P_b`` can sign a survivor set of block ``b``, so
        two sets that each carry ``t`` signatures share at least ``2t - |P_b|`` signers.
        Capped at ``group_size``: a group smaller than ``min_contributors`` is never
        aggregated (its contributors fall short of the minimum), whatever its threshold.
    """
    if not _is_int(group_size) or group_size < 2:
        raise ValueError("group_size must be an int >= 2")
    return min(group_size, default_threshold(group_size, min_contributors))


@dataclass(frozen=True, kw_only=True)
class SecAggParams:
    """The parameters of a secure-aggregation round, validated and proven not to wrap.

    Args:
        ring_bits: Size of the ring Z_2^ring_bits the masked vectors live in: 32 or 64.
            64 doubles the upload but leaves 32 more bits for precision and weights.
        clip: Each update coordinate is clipped to ``[-clip, clip]`` before quantisation.
        scale_bits: Fixed-point fractional bits (a value ``x`` becomes
            ``round(x * 2**scale_bits)``). ``None`` picks the largest value that provably
            cannot wrap; after construction the field always holds the value in force.
        max_weight: Upper bound on a site's sample-count weight.
        max_group_size: The federation's public upper bound on the number of sites
            (``max_sites`` in the federation file): it bounds every block group (a larger
            group is not aggregated, its sum could wrap) and every roster (the stage
            machines refuse a larger one), and the thresholds must be a strict majority
            of it.
        threshold: The Shamir threshold ``t`` of every block without a declared group,
            fixed and public for the federation (never derived from a group's size as
            the coordinator shows it). A site refuses a group smaller than ``t``, shares
            its secrets with threshold ``t``, and reveals shares only with ``t``
            consistency-check signatures. ``None`` picks :func:`default_threshold`; after
            construction the field holds the value in force. Must satisfy
            ``min_contributors <= t <= max_group_size`` and ``2 * t > max_group_size``.
        block_thresholds: Per-block overrides (block name to ``t_b``); never a task head.
            For a block without a declared group, the bounds of ``threshold``; for a
            block with one, ``min_contributors <= t_b <= |P_b|`` and ``2 * t_b > |P_b|``.
        block_groups: The public block groups (``[aggregation.groups]``): block name to
            the sites ``P_b`` allowed to contribute it (distinct site ids, 2 to
            ``max_group_size`` of them; never a task head). Only members of ``P_b`` may
            advertise, mask with, sign for or be counted in block ``b``; its default
            threshold is :func:`default_group_threshold` of ``|P_b|``. A block not named
            here may be contributed by any site of the roster, with the rule against
            ``max_group_size``. Stored as sorted tuples.
        min_contributors: The federation's minimum number of contributors to a block (at
            least 2); a smaller group is not aggregated, since its sum would be (close to)
            one site's update. Each site may demand more.
        max_message_bytes: Longest protocol message accepted, checked before parsing.
        sparse: The sparse masking graph for large block groups (:class:`SparseGraph`),
            or ``None``: every group is a complete graph. Its ``min_masked + 1`` must be
            at least ``min_contributors``.

    Raises:
        ValueError: listing every problem found, among them parameters whose sum could
            wrap (naming the bound ``max_group_size * max_weight *
            ceil(clip * 2**scale_bits) <= 2**(ring_bits - 1) - 1``), thresholds that
            are not a strict majority of ``max_group_size`` (or, for a block with a
            declared group, of that group), and malformed groups.

    Notes:
        The no-wrap proof: a site sends ``w * q`` per coordinate with ``|q| <=
        ceil(clip * 2**scale_bits)`` and ``1 <= w <= max_weight``; at most
        ``max_group_size`` sites are summed, so the true sum ``S`` has ``|S| <=
        max_group_size * max_weight * ceil(clip * 2**scale_bits)``. When that is at most
        ``2**(b-1) - 1``, reading the ring sum as a two's-complement integer recovers ``S``
        exactly. The weights (summed beside the updates) are positive and bounded by
        ``max_group_size * max_weight``, which the same inequality bounds since
        ``ceil(clip * 2**scale_bits) >= 1``.

        Thresholds are public and fixed per federation and block because a coordinator
        controls what each site sees of a round: a threshold computed from the group a
        site is shown lets a malicious coordinator show one site a group of two (``t =
        2``) and collect its secrets from one accomplice's view. With ``t`` fixed and
        ``2t > max_group_size``, no group smaller than ``t`` is ever accepted, and two
        disjoint sets of honest sites can never both gather ``t`` consistency-check
        signatures (Bonawitz et al. 2017, section 4, ConsistencyCheck round; section 6,
        active adversary): the coordinator cannot obtain a peer's self-mask shares from
        one set and its mask-key shares from another.

        A declared group ``P_b`` narrows the universe of possible signers of block ``b``
        from the ``max_group_size`` sites to the members of ``P_b``, since every site
        refuses a group, survivor set or signer outside it. The pigeonhole argument then
        needs ``2 t_b > |P_b|`` only, so a block held by a few sites of a large
        federation can be aggregated. ``P_b`` is public (the federation file, whose
        SHA-256 every message binds), so the coordinator cannot enlarge it.
    """

    ring_bits: int = 32
    clip: float = 1.0
    scale_bits: int | None = None
    max_weight: int = 1000
    max_group_size: int = 100
    threshold: int | None = None
    block_thresholds: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    block_groups: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    min_contributors: int = 2
    max_message_bytes: int = 256 * 1024 * 1024
    sparse: SparseGraph | None = None

    def __post_init__(self) -> None:
        problems = self._basic_problems()
        if problems:
            raise ValueError("invalid SecAggParams: " + "; ".join(problems))
        scale_bits = self.scale_bits
        bound = f"max_group_size * max_weight * ceil(clip * 2**scale_bits) <= 2**{self.ring_bits - 1} - 1"
        if scale_bits is None:
            scale_bits = largest_safe_scale_bits(
                ring_bits=self.ring_bits, clip=self.clip, max_weight=self.max_weight, max_group_size=self.max_group_size
            )
            if scale_bits is None:
                raise ValueError(f"invalid SecAggParams: no scale_bits >= 0 satisfies the no-wrap bound {bound}")
            object.__setattr__(self, "scale_bits", scale_bits)
        elif not _cannot_wrap(
            ring_bits=self.ring_bits,
            clip=self.clip,
            scale_bits=scale_bits,
            max_weight=self.max_weight,
            max_group_size=self.max_group_size,
        ):
            worst = self.max_group_size * self.max_weight * max_abs_quantized(self.clip, scale_bits)
            raise ValueError(
                f"invalid SecAggParams: the sum could wrap: {bound} fails "
                f"({self.max_group_size} * {self.max_weight} * {max_abs_quantized(self.clip, scale_bits)} = {worst})"
            )
        if Fraction(self.clip) * Fraction(2) ** scale_bits < 1:
            raise ValueError(
                "invalid SecAggParams: clip * 2**scale_bits must be at least 1 (one quantisation step); "
                "raise scale_bits or clip"
            )

    def _basic_problems(self) -> list[str]:
        problems: list[str] = []
        if self.ring_bits not in (32, 64) or not _is_int(self.ring_bits):
            problems.append("ring_bits must be 32 or 64")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)):
            problems.append("clip must be a number")
        elif not (math.isfinite(self.clip) and self.clip > 0):
            problems.append("clip must be finite and > 0")
        else:
            object.__setattr__(self, "clip", float(self.clip))
        if self.scale_bits is not None and not (_is_int(self.scale_bits) and 0 <= self.scale_bits <= MAX_SCALE_BITS):
            problems.append(f"scale_bits must be None or an int in 0..{MAX_SCALE_BITS}")
        if not (_is_int(self.max_weight) and self.max_weight >= 1):
            problems.append("max_weight must be an int >= 1")
        if not (_is_int(self.max_group_size) and 2 <= self.max_group_size <= _MAX_GROUP_SIZE):
            problems.append(f"max_group_size must be an int in 2..{_MAX_GROUP_SIZE}")
        if not (_is_int(self.min_contributors) and self.min_contributors >= 2):
            problems.append("min_contributors must be an int >= 2 (a sum over one site is that site's update)")
        elif _is_int(self.max_group_size) and self.min_contributors > self.max_group_size:
            problems.append("min_contributors must not exceed max_group_size")
        problems.extend(self._threshold_problems())
        if not (_is_int(self.max_message_bytes) and _MIN_MESSAGE_BYTES <= self.max_message_bytes <= _MAX_MESSAGE_BYTES):
            problems.append(f"max_message_bytes must be an int in {_MIN_MESSAGE_BYTES}..{_MAX_MESSAGE_BYTES}")
        if self.sparse is not None:
            if not isinstance(self.sparse, SparseGraph):
                problems.append("sparse must be None or a SparseGraph")
            elif _is_int(self.min_contributors) and self.sparse.min_masked + 1 < self.min_contributors:
                problems.append(
                    f"sparse.min_masked + 1 ({self.sparse.min_masked + 1}) must be at least min_contributors "
                    f"({self.min_contributors}): it is the fewest inputs any unmasked value can involve"
                )
        return problems

    def _threshold_problems(self) -> list[str]:
        problems: list[str] = []
        bounds_known = (
            _is_int(self.max_group_size)
            and 2 <= self.max_group_size <= _MAX_GROUP_SIZE
            and _is_int(self.min_contributors)
            and 2 <= self.min_contributors <= self.max_group_size
        )
        if self.threshold is None:
            if bounds_known:
                object.__setattr__(
                    self, "threshold", default_threshold(self.max_group_size, self.min_contributors)
                )
        elif bounds_known:
            problems.extend(self._one_threshold_problems("threshold", self.threshold))
        elif not _is_int(self.threshold):
            problems.append("threshold must be None or an int")
        groups = self._group_problems(problems, bounds_known)
        if not isinstance(self.block_thresholds, Mapping):
            problems.append("block_thresholds must be a mapping of block name to threshold")
            return problems
        for block, value in sorted(self.block_thresholds.items(), key=lambda item: str(item[0])):
            if not is_valid_block_name(block) or is_head(block):
                problems.append(f"block_thresholds names {block!r}, which is not a shareable block")
            elif bounds_known and block in groups:
                problems.extend(
                    self._one_threshold_problems(
                        f"block_thresholds[{block!r}]", value, bound=len(groups[block]), bound_name=f"|P_b| of {block}"
                    )
                )
            elif bounds_known:
                problems.extend(self._one_threshold_problems(f"block_thresholds[{block!r}]", value))
        object.__setattr__(self, "block_thresholds", MappingProxyType(dict(sorted(self.block_thresholds.items()))))
        return problems

    def _group_problems(self, problems: list[str], bounds_known: bool) -> dict[str, tuple[str, ...]]:
        """Check ``block_groups``, store them canonically (sorted tuples, read-only), and
        return the well-formed ones (to check their thresholds against)."""
        if not isinstance(self.block_groups, Mapping):
            problems.append("block_groups must be a mapping of block name to a sequence of site ids")
            return {}
        groups: dict[str, tuple[str, ...]] = {}
        for block, members in sorted(self.block_groups.items(), key=lambda item: str(item[0])):
            name = f"block_groups[{block!r}]"
            if not is_valid_block_name(block) or is_head(block):
                problems.append(f"block_groups names {block!r}, which is not a shareable block")
                continue
            if isinstance(members, (str, bytes)) or not isinstance(members, (tuple, list, frozenset, set)):
                problems.append(f"{name} must be a sequence of site ids")
                continue
            if not all(is_valid_identifier(site) for site in members):
                problems.append(f"{name} holds a value that is not a valid site id")
                continue
            if len(set(members)) != len(members):
                problems.append(f"{name} names a site twice")
                continue
            if len(members) < 2:
                problems.append(f"{name} must name at least 2 sites (a sum over one site is that site's update)")
                continue
            if bounds_known and len(members) > self.max_group_size:
                problems.append(f"{name} names more sites than max_group_size ({self.max_group_size})")
                continue
            groups[block] = tuple(sorted(members))
        object.__setattr__(self, "block_groups", MappingProxyType(groups))
        return groups

    def _one_threshold_problems(
        self, name: str, value: object, *, bound: int | None = None, bound_name: str = "max_group_size"
    ) -> list[str]:
        """Problems of one threshold against ``bound`` sites that could sign for its block
        (``max_group_size``, or the size of the block's declared group)."""
        if not _is_int(value):
            return [f"{name} must be an int"]
        bound = self.max_group_size if bound is None else bound
        problems = []
        if value < self.min_contributors:
            problems.append(f"{name} must be at least min_contributors ({self.min_contributors})")
        if value > bound:
            problems.append(f"{name} must not exceed {bound_name} ({bound})")
        if 2 * value <= bound:
            problems.append(
                f"{name} must be more than half of {bound_name} ({bound}), at least "
                f"{min_threshold(bound)}: otherwise two disjoint sets of sites could each pass "
                "the consistency check"
            )
        return problems

    @property
    def ring_dtype(self) -> np.dtype:
        """The little-endian unsigned dtype of ring elements (``<u4`` or ``<u8``)."""
        return np.dtype("<u4") if self.ring_bits == 32 else np.dtype("<u8")

    @property
    def ring_bytes(self) -> int:
        """Bytes per ring element."""
        return self.ring_bits // 8

    def block_threshold(self, block: str) -> int:
        """The Shamir threshold ``t_b`` of ``block``: its override in
        ``block_thresholds``, else, for a block with a declared group,
        :func:`default_group_threshold` of that group's size, else ``threshold``. It
        depends on the public parameters only, never on the size of the group a site is
        shown.
        """
        if block in self.block_thresholds:
            return int(self.block_thresholds[block])
        group = self.block_groups.get(block)
        if group is not None:
            return default_group_threshold(len(group), self.min_contributors)
        return int(self.threshold)

    def possible_signers(self, block: str) -> int:
        """``N_b``: how many sites can ever sign for ``block``: its public group's size, or
        ``max_group_size`` for a block without one."""
        group = self.block_groups.get(block)
        return len(group) if group is not None else int(self.max_group_size)

    def is_sparse(self, block: str) -> bool:
        """Whether ``block`` is masked over the sparse graph: the federation declares one
        and ``N_b`` is at least its ``from_sites``. Public: it never depends on a round."""
        return self.sparse is not None and self.possible_signers(block) >= int(self.sparse.from_sites)

    def share_threshold(self, block: str) -> int:
        """Shares needed to rebuild a member's secret of ``block``: ``t_b`` on the complete
        graph, the sparse graph's ``share_threshold`` on the sparse one."""
        if self.is_sparse(block):
            return int(self.sparse.share_threshold)
        return self.block_threshold(block)

    def block_group(self, block: str) -> tuple[str, ...] | None:
        """The public group ``P_b`` of ``block`` (sorted site ids), or ``None`` if the
        federation declares none (then any site of the roster may contribute it)."""
        return self.block_groups.get(block)

    def is_group_member(self, block: str, site: str) -> bool:
        """Whether ``site`` may contribute ``block``: it is in the block's declared group,
        or the block has none."""
        group = self.block_groups.get(block)
        return group is None or site in group

    def quantisation_step(self) -> float:
        """The fixed-point resolution ``2**-scale_bits``."""
        return math.ldexp(1.0, -int(self.scale_bits or 0))
