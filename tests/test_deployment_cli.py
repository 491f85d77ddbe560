"""``blossom-site join`` and ``blossom coordinator serve`` as an operator runs them: every
refusal before anything starts (exit 2, one line, no traceback, recorded in the site's audit
log, which still verifies), a SuperNode that joins a TLS SuperLink and ends with every child
process when the command is told to stop, and (slow) one round end to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from blossom_secure.audit import log as audit
from blossom_secure.crypto import identity_public_key
from blossom_secure.site.keys import load_identity_key
from blossom_secure.runtimes.flower import write_dev_certificates
from blossom_secure.runtimes.flower.processes import descendants, is_loopback_host, live_process, parse_address
from tests.conftest import allow_coordinators
from tests.test_flower_deployment import Processes, free_port, wait_listening

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def cli(*args: str, cwd: Path | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    name, *rest = args
    env = {k: v for k, v in os.environ.items() if k != "BLOSSOM_DEBUG"}
    env["COLUMNS"] = "400"
    return subprocess.run([str(BIN / name), *rest], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout_s)


def join_records(site_dir: Path) -> list[dict]:
    """The site's verified audit records of refused joins."""
    key = load_identity_key(site_dir / "keys")
    _, records = audit.read_verified_records(site_dir / "state" / "audit.jsonl", public_key=identity_public_key(key))
    return [r for r in records if r["event"] == audit.ERROR and r["details"].get("error_type") == "JoinRefused"]


@pytest.fixture
def site(tiny_sites, tmp_path) -> Path:
    """An initialised example site whose policy allows the coordinator 127.0.0.1:9092 and 10.0.0.5:9092."""
    allow_coordinators(tiny_sites, "127.0.0.1:9092", "10.0.0.5:9092")
    proc = cli("blossom-site", "init", str(tiny_sites / "st-mary"))
    assert proc.returncode == 0, proc.stderr
    return tiny_sites / "st-mary"


def assert_refused(proc: subprocess.CompletedProcess, site_dir: Path, before: int, words: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], proc.stderr
    refused = join_records(site_dir)  # verifies the whole log
    assert len(refused) == before + 1 and words in refused[-1]["details"]["message"]


def test_join_refuses_a_coordinator_the_policy_does_not_list(site):
    proc = cli("blossom-site", "join", str(site), "--coordinator", "127.0.0.1:9999", "--insecure")
    assert_refused(proc, site, 0, "'127.0.0.1:9999'")
    assert "policy.coordinators" in proc.stderr and "standard.toml" in proc.stderr


def test_join_refuses_insecure_to_another_machine(site):
    proc = cli("blossom-site", "join", str(site), "--coordinator", "10.0.0.5:9092", "--insecure")
    assert_refused(proc, site, 0, "--insecure is refused")


