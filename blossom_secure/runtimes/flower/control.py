"""Start a deployment run on a SuperLink, without the ``flwr`` CLI or an app folder.

The Flower app bundle (FAB) holds one file, a ``pyproject.toml`` whose components point
at the installed :mod:`blossom_secure.runtimes.flower.apps` (the code is the installed
package, not the bundle), and the run config carries the coordinator's settings
(:data:`~blossom_secure.runtimes.flower.apps.RUN_CONFIG_DEFAULTS`). The run is started
over the SuperLink's Control API (HTTPS, verified against the given CA).

This uses Flower 1.42's own client classes (``ControlHttpClient``, ``build_fab_from_files``),
which are not a stable public API: the ``flower`` extra pins ``flwr==1.42.0``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from blossom_secure.runtimes.flower.apps import RUN_CONFIG_DEFAULTS

__all__ = ["RunStatus", "app_pyproject", "register_supernodes", "start_run", "stop_run", "wait_for_run"]

logger = logging.getLogger(__name__)

_APP_NAME = "blossom-secure"


def app_pyproject() -> bytes:
    """The FAB's ``pyproject.toml``: the components and the run config defaults."""
    lines = [
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f'name = "{_APP_NAME}"', 'version = "0.1.0"',
        'description = "blossom_secure: block-wise federated learning with secure aggregation"',
        'license = "Apache-2.0"', "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "blossom"', "",
        "[tool.flwr.app.components]",
        'serverapp = "blossom_secure.runtimes.flower.apps:server_app"',
        'clientapp = "blossom_secure.runtimes.flower.apps:client_app"', "",
        "[tool.flwr.app.config]",
    ]
    for key, value in RUN_CONFIG_DEFAULTS.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value!r}")
    return ("\n".join(lines) + "\n").encode("ascii")


def _client(superlink: str, root_certificates: Path | None):
    """A Control API client; ``root_certificates=None``: no TLS (loopback trials only)."""
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    return ControlHttpClient.from_server_address(
        superlink, insecure=root_certificates is None,
        root_certificates=None if root_certificates is None else str(root_certificates),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])


def start_run(superlink: str, *, root_certificates: Path | None, run_config: Mapping[str, str | int | float]) -> int:
    """Start the app on ``superlink`` (``host:port``) with ``run_config``; return the run id.

    Raises:
        ValueError: a run config key the app does not declare.
    """
    from flwr.cli.build import build_fab_from_files
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.fab import Fab

    unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run config key(s): {', '.join(unknown)}")
    fab_bytes, _ = build_fab_from_files({"pyproject.toml": app_pyproject()})
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    client = _client(superlink, root_certificates)
    try:
        response = client.StartRun(StartRunRequest(fab=fab_to_proto(fab),
                                                   override_config=user_config_to_proto(dict(run_config)),
                                                   federation=""))
    finally:
        client.close()
    logger.info("started run %d on %s", response.run_id, superlink)
    return int(response.run_id)


@dataclass(frozen=True)
class RunStatus:
    """A run's status as the SuperLink reports it (``finished`` / ``completed`` on success)."""

    status: str
    sub_status: str
    details: str


def wait_for_run(superlink: str, *, root_certificates: Path | None, run_id: int, timeout_s: float,
                 poll_s: float = 1.0) -> RunStatus:
    """Wait until the run is finished (or ``timeout_s`` passes); return its last status."""
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

    client = _client(superlink, root_certificates)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            run = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
            status = RunStatus(run.status.status, run.status.sub_status, run.status.details)
            if status.status == "finished" or time.monotonic() >= deadline:
                return status
            time.sleep(poll_s)
    finally:
        client.close()


def register_supernodes(superlink: str, *, root_certificates: Path | None, node_keys: Mapping[str, str]
                        ) -> dict[str, int]:
    """Register each site's SuperNode key with a SuperLink that runs with SuperNode
    authentication (``--enable-supernode-auth``); returns site id to Flower node id.

    Raises:
        ValueError: a key that is not an EC P-384 OpenSSH public line.
        RuntimeError: the SuperLink refused a key (e.g. already registered to another node).
    """
    from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=no-name-in-module

    from blossom_secure.crypto import node_auth_public_pem

    pems = {site: node_auth_public_pem(line) for site, line in sorted(node_keys.items())}
    client = _client(superlink, root_certificates)
    nodes = {}
    try:
        for site, pem in pems.items():
            try:
                response = client.RegisterNode(RegisterNodeRequest(public_key=pem, name=site))
            except Exception as exc:  # noqa: BLE001 - Flower's client raises its own error types
                raise RuntimeError(f"the SuperLink refused the node key of {site}: {exc}") from None
            if not response.node_id:
                raise RuntimeError(f"the SuperLink did not register the node key of {site}")
            nodes[site] = int(response.node_id)
    finally:
        client.close()
    logger.info("registered the SuperNode keys of %s", ", ".join(nodes))
    return nodes


def stop_run(superlink: str, *, root_certificates: Path | None, run_id: int) -> None:
    """Ask the SuperLink to stop the run."""
    from flwr.proto.control_pb2 import StopRunRequest  # pylint: disable=no-name-in-module

    client = _client(superlink, root_certificates)
    try:
        client.StopRun(StopRunRequest(run_id=run_id))
    finally:
        client.close()
