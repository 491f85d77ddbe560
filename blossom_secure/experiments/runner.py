"""Running the grid: one *cell* is one federation of real site folders, run end to end.

For every cell the runner writes, under its work folder, a federation file, one policy
and one ``site.toml`` per site, and then runs the real components: :class:`SiteAgent`
(policy, privacy ledger, signed audit log, DP-SGD through Opacus), the
:class:`~blossom_secure.runtimes.embedded.federation.Coordinator` and, for block-wise schemes, the
:class:`~blossom_secure.runtimes.embedded.aggregators.SecureAggregator`. The data of a cell's sites
(clinical CSV, DICOM studies) are written once per data set, partition, split and seed and
shared by the cells that use them.

Schemes (BLOSSOM, arXiv 2603.27552, section on partial personalisation):

==========================  ====================================================================
``private-head``            policy shares ``encoder.*`` and ``fusion``; heads stay (block-wise
                            mode, secure aggregation)
``private-head-fusion``     policy shares ``encoder.*``; fusion and heads stay
``paper-full-model``        the paper's baseline: one global model, every block, heads
                            included, averaged over every site (FedAvg); a site without a block
                            sends it back unchanged and dilutes the mean (the coordinator's
                            simulation-only ``paper-full-model`` mode; taken in memory, since
                            heads can never enter secure aggregation)
``full-model``              every block, heads included, averaged over the sites that hold it
                            only (an ablation: block-wise for encoders, global for heads)
``local``                   no federation
``local-nodp``              no federation and no DP, in the DP-on cells: a model that never
                            leaves the hospital needs no DP, so this is what a hospital weighs
                            against joining (in the DP-off cells it is ``local``, not repeated)
==========================  ====================================================================

DP on: each site's policy carries the noise multiplier that makes its *whole run*
(``rounds`` rounds of ``ceil(n_train / batch)`` Poisson-sampled steps) cost at most
``target_epsilon`` at ``delta`` under Opacus's RDP accountant
(``opacus.accountants.utils.get_noise_multiplier``), and the policy's budget is that
target, so the site's ledger refuses any round beyond it. DP off: the site agent is built
with ``simulation_without_dp=True`` (simulation only; no clipping, no noise).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from blossom_secure._fs import atomic_write
from blossom_secure.experiments.config import ExperimentConfig
from blossom_secure.experiments.datasets import Pool, load_pool, write_site_data
from blossom_secure.experiments.partition import dirichlet_partition, iid_partition, modality_roles

__all__ = ["Cell", "build_data", "cells_of", "noise_for_run", "run_cell", "run_grid"]

logger = logging.getLogger(__name__)

FEDERATION_ID = "blossom-bench"
_SHARES = {"private-head": ["encoder.*", "fusion"], "private-head-fusion": ["encoder.*"],
           "paper-full-model": ["encoder.*", "fusion"], "full-model": ["encoder.*", "fusion"],
           "local": ["encoder.*", "fusion"], "local-nodp": ["encoder.*", "fusion"]}
_MODES = {"private-head": "blockwise", "private-head-fusion": "blockwise", "paper-full-model": "paper-full-model",
          "full-model": "full-model", "local": "local", "local-nodp": "local"}
#: Schemes that aggregate nothing through the coordinator's aggregator.
_NOT_AGGREGATED = ("paper-full-model", "full-model", "local", "local-nodp")
_SYNTH_WINDOW = (-160.0, 240.0)


@dataclass(frozen=True)
class Cell:
    """One run of the grid.

    Attributes:
        dataset: ``synthetic``, ``breast_cancer`` or ``digits``.
        tasks: ``single`` (every site the data set's first task) or ``hetero`` (sites
            alternate between the synthetic data set's two tasks).
        split: Modality split name (counts of A-only, B-only, both sites).
        partition: ``iid`` or ``dirichlet``.
        scheme: See the module documentation.
        dp: ``on`` or ``off``.
        seed: Partition, initial values, sampling and noise.
        aggregation: ``secure`` or ``plaintext`` (block-wise schemes), ``in-memory``
            (full-model), ``none`` (local).
    """

    dataset: str
    tasks: str
    split: str
    partition: str
    scheme: str
    dp: str
    seed: int
    aggregation: str

    @property
    def key(self) -> str:
        return "_".join([self.dataset, self.tasks, self.split, self.partition, self.scheme, f"dp-{self.dp}",
                         f"s{self.seed}", self.aggregation])

    @property
    def data_key(self) -> str:
        return "_".join([self.dataset, self.tasks, self.split, self.partition, f"s{self.seed}"])


def _aggregation(scheme: str, secure: bool) -> str:
    if scheme in ("paper-full-model", "full-model"):
        return "in-memory"
    if scheme in ("local", "local-nodp"):
        return "none"
    return "secure" if secure else "plaintext"


def cells_of(config: ExperimentConfig) -> list[Cell]:
    """Every cell of the experiment: the main grid, task heterogeneity, the plaintext twins."""
    out: list[Cell] = []
    seen: set[str] = set()

    def add(grid, tasks: str, secure: bool) -> None:
        if grid is None:
            return
        for dataset in grid.datasets:
            for split in grid.splits:
                for partition in grid.partitions:
                    for scheme in grid.schemes:
                        for dp in grid.dp:
                            if scheme == "local-nodp" and dp == "off":
                                continue  # the same run as local with DP off
                            for seed in config.seeds:
                                cell = Cell(dataset, tasks, split, partition, scheme, dp, seed,
                                            _aggregation(scheme, secure))
                                if cell.key not in seen:
                                    seen.add(cell.key)
                                    out.append(cell)

    add(config.grid, "single", True)
    add(config.heterogeneous, "hetero", True)
    if config.plaintext is not None:
        add(config.plaintext, "single", False)
    return [c for c in out if not (c.aggregation == "plaintext" and c.scheme in _NOT_AGGREGATED)]


# ------------------------------------------------------------------------------------------
# Data and site folders


def _site_name(i: int) -> str:
    return f"site-{i:02d}"


def _tasks_of(pool: Pool, tasks: str, i: int) -> tuple[str, ...]:
    names = list(pool.labels)
    if tasks == "hetero":
        return (names[i % len(names)],)
    return (names[0],)


def _partition_seed(seed: int, dataset: str) -> int:
    return seed * 1000 + sum(map(ord, dataset))


def site_indices(config: ExperimentConfig, pool: Pool, partition: str, seed: int) -> list[np.ndarray]:
    """Which pool examples each site gets (labels of the pool's first task for label skew)."""
    if partition == "iid":
        return iid_partition(len(pool), config.sites, seed=_partition_seed(seed, pool.name))
    first = next(iter(pool.labels))
    return dirichlet_partition(pool.labels[first], config.sites, alpha=config.dirichlet_alpha,
                               seed=_partition_seed(seed, pool.name), min_size=config.min_site_examples)


def build_data(config: ExperimentConfig, cell: Cell, work_dir: Path, pools: dict[str, Pool]) -> Path:
    """Write the site data folders of ``cell.data_key`` (once) and a ``sites.json`` describing them."""
    from blossom_secure.site.data import split_holdout

    root = work_dir / "data" / cell.data_key
    meta_path = root / "sites.json"
    if meta_path.is_file():
        return root
    if cell.dataset not in pools:
        pools[cell.dataset] = load_pool(cell.dataset, work_dir, synthetic_patients=config.synthetic_patients,
                                        synthetic_image_size=config.image_size)
    pool = pools[cell.dataset]
    if root.exists():
        shutil.rmtree(root)
    parts = site_indices(config, pool, cell.partition, cell.seed)
    roles = modality_roles(*config.splits[cell.split])
    sites = {}
    for i, (idx, role) in enumerate(zip(parts, roles, strict=True)):
        name = _site_name(i)
        modalities = pool.modalities_of(role)
        tasks = _tasks_of(pool, cell.tasks, i)
        write_site_data(pool, root / name, indices=idx, modalities=modalities, tasks=tasks)
        ids = sorted(pool.patient_ids[j] for j in idx)
        train, test = split_holdout(ids, fraction=config.holdout_fraction, seed=cell.seed)
        sites[name] = {"role": role, "modalities": list(modalities), "tasks": list(tasks), "n": len(ids),
                       "n_train": int(train.size), "n_heldout": int(test.size),
                       "label_counts": np.bincount(pool.labels[tasks[0]][idx],
                                                   minlength=pool.num_classes[tasks[0]]).tolist()}
    atomic_write(meta_path, json.dumps({"dataset": cell.dataset, "sites": sites}, indent=1).encode() + b"\n")
    return root


@lru_cache(maxsize=4096)
def noise_for_run(*, batches: int, epochs: int, rounds: int, target_epsilon: float, delta: float,
                  accountant: str) -> float:
    """The noise multiplier with which ``rounds`` rounds of ``epochs`` epochs of ``batches``
    Poisson-sampled steps (sample rate ``1 / batches``, as :func:`~blossom_secure.site.training.plan_round`
    plans them) cost at most ``target_epsilon`` in total at ``delta``: Opacus's
    ``get_noise_multiplier`` over all ``rounds * epochs * batches`` steps."""
    from blossom_secure.site.ledger import noise_for_target

    return noise_for_target(target_epsilon=target_epsilon, delta=delta, sample_rate=1.0 / batches,
                            steps=batches * epochs * rounds, accountant=accountant)


def _noise_table(config: ExperimentConfig, work_dir: Path, batch_counts: set[int]) -> dict[int, float]:
    """Noise multiplier per number of batches, cached in ``work_dir/noise.json``."""
    path = work_dir / "noise.json"
    key = json.dumps([config.rounds, config.local_epochs, config.target_epsilon, config.delta, config.accountant])
    table = {}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            table = {int(b): float(s) for b, s in saved["noise"].items()}
    for b in sorted(batch_counts - set(table)):
        table[b] = noise_for_run(batches=b, epochs=config.local_epochs, rounds=config.rounds,
                                 target_epsilon=config.target_epsilon, delta=config.delta,
                                 accountant=config.accountant)
    atomic_write(path, json.dumps({"key": key, "noise": {str(b): s for b, s in sorted(table.items())}},
                                  indent=1).encode() + b"\n")
    return table


def _toml_list(values: Iterable) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _federation_toml(config: ExperimentConfig, pool_meta: dict, cell: Cell) -> str:
    ds = pool_meta
    e, h = config.embedding_dim, _toml_list(config.hidden)
    image_size = config.image_size if cell.dataset == "synthetic" else (8, 8)
    channels = config.image_channels if cell.dataset == "synthetic" else (4,)
    lines = [
        "# Written by blossom experiment: one cell of the benchmark grid.",
        "[federation]", f'id = "{FEDERATION_ID}"', f'name = "{cell.key}"', 'coordinator = "embedded"', "",
        "[model]", f"embedding_dim = {e}", "",
        "[model.image]" + ("" if cell.dataset == "synthetic" else "   # declared by the layout; held by no site"),
        "spatial_dims = 2", f"size = {_toml_list(image_size)}",
        f"window = {_toml_list(_SYNTH_WINDOW)}", 'architecture = "cnn"', f"channels = {_toml_list(channels)}",
        'norm = "group"', "",
        "[model.tabular]", f"features = {_toml_list(ds['columns']['tabular'])}", f"hidden = {h}", "",
        *_scaling_toml("model.tabular", ds["columns"]["tabular"], ds["scaling"]["tabular"]),
    ]
    for m, cols in ds["columns"].items():
        if m != "tabular":
            lines += [f"[model.extra_tabular.{m}]", f"features = {_toml_list(cols)}", f"hidden = {h}", "",
                      *_scaling_toml(f"model.extra_tabular.{m}", cols, ds["scaling"][m])]
    lines += ["[model.tasks]"] + [f"{t} = {k}" for t, k in ds["num_classes"].items()] + [""]
    lines += [
        "[training]", f"rounds = {config.rounds}", f"local_epochs = {config.local_epochs}",
        f"batch_size = {config.batch_size}", f"learning_rate = {config.learning_rate!r}",
        f"momentum = {config.momentum!r}", f"holdout_fraction = {config.holdout_fraction!r}",
        f"split_seed = {cell.seed}", "",
        "[aggregation]", f'mode = "{_MODES[cell.scheme]}"', f"secure = {str(cell.aggregation == 'secure').lower()}",
        "min_contributors = 2", "clip = 1.0", "ring_bits = 32", "max_weight = 10000",
        f"max_sites = {config.sites}   # every site of the cell",
        "",
    ]
    return "\n".join(lines)


def _scaling_toml(prefix: str, columns: list, scaling: list) -> list[str]:
    lines = [f"[{prefix}.scaling]"]
    for col, (low, high, centre, scale) in zip(columns, scaling, strict=True):
        lines.append(f"{col} = {{ range = [{low!r}, {high!r}], centre = {centre!r}, scale = {scale!r} }}")
    return lines + [""]


def _policy_toml(config: ExperimentConfig, cell: Cell, noise: float) -> str:
    return "\n".join([
        f"# Written by blossom experiment for {cell.key}.",
        "[policy]", "version = 1", f'federation = "{FEDERATION_ID}"', 'coordinators = ["embedded"]', "",
        "[sharing]", f"shareable = {_toml_list(_SHARES[cell.scheme])}", "",
        "[privacy]", f'accountant = "{config.accountant}"', f"delta = {config.delta!r}",
        f"max_grad_norm = {config.max_grad_norm!r}", f"noise_multiplier = {noise!r}",
        f"epsilon_budget = {config.target_epsilon!r}", "",
        "[secure_aggregation]", f"required = {str(cell.aggregation != 'plaintext').lower()}", "min_contributors = 2",
        "", "[reporting]", "metrics = true", "",
    ])


def _pool_meta(pool: Pool) -> dict:
    return {"columns": {m: list(c) for m, c in pool.columns.items()}, "num_classes": dict(pool.num_classes),
            "scaling": {m: [list(s) for s in v] for m, v in pool.scaling.items()}}


def build_cell(config: ExperimentConfig, cell: Cell, work_dir: Path, pool_meta: dict,
               noise: dict[int, float]) -> tuple[Path, dict]:
    """Write the cell's federation file, policies and site files (fresh). Returns the sites
    folder and the planned DP parameters per site."""
    data_root = work_dir / "data" / cell.data_key
    meta = json.loads((data_root / "sites.json").read_text())
    cell_dir = work_dir / "cells" / cell.key
    if cell_dir.exists():
        shutil.rmtree(cell_dir)
    sites_root = cell_dir / "sites"
    sites_root.mkdir(parents=True)
    (cell_dir / "policies").mkdir()
    # The benchmark's partition sizes are part of its public design, so the cell declares them
    # as the sites' public weights (FedAvg weighting); a real federation declares agreed,
    # rounded numbers or equal weights, never the exact counts.
    weights = ["", "[weighting]", 'scheme = "declared"', "", "[weighting.sites]"]
    weights += [f"{name} = {site['n_train']}" for name, site in meta["sites"].items()]
    # Block-wise cells declare public block groups: for every block the scheme shares, the
    # sites that hold it (encoder.<m>: those with modality m; fusion: all). Each block then
    # gets the default threshold of its group, a strict majority of its holders, instead of
    # a majority of all the cell's sites, with which a block held by half of them (encoder A
    # in the "exclusive" split) could never be aggregated. Heads never enter secure
    # aggregation; the other modes use none of it. A block held by one site gets no group.
    groups = []
    if _MODES[cell.scheme] == "blockwise":
        from blossom_secure.blocks import FUSION, encoder_block, match_patterns

        holders = {FUSION: sorted(meta["sites"])}
        for name, site in sorted(meta["sites"].items()):
            for modality in site["modalities"]:
                holders.setdefault(encoder_block(modality), []).append(name)
        groups = ["", "[aggregation.groups]   # the sites of this cell that hold each shared block"]
        for block, members in sorted(holders.items()):
            if match_patterns(block, _SHARES[cell.scheme]):
                groups.append(f'"{block}" = {_toml_list(members)}' if len(members) >= 2
                              else f"# {block}: held by {len(members)} site(s), never aggregated")
    (sites_root / "federation.toml").write_text(_federation_toml(config, pool_meta, cell)
                                                + "\n".join(groups + weights) + "\n")
    planned = {}
    for name, site in meta["sites"].items():
        batches = math.ceil(site["n_train"] / config.batch_size)
        sigma = noise[batches]
        planned[name] = {"noise_multiplier": sigma, "sample_rate": 1.0 / batches,
                         "steps_per_round": batches * config.local_epochs, "n_train": site["n_train"]}
        (cell_dir / "policies" / f"{name}.toml").write_text(_policy_toml(config, cell, sigma))
        data_rel = f"../../../../data/{cell.data_key}/{name}"
        lines = [
            "[site]", f'id = "{name}"', f'name = "{name} ({site["role"]})"', f'policy = "../../policies/{name}.toml"',
            'federation = "../federation.toml"',
            f'data_origin = "{"synthetic" if cell.dataset == "synthetic" else "public-benchmark"}"', "",
            "[data]", f"modalities = {_toml_list(site['modalities'])}",
        ]
        if "image" in site["modalities"]:
            lines.append(f'dicom_dir = "{data_rel}/dicom"')
        lines += [f'clinical_csv = "{data_rel}/clinical.csv"', "", "[tasks]"]
        lines += [f'{t} = "{t}"' for t in site["tasks"]] + [""]
        (sites_root / name).mkdir()
        (sites_root / name / "site.toml").write_text("\n".join(lines))
    return sites_root, planned


# ------------------------------------------------------------------------------------------
# One cell


class _ParameterCheck:
    """A secure aggregator that also measures, every round and block, how far the securely
    aggregated mean update is from the exact weighted mean of the same clipped updates
    (computed here, in the simulation, from the contributions it was handed): the
    parameter-level secure-vs-plaintext check. Secure aggregation's bound is half a
    quantisation step, ``2^-(scale_bits + 1)``, plus float32 rounding of the result."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.bound = 2.0 ** -(inner.params.scale_bits + 1)
        self.max_abs_diff: dict[str, float] = {}
        self.rounds_checked = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def aggregate(self, *, contributions, **kwargs):
        outcomes = self.inner.aggregate(contributions=contributions, **kwargs)
        clip = float(self.inner.params.clip)
        for block, outcome in outcomes.items():
            if outcome.failure is not None:
                continue
            weights = [contributions[s].weight for s in outcome.contributors]
            exact = sum(w * np.clip(contributions[s].egress[block].astype(np.float64), -clip, clip)
                        for w, s in zip(weights, outcome.contributors)) / sum(weights)
            diff = float(np.abs(outcome.mean_update.astype(np.float64) - exact).max())
            self.max_abs_diff[block] = max(self.max_abs_diff.get(block, 0.0), diff)
        self.rounds_checked += 1
        return outcomes

    def report(self) -> dict:
        return {"bound": self.bound, "rounds_checked": self.rounds_checked,
                "max_abs_diff_by_block": dict(sorted(self.max_abs_diff.items())),
                "max_abs_diff": max(self.max_abs_diff.values(), default=None)}


def _site_metric(tasks: dict) -> tuple[float, float]:
    accs = [m["accuracy"] for m in tasks.values()]
    f1s = [m["macro_f1"] for m in tasks.values()]
    return float(np.mean(accs)), float(np.mean(f1s))


def run_cell(config: ExperimentConfig, cell: Cell, work_dir: Path, pool_meta: dict, noise: dict[int, float], *,
             keep: bool = False, server_optimizer=None) -> dict:
    """Run one cell; returns its result document (see ``docs/results.md`` for the fields).

    Raises:
        RuntimeError: a site's training set differs from the one the noise was planned for.
    """
    import torch

    from blossom_secure.config import load_federation

    from blossom_secure.site.config import site_dirs
    from blossom_secure.runtimes.embedded.federation import Coordinator, make_aggregator
    from blossom_secure.site.ledger import PrivacyLedger
    from blossom_secure.site.agent import LEDGER_FILE, SiteAgent

    torch.set_num_threads(1)
    started = time.perf_counter()
    sites_root, planned = build_cell(config, cell, work_dir, pool_meta, noise)
    federation = load_federation(sites_root / "federation.toml")
    without_dp = cell.dp == "off" or cell.scheme == "local-nodp"
    agents = [SiteAgent(d, federation, seed=cell.seed, simulation_without_dp=without_dp)
              for d in site_dirs(sites_root)]
    for agent in agents:
        if agent.n_train != planned[agent.id]["n_train"]:
            raise RuntimeError(f"{cell.key}: {agent.id} has {agent.n_train} training examples, "
                               f"planned {planned[agent.id]['n_train']}")
    mode = _MODES[cell.scheme]
    aggregator = make_aggregator(federation, agents, secure=cell.aggregation == "secure") if mode == "blockwise" \
        else None
    if cell.aggregation == "secure":
        aggregator = _ParameterCheck(aggregator)
    coordinator = Coordinator(federation, agents, mode=mode, aggregator=aggregator, seed=cell.seed,
                              server_optimizer=server_optimizer)
    curve = []
    declined = 0
    final_sites = {}
    bytes_total = 0
    for r in range(config.rounds):
        report = coordinator.run_round(r)
        per_site = {sid: _site_metric(s["tasks"]) for sid, s in report.sites.items()}
        declined += sum(1 for s in report.sites.values() if s["declined"])
        bytes_total += sum(report.bytes_received.values())
        curve.append({"round": r + 1,
                      "accuracy": float(np.mean([v[0] for v in per_site.values()])),
                      "macro_f1": float(np.mean([v[1] for v in per_site.values()]))})
        final_sites = {sid: {"accuracy": v[0], "macro_f1": v[1]} for sid, v in per_site.items()}
    epsilon = {}
    for agent in agents:
        ledger = PrivacyLedger(agent.config.state_dir / LEDGER_FILE, site_id=agent.id, terms=agent.policy.privacy)
        epsilon[agent.id] = None if without_dp else ledger.epsilon_spent
        final_sites[agent.id].update(planned[agent.id], epsilon=epsilon[agent.id], n_holdout=len(agent.test_idx),
                                     modalities=list(agent.config.modalities), tasks=sorted(agent.config.tasks))
    held_out = sum(site["n_holdout"] for site in final_sites.values())
    weighted = {m: float(sum(site[m] * site["n_holdout"] for site in final_sites.values()) / held_out)
                for m in ("accuracy", "macro_f1")}
    if not keep:
        shutil.rmtree(work_dir / "cells" / cell.key, ignore_errors=True)
    return {
        "cell": asdict(cell), "key": cell.key, "rounds": config.rounds,
        "final": dict(curve[-1]), "final_weighted_by_holdout": weighted, "curve": curve, "sites": final_sites,
        "epsilon_max": None if without_dp else max(epsilon.values()),
        "declined_site_rounds": declined, "bytes_to_coordinator": bytes_total,
        "secure_vs_plaintext_parameters": aggregator.report() if isinstance(aggregator, _ParameterCheck) else None,
        "wall_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------
# The grid


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    logging.getLogger("blossom_secure").setLevel(logging.ERROR)


def _run_one(config: ExperimentConfig, cell: Cell, work_dir: Path, pool_meta: dict, noise: dict[int, float],
             keep: bool) -> dict:
    return run_cell(config, cell, work_dir, pool_meta, noise, keep=keep)


def run_grid(config: ExperimentConfig, work_dir: Path, *, workers: int | None = None, fresh: bool = False,
             keep_cells: bool = False, on_cell: Callable[[dict, int, int], None] | None = None) -> list[dict]:
    """Run every cell of ``config`` not already finished under ``work_dir``; return all results.

    Results are written one file per cell (``work_dir/results/<cell>.json``) as cells
    finish, so an interrupted grid resumes where it stopped (``fresh`` starts over).
    ``workers`` processes (default: the file's) run cells in parallel, one torch thread each.
    """
    import concurrent.futures
    import multiprocessing

    work_dir = Path(work_dir).resolve()
    results_dir = work_dir / "results"
    if fresh and work_dir.exists():
        for sub in ("results", "cells", "data"):
            shutil.rmtree(work_dir / sub, ignore_errors=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    cells = cells_of(config)
    pools: dict[str, Pool] = {}
    metas: dict[str, dict] = {}
    for cell in cells:
        build_data(config, cell, work_dir, pools)
        if cell.dataset not in metas:
            if cell.dataset not in pools:
                pools[cell.dataset] = load_pool(cell.dataset, work_dir, synthetic_patients=config.synthetic_patients,
                                                synthetic_image_size=config.image_size)
            metas[cell.dataset] = _pool_meta(pools[cell.dataset])
    batch_counts = set()
    for key in {c.data_key for c in cells}:
        meta = json.loads((work_dir / "data" / key / "sites.json").read_text())
        batch_counts |= {math.ceil(s["n_train"] / config.batch_size) for s in meta["sites"].values()}
    noise = _noise_table(config, work_dir, batch_counts)
    done: dict[str, dict] = {}
    todo = []
    for cell in cells:
        path = results_dir / f"{cell.key}.json"
        if path.is_file():
            done[cell.key] = json.loads(path.read_text())
        else:
            todo.append(cell)
    # Slowest first (images, DP), so that the last cells to finish are short ones.
    todo.sort(key=lambda c: (c.dataset != "synthetic", c.dp != "on", c.scheme == "local"))
    total = len(cells)
    workers = config.workers if workers is None else workers

    def finished(result: dict) -> None:
        atomic_write(results_dir / f"{result['key']}.json", json.dumps(result, indent=1).encode() + b"\n")
        done[result["key"]] = result
        if on_cell is not None:
            on_cell(result, len(done), total)

    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    started = time.perf_counter()
    ran = len(todo)
    if workers <= 1:
        _worker_init()
        for cell in todo:
            finished(run_cell(config, cell, work_dir, metas[cell.dataset], noise, keep=keep_cells))
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                    initializer=_worker_init) as pool:
            futures = [pool.submit(_run_one, config, cell, work_dir, metas[cell.dataset], noise, keep_cells)
                       for cell in todo]
            for future in concurrent.futures.as_completed(futures):
                finished(future.result())
    # Every invocation that ran cells is logged, so the report can state the grid's wall time.
    log_path = work_dir / "runs.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else []
    log.append({"started_utc": started_utc, "wall_s": time.perf_counter() - started, "cells_run": ran,
                "cells_total": total, "workers": workers})
    atomic_write(log_path, json.dumps(log, indent=1).encode() + b"\n")
    return [done[c.key] for c in cells]
