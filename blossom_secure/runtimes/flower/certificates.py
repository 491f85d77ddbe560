"""Test TLS certificates for a local trial of the Flower deployment engine.

``blossom dev certificates DIR`` makes a throwaway CA, a server certificate for the
SuperLink and one client certificate per site, and writes them as::

    DIR/ca.pem  DIR/ca.key              the test CA
    DIR/server.pem  DIR/server.key      the SuperLink (serverAuth)
    DIR/sites/<id>.pem  DIR/sites/<id>.key   each site (clientAuth)

For local trials only: the keys are unencrypted, and a real deployment uses the hospital's
and the coordinator's own PKI. Certificates are written with mode 0644 and keys with 0600,
each atomically (:func:`blossom_secure._fs.atomic_write`); the folders are set to 0700.

With Flower 1.42 the SuperLink takes ``--ssl-ca-certfile ca.pem --ssl-certfile server.pem
--ssl-keyfile server.key`` (its own helper processes dial it at ``127.0.0.1``, which the
server certificate always covers) and each SuperNode ``--root-certificates ca.pem``.
Flower's Fleet API does not ask for client certificates (it authenticates SuperNodes by
their registered EC keys instead); the site certificates serve a TLS proxy or server that
requires mutual TLS, and the tests.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blossom_secure._fs import atomic_write
from blossom_secure.crypto import (
    TLS_MAX_DAYS,
    TlsCertificateInfo,
    describe_tls_certificate,
    generate_tls_ca,
    issue_tls_certificate,
)

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEFAULT_DAYS",
    "DEFAULT_SERVER_NAMES",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "SITES_DIR",
    "DevCertificates",
    "IssuedCertificate",
    "site_identity_uri",
    "write_dev_certificates",
]

logger = logging.getLogger(__name__)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
SITES_DIR = "sites"
#: Names the server certificate always covers, so a SuperNode on the same machine connects.
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 30

_CA_COMMON_NAME = "blossom local-trial CA (not for production)"
_SERVER_COMMON_NAME = "blossom SuperLink (local trial)"
_SITE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # as in blossom_secure.config
_SITE_ID_RULE = "must be lower-case letters, digits, '-' or '_' (at most 63), starting with a letter or digit"
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_CERT_MODE = 0o644
_KEY_MODE = 0o600
_DIR_MODE = 0o700


@dataclass(frozen=True)
class IssuedCertificate:
    """One certificate written, with its key.

    Attributes:
        role: ``"ca"``, ``"server"`` or ``"site"``.
        name: ``"test CA"``, ``"SuperLink"`` or the site id.
        cert_path: Where the certificate (PEM) was written.
        key_path: Where its private key (unencrypted PKCS#8 PEM, mode 0600) was written.
        info: Names, validity and SHA-256 fingerprint, read back from the certificate.
    """

    role: str
    name: str
    cert_path: Path
    key_path: Path
    info: TlsCertificateInfo


@dataclass(frozen=True)
class DevCertificates:
    """What :func:`write_dev_certificates` wrote.

    Attributes:
        directory: The folder written to.
        certificates: The CA first, then the server, then each site in the order given.
        left_untouched: Files that were in the folder before and were not rewritten (only
            with ``force``); site certificates among them were issued by an earlier CA.
    """

    directory: Path
    certificates: tuple[IssuedCertificate, ...]
    left_untouched: tuple[Path, ...]


def site_identity_uri(site_id: str) -> str:
    """The URI a site's client certificate names in its subject alternative name.

    A site id may hold ``_``, which is not allowed in a host name, so the site's identity is
    a URI (``urn:blossom:site:<id>``), as in SPIFFE-style workload identities, rather than a
    DNS name; the common name is the site id as well.

    Raises:
        ValueError: ``site_id`` is not a site id.
    """
    if not isinstance(site_id, str) or not _SITE_ID_RE.fullmatch(site_id):
        raise ValueError(f"site id {site_id!r}: {_SITE_ID_RULE}")
    return f"urn:blossom:site:{site_id}"



def write_dev_certificates(
    directory: Path,
    *,
    server_names: Sequence[str] = (),
    site_ids: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> DevCertificates:
    """Make a test CA, a SuperLink certificate and one client certificate per site.

    Everything is checked and generated in memory before the first file is written.

    Args:
        directory: The folder to write to; created if missing, and set to mode 0700 (as is
            its ``sites`` folder). Without ``force`` it must be empty or absent.
        server_names: Extra DNS names or IP addresses the server certificate covers, besides
            ``localhost``, ``127.0.0.1`` and ``::1``. DNS names are lower-cased.
        site_ids: Sites to issue client certificates for (may be empty).
        days: Validity in days, 1..825.
        force: Overwrite files of the same names (other files in the folder stay).

    Returns:
        What was written, for the operator's table.

    Raises:
        TypeError: ``server_names`` or ``site_ids`` is a single string.
        ValueError: a server name, a site id (malformed or repeated) or ``days`` is
            invalid; the message lists every problem, separated by ``"; "``.
        NotADirectoryError: ``directory`` (or its ``sites`` folder) exists and is not a folder.
        FileExistsError: without ``force``, a file would be overwritten, or the folder holds
            other files; ``filename`` names the file. Nothing was written.
        OSError: a folder or file cannot be created or written.

    Notes:
        The check that a file does not exist and its atomic write are not one step: a file
        created in between by another process is replaced. The folder is the operator's
        own, so this is acceptable for test certificates.
    """
    for label, values in (("server_names", server_names), ("site_ids", site_ids)):
        if isinstance(values, str | bytes):
            raise TypeError(f"{label} must be a sequence of str, not a single string")
    directory = Path(directory)
    dns_names, ip_addresses, problems = _server_names(server_names)
    sites: list[str] = []
    for site_id in site_ids:
        if not isinstance(site_id, str) or not _SITE_ID_RE.fullmatch(site_id):
            problems.append(f"site id {site_id!r}: {_SITE_ID_RULE}")
        elif site_id in sites:
            problems.append(f"site id {site_id!r}: given twice")
        else:
            sites.append(site_id)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= TLS_MAX_DAYS:
        problems.append(f"days: must be a whole number from 1 to {TLS_MAX_DAYS}, not {days!r}")
    if problems:
        raise ValueError("; ".join(problems))

    sites_dir = directory / SITES_DIR
    targets = [directory / CA_CERT_FILE, directory / CA_KEY_FILE, directory / SERVER_CERT_FILE,
               directory / SERVER_KEY_FILE]
    for site_id in sites:
        targets += [sites_dir / f"{site_id}.pem", sites_dir / f"{site_id}.key"]
    before = _existing_files(directory)
    if not force:
        _refuse_overwrite(directory, targets, before)

    ca_pem, ca_key = generate_tls_ca(_CA_COMMON_NAME, days=days)
    server_pem, server_key = issue_tls_certificate(
        ca_pem, ca_key, common_name=_SERVER_COMMON_NAME, dns_names=dns_names, ip_addresses=ip_addresses,
        server=True, days=days)
    issued = [("ca", "test CA", directory / CA_CERT_FILE, directory / CA_KEY_FILE, ca_pem, ca_key),
              ("server", "SuperLink", directory / SERVER_CERT_FILE, directory / SERVER_KEY_FILE, server_pem,
               server_key)]
    for site_id in sites:
        pem, key = issue_tls_certificate(ca_pem, ca_key, common_name=site_id, dns_names=(), ip_addresses=(),
                                         uris=(site_identity_uri(site_id),), server=False, days=days)
        issued.append(("site", site_id, sites_dir / f"{site_id}.pem", sites_dir / f"{site_id}.key", pem, key))

    _make_private_dir(directory)
    if sites:
        _make_private_dir(sites_dir)
    for _, _, cert_path, key_path, pem, key in issued:
        atomic_write(key_path, key, mode=_KEY_MODE)
        atomic_write(cert_path, pem, mode=_CERT_MODE)
    logger.info("wrote test certificates to %s (%d sites)", directory, len(sites))
    written = set(targets)
    return DevCertificates(
        directory=directory,
        certificates=tuple(IssuedCertificate(role, name, cert_path, key_path, describe_tls_certificate(pem))
                           for role, name, cert_path, key_path, pem, _ in issued),
        left_untouched=tuple(p for p in before if p not in written),
    )


def _server_names(server_names: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Split the server names into DNS names and IP addresses (defaults first, no repeats),
    and the problems found."""
    dns_names: list[str] = []
    ip_addresses: list[str] = []
    problems: list[str] = []
    for raw in (*DEFAULT_SERVER_NAMES, *server_names):
        if not isinstance(raw, str):
            problems.append(f"server name {raw!r}: must be a string")
            continue
        try:
            address = str(ipaddress.ip_address(raw))
        except ValueError:
            name = raw.lower().removesuffix(".")
            if len(name) > 253 or not _DNS_NAME_RE.fullmatch(name):
                problems.append(f"server name {raw!r}: not a DNS name (letters, digits and '-' in dot-separated "
                                "labels, no wildcards) or an IP address")
            elif name not in dns_names:
                dns_names.append(name)
            continue
        if address not in ip_addresses:
            ip_addresses.append(address)
    return dns_names, ip_addresses, problems


def _existing_files(directory: Path) -> list[Path]:
    """Entries in ``directory`` and its ``sites`` folder, sorted (``sites`` itself is
    listed only if it is not a folder)."""
    if not directory.exists() and not directory.is_symlink():
        return []
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(directory))
    sites_dir = directory / SITES_DIR
    if sites_dir.exists() and not sites_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(sites_dir))
    found = [p for p in directory.iterdir() if p != sites_dir]
    if sites_dir.is_dir():
        found += list(sites_dir.iterdir())
    return sorted(found)


def _refuse_overwrite(directory: Path, targets: list[Path], existing: list[Path]) -> None:
    for path in targets:
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "already exists; nothing was written (pass --force to overwrite)",
                                  str(path))
    if existing:
        raise FileExistsError(errno.EEXIST, f"is in {directory}, which must be empty; nothing was written "
                              "(choose an empty folder, or pass --force)", str(existing[0]))


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, _DIR_MODE)
