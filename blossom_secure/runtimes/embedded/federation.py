"""The embedded federation: a coordinator and the example sites in one process.

This is the README's main command (``blossom simulate``). Sites and coordinator exchange
only bytes through the aggregator (plaintext, or secure aggregation by default), exactly as
they would across a network, and every site keeps its own key, ledger, audit log and
private blocks in its own folder.

Modes (BLOSSOM, arXiv 2603.27552):

* ``blockwise`` (default): each block shared by a site's policy is averaged over the sites
  that hold and share it; heads and unshared blocks stay private.
* ``paper-full-model``: the paper's baseline (FedAvg of one global model): every block,
  heads included, averaged over every site that trained, where a site without a block
  (no such modality or task) sends the block back as it received it, so it dilutes the
  mean as in the BLOSSOM reference code.
* ``full-model``: every block, heads included, averaged over the sites that hold it only
  (an ablation between the paper's baseline and ``blockwise``).

  Both ignore the hospitals' policies, so they exist only here, only for sites whose
  data are synthetic, and only when explicitly requested; nothing is sent (the average is
  taken in memory) and no egress is recorded.
* ``local``: no federation; every site trains alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blossom_secure._fs import atomic_write, save_arrays_npz, unwritable_reason
from blossom_secure.exchange import Aggregator, BlockOutcome
from blossom_secure.runtimes.embedded.aggregators import PlaintextAggregator
from blossom_secure.runtimes.embedded.training_pool import TrainingPool, train_all
from blossom_secure.config import FederationConfig, load_federation
from blossom_secure.coordinator.rounds import RoundReport, ServerOptimizer, initial_global_blocks, site_report_view
from blossom_secure.coordinator.counter import (
    COORDINATOR_STATE_FILE,
    RoundCounterError,
    read_next_round,
    write_next_round,
)
from blossom_secure.crypto import identity_public_key
from blossom_secure.site.config import SiteConfig, policy_refusal, site_dirs
from blossom_secure.errors import BlossomError, DataError, PolicyError, PrivacyBudgetExceededError, Problem
from blossom_secure.site.agent import (
    PendingTraining,
    DECLINED_POLICY,
    RoundOffer,
    SiteAgent,
    ensure_site_data,
)
from blossom_secure.site.data import load_site_data
from blossom_secure.site.keys import IDENTITY_KEY_FILE
from blossom_secure.site.round_identity import last_round_answered

__all__ = ["Coordinator", "FederationBudgetExhaustedError", "SimulationResult", "make_aggregator", "simulate"]

logger = logging.getLogger(__name__)

MODES = ("blockwise", "full-model", "paper-full-model", "local")
#: The simulation-only modes that share every block, heads included.
FULL_MODEL_MODES = ("full-model", "paper-full-model")
#: :attr:`SimulationResult.answers` of a site that trained in a round.
TRAINED = "trained"


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
    """What a run of the embedded federation did.

    Attributes:
        rounds: The coordinator's report of each round (its view: what sites released).
        out_dir: Where ``metrics.json``, ``global_blocks.npz`` and the round counter are.
        metrics_path: ``metrics.json``.
        answers: Round -> site -> ``"trained"``, or the category of its decline
            (``"policy"``, ``"privacy budget"``). The embedded runtime runs every site in
            this process, so it knows this for its operator even for sites whose policy
            keeps their round report in; nothing here left any site.
        rounds_not_announced: The rounds asked for that were not run because a round
            before them had no site that could train (see :func:`simulate`).
    """

    rounds: list[RoundReport]
    out_dir: Path
    metrics_path: Path
    answers: dict[int, dict[str, str]] = field(default_factory=dict)
    rounds_not_announced: int = 0

    @property
    def round_ids(self) -> list[int]:
        """The federation's round numbers this run used, in order."""
        return [r.round_id for r in self.rounds]

    def sites_declined(self, kind: str) -> dict[str, list[int]]:
        """Site -> the rounds it declined for ``kind`` (``"policy"`` or ``"privacy budget"``)."""
        out: dict[str, list[int]] = {}
        for round_id, answers in sorted(self.answers.items()):
            for site, answer in sorted(answers.items()):
                if answer == kind:
                    out.setdefault(site, []).append(round_id)
        return out

    @property
    def any_trained(self) -> bool:
        """Whether any site trained in any round of the run."""
        return any(a == TRAINED for answers in self.answers.values() for a in answers.values())

    @property
    def rounds_without_training(self) -> list[int]:
        """The rounds of the run in which no site trained (every site declined)."""
        return [r for r, answers in sorted(self.answers.items()) if TRAINED not in answers.values()]


