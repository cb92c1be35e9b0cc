"""The hospital's PACS as a data source, against a real Orthanc (tests/orthanc.py): studies of
the contest's modalities (CT with Hounsfield rescale and window, X-ray MONOCHROME1, colour
ultrasound) uploaded to it; check-data reports on them like files; a wrong password, a PACS that
is not there, a study that is not there and a timeout mid-retrieval each get a clear line naming
the study and the HTTP status, with nothing half-stored; a changed instance invalidates the
cache; a federation of one hospital on files and one on the PACS learns, and neither the
password nor a UID leaves."""

from __future__ import annotations

import csv
import re
import socket

import numpy as np
import pydicom
import pytest
import requests
import torch
from inprocess import InProcessGrid, Wire, site_yaml
from orthanc import READER, READER_PASSWORD, start_orthanc, stop_orthanc
from typer.testing import CliRunner

from aseanfl.cli import app
from client.training.app import app as deployed_app
from client.config import load_site
from client.training.site import SITE_CONFIG_KEY
from medimaging import dicomgen
from medimaging.datasets import Split, targets, to_tensor
from medimaging.dicomweb import store_of
from medimaging.files import decode
from medimaging.synthetic import site_images
from server.engine.rounds import run_federation
from server.records.outputs import read_rows
from simulations.config import load_config
from simulations.runner import prepare_run

