"""The real commands, run in subprocesses: exit codes, one clear line per problem, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    name, *rest = args
    env = {k: v for k, v in os.environ.items() if k != "BLOSSOM_DEBUG"}
    env["COLUMNS"] = "200"
    return subprocess.run([str(BIN / name), *rest], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def assert_clean_failure(proc: subprocess.CompletedProcess, code: int) -> None:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("error:")


def test_check_valid_site(copy_sites):
    sites = copy_sites()
    proc = cli("blossom-site", "check", str(sites / "lakeside"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "valid" in out
    assert "head.malignancy" in out and "task heads never leave" in out
    assert "fusion" in out and "not shareable by policy" in out
    assert "with imaging study" in out and "with clinical features" in out
    assert "dropped: no label for any task" in out and "rows in the clinical CSV" in out


def test_check_broken_policy_lists_every_problem(copy_sites):
    sites = copy_sites()
    policy = sites.parent / "policies" / "standard.toml"
    policy.write_text(policy.read_text().replace('"fusion"', '"head.malignancy"')
                      .replace("delta = 1e-5", "delta = 5.0") + "\nbogus = 1\n")
    proc = cli("blossom-site", "check", str(sites / "st-mary"))
    assert_clean_failure(proc, 2)
    lines = [line.strip() for line in proc.stderr.splitlines()]
    assert any("standard.toml: sharing.shareable:" in l and "task heads never leave" in l for l in lines)
    assert any("standard.toml: privacy.delta: must be less than 0.01" in l for l in lines)
    assert any("standard.toml: reporting.bogus: unknown key" in l for l in lines)
    assert "3 problems" in lines[0]


def test_check_broken_site_file(copy_sites):
    sites = copy_sites()
    site = sites / "riverside" / "site.toml"
    site.write_text(site.read_text().replace('modalities = ["tabular"]', 'modalities = "tabular"'))
    proc = cli("blossom-site", "check", str(sites / "riverside"))
    assert_clean_failure(proc, 2)
    assert "site.toml: data.modalities: must be a list, not a string" in proc.stderr


def test_check_bad_data(copy_sites):
    sites = copy_sites()
    csv = sites / "riverside" / "data" / "clinical.csv"
    lines = csv.read_text().splitlines()
    lines[1] = lines[1].replace(lines[1].split(",")[1], "not-a-number", 1)
    csv.write_text("\n".join(lines) + "\n")
    proc = cli("blossom-site", "check", str(sites / "riverside"))
    assert_clean_failure(proc, 2)
    assert "clinical.csv" in proc.stderr


def test_check_missing_folder_and_bad_arguments(tmp_path):
    assert_clean_failure(cli("blossom-site", "check", str(tmp_path / "nowhere")), 2)
    assert_clean_failure(cli("blossom-site", "frobnicate"), 2)
    assert_clean_failure(cli("blossom", "simulate", "--rounds", "two", "--out", str(tmp_path)), 2)
    assert_clean_failure(cli("blossom", "simulate", "--out", str(tmp_path), "--mode", "full-model"), 2)


def _modules_loaded_by(argv: list[str]) -> tuple[int, list[str]]:
    """Run ``blossom-site ARGV`` in a fresh interpreter; its exit code and which of torch,
    MONAI and Opacus it imported."""
    probe = ("import sys\nfrom blossom_secure.cli import run\nfrom blossom_secure.cli.site import main\n"
             f"code = run(main, {argv!r})\n"
             "print('LOADED:' + ','.join(m for m in ('torch', 'monai', 'opacus') if m in sys.modules), code)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600, check=False)
    line = [x for x in done.stdout.splitlines() if x.startswith("LOADED:")]
    assert len(line) == 1, (done.stdout[-500:], done.stderr[-500:])
    loaded, _, code = line[0].removeprefix("LOADED:").rpartition(" ")
    return int(code), [m for m in loaded.split(",") if m]


def test_check_decodes_with_the_imaging_stack_but_never_loads_opacus(copy_sites):
    """`check` trains nothing: it imports MONAI and torch, which decode the studies as
    training does, and not Opacus (seconds of every check)."""
    code, loaded = _modules_loaded_by(["check", str(copy_sites() / "st-mary")])
    assert code == 0 and loaded == ["torch", "monai"]


def test_check_of_an_example_site_without_data_answers_before_loading_the_imaging_stack(tiny_sites):
    code, loaded = _modules_loaded_by(["check", str(tiny_sites / "st-mary")])
    assert code == 2 and loaded == []


@pytest.mark.slow
def test_simulate_quick_writes_metrics(copy_sites, tmp_path):
    sites = copy_sites()
    proc = cli("blossom", "simulate", "--sites", str(sites), "--out", str(tmp_path / "run"), "--quick", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr
    assert "round 0" in proc.stdout and "st-mary" in proc.stdout  # numbered as the audit tools number it
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert doc["rounds"] == 1 and doc["secure_aggregation"] is True
    assert {r["site"] for r in doc["metrics"]} == {"st-mary", "northgate", "riverside", "lakeside"}


def _budget_for_one_round(sites: Path) -> None:
    """Set every example policy's budget to 1.2 rounds of the federation's public plan."""
    import re

    from blossom_secure.site.ledger import compute_epsilon

    fed = (sites / "federation.toml").read_text()
    rate = float(re.search(r"sample_rate = ([0-9.]+)", fed).group(1))
    steps = int(re.search(r"steps_per_round = (\d+)", fed).group(1))
    for policy in (sites.parent / "policies").glob("*.toml"):
        text = policy.read_text()
        noise = float(re.search(r"noise_multiplier = ([0-9.]+)", text).group(1))
        one_round = compute_epsilon([(noise, rate, steps)], accountant="rdp", delta=1e-5)
        policy.write_text(re.sub(r"epsilon_budget = [0-9.]+", f"epsilon_budget = {one_round * 1.2:.4f}", text))


@pytest.mark.slow
def test_simulate_budget_message_never_says_the_others_went_on_when_none_did(copy_sites, tmp_path):
    """Every budget allows one round: round 0 is trained, in round 1 every site declines.
    Exit 3 says which rounds nobody trained, not that "the others went on"."""
    sites = copy_sites()
    _budget_for_one_round(sites)
    proc = cli("blossom", "simulate", "--sites", str(sites), "--out", str(tmp_path / "run"), "--rounds", "2")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    message = " ".join(proc.stderr.split())
    assert message.startswith("error: the privacy budget stopped") and "Traceback" not in message
    assert "no site trained in round 1," in message and "the others went on" not in message
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["round_ids"] == [0, 1]


@pytest.mark.slow
def test_simulate_stops_announcing_rounds_once_no_site_can_train(copy_sites, tmp_path):
    """Every budget allows one round and four are asked for: round 1 is declined by every
    site, and rounds 2 and 3 are never announced (no round number used up, no declined
    record written), as the output says; the next run would start at round 2."""
    sites = copy_sites()
    _budget_for_one_round(sites)
    proc = cli("blossom", "simulate", "--sites", str(sites), "--out", str(tmp_path / "run"), "--rounds", "4")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "no site could train in round 1, so the 2 round(s) asked for after it were not announced" in proc.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["round_ids"] == [0, 1]
    assert json.loads((tmp_path / "run" / "coordinator-state.json").read_text())["next_round"] == 2
    log = (sites / "st-mary" / "state" / "audit.jsonl").read_text()
    assert '"round_id":1' in log and '"round_id":2' not in log