class Coordinator:
    """Holds the global shared blocks and runs rounds over in-process sites."""

    def __init__(self, federation: FederationConfig, agents: list[SiteAgent], *, mode: str,
                 aggregator: Aggregator | None, seed: int, pool: TrainingPool | None = None,
                 server_optimizer: ServerOptimizer | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.federation = federation
        self.agents = agents
        #: Worker processes that train the joined sites at the same time (``None``: the
        #: sites train one after the other in this process).
        self.pool = pool
        self._by_id = {agent.id: agent for agent in agents}
        self.mode = mode
        self.aggregator = aggregator
        #: Moves the shared blocks by each round's aggregated mean update (FedAvg by default).
        self.server_optimizer = server_optimizer or ServerOptimizer()
        #: Round -> site -> TRAINED or the category of its decline (in-process knowledge).
        self.answers: dict[int, dict[str, str]] = {}
        self.global_blocks = initial_global_blocks(federation, include_heads=mode in FULL_MODEL_MODES, seed=seed)
        self._init_site_blocks()

    def _init_site_blocks(self) -> None:
        """Every site starts its shared (or, in full-model, all) blocks from the same values."""
        for agent in self.agents:
            names = agent.model.blocks() if self.mode in FULL_MODEL_MODES else agent.shared_blocks
            agent.model.set_blocks({b: self.global_blocks[b] for b in names if b in self.global_blocks})

    def run_round(self, round_id: int) -> RoundReport:
        if self.mode in FULL_MODEL_MODES:
            return self._full_model_round(round_id)
        secure = bool(self.aggregator is not None and self.aggregator.secure)
        if self.mode == "local":
            offers = self._offers(round_id, {}, secure=True)
        else:
            offers = self._offers(round_id, self.global_blocks, secure=secure)
        outcomes: dict[str, BlockOutcome] = {}
        if self.mode == "blockwise":
            contributions = {s: o.contribution for s, o in offers.items() if o.contribution is not None}
            outcomes = self.aggregator.aggregate(
                federation_id=self.federation.id, round_id=round_id, contributions=contributions,
                block_sizes={b: v.size for b, v in self.global_blocks.items()},
                on_egress=lambda site, kind, blocks, payload: self._by_id[site].record_egress(round_id, kind, blocks,
                                                                                              payload))
            received = dict(self.aggregator.last_bytes_received)
            if self.aggregator.secure:
                errors = self.aggregator.last_site_errors
                for site in contributions:
                    self._by_id[site].record_secagg_outcome(round_id, error=errors.get(site))
            for block, outcome in outcomes.items():
                if outcome.failure is None:
                    self.global_blocks[block] = self.server_optimizer.step(block, self.global_blocks[block],
                                                                           outcome.mean_update)
        else:
            received = {}
        return self._finish(round_id, offers, outcomes, received)

    def _offers(self, round_id: int, global_blocks: Mapping[str, np.ndarray], *, secure: bool,
                before: Callable[[SiteAgent], None] | None = None) -> dict[str, RoundOffer]:
        """Every site's answer to the round, in the sites' order: one site after the other
        (:meth:`SiteAgent.offer`), or, with a pool, each site's
        :meth:`~SiteAgent.begin_offer` in turn, the joined sites' training at the same
        time in the pool, then each :meth:`~SiteAgent.complete_offer` in turn. Every site's
        answer is the same either way. ``before`` is called with each site first."""
        if self.pool is None:
            offers = {}
            for agent in self.agents:
                if before is not None:
                    before(agent)
                offers[agent.id] = agent.offer(round_id=round_id, global_blocks=global_blocks, secure=secure)
            return offers
        answers: dict[str, RoundOffer | PendingTraining] = {}
        try:
            for agent in self.agents:
                if before is not None:
                    before(agent)
                answers[agent.id] = agent.begin_offer(round_id=round_id, global_blocks=global_blocks, secure=secure)
        except BaseException as exc:
            self._abandon(answers, exc)
            raise
        pending = {site: a for site, a in answers.items() if isinstance(a, PendingTraining)}
        try:
            trained = train_all(self._by_id, pending, self.pool)
        except BaseException as exc:  # interrupted while the sites trained
            self._abandon(answers, exc)
            raise
        offers, error = {}, None
        for agent in self.agents:
            answer = answers[agent.id]
            if isinstance(answer, RoundOffer):
                offers[agent.id] = answer
                continue
            try:
                offers[agent.id] = agent.complete_offer(answer, trained[agent.id])
            except BaseException as exc:  # recorded by the site; the first is raised once every site is done
                error = error or exc
        if error is not None:
            raise error
        return offers

    def _abandon(self, answers: Mapping[str, RoundOffer | PendingTraining], exc: BaseException) -> None:
        """Record, at every site that joined and has not trained, why its round stopped."""
        why = RuntimeError(f"the round stopped before this site's training finished: {str(exc) or type(exc).__name__}")
        for site, answer in answers.items():
            if isinstance(answer, PendingTraining):
                with contextlib.suppress(BaseException):
                    self._by_id[site].complete_offer(answer, why)

    def _full_model_round(self, round_id: int) -> RoundReport:
        trained: dict[str, dict[str, np.ndarray]] = {}

        def load_globals(agent: SiteAgent) -> None:
            agent.model.set_blocks({b: self.global_blocks[b] for b in agent.model.blocks() if b in self.global_blocks})

        offers = self._offers(round_id, self.global_blocks, secure=True, before=load_globals)
        for agent in self.agents:
            if offers[agent.id].declined is None:
                trained[agent.id] = agent.model.get_blocks()
        outcomes: dict[str, BlockOutcome] = {}
        dilute = self.mode == "paper-full-model"
        for block in self.global_blocks:
            holders = [a for a in self.agents if a.id in trained and block in trained[a.id]]
            if not holders:
                continue
            if dilute:  # every site that trained; one without the block sends it back unchanged
                holders = [a for a in self.agents if a.id in trained]
            weights = np.array([a.public_weight or 1 for a in holders], dtype=np.float64)
            mean = sum(w * trained[a.id].get(block, self.global_blocks[block]).astype(np.float64)
                       for w, a in zip(weights, holders)) / weights.sum()
            self.global_blocks[block] = mean.astype(np.float32)
            outcomes[block] = BlockOutcome(block=block, contributors=tuple(a.id for a in holders),
                                           mean_update=None, weight_sum=int(weights.sum()))
        for agent in self.agents:
            agent.model.set_blocks({b: self.global_blocks[b] for b in agent.model.blocks() if b in outcomes})
        return self._finish(round_id, offers, outcomes, {}, take_globals=False)

    def _finish(self, round_id: int, offers: Mapping[str, RoundOffer], outcomes: Mapping[str, BlockOutcome],
                received: Mapping[str, int], take_globals: bool = True) -> RoundReport:
        self.answers[round_id] = {a.id: TRAINED if offers[a.id].declined is None
                                  else (offers[a.id].declined_kind or DECLINED_POLICY) for a in self.agents}
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
             on_setup: Callable[[str], None] | None = None, workers: int = 1) -> SimulationResult:
    """Run the embedded federation over the sites under ``sites_root``.

    Args:
        sites_root: Folder holding ``federation.toml`` and one folder per site.
        rounds: Rounds to run (``None``: the federation file's number).
        out_dir: Where ``metrics.json`` and the final global blocks are written.
        mode: ``blockwise``, ``paper-full-model``, ``full-model`` or ``local`` (``None``: the
            federation file's).
        secure: Secure aggregation or plaintext (``None``: the federation file's, secure by default).
        seed: Seed for the initial block values and, on sites with synthetic data only,
            for DP sampling and noise: such a run is a seeded simulation whose epsilon is
            nominal (ledger and audit log say so). ``None`` (default): noise from the OS
            CSPRNG everywhere. A site without ``[synth]`` never gets seeded noise.
        fresh: Delete the example sites' previous state (ledger, audit log, private blocks)
            first; refused for a site without ``[synth]`` (real data).
        allow_full_model: Required for the two full-model modes.
        on_round: Called after every round (progress display).
        on_setup: Called with a line of text as each site is loaded.
        workers: Train the sites of a round in this many worker processes at once, one
            torch thread each (:mod:`~blossom_secure.runtimes.embedded.training_pool`); at
            most one per site is started. 1 (default): one site after the other in this
            process. Every site's result is the same either way; only the time differs.

    Returns:
        What the run did; its rounds are numbered on from the federation's earlier runs.

    Raises:
        PolicyError: a site, policy or federation file is invalid, two site folders have
            the same site id, or every site's policy would decline every round (for
            example a plaintext run where every policy requires secure aggregation).
        DataError: a site's data cannot be used as declared, or its state folder cannot
            be written.
        RoundCounterError: ``out_dir`` is not a writable folder, its round counter cannot
            be read or is another federation's, or a site has already answered the round
            it would announce first (the counter of another output folder).
        KeyFileError, LedgerError, AuditIntegrityError: a site's key, ledger or audit log
            is unusable.
        StaleRoundError: a site refused a round number it had already answered.

        Each of these except the last is raised before any site records, reserves or
        trains anything.
        ValueError: bad arguments (mode, rounds, workers, full-model without the flag).

    Notes:
        **A round nobody trains ends the run.** When every site declines a round (its
        privacy budget cannot pay for it, or its policy refuses the run), the rounds after
        it are not announced: nothing about the run changes from round to round (the
        public sampling plan spends the same epsilon every round), so none could train,
        and each would only use up a round number and a declined record at every site
        (:attr:`SimulationResult.rounds_not_announced` says how many).

        **Round identity.** A round is named by the federation id and a round number that
        only increases over the life of the federation: the coordinator keeps
        ``next_round`` in ``out_dir/coordinator-state.json``
        (:mod:`blossom_secure.coordinator.counter`), writes it durably before each round
        is announced, and a run continues from it; every site refuses a round number its
        verified audit log shows it already answered.
    """
    sites_root = Path(sites_root)
    federation = load_federation(sites_root / "federation.toml")
    if mode is None and federation.aggregation.mode in FULL_MODEL_MODES and not allow_full_model:
        raise PolicyError([Problem(str(federation.path), "aggregation.mode",
                                   "full-model shares task heads and ignores policies; it needs --allow-full-model")])
    mode = federation.aggregation.mode if mode is None else mode
    secure = federation.aggregation.secure if secure is None else secure
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    if mode in FULL_MODEL_MODES and not allow_full_model:
        raise ValueError("full-model aggregation ignores the sites' policies and shares task heads; "
                         "it runs only in simulation and only with --allow-full-model")
    dirs = site_dirs(sites_root)
    if not dirs:
        raise PolicyError([Problem(str(sites_root), "", "no site folders (each needs a site.toml)")])
    rounds = federation.training.rounds if rounds is None else rounds
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError("workers must be an int of at least 1")
    # Everything below, up to the first round, only reads and checks: a mistake in any
    # site's files, the output folder or the round counter stops the run before any site
    # records, reserves or trains anything.
    configs = _load_sites(dirs, federation)
    if fresh or mode in FULL_MODEL_MODES:
        _check_synthetic(configs, reason="--fresh" if fresh else mode)
    _check_policies_allow(configs, federation, secure=secure if mode == "blockwise" else True,
                          plaintext=mode == "blockwise" and not secure)
    if mode == "blockwise" and secure:
        _check_secagg_terms(federation, roster_size=len(configs))
    out_dir = Path(out_dir)
    counter_path = _check_out_dir(out_dir)
    first_round = read_next_round(counter_path, federation.id)
    _check_writable(configs)
    if not fresh:
        _check_site_state(configs, first_round=first_round, counter_path=counter_path)
        if federation.training.sample_rate is not None:  # a spent budget is said before any data is read
            _check_budgets(configs, None, federation, secure=secure if mode == "blockwise" else True)
    arrays = {}
    data_problems: list[Problem] = []
    for site in configs:
        ensure_site_data(site, federation)
        try:
            arrays[site.id] = load_site_data(site, federation)
        except DataError as exc:
            data_problems.extend(exc.problems)
    if data_problems:
        raise DataError(data_problems)
    if fresh:
        for site in configs:
            reset_site_state(site.root)
    elif federation.training.sample_rate is None:
        _check_budgets(configs, arrays, federation, secure=secure if mode == "blockwise" else True)
    agents = []
    pool = None
    try:
        for site in configs:
            agent = SiteAgent(site.root, federation, seed=seed, arrays=arrays[site.id])
            agents.append(agent)
            if on_setup is not None:
                noise = "seeded simulation (epsilon nominal)" if agent.seeded_noise else "DP noise from the OS CSPRNG"
                on_setup(f"{agent.id}: modalities {'+'.join(agent.config.modalities)}, "
                         f"tasks {', '.join(agent.config.tasks)}; {noise}")
        aggregator = make_aggregator(federation, agents, secure=secure) if mode == "blockwise" else None
        if min(workers, len(agents)) > 1:
            pool = TrainingPool(min(workers, len(agents)))
        coordinator = Coordinator(federation, agents, mode=mode, aggregator=aggregator,
                                  seed=0 if seed is None else seed, pool=pool)
        reports = []
        out_dir.mkdir(parents=True, exist_ok=True)
        not_announced = 0
        for r in range(first_round, first_round + rounds):
            # The round number is used from here on, whatever happens next: durable before
            # any site hears of it, so no later run can announce it again.
            write_next_round(counter_path, federation.id, r + 1)
            report = coordinator.run_round(r)
            reports.append(report)
            if on_round is not None:
                on_round(report, agents)
            if TRAINED not in coordinator.answers[r].values():
                # Every site declined (privacy budget or policy): the plans, budgets and
                # policies do not change during a run, so no later round could train either.
                not_announced = first_round + rounds - r - 1
                if not_announced:
                    logger.warning("no site could train in round %d: the %d round(s) after it are not announced",
                                   r, not_announced)
                break
        metrics_path = out_dir / "metrics.json"
        atomic_write(metrics_path, json.dumps(_metrics_document(federation, agents, reports, mode=mode,
                                                                secure=secure and mode == "blockwise", seed=seed),
                                              indent=1).encode() + b"\n")
        save_arrays_npz(out_dir / "global_blocks.npz", coordinator.global_blocks)
    finally:
        if pool is not None:
            pool.close()
        for agent in agents:
            agent.audit.close()
    return SimulationResult(rounds=reports, out_dir=out_dir, metrics_path=metrics_path,
                            answers={r: dict(a) for r, a in coordinator.answers.items()},
                            rounds_not_announced=not_announced)


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
        "round_ids": [r.round_id for r in reports],
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


