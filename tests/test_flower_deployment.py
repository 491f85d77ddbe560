"""The deployment runtime on Flower's engine, on loopback with TLS: a SuperLink, one
SuperNode per example site (four), two rounds started over the Control API. The global
blocks after each round equal the embedded runtime's on the same seeds within the
quantisation bound, every site's audit log verifies and accounts for every byte the
coordinator took, and every process started here is ended here.

Needs ``flwr`` (the ``flower`` extra) and a few minutes: marked ``deployment`` and ``slow``.
"""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

import flwr  # noqa: E402,F401 - the flower extra is part of the README install; missing it is a failure

from blossom_secure.config import load_federation  # noqa: E402

from blossom_secure.site.config import load_site, site_dirs
from blossom_secure.runtimes.flower import write_dev_certificates  # noqa: E402
from blossom_secure.runtimes.flower.control import start_run, stop_run, wait_for_run  # noqa: E402
from blossom_secure.runtimes.flower.processes import descendants, live_process  # noqa: E402
from blossom_secure.roster import load_roster  # noqa: E402
from blossom_secure.secagg.terms import secagg_params  # noqa: E402
from tests.conftest import allow_coordinators  # noqa: E402
from tests.test_flower_rounds import SEED, flower_copy, records_of  # noqa: E402

