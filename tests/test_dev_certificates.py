"""``blossom dev certificates``: a test CA whose certificates verify against it and nothing
else, with the right names and usages, keys kept private, nothing overwritten by accident,
and a real TLS handshake on loopback (Python's OpenSSL, gRPC's BoringSSL, and, in the slow
test, Flower's own SuperLink)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from blossom_secure.cli import run
from blossom_secure.cli.blossom import main
from blossom_secure.crypto import (
    _generate_tls_ca_at,
    _issue_tls_certificate_at,
    describe_tls_certificate,
    generate_tls_ca,
    issue_tls_certificate,
)
from blossom_secure.runtimes.flower.certificates import site_identity_uri, write_dev_certificates
from tests.test_cli import BIN, assert_clean_failure, cli

SITES = ("st-mary", "north_gate")
EXTRA_NAMES = ("coordinator.example.org", "10.1.2.3")
DAYS = 10
TIMEOUT_S = 10


@pytest.fixture(scope="module")
def issued(tmp_path_factory):
    """One run of the real command: (folder, its stdout, the time just before the run)."""
    out = tmp_path_factory.mktemp("dev-certs") / "certs"
    started = datetime.now(timezone.utc).replace(microsecond=0)
    args = ["blossom", "dev", "certificates", str(out), "--days", str(DAYS)]
    for name in EXTRA_NAMES:
        args += ["--server-name", name]
    for site in SITES:
        args += ["--site", site]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout, started


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """A second, unrelated test CA with the same names."""
    out = tmp_path_factory.mktemp("other-certs")
    write_dev_certificates(out, site_ids=SITES)
    return out


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verifier(ca_pem: Path) -> PolicyBuilder:
    return PolicyBuilder().store(Store([load(ca_pem)]))


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- layout


def test_writes_the_documented_layout_with_private_keys_0600(issued):
    out, stdout, _ = issued
    expected = {"ca.pem", "ca.key", "server.pem", "server.key"} | {f"sites/{s}.{e}" for s in SITES
                                                                    for e in ("pem", "key")}
    assert set(files_under(out)) == expected
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "sites").stat().st_mode) == 0o700
    for name in expected:
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), name
    assert not list(out.rglob(".*.tmp"))


def test_keys_are_unencrypted_pkcs8_p256_and_match_their_certificates(issued):
    out, _, _ = issued
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    for stem in ("ca", "server", *(f"sites/{s}" for s in SITES)):
        pem = (out / f"{stem}.key").read_bytes()
        assert pem.startswith(b"-----BEGIN " + b"PRIVATE KEY-----\n")  # PKCS8, unencrypted
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        assert key.public_key().public_bytes(*spki) == load(out / f"{stem}.pem").public_key().public_bytes(*spki)


def test_output_shows_fingerprints_validity_and_the_test_only_warning(issued):
    out, stdout, _ = issued
    assert "for local trials only" in stdout
    assert "a real deployment uses the hospital's and the coordinator's own PKI" in stdout
    assert f"--ssl-certfile {out / 'server.pem'}" in stdout and f"--root-certificates {out / 'ca.pem'}" in stdout
    for stem in ("ca", "server", *(f"sites/{s}" for s in SITES)):
        cert = load(out / f"{stem}.pem")
        digest = cert.fingerprint(hashes.SHA256()).hex().upper()
        pairs = [digest[i : i + 2] for i in range(0, 64, 2)]
        for row in range(4):  # printed as four lines of eight bytes
            assert ":".join(pairs[8 * row : 8 * row + 8]) in stdout, stem
        assert f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}" in stdout
        assert describe_tls_certificate((out / f"{stem}.pem").read_bytes()).sha256_fingerprint == ":".join(pairs)


# ----------------------------------------------------------------------------- X.509


def test_ca_verifies_the_server_certificate_for_every_name(issued):
    out, _, _ = issued
    server = load(out / "server.pem")
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1")), x509.DNSName("coordinator.example.org"),
             x509.IPAddress(ipaddress.ip_address("10.1.2.3"))]
    for name in names:
        chain = verifier(out / "ca.pem").build_server_verifier(name).verify(server, [])
        assert chain == [server, load(out / "ca.pem")]


def test_server_certificate_is_refused_for_a_name_it_does_not_carry(issued):
    out, _, _ = issued
    for name in (x509.DNSName("evil.example.org"), x509.IPAddress(ipaddress.ip_address("10.9.9.9"))):
        with pytest.raises(VerificationError):
            verifier(out / "ca.pem").build_server_verifier(name).verify(load(out / "server.pem"), [])


def test_ca_verifies_each_site_certificate_with_its_identity(issued):
    out, _, _ = issued
    for site in SITES:
        cert = load(out / "sites" / f"{site}.pem")
        verified = verifier(out / "ca.pem").build_client_verifier().verify(cert, [])
        assert verified.subjects == [x509.UniformResourceIdentifier(f"urn:blossom:site:{site}")]
        assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == site


def test_server_certificate_refused_as_client_certificate_and_site_certificate_as_server(issued):
    out, _, _ = issued
    with pytest.raises(VerificationError, match="EKU"):
        verifier(out / "ca.pem").build_client_verifier().verify(load(out / "server.pem"), [])
    site = load(out / "sites" / "st-mary.pem")
    for name in (x509.DNSName("localhost"), x509.DNSName("st-mary")):
        with pytest.raises(VerificationError):
            verifier(out / "ca.pem").build_server_verifier(name).verify(site, [])


def test_certificates_of_another_test_ca_are_refused(issued, other):
    out, _, _ = issued
    with pytest.raises(VerificationError):
        verifier(out / "ca.pem").build_server_verifier(x509.DNSName("localhost")).verify(load(other / "server.pem"), [])
    with pytest.raises(VerificationError):
        verifier(out / "ca.pem").build_client_verifier().verify(load(other / "sites" / "st-mary.pem"), [])


def test_extensions_key_usages_and_signatures(issued):
    out, _, _ = issued
    ca = load(out / "ca.pem")
    ext = ca.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ca_ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ca.subject == ca.issuer
    serials = {ca.serial_number}
    for stem, usage in (("server", x509.oid.ExtendedKeyUsageOID.SERVER_AUTH),
                        *((f"sites/{s}", x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH) for s in SITES)):
        cert = load(out / f"{stem}.pem")
        ext = cert.extensions
        bc = ext.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and not bc.value.ca
        ku = ext.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature
        assert not (ku.value.key_encipherment or ku.value.key_cert_sign or ku.value.crl_sign)  # EC: RFC 5480 s3
        assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest
        assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest != ca_ski.digest
        assert cert.issuer == ca.subject
        assert cert.signature_hash_algorithm.name == "sha256"
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        serials.add(cert.serial_number)
    assert len(serials) == 2 + len(SITES)
    assert all(0 < s < 1 << 159 for s in serials)
    san = load(out / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coordinator.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1", "10.1.2.3"]


def test_validity_runs_from_five_minutes_ago_for_the_requested_days(issued):
    out, _, started = issued
    finished = datetime.now(timezone.utc)
    for stem in ("ca", "server", "sites/st-mary"):
        cert = load(out / f"{stem}.pem")
        assert started - timedelta(minutes=5) <= cert.not_valid_before_utc <= finished - timedelta(minutes=5)
        assert started + timedelta(days=DAYS) <= cert.not_valid_after_utc <= finished + timedelta(days=DAYS)
        assert cert.not_valid_after_utc <= load(out / "ca.pem").not_valid_after_utc


def test_validity_at_a_fixed_time_and_cut_to_the_ca():
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    ca_pem, ca_key = _generate_tls_ca_at("CA", days=10, now=now)
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert ca.not_valid_before_utc == now - timedelta(minutes=5)
    assert ca.not_valid_after_utc == now + timedelta(days=10)
    later = now + timedelta(days=2)
    pem, _ = _issue_tls_certificate_at(ca_pem, ca_key, common_name="s", dns_names=["localhost"], ip_addresses=[],
                                       uris=(), server=True, days=825, now=later)
    leaf = x509.load_pem_x509_certificate(pem)
    assert leaf.not_valid_before_utc == later - timedelta(minutes=5)
    assert leaf.not_valid_after_utc == ca.not_valid_after_utc
    pinned = PolicyBuilder().store(Store([ca])).time(later + timedelta(days=1))
    pinned.build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])
    expired = PolicyBuilder().store(Store([ca])).time(now + timedelta(days=11))
    with pytest.raises(VerificationError):
        expired.build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])


def test_tls_primitives_refuse_bad_inputs():
    ca_pem, ca_key = generate_tls_ca("CA", days=1)
    other_pem, other_key = generate_tls_ca("other CA", days=1)
    kwargs = dict(common_name="s", dns_names=["localhost"], ip_addresses=[], server=True, days=1)
    for days in (0, 826):
        with pytest.raises(ValueError, match="1..825"):
            generate_tls_ca("CA", days=days)
        with pytest.raises(ValueError, match="1..825"):
            issue_tls_certificate(ca_pem, ca_key, **{**kwargs, "days": days})
    with pytest.raises(ValueError, match="common name"):
        generate_tls_ca("", days=1)
    bad = [({"dns_names": ["*.example.org"]}, "DNS name"), ({"dns_names": ["Upper.example.org"]}, "DNS name"),
           ({"dns_names": ["a_b.example.org"]}, "DNS name"), ({"ip_addresses": ["10.0.0.256"]}, "IP address"),
           ({"dns_names": []}, "at least one"), ({"common_name": "x" * 65}, "common name")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            issue_tls_certificate(ca_pem, ca_key, **{**kwargs, **change})
    with pytest.raises(ValueError, match="does not belong"):
        issue_tls_certificate(ca_pem, other_key, **kwargs)
    leaf_pem, leaf_key = issue_tls_certificate(ca_pem, ca_key, **kwargs)
    with pytest.raises(ValueError, match="not a CA"):
        issue_tls_certificate(leaf_pem, leaf_key, **kwargs)
    with pytest.raises(ValueError, match="CA key"):
        issue_tls_certificate(ca_pem, b"not a key", **kwargs)
    with pytest.raises(ValueError, match="certificate"):
        issue_tls_certificate(b"not a certificate", ca_key, **kwargs)
    with pytest.raises(ValueError, match="certificate"):
        describe_tls_certificate(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(TypeError):
        issue_tls_certificate(ca_pem, ca_key, **{**kwargs, "dns_names": "localhost"})
    expired_pem, expired_key = _generate_tls_ca_at("old CA", days=1, now=datetime(2020, 1, 1, tzinfo=timezone.utc))
    with pytest.raises(ValueError, match="expired"):
        issue_tls_certificate(expired_pem, expired_key, **kwargs)
    with pytest.raises(ValueError, match="site id"):
        site_identity_uri("../etc")


# ----------------------------------------------------------------------------- a real handshake


@contextlib.contextmanager
def tls_server(cert: Path, key: Path, *, client_ca: Path | None = None):
    """A one-thread TLS server on 127.0.0.1 that answers b"ok" to each handshake.

    Yields ``(port, results)``; ``results`` gets ``("ok", peer_cert)`` or ``("error", exc)``
    per connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    results: queue.Queue = queue.Queue()
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT_S)
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        results.put(("ok", tls.getpeercert()))
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError) as exc:
                    results.put(("error", exc))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], results
    finally:
        stop.set()
        thread.join(timeout=TIMEOUT_S)
        listener.close()
    assert not thread.is_alive()


