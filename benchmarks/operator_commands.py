"""How fast the operator's commands answer, and that the log-only ones load no ML stack.

    python benchmarks/operator_commands.py [--records 10000] [--site SITE_DIR] [--repeat 3]

1. Builds a signed audit log of ``--records`` records (a realistic mix: rounds joined,
   training, secure-aggregation egress with block byte counts, reports) in a temporary
   folder, then times

   * :func:`blossom_secure.audit.log.verify_log` in this process (best of ``--repeat``), in
     one process and in parts on every core this process may use (as the CLI does);
   * ``blossom-site audit verify LOG --public-key HEX`` and
     ``blossom-site audit review LOG --public-key HEX`` as fresh processes (wall time,
     best of ``--repeat``: start-up and imports included, as an operator sees it).

2. With ``--site SITE_DIR`` (a site that has taken part in a run, e.g. after
   ``blossom simulate --sites sites --out runs/demo``), times ``blossom-site check``,
   ``budget``, ``audit verify`` and ``audit review`` on it.

3. Checks, in a fresh process, which of torch, monai and opacus each log-only command
   (``audit verify``, ``audit review``, ``budget``) imports: none should.

Timings go to standard output; they are measurements, never test assertions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE_ID = "bench-site"
POLICY = "ab" * 32


def _events(records: int):
    """``(event, round_id, details, policy_sha256)`` for a log of ``records`` records."""
    out = []
    round_id, epsilon = 0, 0.0
    while len(out) + 2 < records:
        out.append(("round_joined", round_id, {"blocks_offered": ["encoder.image", "fusion"]}, POLICY))
        epsilon += 0.01
        out.append(("training_finished", round_id, {
            "steps": 8, "epsilon_round": 0.01, "epsilon_total": epsilon, "delta": 1e-5,
            "noise_multiplier": 1.1, "sample_rate": 0.125, "accountant": "rdp", "max_grad_norm": 1.0,
            "randomness": "os-csprng", "epsilon_is_nominal": False, "sampling": "public"}, POLICY))
        for stage, sizes in (("advertise_keys", {}), ("share_keys", {}),
                             ("masked_input", {"encoder.image": 4000, "fusion": 300}), ("consistency", {}),
                             ("unmask", {})):
            blocks = ["encoder.image", "fusion"]
            payload = 300 + sum(4 * (n + 1) for n in sizes.values())
            out.append(("egress", round_id, {
                "message_type": f"secagg.{stage}", "blocks": blocks,
                "shapes": {"encoder.image": [4000], "fusion": [300]}, "payload_bytes": payload,
                "payload_sha256": "cd" * 32, "recipient": "coordinator",
                "block_bytes": {b: 4 * (sizes[b] + 1) if b in sizes else 0 for b in blocks}}, POLICY))
            out.append(("secagg_stage_completed", round_id, {"stage": stage}, POLICY))
        out.append(("egress", round_id, {
            "message_type": "report", "blocks": [], "shapes": {}, "payload_bytes": 220,
            "payload_sha256": "ef" * 32, "recipient": "coordinator", "block_bytes": {}}, POLICY))
        round_id += 1
    return out[: records - 2]


def build_log(path: Path, records: int):
    """A signed log of ``records`` records and its checkpoint, written in one go (the
    records are the ones :class:`~blossom_secure.audit.log.AuditLog` would append, without
    an fsync per record); returns the signing key."""
    from blossom_secure import crypto
    from blossom_secure.audit import log as audit

    key = crypto.generate_identity_key()
    fingerprint = crypto.key_fingerprint(crypto.identity_public_key(key))
    events = [("site_initialised", None, {"key_fingerprint": fingerprint}, None),
              ("policy_loaded", None, {"policy_sha256": POLICY, "shareable": ["encoder.*", "fusion"]}, POLICY),
              *_events(records)]
    lines = []
    prev = audit.GENESIS_SHA256
    for seq, (event, round_id, details, policy) in enumerate(events):
        record = audit.build_record(seq=seq, time_utc=f"2026-01-01T00:00:00.{seq % 1000000:06d}Z", site_id=SITE_ID,
                                    round_id=round_id, event=event, details=details, policy_sha256=policy,
                                    prev_hash=prev, signing_key=key)
        line = audit.canonical_bytes(record)
        prev = audit._sha256_hex(line)
        lines.append(line + b"\n")
    path.write_bytes(b"".join(lines))
    audit._write_checkpoint(audit.checkpoint_path(path), site_id=SITE_ID, last_seq=len(lines) - 1, last_hash=prev,
                            signing_key=key)
    return key


def best_of(repeat: int, action) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def command(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, check=False)


def timed_command(repeat: int, *args: str) -> tuple[float, int]:
    codes = []
    seconds = best_of(repeat, lambda: codes.append(command(*args).returncode))
    return seconds, codes[-1]


def imported_ml(*cli_args: str) -> list[str]:
    """Which of torch, monai, opacus a `blossom-site` command imports (fresh process)."""
    probe = ("import sys\nfrom blossom_secure.cli import run\nfrom blossom_secure.cli.site import main\n"
             f"run(main, {list(cli_args)!r})\n"
             "print('ML-IMPORTED:' + ','.join(m for m in ('torch', 'monai', 'opacus') if m in sys.modules))")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=False)
    found = [line for line in done.stdout.splitlines() if line.startswith("ML-IMPORTED:")]
    if not found:
        return ["(the command failed: " + " ".join(done.stderr.split())[:200] + ")"]
    return [m for m in found[-1].removeprefix("ML-IMPORTED:").split(",") if m]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--site", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from blossom_secure import crypto
    from blossom_secure.audit.log import verify_log

    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "audit.jsonl"
        start = time.perf_counter()
        key = build_log(log_path, args.records)
        built = time.perf_counter() - start
        public = crypto.identity_public_key(key)
        report = verify_log(log_path, public_key=public)
        print(f"log of {report.records} records, {log_path.stat().st_size / 2**20:.1f} MiB (built in {built:.1f} s)")
        seconds = best_of(args.repeat, lambda: verify_log(log_path, public_key=public))
        print(f"verify_log in-process, one process:             {seconds:6.3f} s")
        from blossom_secure._system import available_cores

        workers = min(available_cores(), 8)
        seconds = best_of(args.repeat, lambda: verify_log(log_path, public_key=public, workers=workers))
        print(f"verify_log in-process, {workers} processes (as the CLI): {seconds:6.3f} s")
        for name in ("verify", "review"):
            seconds, code = timed_command(args.repeat, "blossom_secure.cli.site", "audit", name, str(log_path),
                                          "--public-key", public.hex())
            print(f"blossom-site audit {name} LOG --public-key (process): {seconds:6.3f} s (exit {code})")
        ml = imported_ml("audit", "verify", str(log_path), "--public-key", public.hex())
        print(f"audit verify imports: {', '.join(ml) or 'none of torch, monai, opacus'}")
        ml = imported_ml("audit", "review", str(log_path), "--public-key", public.hex())
        print(f"audit review imports: {', '.join(ml) or 'none of torch, monai, opacus'}")
    if args.site is not None:
        site = str(args.site)
        for cli_args in (("check", site), ("budget", site), ("audit", "verify", site), ("audit", "review", site)):
            seconds, code = timed_command(args.repeat, "blossom_secure.cli.site", *cli_args)
            print(f"blossom-site {' '.join(cli_args[:-1]):<13} {site}: {seconds:6.3f} s (exit {code})")
        ml = imported_ml("budget", site)
        print(f"budget imports: {', '.join(ml) or 'none of torch, monai, opacus'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
