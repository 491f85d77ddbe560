"""The egress guard: the one place that decides which parameters may leave a site.

:func:`select_egress` is the only function that turns a site's parameters into something
that can be sent. It applies the policy with default deny: a block leaves only if the
policy declares it shareable, and a task head (``head.*``) can never leave, whatever the
policy says (policies that try are already refused when loaded; this is the second line).

Its result is an :class:`Egress`, which cannot be built any other way; every encoder of an
outbound update accepts only an ``Egress``. So no code path can serialise a parameter the
policy did not release, and a property test checks exactly that.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from blossom_secure.blocks import is_head, is_valid_block_name
from blossom_secure.policy import Policy

__all__ = ["Egress", "select_egress"]

_TOKEN = object()


class Egress(Mapping[str, np.ndarray]):
    """Block updates cleared to leave the site (read-only copies). Built only by
    :func:`select_egress`."""

    def __init__(self, blocks: dict[str, np.ndarray], policy_sha256: str, *, _token: object = None) -> None:
        if _token is not _TOKEN:
            raise TypeError("an Egress is made only by select_egress(policy, blocks)")
        self._blocks = blocks
        self.policy_sha256 = policy_sha256

    def __getitem__(self, name: str) -> np.ndarray:
        return self._blocks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(v.shape) for name, v in self._blocks.items()}


def select_egress(policy: Policy, blocks: Mapping[str, np.ndarray]) -> Egress:
    """Keep the blocks ``policy`` allows to leave; drop everything else.

    Args:
        policy: The site's validated policy.
        blocks: Candidate block name -> float array (e.g. this round's update).

    Returns:
        An :class:`Egress` holding read-only float32 copies of the allowed blocks, in the
        order given.

    Notes:
        Default deny: unknown names, malformed names and heads are dropped even if a
        pattern would match them. Copies are taken so later changes to the model cannot
        alter what was cleared (and audited).
    """
    kept: dict[str, np.ndarray] = {}
    for name, value in blocks.items():
        if not isinstance(name, str) or not is_valid_block_name(name) or is_head(name):
            continue
        if not policy.is_shareable(name):
            continue
        array = np.array(value, dtype=np.float32, copy=True).reshape(-1)
        array.setflags(write=False)
        kept[name] = array
    return Egress(kept, policy.sha256, _token=_TOKEN)
