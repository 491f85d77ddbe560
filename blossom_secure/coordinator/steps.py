"""The coordinator's round over any transport that moves bytes to sites and back.

:class:`RoundCoordinator` runs the embedded runtime's round (announce with the global
blocks, secure aggregation per block group with the same
:class:`~blossom_secure.secagg.coordinator.CoordinatorStageMachine`, the new global
blocks, the sites' reports), but every exchange goes through a ``send`` callable::

    send(stage, {site_id: request_bytes}) -> {site_id: reply_bytes}

A site missing from the answer did not reply in time: it has dropped, and the round goes
on without it as long as the public thresholds allow. ``send`` is the whole transport:
Flower's Grid in the deployment runtime (:mod:`blossom_secure.runtimes.flower.apps`), a
function call or a subprocess per request in the tests. The result is the embedded
runtime's :class:`~blossom_secure.coordinator.rounds.RoundReport` and ``metrics.json`` structure.

The coordinator authenticates each reply with the roster key of the site it claims to come
from (:func:`blossom_secure.wire.decode_reply`): the transport's labels
are routing hints only. Reports are size-limited and checked before they are read.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor

import numpy as np

from blossom_secure._system import available_cores, worker_context
from blossom_secure.exchange import BlockOutcome
from blossom_secure.config import FederationConfig
from blossom_secure.errors import BlossomError, PolicyError, Problem, ProtocolError
from blossom_secure.coordinator.rounds import RoundReport, initial_global_blocks, site_report_view
from blossom_secure import wire
from blossom_secure.secagg import CoordinatorStageMachine
from blossom_secure.secagg.errors import InconsistentMessageError, MalformedMessageError
from blossom_secure.secagg.messages import AdvertiseKeys, decode_site_message
from blossom_secure.secagg.terms import block_outcome, federation_sha256, secagg_params

__all__ = ["MAX_REPORT_BYTES", "RoundCoordinator", "SendFn", "metrics_document", "unmask_pool"]

logger = logging.getLogger(__name__)

#: ``send(stage, {site: request}) -> {site: reply}``; a site missing from the result dropped.
SendFn = Callable[[str, Mapping[str, bytes]], Mapping[str, bytes]]

#: Longest round report read from a site.
MAX_REPORT_BYTES = 64 * 1024
_REPORT_FIELDS = frozenset({"type", "version", "site", "round", "declined", "tasks", "epsilon_total",
                            "epsilon_nominal"})
_TASK_FIELDS = frozenset({"accuracy", "macro_f1", "majority_class_rate"})
_DECLINED = (None, "policy", "privacy budget")


def unmask_pool(cores: int | None = None) -> tuple[ProcessPoolExecutor | None, int]:
    """A process pool for the coordinator's unmasking on ``cores`` cores (default: every
    core this process may use), and the parts to split each block's masks into (one per
    core): ``(None, 1)`` on one core.

    The workers start from a fork server (spawned where there is none) that imports only
    the unmasking code, on first use: a round whose blocks have too few masks to split
    (:mod:`blossom_secure.secagg.unmasking`) never starts one. Shut it down with
    ``shutdown()``.
    """
    if cores is None:
        cores = available_cores()
    if cores < 2:
        return None, 1
    return ProcessPoolExecutor(max_workers=cores - 1, mp_context=worker_context(["blossom_secure.secagg.unmasking"])), cores


class RoundCoordinator:
    """The coordinator of a deployed federation: the global shared blocks and the rounds.

    Args:
        federation: The federation file.
        roster: Site id to raw Ed25519 public key (the roster file).
        seed: Seed of the initial global blocks (public: they hold no data).
        global_blocks: Start from these global blocks instead (a continued federation).
        unmask_executor: A process pool that removes masks in parallel with this process
            (:class:`~blossom_secure.secagg.coordinator.CoordinatorStageMachine`'s
            ``unmask_executor``; :func:`unmask_pool` makes one); ``None``: this process
            alone.
        unmask_parts: The parts each block's masks are split into with an executor.

    Raises:
        PolicyError: the federation's aggregation parameters are unusable with this roster
            (see :func:`blossom_secure.secagg.terms.secagg_params`).

    Notes:
        Only block-wise secure aggregation runs here: there is no plaintext mode and no
        full-model mode in a deployment. The coordinator is honest-but-curious (DESIGN.md,
        "Roles and trust"): it learns each block's sum over its group, which sites
        answered, and what each site's policy lets its report say.
    """

    def __init__(self, federation: FederationConfig, roster: Mapping[str, bytes], *, seed: int,
                 global_blocks: Mapping[str, np.ndarray] | None = None, unmask_executor: Executor | None = None,
                 unmask_parts: int = 2) -> None:
        if not isinstance(unmask_parts, int) or isinstance(unmask_parts, bool) or unmask_parts < 1:
            raise ValueError("unmask_parts must be an int >= 1")
        self._unmask_executor = unmask_executor
        self._unmask_parts = unmask_parts
        try:
            self.params = secagg_params(federation, roster_size=len(roster))
            self.federation_sha256 = federation_sha256(federation)
        except ValueError as exc:
            raise PolicyError([Problem(str(federation.path), "aggregation", str(exc))]) from None
        self.federation = federation
        self.roster = dict(sorted(roster.items()))
        initial = initial_global_blocks(federation, include_heads=False, seed=seed)
        if global_blocks is not None:
            if set(global_blocks) != set(initial) or any(
                    np.asarray(global_blocks[b]).size != initial[b].size for b in initial):
                raise ValueError("global_blocks must hold every shareable block of the layout, at its size")
            initial = {b: np.asarray(global_blocks[b], dtype=np.float32).reshape(-1) for b in initial}
        self.global_blocks: dict[str, np.ndarray] = initial
        self.block_sizes = {b: int(v.size) for b, v in self.global_blocks.items()}
        #: Site id to why its part in the last round stopped (a refused reply or message).
        self.last_site_errors: dict[str, str] = {}
        self._max_reply_bytes = wire.MAX_HEADER_BYTES + 12 + self.params.max_message_bytes

    # ------------------------------------------------------------------ identify

    def identify_request(self, *, round_id: int, nonce: bytes | None = None) -> bytes:
        """A request every transport node answers with its site's signature over a fresh
        nonce (:meth:`identify_reply` turns the answer into a site id)."""
        return wire.encode_request(stage="identify", federation_id=self.federation.id,
                                   federation_sha256=self.federation_sha256, round_id=round_id, recipient=None,
                                   nonce=os.urandom(32) if nonce is None else nonce)

    def identify_reply(self, request: bytes, untrusted_reply: bytes, *, round_id: int) -> str:
        """The site that signed this answer to ``request``.

        Raises:
            ProtocolError: (and subclasses) not a valid reply of a roster site to it.
        """
        reply = wire.decode_reply(untrusted_reply, roster=self.roster, federation_id=self.federation.id,
                                  federation_sha256=self.federation_sha256, round_id=round_id, stage="identify",
                                  request=request, max_bytes=self._max_reply_bytes)
        return reply.site_id

    # --------------------------------------------------------------------- round

    def run_round(self, round_id: int, send: SendFn) -> RoundReport:
        """Run round ``round_id`` over ``send``; update the global blocks.

        Returns:
            The embedded runtime's report structure: per site the view
            :func:`~blossom_secure.runtimes.embedded.federation.site_report_view` gives of its report, per
            block its contributors or failure, per site the bytes of its replies accepted.

        Raises:
            ValueError: a bad round id.
        """
        if not isinstance(round_id, int) or isinstance(round_id, bool) or not 0 <= round_id < 1 << 63:
            raise ValueError("round_id must be an int in 0..2**63-1")
        self.last_site_errors = {}
        received: dict[str, int] = {}
        spec, body = wire.encode_blocks(self.global_blocks)
        offers = {site: self._request("offer", round_id, site, body=body, blocks=spec) for site in self.roster}
        answered = self._exchange("offer", round_id, offers, send, received)
        joined = {site: bool(reply.joined) for site, reply in answered.items()}
        outcomes = self._aggregate(round_id, answered, send, received)
        for block, outcome in outcomes.items():
            if outcome.failure is None:
                self.global_blocks[block] = (self.global_blocks[block] + outcome.mean_update).astype(np.float32)
        spec, body = wire.encode_blocks(self.global_blocks)
        results = tuple(wire.BlockResultEntry(b, tuple(sorted(o.contributors)) if o.failure is None else (),
                                              o.failure) for b, o in sorted(outcomes.items()))
        finishes = {site: self._request("finish", round_id, site, body=body, blocks=spec, outcomes=results)
                    for site in answered}
        finished = self._exchange("finish", round_id, finishes, send, received)
        sites = {}
        for site in self.roster:
            payload = None
            if site in finished and finished[site].body:
                try:
                    payload = _checked_report(finished[site].body, site_id=site, round_id=round_id)
                except ProtocolError as exc:
                    self._stop(site, f"finish: report refused: {exc}")
            sites[site] = site_report_view(payload, joined=joined.get(site, False))
        blocks = {b: {"contributors": list(o.contributors), "failure": o.failure} for b, o in outcomes.items()}
        return RoundReport(round_id=round_id, sites=sites, blocks=blocks,
                           bytes_received={site: int(received.get(site, 0)) for site in self.roster})

    def _aggregate(self, round_id: int, answered: Mapping[str, wire.Reply], send: SendFn,
                   received: dict[str, int]) -> dict[str, BlockOutcome]:
        """Secure aggregation of the blocks the joined sites advertised."""
        machine = CoordinatorStageMachine(federation_id=self.federation.id, federation_sha256=self.federation_sha256,
                                          round_id=round_id, roster=self.roster, block_sizes=self.block_sizes,
                                          params=self.params, unmask_executor=self._unmask_executor,
                                          unmask_parts=self._unmask_parts)
        offered: set[str] = set()
        for site, reply in sorted(answered.items()):
            if reply.joined and reply.body and self._deliver(machine, "advertise_keys", site, reply.body):
                offered.update(_advertised_blocks(reply.body, self, round_id))
        if not machine.advertised:
            return {}
        for stage in wire.SECAGG_STAGES:
            requests = {site: self._request(stage, round_id, site, body=message)
                        for site, message in machine.close_stage().items()}
            for site, reply in sorted(self._exchange(stage, round_id, requests, send, received).items()):
                self._deliver(machine, stage, site, reply.body)
        machine.close_stage()
        outcomes = {}
        for block, r in machine.results().items():
            if block not in offered:
                continue
            outcomes[block] = block_outcome(block, r)
        return outcomes

    def _deliver(self, machine: CoordinatorStageMachine, stage: str, site: str, untrusted_message: bytes) -> bool:
        try:
            sender = machine.receive(untrusted_message)
        except BlossomError as exc:
            self._stop(site, f"{stage}: the message was refused: {type(exc).__name__}: {exc}")
            return False
        if sender != site:  # cannot happen for a verified reply: its body is the site's own signed message
            self._stop(site, f"{stage}: the message inside is signed by {sender}")
            return False
        return True

    def _request(self, stage: str, round_id: int, site: str, *, body: bytes, blocks=(), outcomes=()) -> bytes:
        return wire.encode_request(stage=stage, federation_id=self.federation.id,
                                   federation_sha256=self.federation_sha256, round_id=round_id, recipient=site,
                                   body=body, blocks=blocks, outcomes=outcomes)

    def _exchange(self, stage: str, round_id: int, requests: Mapping[str, bytes], send: SendFn,
                  received: dict[str, int]) -> dict[str, wire.Reply]:
        """Send one stage's requests; return the replies that verify, by site."""
        if not requests:
            return {}
        untrusted = send(stage, dict(requests))
        replies = {}
        for site in sorted(requests):
            if site not in untrusted:
                logger.info("round %d, %s: no reply from %s", round_id, stage, site)
                continue
            try:
                reply = wire.decode_reply(untrusted[site], roster=self.roster, federation_id=self.federation.id,
                                          federation_sha256=self.federation_sha256, round_id=round_id, stage=stage,
                                          request=requests[site], max_bytes=self._max_reply_bytes)
                if reply.site_id != site:
                    raise InconsistentMessageError(f"the reply routed as {site}'s is signed by {reply.site_id}")
            except (BlossomError, TypeError) as exc:
                self._stop(site, f"{stage}: the reply was refused: {type(exc).__name__}: {exc}")
                continue
            received[site] = received.get(site, 0) + len(untrusted[site])
            replies[site] = reply
        return replies

    def _stop(self, site: str, reason: str) -> None:
        logger.warning("site %s: %s", site, reason)
        self.last_site_errors.setdefault(site, reason)


