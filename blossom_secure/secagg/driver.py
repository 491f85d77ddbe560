"""Run a whole secure-aggregation round in one process (the embedded runtime).

The driver builds one :class:`SiteStageMachine` per simulated site and one
:class:`CoordinatorStageMachine`, and moves the *encoded* bytes between them, so every
message goes through encoding, the size limit, decoding and verification exactly as it
would over a network. Sites can be made to stop responding after a given stage, and every
outbound site message is first shown to an egress hook (the site's audit log). A site whose
own stage machine fails (whatever the exception) stops, as a dropout would; the others go
on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from blossom_secure.crypto import Ed25519PrivateKey
from blossom_secure.errors import BlossomError
from blossom_secure.secagg.coordinator import BlockResult, CoordinatorStageMachine
from blossom_secure.secagg.messages import MessageType, peek_message_type
from blossom_secure.secagg.params import SecAggParams
from blossom_secure.secagg.site import STAGE_NAMES, SiteContribution, SiteStageMachine

__all__ = [
    "DROP_POINTS",
    "BlockResult",
    "EgressHook",
    "SecAggParams",
    "SecAggResult",
    "SiteContribution",
    "run_secure_aggregation",
]

logger = logging.getLogger(__name__)

#: Values accepted in ``drop_after``: ``"start"`` (never answers) or a stage name.
DROP_POINTS = ("start", *STAGE_NAMES)

_EGRESS_NAMES = {
    MessageType.ADVERTISE_KEYS: "secagg.advertise_keys",
    MessageType.ENCRYPTED_SHARES: "secagg.share_keys",
    MessageType.MASKED_INPUT: "secagg.masked_input",
    MessageType.CONSISTENCY_RESPONSE: "secagg.consistency",
    MessageType.UNMASK_RESPONSE: "secagg.unmask",
}

EgressHook = Callable[[str, str, tuple[str, ...], bytes], None]


@dataclass(frozen=True)
class SecAggResult:
    """The outcome of a round.

    Attributes:
        round_id: The round.
        blocks: Every layout block's :class:`BlockResult`, by name.
        dropped: Contributing sites that stopped before the end (dropout, egress hook
            failure, or a protocol error), sorted.
        site_errors: Site id to the error that stopped it (egress hook, protocol, or any
            failure of its own stage machine), for sites stopped by an error rather than
            by ``drop_after``.
        bytes_received: Site id to the total bytes of its messages the coordinator took
            delivery of (counted on the coordinator's side, independently of the sites'
            audit logs, which must account for the same bytes).
    """

    round_id: int
    blocks: Mapping[str, BlockResult]
    dropped: tuple[str, ...]
    site_errors: Mapping[str, str] = field(default_factory=dict)
    bytes_received: Mapping[str, int] = field(default_factory=dict)


class _SiteRunner:
    """One simulated site: its machine, its drop point, its egress hook, its fate."""

    def __init__(self, machine: SiteStageMachine, drop_after: str | None, on_egress: EgressHook | None) -> None:
        self.machine = machine
        self.drop_after = drop_after
        self.on_egress = on_egress
        self.alive = drop_after != "start"
        self.error: str | None = None
        self.bytes_delivered = 0

    def step(self, stage: str, produce: Callable[[], bytes]) -> bytes | None:
        """Run one stage; returns the message to deliver, or ``None`` if the site stopped.

        Any exception from the site's own stage machine (a refusal of the coordinator's
        message, or a failure of the site itself, such as a ``ValueError`` from its
        update) stops this site only: it counts as dropped, and the others go on.
        """
        if not self.alive:
            return None
        try:
            message = produce()
        except Exception as exc:  # noqa: BLE001 - one site's failure is that site's dropout, recorded
            self.stop(f"{stage}: {type(exc).__name__}: {exc}")
            return None
        if not self._egress(message):
            return None
        if self.drop_after == stage:
            self.alive = False
        return message

    def _egress(self, message: bytes) -> bool:
        if self.on_egress is None:
            return True
        message_type = peek_message_type(message, max_bytes=len(message))
        try:
            self.on_egress(self.machine.site_id, _EGRESS_NAMES[message_type], self.machine.last_message_blocks, message)
        except Exception as exc:  # noqa: BLE001 - any hook failure stops the site, and is recorded
            self.stop(f"egress hook failed: {type(exc).__name__}: {exc}")
            return False
        return True

    def stop(self, reason: str) -> None:
        """Mark the site stopped by an error, and record why."""
        logger.warning("site %s stopped: %s", self.machine.site_id, reason)
        self.alive = False
        self.error = reason


def run_secure_aggregation(
    *,
    federation_id: str,
    federation_sha256: bytes,
    round_id: int,
    roster: Mapping[str, bytes],
    identity_keys: Mapping[str, Ed25519PrivateKey],
    contributions: Mapping[str, SiteContribution],
    block_sizes: Mapping[str, int],
    params: SecAggParams,
    drop_after: Mapping[str, str] | None = None,
    on_egress: EgressHook | None = None,
) -> SecAggResult:
    """Run one secure-aggregation round over in-process sites.

    Args:
        federation_id: The federation's id.
        federation_sha256: The SHA-256 (32 bytes) of the federation file, bound into
            every message of the round.
        round_id: The round.
        roster: Site id to raw Ed25519 public key (32 bytes); at most
            ``params.max_group_size`` sites.
        identity_keys: Private identity keys of the simulated sites.
        contributions: Site id to its contribution; the sites that take part.
        block_sizes: The layout: block name to number of float32 values.
        params: Protocol parameters.
        drop_after: Site id to the point after which it stops responding: ``"start"``
            (never answers) or a stage name from ``STAGE_NAMES``.
        on_egress: Called as ``on_egress(site_id, message_type, block_names, payload)``
            for every message a site sends, before delivery. If it raises, the message is
            not delivered, the site counts as dropped from then on, and the error is in
            ``SecAggResult.site_errors``. Likewise if the site's own stage machine raises.

    Returns:
        The outcome of every layout block. ``weighted_sum / weight_sum`` is the weighted
        mean of the contributors' clipped updates.

    Raises:
        ValueError: inconsistent arguments, found before anything is sent (a contributor
            without an identity key or outside the roster, a roster larger than
            ``params.max_group_size``, a bad drop point, layout, federation hash or
            updates, or a contribution to a block whose public group does not hold the
            site).

    Notes:
        Messages between the machines are always the encoded bytes, so this runs the same
        checks (sizes, signatures, stages, replay) as a deployment would. Sites never
        exchange messages directly: every message goes through the coordinator
        (Bonawitz et al. 2017, section 4).
    """
    drop_after = dict(drop_after or {})
    for site, point in drop_after.items():
        if point not in DROP_POINTS:
            raise ValueError(f"drop_after[{site!r}] must be one of {DROP_POINTS}")
        if site not in contributions:
            raise ValueError(f"drop_after names {site!r}, which does not contribute")
    for site in contributions:
        if site not in identity_keys:
            raise ValueError(f"no identity key for contributing site {site!r}")
    coordinator = CoordinatorStageMachine(
        federation_id=federation_id,
        federation_sha256=federation_sha256,
        round_id=round_id,
        roster=roster,
        block_sizes=block_sizes,
        params=params,
    )
    runners = {
        site: _SiteRunner(
            SiteStageMachine(
                site_id=site,
                federation_id=federation_id,
                federation_sha256=federation_sha256,
                round_id=round_id,
                roster=roster,
                identity_key=identity_keys[site],
                block_sizes=block_sizes,
                params=params,
                contribution=contributions[site],
            ),
            drop_after.get(site),
            on_egress,
        )
        for site in sorted(contributions)
    }
    _deliver(coordinator, runners, "advertise_keys", {site: None for site in runners})
    requests = coordinator.close_stage()
    _deliver(coordinator, runners, "share_keys", requests)
    requests = coordinator.close_stage()
    _deliver(coordinator, runners, "masked_input", requests)
    requests = coordinator.close_stage()
    _deliver(coordinator, runners, "consistency", requests)
    requests = coordinator.close_stage()
    _deliver(coordinator, runners, "unmask", requests)
    coordinator.close_stage()
    return _result(round_id, coordinator, runners)


def _deliver(
    coordinator: CoordinatorStageMachine,
    runners: Mapping[str, _SiteRunner],
    stage: str,
    requests: Mapping[str, bytes | None],
) -> None:
    for site, request in sorted(requests.items()):
        runner = runners.get(site)
        if runner is None:
            continue
        produce = functools.partial(_produce, runner.machine, stage, request)
        message = runner.step(stage, produce)
        if message is None:
            continue
        runner.bytes_delivered += len(message)  # counted as the coordinator takes delivery
        try:
            coordinator.receive(message)
        except BlossomError as exc:
            runner.stop(f"{stage}: coordinator refused the message: {type(exc).__name__}: {exc}")


def _produce(machine: SiteStageMachine, stage: str, request: bytes | None) -> bytes:
    if stage == "advertise_keys":
        return machine.advertise_keys()
    if request is None:
        raise ValueError(f"stage {stage} needs a request")
    if stage == "share_keys":
        return machine.share_keys(request)
    if stage == "masked_input":
        return machine.masked_input(request)
    if stage == "consistency":
        return machine.consistency_check(request)
    return machine.unmask(request)


def _result(round_id: int, coordinator: CoordinatorStageMachine, runners: Mapping[str, _SiteRunner]) -> SecAggResult:
    finished = set(coordinator.unmask_responders)
    dropped = tuple(site for site in sorted(runners) if site not in finished)
    errors = {site: runner.error for site, runner in sorted(runners.items()) if runner.error is not None}
    return SecAggResult(
        round_id=round_id,
        blocks=MappingProxyType(coordinator.results()),
        dropped=dropped,
        site_errors=MappingProxyType(errors),
        bytes_received=MappingProxyType({site: r.bytes_delivered for site, r in sorted(runners.items())}),
    )
