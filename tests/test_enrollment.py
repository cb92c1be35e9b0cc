"""Distributed enrollment as a hospital and a coordinator run it (real commands, real keys): the
hospital's private keys never reach the coordinator's folders; a kit that is not for the
hospital's keys is refused; re-enrollment after a leak retires the old certificate. The
deployment test runs the same path against a live server (tests/test_deployment.py)."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509

from simulations.local_deployment import aseanfl


def _private_files(*folders: Path) -> list[str]:
    return sorted(p.name for folder in folders for p in folder.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes())


def _serials(crl: Path) -> set[int]:
    return {r.serial_number for r in x509.load_pem_x509_crl(crl.read_bytes())}


def test_enrollment_leaves_every_private_key_at_its_hospital(tmp_path):
    fed, ca, a, b = tmp_path / "federation", tmp_path / "federation-ca", tmp_path / "a", tmp_path / "b"
    assert aseanfl("provision", "--federation", "t", "--out", str(fed), "--address", "127.0.0.1:9600").returncode == 0
    for site, folder in (("site-a", a), ("site-b", b)):
        res = aseanfl("client", "enroll", "--site", site, "--dir", str(folder))
        assert res.returncode == 0 and "fingerprint" in res.stdout, res.stdout + res.stderr
        assert (folder / "node.key").stat().st_mode & 0o777 == 0o600 and (folder / "client.key").stat().st_mode & 0o777 == 0o600
        request = (folder / "enroll-request.json").read_text()
        assert "PRIVATE" not in request and json.loads(request)["site"] == site
    res = aseanfl("provision", "--federation", "t", "--out", str(fed), "--enroll", str(a / "enroll-request.json"),
                  "--enroll", str(b / "enroll-request.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    # the coordinator reads the same fingerprint the hospital was shown
    from common.enrollment import fingerprint

    assert f"enrolled site-a: request fingerprint {fingerprint((a / 'enroll-request.json').read_bytes())}" in res.stdout
    assert _private_files(fed, ca) == ["ca.key", "server.key"], _private_files(fed, ca)
    # each hospital installs its own kit; the other's is refused, naming why
    assert aseanfl("client", "install-kit", "--kit", str(fed / "sites" / "site-a"), "--dir", str(a)).returncode == 0
    wrong = aseanfl("client", "install-kit", "--kit", str(fed / "sites" / "site-a"), "--dir", str(b))
    assert wrong.returncode == 2 and "not for this hospital's client key" in wrong.stderr, wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1 and "Traceback" not in wrong.stderr
    assert not (b / "client.crt").exists()  # nothing installed from a kit that does not fit
    # a kit whose CA is another federation's: the certificate was not issued by it
    other = tmp_path / "other"
    assert aseanfl("provision", "--federation", "u", "--out", str(other), "--address", "127.0.0.1:9603").returncode == 0
    forged = tmp_path / "forged-kit"
    forged.mkdir()
    for name in ("client.crt", "node.pub"):
        (forged / name).write_bytes((fed / "sites" / "site-a" / name).read_bytes())
    (forged / "ca.crt").write_bytes((other / "ca.crt").read_bytes())
    res = aseanfl("client", "install-kit", "--kit", str(forged), "--dir", str(a))
    assert res.returncode == 2 and "not issued by the kit's CA" in res.stderr, res.stderr
    cert = x509.load_pem_x509_certificate((a / "client.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=site-a"
    # enrolling twice without --reenroll is refused; a request with another hospital's node key too
    again = aseanfl("provision", "--federation", "t", "--out", str(fed), "--enroll", str(a / "enroll-request.json"))
    assert again.returncode == 2 and "enrolled already" in again.stderr and "--reenroll" in again.stderr, again.stderr
    stolen = json.loads((b / "enroll-request.json").read_text())
    stolen["node_public_key"] = json.loads((a / "enroll-request.json").read_text())["node_public_key"]
    (tmp_path / "stolen.json").write_text(json.dumps(stolen))
    res = aseanfl("provision", "--federation", "t", "--out", str(fed), "--enroll", str(tmp_path / "stolen.json"),
                  "--reenroll")
    assert res.returncode == 2 and "its node key is site-a's" in res.stderr, res.stderr


def test_reenrollment_after_a_leak_revokes_the_old_certificate(tmp_path):
    fed, a, new = tmp_path / "federation", tmp_path / "a", tmp_path / "a-new"
    assert aseanfl("provision", "--federation", "t", "--out", str(fed), "--address", "127.0.0.1:9601").returncode == 0
    assert aseanfl("client", "enroll", "--site", "site-a", "--dir", str(a)).returncode == 0
    assert aseanfl("provision", "--federation", "t", "--out", str(fed), "--enroll", str(a / "enroll-request.json")).returncode == 0
    old = x509.load_pem_x509_certificate((fed / "sites" / "site-a" / "client.crt").read_bytes()).serial_number
    old_pub = (fed / "sites" / "site-a" / "node.pub").read_bytes()
    assert old not in _serials(fed / "server" / "crl.pem")
    # the key leaked: the hospital makes new keys, the coordinator re-enrolls it under the same id
    assert aseanfl("client", "enroll", "--site", "site-a", "--dir", str(new)).returncode == 0
    res = aseanfl("provision", "--federation", "t", "--out", str(fed), "--enroll", str(new / "enroll-request.json"),
                  "--reenroll")
    assert res.returncode == 0, res.stderr
    assert old in _serials(fed / "server" / "crl.pem")
    assert (fed / "sites" / "site-a" / "node.pub").read_bytes() != old_pub
    assert aseanfl("client", "install-kit", "--kit", str(fed / "sites" / "site-a"), "--dir", str(new)).returncode == 0
    # the old keys no longer fit the kit
    stale = aseanfl("client", "install-kit", "--kit", str(fed / "sites" / "site-a"), "--dir", str(a))
    assert stale.returncode == 2 and "not for this hospital's client key" in stale.stderr


def test_bad_requests_are_one_line_each(tmp_path):
    fed = tmp_path / "federation"
    assert aseanfl("provision", "--federation", "t", "--out", str(fed), "--address", "127.0.0.1:9602").returncode == 0
    cases = {"not json": (b"\x00garbage", "not JSON"),
             "other format": (b'{"format": "x"}', "format is not"),
             "bad id": (b'{"format": "aseanfl-enrollment/1", "site": "Site A"}', "lower-case letters")}
    for name, (body, expected) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(body)
        res = aseanfl("provision", "--federation", "t", "--out", str(fed), "--enroll", str(path))
        assert res.returncode == 2 and expected in res.stderr and str(path) in res.stderr, (name, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, (name, res.stderr)
    # a request whose certificate request names another hospital
    a = tmp_path / "a"
    assert aseanfl("client", "enroll", "--site", "site-a", "--dir", str(a)).returncode == 0
    req = json.loads((a / "enroll-request.json").read_text())
    req["site"] = "site-b"
    (tmp_path / "renamed.json").write_text(json.dumps(req))
    res = aseanfl("provision", "--federation", "t", "--out", str(fed), "--enroll", str(tmp_path / "renamed.json"))
    assert res.returncode == 2 and "names ['site-a'], not the site 'site-b'" in res.stderr, res.stderr
    # keys are never overwritten
    res = aseanfl("client", "enroll", "--site", "site-a", "--dir", str(a))
    assert res.returncode == 2 and "never overwritten" in res.stderr, res.stderr


def test_a_folder_that_cannot_be_made_or_written_gets_one_line_and_keeps_nothing(tmp_path, monkeypatch):
    import errno

    import pytest

    from common import enrollment

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder\n")
    said = aseanfl("client", "enroll", "--site", "hanoi", "--dir", str(blocked / "keys"))
    assert said.returncode == 2 and said.stderr.strip().count("\n") == 0, said.stderr
    assert "the folder cannot be made" in said.stderr and "Traceback" not in said.stdout + said.stderr

    real = enrollment.write_private

    def disk_full_at_the_client_key(path, data):
        if path.name == "client.key":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(enrollment, "write_private", disk_full_at_the_client_key)
    folder = tmp_path / "keys"
    with pytest.raises(enrollment.EnrollmentError, match=r"client.key: cannot be written \(No space left on device\); "
                                                          "nothing was kept"):
        enrollment.make_keys(folder, "hanoi")
    assert list(folder.iterdir()) == []  # node.key and node.pub, written before, are gone: enrolling again works
    monkeypatch.setattr(enrollment, "write_private", real)
    enrollment.make_keys(folder, "hanoi")
    assert sorted(p.name for p in folder.iterdir()) == ["client.key", "enroll-request.json", "node.key", "node.pub"]
