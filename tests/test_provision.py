"""Provisioning and revocation without a running server: what the kits and the CRL hold, and the
operator's mistakes each named in one line (exit 2, nothing half-written)."""

from __future__ import annotations

import json

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from simulations.local_deployment import aseanfl


def _provision(tmp_path, *args):
    return aseanfl("provision", "--federation", "t", "--out", str(tmp_path / "federation"), *args, timeout=60)


def test_kits_hold_client_certificates_of_the_federation_ca(tmp_path):
    assert _provision(tmp_path, "--sites", "h1,h2", "--address", "fl.example.org:9092").returncode == 0
    fed = tmp_path / "federation"
    meta = json.loads((fed / "federation.json").read_text())
    assert meta["listen"] == "0.0.0.0:9092" and meta["superlink"] == "127.0.0.1:9093"
    ca = x509.load_pem_x509_certificate((fed / "ca.crt").read_bytes())
    for site in ("h1", "h2"):
        cert = x509.load_pem_x509_certificate((fed / "sites" / site / "client.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == site
        assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert (fed / "sites" / site / "client.key").stat().st_mode & 0o777 == 0o600
    server = x509.load_pem_x509_certificate((fed / "server" / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in names.get_values_for_type(x509.DNSName)
    approved = (fed / "server" / "approved-apps.yaml").read_text()
    assert aseanfl("app-hash").stdout.strip() in approved  # the server runs this aseanfl's bundle, nothing else


def test_revocation_puts_the_certificate_on_the_crl(tmp_path):
    assert _provision(tmp_path, "--sites", "h1,h2").returncode == 0
    fed = tmp_path / "federation"
    res = _provision(tmp_path, "--revoke", "h2")
    assert res.returncode == 0 and "revoked h2" in res.stdout, res.stderr
    crl = x509.load_pem_x509_crl((fed / "server" / "crl.pem").read_bytes())
    serial = x509.load_pem_x509_certificate((fed / "sites" / "h2" / "client.crt").read_bytes()).serial_number
    kept = x509.load_pem_x509_certificate((fed / "sites" / "h1" / "client.crt").read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(kept) is None
    assert crl.is_signature_valid(x509.load_pem_x509_certificate((fed / "ca.crt").read_bytes()).public_key())
    assert "h2" in json.loads((fed / "federation.json").read_text())["revoked"]


def test_operator_mistakes_are_one_clear_line(tmp_path):
    assert _provision(tmp_path, "--sites", "h1").returncode == 0
    before = (tmp_path / "federation" / "federation.json").read_text()
    for args, says in (
        (["--revoke", "nobody"], "nobody: not a hospital of federation t"),
        (["--revoke", "h1", "--ca-dir", str(tmp_path / "elsewhere")], "the federation's CA key is not here"),
        (["--sites", "Bad_Name"], "site id 'Bad_Name'"),
        (["--sites", "h2", "--ca-dir", str(tmp_path / "federation" / "ca")], "the CA must live outside"),
        ([], "is provisioned already; give --enroll REQUEST"),
    ):
        res = _provision(tmp_path, *args)
        assert res.returncode == 2 and says in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert (tmp_path / "federation" / "federation.json").read_text() == before  # nothing half-written
    assert _provision(tmp_path, "--revoke", "h1").returncode == 0
    again = _provision(tmp_path, "--revoke", "h1")
    assert again.returncode == 2 and "already revoked" in again.stderr
    readd = _provision(tmp_path, "--sites", "h1")
    assert readd.returncode == 2 and "provision the hospital under a new id" in readd.stderr
