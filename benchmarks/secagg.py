"""Secure-aggregation benchmark: client masking, server unmasking, upload expansion.

Run ``python benchmarks/secagg.py --json`` to print one JSON object measured in one run on
this machine (``--quick`` shrinks the vector for CI). All timings are medians of repeated
runs, in milliseconds, of the same code the stage machines run:

* ``client_masking``: one site masking one block of ``d`` float32 values with ``k``
  neighbours: quantisation, the X25519 agreements, the HKDF derivations and ``k + 1``
  keystreams (:func:`blossom_secure.secagg.site.mask_block`). ``floor_ms`` is ``(k + 1)``
  times the cost of writing one AES-256-CTR keystream of the vector into a preallocated
  buffer and adding it in place (uint32), measured in the same run.
* ``server_unmask``: a real round of ``n`` sites, one block, a fraction ``dropout`` of
  them gone after sharing keys (the costly case: their pairwise masks must be rebuilt);
  ``ms`` is the coordinator's unmask stage: accepting every unmask response, rebuilding
  the secrets, removing the masks and dequantising, in one process. ``ms_process_pool``
  is the same stage, from the same messages, with mask removal split across this process
  and a process pool (``unmask_executor``). ``collect_ms`` (for information) is the
  masked-input stage: verifying and summing every masked vector.
* ``expansion``: bytes of a site's signed masked-input message over ``4 * d``.

The targets (ratio <= 1.5, unmask times) are for ``d = 1,000,000``; with ``--quick`` the
fixed per-neighbour costs (X25519, HKDF) dominate the tiny vector, so its ratios mean
nothing beyond "it runs". The machine should be otherwise idle while this runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor

import numpy as np

from blossom_secure import crypto
from blossom_secure.secagg import (
    CoordinatorStageMachine,
    SecAggParams,
    SiteContribution,
    SiteStageMachine,
)
from blossom_secure.secagg.site import mask_block

FEDERATION = "bench-fed"
FEDERATION_SHA256 = hashlib.sha256(b"bench-fed federation file").digest()
BLOCK = "encoder.image"


def _median_ms(function: Callable[[], object], repeats: int) -> float:
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def _update(d: int, seed: int) -> np.ndarray:
    # Benchmark data only (not secret): a deterministic generator is fine here.
    return (np.random.default_rng(seed).standard_normal(d) * 0.01).astype(np.float32)


def keystream_floor_ms(d: int, repeats: int) -> float:
    """One AES-256-CTR keystream of ``d + 1`` uint32 into a preallocated buffer, plus an
    in-place uint32 add."""
    size = 4 * (d + 1)
    zeros = bytearray(size)
    out = bytearray(size + 16)
    stream = np.frombuffer(out, dtype=np.uint32, count=d + 1)
    accumulator = np.zeros(d + 1, dtype=np.uint32)
    key = os.urandom(32)

    def one() -> None:
        crypto.aes256_ctr_keystream_writer(key)(zeros, out)
        np.add(accumulator, stream, out=accumulator)

    return _median_ms(one, repeats)


#: A clip that is not a float32 value: quantisation takes its slowest path (an extra
#: integer clipping pass), so the timings are the worst case.
PARAMS = SecAggParams(max_group_size=128, clip=0.1)


def client_masking(d: int, ks: list[int], repeats: int) -> list[dict]:
    params = PARAMS
    update = _update(d, 0)
    rows = []
    for k in ks:
        private_key, _ = crypto.generate_x25519_key_pair()
        peers = {f"peer-{i:03d}": crypto.generate_x25519_key_pair()[1] for i in range(k)}
        seed = os.urandom(32)

        run = functools.partial(
            mask_block,
            update,
            weight=7,
            params=params,
            federation_id=FEDERATION,
            round_id=1,
            block=BLOCK,
            site_id="peer-050x",
            seed=seed,
            mask_private_key=private_key,
            peer_mask_public_keys=peers,
        )
        ms = _median_ms(run, repeats)
        floor = (k + 1) * keystream_floor_ms(d, max(repeats, 9))
        rows.append({"k": k, "ms": round(ms, 2), "floor_ms": round(floor, 2), "ratio": round(ms / floor, 3)})
    return rows


def _federation(n: int) -> tuple[dict, dict]:
    keys = {f"site-{i:03d}": crypto.generate_identity_key() for i in range(n)}
    return keys, {site: crypto.identity_public_key(key) for site, key in keys.items()}


def server_round(d: int, n: int, dropout: float, params: SecAggParams, executor: Executor) -> dict:
    """One real round, unmasked twice from the same messages: in this process, and split
    with a process pool. Returns the timings and the upload size."""
    keys, roster = _federation(n)
    sizes = {BLOCK: d}
    update = _update(d, 1)
    sites = {
        site: SiteStageMachine(
            site_id=site,
            federation_id=FEDERATION,
            federation_sha256=FEDERATION_SHA256,
            round_id=1,
            roster=roster,
            identity_key=key,
            block_sizes=sizes,
            params=params,
            contribution=SiteContribution(blocks={BLOCK: update}, weight=3),
        )
        for site, key in keys.items()
    }
    common = dict(
        federation_id=FEDERATION,
        federation_sha256=FEDERATION_SHA256,
        round_id=1,
        roster=roster,
        block_sizes=sizes,
        params=params,
    )
    serial = CoordinatorStageMachine(**common)
    pooled = CoordinatorStageMachine(**common, unmask_executor=executor, unmask_slices=os.cpu_count() or 2)
    coordinators = (serial, pooled)

    def deliver(messages: list[bytes]) -> dict[str, bytes]:
        for message in messages:
            for coordinator in coordinators:
                coordinator.receive(message)
        requests = [coordinator.close_stage() for coordinator in coordinators]
        if requests[0] != requests[1]:
            raise RuntimeError("the two coordinators diverged")
        return requests[0]

    requests = deliver([machine.advertise_keys() for machine in sites.values()])
    requests = deliver([sites[site].share_keys(request) for site, request in requests.items()])
    gone = set(sorted(sites)[: round(dropout * n)])
    collect_s, upload, masked = 0.0, 0, []
    for site, request in requests.items():
        if site not in gone:
            message = sites[site].masked_input(request)
            upload = len(message)
            start = time.perf_counter()
            serial.receive(message)
            collect_s += time.perf_counter() - start
            masked.append(message)
    for message in masked:
        pooled.receive(message)
    requests = serial.close_stage()
    pooled.close_stage()
    requests = deliver([sites[site].consistency_check(request) for site, request in requests.items()])
    responses = [sites[site].unmask(request) for site, request in requests.items()]
    timings = []
    for coordinator in coordinators:
        start = time.perf_counter()
        for response in responses:
            coordinator.receive(response)
        coordinator.close_stage()
        timings.append(time.perf_counter() - start)
        result = coordinator.results()[BLOCK]
        if result.failure is not None or result.weight_sum != 3 * (n - len(gone)):
            raise RuntimeError(f"benchmark round failed: {result.failure}")
    if not np.array_equal(serial.results()[BLOCK].weighted_sum, pooled.results()[BLOCK].weighted_sum):
        raise RuntimeError("serial and pooled unmasking disagree")
    return {
        "unmask_ms": timings[0] * 1e3,
        "unmask_processes_ms": timings[1] * 1e3,
        "collect_ms": collect_s * 1e3,
        "upload_bytes": upload,
    }


def server_unmask(d: int, ns: list[int], dropouts: list[float]) -> tuple[list[dict], float]:
    params = PARAMS
    rows = []
    expansion = 0.0
    with ProcessPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1)) as executor:
        executor.submit(int).result()  # start the worker before timing
        for n in ns:
            # max_sites = n, default threshold floor(2n/3) + 1: tolerates the 30% dropouts
            # (the scale stays the one resolved for 128 sites, safe for fewer).
            round_params = dataclasses.replace(params, max_group_size=n, threshold=None)
            for dropout in dropouts:
                run = server_round(d, n, dropout, round_params, executor)
                rows.append(
                    {
                        "n": n,
                        "dropout": dropout,
                        "ms": round(run["unmask_ms"], 2),
                        "ms_process_pool": round(run["unmask_processes_ms"], 2),
                        "collect_ms": round(run["collect_ms"], 2),
                    }
                )
                expansion = run["upload_bytes"] / (4 * d)
    return rows, expansion


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="d = 20,000 and fewer repeats (CI smoke run)")
    args = parser.parse_args(argv)
    d = 20_000 if args.quick else 1_000_000
    repeats = 3 if args.quick else 9
    masking = client_masking(d, [10, 50, 100], repeats)
    unmask, expansion = server_unmask(d, [10, 50, 100], [0.0, 0.1, 0.3])
    report = {
        "d": d,
        "ring_bits": 32,
        "cipher": "AES-256-CTR",
        "clip": PARAMS.clip,
        "scale_bits": PARAMS.scale_bits,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "client_masking": masking,
        "server_unmask": unmask,
        "expansion": round(expansion, 6),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for row in masking:
            k, ms, floor, ratio = row["k"], row["ms"], row["floor_ms"], row["ratio"]
            print(f"client k={k:>3}: {ms:8.2f} ms  floor {floor:8.2f} ms  ratio {ratio:.3f}")
        for row in unmask:
            n, dropout, ms, pooled, collect = (
                row["n"],
                row["dropout"],
                row["ms"],
                row["ms_process_pool"],
                row["collect_ms"],
            )
            label = f"server n={n:>3} dropout={dropout:.1f}"
            print(f"{label}: unmask {ms:9.2f} ms, pool {pooled:9.2f} ms (collect {collect:.1f} ms)")
        print(f"expansion: {expansion:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
