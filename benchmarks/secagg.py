"""Secure-aggregation benchmark: client masking against a fair floor, collect, unmask.

Run ``python benchmarks/secagg.py --json`` to print one JSON object measured in one run on
this machine (``--quick`` shrinks the vector for CI). Timings are in milliseconds, the
best of several runs; each measured function is interleaved with its floor (or with its
twin) run by run, so that load from elsewhere on the machine hits both alike and the
ratios stay meaningful on a busy machine even when the absolute times do not.

* ``client_masking``: one site masking one block of ``d`` float32 values with ``k``
  neighbours: quantisation, the X25519 agreements, the HKDF derivations and ``k + 1``
  keystreams (:func:`blossom_secure.secagg.site.mask_block`). ``floor_ms`` is the
  fair floor: ``k + 1`` AES-256-CTR keystreams written chunk by chunk (the chunk size
  the library uses, :data:`~blossom_secure.secagg.masking.CHUNK_BYTES`) into one
  preallocated buffer and added in place into a preallocated uint32 vector of ``d + 1``
  elements: the keystream work alone, with no quantisation, key agreement or
  derivation. ``ratio`` is ``ms / floor_ms`` (both bests); ``ratio_median`` is the
  median of the run-by-run ratios.
* ``server``: a real round of ``n`` sites, one block, a fraction ``dropout`` of them gone
  after sharing keys (the costly case: their pairwise masks must be rebuilt), replayed
  into fresh coordinators from the same messages. ``collect_ms`` is the masked-input
  stage: verifying, decoding and summing every masked input; ``collect_floor_ms`` is its
  floor, SHA-256 over each message (what its signature covers) and a uint32 add of its
  vector into a preallocated sum. ``unmask_ms`` is the unmask
  stage in one process: accepting every unmask response, rebuilding the secrets,
  removing the masks and dequantising; ``unmask_pool_ms`` is the same with the masks
  shared between this process and a process pool (``unmask_executor``, one part per
  core). ``keystreams`` is the number of masks the coordinator regenerates (one self
  mask per contributor, one pairwise mask per dropped site and contributor) and
  ``floor_ms`` that many times the per-keystream floor measured alongside.
* ``expansion``: bytes of a site's signed masked-input message over ``4 * d``.

The targets are for ``d = 1,000,000``; with ``--quick`` the fixed per-neighbour costs
(X25519, HKDF) dominate the tiny vector, so its ratios mean nothing beyond "it runs".
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
from blossom_secure.secagg.masking import CHUNK_BYTES
from blossom_secure.secagg.site import mask_block

FEDERATION = "bench-fed"
FEDERATION_SHA256 = hashlib.sha256(b"bench-fed federation file").digest()
BLOCK = "encoder.image"

#: A clip that is not a float32 value: quantisation takes its slowest path, so the
#: timings are the worst case.
PARAMS = SecAggParams(max_group_size=128, clip=0.1)


def _interleaved(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Run each function once to warm up, then ``repeats`` times each, interleaved (the
    order rotating from run to run); the seconds of every run, by name."""
    for function in functions.values():
        function()
    names = list(functions)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for run in range(repeats):
        for name in names[run % len(names) :] + names[: run % len(names)]:
            start = time.perf_counter()
            functions[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def _update(d: int, seed: int) -> np.ndarray:
    # Benchmark data only (not secret): a deterministic generator is fine here.
    return (np.random.default_rng(seed).standard_normal(d) * 0.01).astype(np.float32)


def keystream_floor(d: int, streams: int) -> Callable[[], None]:
    """The fair floor of masking ``d + 1`` uint32 with ``streams`` masks: for each chunk of
    ``CHUNK_BYTES``, each stream's AES-256-CTR keystream written into one preallocated
    buffer (``update_into``) and added in place; the vector is preallocated too."""
    count = d + 1
    chunk = CHUNK_BYTES // 4
    zeros = memoryview(bytearray(CHUNK_BYTES))
    out = bytearray(CHUNK_BYTES + crypto.AES_BLOCK_BYTES)
    keystream = np.frombuffer(out, dtype=np.uint32, count=chunk)
    vector = np.zeros(count, dtype=np.uint32)
    keys = [os.urandom(32) for _ in range(streams)]

    def run() -> None:
        writers = [crypto.aes256_ctr_keystream_writer(key) for key in keys]
        for start in range(0, count, chunk):
            part = vector[start : start + chunk]
            size = part.shape[0]
            plain = zeros if size == chunk else zeros[: 4 * size]
            stream = keystream if size == chunk else keystream[:size]
            for write in writers:
                write(plain, out)
                np.add(part, stream, out=part)

    return run


def collect_floor(messages: list[bytes], d: int) -> Callable[[], None]:
    """The floor of collecting masked inputs: SHA-256 of each whole message (what its
    signature covers) and a uint32 add of its vector into a preallocated sum."""
    total = np.zeros(d + 1, dtype=np.uint32)
    size = 4 * (d + 1)
    # The vector is the last field before the signature trailer (tag and 64 bytes).
    vectors = [np.frombuffer(m, dtype=np.uint32, count=d + 1, offset=len(m) - 65 - size) for m in messages]

    def run() -> None:
        for message, vector in zip(messages, vectors, strict=True):
            hashlib.sha256(message).digest()
            np.add(total, vector, out=total)

    return run


def client_masking(d: int, ks: list[int], repeats: int) -> list[dict]:
    update = _update(d, 0)
    rows = []
    for k in ks:
        private_key, _ = crypto.generate_x25519_key_pair()
        peers = {f"peer-{i:03d}": crypto.generate_x25519_key_pair()[1] for i in range(k)}
        measured = functools.partial(
            mask_block,
            update,
            weight=7,
            params=PARAMS,
            federation_id=FEDERATION,
            round_id=1,
            block=BLOCK,
            site_id="peer-050x",
            seed=os.urandom(32),
            mask_private_key=private_key,
            peer_mask_public_keys=peers,
        )
        samples = _interleaved({"masking": measured, "floor": keystream_floor(d, k + 1)}, repeats)
        ms, floor = min(samples["masking"]) * 1e3, min(samples["floor"]) * 1e3
        paired = [m / f for m, f in zip(samples["masking"], samples["floor"], strict=True)]
        rows.append(
            {
                "k": k,
                "ms": round(ms, 2),
                "floor_ms": round(floor, 2),
                "ratio": round(ms / floor, 3),
                "ratio_median": round(statistics.median(paired), 3),
            }
        )
    return rows


def _federation(n: int) -> tuple[dict, dict]:
    keys = {f"site-{i:03d}": crypto.generate_identity_key() for i in range(n)}
    return keys, {site: crypto.identity_public_key(key) for site, key in keys.items()}


@dataclasses.dataclass
class _Round:
    """Every site message of one round, by stage, to replay into fresh coordinators."""

    common: dict
    stages: list[list[bytes]]
    requests: list[dict[str, bytes]]
    contributors: int
    dropped: int
    upload_bytes: int


def record_round(d: int, n: int, dropout: float, params: SecAggParams) -> _Round:
    """One real round, a fraction ``dropout`` of the sites gone after sharing keys."""
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
    coordinator = CoordinatorStageMachine(**common)
    gone = set(sorted(sites)[: round(dropout * n)])
    stages: list[list[bytes]] = []
    requests: list[dict[str, bytes]] = []
    answers = {
        0: lambda site, request: sites[site].advertise_keys(),
        1: lambda site, request: sites[site].share_keys(request),
        2: lambda site, request: None if site in gone else sites[site].masked_input(request),
        3: lambda site, request: sites[site].consistency_check(request),
        4: lambda site, request: sites[site].unmask(request),
    }
    pending: dict[str, bytes | None] = dict.fromkeys(sites)
    for stage in range(5):
        messages = [m for m in (answers[stage](site, request) for site, request in pending.items()) if m is not None]
        for message in messages:
            coordinator.receive(message)
        stages.append(messages)
        pending = coordinator.close_stage()
        requests.append(pending)
    result = coordinator.results()[BLOCK]
    if result.failure is not None or result.weight_sum != 3 * (n - len(gone)):
        raise RuntimeError(f"benchmark round failed: {result.failure}")
    return _Round(common, stages, requests, n - len(gone), len(gone), len(stages[2][0]))


def replay(round_: _Round, **options: object) -> tuple[float, float, np.ndarray]:
    """The round's messages into a fresh coordinator; the seconds of the masked-input
    stage (collect) and of the unmask stage, and the sum."""
    coordinator = CoordinatorStageMachine(**round_.common, **options)
    seconds = []
    for stage, messages in enumerate(round_.stages):
        start = time.perf_counter()
        for message in messages:
            coordinator.receive(message)
        requests = coordinator.close_stage()
        seconds.append(time.perf_counter() - start)
        if requests != round_.requests[stage]:
            raise RuntimeError("the replayed coordinator diverged")
    result = coordinator.results()[BLOCK]
    if result.failure is not None:
        raise RuntimeError(f"replayed round failed: {result.failure}")
    return seconds[2], seconds[4], result.weighted_sum


def server(d: int, ns: list[int], dropouts: list[float], repeats: int) -> list[dict]:
    rows = []
    cores = os.cpu_count() or 2
    with ProcessPoolExecutor(max_workers=max(1, cores - 1)) as executor:
        executor.submit(int).result()  # start the workers before timing
        for n in ns:
            # max_sites = n, default threshold floor(2n/3) + 1: tolerates the 30% dropouts
            # (the scale stays the one resolved for 128 sites, safe for fewer).
            round_params = dataclasses.replace(PARAMS, max_group_size=n, threshold=None)
            for dropout in dropouts:
                rows.append(_server_row(d, n, dropout, round_params, executor, cores, repeats))
    return rows


def _server_row(
    d: int, n: int, dropout: float, params: SecAggParams, executor: Executor, cores: int, repeats: int
) -> dict:
    round_ = record_round(d, n, dropout, params)
    runs: dict[str, list[tuple[float, float, np.ndarray]]] = {"serial": [], "pool": []}
    floor_streams = 16
    samples = _interleaved(
        {
            "serial": lambda: runs["serial"].append(replay(round_)),
            "pool": lambda: runs["pool"].append(replay(round_, unmask_executor=executor, unmask_parts=cores)),
            "floor": keystream_floor(d, floor_streams),
            "collect_floor": collect_floor(round_.stages[2], d),
        },
        repeats,
    )
    del samples["serial"], samples["pool"]  # whole replays; the stages are timed inside
    sums = [run[2] for kind in runs.values() for run in kind]
    if not all(np.array_equal(sums[0], other) for other in sums[1:]):
        raise RuntimeError("the replays disagree on the sum")
    keystreams = round_.contributors * (1 + round_.dropped)
    per_stream = min(samples["floor"]) / floor_streams
    collect = min(run[0] for kind in runs.values() for run in kind[1:])
    return {
        "n": n,
        "dropout": dropout,
        "collect_ms": round(collect * 1e3, 2),
        "collect_floor_ms": round(min(samples["collect_floor"]) * 1e3, 2),
        "unmask_ms": round(min(run[1] for run in runs["serial"][1:]) * 1e3, 2),
        "unmask_pool_ms": round(min(run[1] for run in runs["pool"][1:]) * 1e3, 2),
        "keystreams": keystreams,
        "floor_ms": round(keystreams * per_stream * 1e3, 2),
        "upload_bytes": round_.upload_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="d = 20,000 and fewer repeats (CI smoke run)")
    args = parser.parse_args(argv)
    d = 20_000 if args.quick else 1_000_000
    masking = client_masking(d, [10, 50, 100], 5 if args.quick else 15)
    rows = server(d, [10, 50] if args.quick else [10, 50, 100], [0.0, 0.1, 0.3], 2 if args.quick else 3)
    expansion = rows[-1]["upload_bytes"] / (4 * d)
    for row in rows:
        del row["upload_bytes"]
    report = {
        "d": d,
        "ring_bits": 32,
        "cipher": "AES-256-CTR",
        "chunk_bytes": CHUNK_BYTES,
        "clip": PARAMS.clip,
        "scale_bits": PARAMS.scale_bits,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "client_masking": masking,
        "server": rows,
        "expansion": round(expansion, 6),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for row in masking:
            print(
                f"client k={row['k']:>3}: {row['ms']:8.2f} ms  floor {row['floor_ms']:8.2f} ms  "
                f"ratio {row['ratio']:.3f} (median {row['ratio_median']:.3f})"
            )
        for row in rows:
            print(
                f"server n={row['n']:>3} dropout={row['dropout']:.1f}: collect {row['collect_ms']:8.2f} ms "
                f"(floor {row['collect_floor_ms']:.1f} ms), "
                f"unmask {row['unmask_ms']:8.2f} ms, with a pool {row['unmask_pool_ms']:8.2f} ms "
                f"({row['keystreams']} keystreams, floor {row['floor_ms']:.1f} ms)"
            )
        print(f"expansion: {expansion:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
