"""Distributed enrollment: a hospital's private keys are made on its own machine and never leave it.

1. The hospital (`aseanfl client enroll`) generates its node key (Flower's SuperNode
   authentication) and its client key (mutual TLS at the server's front) and writes an
   enrollment request: the node public key and a certificate signing request. Nothing secret.
2. The coordinator (`aseanfl provision --enroll FILE`) checks the request, signs the client
   certificate with the federation's CA, keeps the node public key for registration and returns
   a kit with no private key in it.
3. The hospital (`aseanfl client install-kit`) checks that the returned certificate is for its
   own client key and site, issued by the kit's CA, and that the kit names its own node key.

The request's fingerprint (sha256 of its bytes) is read out to the coordinator over another
channel (a phone call), so a request swapped in transit is noticed. This is the layout of
NVFlare's distributed provisioning, with aseanfl's two keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SITE_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
REQUEST = "enroll-request.json"  # what the hospital sends (public)
FORMAT = "aseanfl-enrollment/1"
CURVES = (ec.SECP256R1, ec.SECP384R1)  # NIST curves: what Flower's node authentication accepts


class EnrollmentError(ValueError):
    """A request or kit that cannot be used; the text names the file and what is wrong."""


def check_site_id(site: str) -> None:
    if not re.match(SITE_PATTERN, site):
        raise EnrollmentError(f"site id {site!r}: use lower-case letters, digits and '-' (e.g. 'hanoi-bach-mai')")


def write_private(path: Path, data: bytes) -> None:
    """A private key file, readable by its owner only, never over an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError:  # the file is this call's own (O_EXCL): no half key is left
        path.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def fingerprint(data: bytes) -> str:
    """sha256 in groups of four hex digits, short enough to read out on a phone call."""
    digest = hashlib.sha256(data).hexdigest()[:32]
    return " ".join(digest[i:i + 4] for i in range(0, len(digest), 4))


def make_keys(folder: Path, site: str) -> bytes:
    """Write node.key, node.pub and client.key into `folder` (keys never overwritten) and the
    enrollment request for `site` beside them (REQUEST); returns the request's bytes."""
    check_site_id(site)
    for name in ("node.key", "client.key"):
        if (folder / name).exists():
            raise EnrollmentError(f"{folder / name} exists; a key is never overwritten (move it away to enroll anew)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnrollmentError(f"{folder}: the folder cannot be made ({exc.strerror})") from None
    written: list[Path] = []
    try:
        request = _write_keys(folder, site, written)
    except OSError as exc:  # a full disk, a read-only folder: the keys written so far go too
        for path in written:
            path.unlink(missing_ok=True)
        raise EnrollmentError(f"{exc.filename or folder}: cannot be written ({exc.strerror}); nothing was kept") from None
    return request


def _write_keys(folder: Path, site: str, written: list[Path]) -> bytes:
    node = ec.generate_private_key(ec.SECP384R1())  # Flower's SuperNode auth: a NIST EC key in OpenSSH format
    write_private(folder / "node.key", node.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                          serialization.NoEncryption()))
    written.append(folder / "node.key")
    node_pub = node.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    write_atomic(folder / "node.pub", node_pub)
    written.append(folder / "node.pub")
    client = ec.generate_private_key(ec.SECP384R1())
    write_private(folder / "client.key", client.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    written.append(folder / "client.key")
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
           .sign(client, hashes.SHA256()))
    request = (json.dumps({"format": FORMAT, "site": site, "node_public_key": node_pub.decode("ascii").strip(),
                           "certificate_request": csr.public_bytes(serialization.Encoding.PEM).decode("ascii")},
                          indent=1) + "\n").encode()
    write_atomic(folder / REQUEST, request)
    return request


@dataclass(frozen=True)
class Request:
    site: str
    node_pub: bytes  # OpenSSH, one line with its newline
    csr: x509.CertificateSigningRequest
    fingerprint: str


def _ec_key(key, what: str, where: str):
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, CURVES):
        raise EnrollmentError(f"{where}: the {what} is not an EC key on P-256 or P-384")
    return key


def read_request(path: Path) -> Request:
    """An enrollment request, checked: its format, the site id, a node public key Flower can
    use, and a certificate request signed by its own key and naming the same site."""
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except OSError as exc:
        raise EnrollmentError(f"{path}: cannot be read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EnrollmentError(f"{path}: not an enrollment request (not JSON); the hospital writes one with "
                              "`aseanfl client enroll`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EnrollmentError(f"{path}: not an enrollment request (format is not {FORMAT})")
    site = str(data.get("site", ""))
    try:
        check_site_id(site)
    except EnrollmentError as exc:
        raise EnrollmentError(f"{path}: {exc}") from None
    try:
        node_pub = (str(data["node_public_key"]).strip() + "\n").encode("ascii")
        node_key = serialization.load_ssh_public_key(node_pub)
    except (KeyError, ValueError, UnicodeError):
        raise EnrollmentError(f"{path}: node_public_key is not an OpenSSH public key") from None
    _ec_key(node_key, "node public key", str(path))
    try:
        csr = x509.load_pem_x509_csr(str(data["certificate_request"]).encode("ascii"))
    except (KeyError, ValueError, UnicodeError):
        raise EnrollmentError(f"{path}: certificate_request is not a PEM certificate signing request") from None
    _ec_key(csr.public_key(), "client key", str(path))
    if not csr.is_signature_valid:
        raise EnrollmentError(f"{path}: the certificate request's signature does not verify")
    names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [site]:
        raise EnrollmentError(f"{path}: the certificate request names {names}, not the site {site!r}")
    return Request(site, node_pub, csr, fingerprint(raw))


def same_key(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def check_kit(folder: Path, kit: Path) -> str:
    """The kit the coordinator returned fits the keys in `folder`: its client.crt is for our
    client key and site and was issued by its ca.crt, its node.pub is ours. Returns the site."""
    request = read_request(folder / REQUEST)
    try:
        cert = x509.load_pem_x509_certificate((kit / "client.crt").read_bytes())
        ca = x509.load_pem_x509_certificate((kit / "ca.crt").read_bytes())
        kit_node = (kit / "node.pub").read_bytes()
        key = serialization.load_pem_private_key((folder / "client.key").read_bytes(), None)
    except FileNotFoundError as exc:
        raise EnrollmentError(f"{exc.filename}: missing (the kit holds client.crt, ca.crt and node.pub; the "
                              "hospital's folder its keys and request)") from None
    except ValueError as exc:
        raise EnrollmentError(f"{kit}: client.crt or ca.crt is not a PEM certificate ({exc})") from None
    if not same_key(cert.public_key(), key.public_key()):
        raise EnrollmentError(f"{kit / 'client.crt'}: the certificate is not for this hospital's client key "
                              f"({folder / 'client.key'}); it was issued for another request")
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [request.site]:
        raise EnrollmentError(f"{kit / 'client.crt'}: the certificate names {names}, not this hospital ({request.site})")
    try:
        cert.verify_directly_issued_by(ca)  # the issuer's name and its signature
    except (InvalidSignature, ValueError, TypeError):
        raise EnrollmentError(f"{kit / 'client.crt'}: not issued by the kit's CA ({kit / 'ca.crt'})") from None
    if kit_node.strip() != request.node_pub.strip():
        raise EnrollmentError(f"{kit / 'node.pub'}: not this hospital's node key (the coordinator registered another)")
    return request.site
