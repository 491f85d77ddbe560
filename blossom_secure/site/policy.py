"""A hospital's policy: what may leave the site, under which privacy terms.

A policy is a TOML file, data only. It declares

* ``[policy]``: the federation (and coordinators) the site may join;
* ``[sharing]``: which blocks are shareable, by exact name or ``encoder.*``-style pattern.
  Default deny: a block not listed stays. Task heads (``head.*``) can never be shared: a
  policy that tries is an error, not a silent omission;
* ``[privacy]``: the DP-SGD parameters (noise multiplier, or a target epsilon per round),
  clipping norm, delta, accountant and the site's total epsilon budget;
* ``[secure_aggregation]``: whether secure aggregation is required and the smallest group
  of contributors a shared block may be summed over;
* ``[reporting]`` (optional): whether the site's evaluation report (accuracy and macro-F1 on
  its held-out patients, the majority-class rate, the epsilon spent) may leave the site.
  Default deny: without ``metrics = true`` nothing but the protocol messages leaves.

Every problem in the file (unknown keys, wrong types, missing fields, impossible values)
is reported at once in one :class:`~blossom_secure.errors.PolicyError`. The policy's
SHA-256 over the exact file bytes is recorded in every audit record.

Example:
    >>> policy = load_policy(Path("policies/st-mary.toml"))   # doctest: +SKIP
    >>> policy.is_shareable("encoder.image")                   # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from blossom_secure._toml import Table, read_toml
from blossom_secure.blocks import is_head, is_valid_block_name, match_patterns
from blossom_secure.errors import PolicyError, Problem

__all__ = ["ACCOUNTANTS", "Policy", "PrivacyTerms", "load_policy", "parse_policy"]

#: Opacus accountants a policy may name. GDP is left out: Opacus warns it can underestimate.
ACCOUNTANTS = ("rdp", "prv")
POLICY_VERSION = 1
#: The largest ``[secure_aggregation] min_contributors`` (the protocol's group-size field).
MAX_MIN_CONTRIBUTORS = 65535


@dataclass(frozen=True)
class PrivacyTerms:
    """DP-SGD parameters and budget from a policy.

    Exactly one of ``noise_multiplier`` and ``target_epsilon_per_round`` is set.
    """

    accountant: str
    delta: float
    max_grad_norm: float
    epsilon_budget: float
    noise_multiplier: float | None
    target_epsilon_per_round: float | None


@dataclass(frozen=True)
class Policy:
    """A validated policy.

    Attributes:
        path: The file it came from.
        sha256: Hex SHA-256 of the file's exact bytes.
        federation: The federation id the site may join.
        coordinators: Coordinator ids or addresses the site may connect to.
        shareable: Exact block names and ``encoder.*``-style patterns that may leave.
        privacy: DP parameters and budget.
        secure_aggregation_required: Refuse rounds that would aggregate in plaintext.
        min_contributors: Never let a block leave into a group smaller than this.
        metrics_may_leave: Whether the site's evaluation report may be sent to the
            coordinator (``[reporting] metrics``; default ``False``).
    """

    path: Path
    sha256: str
    federation: str
    coordinators: tuple[str, ...]
    shareable: tuple[str, ...]
    privacy: PrivacyTerms
    secure_aggregation_required: bool
    min_contributors: int
    metrics_may_leave: bool = False

    def is_shareable(self, block: str) -> bool:
        """Whether ``block`` may leave the site under this policy (heads never may)."""
        return is_valid_block_name(block) and not is_head(block) and match_patterns(block, self.shareable)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file.

    Raises:
        PolicyError: every problem found in the file, each with file, key and reason.
    """
    path = Path(path)
    problems: list[Problem] = []
    data = read_toml(path, problems)
    if data is None:
        raise PolicyError(problems)
    return parse_policy(data, path=path, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def parse_policy(data: dict, *, path: Path, sha256: str) -> Policy:
    """Validate an already-parsed policy (``data`` from ``tomllib``). See :func:`load_policy`.

    Raises:
        PolicyError: every problem found.
    """
    problems: list[Problem] = []
    root = Table(str(path), "", data, problems)

    head = root.table("policy")
    federation = coordinators = None
    if head is not None:
        version = head.int("version", minimum=1)
        if version is not None and version != POLICY_VERSION:
            head.problem("version", f"unsupported policy version {version} (this release reads {POLICY_VERSION})")
        federation = head.str("federation")
        coordinators = head.str_list("coordinators")
        head.finish()

    sharing = root.table("sharing")
    shareable: list[str] | None = None
    if sharing is not None:
        shareable = sharing.str_list("shareable", non_empty=False)
        if shareable is not None:
            for entry in shareable:
                reason = _shareable_entry_problem(entry)
                if reason:
                    problems.append(Problem(str(path), "sharing.shareable", f"{entry!r}: {reason}"))
        sharing.finish()

    privacy = _parse_privacy(root.table("privacy"))

    secagg = root.table("secure_aggregation")
    required = min_contributors = None
    if secagg is not None:
        required = secagg.bool("required")
        # the upper bound is the secure-aggregation wire format's (a group size travels as
        # 16 bits); a policy above it is refused here, not when a round is already running
        min_contributors = secagg.int("min_contributors", minimum=2, maximum=MAX_MIN_CONTRIBUTORS)
        secagg.finish()

    reporting = root.table("reporting", required=False)
    metrics_may_leave = False
    if reporting is not None:
        metrics_may_leave = bool(reporting.bool("metrics", required=False, default=False))
        reporting.finish()

    root.finish()
    if problems:
        raise PolicyError(problems)
    return Policy(
        path=path,
        sha256=sha256,
        federation=federation,
        coordinators=tuple(coordinators),
        shareable=tuple(shareable),
        privacy=privacy,
        secure_aggregation_required=required,
        min_contributors=min_contributors,
        metrics_may_leave=metrics_may_leave,
    )


def _shareable_entry_problem(entry: str) -> str | None:
    """Why ``entry`` cannot be in ``sharing.shareable``, or ``None`` if it can.

    Notes:
        Wildcards are allowed only after ``encoder.`` so that whether a pattern can match a
        task head is decidable by reading it: ``*``, ``h*`` or ``*.x`` could match
        ``head.<task>`` and are refused rather than trusted to be filtered later.
    """
    if is_head(entry) or entry.startswith("head"):
        return "task heads never leave the site and cannot be declared shareable"
    if any(c in entry for c in "*?["):
        if not entry.startswith("encoder."):
            return "wildcards are allowed only after 'encoder.' (this pattern could match a task head)"
        return None
    if not is_valid_block_name(entry):
        return "not a block name (expected encoder.<modality>, fusion, or an encoder.* pattern)"
    return None


def _parse_privacy(table: Table | None) -> PrivacyTerms | None:
    if table is None:
        return None
    accountant = table.choice("accountant", ACCOUNTANTS, required=False, default="rdp")
    delta = table.float("delta", exclusive_minimum=0.0, exclusive_maximum=0.01)
    max_grad_norm = table.float("max_grad_norm", exclusive_minimum=0.0, maximum=1e3)
    budget = table.float("epsilon_budget", exclusive_minimum=0.0, maximum=100.0)
    noise = table.float("noise_multiplier", required=False, exclusive_minimum=0.0, maximum=100.0)
    target = table.float("target_epsilon_per_round", required=False, exclusive_minimum=0.0, maximum=100.0)
    given = [name for name in ("noise_multiplier", "target_epsilon_per_round") if name in table.data]
    if len(given) != 1:
        table.problem("noise_multiplier", "give exactly one of noise_multiplier and target_epsilon_per_round")
    if target is not None and budget is not None and target > budget:
        table.problem("target_epsilon_per_round", f"exceeds epsilon_budget ({target:g} > {budget:g})")
    table.finish()
    if None in (accountant, delta, max_grad_norm, budget) or len(given) != 1 or (noise is None and target is None):
        return None
    return PrivacyTerms(
        accountant=accountant,
        delta=delta,
        max_grad_norm=max_grad_norm,
        epsilon_budget=budget,
        noise_multiplier=noise,
        target_epsilon_per_round=target,
    )
