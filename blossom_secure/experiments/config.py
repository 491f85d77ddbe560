"""The experiment file (``experiments/*.toml``): which grid ``blossom experiment`` runs.

Data only, validated like the federation and policy files: every problem (unknown key,
wrong type, impossible value) is reported at once in one
:class:`~blossom_secure.errors.PolicyError`. A ``[quick]`` table overrides grid keys for
``--quick`` (a tiny grid for CI).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from blossom_secure._toml import Table, read_root_table
from blossom_secure.errors import PolicyError, Problem
from blossom_secure.experiments.datasets import DATASETS

__all__ = ["BLOCKWISE_SCHEMES", "DP_SETTINGS", "ExperimentConfig", "PARTITIONS", "SCHEMES", "SubGrid", "Tuning",
           "load_experiment"]

#: Schemes: what each site shares (see :mod:`blossom_secure.experiments.runner`).
SCHEMES = ("paper-full-model", "fedavg-ft", "full-model", "private-head", "private-head-fusion",
           "private-head-fedavgm", "local", "local-nodp")
#: The block-wise schemes (secure aggregation of the shared blocks, private heads).
BLOCKWISE_SCHEMES = ("private-head", "private-head-fusion", "private-head-fedavgm")
PARTITIONS = ("iid", "dirichlet")
DP_SETTINGS = ("off", "on")
_GRID_KEYS = ("datasets", "splits", "schemes", "partitions", "dp")


@dataclass(frozen=True)
class SubGrid:
    """A further set of cells (the plaintext comparison, task heterogeneity)."""

    datasets: tuple[str, ...]
    splits: tuple[str, ...]
    schemes: tuple[str, ...]
    partitions: tuple[str, ...]
    dp: tuple[str, ...]


@dataclass(frozen=True)
class Tuning:
    """The hyperparameter search on a validation split carved from each site's training
    data (never the held-out split): every scheme gets the same grid of learning rates and
    batch sizes, run on the same split, partitions and seeds, at each of ``epsilons``."""

    seeds: tuple[int, ...]
    split: str
    partitions: tuple[str, ...]
    learning_rates: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    epsilons: tuple[float, ...]


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment file (see ``experiments/blossom.toml`` for every key)."""

    path: Path
    name: str
    sites: int
    seeds: tuple[int, ...]
    rounds: int
    workers: int
    grid: SubGrid
    splits: dict[str, tuple[int, int, int]]  # name -> (A only, B only, both)
    dirichlet_alpha: float
    min_site_examples: int
    target_epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    holdout_fraction: float
    fine_tune_rounds: int
    embedding_dim: int
    hidden: tuple[int, ...]
    image_size: tuple[int, int]
    image_channels: tuple[int, ...]
    synthetic_patients: int
    plaintext: SubGrid | None
    heterogeneous: SubGrid | None
    quick: dict
    tuning: Tuning | None = None
    curve: SubGrid | None = None  # the privacy-utility curve: these cells at each of curve_epsilons
    curve_epsilons: tuple[float, ...] = ()
    ablation: SubGrid | None = None

    @property
    def epsilons(self) -> tuple[float, ...]:
        """Every target epsilon some cell runs at (the main grid's first)."""
        return (self.target_epsilon, *(e for e in self.curve_epsilons if e != self.target_epsilon))


def _subgrid(t: Table | None, *, splits: set[str], datasets: tuple[str, ...] = DATASETS) -> SubGrid | None:
    if t is None:
        return None
    values = dict(
        datasets=t.str_list("datasets"),
        splits=t.str_list("splits"),
        schemes=t.str_list("schemes"),
        partitions=t.str_list("partitions"),
        dp=t.str_list("dp"),
    )
    for key, allowed in (("datasets", datasets), ("splits", tuple(sorted(splits))), ("schemes", SCHEMES),
                         ("partitions", PARTITIONS), ("dp", DP_SETTINGS)):
        bad = [v for v in values[key] or () if v not in allowed]
        if bad:
            t.problem(key, f"unknown value {bad[0]!r} (known: {', '.join(allowed)})")
            values[key] = None
    t.finish()
    if None in values.values():
        return None
    return SubGrid(**{k: tuple(v) for k, v in values.items()})


