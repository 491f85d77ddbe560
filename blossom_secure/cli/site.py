"""``blossom-site``: the hospital operator's commands.

    blossom-site init SITE_DIR            create the identity key, start the audit log
    blossom-site check SITE_DIR           validate site file, policy and data; show what would leave
    blossom-site budget SITE_DIR          privacy spent per round and remaining
    blossom-site audit verify SITE_DIR|LOG [--public-key KEY | --roster ROSTER.toml --site ID]
                              [--fingerprint FP] [--every-signature]
                                          verify the audit log's hash chain and signatures (public key only)
    blossom-site audit review SITE_DIR|LOG [--round R] [--html FILE] (and verify's key options)
    blossom-site ledger rebuild SITE_DIR  rebuild the privacy ledger from the verified audit log
    blossom-site join SITE_DIR --coordinator HOST:PORT (--root-certificates CA.pem | --insecure)
                     [--supernode-auth] [--seed S]
                                          run the site's Flower SuperNode until interrupted
    blossom-site roster-entry SITE_DIR [--node-key | --pem]
                                          print the site's line for the federation's roster.toml (its
                                          SuperNode key's line, or its public key as PEM for auditors)

Every command takes ``--federation FILE`` when the site file does not name its federation.
Exit codes: see :mod:`blossom_secure.cli`.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from blossom_secure.cli import EXIT_AUDIT_FAILED, EXIT_OK, ArgumentParser, UsageError, console, err_console, run

#: First pause before a SuperNode that exited is started again, and the longest.
_RESTART_PAUSE_S = 2.0
_MAX_RESTART_PAUSE_S = 60.0
_FINGERPRINT_HELP = "the key fingerprint recorded out of band; refuse if the site's key differs"
#: `audit review` prints the last this many egress messages (all with --round or --html).
_TERMINAL_MESSAGES = 200


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="blossom-site", description="A hospital site's commands: set up, check, review, verify.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    def site_cmd(name: str, help_text: str, parent=sub):
        cmd = parent.add_parser(name, help=help_text)
        cmd.add_argument("site_dir", type=Path, metavar="SITE_DIR")
        cmd.add_argument("--federation", type=Path, default=None,
                         help="federation file (default: the one the site file names)")
        return cmd

    site_cmd("init", "create the site's identity key and start its audit log")
    site_cmd("check", "validate the site file, policy and data; show what would leave the site")
    site_cmd("budget", "privacy budget: epsilon spent per round and remaining")
    audit = sub.add_parser("audit", help="the site's audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True, parser_class=ArgumentParser)
    verify = asub.add_parser(
        "verify", help="recompute the hash chain and signatures; exit 1 if the log was altered",
        description="Verify a site's audit log: every record's signature, the hash chain and the signed checkpoint. "
                    "With --public-key or --roster only the site's PUBLIC key is needed (an auditor's copy of the "
                    "log); without them the site folder's own key file is used.")
    review = asub.add_parser(
        "review", help="what left the site, per round and block, and the privacy spent",
        description="Verify the audit log (as `audit verify` does), then summarise it: per round, what left the "
                    "site and the privacy spent; with a site folder, beside the privacy ledger.")
    for cmd in (verify, review):
        cmd.add_argument("site_dir", type=Path, metavar="SITE_DIR|LOG",
                         help="the site folder, or an audit log file (audit.jsonl, its audit.head.json beside it)")
        cmd.add_argument("--federation", type=Path, default=None,
                         help="federation file (default: the one the site file names)")
        key = cmd.add_mutually_exclusive_group()
        key.add_argument("--public-key", default=None, metavar="KEY",
                         help="verify with this public key only: a PEM file (BEGIN PUBLIC KEY), a file holding the "
                              "site's roster entry (as `roster-entry` prints it) or its 64 hex digits, or those "
                              "64 hex digits")
        key.add_argument("--roster", type=Path, default=None, metavar="ROSTER.toml",
                         help="verify with the site's public key from the federation roster (see --site)")
        cmd.add_argument("--site", default=None, metavar="ID",
                         help="the site id to look up in --roster (default: the site folder's id)")
    verify.add_argument("--every-signature", action="store_true",
                        help="also check each record's own signature (slower; the signed checkpoint already binds "
                             "every record it covers through the hash chain)")
    review.add_argument("--round", type=int, default=None, dest="round_id", help="only this round")
    review.add_argument("--html", type=Path, default=None,
                        help="also write a self-contained HTML report to this file (its folder must exist)")
    ledger = sub.add_parser("ledger", help="the site's privacy ledger")
    lsub = ledger.add_subparsers(dest="ledger_command", required=True, parser_class=ArgumentParser)
    rebuild = site_cmd("rebuild", "rebuild the privacy ledger from the verified audit log (keeping rounds it is "
                                  "ahead); exit 1 if the log does not verify", lsub)
    for cmd in (verify, review, rebuild):
        cmd.add_argument("--fingerprint", default=None, help=_FINGERPRINT_HELP)
    join = site_cmd("join", "join a deployment: run this site's Flower SuperNode in the foreground until "
                            "interrupted (Ctrl-C or SIGTERM)")
    join.add_argument("--coordinator", required=True, metavar="HOST:PORT",
                      help="the coordinator's SuperLink; the policy's [policy] coordinators must list it")
    tls = join.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, default=None, metavar="CA.pem",
                     help="the CA certificate the SuperLink's TLS certificate is verified against")
    tls.add_argument("--insecure", action="store_true",
                     help="no TLS: only for a coordinator on this machine (loopback); refused otherwise")
    join.add_argument("--seed", type=int, default=None,
                      help="seeded simulation, synthetic sites only (epsilon then nominal); default: OS CSPRNG")
    join.add_argument("--supernode-auth", action="store_true",
                      help="authenticate the SuperNode with the site's node key (keys/flower-node.key), which the "
                           "coordinator registered from its roster's [roster.node_keys]")
    entry = site_cmd("roster-entry", "print this site's line for the federation's roster.toml (its identity "
                                     "public key; with --node-key, its SuperNode key)")
    shown = entry.add_mutually_exclusive_group()
    shown.add_argument("--node-key", action="store_true",
                       help="print the [roster.node_keys] line instead: the public half of the SuperNode key "
                            "(keys/flower-node.key, created on first use)")
    shown.add_argument("--pem", action="store_true",
                       help="print the identity PUBLIC key as PEM instead (for auditors: `audit verify --public-key`)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "audit":
        handler = {"verify": _audit_verify, "review": _audit_review}[args.audit_command]
    elif args.command == "ledger":
        handler = {"rebuild": _ledger_rebuild}[args.ledger_command]
    else:
        handler = {"init": _init, "check": _check, "budget": _budget, "join": _join,
                   "roster-entry": _roster_entry}[args.command]
    return handler(args)


def _load(args, *, with_data: bool = False):
    """Federation + site config (no data, no state written)."""
    from blossom_secure.config import load_federation
    from blossom_secure.site.config import load_site
    from blossom_secure.errors import PolicyError, Problem

    site_dir: Path = args.site_dir
    if not site_dir.is_dir():
        raise PolicyError([Problem(str(site_dir), "", "site folder not found")])
    fed_path = args.federation
    if fed_path is None:
        bare = load_site(site_dir)
        if bare.federation_file is None:
            raise UsageError("the site file names no federation file; pass --federation FILE")
        fed_path = bare.federation_file
    federation = load_federation(fed_path)
    site = load_site(site_dir, federation=federation)
    return federation, site


def _check(args) -> int:
    from blossom_secure.errors import DataError, Problem

    federation, site = _load(args)
    missing = []
    if not site.clinical_csv.exists():
        missing.append(Problem(str(site.clinical_csv), "", "clinical CSV not found"))
    if "image" in site.modalities and (site.dicom_dir is None or not site.dicom_dir.is_dir()):
        missing.append(Problem(str(site.dicom_dir), "", "DICOM folder not found"))
    if missing:
        if site.synth is not None:
            missing.append(Problem(str(site.root / "site.toml"), "synth",
                                   "example site: generate its data with `blossom data synth`"))
        raise DataError(missing)
    console.print(f"[bold]{site.name}[/bold] ({site.id}) in federation {federation.id!r}")
    console.print(f"policy {site.policy.path} sha256 {site.policy.sha256[:16]}...")
    console.print("reading the data (every study is decoded) ...", markup=False)
    # only now the imaging stack (MONAI, torch); never Opacus: nothing is trained here
    from blossom_secure.model import BlockModel
    from blossom_secure.site.data import load_site_data

    arrays = load_site_data(site, federation)
    sizes = BlockModel(federation.layout, site.modalities, tuple(site.tasks)).block_sizes()

    data = Table(title="data", title_justify="left")
    data.add_column("item")
    data.add_column("patients", justify="right")
    data.add_row("rows in the clinical CSV", str(arrays.patients_in_csv))
    data.add_row("dropped: no label for any task", str(arrays.dropped_without_label))
    data.add_row("dropped: no imaging study and no complete clinical row", str(arrays.dropped_without_modality))
    data.add_row("patients usable", str(len(arrays.patient_ids)))
    if arrays.image is not None:
        data.add_row("with imaging study", str(int(arrays.image_present.sum())))
    if arrays.tabular is not None:
        data.add_row("with clinical features", str(int(arrays.tabular_present.sum())))
    for task, labels in sorted(arrays.labels.items()):
        counts = ", ".join(f"{c}: {int((labels == c).sum())}" for c in range(federation.layout.tasks[task]))
        data.add_row(f"task {task} (labels {counts})", str(int((labels >= 0).sum())))
    console.print(data)

    blocks = Table(title="blocks", title_justify="left")
    for col in ("block", "parameters", "leaves the site?"):
        blocks.add_column(col)
    for name in site.blocks:
        leaves = site.policy.is_shareable(name)
        why = ("yes: shareable by policy, as a secure-aggregation contribution only"
               if leaves and site.policy.secure_aggregation_required else
               "yes: shareable by policy" if leaves else
               "no: task heads never leave" if name.startswith("head.") else "no: not shareable by policy")
        blocks.add_row(name, f"{sizes[name]:,}", why)
    console.print(blocks)
    p = site.policy.privacy
    noise = f"noise multiplier {p.noise_multiplier}" if p.noise_multiplier else f"target epsilon {p.target_epsilon_per_round}/round"
    console.print(f"privacy: DP-SGD, {noise}, clip {p.max_grad_norm}, delta {p.delta:g}, "
                  f"budget epsilon {p.epsilon_budget:g} ({p.accountant} accountant)")
    console.print(f"secure aggregation {'required' if site.policy.secure_aggregation_required else 'not required'}; "
                  f"blocks leave only into groups of at least {site.policy.min_contributors} sites")
    console.print(f"round report (metrics, epsilon; never counts) "
                  f"{'may leave' if site.policy.metrics_may_leave else 'stays in the site'} (\\[reporting] metrics)")
    _print_public_terms(federation, site)
    warnings = _check_warnings(federation, site)
    for line in warnings:
        console.print(f"warning: {line}", markup=False, soft_wrap=True)
    console.print("[green]valid[/green]" + (f" ({len(warnings)} warning{'s' if len(warnings) != 1 else ''})"
                                            if warnings else ""))
    return EXIT_OK


def _check_warnings(federation, site) -> list[str]:
    """What makes a valid site useless in this federation: it would decline every round,
    no shared block could ever leave, or a wildcard pattern matches no block."""
    from blossom_secure.site.config import policy_refusal, shareable_pattern_warnings

    warnings = list(shareable_pattern_warnings(site.policy, federation))
    reason = policy_refusal(site, federation, secure=federation.aggregation.secure)
    if reason is not None:
        warnings.append(f"the site would decline every round: {reason}")
    groups = federation.aggregation.groups
    largest = {}
    for block in site.blocks:
        if site.policy.is_shareable(block):
            members = groups.get(block)
            largest[block] = len(members) if members is not None else (federation.aggregation.max_sites or 0)
    need = max(site.policy.min_contributors, federation.aggregation.min_contributors or 0)
    if largest and all(0 < size < need for size in largest.values()):
        warnings.append(f"no shared block can ever leave: the policy needs groups of at least {need} sites "
                        f"([secure_aggregation] min_contributors), but the federation's groups hold at most "
                        f"{max(largest.values())}")
    return warnings


def _print_public_terms(federation, site) -> None:
    """What the federation file fixes in public for this site, and what would make it decline."""
    weight = federation.weighting.weight_of(site.id)
    if weight is None:
        console.print(f"[bold red]warning:[/bold red] the federation file declares no public weight for "
                      f"{site.id!r} (\\[weighting.sites]): the site would decline every round")
    else:
        console.print(f"public weight of this site's updates: {weight} ({federation.weighting.scheme}); "
                      "its patient count is never sent")
    training = federation.training
    if training.sample_rate is not None:
        console.print(f"DP-SGD sampling: public, rate {training.sample_rate:g}, {training.steps_per_round} steps "
                      "per round")
    else:
        console.print("[bold]note:[/bold] the federation file declares no public sampling "
                      "(training.sample_rate, training.steps_per_round): the rate is derived from this site's "
                      "patient count (1 / ceil(n / batch_size))")
    console.print("clinical features scaled with the federation file's public ranges, never with "
                  "statistics of this site's patients")


def _budget(args) -> int:
    from blossom_secure.audit import log as audit
    from blossom_secure.crypto import identity_public_key
    from blossom_secure.site.ledger import PrivacyLedger, load_reconciled_ledger
    from blossom_secure.site.config import AUDIT_FILE, LEDGER_FILE

    _, site = _load(args)
    terms = site.policy.privacy
    log_path = site.state_dir / AUDIT_FILE
    trained: set[int] | None = None
    if log_path.exists() or audit.checkpoint_path(log_path).exists():
        # The spend shown is never below what the signed audit log proves.
        _, records = audit.read_verified_records(log_path, public_key=identity_public_key(_open_key(site)))
        ledger = load_reconciled_ledger(site.state_dir / LEDGER_FILE, site_id=site.id, terms=terms,
                                        records=records, audit_file=str(log_path))
        trained = {r["round_id"] for r in records if r["event"] == audit.TRAINING_FINISHED}
    else:
        ledger = PrivacyLedger(site.state_dir / LEDGER_FILE, site_id=site.id, terms=terms)
    table = Table(title=f"privacy budget of {site.id} (delta {terms.delta:g}, {terms.accountant})", title_justify="left")
    for col in ("round", "noise multiplier", "sample rate", "steps", "epsilon added", "epsilon total", "noise",
                "training"):
        table.add_column(col, justify="right" if col not in ("noise", "training") else "left")
    previous = 0.0
    # recomputed from the history for the policy's current delta (the file's totals were
    # for the delta in force when each round was recorded); `audit review` shows the same
    totals = _ledger_totals(ledger, terms)
    for e, total in zip(ledger.entries, totals, strict=True):
        table.add_row(str(e.round_id), f"{e.noise_multiplier:.3f}", f"{e.sample_rate:.4f}", str(e.steps),
                      f"{total - previous:.3f}", f"{total:.3f}",
                      "seeded simulation: epsilon NOMINAL" if e.is_nominal else "OS CSPRNG",
                      "-" if trained is None else "finished" if e.round_id in trained else "interrupted (counted)")
        previous = total
    console.print(table)
    interrupted = [] if trained is None else [e.round_id for e in ledger.entries if e.round_id not in trained]
    if interrupted:
        console.print(f"round(s) {', '.join(map(str, interrupted))}: reserved before training and never finished "
                      "(interrupted or failed); their spend stays counted, as a crash may only over-count",
                      markup=False)
    spent = totals[-1] if totals else 0.0
    console.print(f"spent {spent:.3f} of {terms.epsilon_budget:g}; remaining {max(0.0, terms.epsilon_budget - spent):.3f}")
    nominal = sum(e.is_nominal for e in ledger.entries)
    if nominal:
        console.print(f"[bold]{nominal} of {len(ledger.entries)} round(s) were seeded simulations: their noise follows "
                      "from a public seed, so their epsilon is nominal, not a privacy guarantee.[/bold]")
    return EXIT_OK


def _open_key(site):
    from blossom_secure.site.keys import load_identity_key

    return load_identity_key(site.keys_dir)


def _init(args) -> int:
    from blossom_secure.audit import log as audit
    from blossom_secure.crypto import identity_public_key, key_fingerprint
    from blossom_secure.site.keys import load_or_create_identity_key
    from blossom_secure.site.config import AUDIT_FILE

    _, site = _load(args)
    key, created = load_or_create_identity_key(site.keys_dir)
    fingerprint = key_fingerprint(identity_public_key(key))
    site.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with audit.AuditLog.open(site.state_dir / AUDIT_FILE, site_id=site.id, signing_key=key) as log:
        if log.last_seq is None:
            log.append(audit.SITE_INITIALISED, round_id=None, details={"key_fingerprint": fingerprint},
                       policy_sha256=None)
            log.append(audit.POLICY_LOADED, round_id=None, policy_sha256=site.policy.sha256, details={
                "policy_sha256": site.policy.sha256, "policy_file": site.policy.path.name,
                "shareable": sorted(b for b in site.blocks if site.policy.is_shareable(b))})
    if created:
        console.print(f"created identity key {site.keys_dir / 'identity.pem'} (mode 0600)")
    else:
        console.print(f"identity key {site.keys_dir / 'identity.pem'} already exists; it is never overwritten")
    console.print(f"fingerprint: {fingerprint}")
    console.print("give this fingerprint to the federation (out of band); reviewers compare it with "
                  "`blossom-site audit verify --fingerprint`")
    console.print(f"audit log: {site.state_dir / AUDIT_FILE}")
    return EXIT_OK


def _checked_key(args, site):
    """The site's identity key and its fingerprint, or ``None`` (after saying why) if
    ``--fingerprint`` was given and differs."""
    from blossom_secure.crypto import identity_public_key, key_fingerprint

    key = _open_key(site)
    fingerprint = key_fingerprint(identity_public_key(key))
    expected = getattr(args, "fingerprint", None)
    if expected is not None and expected.strip().lower() != fingerprint:
        err_console.print(f"error: the site's key has fingerprint {fingerprint}, not the expected {expected}: "
                          "the key was replaced, so its signatures prove nothing", markup=False, soft_wrap=True)
        return None
    return key, fingerprint


def _audit_target(args):
    """``(log_path, site or None)``: the positional is a site folder, a folder holding
    ``audit.jsonl``, or the audit log file itself."""
    target: Path = args.site_dir
    if target.is_file():  # an auditor's copy of the log: nothing of the site's to load
        return target, None
    from blossom_secure.errors import DataError, Problem
    from blossom_secure.site.config import AUDIT_FILE

    if target.is_dir() and (target / "site.toml").is_file():
        _, site = _load(args)
        return site.state_dir / AUDIT_FILE, site
    if target.is_dir() and (target / AUDIT_FILE).is_file():
        return target / AUDIT_FILE, None
    if target.is_dir():
        raise DataError([Problem(str(target), "", f"neither a site folder (site.toml) nor a folder holding "
                                                  f"{AUDIT_FILE}")])
    raise DataError([Problem(str(target), "", "not found (give the site folder or the audit log file)")])


def _read_public_key(value: str) -> tuple[bytes, str]:
    """``--public-key``: a PEM file, a file of 64 hex digits, or 64 hex digits. Returns the
    raw key and where it came from, in words."""
    import re

    from blossom_secure.crypto import public_key_from_pem
    from blossom_secure.errors import Problem
    from blossom_secure.site.keys import KeyFileError

    hex_key = re.compile(r"[0-9a-fA-F]{64}")
    path = Path(value)
    if not path.exists() and hex_key.fullmatch(value.strip()):
        return bytes.fromhex(value.strip()), "--public-key (hex)"
    try:
        with open(path, "rb") as handle:
            data = handle.read(4097)
    except OSError as exc:
        raise KeyFileError([Problem(value, "", f"--public-key: cannot read ({exc.strerror or exc})")]) from None
    if len(data) > 4096:
        raise KeyFileError([Problem(value, "", "--public-key: too large to be an Ed25519 public key")])
    if b"PRIVATE KEY" in data:
        raise KeyFileError([Problem(value, "", "--public-key: this is a PRIVATE key; give the public key only "
                                               "(`blossom-site roster-entry SITE_DIR --pem` prints it)")])
    if b"-----BEGIN" in data:
        try:
            return public_key_from_pem(data), f"public-key file {value}"
        except ValueError as exc:
            raise KeyFileError([Problem(value, "", f"--public-key: {exc}")]) from None
    # a roster entry as `roster-entry` prints it ("st-mary" = "<hex>", after its comment
    # line), or the bare hex digits
    text = "\n".join(line for line in data.decode("ascii", errors="replace").splitlines()
                     if not line.lstrip().startswith("#")).strip()
    found = re.findall(r"[0-9a-fA-F]{64}", text)
    if len(found) == 1 and (hex_key.fullmatch(text) or re.fullmatch(r'"?[a-z0-9_-]+"?\s*=\s*"[0-9a-fA-F]{64}"', text)):
        return bytes.fromhex(found[0]), f"public-key file {value}"
    raise KeyFileError([Problem(value, "", "--public-key: not a PEM Ed25519 public key nor 64 hex digits")])


def _verification_key(args, site):
    """The public key to verify with, where it came from (in words, and as
    :attr:`Verification.key_from` says it), its fingerprint and the site id it must belong
    to (or ``None``); or ``None`` after saying why if ``--fingerprint`` differs."""
    from blossom_secure.crypto import identity_public_key, key_fingerprint
    from blossom_secure.errors import PolicyError, Problem

    if args.site is not None and site is not None and args.site != site.id:
        raise UsageError(f"--site {args.site} is not the site folder's id {site.id!r}")
    site_id = args.site or (site.id if site is not None else None)
    if args.public_key is not None:
        public, source = _read_public_key(args.public_key)
        key_from = "public-key"
    elif args.roster is not None:
        from blossom_secure.roster import load_roster

        federation = None
        if site is not None:
            federation, _ = _load(args)
        if site_id is None:
            raise UsageError("--roster needs --site ID (the site whose log this is)")
        roster = load_roster(args.roster, federation=federation)
        if site_id not in roster:
            raise PolicyError([Problem(str(args.roster), f"roster.sites.{site_id}", "no such site in the roster")])
        public, source = roster[site_id], f"roster {args.roster} (site {site_id})"
        key_from = "roster"
    elif site is not None:
        public = identity_public_key(_open_key(site))
        source = f"the site's key file {site.keys_dir / 'identity.pem'}"
        key_from = "key-file"
    else:
        raise UsageError("an audit log file needs a key: pass --public-key KEY or --roster ROSTER.toml --site ID")
    fingerprint = key_fingerprint(public)
    expected = args.fingerprint
    if expected is not None and expected.strip().lower() != fingerprint:
        err_console.print(f"error: the key from {source} has fingerprint {fingerprint}, not the expected {expected}: "
                          "it is not the key recorded out of band (the key was replaced, or is another site's), so "
                          "its signatures prove nothing", markup=False, soft_wrap=True)
        return None
    return public, source, fingerprint, site_id, key_from


def _verified_records(args, site=None, log_path=None, *, records_needed=True):
    """Verify the log; returns ``(verification, report, records)`` or ``None`` (exit 1 said).
    Without ``records_needed`` the records are not kept (``[]``) and a large log is checked
    in parts on every core this process may use."""
    from datetime import UTC, datetime

    from blossom_secure._system import available_cores
    from blossom_secure.audit import log as audit
    from blossom_secure.audit.log import Verification
    from blossom_secure.errors import AuditIntegrityError, DataError, Problem

    if log_path is None:
        log_path, site = _audit_target(args)
    chosen = _verification_key(args, site)
    if chosen is None:
        return None
    public, source, fingerprint, site_id, key_from = chosen
    if not log_path.exists() and not audit.checkpoint_path(log_path).exists():
        raise DataError([Problem(str(log_path), "", "no audit log (run `blossom-site init`)")])
    every_signature = getattr(args, "every_signature", False)
    if records_needed:
        report, records = audit.read_verified_records(log_path, public_key=public, every_signature=every_signature)
    else:
        report = audit.verify_log(log_path, public_key=public, every_signature=every_signature,
                                  workers=min(available_cores(), 8))
        records = []
    if site_id is not None and report.site_id is not None and report.site_id != site_id:
        raise AuditIntegrityError(line=1, seq=0, reason=f"the log's records name site {report.site_id!r}, not "
                                                        f"{site_id!r}")
    verification = Verification(
        key_fingerprint=fingerprint, key_source=source, key_from=key_from, verified_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        records=report.records, last_seq=report.last_seq, last_hash=report.last_hash,
        pinned=args.fingerprint is not None, every_signature=getattr(args, "every_signature", False))
    return verification, report, records


def _audit_verify(args) -> int:
    verified = _verified_records(args, records_needed=False)
    if verified is None:
        return EXIT_AUDIT_FAILED
    verification, report, _ = verified
    span = "empty" if report.last_seq is None else f"seq 0..{report.last_seq}"
    console.print(f"audit log intact: {report.records} records, {span}, "
                  f"{report.first_time} to {report.last_time}", markup=False)
    console.print(f"signed by key {verification.key_fingerprint}; chain head {report.last_hash[:16]}...", markup=False)
    console.print(f"verified with the public key from {verification.key_source}"
                  + ("; it matches --fingerprint" if verification.pinned else ""), markup=False)
    return EXIT_OK


def _check_html_path(path: Path) -> None:
    """``--html``: a file in an existing, writable folder (never a folder; never a folder
    created on the way)."""
    from blossom_secure._fs import unwritable_reason

    if path.is_dir():
        raise UsageError(f"--html {path}: is a folder; give the name of the HTML file to write")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"--html {path}: the folder {parent} does not exist (it is not created)")
    reason = unwritable_reason(parent, (path.name,))
    if reason is not None:
        raise UsageError(f"--html {path}: {reason}")


def _ledger_view(site, records):
    """The site's ledger, reconciled with the verified records, as the review shows it
    (the same numbers as ``blossom-site budget``); ``None`` if the site never trained."""
    from blossom_secure.audit.report import LedgerRound, LedgerView
    from blossom_secure.site.config import AUDIT_FILE, LEDGER_FILE
    from blossom_secure.site.ledger import load_reconciled_ledger

    path = site.state_dir / LEDGER_FILE
    terms = site.policy.privacy
    ledger = load_reconciled_ledger(path, site_id=site.id, terms=terms, records=records,
                                    audit_file=str(site.state_dir / AUDIT_FILE))
    totals = _ledger_totals(ledger, terms)
    rounds = tuple(LedgerRound(round_id=e.round_id, epsilon_total=t, nominal=e.is_nominal)
                   for e, t in zip(ledger.entries, totals, strict=True))
    return LedgerView(path=str(path), rounds=rounds, epsilon_spent=totals[-1] if totals else 0.0)


def _ledger_totals(ledger, terms) -> list[float]:
    """The total after each ledger entry, for the policy's current delta and accountant
    (``budget`` and ``review`` show the same numbers)."""
    from blossom_secure.site.ledger import compute_epsilon

    return [compute_epsilon(ledger.history[: i + 1], accountant=terms.accountant, delta=terms.delta)
            for i in range(len(ledger.entries))]


def _audit_review(args) -> int:
    from blossom_secure.audit import report as audit_report

    if args.html is not None:
        _check_html_path(args.html)
    log_path, site = _audit_target(args)
    verified = _verified_records(args, site, log_path)
    if verified is None:
        return EXIT_AUDIT_FAILED
    verification, report, records = verified
    review = audit_report.summarise(records)
    ledger = _ledger_view(site, records) if site is not None else None
    try:
        tables = audit_report.review_table(review, round_id=args.round_id, ledger=ledger,
                                           max_messages=None if args.round_id is not None else _TERMINAL_MESSAGES)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for table in tables:
        console.print(table)
    if review.nominal_rounds:
        console.print(f"[bold]{review.nominal_rounds} round(s) were seeded simulations: their epsilon is nominal "
                      "(the noise follows from a public seed), not a privacy guarantee.[/bold]")
    budget = site.policy.privacy.epsilon_budget if site is not None else None
    console.print(f"epsilon spent: {audit_report.epsilon_summary(review, ledger, budget)}", markup=False)
    if args.html is not None:
        site_id = site.id if site is not None else (review.site_id or args.site or "unknown")
        audit_report.write_html(review, args.html, site_id=site_id, epsilon_budget=budget, ledger=ledger,
                                verification=verification)
        console.print(f"report: {args.html}", markup=False)
    console.print(f"(log verified: {report.records} records, key {verification.key_fingerprint} from "
                  f"{verification.key_source})", markup=False)
    return EXIT_OK


def _ledger_rebuild(args) -> int:
    from blossom_secure.audit import log as audit
    from blossom_secure.errors import DataError, Problem
    from blossom_secure.site.ledger import rebuild_ledger
    from blossom_secure.site.config import AUDIT_FILE, LEDGER_FILE

    _, site = _load(args)
    checked = _checked_key(args, site)
    if checked is None:
        return EXIT_AUDIT_FAILED
    key, fingerprint = checked
    log_path = site.state_dir / AUDIT_FILE
    if not log_path.exists() and not audit.checkpoint_path(log_path).exists():
        raise DataError([Problem(str(log_path), "", "no audit log: there is nothing to rebuild the ledger from")])
    try:
        log = audit.AuditLog.open(log_path, site_id=site.id, signing_key=key)  # verifies it; exit 1 if it does not
    except RuntimeError as exc:
        raise UsageError(f"{exc}: stop the site agent before rebuilding its ledger") from None
    except ValueError as exc:
        raise DataError([Problem(str(log_path), "", str(exc))]) from None
    written: list[dict] = []

    def record(details: dict) -> None:
        written.append(log.append(audit.LEDGER_REBUILT, round_id=None, details=details,
                                  policy_sha256=site.policy.sha256))

    with log:
        _, records = log.verified_records(events=(audit.TRAINING_FINISHED, audit.ROUND_JOINED))
        result = rebuild_ledger(site.state_dir / LEDGER_FILE, site_id=site.id, terms=site.policy.privacy,
                                records=records, audit_file=str(log_path), record_rebuild=record)
    terms = site.policy.privacy
    spend = (f"epsilon {result.epsilon_total:.3f} of the budget {terms.epsilon_budget:g} "
             f"(delta {terms.delta:g}, {terms.accountant} accountant)")
    if not result.changed:
        console.print(f"ledger {result.path} already holds every round the audit log proves: "
                      f"{len(result.entries)} rounds, {spend}; nothing changed", markup=False)
        return EXIT_OK
    console.print(f"rebuilt ledger {result.path} from the verified audit log {log_path} (key {fingerprint}):",
                  markup=False)
    kept = "round" if result.rounds_kept == 1 else "rounds"
    console.print(f"  {len(result.entries)} rounds: {result.rounds_proven - result.rounds_restored} proven by "
                  f"training_finished records, {result.rounds_kept} reserved {kept} kept from the previous ledger")
    if result.rounds_restored:
        console.print(f"  {result.rounds_restored} interrupted round(s) restored: joined and never finished, their "
                      "reserved spend is counted in a later training_finished total")
    console.print(f"  spent {spend}")
    if result.previous == "missing":
        console.print("  previous ledger: missing")
    else:
        why = f" ({result.previous_problem})" if result.previous_problem else ""
        console.print(f"  previous ledger ({result.previous}{why}) kept as {result.backup}", markup=False)
    console.print(f"  recorded in the audit log: ledger_rebuilt, seq {written[-1]['seq']}")
    if result.epsilon_total >= terms.epsilon_budget:
        console.print("  the budget is spent: the site will decline further rounds")
    return EXIT_OK


def _roster_entry(args) -> int:
    from blossom_secure.crypto import identity_public_key, key_fingerprint

    _, site = _load(args)
    public = identity_public_key(_open_key(site))
    if args.node_key:
        from blossom_secure.site.keys import load_or_create_node_key

        _, line = load_or_create_node_key(site.keys_dir)
        console.print(f"# {site.id}: SuperNode key, for [roster.node_keys] (identity key fingerprint "
                      f"{key_fingerprint(public)})", markup=False, soft_wrap=True)
        console.print(f'"{site.id}" = "{line}"', markup=False, soft_wrap=True)
        return EXIT_OK
    if args.pem:
        from blossom_secure.crypto import public_key_to_pem

        console.print(public_key_to_pem(public).decode("ascii").rstrip("\n"), markup=False, soft_wrap=True)
        return EXIT_OK
    console.print(f"# {site.id}: key fingerprint {key_fingerprint(public)}", markup=False, soft_wrap=True)
    console.print(f'"{site.id}" = "{public.hex()}"', markup=False, soft_wrap=True)
    return EXIT_OK


def _join(args) -> int:
    """Check everything, then run the SuperNode until interrupted (SIGINT: exit 130, SIGTERM: 0).

    Every refusal comes before anything starts, is recorded in the site's audit log and
    exits 2. A SuperNode that exits (as Flower's does when its SuperLink restarts) is
    started again after a pause that doubles up to a minute.
    """
    import signal

    from blossom_secure.errors import DataError, Problem
    from blossom_secure.runtimes.flower import processes
    from blossom_secure.site.steps import AUDIT_FILE

    _, site = _load(args)
    key = _open_key(site)  # KeyFileError (exit 2) if the site was never initialised
    try:
        host, _ = processes.parse_address(args.coordinator)
    except ValueError as exc:
        _refuse_join(site, key, f"--coordinator {exc}")
    if args.coordinator not in site.policy.coordinators:
        _refuse_join(site, key, f"coordinator {args.coordinator!r} is not allowed by the policy",
                     problem=Problem(str(site.policy.path), "policy.coordinators",
                                     f"does not list {args.coordinator!r}; add the coordinator's address to join it"))
    if args.insecure and not processes.is_loopback_host(host):
        _refuse_join(site, key, f"--insecure is refused for {args.coordinator}: without TLS only a coordinator on "
                                "this machine (loopback) may be joined")
    if args.root_certificates is not None:
        try:
            processes.check_ca_certificate(args.root_certificates)
        except ValueError as exc:
            _refuse_join(site, key, f"--root-certificates {exc}")
    if args.insecure:
        err_console.print(f"warning: --insecure: no TLS to {args.coordinator}; anything on this machine could "
                          "pose as the coordinator (for local trials only)", markup=False)
    node_key = None
    if args.supernode_auth:
        from blossom_secure.site.keys import load_or_create_node_key

        node_key, _ = load_or_create_node_key(site.keys_dir)
    try:
        command = processes.supernode_command(
            superlink=args.coordinator, site_dir=site.root, root_certificates=args.root_certificates,
            federation_file=args.federation, simulation_seed=args.seed, local_port=processes.free_local_port(),
            node_key=node_key)
    except ValueError as exc:
        raise DataError([Problem(str(site.root), "", str(exc))]) from None
    home = site.state_dir / processes.FLOWER_HOME_DIR
    log_path = site.state_dir / "flower-supernode.log"

    def on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    process = None
    tls = "without TLS" if args.insecure else f"TLS verified against {args.root_certificates}"
    if node_key is not None:
        tls += f", SuperNode key {node_key}"
    pause_s = _RESTART_PAUSE_S
    try:
        while True:
            process = processes.start_process(command, env=processes.flower_environment(home), log_path=log_path,
                                              cwd=site.state_dir)
            started = time.monotonic()
            console.print(f"{site.id}: SuperNode (pid {process.pid}) joining {args.coordinator}, {tls}", markup=False)
            console.print(f"log: {log_path}; audit log: {site.state_dir / AUDIT_FILE}; Ctrl-C to leave",
                          markup=False)
            while process.poll() is None:
                time.sleep(0.5)
            # A SuperNode ends when the SuperLink it registered with restarts (its node id is
            # unknown there): start a new one, as a hospital would, after a growing pause.
            pause_s = _RESTART_PAUSE_S if time.monotonic() - started > _MAX_RESTART_PAUSE_S else min(
                2 * pause_s, _MAX_RESTART_PAUSE_S)
            err_console.print(f"warning: the SuperNode exited with code {process.returncode} (see {log_path}); "
                              f"starting a new one in {pause_s:.0f} s", markup=False)
            process = None
            time.sleep(pause_s)
    except _Terminated:
        console.print(f"{site.id}: leaving (SIGTERM)", markup=False)
        return EXIT_OK
    finally:
        if process is not None:
            processes.end_process_group(process)
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM arrived (a ``BaseException``, as ``KeyboardInterrupt`` is)."""


def _refuse_join(site, key, message: str, *, problem=None):
    """Record the refusal in the site's audit log (an ``error`` record, ``error_type``
    ``JoinRefused``), then raise :class:`UsageError` with one line (exit 2)."""
    from blossom_secure.audit import log as audit
    from blossom_secure.site.steps import AUDIT_FILE

    site.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with audit.AuditLog.open(site.state_dir / AUDIT_FILE, site_id=site.id, signing_key=key) as log:
            log.append(audit.ERROR, round_id=None, policy_sha256=site.policy.sha256,
                       details={"message": f"join refused: {message}"[:1000], "error_type": "JoinRefused"})
    except RuntimeError as exc:  # the log is locked: a SuperNode of this site is running
        raise UsageError(f"{exc}: is this site already joined?") from None
    raise UsageError(str(problem) if problem is not None else message)


def entry() -> int:
    return run(main)


if __name__ == "__main__":
    raise SystemExit(entry())
