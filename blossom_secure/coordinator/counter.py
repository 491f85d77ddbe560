"""The coordinator's round counter: one identity per round over the life of a federation.

A round is named by the federation's id and a round number that only increases, across
every run and restart of the coordinator. The counter is a small file in the coordinator's
output folder, ``coordinator-state.json``::

    {"format": 1, "federation": "blossom-demo", "next_round": 7}

``next_round`` is the first round number the coordinator has not yet announced. It is
written durably (:func:`blossom_secure._fs.atomic_write`) *before* the rounds it covers are
announced, so a crash or an interrupt can leave a gap in the numbering but never reuse a
number. Both runtimes use it: ``blossom coordinator serve`` (deployment) and
``blossom simulate`` (embedded).

Sites do not trust the counter: each refuses a round number its own verified audit log
shows it already answered (:mod:`blossom_secure.site.round_identity`).

This module imports neither torch nor a network library.
"""

from __future__ import annotations

import json
from pathlib import Path

from blossom_secure._fs import atomic_write
from blossom_secure.errors import InputError, Problem

__all__ = ["COORDINATOR_STATE_FILE", "RoundCounterError", "read_next_round", "write_next_round"]

#: The coordinator's round counter, in its output folder.
COORDINATOR_STATE_FILE = "coordinator-state.json"
#: Version of the counter file.
COUNTER_FORMAT = 1
_MAX_COUNTER_BYTES = 4096
#: The largest round number (an exact integer in every JSON reader; see the audit log).
MAX_ROUND_ID = 2**53 - 1


class RoundCounterError(InputError):
    """The coordinator's round counter cannot be read, belongs to another federation, or
    falls behind the rounds a site has already answered."""


def read_next_round(path: Path, federation_id: str) -> int:
    """The first round number a coordinator may announce (0 for a new federation).

    Args:
        path: The counter file (:data:`COORDINATOR_STATE_FILE` in the output folder).
        federation_id: The federation the coordinator runs; the counter must be its own.

    Returns:
        ``next_round`` from the file, or 0 if the file does not exist.

    Raises:
        RoundCounterError: the file cannot be read, is not a counter of this format, is for
            another federation, or holds an impossible number.
    """
    path = Path(path)
    where = str(path)
    if not path.exists():
        return 0
    if not path.is_file():
        raise RoundCounterError([Problem(where, "", "is not a file (the coordinator's round counter)")])
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_COUNTER_BYTES + 1)
    except OSError as exc:
        raise RoundCounterError([Problem(where, "", f"cannot read the coordinator's round counter: "
                                                    f"{exc.strerror or exc}")]) from None
    if len(raw) > _MAX_COUNTER_BYTES:
        raise RoundCounterError([Problem(where, "", "not a coordinator round counter (too long)")])
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RoundCounterError([Problem(where, "", "cannot read the coordinator's round counter: not JSON")]) from None
    if not isinstance(doc, dict) or set(doc) != {"format", "federation", "next_round"} \
            or doc["format"] != COUNTER_FORMAT:
        raise RoundCounterError([Problem(where, "", f"not a coordinator round counter (format {COUNTER_FORMAT})")])
    if doc["federation"] != federation_id:
        raise RoundCounterError([Problem(where, "federation", f"the round counter is for federation "
                                                              f"{doc['federation']!r}, not {federation_id!r}")])
    next_round = doc["next_round"]
    if isinstance(next_round, bool) or not isinstance(next_round, int) or not 0 <= next_round <= MAX_ROUND_ID:
        raise RoundCounterError([Problem(where, "next_round", "must be a non-negative integer")])
    return next_round


def write_next_round(path: Path, federation_id: str, next_round: int) -> None:
    """Record durably that round numbers below ``next_round`` are used.

    Raises:
        ValueError: ``next_round`` is not an integer in ``0..2**53 - 1``.
        RoundCounterError: the file cannot be written (nothing was changed).
    """
    if isinstance(next_round, bool) or not isinstance(next_round, int) or not 0 <= next_round <= MAX_ROUND_ID:
        raise ValueError("next_round must be an integer in 0..2**53 - 1")
    data = json.dumps({"format": COUNTER_FORMAT, "federation": federation_id, "next_round": next_round}).encode()
    try:
        atomic_write(Path(path), data + b"\n", mode=0o600)
    except OSError as exc:
        raise RoundCounterError([Problem(str(path), "", f"cannot write the coordinator's round counter: "
                                                        f"{exc.strerror or exc}")]) from None