MODALITIES = ("CT", "DX", "US")
PATIENT = {"PatientName": "Tran^Van Minh", "PatientID": "CR-7731-0042", "InstitutionName": "Cho Ray Hospital"}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding 240 studies, one image each (80 per modality), lesion or normal."""
    folder = tmp_path_factory.mktemp("pacs")
    server = start_orthanc(folder / "orthanc")
    (x, y), _ = site_images(1, 11, 240, 10)
    assert x.std() > 0.02 and 0 < y.mean() < 1, "the generated images are blank or of one class"
    rows = []
    for k, (img, label) in enumerate(zip(x, y, strict=True)):
        modality = MODALITIES[k % 3]
        path = dicomgen.as_modality(folder / "upload" / f"{k}.dcm", img[0], modality, header=PATIENT)
        server.upload(path)
        rows.append({"study": str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID),
                     "label": "lesion" if label else "normal", "modality": modality})  # the class names of write_pngs
    server.rows = rows
    yield server
    stop_orthanc(server)


def pacs_site(tmp_path, pacs, rows, name="cho-ray", extra="", password=READER_PASSWORD, url=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pacs.password").write_text(password + "\n")
    with (tmp_path / "studies.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["study", "label"])
        writer.writeheader()
        writer.writerows({"study": r["study"], "label": r["label"]} for r in rows)
    site = tmp_path / "site.yaml"
    site.write_text(f"site: {name}\ndata:\n  image_size: 32\n  cache_dir: {tmp_path / 'cache'}\n  dicomweb:\n"
                    f"    url: {url or pacs.dicomweb}\n    username: {READER}\n    password_file: pacs.password\n"
                    f"    manifest: studies.csv\n    timeout_s: 3\n{extra}"
                    f"state_dir: {tmp_path / 'state'}\nrequire_approval: false\ncompute:\n  threads: 1\n")
    return site


def check_data(site) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, ["client", "check-data", "-c", str(site)], env={"COLUMNS": "80"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output.splitlines()


def test_check_data_reads_the_pacs_like_files_with_get_requests_only(tmp_path, pacs, monkeypatch):
    missing = "1.2.826.0.1.3680043.8.498.999999999"
    rows = pacs.rows + [{"study": missing, "label": "normal"}, {"study": "../../etc", "label": "normal"}]
    methods = []
    send = requests.Session.send
    monkeypatch.setattr(requests.Session, "send", lambda self, req, **kw: (methods.append(req.method), send(self, req, **kw))[1])
    code, lines = check_data(pacs_site(tmp_path, pacs, rows))
    assert code == 0, lines
    assert "cho-ray: 240 usable images, 2 problems" in lines, lines
    assert f"skipped study {missing}: not on the PACS (listed in studies.csv:242)" in lines, lines
    assert "skipped studies.csv:243: '../../etc' is not a DICOM UID (digits and dots, at most 64)" in lines, lines
    assert any(line.startswith("image sizes: ") and "(240)" in line for line in lines), lines
    assert set(methods) == {"GET"} and len(methods) >= 480  # QIDO + WADO per study: a read-only account is enough
    stored = list(store_of(load_site(tmp_path / "site.yaml").data).iterdir())
    assert len(stored) == 240 and not any(p.name.startswith(".") for f in stored for p in f.iterdir())


def test_the_modalities_read_as_they_were_made(tmp_path, pacs):
    """CT windowed, MONOCHROME1 inverted, colour ultrasound in luminance: each decoded image from
    the PACS matches the picture it was made from (rank correlation: scaling aside)."""
    (x, _), _ = site_images(1, 11, 240, 10)
    site = load_site(pacs_site(tmp_path, pacs, pacs.rows[:6]))
    from medimaging.pixels import read_pixels

    decode(site.data, write_cache=False)  # retrieves into the store
    for k, row in enumerate(pacs.rows[:6]):
        path = next((store_of(site.data) / f"study-{row['study']}").iterdir())
        pixels, _ = read_pixels(path, 2, site.data.dicom)
        made = x[k, 0]
        corr = np.corrcoef(pixels.ravel(), made.ravel())[0, 1]
        assert corr > 0.97, (row["modality"], corr)  # MONOCHROME1 not inverted would give -1


def test_wrong_password_absent_pacs_and_a_password_in_site_yaml_are_one_line_errors(tmp_path, pacs):
    code, lines = check_data(pacs_site(tmp_path / "a", pacs, pacs.rows[:2], password="wrong"))
    assert code == 2 and lines == [f"data error: data.files.dicomweb: the PACS at {pacs.dicomweb} refused the account "
                                   f"'{READER}' (HTTP 401); check the username and the password file or variable"], lines
    closed = "http://127.0.0.1:9/dicom-web"
    code, lines = check_data(pacs_site(tmp_path / "b", pacs, pacs.rows[:2], url=closed))
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"data error: data.files.dicomweb: cannot reach the PACS at {closed}"), lines
    site = pacs_site(tmp_path / "c", pacs, pacs.rows[:2])
    site.write_text(site.read_text().replace("    password_file: pacs.password\n", "    password: hunter2\n"))
    code, lines = check_data(site)
    assert code == 2 and len(lines) == 1 and "no password in site.yaml" in lines[0], lines
    assert not (tmp_path / "a" / "cache").exists() and not (tmp_path / "b" / "cache").exists()  # nothing stored


def test_a_timeout_mid_retrieval_stores_nothing_of_that_study_and_a_changed_instance_is_read_again(tmp_path, pacs, monkeypatch):
    path = pacs_site(tmp_path, pacs, pacs.rows[:6])
    # 10 s, not the other tests' 3: on a loaded machine Orthanc may take seconds to answer a normal
    # request, and only the one sent into the silent socket may time out
    path.write_text(path.read_text().replace("    timeout_s: 3\n", "    timeout_s: 10\n"))
    site = load_site(path)
    wado = []
    send = requests.Session.send
    # A PACS that stops answering mid-retrieval: the fourth instance's request goes to a socket that
    # takes the connection and the request (the kernel's backlog) and never answers. Orthanc itself
    # answers every other request, so exactly one study times out, whatever the machine's load.
    silent = socket.create_server(("127.0.0.1", 0), backlog=8)

    def silence_the_fourth_instance(self, req, **kw):
        if req.method == "GET" and "/instances/" in req.url:
            wado.append(req.url)
            if len(wado) == 4:
                req.url = req.url.replace(pacs.url, f"http://127.0.0.1:{silent.getsockname()[1]}")
        return send(self, req, **kw)

    monkeypatch.setattr(requests.Session, "send", silence_the_fourth_instance)
    try:
        decoded = decode(site.data)
    finally:
        silent.close()
    assert len(wado) >= 6, wado  # every row's instance was asked for, the one after the silence too
    stuck = re.search(r"/studies/([0-9.]+)/", wado[3]).group(1)
    assert stuck in {r["study"] for r in pacs.rows[:6]}
    problems = {p.file: p.reason for p in decoded.inventory.problems}
    assert problems.get(f"study {stuck}", "").startswith("the PACS did not answer within 10 s"), problems
    assert "nothing of it was stored" in problems[f"study {stuck}"]
    assert len(problems) == 1 and len(decoded.shapes) == 5, problems  # the others were read
    assert not (store_of(site.data) / f"study-{stuck}").exists()
    monkeypatch.setattr(requests.Session, "send", send)
    again = decode(site.data)
    assert not again.inventory.problems and again.cache != decoded.cache and len(np.load(again.cache)["train_labels"]) + \
        len(np.load(again.cache)["test_labels"]) == 6
    assert decode(site.data).cache == again.cache  # nothing changed on the PACS: the cache is reused
    # the PACS's copy of one instance changes (same UIDs, new pixels): it is retrieved and decoded again
    first = next((store_of(site.data) / f"study-{pacs.rows[0]['study']}").iterdir())
    ds = pydicom.dcmread(first)
    ds.decompress()
    ds.PixelData = (np.full(ds.pixel_array.shape, 1500) + (np.arange(ds.Rows) % 7)[:, None]).astype(np.uint16).tobytes()
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    pacs.upload(changed)
    try:
        third = decode(site.data)
        assert third.cache != again.cache and not third.inventory.problems
        assert pydicom.dcmread(first).pixel_array.max() < 1510  # the stored copy is the new one
    finally:
        (x, y), _ = site_images(1, 11, 240, 10)
        pacs.upload(dicomgen.as_modality(tmp_path / "restore.dcm", x[0, 0], "CT", header={
            **PATIENT, "StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID,
            "SOPInstanceUID": ds.SOPInstanceUID}))


def test_a_query_narrows_the_manifest_to_matching_instances(tmp_path, pacs):
    site = load_site(pacs_site(tmp_path, pacs, pacs.rows[:9], extra="    query:\n      modality: US\n"))
    decoded = decode(site.data, write_cache=False)
    assert len(decoded.shapes) == 3  # the three ultrasound studies
    assert len(decoded.inventory.problems) == 6
    assert all(p.reason.startswith("matches no instance of the query") for p in decoded.inventory.problems)


def test_a_federation_of_one_hospital_on_files_and_one_on_the_pacs_learns(tmp_path, pacs):
    files_site = site_yaml(tmp_path, "site-a", 0, tmp_path / "site-a" / "state", samples=240)
    (tmp_path / "site-b").mkdir()
    pacs_yaml = pacs_site(tmp_path / "site-b", pacs, pacs.rows, name="site-b", extra="", password=READER_PASSWORD)
    cfg = load_config(None, {"sites": 2, "server.rounds": 4, "train.local_epochs": 3, "data.image_size": 32,
                             "server.output_dir": str(tmp_path / "runs")})
    plan = prepare_run(cfg)
    plan.progress = Wire()
    # the global test: the images each hospital's cache holds out (test_fraction), files and PACS alike
    held_out = [np.load(decode(load_site(p).data).cache) for p in (files_site, pacs_yaml)]
    plan.test = Split(torch.cat([to_tensor(a["test_images"], 32) for a in held_out]),
                      torch.cat([targets(a["test_labels"], 32) for a in held_out]))
    assert len(plan.test) >= 40 and 0.2 < plan.test.y.float().mean() < 0.8
    plan.node_names = {100: "site-a", 101: "site-b"}
    grid = InProcessGrid(deployed_app, 2)
    for nid, path in zip(grid.contexts, (files_site, pacs_yaml), strict=True):
        grid.contexts[nid].node_config = {SITE_CONFIG_KEY: str(path)}
    run_federation(grid, plan)
    rows = read_rows(plan.run_dir)
    assert {r["status"] for r in rows if r["site"] in ("site-a", "site-b")} == {"ok"}, plan.progress.problems
    pacs_rows = [r for r in rows if r["site"] == "site-b"]
    assert pacs_rows[-1]["num_train"] >= 140  # the PACS hospital trained on its 240 studies (less test and validation)
    final = [r for r in rows if r["site"] == "global"][-1]
    assert final["test_auc"] > 0.7, final
    secrets = [READER_PASSWORD.encode(), b"Tran", b"CR-7731", b"Cho Ray"] + [r["study"].encode() for r in pacs.rows]
    assert plan.progress.blobs and not [s for s in secrets for blob in plan.progress.blobs if s in blob]
    # the PACS goes away (site-b reads its site.yaml again, with a fresh cache): site-b answers with an
    # error naming neither the PACS nor a study, the round goes on with site-a, nothing crashed
    pacs_yaml.write_text(pacs_yaml.read_text().replace(pacs.dicomweb, "http://127.0.0.1:9/dicom-web")
                         .replace(str(tmp_path / "site-b" / "cache"), str(tmp_path / "site-b" / "cache2")))
    cfg = load_config(None, {"sites": 2, "server.rounds": 1, "train.local_epochs": 1, "data.image_size": 32,
                             "server.output_dir": str(tmp_path / "runs2"), "strategy.min_sites": 1})
    again = prepare_run(cfg, Wire())
    again.node_names = plan.node_names
    run_federation(grid, again)
    status = {r["site"]: r["status"] for r in read_rows(again.run_dir)}
    assert status["site-a"] == "ok" and status["site-b"] == "error", status
    said = [p for p in again.progress.problems if "site-b" in p]
    assert any("the hospital's PACS could not be read" in p for p in said), said
    assert not [p for p in said if "127.0.0.1" in p or "dicom-web" in p], said
