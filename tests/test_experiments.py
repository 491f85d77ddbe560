"""The experiment runner (``blossom experiment``) and the core pieces it added: extra tabular
modalities, the simulation-only training without DP, and the cached RDP accountant."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blossom_secure.experiments import (
    cells_of,
    dirichlet_partition,
    iid_partition,
    load_experiment,
    modality_roles,
    relative_gain,
    run_cell,
)
from blossom_secure.experiments.datasets import breast_cancer_groups, load_pool
from blossom_secure.experiments.report import gains, secure_vs_plaintext, summarise
from blossom_secure.experiments.runner import (
    Cell,
    _noise_table,
    _pool_meta,
    build_data,
    noise_for_run,
    tuning_cells,
)

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[experiment]
name = "tiny"
sites = 4
seeds = [0]
rounds = 2
workers = 1
datasets = ["breast_cancer"]
splits = ["incomplete"]
schemes = ["full-model", "private-head", "private-head-fusion", "local"]
partitions = ["iid"]
dp = ["off", "on"]

[splits]
incomplete = [1, 1, 2]
exclusive = [2, 2, 0]

[partition]
dirichlet_alpha = 0.5
min_site_examples = 20

[privacy]
target_epsilon = 8.0
delta = 1e-5
max_grad_norm = 1.0

[training]
local_epochs = 1
batch_size = 16
learning_rate = 0.05
momentum = 0.9
holdout_fraction = 0.25

[model]
embedding_dim = 8
hidden = [8]
image_size = [8, 8]
image_channels = [4]

[synthetic]
patients = 60

[secure_vs_plaintext]
datasets = ["breast_cancer"]
splits = ["incomplete"]
schemes = ["private-head"]
partitions = ["iid"]
dp = ["on"]
"""


def _noise(config, work_dir: Path, cell: Cell) -> dict[tuple[int, float], float]:
    meta = json.loads((work_dir / "data" / cell.data_key / "sites.json").read_text())["sites"]
    return _noise_table(config, work_dir, {(math.ceil(s["n_train"] / cell.batch_size), cell.epsilon)
                                           for s in meta.values()})


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


# -- the relative gain ---------------------------------------------------------------------------


def test_relative_gain_matches_hand_computation():
    assert relative_gain(0.69, 0.60) == pytest.approx(15.0)
    assert relative_gain(0.45, 0.60) == pytest.approx(-25.0)
    assert math.isnan(relative_gain(0.5, 0.0))


def _result(scheme: str, seed: int, acc: float, f1: float, aggregation: str) -> dict:
    cell = Cell("breast_cancer", "single", "incomplete", "iid", scheme, "off", seed, aggregation)
    return {"cell": cell.__dict__, "key": cell.key, "rounds": 1, "final": {"accuracy": acc, "macro_f1": f1},
            "curve": [{"round": 1, "accuracy": acc, "macro_f1": f1}], "sites": {}, "epsilon_max": None,
            "declined_site_rounds": 0, "bytes_to_coordinator": 0, "wall_s": 0.0}


def test_gain_is_computed_on_seed_means_of_site_averaged_metrics():
    # paper-full-model: accuracies 0.50, 0.70 (mean 0.60); private-head: 0.66, 0.72 (mean 0.69).
    results = [_result("paper-full-model", 0, 0.50, 0.40, "in-memory"),
               _result("paper-full-model", 1, 0.70, 0.60, "in-memory"),
               _result("private-head", 0, 0.66, 0.55, "secure"), _result("private-head", 1, 0.72, 0.55, "secure")]
    [g] = gains(summarise(results))
    assert g["scheme"] == "private-head"
    assert g["accuracy_gain_pct"] == pytest.approx((0.69 - 0.60) / 0.60 * 100)  # 15.0
    assert g["macro_f1_gain_pct"] == pytest.approx((0.55 - 0.50) / 0.50 * 100)  # 10.0
    # The mean of per-seed gains is reported beside it: (32% + 2.857%) / 2.
    assert g["accuracy_gain_pct_seed_mean"] == pytest.approx((32.0 + 0.02 / 0.70 * 100) / 2)


def _seeded(scheme: str, dp: str, accuracies, aggregation: str = "secure") -> list[dict]:
    return [{"cell": {"dataset": "digits", "tasks": "single", "split": "incomplete", "partition": "iid",
                      "scheme": scheme, "dp": dp, "seed": seed, "aggregation": aggregation},
             "final": {"accuracy": acc, "macro_f1": acc / 2}} for seed, acc in enumerate(accuracies)]


def test_paired_comparison_interval_and_verdict_by_hand():
    """Differences 0.10, 0.11, 0.09: mean 0.10, sample sd 0.01, t(0.975, 2) = 4.302653;
    half-width 4.302653 * 0.01 / sqrt(3) = 0.024842: [0.075158, 0.124842], a win. Against
    local the differences straddle 0 (a tie); a plaintext twin is never paired; one seed
    gives no interval."""
    from blossom_secure.experiments.report import paired_comparisons, paired_interval

    results = (_seeded("private-head", "on", [0.70, 0.72, 0.74])
               + _seeded("paper-full-model", "on", [0.60, 0.61, 0.65])
               + _seeded("local", "on", [0.69, 0.74, 0.73])
               + _seeded("private-head", "on", [0.0, 0.0, 0.0], "plaintext")
               + _seeded("local-nodp", "on", [0.9, 0.9, 0.9]))
    rows = {(r["scheme"], r["baseline"]): r for r in paired_comparisons(results)}
    assert set(rows) == {("private-head", "paper-full-model"), ("private-head", "local"),
                         ("private-head", "local-nodp"), ("local", "local-nodp")}
    win = rows[("private-head", "paper-full-model")]
    assert win["accuracy_diff_by_seed"] == pytest.approx([0.10, 0.11, 0.09])
    assert win["accuracy_diff_mean"] == pytest.approx(0.10)
    assert (win["accuracy_ci95_low"], win["accuracy_ci95_high"]) == pytest.approx((0.075158, 0.124842), abs=1e-6)
    assert win["accuracy_verdict"] == "win" and win["macro_f1_verdict"] == "win"
    assert rows[("private-head", "local")]["accuracy_verdict"] == "tie"
    assert rows[("private-head", "local-nodp")]["accuracy_verdict"] == "loss"
    mean, low, high = paired_interval([0.05])
    assert mean == 0.05 and math.isnan(low) and math.isnan(high)


