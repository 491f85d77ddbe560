"""``blossom``: commands for the people who run federations and experiments.

    blossom simulate --sites sites --rounds N --out DIR [--quick] [--mode blockwise|paper-full-model|full-model|local]
                     [--plaintext] [--seed S] [--fresh] [--allow-full-model] [--workers N|auto]
    blossom data synth --sites sites [--force]
    blossom experiment CONFIG.toml [--work DIR] [--out DIR] [--quick] [--workers N] [--fresh] [--report-only]
    blossom dev certificates DIR [--server-name NAME ...] [--site ID ...] [--days N] [--force]
    blossom coordinator serve --federation FILE --roster ROSTER.toml --certificates DIR [--address HOST:PORT]
                              [--rounds N] [--out DIR] [--wait-for-sites-s S] [--run-timeout-s S]
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from blossom_secure.cli import EXIT_OK, ArgumentParser, UsageError, console, run

QUICK_ROUNDS = 3
#: The coordinator's round counter in its --out folder (blossom_secure.coordinator.counter).
COORDINATOR_STATE_FILE = "coordinator-state.json"
_TEST_PKI_NOTE = "for local trials only; a real deployment uses the hospital's and the coordinator's own PKI"


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="blossom", description="Block-wise federated learning with DP and secure aggregation.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    sim = sub.add_parser("simulate", help="run the embedded federation over example sites on this machine")
    sim.add_argument("--sites", type=Path, default=Path("sites"), help="folder with federation.toml and site folders")
    sim.add_argument("--rounds", type=int, default=None, help="rounds (default: the federation file's)")
    sim.add_argument("--out", type=Path, required=True, help="folder for metrics.json and the global blocks")
    sim.add_argument("--quick", action="store_true", help=f"a short run ({QUICK_ROUNDS} rounds) for demos and tests")
    sim.add_argument("--mode", choices=("blockwise", "paper-full-model", "full-model", "local"), default=None,
                     help="aggregation mode (default: the federation file's, normally blockwise)")
    sim.add_argument("--plaintext", action="store_true",
                     help="aggregate in the clear (sites whose policy requires secure aggregation decline)")
    sim.add_argument("--seed", type=int, default=None,
                     help="seeded simulation: seeds initial values and, on synthetic sites only, DP sampling and "
                          "noise (their epsilon is then nominal, and marked so); default: noise from the OS CSPRNG")
    sim.add_argument("--fresh", action="store_true",
                     help="first delete the example sites' previous state (ledger, audit log, blocks)")
    sim.add_argument("--workers", default="1", metavar="N|auto",
                     help="train the sites of a round in N worker processes at once, one torch thread each "
                          "(auto: one per core; default 1, the sites one after the other). Pays off for large "
                          "models or many cores; starting the workers costs a few seconds")
    sim.add_argument("--allow-full-model", action="store_true",
                     help="allow --mode paper-full-model or full-model (shares heads, ignores policies; "
                          "synthetic sites only)")

    data = sub.add_parser("data", help="example-site data")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=ArgumentParser)
    synth = dsub.add_parser("synth", help="generate the example sites' synthetic DICOM studies and clinical tables")
    synth.add_argument("--sites", type=Path, default=Path("sites"))
    synth.add_argument("--force", action="store_true", help="regenerate data that already exist")
    exp = sub.add_parser("experiment", help="run a benchmark grid (BLOSSOM study: schemes x modality splits x DP)")
    exp.add_argument("config", type=Path, help="experiment file, e.g. experiments/blossom.toml")
    exp.add_argument("--work", type=Path, default=None,
                     help="work folder for site folders and per-cell results (default: runs/experiments/<name>; "
                          "a tmpfs such as /dev/shm is faster); an interrupted grid resumes from it")
    exp.add_argument("--out", type=Path, default=None,
                     help="report folder: CSV/JSON raw results, tables.md, PNG plots (default: <work>/report)")
    exp.add_argument("--quick", action="store_true", help="the file's [quick] grid (a tiny grid for CI)")
    exp.add_argument("--workers", type=int, default=None, help="processes over grid cells (default: the file's)")
    exp.add_argument("--fresh", action="store_true", help="discard finished cells in the work folder first")
    exp.add_argument("--report-only", action="store_true", help="write the report from finished cells; run nothing")

    dev = sub.add_parser("dev", help="tools for local trials of a deployment")
    devsub = dev.add_subparsers(dest="dev_command", required=True, parser_class=ArgumentParser)
    certs = devsub.add_parser(
        "certificates", help=f"write a test CA, a SuperLink certificate and site certificates ({_TEST_PKI_NOTE})",
        description=f"Write a test CA (ca.pem, ca.key), a server certificate for the SuperLink (server.pem, "
                    f"server.key) and a client certificate per site (sites/<id>.pem, sites/<id>.key): ECDSA P-256, "
                    f"unencrypted keys (mode 0600). {_TEST_PKI_NOTE[0].upper()}{_TEST_PKI_NOTE[1:]}.")
    certs.add_argument("dir", type=Path, metavar="DIR", help="folder to write to (must be empty unless --force)")
    certs.add_argument("--server-name", action="append", default=[], metavar="NAME",
                       help="a DNS name or IP address the SuperLink is reached at (repeatable); "
                            "localhost, 127.0.0.1 and ::1 are always included")
    certs.add_argument("--site", action="append", default=[], metavar="ID",
                       help="issue a client certificate for this site id (repeatable)")
    certs.add_argument("--days", type=int, default=30, help="validity in days, 1 to 825 (default 30)")
    certs.add_argument("--force", action="store_true", help="overwrite files of the same names")

    coord = sub.add_parser("coordinator", help="run a federation's coordinator (a Flower SuperLink)")
    csub = coord.add_subparsers(dest="coordinator_command", required=True, parser_class=ArgumentParser)
    serve = csub.add_parser(
        "serve", help="start the SuperLink, wait for the roster's sites, run the rounds, write the results, stop",
        description="Start a Flower SuperLink with TLS (ca.pem, server.pem, server.key from --certificates), wait "
                    "until the roster's sites have joined, run the rounds, write metrics.json and global_blocks.npz "
                    "to --out, then stop the SuperLink. A restart on the same --out continues: round numbers "
                    f"after the last one used ({COORDINATOR_STATE_FILE}), from the global blocks of the last "
                    "finished round (coordinator-rounds.json); a round in progress when it stopped is abandoned.")
    serve.add_argument("--federation", type=Path, required=True, help="the federation file")
    serve.add_argument("--roster", type=Path, required=True, help="the roster (site ids and identity public keys)")
    tls = serve.add_mutually_exclusive_group(required=True)
    tls.add_argument("--certificates", type=Path, metavar="DIR",
                     help="folder with ca.pem, server.pem and server.key (as `blossom dev certificates` writes)")
    tls.add_argument("--insecure", action="store_true",
                     help="no TLS: only for a trial on this machine (a loopback --address); warns on every start")
    serve.add_argument("--address", default="127.0.0.1:9092", metavar="HOST:PORT",
                       help="where the SuperLink listens; the sites' only connection (default 127.0.0.1:9092)")
    serve.add_argument("--rounds", type=int, default=None, help="rounds (default: the federation file's)")
    serve.add_argument("--out", type=Path, default=Path("runs") / "coordinator",
                       help="folder for metrics.json, global_blocks.npz, the SuperLink's log and the round counter")
    serve.add_argument("--wait-for-sites-s", type=float, default=300.0,
                       help="how long to wait for every roster site to join (default 300)")
    serve.add_argument("--run-timeout-s", type=float, default=3600.0,
                       help="stop the run if it has not finished after this long (default 3600)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "experiment":
        return _experiment(args, argv)
    if args.command == "dev":
        return _dev_certificates(args)
    if args.command == "coordinator":
        return _coordinator_serve(args)
    return _synth(args)


def _dev_certificates(args) -> int:
    from rich.text import Text

    from blossom_secure.runtimes.flower.certificates import write_dev_certificates

    try:
        result = write_dev_certificates(args.dir, server_names=args.server_name, site_ids=args.site, days=args.days,
                                        force=args.force)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # FileExistsError and NotADirectoryError name the file; so does a failed write
        raise UsageError(f"{exc.filename or args.dir}: {exc.strerror or exc}") from None
    table = Table(title=Text(f"test certificates in {result.directory}"), title_justify="left")
    table.add_column("for", overflow="fold")
    table.add_column("certificate\nkey (0600)", overflow="fold")
    table.add_column("names", overflow="fold")
    table.add_column("SHA-256 fingerprint", no_wrap=True)
    table.add_column("valid (UTC)", no_wrap=True)
    for c in result.certificates:
        usage = "CA" if c.info.is_ca else ", ".join(c.info.extended_key_usages)
        names = "\n".join((*c.info.dns_names, *c.info.ip_addresses, *c.info.uris)) or "-"
        fingerprint = "\n".join(c.info.sha256_fingerprint[i : i + 23] for i in range(0, 95, 24))
        files = f"{c.cert_path.relative_to(result.directory)}\n{c.key_path.relative_to(result.directory)}"
        valid = f"{c.info.not_before:%Y-%m-%d %H:%M}\nto {c.info.not_after:%Y-%m-%d %H:%M}"
        table.add_row(*(Text(x) for x in (f"{c.name}\n({usage})", files, names, fingerprint, valid)))
    console.print(table)
    for path in result.left_untouched:
        console.print(f"left in place, not rewritten: {path}", markup=False)
    d = result.directory
    console.print(f"These are test keys, unencrypted, {_TEST_PKI_NOTE}.", markup=False)
    console.print(f"SuperLink: flower-superlink --ssl-ca-certfile {d / 'ca.pem'} --ssl-certfile {d / 'server.pem'} "
                  f"--ssl-keyfile {d / 'server.key'}", markup=False, soft_wrap=True)
    console.print(f"SuperNode: flower-supernode --root-certificates {d / 'ca.pem'} --superlink <server-name>:8000",
                  markup=False, soft_wrap=True)
    if args.site:
        console.print("Flower 1.42 SuperNodes present no client certificate; sites/<id>.pem serve a TLS proxy or "
                      "server that requires mutual TLS.", markup=False)
    return EXIT_OK


def _read_next_round(path: Path, federation_id: str) -> int:
    """The first round a restarted coordinator may use (0 for a new one); exit 2 if unusable."""
    from blossom_secure.coordinator.counter import read_next_round

    return read_next_round(path, federation_id)


def _coordinator_serve(args) -> int:
    """Start the SuperLink, run the rounds over the joined sites, write the results, end the SuperLink."""
    import signal

    from blossom_secure.cli import EXIT_PROTOCOL, err_console
    from blossom_secure.config import load_federation
    from blossom_secure.coordinator.checkpoint import load_checkpoint
    from blossom_secure.coordinator.counter import write_next_round
    from blossom_secure.coordinator.rounds import initial_global_blocks
    from blossom_secure.roster import load_node_keys, load_roster
    from blossom_secure.runtimes.flower import processes
    from blossom_secure.runtimes.flower.certificates import CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE
    from blossom_secure.runtimes.flower.control import register_supernodes

    federation = load_federation(args.federation)
    roster = load_roster(args.roster, federation=federation)
    node_keys = load_node_keys(args.roster, federation=federation)
    try:
        host, port = processes.parse_address(args.address)
    except ValueError as exc:
        raise UsageError(f"--address {exc}") from None
    if args.rounds is not None and args.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    if args.wait_for_sites_s < 0 or args.run_timeout_s <= 0:
        raise UsageError("--wait-for-sites-s must be >= 0 and --run-timeout-s > 0")
    if args.insecure:
        if not processes.is_loopback_host(host):
            raise UsageError(f"--insecure is refused for {args.address}: without TLS the SuperLink may listen on "
                             "this machine's loopback address only")
        ca = certificates = None
    else:
        ca, cert, key = (args.certificates.resolve() / n for n in (CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE))
        for path in (ca, cert):
            try:
                processes.check_ca_certificate(path)
            except ValueError as exc:
                raise UsageError(f"--certificates {exc}") from None
        if not key.is_file():
            raise UsageError(f"--certificates {key}: the SuperLink's private key is missing")
        certificates = (ca, cert, key)
    out = args.out.resolve()
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    state_path = out / COORDINATOR_STATE_FILE
    first_round = _read_next_round(state_path, federation.id)
    checkpoint = load_checkpoint(out, federation, block_sizes={
        b: int(v.size) for b, v in initial_global_blocks(federation, include_heads=False, seed=0).items()})
    if checkpoint is not None:
        first_round = max(first_round, checkpoint.last_round + 1)
        console.print(f"continuing from the global blocks after round {checkpoint.last_round} "
                      f"({len(checkpoint.reports)} finished round(s) in {out})", markup=False)
    rounds = args.rounds or federation.training.rounds
    # reserve the round numbers before any site can answer them: a restart never reuses one
    write_next_round(state_path, federation.id, first_round + rounds)
    # the Control API is on the same port; reach a wildcard listener over loopback
    connect = f"127.0.0.1:{port}" if host in ("0.0.0.0", "::") else args.address
    log_path = out / "flower-superlink.log"

    def on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)  # end the SuperLink (finally below), exit 130
    if args.insecure:
        err_console.print(f"warning: --insecure: no TLS on {args.address}; anything on this machine could pose as a "
                          "site's transport or read the traffic (for local trials only)", markup=False)
    if not node_keys:
        err_console.print(f"warning: {args.roster} lists no [roster.node_keys]: SuperNode authentication is off, any "
                          "SuperNode that reaches the port can connect (only roster identity keys can take part)",
                          markup=False)
    command = processes.superlink_command(host=host, port=port, certificates=certificates,
                                          supernode_auth=bool(node_keys))
    process = processes.start_process(command, env=processes.flower_environment(out / processes.FLOWER_HOME_DIR),
                                      log_path=log_path, cwd=out)
    try:
        tls = "no TLS" if args.insecure else f"TLS, certificate {certificates[1]}"
        console.print(f"SuperLink (pid {process.pid}) listening on {args.address} ({tls}); log: {log_path}",
                      markup=False)
        if not processes.wait_listening(host if host not in ("0.0.0.0", "::") else "127.0.0.1", port,
                                        timeout_s=90, process=process):
            err_console.print(f"error: the SuperLink did not start; see {log_path}", markup=False)
            return EXIT_PROTOCOL
        if node_keys:
            try:
                register_supernodes(connect, root_certificates=ca, node_keys=node_keys)
            except (RuntimeError, ValueError) as exc:
                err_console.print(f"error: {exc}", markup=False)
                return EXIT_PROTOCOL
            console.print(f"SuperNode authentication on: the {len(node_keys)} node keys of {args.roster} "
                          "registered; no other SuperNode can connect", markup=False)
        return _run_rounds(args, connect, ca, out, federation, roster, first_round, rounds)
    finally:
        processes.end_process_group(process)
        console.print("SuperLink stopped", markup=False)


def _run_rounds(args, connect: str, ca: Path, out: Path, federation, roster, first_round: int, rounds: int) -> int:
    import json

    from blossom_secure.cli import EXIT_PROTOCOL, err_console
    from blossom_secure.runtimes.flower.control import start_run, stop_run, wait_for_run

    console.print(f"rounds {first_round} to {first_round + rounds - 1}; waiting up to {args.wait_for_sites_s:g} s "
                  f"for the {len(roster)} roster sites: {', '.join(roster)}", markup=False)
    run_id = start_run(connect, root_certificates=ca, run_config={
        "federation-file": str(Path(federation.path).resolve()), "roster-file": str(args.roster.resolve()),
        "out-dir": str(out), "rounds": rounds, "first-round": first_round,
        "wait-for-sites-s": float(args.wait_for_sites_s)})
    try:
        status = wait_for_run(connect, root_certificates=ca, run_id=run_id, timeout_s=args.run_timeout_s)
    except BaseException:
        stop_run(connect, root_certificates=ca, run_id=run_id)
        raise
    if status.status != "finished":
        stop_run(connect, root_certificates=ca, run_id=run_id)
        err_console.print(f"error: the run did not finish in {args.run_timeout_s:g} s; stopped", markup=False)
        return EXIT_PROTOCOL
    if status.sub_status != "completed":
        err_console.print(f"error: the run ended {status.sub_status}: {status.details or 'see the SuperLink log'}",
                          markup=False)
        return EXIT_PROTOCOL
    doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    ran = {k: v for k, v in doc.get("blocks", {}).items() if int(k) >= first_round}
    for round_key, blocks in sorted(ran.items(), key=lambda kv: int(kv[0])):
        outcome = ", ".join(f"{b}: {v.get('failure') or 'aggregated'}" for b, v in sorted(blocks.items()))
        console.print(f"round {round_key}: {outcome or 'no site took part'}", markup=False)
    console.print(f"metrics: {out / 'metrics.json'}", markup=False)
    console.print(f"global shared blocks: {out / 'global_blocks.npz'}", markup=False)
    if not any(ran.values()):
        err_console.print("error: no site took part in any round of this run (each site's audit log says why; a site "
                          "refuses a round number it has already answered, and a policy may decline)", markup=False)
        return EXIT_PROTOCOL
    return EXIT_OK


def _experiment(args, argv: list[str]) -> int:
    import json
    import shlex

    from blossom_secure.experiments import cells_of, load_experiment, load_results, run_grid, write_report
    from blossom_secure.experiments.runner import tuning_cells

    config = load_experiment(args.config, quick=args.quick)
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    work = args.work if args.work is not None else Path("runs") / "experiments" / (config.name + ("-quick" if args.quick
                                                                                                    else ""))
    out = args.out if args.out is not None else work / "report"
    tune = tuning_cells(config)
    console.print(f"{config.name}: {len(tune)} tuning cells, then {len(cells_of(config))} test cells, "
                  f"{len(config.seeds)} seed(s), {config.rounds} rounds; work folder {work}")
    tuning_path = work / "tuning.json"
    if args.report_only:
        tuning = json.loads(tuning_path.read_text()) if tune and tuning_path.is_file() else None
        choices = None
        if tuning is not None:
            choices = {(c["dataset"], c["tasks"], c["scheme"], c["epsilon"]): c for c in tuning["choices"]}
        results = load_results(work, cells_of(config, choices))
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            bar = progress.add_task("preparing data", total=len(tune) + len(cells_of(config)))

            def on_cell(result: dict, done: int, total: int) -> None:
                progress.update(bar, completed=done, total=total, description=result["key"][:60])

            results = run_grid(config, work, workers=args.workers, fresh=args.fresh, on_cell=on_cell)
        tuning = json.loads(tuning_path.read_text()) if tune else None
    runs_path = work / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.is_file() else []
    command = "blossom " + " ".join(shlex.quote(a) for a in argv)
    summary = write_report(results, out, config_text=args.config.read_text(encoding="utf-8"), command=command,
                           runs=runs, tuning=tuning, tuning_results=load_results(work, tune),
                           target_epsilon=config.target_epsilon)
    table = Table(title=f"Does joining pay? best block-wise minus each baseline, accuracy, epsilon "
                        f"{config.target_epsilon:g} (paired, 95% interval)", title_justify="left")
    for col in ("data set", "split", "partition", "best block-wise", "vs paper full model", "vs FedAvg+FT",
                "vs local (DP)", "vs local (no DP)"):
        table.add_column(col)
    for g in summary["goal"]:
        cells = []
        for baseline in ("paper-full-model", "fedavg-ft", "local", "local-nodp"):
            d = g.get(f"vs_{baseline}", {}).get("accuracy")
            cells.append("" if d is None else f"{d['diff_mean']:+.3f} {d['verdict']}")
        table.add_row(g["dataset"], g["split"], g["partition"], g["best_blockwise"], *cells)
    console.print(table)
    eps = summary["epsilon_max_over_all_sites"]
    console.print(f"largest epsilon spent by any site (DP on): {'n/a' if eps is None else f'{eps:.3f}'}")
    console.print(f"report: {out} (tables.md, cells.csv, curves.csv, tuning.json, summary.json, plots)")
    return EXIT_OK


def _worker_count(text: str) -> int:
    """``--workers``: a count of at least 1, or ``auto`` (the cores this process may use)."""
    if text.strip().lower() == "auto":
        from blossom_secure._system import available_cores

        return available_cores()
    try:
        workers = int(text)
    except ValueError:
        raise UsageError(f"--workers {text}: give a number of processes (at least 1) or auto") from None
    if workers < 1:
        raise UsageError("--workers must be at least 1 (or auto)")
    return workers


def _simulate(args) -> int:
    workers = _worker_count(args.workers)  # before the machine-learning imports: a typo answers at once
    from blossom_secure.cli import EXIT_BUDGET, EXIT_INVALID_INPUT, err_console
    from blossom_secure.runtimes.embedded.federation import simulate
    from blossom_secure.site.agent import DECLINED_BUDGET, DECLINED_POLICY

    rounds = args.rounds
    if args.quick:
        rounds = min(rounds or QUICK_ROUNDS, QUICK_ROUNDS)
    if rounds is not None and rounds < 1:
        raise UsageError("--rounds must be at least 1")
    if args.mode in ("full-model", "paper-full-model") and not args.allow_full_model:
        raise UsageError(f"--mode {args.mode} shares task heads and ignores the sites' policies; "
                         "add --allow-full-model to run this baseline (synthetic sites only)")
    if rounds is None:
        from blossom_secure.config import load_federation

        rounds_total = load_federation(args.sites / "federation.toml").training.rounds
    else:
        rounds_total = rounds
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = progress.add_task("checking sites", total=rounds_total)

        def on_setup(line: str) -> None:
            console.print(f"  site {line}", markup=False)

        def on_round(report, agents) -> None:
            progress.update(bar, advance=1, description=f"round {report.round_id}")
            console.print(_round_table(report, agents))

        result = simulate(sites_root=args.sites, rounds=rounds, out_dir=args.out, mode=args.mode,
                          secure=False if args.plaintext else None, seed=args.seed, fresh=args.fresh,
                          allow_full_model=args.allow_full_model, on_round=on_round, on_setup=on_setup,
                          workers=workers)
    ids = result.round_ids
    console.print(f"rounds {ids[0]} to {ids[-1]} (a round's number is never reused: the next run continues from "
                  f"{result.out_dir / COORDINATOR_STATE_FILE})", markup=False)
    console.print(f"metrics: {result.metrics_path}", markup=False)
    console.print(f"global shared blocks: {result.out_dir / 'global_blocks.npz'}", markup=False)
    console.print("each site's private blocks, ledger and audit log: <site>/state/", markup=False)
    budget = result.sites_declined(DECLINED_BUDGET)
    policy = result.sites_declined(DECLINED_POLICY)

    def listing(declined: dict[str, list[int]]) -> str:
        return "; ".join(f"{site} (round{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})"
                         for site, r in declined.items())

    if not result.any_trained:
        why = "privacy budget" if budget else "policy"
        err_console.print(f"error: no site trained in any round; declined for {why}: "
                          f"{listing(budget or policy)} (see `blossom-site budget` and `blossom-site audit review`)",
                          markup=False, soft_wrap=True)
        return EXIT_BUDGET if budget else EXIT_INVALID_INPUT
    if result.rounds_not_announced:
        console.print(f"no site could train in round {ids[-1]}, so the {result.rounds_not_announced} round(s) asked "
                      "for after it were not announced (their numbers stay free)", markup=False)
    if budget:
        idle = result.rounds_without_training
        # "the others went on" only if, in every round, some site did
        went_on = (f"no site trained in round{'s' if len(idle) > 1 else ''} {', '.join(map(str, idle))}" if idle
                   else "the others went on")
        err_console.print(f"error: the privacy budget stopped {listing(budget)} from joining; {went_on}, and the "
                          "results are written (see `blossom-site budget`)", markup=False, soft_wrap=True)
        return EXIT_BUDGET
    return EXIT_OK


def _round_table(report, agents) -> Table:
    """The round as the coordinator saw it: only what each site's report released."""
    nominal = any(s["reported"] and s["epsilon_nominal"] for s in report.sites.values())
    table = Table(title=f"round {report.round_id}", title_justify="left", caption_justify="left",
                  caption="epsilon*: nominal (seeded simulation: the noise is reproducible, not a privacy guarantee)"
                  if nominal else None)
    for col in ("site", "task", "accuracy", "macro-F1", "chance", "epsilon", "status"):
        table.add_column(col, justify="right" if col in ("accuracy", "macro-F1", "chance", "epsilon") else "left")
    for agent in agents:
        s = report.sites[agent.id]
        status = "declined: " + s["declined"] if s["declined"] else "trained"
        if not s["reported"]:
            table.add_row(agent.id, "-", "-", "-", "-", "-", ("trained" if s["joined"] else "did not join")
                          + "; report withheld by policy")
            continue
        eps = "-" if s["epsilon"] is None else f"{s['epsilon']:.3f}" + ("*" if s["epsilon_nominal"] else "")
        for task, m in sorted(s["tasks"].items()):
            table.add_row(agent.id, task, _rate(m["accuracy"]), _rate(m["macro_f1"]),
                          _rate(m["majority_class_rate"]), eps, status)
    return table


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _synth(args) -> int:
    from blossom_secure.config import load_federation
    from blossom_secure.site.config import load_site, site_dirs
    from blossom_secure.site.agent import ensure_site_data

    federation = load_federation(args.sites / "federation.toml")
    for d in site_dirs(args.sites):
        site = load_site(d, federation=federation)
        if site.synth is None:
            console.print(f"{site.id}: no [synth] section (real data); skipped")
            continue
        if args.force and (site.root / "data").is_dir():
            shutil.rmtree(site.root / "data")
        made = ensure_site_data(site, federation)
        console.print(f"{site.id}: {'generated' if made else 'data already present'} in {site.root / 'data'}")
    return EXIT_OK


def entry() -> int:
    return run(main)


if __name__ == "__main__":
    raise SystemExit(entry())
