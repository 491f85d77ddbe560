"""Federation and site files: every problem reported, with file, key and reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from blossom_secure.config import load_federation, load_site, site_dirs
from blossom_secure.errors import PolicyError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sites(tmp_path) -> Path:
    shutil.copytree(ROOT / "sites", tmp_path / "sites", ignore=shutil.ignore_patterns("data", "keys", "state"))
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    return tmp_path / "sites"


def test_example_federation_and_sites_are_valid(sites):
    fed = load_federation(sites / "federation.toml")
    loaded = [load_site(d, federation=fed) for d in site_dirs(sites)]
    assert len(loaded) >= 4
    kinds = {s.modalities for s in loaded}
    assert {("image",), ("tabular",), ("image", "tabular")} <= kinds
    assert len({t for s in loaded for t in s.tasks}) >= 2
    for s in loaded:
        assert not any(s.policy.is_shareable(b) for b in s.blocks if b.startswith("head."))


def test_site_file_problems_reported_together(sites):
    path = sites / "st-mary" / "site.toml"
    text = path.read_text().replace('modalities = ["image", "tabular"]', 'modalities = ["image", "genome"]')
    text = text.replace('malignancy = "malignant"', 'malignancy = "malignant"\nunknown_task = "x"')
    text = text.replace("patients = 600", "patients = 1") + "\n[extra]\n"
    path.write_text(text)
    fed = load_federation(sites / "federation.toml")
    with pytest.raises(PolicyError) as info:
        load_site(sites / "st-mary", federation=fed)
    found = {(p.key, p.reason.split(" (")[0]) for p in info.value.problems}
    assert ("data.modalities", "unknown modality 'genome'") in found
    assert any(k == "tasks.unknown_task" and "not a task of federation" in r for k, r in found)
    assert ("synth.patients", "must be at least 2, not 1") in found
    assert ("extra", "unknown key") in found
    assert all(p.file.endswith("site.toml") for p in info.value.problems)


def test_policy_problems_surface_through_site(sites):
    policy = sites.parent / "policies" / "standard.toml"
    policy.write_text(policy.read_text().replace('"fusion"', '"head.malignancy"'))
    fed = load_federation(sites / "federation.toml")
    with pytest.raises(PolicyError) as info:
        load_site(sites / "st-mary", federation=fed)
    assert any(p.file.endswith("standard.toml") and "task heads never leave" in p.reason for p in info.value.problems)


def test_policy_for_other_federation_refused(sites):
    policy = sites.parent / "policies" / "standard.toml"
    policy.write_text(policy.read_text().replace('federation = "blossom-demo"', 'federation = "elsewhere"'))
    fed = load_federation(sites / "federation.toml")
    with pytest.raises(PolicyError, match="allows federation 'elsewhere'"):
        load_site(sites / "st-mary", federation=fed)


def test_missing_site_folder_and_file(tmp_path):
    with pytest.raises(PolicyError, match="site folder not found"):
        load_site(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError, match="file not found"):
        load_site(tmp_path / "empty")


def test_federation_problems(sites):
    path = sites / "federation.toml"
    text = (path.read_text().replace('id = "blossom-demo"', 'id = "Blossom Demo!"')
            .replace("size = [32, 32]", "size = [32]").replace("severity = 3", "severity = 1")
            .replace("ring_bits = 32", "ring_bits = 48").replace("channels = [4, 8, 8]", "channels = [6, 16]"))
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_federation(path)
    keys = {p.key for p in info.value.problems}
    assert {"federation.id", "model.image.size", "model.tasks.severity", "aggregation.ring_bits",
            "model.image.channels"} <= keys
