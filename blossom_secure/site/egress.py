"""The egress guard: the one place that decides which parameters may leave a site.

:func:`select_egress` is the only function that turns a site's parameters into something
that can be sent. It applies the policy with default deny: a block leaves only if the
policy declares it shareable, and a task head (``head.*``) can never leave, whatever the
policy says (policies that try are already refused when loaded; this is the second line).

Its result is an :class:`Egress`, which cannot be built any other way; every encoder of an
outbound update accepts only an ``Egress``. So no code path can serialise a parameter the
policy did not release, and a property test checks exactly that.

:func:`select_report` is the same gate for the site's round report (evaluation metrics and
the epsilon spent): it leaves only if the policy's ``[reporting] metrics`` allows it, and
it never carries a count of patients.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping

import numpy as np

from blossom_secure.blocks import is_head, is_valid_block_name
from blossom_secure.exchange import PLAIN_UPDATE_VERSION
from blossom_secure.site.policy import Policy

__all__ = ["EGRESS_RECIPIENT", "Egress", "SiteReport", "egress_block_bytes", "encode_plain_update", "select_egress",
           "select_report"]

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


REPORT_VERSION = 1


class SiteReport:
    """A site's round report cleared to leave (canonical JSON bytes). Built only by
    :func:`select_report`, and only when the policy lets metrics leave."""

    def __init__(self, payload: bytes, policy_sha256: str, *, _token: object = None) -> None:
        if _token is not _TOKEN:
            raise TypeError("a SiteReport is made only by select_report(policy, ...)")
        self.payload = payload
        self.policy_sha256 = policy_sha256


def select_report(policy: Policy, *, site_id: str, round_id: int, declined: str | None,
                  tasks: Mapping[str, Mapping[str, float]], majority_class_rate: Mapping[str, float],
                  epsilon_total: float | None, epsilon_nominal: bool) -> SiteReport | None:
    """The site's round report as the bytes that may leave, or ``None`` if the policy keeps
    metrics in (``[reporting] metrics`` is false: the default).

    Args:
        policy: The site's policy.
        site_id, round_id: Whose report, for which round.
        declined: Why the site sat the round out (a short category, never data), or ``None``.
        tasks: Task -> ``{"accuracy", "macro_f1"}`` on the site's held-out patients.
        majority_class_rate: Task -> accuracy of always predicting the most common
            training label, on the held-out patients.
        epsilon_total: The site's total epsilon after the round (``None`` for a
            simulation-only run without DP, which spends nothing it could account).
        epsilon_nominal: Whether that epsilon is nominal (a seeded simulation).

    Returns:
        The report, or ``None``.

    Notes:
        Only rates leave, never a count: held-out and training-set sizes stay in the site
        (a count, differenced across rounds, tells whether one patient was added). The
        metrics themselves are computed from patient data and are not differentially
        private; they leave only because the hospital's policy says they may, and every
        report is written to the audit log (with its SHA-256) before it is sent.
    """
    if not policy.metrics_may_leave:
        return None
    import json
    import math

    def rate(x: float) -> float | None:
        x = float(x)
        return round(x, 6) if math.isfinite(x) else None

    doc = {
        "type": "site-report", "version": REPORT_VERSION, "site": site_id, "round": int(round_id),
        "declined": declined,
        "tasks": {t: {"accuracy": rate(m["accuracy"]), "macro_f1": rate(m["macro_f1"]),
                      "majority_class_rate": rate(majority_class_rate.get(t, float("nan")))}
                  for t, m in sorted(tasks.items())},
        "epsilon_total": None if epsilon_total is None or not math.isfinite(epsilon_total) else float(epsilon_total),
        "epsilon_nominal": bool(epsilon_nominal),
    }
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return SiteReport(payload, policy.sha256, _token=_TOKEN)


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


#: The recipient of every message a site sends: the coordinator (a site connects to nothing
#: else; protocol messages for other sites are encrypted end to end and routed by it).
EGRESS_RECIPIENT = "coordinator"


def egress_block_bytes(message_type: str, blocks: tuple[str, ...], block_sizes: Mapping[str, int],
                       payload_bytes: int, *, ring_bits: int) -> dict[str, int] | None:
    """How many bytes of an outbound message carry each block's values, for the audit
    record (``block_bytes``); the rest of the payload is protocol (keys, shares,
    signatures, headers).

    Only two messages carry block values: ``secagg.masked_input`` (per block, its masked
    ring vector: the block's values and its weight, ``ring_bits / 8`` bytes each) and
    ``plain_update`` (the block's float32 values). Every other message (key
    advertisements, shares, consistency signatures, unmask shares, reports) names blocks
    only as labels and carries none of their values: 0 bytes each.

    Returns:
        Block -> bytes, or ``None`` if the figures would exceed the payload (then none are
        recorded, rather than a wrong one).
    """
    if message_type == "secagg.masked_input":
        per_block = {b: (int(block_sizes[b]) + 1) * (ring_bits // 8) for b in blocks}
    elif message_type == "plain_update":
        per_block = {b: int(block_sizes[b]) * 4 for b in blocks}
    else:
        per_block = dict.fromkeys(blocks, 0)
    return per_block if sum(per_block.values()) <= payload_bytes else None
