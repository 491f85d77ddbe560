"""An in-memory federation for driving the stage machines by hand in tests.

Keeps every message of every stage so that tests can replay, tamper with, reorder or
redirect them, the way an attacker on the coordinator's side could.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from blossom_secure import crypto
from blossom_secure.secagg import (
    CoordinatorStageMachine,
    SecAggParams,
    SiteContribution,
    SiteStageMachine,
)

FEDERATION = "fed-test"
#: Stands for the SHA-256 of the federation file (any 32 bytes will do in tests).
FEDERATION_SHA256 = hashlib.sha256(b"fed-test federation file").digest()
ROUND = 4
SIZES = {"encoder.image": 6, "encoder.tabular": 3, "fusion": 2}


def make_keys(sites: list[str]) -> tuple[dict, dict]:
    keys = {site: crypto.generate_identity_key() for site in sites}
    return keys, {site: crypto.identity_public_key(key) for site, key in keys.items()}


def update_for(site: str, block: str, size: int) -> np.ndarray:
    # Deterministic test data (not secret).
    seed = sum(map(ord, site + block))
    return ((np.arange(size, dtype=np.float64) - size / 2) * 0.01 * (seed % 7 + 1)).astype(np.float32)


class Federation:
    """Sites and a coordinator for one round, with every message kept."""

    def __init__(
        self,
        sites: Mapping[str, tuple[str, ...]] | None = None,
        *,
        params: SecAggParams | None = None,
        sizes: Mapping[str, int] = SIZES,
        round_id: int = ROUND,
        keys: tuple[dict, dict] | None = None,
        minimums: Mapping[str, int] | None = None,
    ) -> None:
        sites = dict(sites or {f"s{i}": ("encoder.image", "fusion") for i in range(4)})
        # Five sites at most (t = 3 is a strict majority of max_sites = 5).
        self.params = params or SecAggParams(max_weight=100, max_group_size=5, threshold=3)
        self.sizes = dict(sizes)
        self.round_id = round_id
        self.keys, self.roster = keys or make_keys(sorted(sites))
        self.contributions = {
            site: SiteContribution(
                blocks={b: update_for(site, b, self.sizes[b]) for b in blocks},
                weight=1 + sorted(sites).index(site),
                min_contributors=(minimums or {}).get(site, 2),
            )
            for site, blocks in sites.items()
        }
        self.sites = {site: self.new_site(site) for site in sorted(sites)}
        self.coordinator = self.new_coordinator()
        self.adverts: dict[str, bytes] = {}
        self.bundles: dict[str, bytes] = {}
        self.shares: dict[str, bytes] = {}
        self.deliveries: dict[str, bytes] = {}
        self.masked: dict[str, bytes] = {}
        self.consistency_requests: dict[str, bytes] = {}
        self.signatures: dict[str, bytes] = {}
        self.unmask_requests: dict[str, bytes] = {}
        self.responses: dict[str, bytes] = {}

    def new_site(self, site: str, **overrides: object) -> SiteStageMachine:
        arguments = dict(
            site_id=site,
            federation_id=FEDERATION,
            federation_sha256=FEDERATION_SHA256,
            round_id=self.round_id,
            roster=self.roster,
            identity_key=self.keys[site],
            block_sizes=self.sizes,
            params=self.params,
            contribution=self.contributions[site],
        )
        arguments.update(overrides)
        return SiteStageMachine(**arguments)

    def new_coordinator(self, **overrides: object) -> CoordinatorStageMachine:
        arguments = dict(
            federation_id=FEDERATION,
            federation_sha256=FEDERATION_SHA256,
            round_id=self.round_id,
            roster=self.roster,
            block_sizes=self.sizes,
            params=self.params,
        )
        arguments.update(overrides)
        return CoordinatorStageMachine(**arguments)

    def advertise(self, skip: tuple[str, ...] = ()) -> None:
        for site, machine in self.sites.items():
            if site not in skip:
                self.adverts[site] = machine.advertise_keys()
                self.coordinator.receive(self.adverts[site])
        self.bundles = self.coordinator.close_stage()

    def share(self, skip: tuple[str, ...] = ()) -> None:
        for site, bundle in self.bundles.items():
            if site not in skip:
                self.shares[site] = self.sites[site].share_keys(bundle)
                self.coordinator.receive(self.shares[site])
        self.deliveries = self.coordinator.close_stage()

    def mask(self, skip: tuple[str, ...] = ()) -> None:
        for site, delivery in self.deliveries.items():
            if site not in skip:
                self.masked[site] = self.sites[site].masked_input(delivery)
                self.coordinator.receive(self.masked[site])
        self.consistency_requests = self.coordinator.close_stage()

    def check(self, skip: tuple[str, ...] = ()) -> None:
        for site, request in self.consistency_requests.items():
            if site not in skip:
                self.signatures[site] = self.sites[site].consistency_check(request)
                self.coordinator.receive(self.signatures[site])
        self.unmask_requests = self.coordinator.close_stage()

    def unmask(self, skip: tuple[str, ...] = ()) -> None:
        for site, request in self.unmask_requests.items():
            if site not in skip:
                self.responses[site] = self.sites[site].unmask(request)
                self.coordinator.receive(self.responses[site])
        self.coordinator.close_stage()

    def run(self) -> dict:
        self.advertise()
        self.share()
        self.mask()
        self.check()
        self.unmask()
        return self.coordinator.results()

    def expected_sum(self, block: str, contributors: tuple[str, ...]) -> np.ndarray:
        """Exact weighted sum of the quantised clipped updates (independent of the library)."""
        scale = 2.0**self.params.scale_bits
        total = np.zeros(self.sizes[block], dtype=np.float64)
        for site in contributors:
            contribution = self.contributions[site]
            clipped = np.clip(contribution.blocks[block].astype(np.float64), -self.params.clip, self.params.clip)
            total += contribution.weight * np.rint(clipped * scale)
        return total / scale