def load_experiment(path: Path, *, quick: bool = False) -> ExperimentConfig:
    """Read and validate an experiment file; with ``quick``, apply its ``[quick]`` overrides.

    Raises:
        PolicyError: every problem found, with file, key and reason.
    """
    path = Path(path)
    root = read_root_table(path)
    problems = root.problems
    out: dict = {"path": path}

    splits: dict[str, tuple[int, int, int]] = {}
    st = root.table("splits")
    if st is not None:
        for name in list(st.data):
            counts = st.int_list(name, minimum=0, length=3)
            if counts is not None:
                splits[name] = tuple(counts)
        st.finish()

    ex = root.table("experiment")
    if ex is not None:
        out["name"] = ex.str("name")
        out["sites"] = ex.int("sites", minimum=2, maximum=100)
        seeds = ex.int_list("seeds", minimum=0)
        out["seeds"] = tuple(seeds) if seeds else None
        out["rounds"] = ex.int("rounds", minimum=1, maximum=1000)
        out["workers"] = ex.int("workers", required=False, default=2, minimum=1, maximum=64)
        grid_values = {k: ex.data.get(k) for k in _GRID_KEYS}
        ex.mark_seen(*_GRID_KEYS)
        ex.finish()
        out["grid"] = _subgrid(Table(str(path), "experiment", grid_values, problems), splits=set(splits))
        if out["sites"] is not None:
            for name, counts in splits.items():
                if sum(counts) != out["sites"]:
                    problems.append(Problem(str(path), f"splits.{name}",
                                            f"must add up to the {out['sites']} sites, not {sum(counts)}"))

    pt = root.table("partition")
    if pt is not None:
        out["dirichlet_alpha"] = pt.float("dirichlet_alpha", exclusive_minimum=0.0, maximum=1e3)
        out["min_site_examples"] = pt.int("min_site_examples", minimum=4)
        pt.finish()

    pr = root.table("privacy")
    if pr is not None:
        out["target_epsilon"] = pr.float("target_epsilon", exclusive_minimum=0.0, maximum=8.0)
        out["delta"] = pr.float("delta", exclusive_minimum=0.0, maximum=1e-5)
        out["max_grad_norm"] = pr.float("max_grad_norm", exclusive_minimum=0.0, maximum=1e3)
        out["accountant"] = pr.choice("accountant", ("rdp",), required=False, default="rdp")
        pr.finish()

    tr = root.table("training")
    if tr is not None:
        out["local_epochs"] = tr.int("local_epochs", minimum=1, maximum=100)
        out["batch_size"] = tr.int("batch_size", minimum=1, maximum=4096)
        out["learning_rate"] = tr.float("learning_rate", exclusive_minimum=0.0, maximum=10.0)
        out["momentum"] = tr.float("momentum", minimum=0.0, exclusive_maximum=1.0)
        out["holdout_fraction"] = tr.float("holdout_fraction", exclusive_minimum=0.0, exclusive_maximum=1.0)
        out["fine_tune_rounds"] = tr.int("fine_tune_rounds", required=False, default=0, minimum=0)
        if out["fine_tune_rounds"] and out.get("rounds") and out["fine_tune_rounds"] >= out["rounds"]:
            tr.problem("fine_tune_rounds", f"must be fewer than the {out['rounds']} rounds")
        tr.finish()

    md = root.table("model")
    if md is not None:
        out["embedding_dim"] = md.int("embedding_dim", minimum=2, maximum=4096)
        hidden = md.int_list("hidden")
        out["hidden"] = tuple(hidden) if hidden else None
        size = md.int_list("image_size", minimum=8, length=2)
        out["image_size"] = tuple(size) if size else None
        channels = md.int_list("image_channels", minimum=4)
        if channels and any(c % 4 for c in channels):
            md.problem("image_channels", "every channel count must be a multiple of 4 (group norm)")
            channels = None
        out["image_channels"] = tuple(channels) if channels else None
        md.finish()

    sy = root.table("synthetic")
    if sy is not None:
        out["synthetic_patients"] = sy.int("patients", minimum=20, maximum=100_000)
        sy.finish()

    out["plaintext"] = _subgrid(root.table("secure_vs_plaintext", required=False), splits=set(splits))
    out["heterogeneous"] = _subgrid(root.table("task_heterogeneity", required=False), splits=set(splits),
                                    datasets=("synthetic",))
    if out["plaintext"] is not None and "local" in out["plaintext"].schemes:
        problems.append(Problem(str(path), "secure_vs_plaintext.schemes", "local does not aggregate"))
    out["ablation"] = _subgrid(root.table("ablation", required=False), splits=set(splits))
    ct = root.table("privacy_curve", required=False)
    out["curve"], out["curve_epsilons"] = None, ()
    if ct is not None:
        eps = ct.float_list("epsilons", maximum=8.0)
        out["curve_epsilons"] = tuple(eps or ())
        ct.data.setdefault("dp", ["on"])
        out["curve"] = _subgrid(ct, splits=set(splits))
    out["tuning"] = _tuning(root.table("tuning", required=False), splits=set(splits),
                            target_epsilon=out.get("target_epsilon"))

    qt = root.table("quick", required=False)
    overrides: dict = {}
    if qt is not None:
        for key in ("seeds",):
            v = qt.int_list(key, required=False, minimum=0)
            if v is not None:
                overrides[key] = tuple(v)
        for key, lo in (("rounds", 1), ("synthetic_patients", 20)):
            v = qt.int(key, required=False, minimum=lo)
            if v is not None:
                overrides[key] = v
        for key in _GRID_KEYS:
            v = qt.str_list(key, required=False)
            if v is not None:
                overrides[key] = tuple(v)
        for key, lo in (("learning_rates", 0.0), ("batch_sizes", 0.0)):
            v = qt.float_list(key, required=False, exclusive_minimum=lo)
            if v is not None:
                overrides[key] = tuple(int(x) if key == "batch_sizes" else x for x in v)
        for key in ("secure_vs_plaintext", "task_heterogeneity", "privacy_curve", "ablation"):
            v = qt.bool(key, required=False)
            if v is not None:
                overrides[key] = v
        qt.finish()
    out["quick"] = overrides
    root.finish()
    if problems:
        raise PolicyError(problems)
    missing = [k for k, v in out.items()
               if v is None and k not in ("plaintext", "heterogeneous", "ablation", "curve", "tuning")]
    if missing:  # a table was missing: its problem is already reported
        raise PolicyError([Problem(str(path), missing[0], "missing")])
    out["splits"] = splits
    config = ExperimentConfig(**out)
    return _apply_quick(config) if quick else config