def test_secure_vs_plaintext_pairs_the_same_seed():
    results = [_result("private-head", 0, 0.70, 0.6, "secure"), _result("private-head", 0, 0.68, 0.6, "plaintext"),
               _result("private-head", 1, 0.60, 0.5, "secure"), _result("private-head", 1, 0.61, 0.5, "plaintext")]
    [t] = secure_vs_plaintext(results)
    assert t["seeds"] == [0, 1]
    assert t["accuracy_diff_mean"] == pytest.approx((0.02 - 0.01) / 2)
    assert t["accuracy_diff_max_abs"] == pytest.approx(0.02)


# -- partitions ----------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), alpha=st.sampled_from([0.3, 0.5, 1.0, 10.0]), sites=st.integers(2, 10),
       classes=st.integers(2, 10))
def test_dirichlet_partition_properties(seed, alpha, sites, classes):
    labels = np.random.default_rng(seed).integers(0, classes, size=400)
    labels[:classes] = np.arange(classes)  # every class occurs
    min_size = 10
    parts = dirichlet_partition(labels, sites, alpha=alpha, seed=seed, min_size=min_size)
    again = dirichlet_partition(labels, sites, alpha=alpha, seed=seed, min_size=min_size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))  # deterministic per seed
    assert len(parts) == sites and all(p.size >= min_size for p in parts)  # every site non-empty
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(labels.size))  # disjoint, covering
    assert set(labels[joined].tolist()) == set(range(classes))  # labels covered


def test_dirichlet_partition_differs_between_seeds_and_skews_labels():
    labels = np.repeat(np.arange(10), 100)
    a = dirichlet_partition(labels, 10, alpha=0.5, seed=1)
    b = dirichlet_partition(labels, 10, alpha=0.5, seed=2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # Label skew: with alpha 0.5 most sites are dominated by few classes, unlike IID.
    iid = iid_partition(labels.size, 10, seed=1)
    top = lambda parts: np.mean([np.bincount(labels[p], minlength=10).max() / p.size for p in parts])  # noqa: E731
    assert top(a) > top(iid) + 0.1


def test_dirichlet_partition_refuses_impossible_requests():
    with pytest.raises(ValueError):
        dirichlet_partition(np.zeros(10, dtype=int), 5, alpha=0.5, seed=0, min_size=10)


def test_iid_partition_and_modality_roles():
    parts = iid_partition(569, 10, seed=3)
    assert sorted(p.size for p in parts) == [56] + [57] * 9
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(569))
    assert modality_roles(3, 3, 4) == ["a"] * 3 + ["b"] * 3 + ["both"] * 4
    assert modality_roles(5, 5, 0) == ["a"] * 5 + ["b"] * 5


# -- data sets -----------------------------------------------------------------------------------


def test_breast_cancer_modalities_are_the_mean_and_the_se_worst_features(tmp_path, tiny_config):
    a, b = breast_cancer_groups()
    assert len(a) == 10 and all(c.startswith("mean_") for c in a)
    assert len(b) == 20 and all(c.endswith("_error") for c in b[:10]) and all(c.startswith("worst_") for c in b[10:])
    props = [c[len("mean_"):] for c in a]
    assert [c[: -len("_error")] for c in b[:10]] == props and [c[len("worst_"):] for c in b[10:]] == props
    pool = load_pool("breast_cancer", tmp_path)
    assert len(pool) == 569 and pool.modality_a == "tabular" and pool.modality_b == "se_worst"
    assert pool.values["tabular"].shape == (569, 10) and pool.values["se_worst"].shape == (569, 20)
    assert int(pool.labels["diagnosis"].sum()) == 212  # malignant tumours in WDBC

    # Written site folders hold exactly their modality's columns.
    config = load_experiment(tiny_config)
    cell = Cell("breast_cancer", "single", "incomplete", "iid", "private-head", "on", 0, "secure")
    root = build_data(config, cell, tmp_path, {"breast_cancer": pool})
    meta = json.loads((root / "sites.json").read_text())["sites"]
    assert [s["role"] for s in meta.values()] == ["a", "b", "both", "both"]
    for name, site in meta.items():
        with open(root / name / "clinical.csv", newline="") as f:
            header = next(csv.reader(f))
        expected = {"a": list(a), "b": list(b), "both": list(a) + list(b)}[site["role"]]
        assert header == ["patient_id", *expected, "diagnosis"]


def test_digits_modalities_are_the_two_halves_of_the_image(tmp_path):
    pool = load_pool("digits", tmp_path)
    from sklearn.datasets import load_digits

    images = load_digits().images
    assert np.array_equal(pool.values["tabular"][5].reshape(4, 8), images[5][:4])
    assert np.array_equal(pool.values["lower_half"][5].reshape(4, 8), images[5][4:])


