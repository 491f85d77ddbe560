"""`blossom-site init / audit verify / audit review / budget`, as real subprocesses, on
the audit logs a real (tiny) federation run leaves behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from blossom_secure.crypto import generate_identity_key, identity_key_to_pem, identity_public_key
from tests.test_cli import assert_clean_failure, cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federated_sites(tmp_path_factory, tiny_sites_with_data):
    """The tiny federation after a 2-round secure run (shared by this module's tests;
    tests that tamper work on copies)."""
    import shutil

    root = tmp_path_factory.mktemp("fed")
    shutil.copytree(tiny_sites_with_data.parent / "policies", root / "policies")
    shutil.copytree(tiny_sites_with_data, root / "sites")
    proc = cli("blossom", "simulate", "--sites", str(root / "sites"), "--out", str(root / "run"), "--quick")
    assert proc.returncode == 0, proc.stderr
    return root / "sites"


@pytest.fixture
def site_copy(tmp_path, federated_sites):
    import shutil

    shutil.copytree(federated_sites.parent / "policies", tmp_path / "policies")
    shutil.copytree(federated_sites, tmp_path / "sites")
    return tmp_path / "sites" / "st-mary"


def log_lines(site: Path) -> list[bytes]:
    return (site / "state" / "audit.jsonl").read_bytes().splitlines(keepends=True)


def write_lines(site: Path, lines: list[bytes]) -> None:
    (site / "state" / "audit.jsonl").write_bytes(b"".join(lines))


def test_init_creates_key_once(copy_sites):
    sites = copy_sites()
    site = sites / "riverside"
    proc = cli("blossom-site", "init", str(site))
    assert proc.returncode == 0, proc.stderr
    assert "created identity key" in proc.stdout and "fingerprint:" in proc.stdout
    key = site / "keys" / "identity.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    again = cli("blossom-site", "init", str(site))
    assert again.returncode == 0 and "never overwritten" in again.stdout
    assert key.read_bytes() == before
    assert cli("blossom-site", "audit", "verify", str(site)).returncode == 0


def test_every_site_log_verifies_after_a_federation(federated_sites):
    for site in sorted(p.parent for p in federated_sites.glob("*/site.toml")):
        proc = cli("blossom-site", "audit", "verify", str(site))
        assert proc.returncode == 0, (site, proc.stderr)
        assert "audit log intact" in proc.stdout


def test_egress_records_name_only_policy_blocks_and_no_head(federated_sites):
    from blossom_secure.config import load_federation
    from blossom_secure.site.config import load_site

    fed = load_federation(federated_sites / "federation.toml")
    for site_dir in sorted(p.parent for p in federated_sites.glob("*/site.toml")):
        site = load_site(site_dir, federation=fed)
        records = [json.loads(l) for l in log_lines(site_dir)]
        egress = [r for r in records if r["event"] == "egress"]
        assert egress, site.id
        for r in egress:
            for block in r["details"]["blocks"]:
                assert site.policy.is_shareable(block) and not block.startswith("head.")
            assert r["policy_sha256"] == site.policy.sha256


def test_review_prints_tables_and_writes_html(federated_sites, tmp_path):
    html = tmp_path / "report.html"
    proc = cli("blossom-site", "audit", "review", str(federated_sites / "lakeside"), "--html", str(html))
    assert proc.returncode == 0, proc.stderr
    assert "encoder.image" in proc.stdout
    page = html.read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert "http://" not in page and "https://" not in page
    one = cli("blossom-site", "audit", "review", str(federated_sites / "lakeside"), "--round", "1")
    assert one.returncode == 0
    assert_clean_failure(cli("blossom-site", "audit", "review", str(federated_sites / "lakeside"), "--round", "99"), 2)


def test_budget_shows_rounds(federated_sites):
    proc = cli("blossom-site", "budget", str(federated_sites / "northgate"))
    assert proc.returncode == 0, proc.stderr
    assert "remaining" in proc.stdout and "epsilon total" in proc.stdout


def _edit_field(site):
    lines = log_lines(site)
    record = json.loads(lines[3])
    lines[3] = lines[3].replace(b'"round_id":0', b'"round_id":1') if b'"round_id":0' in lines[3] else \
        lines[3].replace(record["site_id"].encode(), b"evil-site")
    write_lines(site, lines)
    return 4


def _delete_record(site):
    lines = log_lines(site)
    del lines[2]
    write_lines(site, lines)
    return 3


def _reorder(site):
    lines = log_lines(site)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(site, lines)
    return 3


def _insert_forged(site):
    lines = log_lines(site)
    forged = json.loads(lines[2])
    forged["details"] = {"reason": "nothing to see"}
    forged["event"] = "round_declined"
    from blossom_secure.audit.log import canonical_bytes

    lines.insert(3, canonical_bytes(forged) + b"\n")
    write_lines(site, lines)
    return 4


def _truncate_tail(site):
    lines = log_lines(site)
    write_lines(site, lines[:-3])
    return len(lines) - 2  # the first missing record's line


def _other_key(site):
    from blossom_secure.audit import log as audit

    other = generate_identity_key()
    lines = log_lines(site)
    records = [json.loads(l) for l in lines]
    r = records[-1]
    rebuilt = audit.build_record(seq=r["seq"], time_utc=r["time_utc"], site_id=r["site_id"], round_id=r["round_id"],
                                 event=r["event"], details=r["details"], policy_sha256=r["policy_sha256"],
                                 prev_hash=r["prev_sha256"], signing_key=other)
    lines[-1] = audit.canonical_bytes(rebuilt) + b"\n"
    write_lines(site, lines)
    return len(lines)


@pytest.mark.parametrize("tamper", [_edit_field, _delete_record, _reorder, _insert_forged, _truncate_tail, _other_key],
                         ids=["edited_field", "deleted_record", "reordered_records", "inserted_forged_record",
                              "truncated_tail", "signed_with_other_key"])
def test_tampering_makes_verify_exit_1_naming_the_record(site_copy, tamper):
    line = tamper(site_copy)
    proc = cli("blossom-site", "audit", "verify", str(site_copy))
    assert_clean_failure(proc, 1)
    assert f"line {line}" in proc.stderr, proc.stderr


def test_replaced_key_is_caught_by_fingerprint(site_copy):
    good = cli("blossom-site", "audit", "verify", str(site_copy))
    assert good.returncode == 0
    fingerprint = good.stdout.split("signed by key ")[1].split(";")[0]
    key = site_copy / "keys" / "identity.pem"
    key.unlink()
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, identity_key_to_pem(generate_identity_key()))
    os.close(fd)
    proc = cli("blossom-site", "audit", "verify", str(site_copy), "--fingerprint", fingerprint)
    assert_clean_failure(proc, 1)
    assert "key was replaced" in proc.stderr


def test_corrupt_log_line_and_missing_log(site_copy):
    lines = log_lines(site_copy)
    lines[1] = b"{not json\n"
    write_lines(site_copy, lines)
    proc = cli("blossom-site", "audit", "verify", str(site_copy))
    assert_clean_failure(proc, 1)
    assert "line 2" in proc.stderr
    (site_copy / "state" / "audit.jsonl").unlink()
    (site_copy / "state" / "audit.head.json").unlink()
    assert_clean_failure(cli("blossom-site", "audit", "verify", str(site_copy)), 2)


def test_unreadable_key_is_input_error(site_copy):
    os.chmod(site_copy / "keys" / "identity.pem", 0o644)
    proc = cli("blossom-site", "audit", "verify", str(site_copy))
    assert_clean_failure(proc, 2)
    assert "chmod 600" in proc.stderr


def _auditor_copy(site: Path, dest: Path) -> Path:
    """What an auditor holds: the log and its checkpoint, no site folder, no private key."""
    dest.mkdir()
    for name in ("audit.jsonl", "audit.head.json"):
        (dest / name).write_bytes((site / "state" / name).read_bytes())
    return dest / "audit.jsonl"


def test_verify_with_the_public_key_only(federated_sites, tmp_path):
    """An external auditor verifies with the site's PUBLIC key (PEM, hex, or the roster):
    no private key is read; --fingerprint still pins it; another key fails with exit 1."""
    site = federated_sites / "st-mary"
    log = _auditor_copy(site, tmp_path / "auditor")
    pem = cli("blossom-site", "roster-entry", str(site), "--pem")
    assert pem.returncode == 0 and pem.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    (tmp_path / "st-mary.pub.pem").write_text(pem.stdout)
    entry = cli("blossom-site", "roster-entry", str(site))
    fingerprint = entry.stdout.split("key fingerprint ")[1].split()[0]
    hex_key = entry.stdout.splitlines()[1].split('"')[3]
    (tmp_path / "st-mary.hex").write_text(hex_key + "\n")
    from blossom_secure.config import load_federation
    from blossom_secure.roster import write_roster

    keys = {}
    for d in sorted(p.parent for p in federated_sites.glob("*/site.toml")):
        line = cli("blossom-site", "roster-entry", str(d)).stdout.splitlines()[1]
        keys[line.split('"')[1]] = bytes.fromhex(line.split('"')[3])
    roster = write_roster(tmp_path / "roster.toml", federation=load_federation(federated_sites / "federation.toml"),
                          keys=keys)
    for key_args in (["--public-key", str(tmp_path / "st-mary.pub.pem")], ["--public-key", str(tmp_path / "st-mary.hex")],
                     ["--public-key", hex_key], ["--roster", str(roster), "--site", "st-mary"]):
        proc = cli("blossom-site", "audit", "verify", str(log), *key_args, "--fingerprint", fingerprint)
        assert proc.returncode == 0, (key_args, proc.stderr)
        assert "audit log intact" in proc.stdout and "it matches --fingerprint" in proc.stdout
    # the roster entry of another site: its key did not sign this log
    proc = cli("blossom-site", "audit", "verify", str(log), "--roster", str(roster), "--site", "riverside")
    assert_clean_failure(proc, 1)
    # a pinned fingerprint that differs
    proc = cli("blossom-site", "audit", "verify", str(log), "--public-key", hex_key, "--fingerprint",
               "0000:0000:0000:0000:0000:0000:0000:0000")
    assert_clean_failure(proc, 1)
    assert "not the key recorded out of band" in proc.stderr
    # tampering is found with the public key alone
    lines = log.read_bytes().splitlines(keepends=True)
    del lines[2]
    log.write_bytes(b"".join(lines))
    proc = cli("blossom-site", "audit", "verify", str(log), "--public-key", hex_key)
    assert_clean_failure(proc, 1)
    assert "line 3" in proc.stderr


def test_public_key_file_may_hold_the_roster_entry_as_printed(tiny_sites, tmp_path):
    """`roster-entry SITE > FILE` (its comment line included) is a key file `--public-key`
    takes, as the operator guide says; the comment's fingerprint is never what is trusted."""
    site = tiny_sites / "riverside"
    assert cli("blossom-site", "init", str(site)).returncode == 0
    log = _auditor_copy(site, tmp_path / "auditor")
    entry = cli("blossom-site", "roster-entry", str(site))
    assert entry.returncode == 0 and entry.stdout.startswith("# riverside: key fingerprint ")
    fingerprint = entry.stdout.split("key fingerprint ")[1].split()[0]
    key_file = tmp_path / "riverside.roster-entry"
    key_file.write_text(entry.stdout)
    proc = cli("blossom-site", "audit", "verify", str(log), "--public-key", str(key_file), "--fingerprint", fingerprint)
    assert proc.returncode == 0, proc.stderr
    assert f"public-key file {key_file}" in proc.stdout and "it matches --fingerprint" in proc.stdout
    # two entries in one file are refused (which key would be meant?)
    other = identity_public_key(generate_identity_key()).hex()
    key_file.write_text(entry.stdout + f'"other" = "{other}"\n')
    assert_clean_failure(cli("blossom-site", "audit", "verify", str(log), "--public-key", str(key_file)), 2)