pytestmark = [pytest.mark.deployment, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # from flwr's own dependencies

BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 480


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process on port {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


class Processes:
    """Processes started here, each in its own session (process group), all ended in ``stop``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.started: dict[str, subprocess.Popen] = {}
        self.alive_after_stop: list[int] = []

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        home = self.work / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_HOME=str(home),
                   FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps its own copy
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.work,
                                   start_new_session=True)
        log.close()
        self.started[name] = process
        return process

    def _signal(self, pid: int, started: str, sig: int) -> bool:
        info = live_process(pid)
        if info is None or info[1] != started:
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def kill(self, name: str, *, timeout_s: float = 30) -> list[int]:
        """Crash ``name``: SIGKILL its process group and every descendant (also one that left
        the group) at once, so nothing runs its clean-up; wait until none is alive. Returns
        the pids killed. A later :meth:`start` under the same name restarts it.

        Raises:
            RuntimeError: a process survived ``timeout_s``.
        """
        process = self.started[name]
        targets = descendants(process.pid)
        if (leader := live_process(process.pid)) is not None:
            targets[process.pid] = leader[1]
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid, started in targets.items():
            self._signal(pid, started, signal.SIGKILL)
        process.wait(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while (alive := [pid for pid, started in targets.items()
                         if (info := live_process(pid)) is not None and info[1] == started]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: pid(s) {alive} still alive {timeout_s} s after SIGKILL")
            time.sleep(0.1)
        return sorted(targets)

    def stop(self) -> list[int]:
        """SIGTERM each process group started here and every descendant (also one that left
        its group), SIGKILL after 15 s whatever is left. Returns the pids that needed SIGKILL."""
        targets: dict[int, str] = {}
        for process in self.started.values():
            if process.poll() is None:
                targets.update(descendants(process.pid))
                try:
                    os.killpg(process.pid, signal.SIGTERM)  # the leader is alive: the group is ours
                except ProcessLookupError:
                    pass
        for pid, started in targets.items():
            self._signal(pid, started, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (any(p.poll() is None for p in self.started.values())
                                               or any(live_process(pid) for pid in targets)):
            time.sleep(0.2)
        killed = [pid for pid, started in targets.items() if self._signal(pid, started, signal.SIGKILL)]
        for process in self.started.values():
            if process.poll() is None:
                process.kill()
                killed.append(process.pid)
        time.sleep(1.0)
        self.alive_after_stop = [pid for pid, started in targets.items()
                                 if (info := live_process(pid)) is not None and info[1] == started]
        for process in self.started.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return killed


def start_tls_superlink(processes: Processes, certs: Path, port: int, *, supernode_auth: bool = False
                        ) -> subprocess.Popen:
    """A SuperLink on loopback with the TLS files of ``certs`` (ca.pem, server.pem,
    server.key), as ``blossom coordinator serve`` starts it; returns once it listens."""
    from blossom_secure.runtimes.flower.processes import superlink_command

    link = processes.start("superlink", superlink_command(
        host="127.0.0.1", port=port, certificates=(certs / "ca.pem", certs / "server.pem", certs / "server.key"),
        supernode_auth=supernode_auth))
    wait_listening(port, 90, link)
    return link


ROUNDS = 2


@pytest.fixture(scope="module")
def embedded_rounds(tiny_sites_with_data, tmp_path_factory):
    """``ROUNDS`` secure rounds of the embedded runtime on the same seed: the reports of
    each round and the global blocks after the last one (the reference)."""
    import shutil

    from blossom_secure.runtimes.embedded.federation import simulate

    dest = tmp_path_factory.mktemp("embedded-rounds")
    shutil.copytree(tiny_sites_with_data.parent / "policies", dest / "policies")
    shutil.copytree(tiny_sites_with_data, dest / "sites")
    result = simulate(sites_root=dest / "sites", rounds=ROUNDS, out_dir=dest / "out", seed=SEED, secure=True)
    with np.load(result.out_dir / "global_blocks.npz") as g:
        blocks = {k: g[k] for k in g.files}
    return result.rounds, blocks


def test_two_rounds_of_four_supernodes_over_tls_equal_the_embedded_runtime(tiny_sites_with_data, tmp_path,
                                                                           embedded_rounds):
    sites = flower_copy(tiny_sites_with_data, tmp_path)
    dirs = site_dirs(sites)
    ids = [load_site(d).id for d in dirs]
    assert len(ids) == 4
    certs = write_dev_certificates(tmp_path / "certs", site_ids=ids)
    ca = certs.directory / "ca.pem"
    link_port = free_port()
    superlink = f"127.0.0.1:{link_port}"
    allow_coordinators(sites, superlink)
    out = tmp_path / "out"
    processes = Processes(tmp_path / "work")
    with ExitStack() as cleanup:
        cleanup.callback(processes.stop)
        start_tls_superlink(processes, certs.directory, link_port)
        for site_dir, site_id in zip(dirs, ids, strict=True):
            processes.start(f"supernode-{site_id}", [
                str(BIN / "flower-supernode"), "--root-certificates", str(ca), "--superlink", superlink,
                "--node-config", f'site-dir="{site_dir}" coordinator="{superlink}" simulation-seed={SEED}',
                "--host", "127.0.0.1", "--port", str(free_port())])
        run_id = start_run(superlink, root_certificates=ca, run_config={
            "federation-file": str(sites / "federation.toml"), "out-dir": str(out), "rounds": ROUNDS, "seed": SEED,
            "stage-timeout-s": 300.0, "wait-for-sites-s": 180.0})
        status = wait_for_run(superlink, root_certificates=ca, run_id=run_id, timeout_s=RUN_TIMEOUT_S)
        if status.status != "finished":
            stop_run(superlink, root_certificates=ca, run_id=run_id)
        logs = {p.name: p.read_text(errors="replace")[-3000:] for p in (tmp_path / "work").glob("*.log")}
        assert (status.status, status.sub_status) == ("finished", "completed"), (status, logs)
    # every process started here (and every process they started) has ended
    assert all(p.poll() is not None for p in processes.started.values())
    assert processes.alive_after_stop == []

    doc = json.loads((out / "metrics.json").read_text())
    reference_reports, reference_blocks = embedded_rounds
    assert [r.round_id for r in reference_reports] == list(range(ROUNDS))
    assert sorted(doc["blocks"], key=int) == [str(r) for r in range(ROUNDS)]
    for report in reference_reports:
        # the same blocks aggregated from the same contributors in every round
        assert doc["blocks"][str(report.round_id)] == report.blocks, report.round_id
        # the same training and evaluation at every site: what each site released matches
        for row in (r for r in doc["metrics"] if r["round"] == report.round_id):
            view = report.sites[row["site"]]
            assert row["value"] == view["tasks"][row["task"]]["accuracy"], row
            assert (row["epsilon"], row["declined"]) == (view["epsilon"], view["declined"]), row
    trained = {(row["round"], row["site"]) for row in doc["metrics"] if not row["declined"]}
    assert trained == {(r, site) for r in range(ROUNDS) for site in ids}  # every site, every round
    federation = load_federation(sites / "federation.toml")
    roster = load_roster(sites / "roster.toml", federation=federation)
    bound = 2.0 ** -(secagg_params(federation, roster_size=len(roster)).scale_bits + 1) + 1e-6
    with np.load(out / "global_blocks.npz") as g:
        assert set(g.files) == set(reference_blocks)
        for block in g.files:
            assert np.abs(g[block].astype(np.float64) - reference_blocks[block]).max() <= bound, block
    for site_dir in dirs:
        records = records_of(site_dir, roster)  # verifies the whole log
        site_id = records[0]["site_id"]
        for round_id in range(ROUNDS):
            logged = sum(r["details"]["payload_bytes"] for r in records
                         if r["event"] == "egress" and r["round_id"] == round_id)
            assert logged == doc["bytes_received"][str(round_id)][site_id] > 0, (site_id, round_id)
        assert any(r["event"] == "egress" and r["details"]["message_type"] == "identify" for r in records)


def test_superlink_admits_only_registered_supernodes_that_trust_its_ca(tiny_sites, tmp_path):
    """SuperNode authentication and TLS, on real processes: with ``--enable-supernode-auth``
    only the SuperNode whose key the coordinator registered is activated; one with a key
    of its own (not in the roster) and one that trusts another CA (a look-alike SuperLink's)
    are never activated."""
    from blossom_secure.runtimes.flower.control import register_supernodes
    from blossom_secure.runtimes.flower.processes import supernode_command
    from blossom_secure.site.keys import load_or_create_node_key

    certs = write_dev_certificates(tmp_path / "certs").directory
    foreign = write_dev_certificates(tmp_path / "foreign-ca").directory
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    registered, _ = load_or_create_node_key(tmp_path / "registered")
    stranger, _ = load_or_create_node_key(tmp_path / "stranger")
    _, registered_line = load_or_create_node_key(tmp_path / "registered")
    processes = Processes(tmp_path / "work")
    with ExitStack() as cleanup:
        cleanup.callback(processes.stop)
        start_tls_superlink(processes, certs, port, supernode_auth=True)
        nodes = register_supernodes(superlink, root_certificates=certs / "ca.pem",
                                    node_keys={"st-mary": registered_line})
        site = tiny_sites / "st-mary"
        for name, key, ca in (("registered", registered, certs), ("stranger", stranger, certs),
                              ("foreign-ca", registered, foreign)):
            processes.start(f"supernode-{name}", supernode_command(
                superlink=superlink, site_dir=site, root_certificates=ca / "ca.pem", local_port=free_port(),
                node_key=key))
        link_log = tmp_path / "work" / "superlink.log"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "Activated node_id=" not in link_log.read_text(errors="replace"):
            time.sleep(0.5)
        time.sleep(10)  # give the other two every chance to be (wrongly) activated
        log = link_log.read_text(errors="replace")
    activated = {int(n) for n in re.findall(r"Activated node_id=(\d+)", log)}
    assert activated == {nodes["st-mary"]}, log[-3000:]
    foreign_log = (tmp_path / "work" / "supernode-foreign-ca.log").read_text(errors="replace")
    assert "CERTIFICATE_VERIFY_FAILED" in foreign_log or "certificate verify failed" in foreign_log, foreign_log[-2000:]
    assert all(p.poll() is not None for p in processes.started.values())
    assert processes.alive_after_stop == []