def tls_client(port: int, ca: Path, hostname: str | None, *, cert: Path | None = None,
               key: Path | None = None) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # the default from Python 3.13 on
    if hostname is None:
        ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        with ctx.wrap_socket(sock, server_hostname=hostname) as tls:
            return tls.recv(2)


def test_tls_handshake_on_loopback_trusting_only_the_test_ca(issued):
    out, _, _ = issued
    with tls_server(out / "server.pem", out / "server.key") as (port, results):
        for hostname in ("localhost", "127.0.0.1", "::1", "coordinator.example.org"):
            assert tls_client(port, out / "ca.pem", hostname) == b"ok", hostname
            assert results.get(timeout=TIMEOUT_S)[0] == "ok"


def test_tls_client_trusting_another_ca_refuses_the_server(issued, other):
    out, _, _ = issued
    with tls_server(out / "server.pem", out / "server.key") as (port, _):
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
            tls_client(port, other / "ca.pem", "localhost")
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            tls_client(port, out / "ca.pem", "evil.example.org")


def test_tls_client_refuses_a_site_certificate_presented_by_a_server(issued):
    out, _, _ = issued
    with tls_server(out / "sites" / "st-mary.pem", out / "sites" / "st-mary.key") as (port, _):
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate purpose"):
            tls_client(port, out / "ca.pem", None)  # no hostname check: only the usage is at stake