def _advertised_blocks(advertisement: bytes, coordinator: RoundCoordinator, round_id: int) -> tuple[str, ...]:
    """The blocks of an advertisement the stage machine has already accepted."""
    message = decode_site_message(advertisement, federation_id=coordinator.federation.id,
                                  federation_sha256=coordinator.federation_sha256, round_id=round_id,
                                  roster=coordinator.roster, max_bytes=coordinator.params.max_message_bytes)
    return tuple(entry.block for entry in message.blocks) if isinstance(message, AdvertiseKeys) else ()


def _checked_report(untrusted_report: bytes, *, site_id: str, round_id: int) -> bytes:
    """Check a site's round report (:func:`blossom_secure.site.egress.select_report`'s format)
    before :func:`~blossom_secure.runtimes.embedded.federation.site_report_view` reads it.

    Raises:
        MalformedMessageError: too long, not the report format, or values out of range.
        InconsistentMessageError: the report of another site or round.

    Notes:
        The reply carrying the report is signed by the site, but a site is a peer, not
        the coordinator's own code: the report is held to the exact format of
        :func:`blossom_secure.site.egress.select_report` (rates in [0, 1], a decline category,
        no counts), so nothing else is stored in ``metrics.json`` under its name.
    """
    if len(untrusted_report) > MAX_REPORT_BYTES:
        raise MalformedMessageError(f"a report is at most {MAX_REPORT_BYTES} bytes")
    try:
        doc = json.loads(untrusted_report.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedMessageError("the report is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != _REPORT_FIELDS or doc["type"] != "site-report" or doc["version"] != 1:
        raise MalformedMessageError("not a version 1 site report")
    if doc["site"] != site_id or doc["round"] != round_id or isinstance(doc["round"], bool):
        raise InconsistentMessageError("the report of another site or round")
    if doc["declined"] not in _DECLINED or not isinstance(doc["epsilon_nominal"], bool):
        raise MalformedMessageError("declined or epsilon_nominal out of range")
    epsilon = doc["epsilon_total"]
    if epsilon is not None and (not _is_number(epsilon) or not 0 <= epsilon < math.inf):
        raise MalformedMessageError("epsilon_total out of range")
    tasks = doc["tasks"]
    if not isinstance(tasks, dict) or len(tasks) > 64:
        raise MalformedMessageError("tasks must be an object")
    for task, metrics in tasks.items():
        if not isinstance(task, str) or len(task) > 48 or not isinstance(metrics, dict) or set(metrics) != _TASK_FIELDS:
            raise MalformedMessageError("a task entry is not {accuracy, macro_f1, majority_class_rate}")
        if not all(v is None or (_is_number(v) and 0 <= v <= 1) for v in metrics.values()):
            raise MalformedMessageError(f"{task}: a rate outside [0, 1]")
    return untrusted_report


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _no_constant(text: str) -> object:
    raise MalformedMessageError(f"{text} is not JSON")


# ------------------------------------------------------------------------------ results


def metrics_document(federation: FederationConfig, roster: Mapping[str, bytes], reports: list[RoundReport], *,
                     seed: int | None) -> dict:
    """``metrics.json`` of a deployed run, in the embedded runtime's structure.

    Built only from what the sites released (their reports) and public files (the
    federation file, the roster). Unlike the embedded runtime, the coordinator does not
    read the sites' own files: per site it knows only the public weight.
    """
    rows = []
    for report in reports:
        for site in sorted(roster):
            view = report.sites[site]
            for task, m in sorted(view["tasks"].items()):
                rows.append({"round": report.round_id, "site": site, "task": task, "metric": "accuracy",
                             "value": m["accuracy"], "macro_f1": m["macro_f1"],
                             "majority_class_rate": m["majority_class_rate"], "epsilon": view["epsilon"],
                             "epsilon_nominal": view["epsilon_nominal"], "declined": view["declined"]})
    return {
        "federation": federation.id,
        "runtime": "flower",
        "mode": "blockwise",
        "secure_aggregation": True,
        "seed": seed,
        "rounds": len(reports),
        "sites": {site: {"weight": federation.weighting.weight_of(site)} for site in sorted(roster)},
        "blocks": {str(r.round_id): r.blocks for r in reports},
        "bytes_received": {str(r.round_id): r.bytes_received for r in reports},
        "metrics": rows,
    }