def _apply_quick(config: ExperimentConfig) -> ExperimentConfig:
    q = config.quick
    grid = config.grid
    for key in _GRID_KEYS:
        if key in q:
            grid = replace(grid, **{key: tuple(v for v in q[key] if v in getattr(config.grid, key))})
    return replace(
        config,
        seeds=q.get("seeds", config.seeds),
        rounds=q.get("rounds", config.rounds),
        fine_tune_rounds=min(config.fine_tune_rounds, q.get("rounds", config.rounds) - 1),
        synthetic_patients=q.get("synthetic_patients", config.synthetic_patients),
        grid=grid,
        plaintext=config.plaintext if q.get("secure_vs_plaintext", True) else None,
        heterogeneous=config.heterogeneous if q.get("task_heterogeneity", True) else None,
        curve=config.curve if q.get("privacy_curve", True) else None,
        curve_epsilons=config.curve_epsilons if q.get("privacy_curve", True) else (),
        ablation=config.ablation if q.get("ablation", True) else None,
        tuning=None if config.tuning is None else replace(
            config.tuning, seeds=config.tuning.seeds[:1],
            partitions=tuple(p for p in config.tuning.partitions if p in grid.partitions) or config.tuning.partitions[:1],
            learning_rates=q.get("learning_rates", config.tuning.learning_rates),
            batch_sizes=q.get("batch_sizes", config.tuning.batch_sizes), epsilons=(config.target_epsilon,)),
    )


def _tuning(t: Table | None, *, splits: set[str], target_epsilon: float | None) -> Tuning | None:
    if t is None:
        return None
    seeds = t.int_list("seeds", minimum=0)
    split = t.choice("split", tuple(sorted(splits)))
    partitions = t.str_list("partitions")
    if partitions and any(p not in PARTITIONS for p in partitions):
        t.problem("partitions", f"must be among {', '.join(PARTITIONS)}")
        partitions = None
    rates = t.float_list("learning_rates", maximum=10.0)
    batches = t.int_list("batch_sizes", minimum=1)
    epsilons = t.float_list("epsilons", required=False, maximum=8.0)
    t.finish()
    if None in (seeds, split, partitions, rates, batches):
        return None
    if epsilons is None:
        epsilons = [target_epsilon] if target_epsilon is not None else []
    return Tuning(seeds=tuple(seeds), split=split, partitions=tuple(partitions), learning_rates=tuple(rates),
                  batch_sizes=tuple(batches), epsilons=tuple(epsilons))
