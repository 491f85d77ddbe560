"""Render an audit review's HTML page in headless Chromium, to look at it as a reviewer will.

    python benchmarks/report_screenshot.py [SITE_DIR] [--out DIR] [--rounds N]

With ``SITE_DIR`` (a site that took part in a run), the page is its ``blossom-site audit
review --html``; without, a synthetic signed log of ``--rounds`` rounds (joined, declined,
one interrupted) is reviewed. The page is written to ``DIR/review.html`` and, when
``chromium-headless-shell`` (Debian: ``apt-get install chromium-headless-shell``) or
``chromium`` is on the PATH, rendered to ``DIR/review.png`` (1200 pixels wide).

What to look for: the verification statement at the top; legends below the plots, never
over a bar; titles and axis labels whole; one row per round. ``tests/test_audit_report.py``
checks the legend and title placement on the rendered figures in pixels on every run; this
script is for the eye.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def synthetic_review(out: Path, rounds: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from blossom_secure import crypto
    from blossom_secure.audit.log import AuditLog, read_verified_records
    from blossom_secure.audit.report import LedgerRound, LedgerView, Verification, summarise, write_html

    key = crypto.generate_identity_key()
    public = crypto.identity_public_key(key)
    policy = "ab" * 32
    log_path = Path(tempfile.mkdtemp()) / "audit.jsonl"
    ledger, total = [], 0.0
    with AuditLog.open(log_path, site_id="st-mary", signing_key=key) as log:
        log.append("site_initialised", round_id=None, policy_sha256=None,
                   details={"key_fingerprint": crypto.key_fingerprint(public)})
        log.append("policy_loaded", round_id=None, policy_sha256=policy,
                   details={"policy_sha256": policy, "shareable": ["encoder.*", "fusion"]})
        for r in range(rounds):
            if r % 5 == 4:
                log.append("round_declined", round_id=r, policy_sha256=policy, details={"reason": "privacy budget"})
                continue
            log.append("round_joined", round_id=r, policy_sha256=policy, details={})
            total += 0.4
            ledger.append(LedgerRound(round_id=r, epsilon_total=total))
            if r == 2:
                log.append("error", round_id=r, policy_sha256=policy,
                           details={"message": "interrupted (KeyboardInterrupt) during the round",
                                    "error_type": "KeyboardInterrupt"})
                continue
            log.append("training_finished", round_id=r, policy_sha256=policy, details={
                "steps": 8, "epsilon_round": 0.4, "epsilon_total": total, "delta": 1e-5, "noise_multiplier": 1.1,
                "sample_rate": 0.125})
            for stage, size in (("advertise_keys", 0), ("masked_input", 2468), ("unmask", 0)):
                payload = 300 + (4 * (size + 1) if size else 0)
                log.append("egress", round_id=r, policy_sha256=policy, details={
                    "message_type": f"secagg.{stage}", "blocks": ["encoder.image"],
                    "shapes": {"encoder.image": [2468]}, "payload_bytes": payload, "payload_sha256": "cd" * 32,
                    "recipient": "coordinator", "block_bytes": {"encoder.image": payload - 300}})
    report, records = read_verified_records(log_path, public_key=public)
    page = out / "review.html"
    write_html(summarise(records), page, site_id="st-mary", epsilon_budget=8.0,
               ledger=LedgerView(path="state/ledger.json", rounds=tuple(ledger), epsilon_spent=total),
               verification=Verification(key_fingerprint=crypto.key_fingerprint(public), key_source="a test key",
                                         verified_at="2026-01-01T00:00:00Z", records=report.records,
                                         last_seq=report.last_seq, last_hash=report.last_hash))
    return page


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site_dir", type=Path, nargs="?", default=None)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()))
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.site_dir is not None:
        page = args.out / "review.html"
        subprocess.run([sys.executable, "-m", "blossom_secure.cli.site", "audit", "review", str(args.site_dir),
                        "--html", str(page)], check=True, stdout=subprocess.DEVNULL)
    else:
        page = synthetic_review(args.out, args.rounds)
    print(f"page: {page}")
    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if browser is None:
        print("no chromium-headless-shell or chromium on the PATH: open the page in a browser instead")
        return 0
    shot = args.out / "review.png"
    subprocess.run([browser, "--no-sandbox", f"--screenshot={shot}", "--window-size=1200,3000",
                    page.resolve().as_uri()], check=True, capture_output=True)
    print(f"screenshot: {shot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
