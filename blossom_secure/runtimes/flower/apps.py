"""The Flower ``ServerApp`` (coordinator) and ``ClientApp`` (site agent) of the deployment runtime.

Both are thin: the ClientApp hands each request's bytes to
:func:`blossom_secure.site.steps.handle_request` and returns its reply; the
ServerApp runs :class:`blossom_secure.coordinator.steps.RoundCoordinator`
with a ``send`` that pushes the requests to the SuperNodes and pulls their replies
(:class:`FlowerTransport`). Neither adds anything to what may leave a site.

Each message is one Flower *query* (``query.<stage>``, one per stage of
:data:`blossom_secure.wire.STAGES`) carrying one ``ConfigRecord`` named
``blossom`` with the request's bytes under ``request`` (the reply's under ``reply``).

Configuration:

* SuperNode (the hospital's): ``--node-config 'site-dir="/path/to/site" coordinator="HOST:PORT"'``
  (``coordinator``: the SuperLink address this SuperNode connects to, which the site's
  policy must list; ``blossom-site join`` sets both), optionally
  ``federation-file="..."`` and ``roster-file="..."`` (default: the ones the site file
  names / ``roster.toml`` beside it) and, for a seeded simulation on synthetic data only,
  ``simulation-seed=N``. The coordinator cannot set any of these.
* Virtual SuperNode (Flower's simulation engine only, :mod:`blossom_secure.runtimes.flower.simulation`):
  its node config holds only Flower's ``partition-id`` and ``num-partitions``. Partition
  ``i`` is the ``i``-th site folder, by sorted path, under the folder named by the
  environment variable :data:`SIMULATION_SITES_ENV` of the process running the ClientApp
  (and the seed, if any, is :data:`SIMULATION_SEED_ENV`). See :func:`node_site`.
* Run (the coordinator's): the run config of :data:`RUN_CONFIG_DEFAULTS`
  (:mod:`blossom_secure.runtimes.flower.control` starts a run with it).

Which SuperNode is which site is learnt each round from the ``identify`` stage: a site
signs a fresh nonce with its identity key and the coordinator checks it against the
roster. Flower's node ids are routing labels only; every reply is authenticated again.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from blossom_secure.config import load_federation
from blossom_secure.errors import BlossomError
from blossom_secure import wire
from blossom_secure.coordinator.checkpoint import load_checkpoint, save_checkpoint
from blossom_secure.coordinator.steps import RoundCoordinator, metrics_document, unmask_pool
from blossom_secure.roster import load_roster, roster_path
from blossom_secure.site.config import site_dirs
from blossom_secure.site.steps import SiteFiles, handle_request

__all__ = ["RECORD", "RUN_CONFIG_DEFAULTS", "SIMULATION_SEED_ENV", "SIMULATION_SITES_ENV", "FlowerTransport",
           "RunSettings", "client_app", "node_site", "server_app"]

logger = logging.getLogger(__name__)

#: The name of the one record every message carries.
RECORD = "blossom"
#: The error code of a reply the site refused to give (the reason stays in its audit log).
REFUSED = 4100
#: The run config keys of the ServerApp and their defaults.
RUN_CONFIG_DEFAULTS: Mapping[str, str | int | float] = {
    "federation-file": "",
    "roster-file": "",
    "out-dir": "",
    "rounds": 0,
    "first-round": 0,
    "seed": 0,
    "stage-timeout-s": 900.0,
    "wait-for-sites-s": 300.0,
    "min-sites": 0,
    "poll-interval-s": 0.2,
    "identify-timeout-s": 180.0,
}
#: Simulation only: the environment variable (of the process that runs the ClientApp)
#: naming the folder whose site folders are the virtual SuperNodes' sites.
SIMULATION_SITES_ENV = "BLOSSOM_SIMULATION_SITES"
#: Simulation only: the environment variable holding the sites' simulation seed (optional).
SIMULATION_SEED_ENV = "BLOSSOM_SIMULATION_SEED"
#: The node config keys Flower's simulation engine gives every virtual SuperNode.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
_SEED_RE = re.compile(r"[0-9]{1,18}")


# ------------------------------------------------------------------------------- the site


client_app = ClientApp()


def _client_step(stage: str, message: Message, context: Context) -> Message:
    """Answer one request in this (fresh) process.

    Notes:
        A refusal goes back as a Flower error with a fixed reason: the site's files,
        paths and the exception text stay on the site (the site's step has written what
        it could to its own audit log). The site folder and the simulation seed come
        from the SuperNode's own configuration (in a simulation, from the virtual
        SuperNode's partition and its process's environment: :func:`node_site`), never
        from the message or the run config.
    """
    try:
        files, seed = node_site(context.node_config)
        record = message.content[RECORD]
        untrusted_request = record["request"] if isinstance(record, ConfigRecord) else None
        if not isinstance(untrusted_request, bytes):
            raise ValueError("the message carries no request bytes")
        claimed, _ = wire.peek_request(untrusted_request, max_bytes=len(untrusted_request))
        if claimed != stage:
            raise ValueError(f"a {claimed} request sent as query.{stage}")
        reply = handle_request(files, untrusted_request, seed=seed)
    except Exception as exc:  # noqa: BLE001 - nothing of the site's error leaves the site
        logger.warning("query.%s refused: %s: %s", stage, type(exc).__name__, exc)
        return Message(Error(code=REFUSED, reason="refused by the site (see its audit log)"), reply_to=message)
    return Message(RecordDict({RECORD: ConfigRecord({"reply": reply})}), reply_to=message)


def _register(stage: str) -> None:
    def handler(message: Message, context: Context) -> Message:
        return _client_step(stage, message, context)

    handler.__name__ = f"blossom_{stage}"
    client_app.query(stage)(handler)


for _stage in wire.STAGES:
    _register(_stage)


def node_site(node_config: Mapping, environ: Mapping[str, str] | None = None) -> tuple[SiteFiles, int | None]:
    """The site this (virtual) SuperNode answers for, and its simulation seed.

    Args:
        node_config: The SuperNode's node config (``Context.node_config``).
        environ: The environment of this process (default: ``os.environ``).

    Returns:
        The site's files and its seed (``None``: DP noise from the OS CSPRNG).

    Raises:
        ValueError: the node config names no site, or the simulation settings do not
            fit the virtual SuperNode (one line naming what is wrong).

    Notes:
        A deployed SuperNode names its site folder in its own node config
        (``site-dir``); then the node config alone decides, and the simulation
        variables are ignored. A virtual SuperNode of Flower's simulation engine has
        only ``partition-id`` and ``num-partitions``: it answers for the
        ``partition-id``-th site folder, by sorted path (:func:`~blossom_secure.site.config.site_dirs`),
        under :data:`SIMULATION_SITES_ENV`, and only if that folder holds exactly
        ``num-partitions`` site folders. Neither the node config nor this process's
        environment can be set by the coordinator (its run config and messages are
        never read here), so a coordinator cannot make a hospital's ClientApp read
        another folder; a hospital's SuperNode never has these settings unless its own
        operator gives them. A deployed SuperNode also names the coordinator address it
        connects to (``coordinator``, set by ``blossom-site join``), which the site's
        policy must list; a virtual SuperNode has none, and its site checks the federation
        file's ``coordinator`` instead, as in the embedded runtime.
    """
    environ = os.environ if environ is None else environ
    if "site-dir" in node_config:
        files = SiteFiles(Path(_config_str(node_config, "site-dir", required=True)),
                          federation_file=_optional_path(node_config, "federation-file"),
                          roster_file=_optional_path(node_config, "roster-file"),
                          coordinator=_config_str(node_config, "coordinator", required=True))
        seed = node_config.get("simulation-seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError("simulation-seed must be an integer")
        return files, seed
    if PARTITION_ID not in node_config:
        raise ValueError("config 'site-dir' must be a non-empty string")
    root = environ.get(SIMULATION_SITES_ENV, "")
    if not root:
        raise ValueError(f"a virtual SuperNode (partition-id) needs {SIMULATION_SITES_ENV}: this process is not "
                         "part of a blossom simulation")
    partition, partitions = node_config.get(PARTITION_ID), node_config.get(NUM_PARTITIONS)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (partition, partitions)) \
            or not 0 <= partition < partitions:
        raise ValueError("partition-id and num-partitions must be integers, 0 <= partition-id < num-partitions")
    dirs = site_dirs(Path(root))
    if len(dirs) != partitions:
        raise ValueError(f"{SIMULATION_SITES_ENV} holds {len(dirs)} site folders, but the simulation has "
                         f"{partitions} virtual SuperNodes")
    seed_text = environ.get(SIMULATION_SEED_ENV, "")
    if seed_text and not _SEED_RE.fullmatch(seed_text):
        raise ValueError(f"{SIMULATION_SEED_ENV} must be a non-negative integer")
    return SiteFiles(dirs[partition]), int(seed_text) if seed_text else None


def _config_str(config: Mapping, key: str, *, required: bool = False) -> str:
    value = config.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f"config {key!r} must be a non-empty string")
    return value


def _optional_path(config: Mapping, key: str) -> Path | None:
    value = _config_str(config, key)
    return Path(value) if value else None


# ---------------------------------------------------------------------------- transport


class FlowerTransport:
    """``send`` of :class:`RoundCoordinator` over a Flower ``Grid``.

    Args:
        grid: The ServerApp's grid.
        coordinator: The coordinator (it checks every identity reply).
        stage_timeout_s: How long a stage waits for replies; a site that has not
            answered by then has dropped from the stage.
        poll_interval_s: Pause between pulls (``Grid.send_and_receive`` would sleep 3 s).
    """

    def __init__(self, grid: Grid, coordinator: RoundCoordinator, *, stage_timeout_s: float,
                 poll_interval_s: float) -> None:
        self.grid = grid
        self.coordinator = coordinator
        self.stage_timeout_s = float(stage_timeout_s)
        self.poll_interval_s = float(poll_interval_s)
        #: Site id to the node that proved it holds the site's key (refreshed by :meth:`identify`).
        self.nodes: dict[str, int] = {}

    def identify(self, round_id: int, *, timeout_s: float | None = None) -> dict[str, int]:
        """Ask every connected node to sign a fresh nonce; map sites to nodes.

        Returns:
            Site id to node id, for the nodes whose answer verifies against the roster.

        Notes:
            Two nodes that both prove one site (its key on two machines, or a restarted
            node still registered) are ambiguous: the lower node id is used and a
            warning logged; nothing is trusted from a node that proves no site.
        """
        request = self.coordinator.identify_request(round_id=round_id)
        node_ids = sorted(self.grid.get_node_ids())
        replies = self._exchange("identify", {node: request for node in node_ids}, timeout_s)
        nodes: dict[str, int] = {}
        for node, untrusted in sorted(replies.items()):
            try:
                site = self.coordinator.identify_reply(request, untrusted, round_id=round_id)
            except BlossomError as exc:
                logger.warning("node %d proved no site: %s", node, exc)
                continue
            if site in nodes:
                logger.warning("nodes %d and %d both hold the key of %s; using %d", nodes[site], node, site,
                               nodes[site])
                continue
            nodes[site] = node
        self.nodes = nodes
        return dict(nodes)

    def send(self, stage: str, requests: Mapping[str, bytes]) -> dict[str, bytes]:
        """Deliver ``requests`` (by site) and return the replies that came in time."""
        by_node = {self.nodes[site]: site for site in requests if site in self.nodes}
        replies = self._exchange(stage, {node: requests[site] for node, site in by_node.items()}, None)
        return {by_node[node]: reply for node, reply in replies.items()}

    def _exchange(self, stage: str, requests: Mapping[int, bytes], timeout_s: float | None) -> dict[int, bytes]:
        if not requests:
            return {}
        timeout_s = self.stage_timeout_s if timeout_s is None else timeout_s
        messages = [Message(RecordDict({RECORD: ConfigRecord({"request": request})}), node, f"query.{stage}",
                            ttl=timeout_s) for node, request in requests.items()]
        ids = list(self.grid.push_messages(messages))
        pending = {mid: message.metadata.dst_node_id for mid, message in zip(ids, messages, strict=True) if mid}
        replies: dict[int, bytes] = {}
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if reply.has_error():
                    logger.warning("%s: node %d answered with error %d", stage, node, reply.error.code)
                    continue
                record = reply.content[RECORD] if RECORD in reply.content else None
                value = record.get("reply") if isinstance(record, ConfigRecord) else None
                if isinstance(value, bytes):
                    replies[node] = value
            if pending:
                time.sleep(self.poll_interval_s)
        if pending:
            logger.warning("%s: no reply from node(s) %s in %.0f s", stage, sorted(pending.values()), timeout_s)
        return replies


# ------------------------------------------------------------------------- the coordinator


@dataclass(frozen=True)
class RunSettings:
    """The ServerApp's run config, checked (see :data:`RUN_CONFIG_DEFAULTS`)."""

    federation_file: Path
    roster_file: Path | None
    out_dir: Path
    rounds: int
    first_round: int
    seed: int
    stage_timeout_s: float
    wait_for_sites_s: float
    min_sites: int
    poll_interval_s: float
    identify_timeout_s: float = 180.0  # a loaded site may take tens of seconds to start its ClientApp

    @classmethod
    def from_run_config(cls, config: Mapping) -> RunSettings:
        """Raises ``ValueError`` naming the first bad key."""
        def number(key: str, kind: type, minimum: float) -> int | float:
            value = config.get(key, RUN_CONFIG_DEFAULTS[key])
            if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
                raise ValueError(f"run config {key!r} must be a number >= {minimum}")
            if kind is int and value != int(value):
                raise ValueError(f"run config {key!r} must be an integer")
            return kind(value)

        return cls(
            federation_file=Path(_config_str(config, "federation-file", required=True)),
            roster_file=_optional_path(config, "roster-file"),
            out_dir=Path(_config_str(config, "out-dir", required=True)),
            rounds=number("rounds", int, 0), first_round=number("first-round", int, 0), seed=number("seed", int, 0),
            stage_timeout_s=number("stage-timeout-s", float, 1), wait_for_sites_s=number("wait-for-sites-s", float, 0),
            min_sites=number("min-sites", int, 0), poll_interval_s=number("poll-interval-s", float, 0.01),
            identify_timeout_s=number("identify-timeout-s", float, 1))


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(context.run_config)
    run_federation(grid, settings)


