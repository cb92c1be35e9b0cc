"""Federation provisioning: the CA, the server's TLS certificate, and per hospital a signed client
certificate (mutual TLS at the server's front) and its registered node public key (Flower's
SuperNode authentication).

Hospitals enroll (common/enrollment.py): each makes its own keys and sends a request; `aseanfl
provision --enroll FILE` signs it and writes a kit with no private key in it. `--sites` makes
the hospitals' keys here instead: for trying things out on one machine only.

Layout (`aseanfl provision --out federation`):
  federation-ca/ca.key, ca.crt   the CA: only provisioning needs it; never on the server machine
                                 in production (offline CA: docs/security.md)
  federation/federation.json     name, public address, the SuperLink's loopback address, revoked
                                 hospitals, certificates retired by re-enrollment
  federation/ca.crt              the CA certificate (public)
  federation/server/             what the server machine needs: server.crt/key, ca.crt, crl.pem,
                                 approved-apps.yaml (app bundles the server runs)
  federation/sites/<site>/       the kit returned to a hospital: client.crt, node.pub, ca.crt,
                                 server-address, a site.yaml to fill in

Re-running with more sites adds their kits and leaves every existing key and certificate alone.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.enrollment import (REQUEST, EnrollmentError, Request, check_site_id, make_keys, read_request, same_key,
                                write_atomic as _write_atomic, write_private as _write_private)

_VALID = dt.timedelta(days=3 * 365)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
        """host:port the hospitals connect to (the front)."""
        return self.meta["address"]

    @property
    def superlink(self) -> str:
        """127.0.0.1:port of the SuperLink itself: loopback only, never public."""
        return self.meta["superlink"]

    @property
    def listen(self) -> str:
        """ip:port the front binds."""
        return self.meta["listen"]

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    @property
    def revoked(self) -> dict[str, dict]:
        return self.meta.get("revoked", {})

    def site_kit(self, site: str) -> Path:
        return self.root / "sites" / site

    def sites(self) -> list[str]:
        """Provisioned hospitals that are not revoked."""
        revoked = self.revoked
        return sorted(p.name for p in (self.root / "sites").iterdir()
                      if (p / "node.pub").is_file() and p.name not in revoked)

    def public_key(self, site: str) -> Path:
        return self.site_kit(site) / "node.pub"


def load_federation(root: Path) -> Federation:
    if not (root / "federation.json").is_file():
        raise ValueError(f"{root}: not a provisioned federation folder (no federation.json); run `aseanfl provision`")
    fed = Federation(root.resolve())
    if "superlink" not in fed.meta:
        raise ValueError(f"{root}: provisioned by an older aseanfl (no front, no client certificates); "
                         "provision the federation again")
    return fed


def default_ca_dir(out: Path) -> Path:
    return out.resolve().parent / f"{out.resolve().name}-ca"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         encipher_only=False, decipher_only=False)


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, ca: bool, hosts: list[str] = (),
          client: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key if isinstance(key, ec.EllipticCurvePublicKey) else key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(_usage(ca), critical=True)
    )
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    elif not ca:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class _CA:
    """The federation's CA, read from its folder (only where provisioning runs)."""

    def __init__(self, folder: Path):
        key_path = folder / "ca.key"
        if not key_path.is_file():
            raise ValueError(f"{key_path}: the federation's CA key is not here (pass --ca-dir where it is kept)")
        self.folder = folder
        self.key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        self.cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())

    @classmethod
    def create(cls, folder: Path, name: str) -> "_CA":
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"aseanfl {name} CA")])
        _write_private(folder / "ca.key", _pem_key(key))
        (folder / "ca.crt").write_bytes(_pem(_cert(f"aseanfl {name} CA", key, subject, key, ca=True)))
        return cls(folder)

    def issue(self, subject: str, hosts: list[str] = (), client: bool = False) -> tuple[bytes, bytes, int]:
        """(certificate PEM, private key PEM, serial)."""
        key = ec.generate_private_key(ec.SECP384R1())
        cert = _cert(subject, key, self.cert.subject, self.key, ca=False, hosts=hosts, client=client)
        return _pem(cert), _pem_key(key), cert.serial_number

    def sign(self, request: Request) -> tuple[bytes, int]:
        """A hospital's client certificate for the key in its request (certificate PEM, serial)."""
        cert = _cert(request.site, request.csr.public_key(), self.cert.subject, self.key, ca=False, client=True)
        return _pem(cert), cert.serial_number

    def crl(self, serials: list[int]) -> bytes:
        now = dt.datetime.now(dt.timezone.utc)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(now + _VALID))
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def console_certificate(ca_dir: Path, hosts: list[str], out: Path) -> tuple[Path, Path]:
    """A TLS certificate for a web console at `hosts` (names or IPs), issued by the federation's
    CA (where provisioning runs, with its key): (console.crt, console.key) in `out`, the key 0600."""
    if not hosts:
        raise ValueError("give the console's host name(s) or address(es): --host")
    cert, key, _ = _CA(ca_dir).issue(f"aseanfl console {hosts[0]}", hosts)
    crt_path, key_path = out / "console.crt", out / "console.key"
    if key_path.exists():
        raise ValueError(f"{key_path} exists; move it away first (a console key is never overwritten)")
    _write_private(key_path, key)
    _write_atomic(crt_path, cert)
    return crt_path, key_path


