"""The site agent: one hospital's side of a federation round.

It holds the data, the private blocks, the identity key, the policy, the privacy ledger
and the audit log, and it only ever answers the coordinator's round announcements. A
round at a site:

1. check the round against the policy (federation, secure aggregation required) and the
   privacy ledger; decline with a logged reason if either says no;
2. reserve the round's privacy spend in the ledger (durable) **before** training;
3. load the global values of the blocks it shares, train every block under DP-SGD;
4. hand the egress guard its updates; only what the policy allows can be sent, and every
   message is written to the audit log before it leaves;
5. take the aggregated blocks back, keep its private blocks, evaluate on its held-out split.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from blossom_secure.audit import log as audit
from blossom_secure._fs import load_arrays_npz, save_arrays_npz
from blossom_secure.exchange import BlockOutcome, Contribution
from blossom_secure.blocks import is_head
from blossom_secure.config import FederationConfig
from blossom_secure.site.config import AUDIT_FILE, BLOCKS_FILE, LEDGER_FILE, SiteConfig, load_site, policy_refusal
from blossom_secure.crypto import IdentityKey, identity_public_key, key_fingerprint
from blossom_secure.site.data import SiteArrays, load_site_data, split_holdout
from blossom_secure.site.dp_random import OS_CSPRNG, SEEDED_SIMULATION, DPRandomness
from blossom_secure.site.egress import EGRESS_RECIPIENT, egress_block_bytes, select_egress, select_report
from blossom_secure.errors import PrivacyBudgetExceededError
from blossom_secure.site.keys import load_or_create_identity_key
from blossom_secure.model import BlockModel
from blossom_secure.site.ledger import LedgerEntry, PrivacyLedger, load_reconciled_ledger
from blossom_secure.site.round_identity import ANSWER_EVENTS, StaleRoundError, check_round_is_new, last_round_answered
from blossom_secure.site.training import (
    RoundPlan,
    SiteTensors,
    TrainResult,
    evaluate,
    plan_round,
    train_dp,
    train_without_dp_simulation_only,
)

__all__ = ["PendingTraining", "RoundOffer", "SiteAgent", "TrainingTerms", "ensure_site_data", "train_pending"]

logger = logging.getLogger(__name__)

#: The only reasons a site's report gives for sitting a round out (the detail stays in its audit log).
DECLINED_POLICY = "policy"
DECLINED_BUDGET = "privacy budget"

_SECAGG_STAGES = ("advertise_keys", "share_keys", "masked_input", "consistency", "unmask")



def ensure_site_data(site: SiteConfig, federation: FederationConfig) -> bool:
    """Generate an example site's synthetic data on first use. Returns whether it did.

    Only sites whose file has a ``[synth]`` section are generated; a real site's missing
    data is an error reported by the data loader.
    """
    if site.synth is None:
        return False
    have_csv = site.clinical_csv.exists()
    have_dicom = site.dicom_dir is None or site.dicom_dir.exists()
    if have_csv and have_dicom:
        return False
    from blossom_secure.site.synth import generate_site_data

    layout = federation.layout
    generate_site_data(
        site.root,
        federation_seed=federation.synth_seed,
        site_seed=site.synth.seed,
        patients=site.synth.patients,
        modalities=site.modalities,
        image_fraction=site.synth.image_fraction if "image" in site.modalities else 0.0,
        tabular_fraction=site.synth.tabular_fraction if "tabular" in site.modalities else 0.0,
        tabular_features=layout.tabular.features,
        tasks=site.tasks,
        num_classes={t: layout.tasks[t] for t in site.tasks},
        image_spatial_dims=layout.image.spatial_dims,
        image_size=layout.image.size,
        shift=site.synth.shift,
        compression=site.synth.compression,
        patient_prefix=site.id,
    )
    return True


@dataclass
class RoundOffer:
    """A site's answer to a round announcement: a contribution, or a reason to decline."""

    site_id: str
    contribution: Contribution | None
    declined: str | None = None
    epsilon_total: float = 0.0
    train_loss: float | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    epsilon_nominal: bool = False
    declined_kind: str | None = None  # DECLINED_POLICY or DECLINED_BUDGET: what a report may say


