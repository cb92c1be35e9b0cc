"""Federation provisioning: a CA, the SuperLink's TLS certificate, one node key pair per hospital
and a kit per hospital (its private key, the CA certificate, the server address, a site.yaml).

Re-running with more sites adds their kits and leaves every existing key and certificate alone.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SITE_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
_VALID = dt.timedelta(days=3 * 365)


@dataclass(frozen=True)
class Federation:
    """A provisioned federation folder (the coordinator's copy)."""

    root: Path

    @property
    def meta(self) -> dict:
        return json.loads((self.root / "federation.json").read_text())

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def address(self) -> str:
        return self.meta["address"]

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    def site_kit(self, site: str) -> Path:
        return self.root / "sites" / site

    def sites(self) -> list[str]:
        return sorted(p.name for p in (self.root / "sites").iterdir() if (p / "node.pub").is_file())

    def public_key(self, site: str) -> Path:
        return self.site_kit(site) / "node.pub"


def load_federation(root: Path) -> Federation:
    if not (root / "federation.json").is_file():
        raise ValueError(f"{root}: not a provisioned federation folder (no federation.json); run `aseanfl provision`")
    return Federation(root.resolve())


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, ca: bool, hosts: list[str] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _new_ca(root: Path, name: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"aseanfl {name} CA")])
    cert = _cert(f"aseanfl {name} CA", key, subject, key, ca=True)
    _write_private(root / "ca" / "ca.key", _pem_key(key))
    (root / "ca" / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _server_cert(root: Path, hosts: list[str]) -> None:
    ca_key = serialization.load_pem_private_key((root / "ca" / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((root / "ca" / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _cert(hosts[0], key, ca_cert.subject, ca_key, ca=False, hosts=hosts)
    _write_private(root / "server" / "server.key", _pem_key(key))
    (root / "server" / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "server" / "ca.crt").write_bytes((root / "ca" / "ca.crt").read_bytes())


def site_yaml(site: str, address: str) -> str:
    return (
        f"# {site}: this file stays at the hospital; nothing in it is ever sent.\n"
        "# Relative paths are relative to this file's folder.\n"
        f"site: {site}\n"
        "connection:\n"
        f"  server: {address}\n"
        "  root_certificates: ca.crt\n"
        "  node_key: node.key\n"
        "data:\n"
        "  root: /path/to/pacs-export        # a folder per class, or a CSV manifest (path,label[,split])\n"
        "  # manifest: /path/to/labels.csv\n"
        "  image_size: 64                    # the coordinator's task.image_size\n"
        "privacy:\n"
        "  enabled: true                     # DP-SGD on this hospital's images\n"
        "  target_epsilon: 8.0\n"
        "require_approval: true               # run only app bundles in approved-apps.yaml\n"
        "approved_apps: approved-apps.yaml\n"
        "audit_log: audit.jsonl\n"
    )


def _new_site(fed: Federation, site: str) -> None:
    kit = fed.site_kit(site)
    key = ec.generate_private_key(ec.SECP384R1())  # Flower's SuperNode auth: a NIST EC key in OpenSSH format
    _write_private(kit / "node.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
    (kit / "node.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                 serialization.PublicFormat.OpenSSH) + b"\n")
    (kit / "ca.crt").write_bytes(fed.ca_cert.read_bytes())
    (kit / "server-address").write_text(fed.address + "\n")
    (kit / "site.yaml").write_text(site_yaml(site, fed.address))
    (kit / "approved-apps.yaml").write_text("# sha256 of the app bundles this hospital runs (aseanfl client approve)\n"
                                           "approved: []\n")


def provision(root: Path, name: str, sites: list[str], address: str = "127.0.0.1:9092",
              hosts: list[str] | None = None) -> tuple[Federation, list[str]]:
    """Create (or extend) the federation folder; returns it and the sites added now."""
    import re

    for site in sites:
        if not re.match(SITE_PATTERN, site):
            raise ValueError(f"site id {site!r}: use lower-case letters, digits and '-' (e.g. 'hanoi-bach-mai')")
    if (root / "federation.json").is_file():
        fed = load_federation(root)
        if fed.name != name:
            raise ValueError(f"{root} holds federation {fed.name!r}, not {name!r}")
    else:
        root.mkdir(parents=True, exist_ok=True)
        host = address.rsplit(":", 1)[0]
        hosts = list(dict.fromkeys([host, *(hosts or []), "localhost", "127.0.0.1"]))
        _new_ca(root, name)
        _server_cert(root, hosts)
        (root / "sites").mkdir(exist_ok=True)
        (root / "federation.json").write_text(json.dumps({"name": name, "address": address, "hosts": hosts}, indent=1) + "\n")
        fed = load_federation(root)
    added = [s for s in sites if not fed.public_key(s).is_file()]
    for site in added:
        _new_site(fed, site)
    return fed, added
