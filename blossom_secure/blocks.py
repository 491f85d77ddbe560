"""Block names: the unit of sharing, aggregation, policy and audit.

Names are dotted and stable: ``encoder.<modality>``, ``fusion``, ``head.<task>``. This
module is pure (no torch) so that policy checks and the egress guard can use it anywhere.
"""

from __future__ import annotations

import fnmatch
import re

__all__ = [
    "FUSION",
    "MODALITIES",
    "encoder_block",
    "head_block",
    "is_head",
    "is_valid_block_name",
    "is_valid_modality_name",
    "is_valid_task_name",
    "match_patterns",
]

#: The built-in modalities (a federation may declare further tabular ones; see
#: :class:`blossom_secure.config.ModelLayout`).
MODALITIES: tuple[str, ...] = ("image", "tabular")
FUSION = "fusion"

_IDENT = r"[a-z][a-z0-9_]{0,47}"
_BLOCK_RE = re.compile(rf"encoder\.{_IDENT}|fusion|head\.{_IDENT}")
_TASK_RE = re.compile(_IDENT)


def is_valid_block_name(name: str) -> bool:
    """Whether ``name`` is a well-formed block name (``encoder.x``, ``fusion``, ``head.x``)."""
    return isinstance(name, str) and _BLOCK_RE.fullmatch(name) is not None


def is_valid_task_name(name: str) -> bool:
    """Whether ``name`` can name a task (lower-case identifier, at most 48 characters)."""
    return isinstance(name, str) and _TASK_RE.fullmatch(name) is not None


def is_valid_modality_name(name: str) -> bool:
    """Whether ``name`` can name a modality (and so an encoder block ``encoder.<name>``)."""
    return isinstance(name, str) and _TASK_RE.fullmatch(name) is not None


def is_head(name: str) -> bool:
    """Whether ``name`` is a task head. Heads never leave a site."""
    return name == "head" or name.startswith("head.")


def encoder_block(modality: str) -> str:
    """The block name of the encoder for ``modality``."""
    return f"encoder.{modality}"


def head_block(task: str) -> str:
    """The block name of the head for ``task``."""
    return f"head.{task}"


def match_patterns(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether ``name`` matches one of the shell-style ``patterns`` (``encoder.*``).

    Matching is case-sensitive and whole-name (``fnmatchcase``).
    """
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
