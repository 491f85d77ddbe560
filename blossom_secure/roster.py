"""The federation roster file: which site ids exist and their Ed25519 identity public keys.

The roster is distributed out of band with the federation file (DESIGN.md, "Roles and
trust"): every site verifies its peers' key advertisements against it, and the
coordinator learns who answered a request only from the roster key that verifies the
reply (never from a transport's node id). It is a TOML file, data only::

    [roster]
    federation = "blossom-demo"

    [roster.sites]
    "st-mary" = "3b6a27bc...64 hex digits..."   # raw Ed25519 public key, lower-case hex

    [roster.node_keys]                          # optional: Flower SuperNode authentication
    "st-mary" = "ecdsa-sha2-nistp384 AAAA..."   # the site's SuperNode key (OpenSSH line)

``[roster.node_keys]`` is optional; when present it lists every site of ``[roster.sites]``
and the coordinator runs its SuperLink with SuperNode authentication, registering exactly
these keys: a SuperNode whose key is not listed cannot connect. The node keys authenticate
the transport only; who takes part in a round is still decided by the identity keys.

Every problem is reported at once in one :class:`~blossom_secure.errors.PolicyError`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from blossom_secure._fs import atomic_write
from blossom_secure._toml import read_root_table
from blossom_secure.config import FederationConfig
from blossom_secure.crypto import ED25519_PUBLIC_KEY_BYTES, node_auth_public_pem
from blossom_secure.errors import PolicyError, Problem

__all__ = ["ROSTER_FILE", "load_node_keys", "load_roster", "roster_path", "write_roster"]

logger = logging.getLogger(__name__)

#: The roster's file name beside the federation file, unless another path is given.
ROSTER_FILE = "roster.toml"

_SITE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # as in blossom_secure.config
_KEY_RE = re.compile(r"[0-9a-f]{64}")


def roster_path(federation: FederationConfig, roster_file: Path | None = None) -> Path:
    """``roster_file``, or ``roster.toml`` beside the federation file."""
    return Path(roster_file) if roster_file is not None else Path(federation.path).parent / ROSTER_FILE


def load_roster(path: Path, *, federation: FederationConfig | None) -> Mapping[str, bytes]:
    """Read and check a roster file for ``federation``.

    Args:
        path: The roster file.
        federation: The federation it must belong to; ``None`` only for a reader who holds
            the roster but not the federation file (an auditor verifying an audit log
            with a site's public key): the federation id and ``max_sites`` are then not
            checked.

    Returns:
        Site id to raw 32-byte Ed25519 public key, sorted by site id (read-only).

    Raises:
        PolicyError: every problem found: unreadable file, unknown keys, another
            federation, a malformed site id or key, one key for two sites, fewer than two
            sites, or more than the federation's ``max_sites``.

    Notes:
        The roster is a trust anchor: a key in it is what a site's messages are checked
        against, so a key listed twice (two sites that are one) is refused rather than
        tolerated, and so is a roster larger than ``max_sites``, the bound the Shamir
        thresholds are a majority of (Bonawitz et al. 2017, section 4).
    """
    return _read(path, federation)[0]


def load_node_keys(path: Path, *, federation: FederationConfig) -> Mapping[str, str]:
    """The roster's ``[roster.node_keys]``: site id to its SuperNode key's OpenSSH public
    line, sorted (read-only); empty when the table is absent.

    Raises:
        PolicyError: every problem of the roster (as :func:`load_roster`), a node key that is
            not an EC P-384 OpenSSH public key, one key for two sites, a site that is not
            in ``[roster.sites]``, or a roster site without a node key.
    """
    return _read(path, federation)[1]


def _read(path: Path, federation: FederationConfig) -> tuple[Mapping[str, bytes], Mapping[str, str]]:
    path = Path(path)
    root = read_root_table(path)
    problems = root.problems
    table = root.table("roster")
    keys: dict[str, bytes] = {}
    node_keys: dict[str, str] = {}
    sites = None
    if table is not None:
        fid = table.str("federation")
        if fid is not None and federation is not None and fid != federation.id:
            table.problem("federation", f"the roster is for federation {fid!r}, not {federation.id!r}")
        sites = table.table("sites")
        if sites is not None:
            seen: dict[str, str] = {}
            for site_id in sorted(sites.data):
                if not _SITE_ID_RE.fullmatch(site_id):
                    sites.problem(site_id, "not a site id (lower-case letters, digits, '-' or '_')")
                    sites.mark_seen(site_id)
                    continue
                value = sites.str(site_id)
                if value is None:
                    continue
                elif not _KEY_RE.fullmatch(value):
                    sites.problem(site_id, f"must be the raw Ed25519 public key as {2 * ED25519_PUBLIC_KEY_BYTES} "
                                           "lower-case hex digits")
                elif value in seen:
                    sites.problem(site_id, f"has the same key as {seen[value]!r}")
                else:
                    seen[value] = site_id
                    keys[site_id] = bytes.fromhex(value)
            if len(sites.data) < 2:
                problems.append(Problem(sites.file, sites.prefix, "list at least two sites"))
            max_sites = None if federation is None else federation.aggregation.max_sites
            if max_sites is not None and len(sites.data) > max_sites:
                problems.append(Problem(sites.file, sites.prefix, f"lists {len(sites.data)} sites, more than the "
                                                                  f"federation's max_sites ({max_sites})"))
            sites.finish()
        node_table = table.table("node_keys", required=False)
        if node_table is not None and sites is not None:
            node_keys = _node_keys(node_table, set(sites.data))
        table.finish()
    root.finish()
    if problems:
        raise PolicyError(problems)
    return MappingProxyType(dict(sorted(keys.items()))), MappingProxyType(dict(sorted(node_keys.items())))


def _node_keys(table, site_ids: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    seen: dict[str, str] = {}
    for site_id in sorted(table.data):
        value = table.str(site_id)
        if site_id not in site_ids:
            table.problem(site_id, "is not a site of [roster.sites]")
        elif value is None:
            continue
        elif value in seen:
            table.problem(site_id, f"has the same node key as {seen[value]!r}")
        else:
            try:
                node_auth_public_pem(value)
            except ValueError as exc:
                table.problem(site_id, str(exc))
                continue
            seen[value] = site_id
            found[site_id] = value
    for site_id in sorted(site_ids - set(table.data)):
        table.problem(site_id, "has no node key: list every roster site, or drop [roster.node_keys]")
    table.finish()
    return found


def write_roster(path: Path, *, federation: FederationConfig, keys: Mapping[str, bytes],
                 node_keys: Mapping[str, str] | None = None) -> Path:
    """Write a roster file (mode 0644, atomically), for a local trial or a test.

    Raises:
        ValueError: a malformed site id or key.
    """
    lines = ["# The federation roster: site ids and Ed25519 identity public keys (distributed out of band).",
             "[roster]", f'federation = "{federation.id}"', "", "[roster.sites]"]
    for site_id in sorted(keys):
        key = keys[site_id]
        if not _SITE_ID_RE.fullmatch(site_id):
            raise ValueError(f"{site_id!r} is not a site id")
        if not isinstance(key, bytes) or len(key) != ED25519_PUBLIC_KEY_BYTES:
            raise ValueError(f"{site_id}: a key is {ED25519_PUBLIC_KEY_BYTES} raw bytes")
        lines.append(f'"{site_id}" = "{key.hex()}"')
    if node_keys:
        lines += ["", "[roster.node_keys]"]
        for site_id in sorted(node_keys):
            node_auth_public_pem(node_keys[site_id])  # ValueError if malformed
            lines.append(f'"{site_id}" = "{node_keys[site_id]}"')
    atomic_write(Path(path), ("\n".join(lines) + "\n").encode("ascii"), mode=0o644)
    logger.info("wrote the roster of %d sites to %s", len(keys), path)
    return Path(path)