def site_yaml(site: str, address: str) -> str:
    return (
        f"# {site}: this file stays at the hospital; nothing in it is ever sent.\n"
        "# Relative paths are relative to this file's folder.\n"
        f"site: {site}\n"
        "connection:\n"
        f"  server: {address}\n"
        "  root_certificates: ca.crt\n"
        "  node_key: node.key\n"
        "  client_certificate: client.crt     # proves this hospital at the server's door (mutual TLS)\n"
        "  client_key: client.key\n"
        "data:\n"
        "  root: /path/to/pacs-export        # a folder per class, or a CSV manifest (path,label[,split])\n"
        "  # manifest: /path/to/labels.csv\n"
        "  image_size: 64                    # the coordinator's task.image_size\n"
        "privacy:\n"
        "  enabled: true                     # DP-SGD on this hospital's images\n"
        "  target_epsilon: 8.0\n"
        "compute:\n"
        "  device: auto                      # auto: this machine's CUDA GPU if it has one, else the CPU; cpu; cuda; cuda:N\n"
        "  # threads: 8                      # CPU threads for training; default: every core this daemon may use\n"
        "evaluation:                         # scoring submitted models (the contest): only aggregate figures leave\n"
        "  # split: test                     # test: held-out files never trained on (manifest split=test, else\n"
        "                                    # data.test_fraction); validation: the cases validated on in training\n"
        "  min_cases: 20                     # figures on fewer positives or negatives are withheld\n"
        "  # noise_epsilon: 1.0              # release two-class figures under this epsilon-DP only (Laplace noise)\n"
        "statistics:                         # `aseanfl stats -f`: counts of classes, modality, size, intensity; nothing per image\n"
        "  min_count: 10                     # counts below this are withheld (the server may ask for more, never less)\n"
        "  # release: [classes, modality, size, spacing, slices, thickness, intensity, masks]   # what you release\n"
        "  # noise_epsilon: 1.0              # Laplace noise on every count\n"
        "# classes:                          # your folder names -> the federation's (task.classes), in any language\n"
        "#   binh-thuong: normal\n"
        "require_approval: true               # run only app bundles in approved-apps.yaml\n"
        "approved_apps: approved-apps.yaml\n"
        "audit_log: audit.jsonl\n"
    )


def _install_site(fed: Federation, ca: _CA, request: Request) -> None:
    """The hospital's kit: its signed certificate, its node public key, the CA and the address."""
    kit = fed.site_kit(request.site)
    kit.mkdir(parents=True, exist_ok=True)
    cert, _serial = ca.sign(request)
    _write_atomic(kit / "client.crt", cert)
    _write_atomic(kit / "node.pub", request.node_pub)
    (kit / "ca.crt").write_bytes(fed.ca_cert.read_bytes())
    (kit / "server-address").write_text(fed.address + "\n")
    if not (kit / "site.yaml").exists():  # a try-out kit's filled-in one stays
        (kit / "site.yaml").write_text(site_yaml(request.site, fed.address))
    if not (kit / "approved-apps.yaml").exists():
        (kit / "approved-apps.yaml").write_text("# sha256 of the app bundles this hospital runs (aseanfl client approve)\n"
                                               "approved: []\n")


def _new_site(fed: Federation, ca: _CA, site: str) -> None:
    """Trying out on one machine: the hospital's keys are made here, in its kit, then enrolled."""
    kit = fed.site_kit(site)
    kit.mkdir(parents=True, exist_ok=True)
    make_keys(kit, site)
    _install_site(fed, ca, read_request(kit / REQUEST))


def _crl_serials(meta: dict) -> list[int]:
    """Revoked hospitals' certificates and certificates retired by re-enrollment."""
    return [int(v["serial"]) for v in meta.get("revoked", {}).values()] + [int(r["serial"]) for r in meta.get("retired", [])]


