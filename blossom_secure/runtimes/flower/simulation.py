"""Large virtual federations: the deployment's ServerApp and ClientApp on Flower's simulation engine.

The same :data:`~blossom_secure.runtimes.flower.apps.server_app` and
:data:`~blossom_secure.runtimes.flower.apps.client_app` that run on a SuperLink and real
SuperNodes run here on Flower 1.42's simulation engine: one *virtual* SuperNode per site
folder, their ClientApps executed by a pool of Ray actors (on this machine, or on a Ray
cluster), the ServerApp in this process. Every message still goes through the wire format,
every reply is signed by its site and checked against the roster, every site keeps its own
key, ledger, audit log and private blocks in its own folder; only the transport is
in-process. Secure aggregation is always on (as in a deployment).

Which site a virtual SuperNode is: Flower gives a virtual SuperNode only ``partition-id``
and ``num-partitions`` in its node config. Partition ``i`` is the ``i``-th site folder,
sorted by path, under the folder named by the environment variable
``BLOSSOM_SIMULATION_SITES`` of the Ray workers (:func:`~blossom_secure.runtimes.flower.apps.node_site`);
``BLOSSOM_SIMULATION_SEED`` (optional) seeds the synthetic sites' DP noise. This module
starts Ray with both in the job's environment (``runtime_env``), so it also holds on a Ray
cluster whose nodes see the sites folder at the same path. A coordinator cannot set either:
its run config and messages are never used to find a site, and a deployed SuperNode names
its site folder in its own node config (``site-dir``), which always takes precedence.

Entry point::

    python -m blossom_secure.runtimes.flower.simulation --sites sites --rounds 1 --out runs/sim

This uses Flower 1.42's own simulation entry (``flwr.simulation.run_simulation``'s
implementation, which accepts the ServerApp's context and so its run config) and needs the
``simulation`` extra (``flwr[simulation]``, which brings Ray): not a stable public API,
hence the pinned version.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from blossom_secure.config import FederationConfig, load_federation
from blossom_secure.errors import PolicyError, Problem
from blossom_secure.runtimes.embedded.federation import reset_site_state
from blossom_secure.roster import load_roster, roster_path, write_roster
from blossom_secure.site.config import load_site, site_dirs
from blossom_secure.site.steps import SiteFiles, site_identity

__all__ = ["SimulationSites", "main", "prepare_sites", "run_simulation"]

logger = logging.getLogger(__name__)

#: The Ray address that starts a private Ray instance on this machine.
LOCAL_RAY = "local"


@dataclass(frozen=True)
class SimulationSites:
    """The sites of a simulation, checked.

    Attributes:
        root: The folder of site folders (absolute).
        federation: Its ``federation.toml``.
        site_dirs: The site folders, sorted by path: partition ``i`` is ``site_dirs[i]``.
        site_ids: Their site ids, in the same order.
        roster_file: The roster (``roster.toml`` beside the federation file).
        roster_written: Whether :func:`prepare_sites` wrote it.
        first_round: The first round the sites accept: one after the last round any
            site's verified audit log shows it answered (0 for new sites).
    """

    root: Path
    federation: FederationConfig
    site_dirs: tuple[Path, ...]
    site_ids: tuple[str, ...]
    roster_file: Path
    roster_written: bool
    first_round: int


def prepare_sites(sites_root: Path, *, fresh: bool = False) -> SimulationSites:
    """Check the sites folder for a simulation; create each site's identity key on first
    use and, if there is none, the roster beside the federation file.

    Args:
        sites_root: Folder holding ``federation.toml`` and one folder per site; every
            site file must name that federation file.
        fresh: First delete the files of every site's ``state/`` folder (ledger, audit
            log, private blocks); refused unless every site holds synthetic data.

    Raises:
        PolicyError: no site folder, an invalid site, federation or roster file, a site
            bound to another federation file, two sites with one id, a roster that does
            not list exactly these sites with their keys, or ``fresh`` with a site
            without ``[synth]`` (every problem at once).
        KeyFileError: a site's identity key exists but cannot be used.
        AuditIntegrityError: a site's audit log does not verify.
    """
    from blossom_secure.site.steps import SiteContext

    root = Path(sites_root).resolve()
    federation_file = root / "federation.toml"
    federation = load_federation(federation_file)
    dirs = site_dirs(root)
    if len(dirs) < 2:
        raise PolicyError([Problem(str(root), "", f"{len(dirs)} site folder(s) (each with a site.toml); "
                                                  "a federation needs at least 2")])
    problems: list[Problem] = []
    if fresh:
        problems = [Problem(str(d / "site.toml"), "synth", "--fresh is only for sites with synthetic data "
                                                           "([synth] section)")
                    for d in dirs if load_site(d, federation=federation).synth is None]
        if problems:
            raise PolicyError(problems)
        for d in dirs:
            reset_site_state(d)
    keys: dict[str, bytes] = {}
    ids: list[str] = []
    for d in dirs:
        named = load_site(d).federation_file
        if named is None or named.resolve() != federation_file:
            problems.append(Problem(str(d / "site.toml"), "site.federation", f"must name {federation_file}"))
            continue
        site_id, key = site_identity(SiteFiles(d))
        if site_id in keys:
            problems.append(Problem(str(d / "site.toml"), "site.id", f"{site_id!r} is the id of another site"))
            continue
        keys[site_id] = key
        ids.append(site_id)
    if problems:
        raise PolicyError(problems)
    path = roster_path(federation)
    written = not path.exists()
    if written:
        write_roster(path, federation=federation, keys=keys)
        logger.info("wrote the roster of the %d sites to %s", len(keys), path)
    roster = load_roster(path, federation=federation)
    for site_id in sorted(set(roster) | set(keys)):
        if site_id not in keys:
            problems.append(Problem(str(path), f"roster.sites.{site_id}", "no site folder has this id"))
        elif roster.get(site_id) != keys[site_id]:
            problems.append(Problem(str(path), f"roster.sites.{site_id}",
                                    "missing, or not the key in the site's keys/ folder (delete the roster to "
                                    "write a new one from the sites' keys)"))
    if problems:
        raise PolicyError(problems)
    last = -1
    for d in dirs:
        with SiteContext.open(SiteFiles(d), federation=federation) as ctx:
            answered = ctx.last_round_answered()
        last = max(last, -1 if answered is None else answered)
    return SimulationSites(root=root, federation=federation, site_dirs=tuple(dirs), site_ids=tuple(ids),
                           roster_file=path, roster_written=written, first_round=last + 1)


def run_simulation(*, sites_root: Path, out_dir: Path, rounds: int | None = None, seed: int | None = None,
                   fresh: bool = False, num_cpus: int | None = None, client_num_cpus: float = 1.0,
                   stage_timeout_s: float = 900.0, ray_address: str = LOCAL_RAY, verbose: bool = False,
                   on_round: Callable[[int, float], None] | None = None) -> Path:
    """Run the federation of the sites under ``sites_root`` on Flower's simulation engine.

    Args:
        sites_root: Folder holding ``federation.toml`` and one folder per site (see
            :func:`prepare_sites`); one virtual SuperNode per site folder.
        out_dir: Where ``metrics.json`` and ``global_blocks.npz`` are written (as by
            ``blossom coordinator serve``).
        rounds: Rounds to run (``None``: the federation file's number).
        seed: Seed of the initial global blocks and, on sites with synthetic data only, of
            DP sampling and noise (nominal epsilon, marked so); ``None``: OS CSPRNG.
        fresh: Delete the sites' previous state first (synthetic sites only); without
            it, rounds are numbered on from the last round any site answered.
        num_cpus: CPUs Ray may use on this machine (``None``: all); ignored when joining
            a running cluster.
        client_num_cpus: CPUs per ClientApp actor: the number of sites answering at
            once is the cluster's CPUs over this.
        stage_timeout_s: How long a stage waits for the sites' replies (every site's
            step of a stage is queued on the actor pool, so this grows with the sites).
        ray_address: ``"local"``: a private Ray instance on this machine, ended after
            the run; ``"auto"`` or ``"ray://host:port"``: join that cluster (the sites
            folder must be at the same path on its nodes).
        verbose: Flower's DEBUG logs.
        on_round: Called in this process as ``on_round(round_id, seconds)`` when a round
            ends (from the ServerApp's log), for progress displays and benchmarks.

    Returns:
        The path of ``metrics.json``.

    Raises:
        PolicyError, KeyFileError: see :func:`prepare_sites`.
        ValueError: bad arguments.
        RuntimeError: the run failed (for example fewer sites than the roster proved
            their identity); the message says why.

    Notes:
        Flower's telemetry and Ray's usage statistics are turned off for this process
        and the Ray instance it starts, unless the environment already says otherwise
        (nothing about a federation should leave the machine unasked).
    """
    _quiet_environment()
    from blossom_secure.runtimes.flower import apps

    if rounds is not None and rounds < 1:
        raise ValueError("rounds must be at least 1")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError("seed must be a non-negative integer")
    if num_cpus is not None and num_cpus < 1:
        raise ValueError("num_cpus must be at least 1")
    if not client_num_cpus > 0:
        raise ValueError("client_num_cpus must be positive")
    sites = prepare_sites(sites_root, fresh=fresh)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_config = dict(apps.RUN_CONFIG_DEFAULTS)
    run_config.update({
        "federation-file": str(sites.root / "federation.toml"), "roster-file": str(sites.roster_file),
        "out-dir": str(out), "rounds": rounds or 0, "first-round": sites.first_round, "seed": seed or 0,
        "stage-timeout-s": float(stage_timeout_s), "identify-timeout-s": float(stage_timeout_s),
        "wait-for-sites-s": 0.0, "poll-interval-s": 0.05})
    apps.RunSettings.from_run_config(run_config)  # a bad value is refused before Ray starts
    env = {apps.SIMULATION_SITES_ENV: str(sites.root)}
    if seed is not None:
        env[apps.SIMULATION_SEED_ENV] = str(seed)
    with _RoundClock(on_round):
        _run_on_engine(run_config, num_supernodes=len(sites.site_dirs), env=env, num_cpus=num_cpus,
                       client_num_cpus=client_num_cpus, ray_address=ray_address, verbose=verbose)
    return out / "metrics.json"


def _quiet_environment() -> None:
    """No Flower telemetry and no Ray usage statistics unless the environment asks for them
    (read when ``flwr`` is first imported and when Ray starts)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _run_on_engine(run_config: Mapping[str, str | int | float], *, num_supernodes: int, env: Mapping[str, str],
                   num_cpus: int | None, client_num_cpus: float, ray_address: str, verbose: bool) -> None:
    import ray
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from blossom_secure.runtimes.flower.apps import client_app, server_app

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; run the simulation in a fresh process")
    # Ray workers import the package as this process does, and get the sites' settings
    # in the job's environment: on this machine and on every node of a cluster.
    pythonpath = os.pathsep.join([p for p in sys.path if p] + ([os.environ["PYTHONPATH"]]
                                                               if os.environ.get("PYTHONPATH") else []))
    init_args: dict = {"address": ray_address, "include_dashboard": False,
                       "logging_level": "DEBUG" if verbose else "WARNING", "log_to_driver": verbose,
                       "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath, **env}}}
    if ray_address == LOCAL_RAY and num_cpus is not None:
        init_args["num_cpus"] = int(num_cpus)
    with warnings.catch_warnings():  # Ray's notice about GPU variables: no GPU is asked for here
        warnings.simplefilter("ignore", FutureWarning)
        ray.init(**init_args)
    try:
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
        _run_simulation(num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                        client_app=client_app, server_app=server_app, backend_name="ray",
                        backend_config={"client_resources": {"num_cpus": client_num_cpus, "num_gpus": 0.0}},
                        server_app_context=context, verbose_logging=verbose)
    finally:
        if ray.is_initialized():
            ray.shutdown()


class _RoundClock(logging.Filter):
    """Times rounds from the ServerApp's log records (``round R: starting`` / ``round R: blocks``).

    A filter on the ServerApp's logger: it sees every record, and lets through only those
    the logger would have let through without it, so timing rounds changes no output.
    """

    def __init__(self, on_round: Callable[[int, float], None] | None) -> None:
        super().__init__()
        self.on_round = on_round
        self.started: dict[int, float] = {}
        self._logger = logging.getLogger("blossom_secure.runtimes.flower.apps")
        self._level = self._logger.level
        self._shown = self._logger.getEffectiveLevel()

    def __enter__(self) -> _RoundClock:
        if self.on_round is not None:
            self._logger.addFilter(self)
            self._logger.setLevel(min(self._shown, logging.INFO))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.on_round is not None:
            self._logger.removeFilter(self)
            self._logger.setLevel(self._level)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "round %d: starting with %d sites":
            self.started[record.args[0]] = record.created
        elif record.msg == "round %d: blocks %s" and record.args[0] in self.started:
            self.on_round(record.args[0], record.created - self.started.pop(record.args[0]))
        return record.levelno >= self._shown


# ------------------------------------------------------------------------------------ command


def _parser():
    from blossom_secure.cli import ArgumentParser

    p = ArgumentParser(
        prog="python -m blossom_secure.runtimes.flower.simulation",
        description="Run a federation on Flower's simulation engine (Ray): one virtual SuperNode per site "
                    "folder, the deployment's ServerApp and ClientApp, secure aggregation on.")
    p.add_argument("--sites", type=Path, default=Path("sites"), help="folder with federation.toml and site folders")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json and the global blocks")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default: the federation file's)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeded simulation: initial values and, on synthetic sites only, DP sampling and noise "
                        "(epsilon nominal); default: noise from the OS CSPRNG")
    p.add_argument("--fresh", action="store_true",
                   help="first delete the sites' previous state (ledger, audit log, blocks; synthetic sites only)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use on this machine (default: all)")
    p.add_argument("--client-cpus", type=float, default=1.0,
                   help="CPUs per ClientApp actor: sites answering at once = CPUs / this (default 1)")
    p.add_argument("--stage-timeout-s", type=float, default=900.0,
                   help="how long a stage waits for the sites' replies (default 900)")
    p.add_argument("--ray-address", default=LOCAL_RAY,
                   help="'local' (default: a private Ray instance here), 'auto' or ray://HOST:PORT (a cluster)")
    p.add_argument("--verbose", action="store_true", help="Flower's and Ray's debug logs")
    return p


def _main(argv: list[str]) -> int:
    import json

    from blossom_secure.cli import EXIT_OK, EXIT_PROTOCOL, UsageError, console, err_console

    args = _parser().parse_args(argv)
    _quiet_environment()
    try:
        import ray  # noqa: F401

        import flwr  # noqa: F401
    except ImportError:
        raise UsageError("Flower's simulation engine needs the simulation extra: "
                         "pip install 'blossom_secure[simulation]'") from None

    def on_round(round_id: int, seconds: float) -> None:
        console.print(f"round {round_id}: done in {seconds:.1f} s", markup=False)

    if not args.verbose:
        logging.getLogger("flwr").propagate = False  # Flower keeps its own console handler

    try:
        path = run_simulation(sites_root=args.sites, out_dir=args.out, rounds=args.rounds, seed=args.seed,
                              fresh=args.fresh, num_cpus=args.num_cpus, client_num_cpus=args.client_cpus,
                              stage_timeout_s=args.stage_timeout_s, ray_address=args.ray_address,
                              verbose=args.verbose, on_round=on_round)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:
        err_console.print(f"error: the run failed: {_one_line(exc)}", markup=False)
        return EXIT_PROTOCOL
    doc = json.loads(path.read_text(encoding="utf-8"))
    for round_key, blocks in sorted(doc.get("blocks", {}).items(), key=lambda kv: int(kv[0])):
        outcome = ", ".join(f"{b}: {v.get('failure') or 'aggregated'}" for b, v in sorted(blocks.items()))
        console.print(f"round {round_key}: {outcome}", markup=False, soft_wrap=True)
    console.print(f"metrics: {path}", markup=False, soft_wrap=True)
    console.print(f"global shared blocks: {path.parent / 'global_blocks.npz'}", markup=False, soft_wrap=True)
    console.print("each site's private blocks, ledger and audit log: <site>/state/", markup=False)
    return EXIT_OK


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """``python -m blossom_secure.runtimes.flower.simulation --sites DIR --out DIR [--rounds N] ...``.

    Exit codes as ``blossom``'s (:mod:`blossom_secure.cli`): 0; 2 for a bad argument or an
    invalid site, federation or roster file; 4 when the run failed (the reason on one line).
    """
    from blossom_secure.cli import run

    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
