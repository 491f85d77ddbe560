"""The coordinator's checkpoint: a restarted coordinator continues from the last round it
finished, and refuses a checkpoint that is not the one it wrote for this federation file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from blossom_secure.config import load_federation
from blossom_secure.coordinator.checkpoint import CHECKPOINT_FILE, GLOBAL_BLOCKS_FILE, load_checkpoint, save_checkpoint
from blossom_secure.coordinator.rounds import RoundReport, site_report_view
from blossom_secure.coordinator.steps import RoundCoordinator, metrics_document
from blossom_secure.errors import PolicyError

SITES = ("lakeside", "northgate", "riverside", "st-mary")


def _roster() -> dict[str, bytes]:
    return {s: Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for s in SITES}


@pytest.fixture
def finished(tiny_sites, tmp_path):
    """A coordinator that finished round 3 (blocks moved away from the initial values), checkpointed."""
    federation = load_federation(tiny_sites / "federation.toml")
    roster = _roster()
    coordinator = RoundCoordinator(federation, roster, seed=7)
    blocks = {b: (v + 0.25).astype(np.float32) for b, v in coordinator.global_blocks.items()}
    report = RoundReport(round_id=3, sites={s: site_report_view(None, joined=True) for s in SITES},
                         blocks={b: {"contributors": list(SITES), "failure": None} for b in blocks},
                         bytes_received={s: 100 for s in SITES})
    out = tmp_path / "out"
    save_checkpoint(out, federation, [report], blocks, metrics_document(federation, roster, [report], seed=7))
    return federation, roster, coordinator, blocks, report, out


def test_restarted_coordinator_continues_from_the_last_finished_round(finished):
    federation, roster, coordinator, blocks, report, out = finished
    checkpoint = load_checkpoint(out, federation, block_sizes=coordinator.block_sizes)
    assert checkpoint.last_round == 3 and checkpoint.reports == [report]
    assert set(checkpoint.global_blocks) == set(blocks)
    for b, v in blocks.items():
        assert np.array_equal(checkpoint.global_blocks[b], v)
    resumed = RoundCoordinator(federation, roster, seed=7, global_blocks=checkpoint.global_blocks)
    assert all(np.array_equal(resumed.global_blocks[b], v) for b, v in blocks.items())
    assert json.loads((out / "metrics.json").read_text())["blocks"] == {"3": report.blocks}


def test_a_new_output_folder_has_no_checkpoint(tiny_sites, tmp_path):
    federation = load_federation(tiny_sites / "federation.toml")
    assert load_checkpoint(tmp_path / "empty", federation, block_sizes={}) is None


def test_swapped_global_blocks_file_is_refused(finished, tmp_path):
    """Global blocks from another run (or edited) under a genuine checkpoint: refused."""
    federation, roster, coordinator, blocks, report, out = finished
    other = tmp_path / "other"
    save_checkpoint(other, federation, [report], {b: v * 0 for b, v in blocks.items()}, {})
    shutil.copy(other / GLOBAL_BLOCKS_FILE, out / GLOBAL_BLOCKS_FILE)
    with pytest.raises(PolicyError, match="not the file this checkpoint was written with"):
        load_checkpoint(out, federation, block_sizes=coordinator.block_sizes)


def test_checkpoint_under_another_version_of_the_federation_file_is_refused(finished, tiny_sites):
    federation, roster, coordinator, blocks, report, out = finished
    path = tiny_sites / "federation.toml"
    path.write_text(path.read_text() + "\n# amended\n")
    amended = load_federation(path)
    with pytest.raises(PolicyError, match="another version of the federation file"):
        load_checkpoint(out, amended, block_sizes=coordinator.block_sizes)


@pytest.mark.parametrize("edit,words", [
    (lambda d: d.update(federation="other-federation"), "federation 'other-federation'"),
    (lambda d: d["rounds"].append(dict(d["rounds"][0])), "increasing"),
    (lambda d: d.update(rounds=[]), "finished rounds"),
    (lambda d: d.update(extra=1), "not a coordinator checkpoint"),
])
def test_forged_or_foreign_checkpoint_is_refused(finished, edit, words):
    federation, roster, coordinator, blocks, report, out = finished
    doc = json.loads((out / CHECKPOINT_FILE).read_text())
    edit(doc)
    (out / CHECKPOINT_FILE).write_text(json.dumps(doc))
    with pytest.raises(PolicyError, match=words):
        load_checkpoint(out, federation, block_sizes=coordinator.block_sizes)


def test_checkpoint_that_is_not_json_is_one_clear_error(finished):
    federation, roster, coordinator, blocks, report, out = finished
    (out / CHECKPOINT_FILE).write_text('{"format": NaN')
    with pytest.raises(PolicyError) as info:
        load_checkpoint(out, federation, block_sizes=coordinator.block_sizes)
    assert CHECKPOINT_FILE in str(info.value) and "cannot be read" in str(info.value)


def test_global_blocks_of_another_layout_are_refused(finished):
    federation, roster, coordinator, blocks, report, out = finished
    sizes = dict(coordinator.block_sizes)
    sizes[next(iter(sizes))] += 1
    with pytest.raises(PolicyError, match="layout"):
        load_checkpoint(out, federation, block_sizes=sizes)
