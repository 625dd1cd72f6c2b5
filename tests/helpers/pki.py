"""Test helper: a throwaway PKI for TLS tests (gRPC client SDK, Redis).

    make_pki(out) -> out/ca.pem ca.key            a self-signed CA ("elasticmoe test CA")
                     out/server.pem server.key    signed by it; names 127.0.0.1, localhost, moe.test
                     out/client.pem client.key    signed by it; for mutual TLS

EC P-256 keys, unencrypted PEM (PKCS#8), valid from 5 minutes ago for one day. Made with
the `cryptography` package when it is installed, else with the openssl CLI; the test is
skipped when neither is here.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def make_pki(out: Path) -> Path:
    out = Path(out)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is here to make a test certificate")
        _pki_with_openssl(out)
    else:
        _pki_with_cryptography(out)
    return out


def _pki_with_cryptography(out: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer, issuer_key, ca, san=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(stem, key, crt):
        (out / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        (out / f"{stem}.pem").write_bytes(crt.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elasticmoe test CA")])
    write("ca", ca_key, cert("elasticmoe test CA", ca_key, ca_name, ca_key, True))
    server_key = ec.generate_private_key(ec.SECP256R1())
    write("server", server_key, cert("server", server_key, ca_name, ca_key, False,
                                     [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                      x509.DNSName("localhost"), x509.DNSName("moe.test")]))
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", client_key, cert("client", client_key, ca_name, ca_key, False))


def _pki_with_openssl(out: Path) -> None:
    def run(*args):
        subprocess.run(["openssl", *args], cwd=out, check=True, capture_output=True, timeout=60)

    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *ec_key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
    (out / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:moe.test\n")
    for stem, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        run("req", *ec_key, "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={stem}")
        run("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{stem}.pem", "-days", "1", *ext)
