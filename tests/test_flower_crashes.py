"""Sites that crash mid-round on Flower's deployment engine, on loopback with TLS.

A SuperLink and one SuperNode per example site run as OS processes; two rounds of
block-wise secure aggregation are started over the Control API. In round 0 two SuperNodes
are killed with SIGKILL, each with its whole process group (the ClientApp processes
included), at a moment read from the site's own audit log: lakeside once its key shares
have left (so before its masked input), riverside once its masked input has left. Then:

* round 0 ends with the survivors as far as the public groups and thresholds allow (each
  block's t_b = 2 of 3): ``encoder.image`` with northgate and st-mary (lakeside's pairwise
  masks removed with its mask key rebuilt from their shares), ``fusion`` with northgate,
  riverside and st-mary (riverside's self mask removed with its seed rebuilt from theirs),
  and ``encoder.tabular`` not at all (one of its three members is left to unmask: no share
  is revealed for it and the global block stays as it was);
* the killed sites' audit logs verify, their ledgers agree with them and still hold round
  0's spend, and what they left on disk does not stop the next round;
* restarted with the same command, both take part in round 1, and nothing of round 0 is
  sent twice by anyone.

Needs ``flwr`` (the ``flower`` extra) and several minutes: marked ``deployment`` and ``slow``.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

import flwr  # noqa: F401 - the flower extra is part of the README install; missing it is a failure

from blossom_secure._fs import load_arrays_npz
from blossom_secure.audit import log as audit
from blossom_secure.config import load_federation
from blossom_secure.coordinator.steps import RoundCoordinator
from blossom_secure.roster import load_roster
from blossom_secure.runtimes.flower import write_dev_certificates
from blossom_secure.runtimes.flower.control import start_run, stop_run, wait_for_run
from blossom_secure.secagg.terms import secagg_params
from blossom_secure.site.agent import LEDGER_FILE
from blossom_secure.site.config import load_site, site_dirs
from blossom_secure.site.ledger import PrivacyLedger, load_reconciled_ledger
from blossom_secure.site.steps import AUDIT_FILE
from tests.conftest import allow_coordinators
from tests.test_flower_deployment import BIN, Processes, free_port, start_tls_superlink
from tests.test_flower_rounds import SEED, STAGES, flower_copy, records_of

pytestmark = [pytest.mark.deployment, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # from flwr's own dependencies

#: Site to the secure-aggregation stage whose message it has delivered when its SuperNode is killed.
KILL_AFTER = {"lakeside": "share_keys", "riverside": "masked_input"}
#: Above the slowest stage seen on a loaded 2-core machine (the offer: four sites training at
#: once, about 70 s) and above Flower's node liveness (a SuperNode that stops its 30 s
#: heartbeats is answered for with NODE_UNAVAILABLE within 2 x 30 s): a killed site is
#: dropped as soon as the SuperLink knows it is gone, and a slow one is never dropped.
STAGE_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 1500
ROUND_MESSAGES = [f"secagg.{stage}" for stage in STAGES] + ["report"]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def egress_so_far(site_dir: Path) -> list[dict]:
    """The ``egress`` records of a running site's audit log, complete lines only (read while
    the site may be appending; the whole log is verified once the site has stopped)."""
    try:
        data = (site_dir / "state" / AUDIT_FILE).read_bytes()
    except FileNotFoundError:
        return []
    records = (json.loads(line) for line in data.split(b"\n")[:-1])
    return [r for r in records if r["event"] == audit.EGRESS]


def sent(records: list[dict], round_id: int) -> list[str]:
    """The message types of a site's ``egress`` records of ``round_id``, in log order."""
    return [r["details"]["message_type"] for r in records if r["event"] == audit.EGRESS and r["round_id"] == round_id]


def reply_delivered(node_log: Path, stage: str) -> bool:
    """Whether the SuperNode's log shows its reply to ``query.<stage>`` pushed to the SuperLink.

    The site writes its egress record before its ClientApp hands the reply to the
    SuperNode, which then pushes it (Flower 1.42 logs ``Sending: query.<stage> message``,
    then ``Sent successfully``): a kill between the two would be a kill before the message
    left, so the moment of a kill "after" a stage is both.
    """
    text = _ANSI.sub("", node_log.read_text(errors="replace"))
    at = text.find(f"Sending: query.{stage} message")
    if at < 0:
        return False
    outcome = re.search(r"Sent successfully|Failed to send message", text[at:])
    if outcome is not None and outcome.group() != "Sent successfully":
        raise RuntimeError(f"{node_log.name}: the SuperNode could not push its {stage} reply")
    return outcome is not None


def reconciled_ledger(site_dir: Path, records: list[dict]) -> PrivacyLedger:
    """The site's ledger, checked against its verified audit records as the site agent does
    before a round (:func:`load_reconciled_ledger` refuses a ledger behind the log)."""
    site = load_site(site_dir)
    return load_reconciled_ledger(site.state_dir / LEDGER_FILE, site_id=site.id, terms=site.policy.privacy,
                                  records=records, audit_file=str(site.state_dir / AUDIT_FILE))