# -- DP: the whole run within the bound ---------------------------------------------------------


def test_dp_on_respects_the_epsilon_bound_in_every_ledger(tmp_path, tiny_config):
    from opacus.accountants import create_accountant

    config = load_experiment(tiny_config)
    cell = Cell("breast_cancer", "single", "incomplete", "iid", "private-head", "on", 0, "secure")
    pools: dict = {}
    build_data(config, cell, tmp_path, pools)
    result = run_cell(config, cell, tmp_path, _pool_meta(pools["breast_cancer"]), _noise(config, tmp_path, cell),
                      keep=True)
    assert result["declined_site_rounds"] == 0
    ledgers = sorted((tmp_path / "cells" / cell.key / "sites").glob("*/state/ledger.json"))
    assert len(ledgers) == config.sites
    for path in ledgers:
        entries = json.loads(path.read_text())["entries"]
        assert len(entries) == config.rounds
        assert entries[-1]["epsilon_total"] <= config.target_epsilon
        # Recomputed with Opacus's own accountant, independently of the ledger code.
        acct = create_accountant("rdp")
        acct.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        assert acct.get_epsilon(delta=config.delta) <= config.target_epsilon
        # The noise was calibrated for the whole run, not one round: close to the target.
        assert acct.get_epsilon(delta=config.delta) > 0.95 * config.target_epsilon
    assert result["epsilon_max"] <= config.target_epsilon
    # The parameter-level secure-vs-plaintext check: every round, every block within half a
    # quantisation step (and float32 rounding) of the exact mean of the clipped updates.
    check = result["secure_vs_plaintext_parameters"]
    assert check["rounds_checked"] == config.rounds
    assert set(check["max_abs_diff_by_block"]) == {"encoder.tabular", "encoder.se_worst", "fusion"}
    assert 0 < check["max_abs_diff"] <= check["bound"] + 1e-6


@pytest.mark.parametrize("batches", [3, 9])
def test_noise_for_the_study_rounds_stays_within_epsilon_8(batches):
    from opacus.accountants import create_accountant

    config = load_experiment(ROOT / "experiments" / "blossom.toml")
    sigma = noise_for_run(batches=batches, epochs=config.local_epochs, rounds=config.rounds,
                          target_epsilon=config.target_epsilon, delta=config.delta, accountant="rdp")
    acct = create_accountant("rdp")
    acct.history = [(sigma, 1.0 / batches, batches * config.local_epochs * config.rounds)]
    assert config.target_epsilon <= 8.0 and acct.get_epsilon(delta=config.delta) <= config.target_epsilon


def test_dp_off_sites_spend_nothing_and_report_no_epsilon(tmp_path, tiny_config):
    config = load_experiment(tiny_config)
    cell = Cell("breast_cancer", "single", "incomplete", "iid", "private-head-fusion", "off", 0, "secure")
    pools: dict = {}
    build_data(config, cell, tmp_path, pools)
    result = run_cell(config, cell, tmp_path, _pool_meta(pools["breast_cancer"]), _noise(config, tmp_path, cell),
                      keep=True)
    assert result["epsilon_max"] is None
    for path in (tmp_path / "cells" / cell.key / "sites").glob("*/state"):
        assert not (path / "ledger.json").exists()


def test_local_without_dp_in_a_dp_cell_spends_nothing_and_matches_local_with_dp_off(tmp_path, tiny_config):
    """The hospital's alternative to joining: its own model, never released, so no DP.
    In a DP-on cell it trains exactly as ``local`` does with DP off (same seed)."""
    config = load_experiment(tiny_config)
    pools: dict = {}
    results = {}
    for scheme, dp in (("local-nodp", "on"), ("local", "off")):
        cell = Cell("breast_cancer", "single", "incomplete", "iid", scheme, dp, 0, "none")
        build_data(config, cell, tmp_path, pools)
        results[scheme] = run_cell(config, cell, tmp_path, _pool_meta(pools["breast_cancer"]),
                                   _noise(config, tmp_path, cell), keep=True)
        assert not list((tmp_path / "cells" / cell.key / "sites").glob("*/state/ledger.json"))
    assert results["local-nodp"]["epsilon_max"] is None
    assert results["local-nodp"]["sites"] == results["local"]["sites"]
    assert results["local-nodp"]["curve"] == results["local"]["curve"]
    # Site averages: unweighted (final) and weighted by each site's held-out size.
    sites = results["local"]["sites"].values()
    assert results["local"]["final"]["accuracy"] == pytest.approx(np.mean([s["accuracy"] for s in sites]))
    weighted = sum(s["accuracy"] * s["n_holdout"] for s in sites) / sum(s["n_holdout"] for s in sites)
    assert results["local"]["final_weighted_by_holdout"]["accuracy"] == pytest.approx(weighted)
    assert all(s["n_holdout"] > 0 for s in sites)