def test_mutual_tls_accepts_a_site_and_refuses_the_server_certificate_as_a_client(issued, other):
    out, _, _ = issued
    with tls_server(out / "server.pem", out / "server.key", client_ca=out / "ca.pem") as (port, results):
        assert tls_client(port, out / "ca.pem", "localhost", cert=out / "sites" / "st-mary.pem",
                          key=out / "sites" / "st-mary.key") == b"ok"
        status, peer = results.get(timeout=TIMEOUT_S)
        assert status == "ok"
        assert ("URI", "urn:blossom:site:st-mary") in peer["subjectAltName"]
        for cert, key in ((out / "server.pem", out / "server.key"),
                          (other / "sites" / "st-mary.pem", other / "sites" / "st-mary.key")):
            with contextlib.suppress(ssl.SSLError, OSError):  # TLS 1.3: the alert may come after the handshake
                assert tls_client(port, out / "ca.pem", "localhost", cert=cert, key=key) != b"ok"
            status, exc = results.get(timeout=TIMEOUT_S)
            assert status == "error" and isinstance(exc, ssl.SSLCertVerificationError), exc


def test_grpc_mutual_tls_with_the_test_certificates(issued, other):
    import grpc  # comes with the flower extra
    from concurrent.futures import ThreadPoolExecutor

    out, _, _ = issued

    def read(path: Path) -> bytes:
        return path.read_bytes()

    def whoami(request: bytes, context) -> bytes:
        return context.auth_context()["x509_common_name"][0]

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "blossom.Test", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}),))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(read(out / "server.key"), read(out / "server.pem"))], root_certificates=read(out / "ca.pem"),
        require_client_auth=True))
    server.start()
    try:
        def call(ca: Path, cert: Path, key: Path, target: str = f"localhost:{port}") -> bytes:
            creds = grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key),
                                                 certificate_chain=read(cert))
            with grpc.secure_channel(target, creds) as channel:
                return channel.unary_unary("/blossom.Test/WhoAmI")(b"", timeout=TIMEOUT_S)

        site = out / "sites" / "north_gate.pem", out / "sites" / "north_gate.key"
        assert call(out / "ca.pem", *site) == b"north_gate"
        assert call(out / "ca.pem", *site, target=f"127.0.0.1:{port}") == b"north_gate"
        for ca, cert, key in ((other / "ca.pem", *site),  # the client trusts another CA
                              (out / "ca.pem", out / "server.pem", out / "server.key")):  # serverAuth as a client
            with pytest.raises(grpc.RpcError) as info:
                call(ca, cert, key)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


