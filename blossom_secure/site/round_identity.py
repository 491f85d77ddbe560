"""A site refuses a round number it has already answered.

A round has one identity over the life of a federation: the federation id and a round
number that only increases (the coordinator's counter,
:mod:`blossom_secure.coordinator.counter`). The site does not trust the coordinator's
count: before it answers an announcement it reads its own **verified** audit log and
refuses any round number that does not come after every round the log shows it joined or
declined. So a coordinator that restarted its count, or replays an old announcement, can
never make the site spend budget under, or report for, a round number that already has a
history in the log; and every tool that reads the log (``budget``, ``audit review``, the
HTML report) sees one row per round.

Both runtimes use this check: the deployment's site steps
(:mod:`blossom_secure.site.steps`) and the site agent
(:meth:`blossom_secure.site.agent.SiteAgent.offer`) of the embedded runtime.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from blossom_secure.audit import log as audit
from blossom_secure.errors import ProtocolError

__all__ = ["ANSWER_EVENTS", "StaleRoundError", "check_round_is_new", "last_round_answered"]

#: The audit events that show a site answered a round announcement.
ANSWER_EVENTS = (audit.ROUND_JOINED, audit.ROUND_DECLINED)


class StaleRoundError(ProtocolError):
    """A round announcement for a round that does not come after every round this site's
    verified audit log shows it answered (a replay, or a coordinator that restarted its
    count: set its first round past the sites' last)."""

    def __init__(self, message: str, *, round_id: int, last_answered: int) -> None:
        super().__init__(message)
        self.round_id = round_id
        self.last_answered = last_answered


def last_round_answered(records: Iterable[Mapping[str, Any]]) -> int | None:
    """The last round the records show this site joined or declined, or ``None``.

    Args:
        records: The site's **verified** audit records (other events are skipped).
    """
    rounds = [r["round_id"] for r in records
              if r.get("event") in ANSWER_EVENTS and isinstance(r.get("round_id"), int)]
    return max(rounds) if rounds else None


def check_round_is_new(records: Iterable[Mapping[str, Any]], round_id: int, *, stage: str = "offer") -> None:
    """Refuse ``round_id`` unless it comes after every round the records show answered.

    Args:
        records: The site's verified audit records (at least its ``round_joined`` and
            ``round_declined`` ones).
        round_id: The round being announced.
        stage: Named in the message (the request being refused).

    Raises:
        StaleRoundError: ``round_id`` is not after the last round answered.
    """
    last = last_round_answered(records)
    if last is not None and round_id <= last:
        raise StaleRoundError(f"{stage}: round {round_id} does not come after round {last}, the last this site "
                              "answered", round_id=round_id, last_answered=last)