def test_review_with_the_public_key_states_what_was_verified(federated_sites, tmp_path):
    site = federated_sites / "lakeside"
    log = _auditor_copy(site, tmp_path / "auditor")
    hex_key = cli("blossom-site", "roster-entry", str(site)).stdout.splitlines()[1].split('"')[3]
    html = tmp_path / "review.html"
    proc = cli("blossom-site", "audit", "review", str(log), "--public-key", hex_key, "--html", str(html))
    assert proc.returncode == 0, proc.stderr
    page = html.read_text()
    assert "VERIFIED at" in page and "--public-key (hex)" in page and "NOT VERIFIED" not in page
    assert "the privacy ledger was not read" in page  # an auditor's copy has no ledger
    # with the site folder, the ledger's total is shown and agrees with the log
    proc = cli("blossom-site", "audit", "review", str(site), "--html", str(html))
    assert proc.returncode == 0, proc.stderr
    assert "the signed audit log proves the same" in " ".join(proc.stdout.split())
    page = html.read_text()
    assert "the site&#x27;s key file" in page or "the site's key file" in page


def test_html_counts_protocol_bytes_apart_and_names_the_recipient(federated_sites, tmp_path):
    """Key advertisements, shares and signatures are protocol bytes, never model bytes; only
    masked inputs carry block values, and every message went to the coordinator."""
    records = [json.loads(line) for line in log_lines(federated_sites / "st-mary")]
    egress = [r["details"] for r in records if r["event"] == "egress"]
    assert egress and all(d["recipient"] == "coordinator" for d in egress)
    for d in egress:
        if d["message_type"] == "secagg.masked_input":
            assert all(d["block_bytes"][b] == 4 * (d["shapes"][b][0] + 1) for b in d["blocks"])
        else:
            assert not any(d.get("block_bytes", {}).values())
    from blossom_secure.audit.report import summarise

    review = summarise(records)
    assert not any(t.estimated for t in review.block_totals)
    html = tmp_path / "r.html"
    proc = cli("blossom-site", "audit", "review", str(federated_sites / "st-mary"), "--html", str(html))
    assert proc.returncode == 0, proc.stderr
    page = html.read_text()
    assert "<td>coordinator</td>" in page and "of protocol messages" in page and "(~split)" not in page


@pytest.mark.parametrize("command", [("audit", "verify"), ("audit", "review"), ("budget",), ("roster-entry",)],
                         ids=["audit_verify", "audit_review", "budget", "roster_entry"])
def test_log_only_commands_load_no_machine_learning_stack(federated_sites, command):
    """The commands that only read the log, the ledger or the key answer in about a second:
    they import neither torch, nor MONAI, nor Opacus."""
    import subprocess
    import sys

    probe = ("import sys\nfrom blossom_secure.cli import run\nfrom blossom_secure.cli.site import main\n"
             f"code = run(main, {[*command, str(federated_sites / 'st-mary')]!r})\n"
             "print('LOADED:' + ','.join(m for m in ('torch', 'monai', 'opacus') if m in sys.modules), code)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    line = [x for x in done.stdout.splitlines() if x.startswith("LOADED:")]
    assert line == ["LOADED: 0"], (done.stdout[-500:], done.stderr[-500:])