def check_crashed_site(site_dir: Path, roster, stage: str) -> list[dict]:
    """What a site killed right after delivering its ``stage`` message of round 0 left on
    disk, before it is restarted: a verified log, a ledger that agrees with it and holds the
    round's spend, and the round's state (closed by the next announcement). Returns the log."""
    records = records_of(site_dir, roster)  # the whole log verifies, checkpoint included
    delivered = STAGES[:STAGES.index(stage) + 1]
    assert sent(records, 0) == [f"secagg.{s}" for s in delivered]
    ledger = reconciled_ledger(site_dir, records)
    trained = [r for r in records if r["event"] == audit.TRAINING_FINISHED]
    assert [r["round_id"] for r in trained] == [e.round_id for e in ledger.entries] == [0]
    assert ledger.epsilon_spent == pytest.approx(trained[0]["details"]["epsilon_total"])
    assert ledger.epsilon_spent > 0
    state = site_dir / "state"
    assert sorted(p.name for p in state.glob("*-0.*")) == [
        "flower-round-0.json", "flower-update-0.npz", "secagg-round-0.json"]
    return records


def test_sites_killed_before_and_after_masked_input_leave_verified_logs_and_rejoin_the_next_round(
        tiny_sites_with_data, tmp_path):
    sites = flower_copy(tiny_sites_with_data, tmp_path)
    federation = load_federation(sites / "federation.toml")
    roster = load_roster(sites / "roster.toml", federation=federation)
    dirs = {load_site(d).id: d for d in site_dirs(sites)}
    certs = write_dev_certificates(tmp_path / "certs", site_ids=list(dirs))
    ca = certs.directory / "ca.pem"
    link_port = free_port()
    superlink = f"127.0.0.1:{link_port}"
    allow_coordinators(sites, superlink)
    out = tmp_path / "out"
    work = tmp_path / "work"
    commands = {site: [str(BIN / "flower-supernode"), "--root-certificates", str(ca), "--superlink", superlink,
                       "--node-config", f'site-dir="{site_dir}" coordinator="{superlink}" simulation-seed={SEED}',
                       "--host", "127.0.0.1", "--port", str(free_port())] for site, site_dir in dirs.items()}
    updates: dict[str, dict[str, np.ndarray]] = {}  # each site's round 0 update, from its state folder
    crashed: dict[str, list[dict]] = {}  # killed site -> its verified log at the crash
    round0_blocks = None
    processes = Processes(work)
    with ExitStack() as cleanup:
        cleanup.callback(processes.stop)
        start_tls_superlink(processes, certs.directory, link_port)
        for site, command in commands.items():
            processes.start(f"supernode-{site}", command)
        run_id = start_run(superlink, root_certificates=ca, run_config={
            "federation-file": str(sites / "federation.toml"), "out-dir": str(out), "rounds": 2, "seed": SEED,
            "stage-timeout-s": STAGE_TIMEOUT_S, "wait-for-sites-s": 180.0})
        deadline = time.monotonic() + RUN_TIMEOUT_S
        next_status_s = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_status_s:
                status = wait_for_run(superlink, root_certificates=ca, run_id=run_id, timeout_s=0)
                if status.status == "finished":
                    break
                next_status_s = time.monotonic() + 2.0
            for site, site_dir in dirs.items():
                # the update masked in round 0 stays in the state folder until the consistency stage
                if site not in updates and "secagg.advertise_keys" in sent(egress_so_far(site_dir), 0):
                    updates[site] = load_arrays_npz(site_dir / "state" / "flower-update-0.npz")
            for site, stage in KILL_AFTER.items():
                if (site not in crashed and f"secagg.{stage}" in sent(egress_so_far(dirs[site]), 0)
                        and reply_delivered(work / f"supernode-{site}.log", stage)):
                    processes.kill(f"supernode-{site}")
                    crashed[site] = check_crashed_site(dirs[site], roster, stage)
                    processes.start(f"supernode-{site}", commands[site])  # the same command again
            if round0_blocks is None and (out / "global_blocks.npz").exists():
                blocks = load_arrays_npz(out / "global_blocks.npz")
                if json.loads((out / "metrics.json").read_text())["rounds"] == 1:  # round 1's not written yet
                    round0_blocks = blocks
            time.sleep(0.2)
        else:
            stop_run(superlink, root_certificates=ca, run_id=run_id)
            status = wait_for_run(superlink, root_certificates=ca, run_id=run_id, timeout_s=0)
        logs = {p.name: p.read_text(errors="replace")[-3000:] for p in work.glob("*.log")}
        assert (status.status, status.sub_status) == ("finished", "completed"), (status, logs)
    # every process started here (restarted ones too, and every process they started) has ended
    assert all(p.poll() is not None for p in processes.started.values())
    assert processes.alive_after_stop == []
    assert set(crashed) == set(KILL_AFTER) and set(updates) == set(dirs) and round0_blocks is not None

    doc = json.loads((out / "metrics.json").read_text())
    assert doc["rounds"] == 2
    # round 0: each block whose survivors meet its threshold holds their sum; the other none
    first = doc["blocks"]["0"]
    assert first["encoder.image"] == {"contributors": ["northgate", "st-mary"], "failure": None}
    assert first["fusion"] == {"contributors": ["northgate", "riverside", "st-mary"], "failure": None}
    assert first["encoder.tabular"]["failure"] == "fewer than t survivors: 1 signed the consistency check, t = 2"
    params = secagg_params(federation, roster_size=len(roster))
    bound = 2.0 ** -(params.scale_bits + 1) + 1e-6  # one quantisation step, as test_flower_deployment's bound
    initial = RoundCoordinator(federation, roster, seed=SEED).global_blocks
    for block, outcome in first.items():
        if outcome["failure"] is not None:
            assert np.array_equal(round0_blocks[block], initial[block]), block  # nothing of a partial sum
            continue
        weights = {site: federation.weighting.weight_of(site) for site in outcome["contributors"]}
        mean = sum(w * np.clip(updates[site][block].astype(np.float64), -params.clip, params.clip)
                   for site, w in weights.items()) / sum(weights.values())
        assert np.abs(round0_blocks[block] - (initial[block] + mean)).max() <= bound, block
    for site in ("northgate", "st-mary"):  # no share was revealed for the block that failed
        unmask = [r for r in records_of(dirs[site], roster) if r["event"] == audit.EGRESS and r["round_id"] == 0
                  and r["details"]["message_type"] == "secagg.unmask"]
        assert [r["details"]["blocks"] for r in unmask] == [["encoder.image", "fusion"]], site
    assert {row["site"] for row in doc["metrics"] if row["round"] == 0} == {"northgate", "st-mary"}
    # round 1: the restarted sites contribute again
    assert doc["blocks"]["1"] == {
        "encoder.image": {"contributors": ["lakeside", "northgate", "st-mary"], "failure": None},
        "encoder.tabular": {"contributors": ["lakeside", "riverside", "st-mary"], "failure": None},
        "fusion": {"contributors": ["northgate", "riverside", "st-mary"], "failure": None}}
    assert {row["site"] for row in doc["metrics"] if row["round"] == 1} == set(dirs)

    ledgers = {}
    for site, site_dir in dirs.items():
        records = records_of(site_dir, roster)  # every log verifies
        assert not [r for r in records if r["event"] == audit.ERROR], site  # no request refused, none stale
        for round_id in (0, 1):  # what left each site is what the coordinator took delivery of, once
            logged = sum(r["details"]["payload_bytes"] for r in records
                         if r["event"] == audit.EGRESS and r["round_id"] == round_id)
            assert logged == doc["bytes_received"][str(round_id)][site] > 0, (site, round_id)
        assert sent(records, 1) == ROUND_MESSAGES, site
        outcome = [(r["event"], r["details"]["stage"]) for r in records
                   if r["round_id"] == 0 and r["event"] in (audit.SECAGG_STAGE_COMPLETED, audit.SECAGG_ABORTED)]
        if site in KILL_AFTER:
            # nothing of round 0 after the restart; the next announcement closed the round
            assert sent(records, 0) == sent(crashed[site], 0), site
            done = STAGES[:STAGES.index(KILL_AFTER[site]) + 1]
            assert outcome == ([(audit.SECAGG_STAGE_COMPLETED, s) for s in done]
                               + [(audit.SECAGG_ABORTED, STAGES[len(done)])]), site
        else:
            assert sent(records, 0) == ROUND_MESSAGES, site
            assert outcome == [(audit.SECAGG_STAGE_COMPLETED, s) for s in STAGES], site
        # only round 1's record (kept to answer a repeated finish) is left: no secret, no update
        state = site_dir / "state"
        assert sorted(p.name for p in state.iterdir() if p.name.startswith(("flower-", "secagg-"))) == [
            "flower-round-1.json"], site
        ledgers[site] = ledger = reconciled_ledger(site_dir, records)
        assert [e.round_id for e in ledger.entries] == [0, 1], site
        reported = {row["epsilon"] for row in doc["metrics"] if row["round"] == 1 and row["site"] == site}
        assert len(reported) == 1 and reported.pop() == pytest.approx(ledger.epsilon_spent), site
    # a kill never under-counts: riverside's spend is that of the sites of its policy that never crashed
    assert ledgers["riverside"].history == ledgers["st-mary"].history == ledgers["northgate"].history
    assert ledgers["lakeside"].epsilon_spent > ledgers["lakeside"].entries[0].epsilon_total > 0
