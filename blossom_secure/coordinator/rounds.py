"""The coordinator's round vocabulary, shared by both runtimes: the initial global blocks,
what the coordinator knows of each site after a round, and the round report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from blossom_secure.blocks import is_head
from blossom_secure.config import FederationConfig

__all__ = ["SERVER_OPTIMIZERS", "RoundReport", "ServerOptimizer", "initial_global_blocks", "site_report_view"]

#: What the coordinator does with a block's aggregated mean update.
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")


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


class ServerOptimizer:
    """How the coordinator moves a shared block by the aggregated mean update ``delta`` of
    a round: post-processing of the (securely) aggregated, DP-noised sum, so it costs no
    privacy and sees nothing secure aggregation does not release.

    * ``sgd``: ``x += lr * delta`` (FedAvg with ``lr = 1``).
    * ``momentum``: ``v = beta1 * v + delta``; ``x += lr * v`` (FedAvgM, Hsu et al. 2019).
    * ``adam``: ``m = beta1 * m + (1 - beta1) * delta``; ``s = beta2 * s + (1 - beta2) *
      delta**2``; ``x += lr * m / (sqrt(s) + tau)`` (FedAdam, Reddi et al. 2021).

    The state is per block and kept in float64; a block not aggregated in a round keeps
    its value and its state.
    """

    def __init__(self, kind: str = "sgd", *, lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}")
        if not (lr > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError("server optimizer: lr > 0, 0 <= beta1, beta2 < 1 and tau > 0")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def step(self, block: str, value: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """The block's new value (float32) after a round whose mean update was ``delta``."""
        if self.kind == "sgd" and self.lr == 1.0:
            return (value + delta).astype(np.float32)  # FedAvg, as every runtime has always computed it
        d = np.asarray(delta, dtype=np.float64)
        if self.kind == "sgd":
            move = d
        elif self.kind == "momentum":
            state = self.state.setdefault(block, {"v": np.zeros_like(d)})
            state["v"] = self.beta1 * state["v"] + d
            move = state["v"]
        else:
            state = self.state.setdefault(block, {"m": np.zeros_like(d), "s": np.zeros_like(d)})
            state["m"] = self.beta1 * state["m"] + (1 - self.beta1) * d
            state["s"] = self.beta2 * state["s"] + (1 - self.beta2) * d * d
            move = state["m"] / (np.sqrt(state["s"]) + self.tau)
        return (np.asarray(value, dtype=np.float64) + self.lr * move).astype(np.float32)


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