@pytest.mark.parametrize("content", [None, b"", b"not a certificate\n",
                                     b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_join_refuses_a_missing_or_malformed_ca_file(site, tmp_path, content):
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_bytes(content)
    proc = cli("blossom-site", "join", str(site), "--coordinator", "127.0.0.1:9092", "--root-certificates", str(ca))
    assert_refused(proc, site, 0, "--root-certificates")
    assert str(ca) in proc.stderr


def test_join_refuses_an_unreadable_ca_file(site, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.mkdir()  # unreadable as a file, whoever runs the test
    proc = cli("blossom-site", "join", str(site), "--coordinator", "127.0.0.1:9092", "--root-certificates", str(ca))
    assert_refused(proc, site, 0, "cannot read")


def test_join_refuses_a_malformed_address(site):
    proc = cli("blossom-site", "join", str(site), "--coordinator", "127.0.0.1", "--insecure")
    assert_refused(proc, site, 0, "HOST:PORT")


def test_join_refuses_invalid_site_files_before_anything(site, tmp_path):
    missing = cli("blossom-site", "join", str(tmp_path / "nowhere"), "--coordinator", "127.0.0.1:9092", "--insecure")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "site folder not found" in missing.stderr
    both = cli("blossom-site", "join", str(site), "--coordinator", "127.0.0.1:9092", "--insecure",
               "--root-certificates", str(tmp_path / "ca.pem"))
    assert both.returncode == 2 and both.stderr.startswith("error:") and "not allowed with" in both.stderr
    policy = site.parent.parent / "policies" / "standard.toml"
    policy.write_text(policy.read_text() + "\nbogus = 1\n")
    broken = cli("blossom-site", "join", str(site), "--coordinator", "127.0.0.1:9092", "--insecure")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr and "bogus: unknown key" in broken.stderr
    policy.write_text(policy.read_text().replace("\nbogus = 1\n", ""))
    fed = site.parent / "federation.toml"
    fed.write_text(fed.read_text().replace('id = "blossom-demo"', "id = 5"))
    broken = cli("blossom-site", "join", str(site), "--coordinator", "127.0.0.1:9092", "--insecure")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr and "federation.toml" in broken.stderr


def test_join_refuses_a_site_never_initialised(tiny_sites):
    allow_coordinators(tiny_sites, "127.0.0.1:9092")
    proc = cli("blossom-site", "join", str(tiny_sites / "riverside"), "--coordinator", "127.0.0.1:9092", "--insecure")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "blossom-site init" in proc.stderr


def test_roster_entry_prints_the_line_roster_toml_takes(site):
    proc = cli("blossom-site", "roster-entry", str(site))
    assert proc.returncode == 0, proc.stderr
    key = identity_public_key(load_identity_key(site / "keys")).hex()
    assert f'"st-mary" = "{key}"' in proc.stdout.splitlines()
    # the SuperNode key: created on first use (owner-only), the same line every time after
    node = cli("blossom-site", "roster-entry", str(site), "--node-key")
    assert node.returncode == 0, node.stderr
    line = node.stdout.splitlines()[-1]
    assert line.startswith('"st-mary" = "ecdsa-sha2-nistp384 ')
    # the guide pastes every line that is not a comment into roster.toml: nothing is wrapped
    for out in (proc.stdout, node.stdout):
        assert [x for x in out.splitlines() if not x.startswith("#")] == [out.splitlines()[-1]], out
    assert (site / "keys" / "flower-node.key").stat().st_mode & 0o777 == 0o600
    assert cli("blossom-site", "roster-entry", str(site), "--node-key").stdout.splitlines()[-1] == line


def test_addresses():
    assert parse_address("127.0.0.1:9092") == ("127.0.0.1", 9092)
    assert parse_address("[::1]:9092") == ("::1", 9092)
    for bad in ("127.0.0.1", "::1:9092", "host:0", "host:70000", ":9092", "host:port"):
        with pytest.raises(ValueError):
            parse_address(bad)
    assert is_loopback_host("localhost") and is_loopback_host("127.0.0.2") and is_loopback_host("::1")
    assert not is_loopback_host("10.0.0.5") and not is_loopback_host("coordinator.example.org")


@pytest.mark.deployment
@pytest.mark.parametrize("how", ["tls", "insecure"])
def test_join_runs_a_supernode_until_terminated(tiny_sites, tmp_path, how):
    port = free_port()
    address = f"127.0.0.1:{port}"
    allow_coordinators(tiny_sites, address)
    site_dir = tiny_sites / "st-mary"
    assert cli("blossom-site", "init", str(site_dir)).returncode == 0
    certs = write_dev_certificates(tmp_path / "certs").directory
    processes = Processes(tmp_path / "work")
    with ExitStack() as cleanup:
        cleanup.callback(processes.stop)
        tls = (["--ssl-ca-certfile", str(certs / "ca.pem"), "--ssl-certfile", str(certs / "server.pem"),
                "--ssl-keyfile", str(certs / "server.key")] if how == "tls" else ["--insecure"])
        link = processes.start("superlink", [str(BIN / "flower-superlink"), *tls, "--host", "127.0.0.1",
                                             "--port", str(port), "--disable-runtime-dependency-installation"])
        wait_listening(port, 90, link)
        env = {k: v for k, v in os.environ.items() if k != "BLOSSOM_DEBUG"}
        join = subprocess.Popen(
            [str(BIN / "blossom-site"), "join", str(site_dir), "--coordinator", address,
             *(["--root-certificates", str(certs / "ca.pem")] if how == "tls" else ["--insecure"])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        processes.started["join"] = join
        link_log = tmp_path / "work" / "superlink.log"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "Activated node_id=" not in link_log.read_text(errors="replace"):
            assert join.poll() is None, join.communicate()
            time.sleep(0.5)
        time.sleep(2)
        assert join.poll() is None, join.communicate()
        # the SuperLink activated the node, and the SuperNode learnt its id
        node = re.search(r"Activated node_id=(\d+)", link_log.read_text(errors="replace"))
        assert node is not None, link_log.read_text(errors="replace")
        assert f"SuperNode ID: {node.group(1)}" in (site_dir / "state" / "flower-supernode.log").read_text()
        children = descendants(join.pid)
        assert children  # the SuperNode (and whatever it started)
        join.send_signal(signal.SIGTERM)
        out, err = join.communicate(timeout=60)
        assert join.returncode == 0, (out, err)
        assert "Traceback" not in out + err
        assert "joining " + address in out
        assert ("warning: --insecure" in err) == (how == "insecure")
        time.sleep(1.0)
        assert [pid for pid, started in children.items() if (info := live_process(pid)) and info[1] == started] == []


def _records_so_far(site_dir: Path) -> list[dict]:
    """The audit records a running site has written (a line still being written is skipped)."""
    path = site_dir / "state" / "audit.jsonl"
    records = []
    for line in (path.read_text(errors="replace").splitlines() if path.exists() else []):
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _sent(records: list[dict], round_id: int, message_type: str) -> bool:
    return any(r["event"] == audit.EGRESS and r["round_id"] == round_id
               and r["details"]["message_type"] == message_type for r in records)


@pytest.mark.deployment
@pytest.mark.slow
def test_coordinator_killed_mid_round_resumes_without_undercount_or_double_send(tiny_sites_with_data, tmp_path):
    """``blossom coordinator serve`` killed with SIGKILL in the middle of round 1 (after round 0
    finished and after a site sent its masked input), then started again on the same --out:
    its SuperLink went with it, the restart continues from round 0's global blocks with round
    2 (round 1 is abandoned, its number never reused), the sites (``blossom-site join``) rejoin,
    no site's ledger under-counts and no site sent anything twice for one round."""
    import shutil

    from blossom_secure.site.agent import LEDGER_FILE

    sites = tmp_path / "sites"
    shutil.copytree(tiny_sites_with_data.parent / "policies", tmp_path / "policies")
    shutil.copytree(tiny_sites_with_data, sites, ignore=shutil.ignore_patterns("keys", "state"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    allow_coordinators(sites, address)
    dirs = sorted(d for d in sites.iterdir() if (d / "site.toml").is_file())
    entries = []
    node_entries = []
    for d in dirs:
        assert cli("blossom-site", "init", str(d)).returncode == 0
        entry = cli("blossom-site", "roster-entry", str(d))
        assert entry.returncode == 0, entry.stderr
        entries.append(entry.stdout.splitlines()[-1])
        node_entries.append(cli("blossom-site", "roster-entry", str(d), "--node-key").stdout.splitlines()[-1])
    roster = sites / "roster.toml"
    roster.write_text('[roster]\nfederation = "blossom-demo"\n\n[roster.sites]\n' + "\n".join(entries)
                      + "\n\n[roster.node_keys]\n" + "\n".join(node_entries) + "\n")
    assert cli("blossom", "dev", "certificates", str(tmp_path / "certs")).returncode == 0
    certs = tmp_path / "certs"
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "BLOSSOM_DEBUG"}
    processes = Processes(tmp_path / "work")
    (tmp_path / "work").mkdir()
    serve = [str(BIN / "blossom"), "coordinator", "serve", "--federation", str(sites / "federation.toml"),
             "--roster", str(roster), "--certificates", str(certs), "--address", address,
             "--out", str(out), "--wait-for-sites-s", "240", "--run-timeout-s", "900"]
    with ExitStack() as cleanup:
        cleanup.callback(processes.stop)
        for d in dirs:
            processes.start(f"join-{d.name}", [str(BIN / "blossom-site"), "join", str(d), "--coordinator", address,
                                               "--root-certificates", str(certs / "ca.pem"), "--supernode-auth"])
        first = processes.start("serve-1", [*serve, "--rounds", "2"])
        deadline = time.monotonic() + 900
        while not ((out / "coordinator-rounds.json").exists()
                   and any(_sent(_records_so_far(d), 1, "secagg.masked_input") for d in dirs)):
            assert first.poll() is None, (tmp_path / "work" / "serve-1.log").read_text()
            assert time.monotonic() < deadline, "round 1 never reached the masked input"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # the coordinator's process only, as `kill -9 PID` would
        first.wait(timeout=30)
        # its SuperLink ended with it (nothing listens on the port any more)
        link_gone = time.monotonic() + 60
        while time.monotonic() < link_gone:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the SuperLink outlived the coordinator killed with SIGKILL")
        link_pid = int(re.search(r"SuperLink \(pid (\d+)\)", (tmp_path / "work" / "serve-1.log").read_text()).group(1))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(link_pid, signal.SIGKILL)  # whatever of its group is left (nothing, normally)
        assert json.loads((out / "coordinator-state.json").read_text())["next_round"] == 2
        assert list(json.loads((out / "metrics.json").read_text())["blocks"]) == ["0"]

        again = subprocess.run([*serve, "--rounds", "1"], capture_output=True, text=True, env=env, timeout=960)
        assert again.returncode == 0, (again.stdout, again.stderr)
        assert "continuing from the global blocks after round 0" in again.stdout
        assert "SuperNode authentication on: the 4 node keys" in again.stdout
        assert "rounds 2 to 2" in again.stdout and "round 2: " in again.stdout and "aggregated" in again.stdout
        assert json.loads((out / "coordinator-state.json").read_text())["next_round"] == 3
        doc = json.loads((out / "metrics.json").read_text())
        assert list(doc["blocks"]) == ["0", "2"]  # round 0 kept, round 1 abandoned
        assert all(p.poll() is None for p in processes.started.values() if p is not first)  # sites still joined
    assert all(p.poll() is not None for p in processes.started.values())
    assert processes.alive_after_stop == []
    for d in dirs:
        assert join_records(d) == []  # no refused join; verifies the whole log
        key = load_identity_key(d / "keys")
        _, records = audit.read_verified_records(d / "state" / "audit.jsonl", public_key=identity_public_key(key))
        egress = [(r["round_id"], r["details"]["message_type"]) for r in records
                  if r["event"] == audit.EGRESS and r["round_id"] is not None]
        assert len(egress) == len(set(egress)), f"{d.name} sent something twice for one round: {egress}"
        assert {r for r, _ in egress} == {0, 1, 2}
        trained = sorted(r["round_id"] for r in records if r["event"] == audit.TRAINING_FINISHED)
        ledger = json.loads((d / "state" / LEDGER_FILE).read_text())
        charged = sorted(e["round_id"] for e in ledger["entries"])
        assert trained and set(trained) <= set(charged), f"{d.name}: the ledger under-counts {trained} vs {charged}"
        assert 1 in charged  # the abandoned round's training stays charged


def _serve_args(sites: Path, roster: Path, certs: Path, out: Path, port: int) -> list[str]:
    return ["blossom", "coordinator", "serve", "--federation", str(sites / "federation.toml"), "--roster",
            str(roster), "--certificates", str(certs), "--address", f"127.0.0.1:{port}", "--rounds", "1",
            "--out", str(out)]


@pytest.fixture
def roster(tiny_sites) -> Path:
    entries = []
    for name in ("st-mary", "northgate"):
        assert cli("blossom-site", "init", str(tiny_sites / name)).returncode == 0
        entries.append(cli("blossom-site", "roster-entry", str(tiny_sites / name)).stdout.splitlines()[-1])
    path = tiny_sites / "roster.toml"
    path.write_text('[roster]\nfederation = "blossom-demo"\n\n[roster.sites]\n' + "\n".join(entries) + "\n")
    return path


def test_serve_refuses_bad_certificates_and_a_foreign_round_counter(tiny_sites, roster, tmp_path):
    certs = tmp_path / "certs"
    write_dev_certificates(certs)
    (certs / "server.key").unlink()
    proc = cli(*_serve_args(tiny_sites, roster, certs, tmp_path / "out", free_port()))
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "server.key" in proc.stderr
    assert "Traceback" not in proc.stderr
    (certs / "server.pem").write_text("not a certificate\n")
    proc = cli(*_serve_args(tiny_sites, roster, certs, tmp_path / "out", free_port()))
    assert proc.returncode == 2 and "server.pem" in proc.stderr and "Traceback" not in proc.stderr
    write_dev_certificates(certs, force=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "coordinator-state.json").write_text('{"format": 1, "federation": "other", "next_round": 3}')
    proc = cli(*_serve_args(tiny_sites, roster, certs, tmp_path / "out", free_port()))
    assert proc.returncode == 2 and "'other'" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli(*_serve_args(tiny_sites, roster, certs, tmp_path / "out", free_port())[:-4], "--address", "nowhere")
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr


def test_serve_refuses_insecure_off_loopback_and_a_tampered_checkpoint(tiny_sites, roster, tmp_path):
    certs = tmp_path / "certs"
    write_dev_certificates(certs)
    args = _serve_args(tiny_sites, roster, certs, tmp_path / "out", free_port())
    insecure = args[:args.index("--certificates")] + ["--insecure"] + args[args.index("--certificates") + 2:]
    insecure[insecure.index("--address") + 1] = "10.0.0.5:9092"
    proc = cli(*insecure)
    assert proc.returncode == 2 and "--insecure is refused for 10.0.0.5:9092" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "flower-superlink.log").exists()
    both = cli(*args, "--insecure")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    # a checkpoint that is not the one the coordinator wrote: refused before the SuperLink starts
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "coordinator-rounds.json").write_text('{"format": 1}')
    proc = cli(*args)
    assert proc.returncode == 2 and "coordinator-rounds.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "flower-superlink.log").exists()


@pytest.mark.deployment
@pytest.mark.parametrize("how", ["tls", "insecure"])
def test_serve_exits_4_and_stops_the_superlink_when_no_site_joins(tiny_sites, roster, tmp_path, how):
    certs = tmp_path / "certs"
    write_dev_certificates(certs)
    port = free_port()
    args = _serve_args(tiny_sites, roster, certs, tmp_path / "out", port)
    if how == "insecure":
        args[args.index("--certificates"):args.index("--certificates") + 2] = ["--insecure"]
    proc = cli(*args, "--wait-for-sites-s", "2", timeout_s=300)
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    assert ("warning: --insecure: no TLS" in proc.stderr) == (how == "insecure")
    assert proc.stderr.splitlines()[-1].startswith("error: the run ended") and "Traceback" not in proc.stderr
    assert "SuperLink stopped" in proc.stdout
    # the round numbers stay reserved, and nothing listens any more
    assert json.loads((tmp_path / "out" / "coordinator-state.json").read_text())["next_round"] == 1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
