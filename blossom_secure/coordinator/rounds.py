"""The coordinator's round vocabulary, shared by both runtimes: the initial global blocks,
what the coordinator knows of each site after a round, and the round report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from blossom_secure.blocks import is_head
from blossom_secure.config import FederationConfig

__all__ = ["RoundReport", "initial_global_blocks", "site_report_view"]


def initial_global_blocks(federation: FederationConfig, *, include_heads: bool, seed: int) -> dict[str, np.ndarray]:
    """Initial values of every block of the federation layout, from ``seed``.

    Notes:
        torch is imported here, not with the module: the Flower ClientApp's module holds
        the ServerApp too, and a site's secure-aggregation steps, each in a fresh
        process, must not pay for loading torch (seconds on a busy machine) that only
        training, evaluation and the coordinator's first blocks need.
    """
    import torch

    from blossom_secure.model import BlockModel

    layout = federation.layout
    torch.manual_seed(seed)
    full = BlockModel(layout, layout.modalities, tuple(layout.tasks))
    return {b: v for b, v in full.get_blocks().items() if include_heads or not is_head(b)}


def site_report_view(untrusted_payload: bytes | None, *, joined: bool) -> dict:
    """What the coordinator knows of one site after a round: whether it joined (visible
    from the protocol) and, if its policy let the report leave, the report's contents.

    Returns:
        ``{"joined", "reported", "tasks", "epsilon", "epsilon_nominal", "declined"}``;
        ``tasks`` is empty and ``epsilon`` ``None`` when the site sent no report.
    """
    view = {"joined": joined, "reported": False, "tasks": {}, "epsilon": None, "epsilon_nominal": False,
            "declined": None if joined else "not reported"}
    if untrusted_payload is None:
        return view
    doc = json.loads(untrusted_payload.decode("utf-8"))
    view.update(reported=True, tasks=doc["tasks"], declined=doc["declined"],
                epsilon=doc["epsilon_total"], epsilon_nominal=doc["epsilon_nominal"])
    return view


@dataclass
class RoundReport:
    round_id: int
    sites: dict[str, dict]  # site -> site_report_view(...)
    blocks: dict[str, dict]  # block -> {"contributors", "failure"}
    bytes_received: dict[str, int]  # site -> bytes the coordinator took delivery of
