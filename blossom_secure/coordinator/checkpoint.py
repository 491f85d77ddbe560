"""The coordinator's checkpoint: what a restarted coordinator continues from.

After every round the coordinator writes, in its output folder and in this order:

1. ``global_blocks.npz``: the global shared blocks after the round (no pickle);
2. ``coordinator-rounds.json``: the federation (id and the SHA-256 of its file), every
   finished round's report, and the SHA-256 of the ``global_blocks.npz`` bytes it goes with;
3. ``metrics.json``: the readable results.

Each write is atomic, so a coordinator killed at any moment leaves either the previous
round's checkpoint or the new one. A restart continues from the last finished round's
global blocks and keeps its reports; a round that was in progress is abandoned (its number
stays used: the round counter of ``coordinator-state.json`` never goes back, and every site
refuses a round number it has already answered). The checkpoint holds nothing a site did
not release: block sums' means, which sites answered, bytes received, released reports.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np

from blossom_secure._fs import atomic_write, load_arrays_npz, save_arrays_npz
from blossom_secure.config import FederationConfig
from blossom_secure.coordinator.rounds import RoundReport
from blossom_secure.errors import PolicyError, Problem

__all__ = ["CHECKPOINT_FILE", "GLOBAL_BLOCKS_FILE", "METRICS_FILE", "Checkpoint", "load_checkpoint",
           "save_checkpoint"]

CHECKPOINT_FILE = "coordinator-rounds.json"
GLOBAL_BLOCKS_FILE = "global_blocks.npz"
METRICS_FILE = "metrics.json"
CHECKPOINT_FORMAT = 1
_MAX_CHECKPOINT_BYTES = 64 * 1024 * 1024
_FIELDS = frozenset({"format", "federation", "federation_sha256", "rounds", "global_blocks_sha256"})
_ROUND_FIELDS = frozenset({"round_id", "sites", "blocks", "bytes_received"})


class Checkpoint:
    """A finished round's state: the reports so far and the global blocks after the last."""

    def __init__(self, reports: list[RoundReport], global_blocks: dict[str, np.ndarray]) -> None:
        self.reports = reports
        self.global_blocks = global_blocks

    @property
    def last_round(self) -> int:
        return self.reports[-1].round_id


def save_checkpoint(out_dir: Path, federation: FederationConfig, reports: list[RoundReport],
                    global_blocks: Mapping[str, np.ndarray], metrics: Mapping) -> Path:
    """Write the global blocks, the checkpoint and ``metrics.json`` (in that order, each
    atomically); returns the metrics path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    blocks_path = out_dir / GLOBAL_BLOCKS_FILE
    save_arrays_npz(blocks_path, dict(global_blocks))
    doc = {"format": CHECKPOINT_FORMAT, "federation": federation.id, "federation_sha256": federation.sha256,
           "rounds": [asdict(r) for r in reports],
           "global_blocks_sha256": hashlib.sha256(blocks_path.read_bytes()).hexdigest()}
    atomic_write(out_dir / CHECKPOINT_FILE, json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)
    path = out_dir / METRICS_FILE
    atomic_write(path, json.dumps(metrics, indent=1).encode() + b"\n", mode=0o644)
    return path


def load_checkpoint(out_dir: Path, federation: FederationConfig, *, block_sizes: Mapping[str, int]
                    ) -> Checkpoint | None:
    """The checkpoint in ``out_dir``, or ``None`` if the coordinator never finished a round there.

    Raises:
        PolicyError: the checkpoint is unreadable, belongs to another federation or to
            another version of the federation file, does not match its global blocks
            (a partial copy, an edited file), or its blocks do not fit the layout.
    """
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None

    def bad(field: str, reason: str) -> PolicyError:
        return PolicyError([Problem(str(path), field, reason)])

    try:
        raw = path.read_bytes()
        if len(raw) > _MAX_CHECKPOINT_BYTES:
            raise bad("", "larger than a coordinator checkpoint can be")
        doc = json.loads(raw, parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise bad("", f"cannot be read: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != _FIELDS or doc["format"] != CHECKPOINT_FORMAT:
        raise bad("format", f"not a coordinator checkpoint (format {CHECKPOINT_FORMAT})")
    if doc["federation"] != federation.id:
        raise bad("federation", f"holds rounds of federation {doc['federation']!r}, not {federation.id!r}")
    if doc["federation_sha256"] != federation.sha256:
        raise bad("federation_sha256", "was written under another version of the federation file; continue with "
                                       "the same file, or start the new one in a new --out folder")
    reports = _reports(doc["rounds"], bad)
    blocks_path = Path(out_dir) / GLOBAL_BLOCKS_FILE
    try:
        data = blocks_path.read_bytes()
    except OSError as exc:
        raise bad("global_blocks_sha256", f"{blocks_path.name} cannot be read: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != doc["global_blocks_sha256"]:
        raise bad("global_blocks_sha256", f"{blocks_path.name} is not the file this checkpoint was written with")
    try:
        blocks = load_arrays_npz(blocks_path)
    except (OSError, ValueError) as exc:
        raise bad("global_blocks_sha256", f"{blocks_path.name}: {exc}") from None
    if set(blocks) != set(block_sizes) or any(
            blocks[b].dtype != np.float32 or blocks[b].size != n for b, n in block_sizes.items()):
        raise bad("global_blocks_sha256", f"{blocks_path.name} does not hold the federation layout's shared blocks")
    if not all(np.all(np.isfinite(v)) for v in blocks.values()):
        raise bad("global_blocks_sha256", f"{blocks_path.name} holds non-finite values")
    return Checkpoint(reports, {b: v.reshape(-1) for b, v in blocks.items()})


def _reports(rounds: object, bad) -> list[RoundReport]:
    if not isinstance(rounds, list) or not rounds:
        raise bad("rounds", "must list the finished rounds")
    reports: list[RoundReport] = []
    for i, r in enumerate(rounds):
        if not isinstance(r, dict) or set(r) != _ROUND_FIELDS:
            raise bad(f"rounds[{i}]", "not a round report")
        rid = r["round_id"]
        if isinstance(rid, bool) or not isinstance(rid, int) or rid < 0 or (reports and rid <= reports[-1].round_id):
            raise bad(f"rounds[{i}].round_id", "round numbers must be non-negative and increasing")
        if not all(isinstance(r[k], dict) for k in ("sites", "blocks", "bytes_received")):
            raise bad(f"rounds[{i}]", "sites, blocks and bytes_received must be tables")
        reports.append(RoundReport(round_id=rid, sites=r["sites"], blocks=r["blocks"],
                                   bytes_received=r["bytes_received"]))
    return reports


def _no_constant(text: str) -> object:
    raise ValueError(f"{text} is not JSON")