def _load_sites(dirs: list[Path], federation: FederationConfig) -> list[SiteConfig]:
    """Every site file, checked together; two folders with the same site id are refused
    (naming both), before any site is started."""
    from blossom_secure.site.config import load_site

    problems: list[Problem] = []
    configs: list[SiteConfig] = []
    for d in dirs:
        try:
            configs.append(load_site(d, federation=federation))
        except PolicyError as exc:
            problems.extend(exc.problems)
    seen: dict[str, SiteConfig] = {}
    for site in configs:
        if site.id in seen:
            problems.append(Problem(str(site.root / "site.toml"), "site.id",
                                    f"{site.id!r} is also the id of {seen[site.id].root / 'site.toml'}; every site "
                                    "of a federation needs its own id (and its own folder, key, ledger and audit log)"))
        else:
            seen[site.id] = site
    if problems:
        raise PolicyError(list(dict.fromkeys(problems)))  # a policy shared by sites: each problem once
    return configs


def _check_synthetic(configs: list[SiteConfig], *, reason: str) -> None:
    problems = [Problem(str(site.root / "site.toml"), "synth",
                        f"{reason} is only for example sites with synthetic data ([synth] section)")
                for site in configs if site.synth is None]
    if problems:
        raise PolicyError(problems)


def _check_policies_allow(configs: list[SiteConfig], federation: FederationConfig, *, secure: bool,
                          plaintext: bool) -> None:
    """Refuse a run in which every site's policy would decline every round (nothing could
    train): an input mistake, reported before anything starts. Sites that would decline
    while others can train are warned about; the run goes on without them."""
    refusals = {site.id: policy_refusal(site, federation, secure=secure) for site in configs}
    if all(refusals.values()):
        hint = "; run without --plaintext (secure aggregation)" if plaintext and any(
            site.policy.secure_aggregation_required for site in configs) else ""
        raise PolicyError([Problem(str(site.policy.path), "", f"site {site.id!r} would decline every round: "
                                                              f"{refusals[site.id]}{hint}")
                           for site in configs])
    for site_id, reason in refusals.items():
        if reason is not None:
            logger.warning("site %s will decline every round: %s", site_id, reason)


