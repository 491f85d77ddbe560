"""The embedded federation: a coordinator and the example sites in one process.

This is the README's main command (``blossom simulate``). Sites and coordinator exchange
only bytes through the aggregator (plaintext, or secure aggregation by default), exactly as
they would across a network, and every site keeps its own key, ledger, audit log and
private blocks in its own folder.

Modes (BLOSSOM, arXiv 2603.27552):

* ``blockwise`` (default): each block shared by a site's policy is averaged over the sites
  that hold and share it; heads and unshared blocks stay private.
* ``full-model``: every block, heads included, averaged over the sites that hold it: the
  paper's baseline. It ignores the hospitals' policies, so it exists only here, only for
  sites whose data are synthetic, and only when explicitly requested; nothing is sent
  (the average is taken in memory) and no egress is recorded.
* ``local``: no federation; every site trains alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blossom_secure._fs import atomic_write, save_arrays_npz
from blossom_secure.exchange import Aggregator, BlockOutcome
from blossom_secure.runtimes.embedded.aggregators import PlaintextAggregator
from blossom_secure.blocks import is_head
from blossom_secure.config import FederationConfig, load_federation
from blossom_secure.coordinator.rounds import RoundReport, initial_global_blocks, site_report_view
from blossom_secure.site.config import site_dirs
from blossom_secure.errors import PolicyError, Problem
from blossom_secure.model import BlockModel
from blossom_secure.site.agent import RoundOffer, SiteAgent

__all__ = ["Coordinator", "SimulationResult", "make_aggregator", "simulate"]

logger = logging.getLogger(__name__)

MODES = ("blockwise", "full-model", "local")


def make_aggregator(federation: FederationConfig, agents: list[SiteAgent], *, secure: bool) -> Aggregator:
    """The aggregator for a run: secure aggregation unless plaintext is asked for.

    Raises:
        PolicyError: the federation's aggregation parameters could let a secure sum wrap,
            its thresholds are not a strict majority of ``max_sites`` (or of a block's
            declared group), or the roster is larger than ``max_sites``.
    """
    if not secure:
        return PlaintextAggregator(min_contributors=federation.aggregation.min_contributors)
    from blossom_secure.runtimes.embedded.aggregators import SecureAggregator
    from blossom_secure.secagg.terms import federation_sha256, secagg_params

    try:
        params = secagg_params(federation, roster_size=len(agents))
        digest = federation_sha256(federation)
    except ValueError as exc:
        raise PolicyError([Problem(str(federation.path), "aggregation", str(exc))]) from None
    for block, members in sorted(federation.aggregation.groups.items()):
        absent = sorted(set(members) - {a.id for a in agents})
        if absent:  # not unsafe (fewer possible signers), but a misspelt id would shut a real site out
            logger.warning("[aggregation.groups] %s names site(s) not in the roster: %s", block, ", ".join(absent))
    return SecureAggregator(params=params, federation_sha256=digest, roster={a.id: a.public_key for a in agents},
                            identity_keys={a.id: a.identity_key for a in agents})


@dataclass
class SimulationResult:
    rounds: list[RoundReport]
    out_dir: Path
    metrics_path: Path


class Coordinator:
    """Holds the global shared blocks and runs rounds over in-process sites."""

    def __init__(self, federation: FederationConfig, agents: list[SiteAgent], *, mode: str,
                 aggregator: Aggregator | None, seed: int) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.federation = federation
        self.agents = agents
        self.mode = mode
        self.aggregator = aggregator
        self.global_blocks = initial_global_blocks(federation, include_heads=mode == "full-model", seed=seed)
        self._init_site_blocks()

    def _init_site_blocks(self) -> None:
        """Every site starts its shared (or, in full-model, all) blocks from the same values."""
        for agent in self.agents:
            names = agent.model.blocks() if self.mode == "full-model" else agent.shared_blocks
            agent.model.set_blocks({b: self.global_blocks[b] for b in names if b in self.global_blocks})

    def run_round(self, round_id: int) -> RoundReport:
        if self.mode == "full-model":
            return self._full_model_round(round_id)
        secure = bool(self.aggregator is not None and self.aggregator.secure)
        offers: dict[str, RoundOffer] = {}
        for agent in self.agents:
            if self.mode == "local":
                offers[agent.id] = agent.offer(round_id=round_id, global_blocks={}, secure=True)
            else:
                offers[agent.id] = agent.offer(round_id=round_id, global_blocks=self.global_blocks, secure=secure)
        outcomes: dict[str, BlockOutcome] = {}
        if self.mode == "blockwise":
            contributions = {s: o.contribution for s, o in offers.items() if o.contribution is not None}
            by_id = {a.id: a for a in self.agents}
            outcomes = self.aggregator.aggregate(
                federation_id=self.federation.id, round_id=round_id, contributions=contributions,
                block_sizes={b: v.size for b, v in self.global_blocks.items()},
                on_egress=lambda site, kind, blocks, payload: by_id[site].record_egress(round_id, kind, blocks, payload))
            received = dict(self.aggregator.last_bytes_received)
            if self.aggregator.secure:
                errors = self.aggregator.last_site_errors
                for site in contributions:
                    by_id[site].record_secagg_outcome(round_id, error=errors.get(site))
            for block, outcome in outcomes.items():
                if outcome.failure is None:
                    self.global_blocks[block] = (self.global_blocks[block] + outcome.mean_update).astype(np.float32)
        else:
            received = {}
        return self._finish(round_id, offers, outcomes, received)

    def _full_model_round(self, round_id: int) -> RoundReport:
        offers: dict[str, RoundOffer] = {}
        trained: dict[str, dict[str, np.ndarray]] = {}
        for agent in self.agents:
            agent.model.set_blocks({b: self.global_blocks[b] for b in agent.model.blocks() if b in self.global_blocks})
            offers[agent.id] = agent.offer(round_id=round_id, global_blocks=self.global_blocks, secure=True)
            if offers[agent.id].declined is None:
                trained[agent.id] = agent.model.get_blocks()
        outcomes: dict[str, BlockOutcome] = {}
        for block in self.global_blocks:
            holders = [a for a in self.agents if a.id in trained and block in trained[a.id]]
            if not holders:
                continue
            weights = np.array([a.public_weight or 1 for a in holders], dtype=np.float64)
            mean = sum(w * trained[a.id][block].astype(np.float64) for w, a in zip(weights, holders)) / weights.sum()
            self.global_blocks[block] = mean.astype(np.float32)
            outcomes[block] = BlockOutcome(block=block, contributors=tuple(a.id for a in holders),
                                           mean_update=None, weight_sum=int(weights.sum()))
        for agent in self.agents:
            agent.model.set_blocks({b: self.global_blocks[b] for b in agent.model.blocks() if b in outcomes})
        return self._finish(round_id, offers, outcomes, {}, take_globals=False)

    def _finish(self, round_id: int, offers: Mapping[str, RoundOffer], outcomes: Mapping[str, BlockOutcome],
                received: Mapping[str, int], take_globals: bool = True) -> RoundReport:
        sites = {}
        received = dict(received)
        for agent in self.agents:
            offer = offers[agent.id]
            if take_globals:
                metrics = agent.finish_round(round_id=round_id, outcomes=outcomes, global_blocks=self.global_blocks)
            else:
                agent.save_blocks()
                metrics = agent.evaluate()
            # The coordinator sees only what the site released: its report's bytes.
            payload = agent.round_report(round_id=round_id, offer=offer, metrics=metrics)
            sites[agent.id] = site_report_view(payload, joined=offer.declined is None)
            if payload is not None:
                received[agent.id] = received.get(agent.id, 0) + len(payload)
        blocks = {b: {"contributors": list(o.contributors), "failure": o.failure} for b, o in outcomes.items()}
        return RoundReport(round_id=round_id, sites=sites, blocks=blocks,
                           bytes_received={a.id: int(received.get(a.id, 0)) for a in self.agents})


def simulate(*, sites_root: Path, rounds: int | None, out_dir: Path, mode: str | None = None, secure: bool | None = None,
             seed: int | None = None, fresh: bool = False, allow_full_model: bool = False,
             on_round: Callable[[RoundReport, list[SiteAgent]], None] | None = None,
             on_setup: Callable[[str], None] | None = None) -> SimulationResult:
    """Run the embedded federation over the sites under ``sites_root``.

    Args:
        sites_root: Folder holding ``federation.toml`` and one folder per site.
        rounds: Rounds to run (``None``: the federation file's number).
        out_dir: Where ``metrics.json`` and the final global blocks are written.
        mode: ``blockwise``, ``full-model`` or ``local`` (``None``: the federation file's).
        secure: Secure aggregation or plaintext (``None``: the federation file's, secure by default).
        seed: Seed for the initial block values and, on sites with synthetic data only,
            for DP sampling and noise: such a run is a seeded simulation whose epsilon is
            nominal (ledger and audit log say so). ``None`` (default): noise from the OS
            CSPRNG everywhere. A site without ``[synth]`` never gets seeded noise.
        fresh: Delete the example sites' previous state (ledger, audit log, private blocks)
            first; refused for a site without ``[synth]`` (real data).
        allow_full_model: Required for ``mode="full-model"``.
        on_round: Called after every round (progress display).
        on_setup: Called with a line of text as each site is loaded.

    Raises:
        PolicyError, DataError, ...: a site cannot take part (nothing is run).
        ValueError: bad arguments (mode, rounds, full-model without the flag).
    """
    sites_root = Path(sites_root)
    federation = load_federation(sites_root / "federation.toml")
    if mode is None and federation.aggregation.mode == "full-model" and not allow_full_model:
        raise PolicyError([Problem(str(federation.path), "aggregation.mode",
                                   "full-model shares task heads and ignores policies; it needs --allow-full-model")])
    mode = federation.aggregation.mode if mode is None else mode
    secure = federation.aggregation.secure if secure is None else secure
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    if mode == "full-model" and not allow_full_model:
        raise ValueError("full-model aggregation ignores the sites' policies and shares task heads; "
                         "it runs only in simulation and only with --allow-full-model")
    dirs = site_dirs(sites_root)
    if not dirs:
        raise PolicyError([Problem(str(sites_root), "", "no site folders (each needs a site.toml)")])
    if fresh or mode == "full-model":
        _check_synthetic(dirs, federation, reason="--fresh" if fresh else "full-model")
    if fresh:
        for d in dirs:
            _reset_state(d)
    agents = []
    for d in dirs:
        agent = SiteAgent(d, federation, seed=seed)
        if on_setup is not None:
            noise = "seeded simulation (epsilon nominal)" if agent.seeded_noise else "DP noise from the OS CSPRNG"
            on_setup(f"{agent.id}: modalities {'+'.join(agent.config.modalities)}, "
                     f"tasks {', '.join(agent.config.tasks)}; {noise}")
        agents.append(agent)
    ids = [a.id for a in agents]
    if len(set(ids)) != len(ids):
        raise PolicyError([Problem(str(sites_root), "site.id", "two sites have the same id")])
    rounds = federation.training.rounds if rounds is None else rounds
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    aggregator = make_aggregator(federation, agents, secure=secure) if mode == "blockwise" else None
    coordinator = Coordinator(federation, agents, mode=mode, aggregator=aggregator, seed=0 if seed is None else seed)
    reports = []
    for r in range(rounds):
        report = coordinator.run_round(r)
        reports.append(report)
        if on_round is not None:
            on_round(report, agents)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    atomic_write(metrics_path, json.dumps(_metrics_document(federation, agents, reports, mode=mode,
                                                            secure=secure and mode == "blockwise", seed=seed),
                                          indent=1).encode() + b"\n")
    save_arrays_npz(out_dir / "global_blocks.npz", coordinator.global_blocks)
    return SimulationResult(rounds=reports, out_dir=out_dir, metrics_path=metrics_path)


def _metrics_document(federation: FederationConfig, agents: list[SiteAgent], reports: list[RoundReport], *,
                      mode: str, secure: bool, seed: int | None) -> dict:
    """metrics.json: built only from what the sites released (their round reports) and
    from public files (site files, policies, federation file); never a count of patients."""
    rows = []
    for report in reports:
        for agent in agents:
            s = report.sites[agent.id]
            for task, m in sorted(s["tasks"].items()):
                rows.append({"round": report.round_id, "site": agent.id, "task": task,
                             "metric": "accuracy", "value": m["accuracy"], "macro_f1": m["macro_f1"],
                             "majority_class_rate": m["majority_class_rate"], "epsilon": s["epsilon"],
                             "epsilon_nominal": s["epsilon_nominal"], "declined": s["declined"]})
    return {
        "federation": federation.id,
        "mode": mode,
        "secure_aggregation": secure,
        "seed": seed,
        "rounds": len(reports),
        "sites": {a.id: {"modalities": list(a.config.modalities), "tasks": sorted(a.config.tasks),
                         "shared_blocks": list(a.shared_blocks), "weight": a.public_weight,
                         "epsilon_budget": a.policy.privacy.epsilon_budget,
                         "reports_metrics": a.policy.metrics_may_leave,
                         "noise": "seeded-simulation" if a.seeded_noise else "os-csprng"}
                  for a in agents},
        "blocks": {str(r.round_id): r.blocks for r in reports},
        "bytes_received": {str(r.round_id): r.bytes_received for r in reports},
        "metrics": rows,
    }


def _check_synthetic(dirs: list[Path], federation: FederationConfig, *, reason: str) -> None:
    from blossom_secure.site.config import load_site

    problems = []
    for d in dirs:
        site = load_site(d, federation=federation)
        if site.synth is None:
            problems.append(Problem(str(d / "site.toml"), "synth",
                                    f"{reason} is only for example sites with synthetic data ([synth] section)"))
    if problems:
        raise PolicyError(problems)


def _reset_state(site_dir: Path) -> None:
    state = site_dir / "state"
    if state.is_dir():
        for child in sorted(state.iterdir()):
            if child.is_file():
                child.unlink()