@dataclass
class PendingTraining:
    """A round a site joined whose training has not run yet (:meth:`SiteAgent.begin_offer`).

    Attributes:
        round_id: The round.
        start: The global values of the shared blocks the training starts from.
        plan: The round's DP-SGD plan, already reserved in the ledger (``None``: a
            simulation without DP).
        entry: The ledger's reservation (``None`` without DP).
        spent_before: Epsilon spent before the round.
        randomness: Where the round's DP noise comes from (``os-csprng`` or
            ``seeded-simulation``), as the ledger recorded it; the training draws its noise
            from that source (:class:`TrainingTerms`).
    """

    round_id: int
    start: dict[str, np.ndarray]
    plan: RoundPlan | None
    entry: LedgerEntry | None
    spent_before: float
    randomness: str


@dataclass(frozen=True)
class TrainingTerms:
    """How to run one site's training of one round, as plain values (for
    :func:`train_pending` in another process). ``seeded_noise_seed`` is the simulation
    seed when the round's DP randomness is a seeded simulation; otherwise the noise comes
    from the OS CSPRNG of the process that trains. ``plain_seed`` is set for a simulation
    without DP only."""

    site_id: str
    round_id: int
    plan: RoundPlan | None
    max_grad_norm: float
    learning_rate: float
    momentum: float
    epochs: int
    batch_size: int
    max_physical_batch_size: int | None
    seeded_noise_seed: int | None
    plain_seed: int | None
    frozen: tuple[str, ...] = ()


def train_pending(model: BlockModel, data: SiteTensors, terms: TrainingTerms) -> TrainResult:
    """Run a site's training of a round from its :class:`TrainingTerms` on ``model`` (in
    place) and its training split ``data``: what :meth:`SiteAgent.train` runs, and what a
    process holding a copy of the site's model and data runs. The noise is drawn from the
    OS CSPRNG of the process that trains unless ``terms`` carries a simulation seed (a
    seeded round on synthetic data only)."""
    if terms.plan is None:
        return train_without_dp_simulation_only(model, data, epochs=terms.epochs, batch_size=terms.batch_size,
                                                learning_rate=terms.learning_rate, momentum=terms.momentum,
                                                seed=terms.plain_seed, frozen=terms.frozen)
    if terms.seeded_noise_seed is not None:
        randomness = DPRandomness.seeded_simulation(terms.seeded_noise_seed, site_id=terms.site_id,
                                                    round_id=terms.round_id)
    else:
        randomness = DPRandomness.from_os_csprng()
    return train_dp(model, data, terms.plan, max_grad_norm=terms.max_grad_norm, learning_rate=terms.learning_rate,
                    momentum=terms.momentum, randomness=randomness,
                    max_physical_batch_size=terms.max_physical_batch_size, frozen=terms.frozen)


