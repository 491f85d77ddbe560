"""Shared fixtures: a tiny copy of the example federation, for fast end-to-end tests."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_tiny_federation(dest: Path, *, patients: int = 48, rounds: int = 2) -> Path:
    """Copy ``sites/`` and ``policies/`` into ``dest`` with small images, few patients and
    few rounds. Returns the sites folder."""
    shutil.copytree(ROOT / "sites", dest / "sites", ignore=shutil.ignore_patterns("data", "keys", "state"))
    shutil.copytree(ROOT / "policies", dest / "policies")
    fed = dest / "sites" / "federation.toml"
    text = fed.read_text()
    text = text.replace("size = [32, 32]", "size = [16, 16]").replace("channels = [4, 8, 8]", "channels = [4, 8]")
    text = re.sub(r"rounds = \d+", f"rounds = {rounds}", text)
    text = text.replace("batch_size = 64", "batch_size = 16")
    text = text.replace("sample_rate = 0.125", "sample_rate = 0.34").replace("steps_per_round = 8",
                                                                            "steps_per_round = 3")
    fed.write_text(text)
    for site in (dest / "sites").glob("*/site.toml"):
        site.write_text(re.sub(r"patients = \d+", f"patients = {patients}", site.read_text()))
    return dest / "sites"


@pytest.fixture
def tiny_sites(tmp_path) -> Path:
    return make_tiny_federation(tmp_path)


@pytest.fixture(scope="session")
def tiny_sites_with_data(tmp_path_factory) -> Path:
    """A tiny federation whose synthetic data are generated once per test session.
    Tests must copy it (``copy_sites``) before changing anything."""
    from blossom_secure.config import load_federation
    from blossom_secure.site.config import load_site, site_dirs
    from blossom_secure.site.agent import ensure_site_data

    sites = make_tiny_federation(tmp_path_factory.mktemp("tiny"))
    fed = load_federation(sites / "federation.toml")
    for d in site_dirs(sites):
        ensure_site_data(load_site(d, federation=fed), fed)
    return sites


@pytest.fixture
def copy_sites(tmp_path, tiny_sites_with_data):
    def copy() -> Path:
        shutil.copytree(tiny_sites_with_data.parent / "policies", tmp_path / "policies", dirs_exist_ok=True)
        shutil.copytree(tiny_sites_with_data, tmp_path / "sites")
        return tmp_path / "sites"
    return copy


def allow_coordinators(sites: Path, *addresses: str) -> None:
    """Add ``addresses`` to every example policy's ``[policy] coordinators``."""
    listed = ", ".join(f'"{a}"' for a in ("embedded", *addresses))
    for policy in (sites.parent / "policies").glob("*.toml"):
        policy.write_text(policy.read_text().replace('coordinators = ["embedded"]', f"coordinators = [{listed}]"))
