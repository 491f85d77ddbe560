"""The sites' training of a round, in parallel worker processes (the embedded runtime).

In the embedded runtime every site lives in one process. Its agent answers a round in three
steps (:meth:`~blossom_secure.site.agent.SiteAgent.begin_offer`, ``train``,
:meth:`~blossom_secure.site.agent.SiteAgent.complete_offer`): the first and the last touch
the site's ledger, audit log and keys and stay in the coordinator's process, one site after
the other; only the middle one, the training, runs in a :class:`TrainingPool` of worker
processes, one torch thread each, so that the sites of a round train at the same time.

A worker gets a copy of the site's model blocks, its training split and its
:class:`~blossom_secure.site.agent.TrainingTerms`, and sends back the training's result and
the trained blocks; it holds no key, ledger or audit log, and nothing it does is released
before the site's own agent takes the trained blocks back and its egress guard selects what
may leave. The training is the same function the agent runs in its own process
(:func:`~blossom_secure.site.agent.train_pending`): a seeded simulation gives the same
result either way (with one torch thread in both), and a round whose noise comes from the
OS CSPRNG draws it from the worker's.

The workers start from a fork server that has imported the training code once, so starting
them costs one import, not one per worker. Objects cross between the coordinator's process
and its own workers only (pickled by :mod:`multiprocessing`, never from the network).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blossom_secure._system import worker_context

__all__ = ["TrainingJob", "TrainingPool", "run_job", "train_all"]


@dataclass(frozen=True)
class TrainingJob:
    """One site's training of one round, as plain values.

    Attributes:
        federation_path: The federation file (the worker reads the model layout from it).
        federation_sha256: Its SHA-256 as the coordinator loaded it; a worker that reads
            another file refuses the job.
        modalities, tasks: The site's (they fix its model's blocks).
        blocks: Every block of the site's model before training (private ones included).
        data: The fields of the site's training split (:class:`~blossom_secure.site.training.SiteTensors`).
        terms: How to train (:class:`~blossom_secure.site.agent.TrainingTerms`).
    """

    federation_path: Path
    federation_sha256: str
    modalities: tuple[str, ...]
    tasks: tuple[str, ...]
    blocks: Mapping[str, np.ndarray]
    data: Mapping[str, Any]
    terms: Any


_FEDERATIONS: dict[Path, Any] = {}


def _worker_start() -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("blossom_secure").setLevel(logging.ERROR)


def run_job(job: TrainingJob) -> tuple[Any, dict[str, np.ndarray]]:
    """Train a copy of the site's model as ``job`` says (in a worker); returns the
    training's result and the trained blocks."""
    from blossom_secure.config import load_federation
    from blossom_secure.model import BlockModel
    from blossom_secure.site.agent import train_pending
    from blossom_secure.site.training import SiteTensors

    federation = _FEDERATIONS.get(job.federation_path)
    if federation is None:
        federation = _FEDERATIONS[job.federation_path] = load_federation(job.federation_path)
    if federation.sha256 != job.federation_sha256:
        raise RuntimeError(f"{job.federation_path} changed while the federation ran; the round's training stops")
    model = BlockModel(federation.layout, job.modalities, job.tasks)
    model.set_blocks(job.blocks)
    result = train_pending(model, SiteTensors(**job.data), job.terms)
    return result, model.get_blocks()


class TrainingPool:
    """Worker processes that train sites' rounds at the same time.

    Args:
        workers: How many (at least 2; one process is the agents' own ``train``).

    Raises:
        ValueError: ``workers`` is not an int of at least 2.
    """

    def __init__(self, workers: int) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 2:
            raise ValueError("a training pool needs at least 2 workers")
        context = worker_context(["blossom_secure.site.agent", "blossom_secure.runtimes.embedded.training_pool"])
        self._executor = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_start)

    def submit(self, job: TrainingJob) -> Future:
        """Start ``job``; the future's result is :func:`run_job`'s."""
        return self._executor.submit(run_job, job)

    def close(self) -> None:
        """Stop the workers (a job still running is waited for)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TrainingPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def train_all(agents: Mapping[str, Any], pending: Mapping[str, Any],
              pool: TrainingPool | None) -> dict[str, Any]:
    """Run the training of every joined site (``pending``: site id -> its
    :class:`~blossom_secure.site.agent.PendingTraining`), in ``pool`` or, without one, in
    this process one after the other. Returns site id -> the result, or the exception its
    training raised (every site's training is waited for before anything is returned).

    In a pool, a site's trained blocks are loaded into its agent's model on return, as its
    own ``train`` would have left them.
    """
    outcomes: dict[str, Any] = {}
    if pool is None or len(pending) < 2:
        for site, job in pending.items():
            try:
                outcomes[site] = agents[site].train(job)
            except Exception as exc:  # noqa: BLE001 - the site's agent records and raises it
                outcomes[site] = exc
        return outcomes
    futures = {site: pool.submit(_job_of(agents[site], job)) for site, job in pending.items()}
    for site, future in futures.items():
        try:
            result, blocks = future.result()
        except Exception as exc:  # noqa: BLE001 - the site's agent records and raises it
            outcomes[site] = exc
            continue
        agents[site].model.set_blocks(blocks)
        outcomes[site] = result
    return outcomes


def _job_of(agent: Any, pending: Any) -> TrainingJob:
    data = agent.tensors.subset(agent.train_idx)
    return TrainingJob(
        federation_path=Path(agent.federation.path), federation_sha256=agent.federation.sha256,
        modalities=tuple(agent.config.modalities), tasks=tuple(agent.config.tasks),
        blocks=agent.model.get_blocks(),
        # every field of the split; read-only mapping views (not picklable) as plain dicts
        data={f.name: dict(v) if isinstance(v, Mapping) else v
              for f in dataclasses.fields(data) for v in [getattr(data, f.name)]},
        terms=agent.training_terms(pending))