class SiteAgent:
    """One hospital's agent.

    Args:
        site_dir: The site folder (``site.toml``, its data, ``keys/``, ``state/``).
        federation: The federation file's contents.
        seed: Base seed for a reproducible simulation; ``None`` in a deployment. It seeds
            the DP noise and sampling **only for a site with synthetic data** (a
            ``[synth]`` section or ``data_origin = "synthetic"``, or a public benchmark,
            ``data_origin = "public-benchmark"``), and such a site's ledger and audit log then mark every
            epsilon as nominal. On any other site the noise always comes from the OS
            CSPRNG, whatever seed is given (the seed then only fixes the initial values
            of the private blocks, which do not depend on patient data).
        simulation_without_dp: **Simulation only.** Train without differential privacy
            (no clipping, no noise; :func:`~blossom_secure.site.training.train_without_dp_simulation_only`)
            to measure what DP costs in a benchmark. Nothing is written to the privacy
            ledger, no ``training_finished`` record is written to the audit log (there is
            no privacy spend to record), and the round's ``epsilon_total`` is reported as
            infinity. It needs an explicit ``seed`` (a deployment passes ``None``) and no
            policy or site file can ask for it.
        arrays: The site's data, already loaded with :func:`~blossom_secure.site.data.load_site_data` from this site
            file (a runtime that checks every site's data before it starts any);
            ``None``: loaded here.

    Raises:
        PolicyError: the site file or policy is invalid.
        DataError: the data cannot be used as declared.
        KeyFileError, LedgerError, AuditIntegrityError: the site's state is unusable
            (``LedgerError`` also when the ledger is behind the verified audit log:
            deleted or restored from an older copy; ``blossom-site ledger rebuild``).
        ValueError: ``simulation_without_dp`` without a simulation seed.
    """

    def __init__(self, site_dir: Path, federation: FederationConfig, *, seed: int | None = None,
                 simulation_without_dp: bool = False, arrays: SiteArrays | None = None) -> None:
        if simulation_without_dp and seed is None:
            raise ValueError("training without differential privacy is for seeded simulations only")
        self.simulation_without_dp = bool(simulation_without_dp)
        self.federation = federation
        self.config: SiteConfig = load_site(site_dir, federation=federation)
        self.id = self.config.id
        self.policy = self.config.policy
        self.seed = seed
        #: Whether DP noise and sampling are seeded (a simulation on synthetic data only).
        self.seeded_noise = seed is not None and self.config.may_seed_dp_noise
        #: Blocks this site's training keeps as they are (local fine-tuning of the others,
        #: as in the study's FedAvg + fine-tuning baseline); empty: every block trains.
        self.frozen_blocks: tuple[str, ...] = ()
        if seed is not None and not self.seeded_noise:
            logger.warning("site %s holds patient data (no [synth] section, no data_origin): its DP noise is drawn "
                           "from the OS CSPRNG, not from the simulation seed", self.config.id)
        if arrays is None:
            ensure_site_data(self.config, federation)
            arrays = load_site_data(self.config, federation)
        self.arrays = arrays
        self.train_idx, self.test_idx = split_holdout(self.arrays.patient_ids,
                                                      fraction=federation.training.holdout_fraction,
                                                      seed=federation.training.split_seed)
        self.tensors = SiteTensors.from_arrays(self.arrays, federation.layout)
        self.identity_key: IdentityKey
        self.identity_key, created = load_or_create_identity_key(self.config.keys_dir)
        self.public_key = identity_public_key(self.identity_key)
        state = self.config.state_dir
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.audit = audit.AuditLog.open(state / AUDIT_FILE, site_id=self.id, signing_key=self.identity_key)
        try:
            self.ledger = self._reconciled_ledger()
        except BaseException:
            self.audit.close()
            raise
        if created or self.audit.last_seq is None:
            self._record(audit.SITE_INITIALISED, None, {"key_fingerprint": key_fingerprint(self.public_key)})
        self._record(audit.POLICY_LOADED, None, {
            "policy_sha256": self.policy.sha256, "policy_file": self.policy.path.name,
            "shareable": sorted(b for b in self.config.blocks if self.policy.is_shareable(b)),
        })
        self._init_private_blocks()
        self._block_sizes = self.model.block_sizes()
        self._sent: dict[int, list[str]] = {}

    # -- state ---------------------------------------------------------------------------------

    def _init_private_blocks(self) -> None:
        """Private initial values from the site's own seed, or the saved blocks."""
        torch.manual_seed(_derive_seed(self.seed, self.id, -1))
        self.model = BlockModel(self.federation.layout, self.config.modalities, tuple(self.config.tasks))
        saved = self.config.state_dir / BLOCKS_FILE
        if saved.exists():
            blocks = load_arrays_npz(saved)
            self.model.set_blocks({k: v for k, v in blocks.items() if k in self.model.blocks()})

    def save_blocks(self) -> Path:
        """Write every block of the site's model (private ones included) to its state folder."""
        path = self.config.state_dir / BLOCKS_FILE
        save_arrays_npz(path, self.model.get_blocks())
        return path

    @property
    def shared_blocks(self) -> tuple[str, ...]:
        """The blocks this site contributes: those its policy lets leave (never a head) and,
        where the federation file declares a public group for a block, only if this site is
        a member of it. Decided from the public files before the site trains or reserves
        budget, so no contribution is refused later in the protocol for it."""
        groups = self.federation.aggregation.groups
        return tuple(b for b in self.config.blocks if self.policy.is_shareable(b) and not is_head(b)
                     and (b not in groups or self.id in groups[b]))

    @property
    def n_train(self) -> int:
        return int(self.train_idx.size)

    # -- the round -----------------------------------------------------------------------------

    def offer(self, *, round_id: int, global_blocks: Mapping[str, np.ndarray], secure: bool,
              coordinator: str | None = None) -> RoundOffer:
        """Answer round ``round_id``: train and offer the shareable updates, or decline.

        The three steps :meth:`begin_offer`, :meth:`train` and :meth:`complete_offer` in a
        row (a runtime that trains several sites at once calls them itself).
        """
        answer = self.begin_offer(round_id=round_id, global_blocks=global_blocks, secure=secure,
                                  coordinator=coordinator)
        if isinstance(answer, RoundOffer):
            return answer
        try:
            outcome: TrainResult | BaseException = self.train(answer)
        except BaseException as exc:  # noqa: BLE001 - recorded and raised again by complete_offer
            outcome = exc
        return self.complete_offer(answer, outcome)

    def begin_offer(self, *, round_id: int, global_blocks: Mapping[str, np.ndarray], secure: bool,
                    coordinator: str | None = None) -> RoundOffer | PendingTraining:
        """Answer round ``round_id`` up to its training: decline (a :class:`RoundOffer`), or
        join: reserve the round's privacy spend, record ``round_joined`` and load the global
        values of the shared blocks, and return what :meth:`train` and
        :meth:`complete_offer` need (a :class:`PendingTraining`).

        ``coordinator`` is the address this site is connected to (a deployed site: its own
        ``join`` command's ``--coordinator``); ``None`` means the federation file's
        ``coordinator`` (the embedded runtime). The policy must list it either way.

        An error after the site joined is written to the audit log (``error``) and raised.
        First the ledger is read again and checked against the verified audit log; a
        ledger behind the log raises ``LedgerError`` (and a log that no longer verifies,
        ``AuditIntegrityError``) before anything is recorded or reserved. Then the round
        number is checked against the same verified log: a round this site already
        joined or declined (or one before it) raises ``StaleRoundError``, recorded as an
        ``error``, before anything is reserved
        (:func:`~blossom_secure.site.round_identity.check_round_is_new`, the check the
        deployed site steps make).
        """
        self.ledger, records = self._reconciled_ledger_and_records()
        try:
            check_round_is_new(records, round_id)
        except StaleRoundError as exc:
            self._record_error(None, exc)
            raise
        reason = self.refusal(secure=secure, coordinator=coordinator)
        kind = DECLINED_POLICY
        entry = plan = None
        spent_before = self.ledger.epsilon_spent
        randomness = SEEDED_SIMULATION if self.seeded_noise else OS_CSPRNG
        if reason is None and not self.simulation_without_dp:
            training = self.federation.training
            plan = plan_round(self.n_train, batch_size=training.batch_size, epochs=training.local_epochs,
                              terms=self.policy.privacy, sample_rate=training.sample_rate,
                              steps_per_round=training.steps_per_round)
            try:
                entry = self.ledger.reserve(round_id=round_id, noise_multiplier=plan.noise_multiplier,
                                            sample_rate=plan.sample_rate, steps=plan.steps,
                                            randomness=randomness)
            except PrivacyBudgetExceededError as exc:
                reason = str(exc)
                kind = DECLINED_BUDGET
        if reason is not None:
            logger.info("site %s declines round %d: %s", self.id, round_id, reason)
            self._record(audit.ROUND_DECLINED, round_id, {"reason": reason})
            return RoundOffer(site_id=self.id, contribution=None, declined=reason, declined_kind=kind,
                              epsilon_total=self.ledger.epsilon_spent, epsilon_nominal=self.ledger_is_nominal)
        self._record(audit.ROUND_JOINED, round_id, {"blocks_offered": list(self.shared_blocks)})
        try:
            start = {b: np.asarray(global_blocks[b], dtype=np.float32) for b in self.shared_blocks
                     if b in global_blocks}
            self.model.set_blocks(start)
        except BaseException as exc:  # an interrupt too: the log says why the round has no training record
            self._record_error(round_id, exc)
            raise
        return PendingTraining(round_id=round_id, start=start, plan=plan, entry=entry, spent_before=spent_before,
                               randomness=randomness)

    def train(self, pending: PendingTraining) -> TrainResult:
        """Run the training of a round :meth:`begin_offer` joined, on this site's model, in
        this process (:func:`train_pending` does the same in another process)."""
        return train_pending(self.model, self.tensors.subset(self.train_idx), self.training_terms(pending))

    def training_terms(self, pending: PendingTraining) -> TrainingTerms:
        """Everything the training of ``pending`` needs but the model and the data, as
        plain values another process can rebuild it from (:func:`train_pending`)."""
        training = self.federation.training
        return TrainingTerms(
            site_id=self.id, round_id=pending.round_id, plan=pending.plan,
            max_grad_norm=self.policy.privacy.max_grad_norm, learning_rate=training.learning_rate,
            momentum=training.momentum, epochs=training.local_epochs, batch_size=training.batch_size,
            max_physical_batch_size=training.max_physical_batch_size,
            seeded_noise_seed=self.seed if pending.randomness == SEEDED_SIMULATION else None,
            plain_seed=_derive_seed(self.seed, self.id, pending.round_id) if pending.plan is None else None,
            frozen=tuple(self.frozen_blocks))

    def complete_offer(self, pending: PendingTraining, outcome: TrainResult | BaseException) -> RoundOffer:
        """Finish a round joined with :meth:`begin_offer` once its training has run:
        ``outcome`` is the training's result (the model already holds the trained blocks)
        or the exception it raised (recorded as an ``error`` and raised again)."""
        round_id, plan, entry = pending.round_id, pending.plan, pending.entry
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            result = outcome
            if plan is None:
                epsilon_total = math.inf
            else:
                epsilon_total = entry.epsilon_total
                self._record(audit.TRAINING_FINISHED, round_id, {
                    "randomness": pending.randomness, "epsilon_is_nominal": pending.randomness != OS_CSPRNG,
                    "sampling": plan.sampling,
                    "steps": result.steps, "epsilon_round": max(0.0, entry.epsilon_total - pending.spent_before),
                    "epsilon_total": entry.epsilon_total, "delta": self.policy.privacy.delta,
                    "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                    "accountant": self.policy.privacy.accountant,
                    "max_grad_norm": self.policy.privacy.max_grad_norm,
                })
            updates = {b: self.model.get_block(b) - pending.start[b] for b in pending.start}
            egress = select_egress(self.policy, updates)
        except BaseException as exc:  # an interrupt too: the log says why the round has no training record
            self._record_error(round_id, exc)
            raise
        contribution = Contribution(egress=egress, weight=self.public_weight,
                                    min_contributors=self.policy.min_contributors)
        return RoundOffer(site_id=self.id, contribution=contribution, epsilon_total=epsilon_total,
                          train_loss=result.mean_loss, shapes=egress.shapes(),
                          epsilon_nominal=self.ledger_is_nominal)

    @property
    def public_weight(self) -> int | None:
        """The weight of this site's contributions: the public number the federation file
        declares (``[weighting]``), never the exact count of its patients."""
        return self.federation.weighting.weight_of(self.id)

    @property
    def ledger_is_nominal(self) -> bool:
        """Whether any round in the ledger was a seeded simulation (its epsilon is then nominal)."""
        return any(e.is_nominal for e in self.ledger.entries)

    def refusal(self, *, secure: bool, coordinator: str | None = None) -> str | None:
        """Why this site refuses to join a round, or ``None`` (:func:`~blossom_secure.site.config.policy_refusal`)."""
        return policy_refusal(self.config, self.federation, secure=secure, coordinator=coordinator)

    def _record_error(self, round_id: int | None, exc: BaseException) -> None:
        """Best effort: an ``error`` record for ``exc`` (never masks the original error).
        An interrupt (``KeyboardInterrupt``, ``SystemExit``) is recorded as such."""
        if isinstance(exc, Exception):
            message = str(exc)[:1000] or type(exc).__name__
        else:
            message = f"interrupted ({type(exc).__name__}) during the round"
        try:
            self._record(audit.ERROR, round_id, {"message": message, "error_type": type(exc).__name__})
        except Exception:  # noqa: BLE001 - the original error is what the caller must see
            logger.exception("site %s could not record an error in its audit log", self.id)

    def record_egress(self, round_id: int, message_type: str, blocks: tuple[str, ...], payload: bytes) -> None:
        """Write the audit record of one outbound message. Raises if it cannot be made
        durable; the caller then must not send."""
        self._sent.setdefault(round_id, []).append(message_type)
        details = {
            "message_type": message_type, "blocks": list(blocks),
            "shapes": {b: [self._block_sizes[b]] for b in blocks},
            "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "recipient": EGRESS_RECIPIENT,
        }
        block_bytes = egress_block_bytes(message_type, tuple(blocks), self._block_sizes, len(payload),
                                         ring_bits=self.federation.aggregation.ring_bits)
        if block_bytes is not None:
            details["block_bytes"] = block_bytes
        self._record(audit.EGRESS, round_id, details)

    def record_secagg_outcome(self, round_id: int, *, error: str | None) -> None:
        """Record, after a secure-aggregation round, each stage this site completed (sent
        its message for), and the abort with its reason if the protocol stopped it."""
        stages = [m.removeprefix("secagg.") for m in self._sent.pop(round_id, []) if m.startswith("secagg.")]
        for stage in dict.fromkeys(stages):
            self._record(audit.SECAGG_STAGE_COMPLETED, round_id, {"stage": stage})
        if error is not None:
            head = error.split(":", 1)[0].strip()
            stage = head if head in _SECAGG_STAGES else "unknown"
            self._record(audit.SECAGG_ABORTED, round_id, {"stage": stage, "reason": error})

    def finish_round(self, *, round_id: int, outcomes: Mapping[str, BlockOutcome],
                     global_blocks: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
        """Take the new global values of the shared blocks that were aggregated with this
        site's update; keep local values otherwise; save; evaluate on the held-out split."""
        new = {b: global_blocks[b] for b in self.shared_blocks
               if b in outcomes and outcomes[b].failure is None and self.id in outcomes[b].contributors}
        self.model.set_blocks(new)
        self.save_blocks()
        return self.evaluate()

    def round_report(self, *, round_id: int, offer: RoundOffer,
                     metrics: Mapping[str, Mapping[str, float]]) -> bytes | None:
        """The round report this site sends to the coordinator, or ``None`` if its policy
        keeps metrics in. It passes the egress guard
        (:func:`~blossom_secure.site.egress.select_report`) and is written to the audit log
        before it is returned; the coordinator learns nothing else about the round's
        evaluation.

        Raises:
            AuditIntegrityError, OSError: the egress record could not be made durable (the
                report must then not be sent).
        """
        report = select_report(
            self.policy, site_id=self.id, round_id=round_id,
            declined=offer.declined_kind if offer.declined else None, tasks=metrics,
            majority_class_rate={t: self.chance_accuracy(t) for t in metrics},
            epsilon_total=None if self.simulation_without_dp else offer.epsilon_total,
            epsilon_nominal=offer.epsilon_nominal)
        if report is None:
            return None
        self.record_egress(round_id, "report", (), report.payload)
        return report.payload

    def evaluate(self) -> dict[str, dict[str, float]]:
        return evaluate(self.model, self.tensors.subset(self.test_idx))

    def chance_accuracy(self, task: str) -> float:
        """Accuracy of always predicting the most common training label, on the held-out
        split: the floor a model must beat to have learned anything."""
        y_train = self.arrays.labels[task][self.train_idx]
        y_test = self.arrays.labels[task][self.test_idx]
        y_train, y_test = y_train[y_train >= 0], y_test[y_test >= 0]
        if y_train.size == 0 or y_test.size == 0:
            return float("nan")
        return float((y_test == np.bincount(y_train).argmax()).mean())

    def _reconciled_ledger(self) -> PrivacyLedger:
        """The ledger file, checked to hold every round the verified audit log proves.

        Raises:
            LedgerError: the ledger is unreadable, or behind the audit log (deleted or
                restored from an older copy); nothing is written.
            AuditIntegrityError: the audit log no longer verifies.
        """
        return self._reconciled_ledger_and_records()[0]

    def _reconciled_ledger_and_records(self) -> tuple[PrivacyLedger, list[dict]]:
        """:meth:`_reconciled_ledger`, and the verified records it was checked against
        (``training_finished``, ``round_joined`` and ``round_declined``), from one read."""
        _, records = self.audit.verified_records(events=(audit.TRAINING_FINISHED, *ANSWER_EVENTS))
        ledger = load_reconciled_ledger(self.config.state_dir / LEDGER_FILE, site_id=self.id,
                                        terms=self.policy.privacy, records=records, audit_file=str(self.audit.path))
        return ledger, records

    def last_round_answered(self) -> int | None:
        """The last round this site's verified audit log shows it joined or declined."""
        _, records = self.audit.verified_records(events=ANSWER_EVENTS)
        return last_round_answered(records)

    def _record(self, event: str, round_id: int | None, details: dict) -> None:
        self.audit.append(event, round_id=round_id, details=details, policy_sha256=self.policy.sha256)


def _derive_seed(base: int | None, site_id: str, round_id: int) -> int:
    material = f"{base}|{site_id}|{round_id}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "little") >> 1