@pytest.mark.slow
def test_flower_superlink_serves_tls_with_the_test_certificates(issued, tmp_path):
    """Flower 1.42's own SuperLink loads server.pem/server.key; a client trusting ca.pem
    reaches it as ``localhost``."""
    superlink = BIN / "flower-superlink"  # the flower extra is part of the README install
    assert superlink.exists(), "flower-superlink missing: install the flower extra (see the README)"
    out, _, _ = issued
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(tmp_path)}
    with open(tmp_path / "superlink.log", "wb") as log:
        proc = subprocess.Popen(
            [str(superlink), "--ssl-ca-certfile", str(out / "ca.pem"), "--ssl-certfile", str(out / "server.pem"),
             "--ssl-keyfile", str(out / "server.key"), "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "superlink.log").read_text()[-2000:]
            try:
                ctx = ssl.create_default_context(cafile=str(out / "ca.pem"))
                with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
                    with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                        tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                        assert tls.recv(64).startswith(b"HTTP/1.1 200")
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "SuperLink did not start"
                time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=TIMEOUT_S)


# ----------------------------------------------------------------------------- refusals


def test_existing_files_are_never_overwritten_without_force(tmp_path):
    out = tmp_path / "certs"
    write_dev_certificates(out, site_ids=["st-mary"])
    before = files_under(out)
    proc = cli("blossom", "dev", "certificates", str(out), "--site", "st-mary")
    assert_clean_failure(proc, 2)
    assert len(proc.stderr.strip().splitlines()) == 1
    assert str(out / "ca.pem") in proc.stderr and "--force" in proc.stderr
    assert files_under(out) == before

    proc = cli("blossom", "dev", "certificates", str(out), "--site", "st-mary", "--force")
    assert proc.returncode == 0, proc.stderr
    after = files_under(out)
    assert set(after) == set(before) and all(after[name] != before[name] for name in before)
    assert stat.S_IMODE((out / "sites" / "st-mary.key").stat().st_mode) == 0o600


def test_a_folder_holding_other_files_is_refused_without_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError) as info:
        write_dev_certificates(tmp_path)
    assert info.value.filename == str(tmp_path / "notes.txt")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    result = write_dev_certificates(tmp_path, force=True, site_ids=["lakeside"])
    assert result.left_untouched == (tmp_path / "notes.txt",)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(NotADirectoryError):
        write_dev_certificates(tmp_path / "notes.txt")


