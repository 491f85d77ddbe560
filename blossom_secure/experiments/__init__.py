"""Benchmark experiments: the BLOSSOM study (arXiv 2603.27552) run through the real
components (site folders, policies, DP-SGD and ledgers, secure aggregation, audit logs).

``blossom experiment experiments/blossom.toml`` runs a grid of *cells* (data set x
modality split x scheme x label partition x DP on/off x seed) and writes raw results,
tables and plots. See ``docs/results.md``.

Layers: :mod:`.partition` (pure NumPy), :mod:`.config` (the experiment file),
:mod:`.datasets` (pools and site data folders), :mod:`.runner` (cells, process pool),
:mod:`.report` (summaries, gains, files, plots).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from blossom_secure.experiments.config import ExperimentConfig, load_experiment
from blossom_secure.experiments.partition import dirichlet_partition, iid_partition, modality_roles
from blossom_secure.experiments.report import relative_gain, secure_vs_plaintext, summarise, write_report
from blossom_secure.experiments.runner import Cell, cells_of, run_cell, run_grid

__all__ = [
    "Cell",
    "ExperimentConfig",
    "cells_of",
    "dirichlet_partition",
    "iid_partition",
    "load_experiment",
    "load_results",
    "modality_roles",
    "relative_gain",
    "run_cell",
    "run_grid",
    "secure_vs_plaintext",
    "summarise",
    "write_report",
]


def load_results(work_dir: Path, cells: Sequence[Cell]) -> list[dict]:
    """The finished results of ``cells`` under ``work_dir`` (cells not finished are skipped)."""
    out = []
    for cell in cells:
        path = Path(work_dir) / "results" / f"{cell.key}.json"
        if path.is_file():
            out.append(json.loads(path.read_text()))
    return out
