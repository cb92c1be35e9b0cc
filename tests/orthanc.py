"""A real Orthanc PACS (Debian's `orthanc` and `orthanc-dicomweb`) for the tests: started on
127.0.0.1 with its own config and storage in a temp folder, an account that reads and one that
uploads, stopped at the end. Missing packages: the test says so, and fails instead in CI (the
README's test command installs them)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
READER, READER_PASSWORD = "aseanfl-reader", "r3ad-only-Passw0rd"
UPLOADER, UPLOADER_PASSWORD = "pacs-admin", "upl0ad-Passw0rd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    process: subprocess.Popen
    port: int
    folder: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, path: Path) -> dict:
        r = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), auth=(UPLOADER, UPLOADER_PASSWORD), timeout=30)
        r.raise_for_status()
        return r.json()

    def delete_all(self) -> None:
        for study in requests.get(f"{self.url}/studies", auth=(UPLOADER, UPLOADER_PASSWORD), timeout=30).json():
            requests.delete(f"{self.url}/studies/{study}", auth=(UPLOADER, UPLOADER_PASSWORD), timeout=30)


def start_orthanc(folder: Path) -> Orthanc:
    missing = [str(p) for p in (ORTHANC, DICOMWEB_PLUGIN) if not p.exists()]
    if missing:
        reason = f"needs Orthanc with its DICOMweb plugin ({', '.join(missing)} missing: apt-get install orthanc orthanc-dicomweb)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PACS tests: {reason}")
        pytest.skip(reason)
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = {
        "Name": "aseanfl-test-pacs", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
        "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {READER: READER_PASSWORD, UPLOADER: UPLOADER_PASSWORD}, "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{port}", "Ssl": False},
        "OverwriteInstances": True, "StorageCompression": False, "HttpServerEnabled": True, "ConcurrentJobs": 1,
        "HttpThreadsCount": 8,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("wb")
    process = subprocess.Popen([str(ORTHANC), str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    pacs = Orthanc(process, port, folder)
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{pacs.dicomweb}/studies", auth=(READER, READER_PASSWORD), timeout=2).status_code == 200:
                return pacs
        except requests.RequestException:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("Orthanc did not answer within 60 s")


def stop_orthanc(pacs: Orthanc) -> None:
    pacs.process.terminate()
    try:
        pacs.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pacs.process.kill()