def test_bad_site_id_is_exit_2_without_traceback(tmp_path):
    proc = cli("blossom", "dev", "certificates", str(tmp_path / "certs"), "--site", "St Mary")
    assert_clean_failure(proc, 2)
    assert "site id 'St Mary'" in proc.stderr
    assert not (tmp_path / "certs").exists()


@pytest.mark.parametrize("args, message", [
    (["--site", "../etc"], "site id '../etc'"),
    (["--site", "a", "--site", "a"], "given twice"),
    (["--days", "0"], "days"),
    (["--days", "826"], "days"),
    (["--days", "ten"], "invalid int value"),
    (["--server-name", "*.example.org"], "server name '*.example.org'"),
    (["--server-name", "bad_name.example.org"], "server name"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_arguments_are_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    code = run(main, ["dev", "certificates", str(tmp_path / "certs"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "certs").exists()


def test_exported_names_are_importable_from_the_runtime_package():
    from blossom_secure.runtimes.flower import DEFAULT_SERVER_NAMES
    from blossom_secure.runtimes.flower import write_dev_certificates as exported

    assert exported is write_dev_certificates
    assert DEFAULT_SERVER_NAMES == ("localhost", "127.0.0.1", "::1")


def test_a_long_path_is_printed_whole_on_one_line_in_a_log(tmp_path):
    """Output redirected to a file (no terminal, rich's 80 columns) never breaks a line
    inside a path: an operator who greps the log or pastes the command gets it whole."""
    out = tmp_path / ("a-folder-name-long-enough-that-every-path-in-it-passes-eighty-columns" * 2) / "certs"
    out.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "BLOSSOM_DEBUG")}
    proc = subprocess.run([str(BIN / "blossom"), "dev", "certificates", str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    superlink = [line for line in lines if line.startswith("SuperLink: ")]
    assert len(superlink) == 1
    assert f"--ssl-ca-certfile {out / 'ca.pem'} --ssl-certfile {out / 'server.pem'}" in superlink[0]
    # any sentence, not only the ones printed with care
    assert [line for line in lines if line.startswith("These are test keys")] == [
        "These are test keys, unencrypted, for local trials only; a real deployment uses the hospital's and the "
        "coordinator's own PKI."]
