"""Facts about the machine this process runs on."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from multiprocessing.context import BaseContext

__all__ = ["available_cores", "worker_context"]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def worker_context(preload: Sequence[str]) -> BaseContext:
    """How to start this program's own worker processes: from a fork server that has
    imported ``preload`` once (each worker then starts without importing them again), or
    spawned where the system has no fork server. Never forked from a process that may run
    threads."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context
