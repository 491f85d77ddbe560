"""The Flower deployment engine as a runtime: a SuperLink at the coordinator, one
SuperNode per hospital, TLS between them (Flower 1.42 serves the SuperLink's Fleet,
Control and Runtime APIs as protobuf over HTTPS on one port, 8000 by default).

This package does not import ``flwr`` at import time, so the tools here (such as the test
certificates of :mod:`blossom_secure.runtimes.flower.certificates`) work without it.
"""

from blossom_secure.runtimes.flower.certificates import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    DEFAULT_DAYS,
    DEFAULT_SERVER_NAMES,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    SITES_DIR,
    DevCertificates,
    IssuedCertificate,
    site_identity_uri,
    write_dev_certificates,
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
