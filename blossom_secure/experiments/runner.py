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
``fedavg-ft``               the personalisation baseline: ``paper-full-model`` for all but the
                            last ``fine_tune_rounds`` rounds, then each site alone fine-tunes its
                            fusion and head (encoders frozen) in those rounds, within the same
                            privacy budget
``full-model``              every block, heads included, averaged over the sites that hold it
                            only (an ablation: block-wise for encoders, global for heads)
``private-head-fedavgm``    ``private-head`` with server momentum (FedAvgM: the coordinator
                            moves the shared blocks by ``v = 0.9 v + mean update``; post-processing
                            of the secure sum, no privacy cost)
``local``                   no federation
``local-nodp``              no federation and no DP, in the DP-on cells: a model that never
                            leaves the hospital needs no DP, so this is what a hospital weighs
                            against joining (in the DP-off cells it is ``local``, not repeated)
==========================  ====================================================================

DP on: each site's policy carries the noise multiplier that makes its *whole run*
(``rounds`` rounds of ``ceil(n_train / batch)`` Poisson-sampled steps) cost at most
the cell's target epsilon at ``delta`` under Opacus's RDP accountant
(``opacus.accountants.utils.get_noise_multiplier``), and the policy's budget is that
target, so the site's ledger refuses any round beyond it. DP off: the site agent is built
with ``simulation_without_dp=True`` (simulation only; no clipping, no noise).

Held-out patients: a site's agent holds out the patients whose keyed hash (split seed
:data:`HOLDOUT_SPLIT_SEED`, the same in every test cell) falls below ``holdout_fraction``,
so a patient is held out in every test cell or in none, whatever the seed and partition.

Hyperparameters (learning rate, batch size) are chosen per data set, scheme and DP
setting by :func:`choose_hyperparameters` from *tuning* cells (their own seeds), whose
sites hold only patients that no test cell holds out; each tuning site's agent carves a
validation split from them (split seed :data:`VALIDATION_SPLIT_SEED`). So no held-out
patient is ever seen while tuning, and every scheme gets the same grid of values.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from blossom_secure._fs import atomic_write
from blossom_secure.experiments.config import ExperimentConfig
from blossom_secure.experiments.datasets import Pool, load_pool, write_site_data
from blossom_secure.experiments.partition import dirichlet_partition, iid_partition, modality_roles

__all__ = ["Cell", "build_data", "cells_of", "choose_hyperparameters", "noise_for_run", "run_cell", "run_grid",
           "tuning_cells"]

logger = logging.getLogger(__name__)

FEDERATION_ID = "blossom-bench"
_SHARES = {"private-head": ["encoder.*", "fusion"], "private-head-fusion": ["encoder.*"],
           "private-head-fedavgm": ["encoder.*", "fusion"],
           "paper-full-model": ["encoder.*", "fusion"], "fedavg-ft": ["encoder.*", "fusion"],
           "full-model": ["encoder.*", "fusion"], "local": ["encoder.*", "fusion"], "local-nodp": ["encoder.*", "fusion"]}
_MODES = {"private-head": "blockwise", "private-head-fusion": "blockwise", "private-head-fedavgm": "blockwise",
          "paper-full-model": "paper-full-model", "fedavg-ft": "paper-full-model",
          "full-model": "full-model", "local": "local", "local-nodp": "local"}
