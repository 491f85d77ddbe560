"""Start and end the Flower processes of a deployment: a hospital's SuperNode and the
coordinator's SuperLink, each in a process group of its own.

Nothing here imports ``flwr``: the processes are Flower's own executables
(``flower-supernode``, ``flower-superlink``) from the environment this package runs in.
The checks an operator's address and CA file must pass before anything starts are here
too (:func:`parse_address`, :func:`is_loopback_host`, :func:`check_ca_certificate`), so
that the CLI refuses a bad start before a process exists.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from blossom_secure.crypto import TlsCertificateInfo, describe_tls_certificate

__all__ = [
    "FLOWER_HOME_DIR",
    "check_ca_certificate",
    "descendants",
    "end_process_group",
    "flower_environment",
    "free_local_port",
    "is_loopback_host",
    "live_process",
    "parse_address",
    "start_process",
    "supernode_command",
    "superlink_command",
    "wait_listening",
]

logger = logging.getLogger(__name__)

#: The Flower home (its own state and logs) under a site's or the coordinator's folder.
FLOWER_HOME_DIR = "flower-home"
_MAX_CA_BYTES = 65536
_BIN = Path(sys.executable).parent


def parse_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address).

    Raises:
        ValueError: not ``HOST:PORT`` with a port from 1 to 65535.
    """
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if not host or any(c.isspace() for c in host) or '"' in host:
        raise ValueError(f"{text!r} has no valid host")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP address (no name lookup)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ca_certificate(path: Path) -> TlsCertificateInfo:
    """Read the CA certificate a TLS connection is verified against.

    Raises:
        ValueError: the file is missing, unreadable, over 64 KiB or not one PEM X.509
            certificate (the message names the file).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_CA_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the CA certificate: {exc.strerror or exc}") from None
    try:
        return describe_tls_certificate(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the SuperNode's local API)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_environment(home: Path) -> dict[str, str]:
    """The environment of a Flower process: its own ``FLWR_HOME``, no telemetry, no
    update check, and this environment's executables first on ``PATH``."""
    home = Path(home)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return dict(os.environ, PATH=f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_HOME=str(home),
                FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")


def supernode_command(*, superlink: str, site_dir: Path, root_certificates: Path | None,
                      federation_file: Path | None = None, simulation_seed: int | None = None,
                      local_port: int, node_key: Path | None = None) -> list[str]:
    """The ``flower-supernode`` command line of a site (``root_certificates=None``: no TLS;
    ``node_key``: the site's SuperNode key, for a SuperLink with SuperNode authentication).

    Raises:
        ValueError: a path that cannot be written into the node config (a double quote).
    """
    config = [f'site-dir="{_quotable(Path(site_dir).resolve())}"', f'coordinator="{_quotable(superlink)}"']
    if federation_file is not None:
        config.append(f'federation-file="{_quotable(Path(federation_file).resolve())}"')
    if simulation_seed is not None:
        config.append(f"simulation-seed={int(simulation_seed)}")
    tls = ["--insecure"] if root_certificates is None else ["--root-certificates", str(Path(root_certificates).resolve())]
    auth = [] if node_key is None else ["--auth-supernode-private-key", str(Path(node_key).resolve())]
    return [str(_BIN / "flower-supernode"), *tls, *auth, "--superlink", superlink, "--node-config", " ".join(config),
            "--host", "127.0.0.1", "--port", str(local_port)]


def superlink_command(*, host: str, port: int, certificates: tuple[Path, Path, Path] | None,
                      supernode_auth: bool = False) -> list[str]:
    """The ``flower-superlink`` command line (``certificates``: CA, server certificate and
    key; ``None``: no TLS; ``supernode_auth``: only SuperNodes whose keys are registered
    over the Control API may connect)."""
    if certificates is None:
        tls = ["--insecure"]
    else:
        ca, cert, key = (Path(p).resolve() for p in certificates)
        tls = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    auth = ["--enable-supernode-auth"] if supernode_auth else []
    return [str(_BIN / "flower-superlink"), *tls, *auth, "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]


def _quotable(value: Path | str) -> str:
    """``value`` as a node-config string (no quote, backslash or control character)."""
    text = str(value)
    if '"' in text or "\\" in text or not text.isprintable():
        raise ValueError(f"{text!r}: a value with a quote, backslash or control character cannot be passed to Flower")
    return text


def _load_prctl():
    """libc's ``prctl`` on Linux (looked up once, here, so the forked child only calls it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _end_with_parent() -> None:  # runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def start_process(command: Sequence[str], *, env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start ``command`` in a new session (its own process group), output appended to ``log_path``.

    On Linux the process is sent SIGTERM when the process that started it dies, however it
    dies: a coordinator or a join command killed with SIGKILL leaves no SuperLink holding
    its port and no SuperNode answering for the site.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=cwd, start_new_session=True, preexec_fn=_end_with_parent)
    logger.info("started %s (pid %d), log %s", Path(command[0]).name, process.pid, log_path)
    return process


def wait_listening(host: str, port: int, *, timeout_s: float, process: subprocess.Popen) -> bool:
    """Wait until something accepts TCP connections on ``host:port``; ``False`` if the
    process exited or ``timeout_s`` passed first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def end_process_group(process: subprocess.Popen, *, grace_s: float = 15.0) -> int | None:
    """SIGTERM the process group ``process`` leads, SIGKILL it after ``grace_s``; reap the
    leader. Returns its exit code (``None`` if it could not be reaped).

    Notes:
        The group is signalled only while its leader has not been reaped, so the group id
        cannot belong to an unrelated process.
    """
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d did not end in %.0f s; killing its group", process.pid, grace_s)
    # the leader may be gone while other members remain (a ClientApp process)
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGKILL)
    else:
        _end_orphans(process.pid, grace_s)
    try:
        return process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _end_orphans(pgid: int, grace_s: float) -> None:
    """SIGTERM, then SIGKILL, what is left of group ``pgid`` after its leader exited."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while _group_alive(pgid):
        _signal_group(pgid, sig)
        if time.monotonic() >= deadline:
            sig = signal.SIGKILL
        time.sleep(0.2)
        if sig == signal.SIGKILL and time.monotonic() >= deadline + grace_s:
            break


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def live_process(pid: int) -> tuple[int, str] | None:
    """``(parent pid, start time in clock ticks)`` of a live process (Linux ``/proc``), or
    ``None`` when it is gone or a zombie. The start time tells a process from a later one
    that reuses its pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[1]), fields[19]) if fields[0] != "Z" else None


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` (also one that left its process group), with its
    start time, so that a pid reused later by an unrelated process is never signalled."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := live_process(int(entry.name))) is not None:
            children.setdefault(info[0], []).append((int(entry.name), info[1]))
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child, started = todo.pop()
        found[child] = started
        todo.extend(children.get(child, []))
    return found