def _check_secagg_terms(federation: FederationConfig, *, roster_size: int) -> None:
    from blossom_secure.secagg.terms import secagg_params

    try:
        secagg_params(federation, roster_size=roster_size)
    except ValueError as exc:
        raise PolicyError([Problem(str(federation.path), "aggregation", str(exc))]) from None


def _check_out_dir(out_dir: Path) -> Path:
    """The round counter's path in ``out_dir``, after checking that the folder is, or can
    be made, a writable folder (it is made just before the first round)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RoundCounterError([Problem(str(out_dir), "", "--out must be a folder, and this is a file")])
    reason = unwritable_reason(out_dir, (COORDINATOR_STATE_FILE, "metrics.json", "global_blocks.npz"))
    if reason is not None:
        raise RoundCounterError([Problem(str(out_dir), "", f"--out cannot be written: {reason}")])
    for name in ("metrics.json", "global_blocks.npz", COORDINATOR_STATE_FILE):
        if (out_dir / name).is_dir():
            raise RoundCounterError([Problem(str(out_dir / name), "", "is a folder; the run writes a file here")])
    return out_dir / COORDINATOR_STATE_FILE


def _check_writable(configs: list[SiteConfig]) -> None:
    """Every site folder's state (and key folder) can be written: refused up front, not
    half-way through a round."""
    from blossom_secure.audit.log import checkpoint_path
    from blossom_secure.site.config import AUDIT_FILE, BLOCKS_FILE, LEDGER_FILE

    problems = []
    for site in configs:
        files = (AUDIT_FILE, checkpoint_path(Path(AUDIT_FILE)).name, LEDGER_FILE, BLOCKS_FILE)
        reason = unwritable_reason(site.state_dir, files)
        if reason is None and not (site.keys_dir / IDENTITY_KEY_FILE).exists():
            reason = unwritable_reason(site.keys_dir)
        if reason is not None:
            problems.append(Problem(str(site.root), "state", f"the site's state cannot be written: {reason}"))
    if problems:
        raise DataError(problems)


class FederationBudgetExhaustedError(PrivacyBudgetExceededError):
    """No site that may join can afford another round within its privacy budget, so
    nothing would be trained (raised before anything is recorded or reserved).

    Attributes:
        sites: Site id -> ``(epsilon_spent, epsilon_requested, epsilon_budget)``.
    """

    def __init__(self, sites: Mapping[str, tuple[float, float, float]]) -> None:
        self.sites = dict(sites)
        first = next(iter(self.sites.values()))
        self.epsilon_spent, self.epsilon_requested, self.epsilon_budget = first
        listing = "; ".join(f"{site}: spent {spent:.3f}, another round would bring it to {requested:.3f}, over its "
                            f"budget {budget:g}" for site, (spent, requested, budget) in self.sites.items())
        BlossomError.__init__(self, f"privacy budget: no site can afford another round ({listing}); nothing was "
                                    "trained (see `blossom-site budget`)")


def _check_budgets(configs: list[SiteConfig], arrays: Mapping[str, Any] | None, federation: FederationConfig, *,
                   secure: bool) -> None:
    """Refuse, before anything is recorded, a run in which every site that may join is
    already at its budget: each would only decline. The plan is the one the site agent
    makes (:func:`~blossom_secure.site.training.plan_round`). ``arrays`` (the sites' data)
    may be ``None`` when the federation declares public sampling: the plan then does not
    depend on any site's data, so the check runs before any data is read."""
    from blossom_secure.site.config import LEDGER_FILE
    from blossom_secure.site.data import split_holdout
    from blossom_secure.site.ledger import PrivacyLedger
    from blossom_secure.site.training import plan_round

    training = federation.training
    exhausted: dict[str, tuple[float, float, float]] = {}
    for site in configs:
        if policy_refusal(site, federation, secure=secure) is not None:
            continue
        if arrays is None:  # public sampling: any positive count gives the same plan
            n_train = 1
        else:
            train_idx, _ = split_holdout(arrays[site.id].patient_ids, fraction=training.holdout_fraction,
                                         seed=training.split_seed)
            n_train = int(train_idx.size)
        plan = plan_round(n_train, batch_size=training.batch_size, epochs=training.local_epochs,
                          terms=site.policy.privacy, sample_rate=training.sample_rate,
                          steps_per_round=training.steps_per_round)
        ledger = PrivacyLedger(site.state_dir / LEDGER_FILE, site_id=site.id, terms=site.policy.privacy)
        requested = ledger.projected_epsilon(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                             steps=plan.steps)
        if requested <= site.policy.privacy.epsilon_budget:
            return  # this site can train: the federation goes on (others may decline)
        exhausted[site.id] = (ledger.epsilon_spent, requested, site.policy.privacy.epsilon_budget)
    if exhausted:
        raise FederationBudgetExhaustedError(exhausted)


def _check_site_state(configs: list[SiteConfig], *, first_round: int, counter_path: Path) -> None:
    """Each site's key, verified audit log and ledger, read (never written) before any site
    starts; the first round number must be new to every site.

    Raises:
        KeyFileError: a site's key is unusable.
        AuditIntegrityError: a site's audit log does not verify.
        LedgerError: a site's ledger is unreadable or behind its audit log.
        RoundCounterError: a site's audit log shows it already answered ``first_round``
            or a later round (the counter of another coordinator folder?).
    """
    from blossom_secure.audit import log as audit
    from blossom_secure.site.config import AUDIT_FILE, LEDGER_FILE
    from blossom_secure.site.keys import load_identity_key
    from blossom_secure.site.ledger import load_reconciled_ledger

    answered: dict[str, int] = {}
    for site in configs:
        log_path = site.state_dir / AUDIT_FILE
        if not (site.keys_dir / IDENTITY_KEY_FILE).exists():
            continue  # a new site: its key and log are created when it starts
        if not log_path.exists() and not audit.checkpoint_path(log_path).exists():
            continue
        public_key = identity_public_key(load_identity_key(site.keys_dir))
        _, records = audit.read_verified_records(log_path, public_key=public_key)
        load_reconciled_ledger(site.state_dir / LEDGER_FILE, site_id=site.id, terms=site.policy.privacy,
                               records=records, audit_file=str(log_path))
        last = last_round_answered(records)
        if last is not None and last >= first_round:
            answered[site.id] = last
    if answered:
        sites = ", ".join(f"{s} (round {r})" for s, r in sorted(answered.items()))
        raise RoundCounterError([Problem(
            str(counter_path), "next_round",
            f"this coordinator would announce round {first_round}, but these sites' signed audit logs show they "
            f"already answered a round as late as: {sites}; a site never answers a round number twice. Run with "
            "the --out folder of this federation's earlier runs (it keeps the round counter), or with --fresh "
            "(example sites only)")])


def reset_site_state(site_dir: Path) -> None:
    """Delete the files of a synthetic site's ``state/`` folder (``--fresh``; example sites only)."""
    state = site_dir / "state"
    if state.is_dir():
        for child in sorted(state.iterdir()):
            if child.is_file():
                child.unlink()
