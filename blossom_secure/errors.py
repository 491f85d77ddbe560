"""The exception hierarchy of blossom_secure.

Errors are grouped by who is at fault, so that callers (and the CLI) can react to the
cause rather than to the place where it surfaced:

* the operator's files (policy, site file, federation file, data): :class:`InputError`
  and its subclasses, each carrying the *full* list of problems found, every one naming
  the file, the key or field, and the reason;
* a peer (another site, the coordinator): :class:`ProtocolError` and its subclasses;
  every failure to verify a signature or decrypt a ciphertext is the single opaque
  :class:`AuthenticationError`, which says nothing about which check failed;
* the privacy budget: :class:`PrivacyBudgetExceededError`;
* a tampered audit log: :class:`AuditIntegrityError`, naming the first bad record.

Caller misuse (a wrong type or value passed to a function) raises the built-in
``TypeError`` / ``ValueError``.

An exception means nothing changed: functions validate fully before they mutate state
or write files.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AuditIntegrityError",
    "AuthenticationError",
    "BlossomError",
    "DataError",
    "InputError",
    "PolicyError",
    "PrivacyBudgetExceededError",
    "Problem",
    "ProtocolError",
]


class BlossomError(Exception):
    """Base class of every error this library raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One problem found in an operator's file.

    Attributes:
        file: The file (or folder) the problem is in, as the operator named it.
        key: The key, field, column or record that is wrong (``""`` for the whole file).
        reason: What is wrong, in words an operator can act on.
    """

    file: str
    key: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.reason}"


class InputError(BlossomError):
    """An operator's file is invalid. Carries every problem found, not just the first.

    Args:
        problems: The problems, in the order found. Must not be empty.
    """

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        problems = tuple(problems)
        if not problems:
            raise ValueError("an InputError needs at least one problem")
        self.problems: tuple[Problem, ...] = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} {noun}:\n" + "\n".join(f"  {p}" for p in problems))


class PolicyError(InputError):
    """A policy, site or federation file is invalid (unknown keys, wrong types, missing
    fields, impossible values, a head declared shareable, ...)."""


class DataError(InputError):
    """A site's data (DICOM studies, clinical CSV) cannot be used as declared."""


class ProtocolError(BlossomError):
    """A peer sent something the protocol does not allow (wrong stage, replay, wrong
    federation or round, malformed or oversized message, ...)."""


class AuthenticationError(ProtocolError):
    """A signature did not verify or a ciphertext did not decrypt.

    Deliberately opaque: it never says which check failed, so it cannot be used as an
    oracle.
    """

    def __init__(self, message: str = "authentication failed") -> None:
        super().__init__(message)


class PrivacyBudgetExceededError(BlossomError):
    """Spending the requested privacy would take a site past its epsilon budget.

    Attributes:
        epsilon_spent: Epsilon already spent.
        epsilon_requested: Total epsilon after the refused spend.
        epsilon_budget: The budget from the policy.
    """

    def __init__(self, *, epsilon_spent: float, epsilon_requested: float, epsilon_budget: float) -> None:
        self.epsilon_spent = epsilon_spent
        self.epsilon_requested = epsilon_requested
        self.epsilon_budget = epsilon_budget
        super().__init__(
            f"privacy budget exceeded: this round would bring epsilon to {epsilon_requested:.3f}, "
            f"over the budget of {epsilon_budget:.3f} (spent so far {epsilon_spent:.3f})"
        )


class AuditIntegrityError(BlossomError):
    """The audit log is not intact.

    Attributes:
        line: 1-based line number of the first bad record in the log file.
        seq: Its sequence number if it could be read, else ``None``.
        reason: What is wrong with it.
    """

    def __init__(self, *, line: int, seq: int | None, reason: str) -> None:
        self.line = line
        self.seq = seq
        self.reason = reason
        at = f"line {line}" + (f" (seq {seq})" if seq is not None else "")
        super().__init__(f"audit log broken at {at}: {reason}")