#: Schemes that aggregate nothing through the coordinator's aggregator.
_NOT_AGGREGATED = ("paper-full-model", "fedavg-ft", "full-model", "local", "local-nodp")
#: Server momentum of ``private-head-fedavgm``.
FEDAVGM_MOMENTUM = 0.9
#: The split seed of every site's held-out split: the same patients are held out in every
#: test cell (whatever its seed and partition), so that tuning can leave them all out.
HOLDOUT_SPLIT_SEED = 0
#: The split seed with which a tuning cell's agents carve validation from training patients.
VALIDATION_SPLIT_SEED = 1
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
        epsilon: The whole run's target epsilon per site (DP on).
        learning_rate: Local SGD step size.
        batch_size: Expected Poisson batch size (DP) or batch size (no DP).
        stage: ``test`` (metrics on each site's held-out split) or ``tune`` (the sites
            hold their training patients only; metrics on a validation split of them).
    """

    dataset: str
    tasks: str
    split: str
    partition: str
    scheme: str
    dp: str
    seed: int
    aggregation: str
    epsilon: float = 8.0
    learning_rate: float = 0.05
    batch_size: int = 16
    stage: str = "test"

    @property
    def uses_dp(self) -> bool:
        return self.dp == "on" and self.scheme != "local-nodp"

    @property
    def key(self) -> str:
        hp = [f"eps{self.epsilon:g}"] if self.uses_dp else []
        hp += [f"lr{self.learning_rate:g}", f"b{self.batch_size}"]
        return "_".join([*(["tune"] if self.stage == "tune" else []), self.dataset, self.tasks, self.split,
                         self.partition, self.scheme, f"dp-{self.dp}", *hp, f"s{self.seed}", self.aggregation])

    @property
    def split_seed(self) -> int:
        """The seed of the split each site's agent carves (held-out, or validation when tuning)."""
        return VALIDATION_SPLIT_SEED if self.stage == "tune" else HOLDOUT_SPLIT_SEED

    @property
    def data_key(self) -> str:
        return "_".join([self.dataset, self.tasks, self.split, self.partition, f"s{self.seed}",
                         *(["validation"] if self.stage == "tune" else [])])


def _aggregation(scheme: str, secure: bool) -> str:
    if scheme in ("paper-full-model", "fedavg-ft", "full-model"):
        return "in-memory"
    if scheme in ("local", "local-nodp"):
        return "none"
    return "secure" if secure else "plaintext"


#: A choice of hyperparameters: (data set, tasks, scheme, DP setting) -> values, where the
#: DP setting is the tuned epsilon, or ``None`` for a cell without DP.
Choices = dict[tuple[str, str, str, float | None], dict]


def _setting_of(cell: Cell, tuned_epsilons: tuple[float, ...]) -> tuple[str, str, str, float | None]:
    """Which tuned setting a cell takes its hyperparameters from: its own epsilon when it was
    tuned, else the tuned epsilon nearest on a log scale (the larger on a tie)."""
    if not cell.uses_dp:
        return (cell.dataset, cell.tasks, cell.scheme, None)
    eps = min(sorted(tuned_epsilons, reverse=True), key=lambda e: abs(math.log(e / cell.epsilon)))
    return (cell.dataset, cell.tasks, cell.scheme, eps)


def cells_of(config: ExperimentConfig, choices: Choices | None = None) -> list[Cell]:
    """Every cell of the experiment: the main grid (at the target epsilon), the
    privacy-utility curve (at each further epsilon), the method ablations, task
    heterogeneity and the plaintext twins, each with the hyperparameters of ``choices``
    (``None``: the experiment file's ``[training]`` values)."""
    out: list[Cell] = []
    seen: set[str] = set()
    tuned = config.tuning.epsilons if config.tuning is not None else (config.target_epsilon,)

    def add(grid, tasks: str, secure: bool, epsilons: tuple[float, ...]) -> None:
        if grid is None:
            return
        for dataset in grid.datasets:
            for split in grid.splits:
                for partition in grid.partitions:
                    for scheme in grid.schemes:
                        for dp in grid.dp:
                            if scheme == "local-nodp" and dp == "off":
                                continue  # the same run as local with DP off
                            for eps in epsilons:
                                if eps != config.target_epsilon and (dp == "off" or scheme == "local-nodp"):
                                    continue  # the curve varies epsilon: cells without DP do not change
                                for seed in config.seeds:
                                    cell = Cell(dataset, tasks, split, partition, scheme, dp, seed,
                                                _aggregation(scheme, secure), epsilon=eps,
                                                learning_rate=config.learning_rate, batch_size=config.batch_size)
                                    if choices is not None:
                                        chosen = choices[_setting_of(cell, tuned)]
                                        cell = replace(cell, learning_rate=chosen["learning_rate"],
                                                       batch_size=chosen["batch_size"])
                                    if cell.key not in seen:
                                        seen.add(cell.key)
                                        out.append(cell)

    add(config.grid, "single", True, (config.target_epsilon,))
    add(config.curve, "single", True, config.curve_epsilons)
    add(config.ablation, "single", True, (config.target_epsilon,))
    add(config.heterogeneous, "hetero", True, (config.target_epsilon,))
    if config.plaintext is not None:
        add(config.plaintext, "single", False, (config.target_epsilon,))
    return [c for c in out if not (c.aggregation == "plaintext" and c.scheme in _NOT_AGGREGATED)]