def run_federation(grid: Grid, settings: RunSettings) -> Path:
    """Run the configured rounds over the grid; after every round write the checkpoint,
    ``metrics.json`` and the global blocks (:mod:`blossom_secure.coordinator.checkpoint`).
    Returns the metrics path.

    A coordinator restarted on the same output folder continues from the global blocks of
    the last round it finished there and keeps that round's reports; the round that was in
    progress when it stopped is abandoned (``first-round`` comes after it).

    The coordinator removes masks on every core it may use (:func:`~blossom_secure.coordinator.steps.unmask_pool`:
    worker processes started on first need, stopped when the run ends).

    Raises:
        PolicyError: the federation or roster file is unusable, or the output folder holds
            a checkpoint of another federation (or another version of its file).
        RuntimeError: fewer than ``min-sites`` sites proved their identity in time.
    """
    federation = load_federation(settings.federation_file)
    roster = load_roster(roster_path(federation, settings.roster_file), federation=federation)
    pool, parts = unmask_pool()
    try:
        return _run_rounds(grid, settings, federation, roster, pool, parts)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _run_rounds(grid: Grid, settings: RunSettings, federation, roster, pool, parts: int) -> Path:
    coordinator = RoundCoordinator(federation, roster, seed=settings.seed, unmask_executor=pool, unmask_parts=parts)
    checkpoint = load_checkpoint(settings.out_dir, federation, block_sizes=coordinator.block_sizes)
    reports = []
    if checkpoint is not None:
        if checkpoint.last_round >= settings.first_round:
            raise ValueError(f"first-round {settings.first_round} does not come after round {checkpoint.last_round}, "
                             "the last one finished in this output folder")
        coordinator = RoundCoordinator(federation, roster, seed=settings.seed, global_blocks=checkpoint.global_blocks,
                                       unmask_executor=pool, unmask_parts=parts)
        reports = list(checkpoint.reports)
        logger.info("continuing from the global blocks after round %d", checkpoint.last_round)
    transport = FlowerTransport(grid, coordinator, stage_timeout_s=settings.stage_timeout_s,
                                poll_interval_s=settings.poll_interval_s)
    wanted = settings.min_sites or len(roster)
    deadline = time.monotonic() + settings.wait_for_sites_s
    while len(transport.identify(settings.first_round, timeout_s=settings.identify_timeout_s)) < len(roster):
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if len(transport.nodes) < wanted:
        raise RuntimeError(f"only {len(transport.nodes)} of {wanted} sites proved their identity in time")
    rounds = settings.rounds or federation.training.rounds
    path = settings.out_dir / "metrics.json"
    for round_id in range(settings.first_round, settings.first_round + rounds):
        if round_id > settings.first_round:
            transport.identify(round_id, timeout_s=settings.identify_timeout_s)
        logger.info("round %d: starting with %d sites", round_id, len(transport.nodes))
        report = coordinator.run_round(round_id, transport.send)
        reports.append(report)
        logger.info("round %d: blocks %s", round_id,
                    {b: v["failure"] or "aggregated" for b, v in report.blocks.items()})
        path = save_checkpoint(settings.out_dir, federation, reports, coordinator.global_blocks,
                               metrics_document(federation, roster, reports, seed=settings.seed))
    return path