def test_new_baselines_in_the_grid_never_get_plaintext_twins_or_dp_off_repeats(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(TINY.replace('schemes = ["full-model", "private-head", "private-head-fusion", "local"]',
                                 'schemes = ["paper-full-model", "full-model", "private-head", "local", '
                                 '"local-nodp"]')
                    .replace('schemes = ["private-head"]', 'schemes = ["private-head", "paper-full-model"]'))
    cells = cells_of(load_experiment(path))
    by_scheme: dict[str, list] = {}
    for cell in cells:
        by_scheme.setdefault(cell.scheme, []).append(cell)
    assert {c.aggregation for c in by_scheme["paper-full-model"]} == {"in-memory"}
    assert [c.dp for c in by_scheme["local-nodp"]] == ["on"]
    assert {c.aggregation for c in by_scheme["private-head"]} == {"secure", "plaintext"}


def test_training_without_dp_needs_a_simulation_seed(copy_sites):
    from blossom_secure.config import load_federation
    from blossom_secure.site.agent import SiteAgent

    sites = copy_sites()
    fed = load_federation(sites / "federation.toml")
    with pytest.raises(ValueError, match="seeded simulations only"):
        SiteAgent(sites / "riverside", fed, seed=None, simulation_without_dp=True)


# -- the grid end to end -------------------------------------------------------------------------


def test_quick_grid_of_the_study_file_is_small():
    full = load_experiment(ROOT / "experiments" / "blossom.toml")
    quick = load_experiment(ROOT / "experiments" / "blossom.toml", quick=True)
    assert full.sites == 10 and full.splits == {"complete": (0, 0, 10), "incomplete": (3, 3, 4),
                                                "exclusive": (5, 5, 0)}
    assert set(full.grid.schemes) == {"paper-full-model", "fedavg-ft", "private-head", "private-head-fusion",
                                      "local", "local-nodp"}
    assert set(full.grid.partitions) == {"iid", "dirichlet"} and set(full.grid.dp) == {"on"}
    assert len(full.seeds) >= 5 and full.target_epsilon == 8.0 and set(full.curve_epsilons) == {1.0, 2.0, 4.0}
    assert full.tuning is not None and not set(full.tuning.seeds) & set(full.seeds)
    assert len(cells_of(quick)) < len(cells_of(full)) / 10 and quick.rounds <= 3
    assert len(tuning_cells(quick)) < len(tuning_cells(full)) / 10


def test_experiment_file_problems_reported_together(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(TINY.replace('schemes = ["full-model", "private-head", "private-head-fusion", "local"]',
                                 'schemes = ["full-model", "fedprox"]')
                    .replace("target_epsilon = 8.0", "target_epsilon = 12.0")
                    .replace("incomplete = [1, 1, 2]", "incomplete = [1, 1, 3]") + "\n[surprise]\n")
    from blossom_secure.errors import PolicyError

    with pytest.raises(PolicyError) as info:
        load_experiment(path)
    keys = {p.key for p in info.value.problems}
    assert {"experiment.schemes", "privacy.target_epsilon", "splits.incomplete", "surprise"} <= keys


TUNING = """
[tuning]
seeds = [7]
split = "incomplete"
partitions = ["iid"]
learning_rates = [0.05]
batch_sizes = [8, 16]
"""


@pytest.mark.slow
def test_cli_runs_a_tiny_grid_end_to_end_and_writes_well_formed_results(tmp_path):
    """Tuning on validation, then the test cells with the chosen values, then the report."""
    from blossom_secure.cli.blossom import main

    tiny_config = tmp_path / "tiny.toml"
    tiny_config.write_text(TINY + TUNING)
    work, out = tmp_path / "work", tmp_path / "report"
    assert main(["experiment", str(tiny_config), "--work", str(work), "--out", str(out), "--workers", "1"]) == 0
    config = load_experiment(tiny_config)
    tuning = json.loads((work / "tuning.json").read_text())
    choices = {(c["dataset"], c["tasks"], c["scheme"], c["epsilon"]): c for c in tuning["choices"]}
    # One choice per scheme and DP setting, each the best of its candidates on validation.
    assert set(choices) == {("breast_cancer", "single", s, eps) for s in ("full-model", "private-head",
                                                                         "private-head-fusion", "local")
                            for eps in (None, 8.0)}
    for c in choices.values():
        assert len(c["candidates"]) == 2
        assert c["validation_accuracy"] == max(x["validation_accuracy"] for x in c["candidates"])
    assert len(list((work / "results").glob("tune_*.json"))) == len(tuning_cells(config)) == 16
    expected = {c.key for c in cells_of(config, choices)}
    assert len(expected) == 4 * 2 + 1  # 4 schemes x DP off/on, and one plaintext twin
    with open(out / "cells.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(expected)
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and 0.0 <= float(row["macro_f1"]) <= 1.0
        assert 0.0 <= float(row["majority_class_accuracy"]) <= 1.0
        assert row["declined_site_rounds"] == "0" and row["stage"] == "test"
        if row["dp"] == "on":
            assert float(row["epsilon_max"]) <= 8.0
        else:
            assert row["epsilon_max"] == ""
    with open(out / "curves.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(expected) * config.rounds
    with open(out / "sites.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(expected) * config.sites
    assert {r["key"] for r in json.loads((out / "cells.json").read_text())} == expected
    with open(out / "tuning_cells.csv", newline="") as f:
        assert {r["stage"] for r in csv.DictReader(f)} == {"tune"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"] == len(expected) and summary["runs"][-1]["cells_run"] == len(expected) + 16
    [goal] = summary["goal"]
    assert goal["best_blockwise"] in ("private-head", "private-head-fusion")
    assert {"vs_local"} <= set(goal) and goal["accuracy"]["best_blockwise"]["seeds"] == 1
    assert len(summary["secure_vs_plaintext"]) == 1
    checks = summary["secure_vs_plaintext_parameters"]  # the secure block-wise settings, within the bound
    assert {(c["scheme"], c["dp"]) for c in checks} == {(s, dp) for s in ("private-head", "private-head-fusion")
                                                       for dp in ("off", "on")}
    assert all(c["within_bound"] and c["rounds_checked"] == config.rounds for c in checks)
    tables = (out / "tables.md").read_text()
    assert "Secure aggregation vs exact means, on the parameters" in tables and "Goal table" in tables
    assert "Hyperparameters chosen on validation" in tables and tables.count("| incomplete |") >= 8
    assert summary["plots"]
    for plot in summary["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second invocation resumes: nothing left to run, same results; --report-only reads them.
    assert main(["experiment", str(tiny_config), "--work", str(work), "--out", str(out), "--workers", "1"]) == 0
    assert json.loads((work / "runs.json").read_text())[-1]["cells_run"] == 0
    assert main(["experiment", str(tiny_config), "--work", str(work), "--out", str(out), "--report-only"]) == 0
    assert json.loads((out / "summary.json").read_text())["cells"] == len(expected)


@pytest.mark.slow
def test_synthetic_images_with_task_heterogeneity_run(tmp_path, tiny_config):
    config = load_experiment(tiny_config)
    cell = Cell("synthetic", "hetero", "incomplete", "iid", "full-model", "on", 0, "in-memory")
    pools: dict = {}
    build_data(config, cell, tmp_path, pools)
    meta = json.loads((tmp_path / "data" / cell.data_key / "sites.json").read_text())["sites"]
    assert [s["tasks"] for s in meta.values()] == [["malignancy"], ["severity"], ["malignancy"], ["severity"]]
    assert [s["modalities"] for s in meta.values()] == [["image"], ["tabular"], ["image", "tabular"],
                                                       ["image", "tabular"]]
    result = run_cell(config, cell, tmp_path, _pool_meta(pools["synthetic"]), _noise(config, tmp_path, cell))
    assert set(result["sites"]["site-01"]["tasks"]) == {"severity"}
    assert result["epsilon_max"] <= 8.0 and len(result["curve"]) == config.rounds


# -- core additions: extra tabular modalities, cached accountant ---------------------------------


def test_extra_tabular_modality_gets_its_own_encoder_block(tmp_path):
    from blossom_secure.config import ModelLayout, TabularConfig
    from blossom_secure.model import BlockModel
    from tests.test_model import layout

    base = layout()
    lay = ModelLayout(embedding_dim=8, image=base.image, tabular=base.tabular, tasks=base.tasks,
                      extra_tabular={"labs": TabularConfig(features=("x", "y"), hidden=(4,))})
    assert lay.modalities == ("image", "tabular", "labs")
    m = BlockModel(lay, ("labs", "tabular"), ("malignancy",))
    assert list(m.blocks()) == ["encoder.tabular", "encoder.labs", "fusion", "head.malignancy"]
    assert lay.blocks_for(("labs",), ("malignancy",)) == ("encoder.labs", "fusion", "head.malignancy")
    with pytest.raises(ValueError):
        BlockModel(base, ("labs",), ("malignancy",))


def test_extra_tabular_modality_in_federation_and_site_files(copy_sites):
    from blossom_secure.config import load_federation
    from blossom_secure.site.config import load_site
    from blossom_secure.errors import PolicyError

    sites = copy_sites()
    fed_path = sites / "federation.toml"
    labs = ('[model.extra_tabular.labs]\nfeatures = ["lactate", "albumin"]\nhidden = [4]\n\n'
            '[model.extra_tabular.labs.scaling]\nlactate = { range = [0.0, 20.0] }\n'
            'albumin = { range = [10.0, 60.0], centre = 38.0, scale = 5.0 }\n\n')
    fed_path.write_text(fed_path.read_text().replace("[model.tasks]", labs + "[model.tasks]"))
    fed = load_federation(fed_path)
    assert fed.layout.extra_tabular["labs"].features == ("lactate", "albumin")
    lactate, albumin = fed.layout.extra_tabular["labs"].scaling
    assert (lactate.centre, lactate.scale) == (10.0, 10.0)  # middle and half-width of the range by default
    assert (albumin.low, albumin.high, albumin.centre, albumin.scale) == (10.0, 60.0, 38.0, 5.0)
    site = sites / "riverside" / "site.toml"
    site.write_text(site.read_text().replace('modalities = ["tabular"]', 'modalities = ["tabular", "labs"]'))
    assert load_site(sites / "riverside", federation=fed).blocks[:2] == ("encoder.tabular", "encoder.labs")
    # A column may belong to one modality only; built-in names cannot be redeclared.
    fed_path.write_text(fed_path.read_text().replace('features = ["lactate", "albumin"]', 'features = ["age"]')
                        .replace("lactate = { range = [0.0, 20.0] }\nalbumin", "age")
                        + "\n[model.extra_tabular.image]\nfeatures = [\"z\"]\n")
    with pytest.raises(PolicyError) as info:
        load_federation(fed_path)
    keys = {p.key for p in info.value.problems}
    assert {"model.extra_tabular.labs.features", "model.extra_tabular.image"} <= keys


def test_extra_tabular_modality_presence_is_read_per_group(tmp_path):
    from blossom_secure.site.data import load_site_arrays

    csv_path = tmp_path / "clinical.csv"
    csv_path.write_text("patient_id,a1,a2,b1,y\np1,1,2,3,0\np2,1,,4,1\np3,,,,1\np4,5,6,,0\n")
    arrays = load_site_arrays(dicom_dir=None, clinical_csv=csv_path, patient_id_column="patient_id",
                              modalities=("tabular", "labs"), tabular_features=("a1", "a2"), tasks={"t": "y"},
                              num_classes={"t": 2}, image_spatial_dims=2, image_size=(8, 8),
                              extra_tabular={"labs": ("b1",), "unused": ("zz",)})
    assert arrays.patient_ids == ("p1", "p2", "p4") and arrays.dropped_without_modality == 1
    assert arrays.tabular_present.tolist() == [True, False, True]
    assert arrays.extra_tabular_present["labs"].tolist() == [True, True, False]
    assert arrays.extra_tabular["labs"][:, 0].tolist() == [3.0, 4.0, 0.0]
    assert set(arrays.extra_tabular) == {"labs"}


def test_cached_rdp_epsilon_is_bit_for_bit_opacus():
    from opacus.accountants import create_accountant

    from blossom_secure.site.ledger import compute_epsilon

    rng = random.Random(7)
    for _ in range(10):
        history = [(rng.uniform(0.6, 4.0), rng.uniform(0.01, 0.5), rng.randint(1, 60))
                   for _ in range(rng.randint(1, 5))]
        acct = create_accountant("rdp")
        acct.history = list(history)
        assert compute_epsilon(history, accountant="rdp", delta=1e-5) == acct.get_epsilon(delta=1e-5)


def test_cell_federation_declares_public_groups_scaling_and_weights(tmp_path, tiny_config):
    """A generated cell fixes in public what secure aggregation and DP rest on: each shared
    block's group of holders (so a block held by a subset of sites can be aggregated with a
    threshold that is a majority of its group), the feature scaling and the weights."""
    from blossom_secure.config import load_federation
    from blossom_secure.experiments.runner import build_cell

    config = load_experiment(tiny_config)
    cell = Cell("breast_cancer", "single", "exclusive", "iid", "private-head", "on", 0, "secure")
    pools: dict = {}
    build_data(config, cell, tmp_path, pools)
    sites_root, _ = build_cell(config, cell, tmp_path, _pool_meta(pools["breast_cancer"]), _noise(config, tmp_path, cell))
    fed = load_federation(sites_root / "federation.toml")
    meta = json.loads((tmp_path / "data" / cell.data_key / "sites.json").read_text())["sites"]
    holders = {m: sorted(n for n, s in meta.items() if m in s["modalities"]) for m in ("tabular", "se_worst")}
    for modality, sites in holders.items():
        if len(sites) >= 2:
            assert list(fed.aggregation.groups[f"encoder.{modality}"]) == sites
    assert fed.aggregation.max_sites == config.sites
    assert len(fed.layout.tabular.scaling) == len(fed.layout.tabular.features)
    assert fed.weighting.scheme == "declared" and set(fed.weighting.declared) == set(meta)


# -- tuning, the baselines a hospital weighs, the goal table ------------------------------------


def _patients(site_dir: Path) -> list[str]:
    with open(site_dir / "clinical.csv", newline="") as f:
        return [row["patient_id"] for row in csv.DictReader(f)]


def test_tuning_never_sees_a_patient_held_out_in_any_test_cell(tmp_path, tiny_config):
    """The attack on the study's honesty: hyperparameters picked on the patients they are
    then scored on. Every test cell (any seed, any partition) holds out the same patients
    (a fixed split seed); a tuning cell's sites hold none of them, and its agents carve a
    validation split (a different split seed) from the rest."""
    from blossom_secure.experiments.runner import HOLDOUT_SPLIT_SEED, VALIDATION_SPLIT_SEED, build_cell
    from blossom_secure.site.data import split_holdout

    config = load_experiment(tiny_config)
    pools: dict = {}
    held_out: set[str] = set()
    for seed in (0, 1, 2):
        for partition in ("iid", "dirichlet"):
            cell = Cell("breast_cancer", "single", "incomplete", partition, "private-head", "on", seed, "secure")
            root = build_data(config, cell, tmp_path, pools)
            for site in sorted(p for p in root.iterdir() if p.is_dir()):
                ids = sorted(_patients(site))
                _, test = split_holdout(ids, fraction=config.holdout_fraction, seed=HOLDOUT_SPLIT_SEED)
                held_out |= {ids[i] for i in test}
    assert held_out
    tune = Cell("breast_cancer", "single", "incomplete", "iid", "private-head", "on", 7, "secure", stage="tune")
    root = build_data(config, tune, tmp_path, pools)
    meta = json.loads((root / "sites.json").read_text())["sites"]
    tuning_patients = set()
    for name, site in meta.items():
        ids = _patients(root / name)
        tuning_patients |= set(ids)
        assert site["n_heldout"] > 0 and site["n_train"] > 0  # a real validation split
    assert tuning_patients and not tuning_patients & held_out
    sites_root, _ = build_cell(config, tune, tmp_path, _pool_meta(pools["breast_cancer"]), _noise(config, tmp_path, tune))
    from blossom_secure.config import load_federation

    assert load_federation(sites_root / "federation.toml").training.split_seed == VALIDATION_SPLIT_SEED
    test_cell = Cell("breast_cancer", "single", "incomplete", "iid", "private-head", "on", 2, "secure")
    sites_root, _ = build_cell(config, test_cell, tmp_path, _pool_meta(pools["breast_cancer"]),
                               _noise(config, tmp_path, test_cell))
    assert load_federation(sites_root / "federation.toml").training.split_seed == HOLDOUT_SPLIT_SEED


def _tune_result(scheme: str, lr: float, batch: int, acc: float, seed: int = 7, eps: float = 8.0,
                 dp: str = "on") -> dict:
    cell = Cell("digits", "single", "incomplete", "iid", scheme, dp, seed, "secure", epsilon=eps, learning_rate=lr,
                batch_size=batch, stage="tune")
    return {"cell": cell.__dict__, "key": cell.key, "final": {"accuracy": acc, "macro_f1": acc}}


def test_hyperparameters_are_the_best_validation_candidate_and_the_first_on_a_tie(tmp_path):
    from blossom_secure.experiments.runner import choose_hyperparameters

    path = tmp_path / "t.toml"
    path.write_text(TINY + TUNING.replace("batch_sizes = [8, 16]", "batch_sizes = [8, 16]\nepsilons = [8.0, 1.0]"))
    config = load_experiment(path)
    results = [_tune_result("private-head", 0.05, 8, 0.60), _tune_result("private-head", 0.05, 16, 0.70),
               _tune_result("local", 0.05, 8, 0.50), _tune_result("local", 0.05, 16, 0.50),
               _tune_result("local", 0.05, 8, 0.40, eps=1.0), _tune_result("local", 0.05, 16, 0.45, eps=1.0),
               _tune_result("local-nodp", 0.05, 8, 0.8), _tune_result("local-nodp", 0.05, 16, 0.9)]
    choices = choose_hyperparameters(config, results)
    assert choices[("digits", "single", "private-head", 8.0)]["batch_size"] == 16
    assert choices[("digits", "single", "local", 8.0)]["batch_size"] == 8  # a tie: the first candidate
    assert choices[("digits", "single", "local", 1.0)]["batch_size"] == 16  # chosen per epsilon
    assert choices[("digits", "single", "local-nodp", None)]["validation_accuracy"] == 0.9
    with pytest.raises(ValueError, match="expected 1"):
        choose_hyperparameters(config, results[:1])
    # A cell at an epsilon that was not tuned takes the nearest tuned one's values (log scale).
    from blossom_secure.experiments.runner import _setting_of

    for eps, tuned in ((1.0, 1.0), (2.0, 1.0), (4.0, 8.0), (8.0, 8.0)):
        cell = Cell("digits", "single", "incomplete", "iid", "local", "on", 0, "none", epsilon=eps)
        assert _setting_of(cell, (8.0, 1.0))[-1] == tuned


def _test_result(scheme: str, seed: int, acc: float, *, split: str = "incomplete", eps: float = 8.0,
                 majority: float = 0.3) -> dict:
    cell = Cell("digits", "single", split, "iid", scheme, "on", seed, "secure", epsilon=eps)
    return {"cell": cell.__dict__, "key": cell.key, "final": {"accuracy": acc, "macro_f1": acc},
            "final_weighted_by_holdout": {"accuracy": acc, "macro_f1": acc}, "majority_class_accuracy": majority,
            "curve": [{"round": 1, "accuracy": acc, "macro_f1": acc}], "epsilon_max": eps,
            "declined_site_rounds": 0}


def test_best_block_wise_is_chosen_on_validation_never_on_the_held_out_results():
    """The attack: report whichever block-wise variant happened to score best on the test
    patients. The goal table takes the variant the tuning preferred, even when the other
    one did better on held-out data, and states both numbers."""
    from blossom_secure.experiments.report import goal_table

    results = ([_test_result("private-head", s, a) for s, a in enumerate([0.70, 0.72, 0.74])]
               + [_test_result("private-head-fusion", s, a) for s, a in enumerate([0.90, 0.91, 0.92])]
               + [_test_result("paper-full-model", s, a) for s, a in enumerate([0.60, 0.61, 0.65])]
               + [_test_result("local", s, a) for s, a in enumerate([0.69, 0.74, 0.73])]
               + [_test_result("local-nodp", s, 0.9) for s in range(3)])
    tuning = {"choices": [{"dataset": "digits", "tasks": "single", "scheme": "private-head", "epsilon": 8.0,
                           "validation_accuracy": 0.8},
                          {"dataset": "digits", "tasks": "single", "scheme": "private-head-fusion", "epsilon": 8.0,
                           "validation_accuracy": 0.7}]}
    [row] = goal_table(results, epsilon=8.0, tuning=tuning)
    assert row["best_blockwise"] == "private-head"
    assert row["accuracy"]["best_blockwise"]["mean"] == pytest.approx(0.72)
    assert row["vs_paper-full-model"]["accuracy"]["verdict"] == "win"  # 0.10, 0.11, 0.09: see above
    assert row["vs_local"]["accuracy"]["verdict"] == "tie"
    assert row["vs_local-nodp"]["accuracy"]["verdict"] == "loss"
    assert row["majority_class"] == pytest.approx(0.3)
    # Without tuning, the first block-wise scheme: never the better of the two on held-out data.
    assert goal_table(results, epsilon=8.0, tuning=None)[0]["best_blockwise"] == "private-head"


def test_majority_class_rate_is_the_training_majority_scored_on_held_out_patients():
    from blossom_secure.experiments.runner import majority_class_accuracy

    assert majority_class_accuracy({"train_label_counts": [5, 9, 1], "heldout_label_counts": [2, 3, 5]}) == 0.3
    # A tie in training goes to the first class; an empty held-out split has no rate.
    assert majority_class_accuracy({"train_label_counts": [4, 4], "heldout_label_counts": [1, 3]}) == 0.25
    assert majority_class_accuracy({"train_label_counts": [4, 4], "heldout_label_counts": [0, 0]}) is None


def test_privacy_curve_cells_vary_epsilon_and_never_repeat_a_run_without_dp(tmp_path):
    path = tmp_path / "curve.toml"
    path.write_text(TINY.replace('schemes = ["full-model", "private-head", "private-head-fusion", "local"]',
                                 'schemes = ["paper-full-model", "private-head", "local", "local-nodp"]')
                    + '\n[privacy_curve]\nepsilons = [1.0, 2.0]\ndatasets = ["breast_cancer"]\n'
                      'splits = ["incomplete"]\nschemes = ["private-head", "local-nodp"]\npartitions = ["iid"]\n')
    config = load_experiment(path)
    cells = cells_of(config)
    assert sorted({c.epsilon for c in cells if c.scheme == "private-head" and c.dp == "on"}) == [1.0, 2.0, 8.0]
    assert [c.epsilon for c in cells if c.scheme == "local-nodp"] == [8.0]  # no DP: one run, at no epsilon
    assert {c.epsilon for c in cells if c.dp == "off"} == {8.0}
    # Each curve cell's policy budget is its own epsilon, and so is its noise.
    pools: dict = {}
    by_eps = {}
    for e in (1.0, 8.0):
        cell = Cell("breast_cancer", "single", "incomplete", "iid", "private-head", "on", 0, "secure", epsilon=e)
        build_data(config, cell, tmp_path, pools)
        from blossom_secure.experiments.runner import build_cell
        from blossom_secure.site.policy import load_policy

        sites_root, planned = build_cell(config, cell, tmp_path, _pool_meta(pools["breast_cancer"]),
                                         _noise(config, tmp_path, cell))
        policy = load_policy(sites_root.parent / "policies" / "site-00.toml")
        assert policy.privacy.epsilon_budget == e
        by_eps[e] = planned["site-00"]["noise_multiplier"]
    assert by_eps[1.0] > by_eps[8.0]


@pytest.mark.slow
def test_fedavg_with_fine_tuning_freezes_the_shared_encoders_and_stays_within_budget(tmp_path):
    """FedAvg + FT: the global model for all but the last round, then each site alone
    trains its fusion and head with its encoders frozen: every site ends with the same
    encoders (the last global ones) and its own head, and no site spends more than the
    whole run's epsilon."""
    path = tmp_path / "ft.toml"
    path.write_text(TINY.replace("holdout_fraction = 0.25", "holdout_fraction = 0.25\nfine_tune_rounds = 1")
                    .replace("exclusive = [2, 2, 0]", "exclusive = [2, 2, 0]\ncomplete = [0, 0, 4]"))
    cell = Cell("breast_cancer", "single", "complete", "iid", "fedavg-ft", "on", 0, "in-memory")
    config = load_experiment(path)
    pools: dict = {}
    build_data(config, cell, tmp_path, pools)
    result = run_cell(config, cell, tmp_path, _pool_meta(pools["breast_cancer"]), _noise(config, tmp_path, cell),
                      keep=True)
    assert result["fine_tune_rounds"] == 1 and result["declined_site_rounds"] == 0
    assert result["epsilon_max"] <= config.target_epsilon
    blocks = [dict(np.load(p)) for p in sorted((tmp_path / "cells" / cell.key / "sites").glob("*/state/blocks.npz"))]
    assert len(blocks) == config.sites
    for other in blocks[1:]:
        for name in ("encoder.tabular", "encoder.se_worst"):
            assert np.array_equal(blocks[0][name], other[name]), name
        assert not np.array_equal(blocks[0]["head.diagnosis"], other["head.diagnosis"])


def test_tuning_curve_and_fine_tuning_problems_are_reported_together(tmp_path):
    from blossom_secure.errors import PolicyError

    path = tmp_path / "bad.toml"
    path.write_text(TINY.replace("holdout_fraction = 0.25", "holdout_fraction = 0.25\nfine_tune_rounds = 2")
                    + TUNING.replace('partitions = ["iid"]', 'partitions = ["zipf"]')
                            .replace("learning_rates = [0.05]", "learning_rates = [0.05, -1.0]")
                            .replace("batch_sizes = [8, 16]", "batch_sizes = [8, 16]\nepsilons = [8.0, 9.0]")
                    + '\n[privacy_curve]\nepsilons = [1.0, 1.0]\ndatasets = ["breast_cancer"]\n'
                      'splits = ["incomplete"]\nschemes = ["fedsgd"]\npartitions = ["iid"]\n')
    with pytest.raises(PolicyError) as info:
        load_experiment(path)
    keys = {p.key for p in info.value.problems}
    assert {"training.fine_tune_rounds", "tuning.partitions", "tuning.learning_rates", "tuning.epsilons",
            "privacy_curve.epsilons", "privacy_curve.schemes"} <= keys


@pytest.mark.slow
def test_the_study_files_quick_grid_runs_end_to_end(tmp_path):
    """The study's own file, its [quick] grid: tuning on validation, every scheme of the main
    grid on all three data sets, the report with its goal table and plots."""
    from blossom_secure.cli.blossom import main

    work, out = tmp_path / "work", tmp_path / "report"
    assert main(["experiment", str(ROOT / "experiments" / "blossom.toml"), "--quick", "--work", str(work),
                 "--out", str(out)]) == 0
    quick = load_experiment(ROOT / "experiments" / "blossom.toml", quick=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"] == len(cells_of(quick)) and summary["tuning_cells"] == len(tuning_cells(quick))
    assert {g["dataset"] for g in summary["goal"]} == {"synthetic", "breast_cancer", "digits"}
    assert all(set(g["accuracy"]) == {"best_blockwise", "paper-full-model", "fedavg-ft", "local", "local-nodp"}
               for g in summary["goal"])
    assert summary["epsilon_max_over_all_sites"] <= quick.target_epsilon
    assert all(c["within_bound"] for c in summary["secure_vs_plaintext_parameters"])