def tuning_cells(config: ExperimentConfig) -> list[Cell]:
    """The tuning cells: for every (data set, tasks, scheme, DP setting) some cell of the
    experiment runs, every learning rate x batch size of ``[tuning]``, on its split,
    partitions and seeds, on the sites' validation splits. Empty without ``[tuning]``."""
    t = config.tuning
    if t is None:
        return []
    out: dict[str, Cell] = {}
    for cell in cells_of(config):
        for eps in (t.epsilons if cell.uses_dp else (config.target_epsilon,)):
            for partition in t.partitions:
                for seed in t.seeds:
                    for lr in t.learning_rates:
                        for batch in t.batch_sizes:
                            c = Cell(cell.dataset, cell.tasks, t.split, partition, cell.scheme, cell.dp, seed,
                                     "secure" if cell.aggregation == "plaintext" else cell.aggregation, epsilon=eps,
                                     learning_rate=lr, batch_size=batch, stage="tune")
                            out.setdefault(c.key, c)
    return list(out.values())


def choose_hyperparameters(config: ExperimentConfig, results: Iterable[Mapping]) -> Choices:
    """For each tuned setting, the learning rate and batch size with the best validation
    accuracy (site average, final round, mean over the tuning seeds and partitions); a tie
    goes to the earlier value in the file's order. Each choice carries every candidate's
    score (``candidates``) for the report.

    Raises:
        ValueError: a tuned setting has no result for some candidate.
    """
    t = config.tuning
    scores: dict[tuple, dict[tuple[float, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        c = r["cell"]
        setting = (c["dataset"], c["tasks"], c["scheme"],
                   c["epsilon"] if (c["dp"] == "on" and c["scheme"] != "local-nodp") else None)
        scores[setting][(c["learning_rate"], c["batch_size"])].append(r["final"]["accuracy"])
    expected = len(t.seeds) * len(t.partitions)
    choices: Choices = {}
    for setting, by_candidate in scores.items():
        candidates = []
        for lr in t.learning_rates:
            for batch in t.batch_sizes:
                values = by_candidate.get((lr, batch), [])
                if len(values) != expected:
                    raise ValueError(f"tuning {setting}: {len(values)} results for lr={lr:g}, batch={batch}, "
                                     f"expected {expected}")
                candidates.append({"learning_rate": lr, "batch_size": batch,
                                   "validation_accuracy": float(np.mean(values))})
        best = max(candidates, key=lambda x: x["validation_accuracy"])  # first of the best on a tie
        choices[setting] = {**best, "candidates": candidates}
    return choices


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
    """Write the site data folders of ``cell.data_key`` (once) and a ``sites.json`` describing them.

    A tuning cell's sites hold only their training patients (the held-out split of the
    test cells with the same seed is left out), so that the split the agent carves from
    them is a validation split."""
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
    position = {pid: j for j, pid in enumerate(pool.patient_ids)}
    sites = {}
    for i, (idx, role) in enumerate(zip(parts, roles, strict=True)):
        name = _site_name(i)
        modalities = pool.modalities_of(role)
        tasks = _tasks_of(pool, cell.tasks, i)
        if cell.stage == "tune":  # the held-out patients (of every test cell) are left out
            ids = sorted(pool.patient_ids[j] for j in idx)
            train, _ = split_holdout(ids, fraction=config.holdout_fraction, seed=HOLDOUT_SPLIT_SEED)
            idx = np.array(sorted(position[ids[k]] for k in train), dtype=np.int64)
        write_site_data(pool, root / name, indices=idx, modalities=modalities, tasks=tasks)
        ids = sorted(pool.patient_ids[j] for j in idx)
        train, test = split_holdout(ids, fraction=config.holdout_fraction, seed=cell.split_seed)
        labels = pool.labels[tasks[0]]
        k = pool.num_classes[tasks[0]]

        def counts(which: np.ndarray) -> list[int]:
            return np.bincount(labels[[position[ids[j]] for j in which]], minlength=k).tolist()

        sites[name] = {"role": role, "modalities": list(modalities), "tasks": list(tasks), "n": len(ids),
                       "n_train": int(train.size), "n_heldout": int(test.size),
                       "label_counts": np.bincount(labels[idx], minlength=k).tolist(),
                       "train_label_counts": counts(train), "heldout_label_counts": counts(test)}
    atomic_write(meta_path, json.dumps({"dataset": cell.dataset, "stage": cell.stage, "sites": sites},
                                       indent=1).encode() + b"\n")
    return root


def majority_class_accuracy(site: Mapping) -> float | None:
    """The accuracy on a site's held-out split of always predicting the most frequent class
    of its training split (the first on a tie); ``None`` for an empty held-out split."""
    train, held = site["train_label_counts"], site["heldout_label_counts"]
    n = sum(held)
    return None if n == 0 else held[int(np.argmax(train))] / n


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


def _noise_table(config: ExperimentConfig, work_dir: Path, needs: set[tuple[int, float]]) -> dict[tuple[int, float], float]:
    """Noise multiplier per (number of batches, target epsilon), cached in ``work_dir/noise.json``."""
    path = work_dir / "noise.json"
    key = json.dumps([config.rounds, config.local_epochs, config.delta, config.accountant])
    table: dict[tuple[int, float], float] = {}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            table = {(int(b), float(e)): float(s) for b, e, s in saved["noise"]}
    for b, eps in sorted(needs - set(table)):
        table[(b, eps)] = noise_for_run(batches=b, epochs=config.local_epochs, rounds=config.rounds,
                                        target_epsilon=eps, delta=config.delta, accountant=config.accountant)
    atomic_write(path, json.dumps({"key": key, "noise": [[b, e, s] for (b, e), s in sorted(table.items())]},
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
        f"batch_size = {cell.batch_size}", f"learning_rate = {cell.learning_rate!r}",
        f"momentum = {config.momentum!r}", f"holdout_fraction = {config.holdout_fraction!r}",
        f"split_seed = {cell.split_seed}", "",
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
        f"epsilon_budget = {cell.epsilon!r}", "",
        "[secure_aggregation]", f"required = {str(cell.aggregation != 'plaintext').lower()}", "min_contributors = 2",
        "", "[reporting]", "metrics = true", "",
    ])


def _pool_meta(pool: Pool) -> dict:
    return {"columns": {m: list(c) for m, c in pool.columns.items()}, "num_classes": dict(pool.num_classes),
            "scaling": {m: [list(s) for s in v] for m, v in pool.scaling.items()}}


def build_cell(config: ExperimentConfig, cell: Cell, work_dir: Path, pool_meta: dict,
               noise: dict[tuple[int, float], float]) -> tuple[Path, dict]:
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
        batches = math.ceil(site["n_train"] / cell.batch_size)
        # A cell without DP gets a policy all the same (the agent reads it; it trains without it).
        sigma = noise[(batches, cell.epsilon)] if cell.uses_dp else 1.0
        planned[name] = {"noise_multiplier": sigma if cell.uses_dp else None, "sample_rate": 1.0 / batches,
                         "steps_per_round": batches * config.local_epochs, "n_train": site["n_train"],
                         "majority_class_accuracy": majority_class_accuracy(site)}
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


def run_cell(config: ExperimentConfig, cell: Cell, work_dir: Path, pool_meta: dict,
             noise: dict[tuple[int, float], float], *, keep: bool = False, server_optimizer=None) -> dict:
    """Run one cell; returns its result document (see ``docs/results.md`` for the fields).

    Raises:
        RuntimeError: a site's training set differs from the one the noise was planned for.
    """
    import torch

    from blossom_secure.config import load_federation

    from blossom_secure.coordinator.rounds import ServerOptimizer
    from blossom_secure.site.config import site_dirs
    from blossom_secure.runtimes.embedded.federation import Coordinator, make_aggregator
    from blossom_secure.site.ledger import PrivacyLedger
    from blossom_secure.site.agent import LEDGER_FILE, SiteAgent

    torch.set_num_threads(1)
    started = time.perf_counter()
    sites_root, planned = build_cell(config, cell, work_dir, pool_meta, noise)
    federation = load_federation(sites_root / "federation.toml")
    without_dp = not cell.uses_dp
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
    if server_optimizer is None and cell.scheme == "private-head-fedavgm":
        server_optimizer = ServerOptimizer("momentum", lr=1.0, beta1=FEDAVGM_MOMENTUM)
    coordinator = Coordinator(federation, agents, mode=mode, aggregator=aggregator, seed=cell.seed,
                              server_optimizer=server_optimizer)
    fine_tune_from = config.rounds - config.fine_tune_rounds if cell.scheme == "fedavg-ft" else config.rounds
    curve = []
    declined = 0
    final_sites = {}
    bytes_total = 0
    for r in range(config.rounds):
        if r == fine_tune_from:
            # FedAvg is over: from here each site fine-tunes its fusion and head alone.
            coordinator.mode = "local"
            for agent in agents:
                agent.frozen_blocks = tuple(b for b in agent.model.blocks() if b.startswith("encoder."))
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
    majority = [site["majority_class_accuracy"] for site in final_sites.values()]
    majority_mean = float(np.mean(majority)) if None not in majority else None
    if not keep:
        shutil.rmtree(work_dir / "cells" / cell.key, ignore_errors=True)
    return {
        "cell": asdict(cell), "key": cell.key, "rounds": config.rounds,
        "final": dict(curve[-1]), "final_weighted_by_holdout": weighted, "majority_class_accuracy": majority_mean,
        "fine_tune_rounds": config.rounds - fine_tune_from, "curve": curve, "sites": final_sites,
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


def _run_one(config: ExperimentConfig, cell: Cell, work_dir: Path, pool_meta: dict,
             noise: dict[tuple[int, float], float], keep: bool) -> dict:
    return run_cell(config, cell, work_dir, pool_meta, noise, keep=keep)


def run_grid(config: ExperimentConfig, work_dir: Path, *, workers: int | None = None, fresh: bool = False,
             keep_cells: bool = False, on_cell: Callable[[dict, int, int], None] | None = None) -> list[dict]:
    """Run every cell of ``config`` not already finished under ``work_dir``; return the
    results of the test cells.

    With ``[tuning]``, the tuning cells run first and :func:`choose_hyperparameters` picks
    each setting's values from them (written to ``work_dir/tuning.json``); the test cells
    then run with those values. Results are written one file per cell
    (``work_dir/results/<cell>.json``) as cells finish, so an interrupted grid resumes
    where it stopped (``fresh`` starts over). ``workers`` processes (default: the file's)
    run cells in parallel, one torch thread each. ``on_cell(result, done, total)`` is
    called as each cell finishes, over both stages.
    """
    work_dir = Path(work_dir).resolve()
    if fresh and work_dir.exists():
        for sub in ("results", "cells", "data"):
            shutil.rmtree(work_dir / sub, ignore_errors=True)
        (work_dir / "tuning.json").unlink(missing_ok=True)
    (work_dir / "results").mkdir(parents=True, exist_ok=True)
    workers = config.workers if workers is None else workers
    tune = tuning_cells(config)
    n_test = len(cells_of(config))
    total = len(tune) + n_test
    offset = 0

    def progress(result: dict, done: int, _total: int) -> None:
        if on_cell is not None:
            on_cell(result, offset + done, total)

    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    started = time.perf_counter()
    ran = 0
    choices = None
    if tune:
        tuned, n = _run_cells(config, tune, work_dir, workers=workers, keep_cells=keep_cells, on_cell=progress)
        ran += n
        offset = len(tune)
        choices = choose_hyperparameters(config, tuned)
        atomic_write(work_dir / "tuning.json", json.dumps(tuning_document(config, choices), indent=1).encode()
                     + b"\n")
    results, n = _run_cells(config, cells_of(config, choices), work_dir, workers=workers, keep_cells=keep_cells,
                            on_cell=progress)
    ran += n
    # Every invocation that ran cells is logged, so the report can state the grid's wall time.
    log_path = work_dir / "runs.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else []
    log.append({"started_utc": started_utc, "wall_s": time.perf_counter() - started, "cells_run": ran,
                "cells_total": total, "tuning_cells": len(tune), "workers": workers})
    atomic_write(log_path, json.dumps(log, indent=1).encode() + b"\n")
    return results


def tuning_document(config: ExperimentConfig, choices: Choices) -> dict:
    """The search space and every choice (with each candidate's validation score), as the
    report shows them."""
    t = config.tuning
    return {
        "search_space": {"learning_rates": list(t.learning_rates), "batch_sizes": list(t.batch_sizes),
                         "split": t.split, "partitions": list(t.partitions), "seeds": list(t.seeds),
                         "epsilons": list(t.epsilons), "rounds": config.rounds,
                         "metric": "validation accuracy, site average, final round"},
        "choices": [{"dataset": d, "tasks": tasks, "scheme": scheme, "epsilon": eps, **choice}
                    for (d, tasks, scheme, eps), choice in sorted(choices.items(), key=lambda kv: str(kv[0]))],
    }


def _run_cells(config: ExperimentConfig, cells: list[Cell], work_dir: Path, *, workers: int, keep_cells: bool,
               on_cell: Callable[[dict, int, int], None]) -> tuple[list[dict], int]:
    """Run the cells not finished yet; return every cell's result (in order) and how many ran."""
    import concurrent.futures
    import multiprocessing

    results_dir = work_dir / "results"
    pools: dict[str, Pool] = {}
    metas: dict[str, dict] = {}
    for cell in cells:
        build_data(config, cell, work_dir, pools)
        if cell.dataset not in metas:
            if cell.dataset not in pools:
                pools[cell.dataset] = load_pool(cell.dataset, work_dir, synthetic_patients=config.synthetic_patients,
                                                synthetic_image_size=config.image_size)
            metas[cell.dataset] = _pool_meta(pools[cell.dataset])
    sizes: dict[str, list[int]] = {}  # data key -> the sites' training-set sizes, read once
    needs: set[tuple[int, float]] = set()
    for cell in cells:
        if cell.uses_dp:
            if cell.data_key not in sizes:
                meta = json.loads((work_dir / "data" / cell.data_key / "sites.json").read_text())
                sizes[cell.data_key] = [s["n_train"] for s in meta["sites"].values()]
            needs |= {(math.ceil(n / cell.batch_size), cell.epsilon) for n in sizes[cell.data_key]}
    noise = _noise_table(config, work_dir, needs)
    done: dict[str, dict] = {}
    todo = []
    for cell in cells:
        path = results_dir / f"{cell.key}.json"
        if path.is_file():
            done[cell.key] = json.loads(path.read_text())
        else:
            todo.append(cell)
    # Slowest first (images, DP, secure aggregation), so that the last cells to finish are short ones.
    todo.sort(key=lambda c: (c.dataset != "synthetic", not c.uses_dp, c.aggregation != "secure",
                             c.batch_size))

    def finished(result: dict) -> None:
        atomic_write(results_dir / f"{result['key']}.json", json.dumps(result, indent=1).encode() + b"\n")
        done[result["key"]] = result
        on_cell(result, len(done), len(cells))

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
    return [done[c.key] for c in cells], len(todo)