def enroll(root: Path, request_path: Path, ca_dir: Path | None = None, reenroll: bool = False) -> tuple[Federation, Request]:
    """Sign a hospital's enrollment request and write its kit (no private key). With `reenroll`,
    a hospital already enrolled gets its new keys (after a leak): its old certificate goes on the
    CRL and a running server unregisters its old node key and registers the new one."""
    fed = load_federation(root)
    try:
        request = read_request(request_path)
    except EnrollmentError as exc:
        raise ValueError(str(exc)) from None
    site = request.site
    if site in fed.revoked:
        raise ValueError(f"{site}: revoked; enroll the hospital under a new id")
    ca = _CA((ca_dir or default_ca_dir(root)).resolve())
    new_key = serialization.load_ssh_public_key(request.node_pub)
    for other in fed.sites():
        if other != site and same_key(serialization.load_ssh_public_key(fed.public_key(other).read_bytes()), new_key):
            raise ValueError(f"{request_path}: its node key is {other}'s; each hospital enrolls with a key of its own")
    meta = fed.meta
    kit = fed.site_kit(site)
    if (kit / "client.crt").is_file():
        if not reenroll:
            raise ValueError(f"{site} is enrolled already; after a leaked key the hospital enrolls again and you add "
                             "--reenroll (its old certificate is revoked, its old node key unregistered)")
        old = x509.load_pem_x509_certificate((kit / "client.crt").read_bytes())
        if same_key(old.public_key(), request.csr.public_key()):
            raise ValueError(f"{request_path}: the same client key as {site}'s current certificate; re-enrollment needs "
                             "new keys (`aseanfl client enroll` into an empty folder)")
        meta.setdefault("retired", []).append({"site": site, "serial": str(old.serial_number),
                                               "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        _write_atomic(fed.server_dir / "crl.pem", ca.crl(_crl_serials(meta)))
        _write_atomic(root / "federation.json", (json.dumps(meta, indent=1) + "\n").encode())
        for name in ("client.key", "node.key"):  # a try-out kit's old keys are worthless now
            (kit / name).unlink(missing_ok=True)
    _install_site(fed, ca, request)
    return fed, request


def _listen(address: str) -> str:
    """Where the front binds: a loopback address itself (testing on one machine), else every interface."""
    host, port = address.rsplit(":", 1)
    try:
        if ipaddress.ip_address(host).is_loopback:
            return address
    except ValueError:
        if host == "localhost":
            return f"127.0.0.1:{port}"
    return f"0.0.0.0:{port}"


def provision(root: Path, name: str, sites: list[str], address: str = "127.0.0.1:9092",
              hosts: list[str] | None = None, ca_dir: Path | None = None,
              local_port: int | None = None) -> tuple[Federation, list[str]]:
    """Create (or extend) the federation folder; returns it and the sites added now."""
    for site in sites:
        check_site_id(site)
    if not re.match(r"^[^:\s]+:\d+$", address):
        raise ValueError(f"--address {address!r}: expected host:port")
    ca_dir = (ca_dir or default_ca_dir(root)).resolve()
    if ca_dir == root.resolve() or root.resolve() in ca_dir.parents:
        raise ValueError(f"--ca-dir {ca_dir}: the CA must live outside the federation folder the server uses")
    if (root / "federation.json").is_file():
        fed = load_federation(root)
        if fed.name != name:
            raise ValueError(f"{root} holds federation {fed.name!r}, not {name!r}")
        ca = _CA(ca_dir)
    else:
        if (ca_dir / "ca.key").exists():
            raise ValueError(f"{ca_dir} already holds a CA key; pass another --ca-dir or --out")
        root.mkdir(parents=True, exist_ok=True)
        host, port = address.rsplit(":", 1)
        hosts = list(dict.fromkeys([host, *(hosts or []), *_LOOPBACK[:2]]))
        ca = _CA.create(ca_dir, name)
        (root / "ca.crt").write_bytes(_pem(ca.cert))
        cert, key, _ = ca.issue(hosts[0], hosts=hosts)  # the front and the loopback SuperLink both present it
        server = root / "server"
        _write_private(server / "server.key", key)
        (server / "server.crt").write_bytes(cert)
        (server / "ca.crt").write_bytes(_pem(ca.cert))
        _write_atomic(server / "crl.pem", ca.crl([]))
        (root / "sites").mkdir(exist_ok=True)
        meta = {"name": name, "address": address, "hosts": hosts, "listen": _listen(address),
                "superlink": f"127.0.0.1:{local_port or int(port) + 1}", "revoked": {}}
        (root / "federation.json").write_text(json.dumps(meta, indent=1) + "\n")
        fed = load_federation(root)
    revoked = [s for s in sites if s in fed.revoked]
    if revoked:
        raise ValueError(f"{', '.join(revoked)}: revoked; provision the hospital under a new id")
    added = [s for s in sites if not fed.public_key(s).is_file()]
    for site in added:
        _new_site(fed, ca, site)
    return fed, added


def revoke(root: Path, site: str, ca_dir: Path | None = None) -> Federation:
    """Revoke a hospital: its client certificate goes on the CRL (server/crl.pem) and the site is
    marked revoked (a running `aseanfl server start` reloads the front and unregisters its node key)."""
    fed = load_federation(root)
    cert_path = fed.site_kit(site) / "client.crt"
    if site in fed.revoked:
        raise ValueError(f"{site}: already revoked")
    if not cert_path.is_file():
        raise ValueError(f"{site}: not a hospital of federation {fed.name} (known: {', '.join(fed.sites()) or 'none'})")
    ca = _CA((ca_dir or default_ca_dir(root)).resolve())
    serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    meta = fed.meta
    meta.setdefault("revoked", {})[site] = {"serial": str(serial),
                                            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    _write_atomic(fed.server_dir / "crl.pem", ca.crl(_crl_serials(meta)))
    _write_atomic(root / "federation.json", (json.dumps(meta, indent=1) + "\n").encode())
    return fed
