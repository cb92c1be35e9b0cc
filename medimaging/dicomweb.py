"""The hospital's PACS as a data source, over DICOMweb (QIDO-RS to find, WADO-RS to retrieve),
with dicomweb-client: `data.files.dicomweb` in site.yaml.

Each labelled row of the manifest (a study, series or instance UID) is looked up and its
instances retrieved whole into a local store under cache_dir (the hospital's disk, like the
decoded cache), one folder per row, written only once every instance of the row has arrived: a
row that fails (not on the PACS, a timeout mid-retrieval) is a problem naming its UID and the
HTTP status, and nothing of it is stored. An instance is rewritten only when its content
changed, so the decoded cache (keyed by the stored files) is reused until the PACS changes.
Then the stored files are read by the same code as exported files (medimaging.dicom). Only GET
requests are made: a read-only account is enough. The password is read from a file or an
environment variable named in site.yaml, never from site.yaml itself, and is never sent anywhere
but to the PACS."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from medimaging.config import DicomWebConfig, FilesConfig

KEYS = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}
UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # DICOM's UID syntax: they name the store's folders and files
log = logging.getLogger("aseanfl")
LOGGERS = ("pydicom", "dicomweb_client", "retrying")  # their lines go to the local log, not the terminal


class SourceError(ValueError):
    """The PACS cannot be used at all (unreachable, credentials refused): one line, for the
    hospital (it names the PACS's address, so it is never sent to the server)."""


@dataclass
class Row:
    key: str  # "study", "series" or "instance"
    uid: str
    label: str
    split: str | None
    where: str  # manifest line


def store_of(cfg: FilesConfig) -> Path:
    """Where this PACS's retrieved instances are kept, under the cache folder."""
    return cfg.cache_dir / "pacs" / hashlib.sha256(cfg.dicomweb.url.encode()).hexdigest()[:12]


def _password(web: DicomWebConfig) -> str | None:
    if web.password_file is not None:
        try:
            return web.password_file.read_text().strip()
        except OSError as exc:
            raise SourceError(f"data.files.dicomweb.password_file: {web.password_file} cannot be read ({exc.strerror})") from None
    if web.password_env is not None:
        value = os.environ.get(web.password_env)
        if value is None:
            raise SourceError(f"data.files.dicomweb.password_env: the environment variable {web.password_env} is not set")
        return value
    return None


def client(web: DicomWebConfig):
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session, create_session_from_user_pass

    password = _password(web)
    session = create_session_from_user_pass(web.username, password) if web.username else create_session()
    if web.ca_certificate is not None:
        session.verify = str(web.ca_certificate)
    dw = DICOMwebClient(url=web.url, session=session, timeout=web.timeout_s)
    dw.set_http_retry_params(retry=False)  # a dead PACS is said at once; the daemon tries again next round
    return dw


def _value(item: dict, tag: str) -> str | None:
    from pydicom.datadict import tag_for_keyword

    element = item.get(f"{tag_for_keyword(tag):08X}")
    values = (element or {}).get("Value") or []
    return str(values[0]) if values else None


def _why(exc: BaseException, web: DicomWebConfig) -> tuple[str, bool]:
    """(reason, the whole source is unusable?) for an exception of requests/dicomweb-client."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            who = f"the account {web.username!r}" if web.username else "no account (set data.files.dicomweb.username)"
            return (f"data.files.dicomweb: the PACS at {web.url} refused {who} (HTTP {status}); check the username "
                    "and the password file or variable"), True
        if status == 404:
            return "not on the PACS (HTTP 404)", False
        return f"the PACS answered HTTP {status} ({exc.response.reason})", False
    if isinstance(exc, requests.Timeout):
        return f"the PACS did not answer within {web.timeout_s:g} s (data.files.dicomweb.timeout_s)", False
    if isinstance(exc, requests.ConnectionError):
        root = exc.args[0] if exc.args else exc
        detail = " ".join(str(getattr(root, "reason", root)).split())[:160]
        return f"data.files.dicomweb: cannot reach the PACS at {web.url} ({detail}); is it running, and the URL right?", True
    return " ".join(f"{type(exc).__name__}: {exc}".split()), False


def _manifest(web: DicomWebConfig, problems: list) -> list[Row]:
    from common.i18n import Text

    from medimaging.items import Problem, bad_split

    if not web.manifest.is_file():
        raise SourceError(f"data.files.dicomweb.manifest: file not found: {web.manifest}")
    rows = []
    with web.manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        keys = [k for k in KEYS if k in columns]
        if len(keys) != 1 or "label" not in columns:
            raise SourceError(f"{web.manifest.name}: needs a header with one UID column (study, series or instance), "
                              "label and optionally split")
        for line, row in enumerate(reader, start=2):
            uid, label, split = (row.get(keys[0]) or "").strip(), (row.get("label") or "").strip(), (row.get("split") or "").strip()
            where = f"{web.manifest.name}:{line}"
            if not uid or not label:
                problems.append(Problem.of(where, Text("empty {key} UID or label", key=keys[0])))
            elif not UID.fullmatch(uid) or len(uid) > 64:
                problems.append(Problem.of(where, Text("{uid} is not a DICOM UID (digits and dots, at most 64)", uid=repr(uid[:70]))))
            elif why := bad_split(split):
                problems.append(Problem.of(where, why))
            else:
                rows.append(Row(keys[0], uid, label, split or None, where))
    return rows


def _query_filters(web: DicomWebConfig) -> dict:
    q = web.query
    out = {}
    if q.modality:
        out["Modality"] = q.modality
    if q.study_date:
        out["StudyDate"] = q.study_date
    if q.series_description:
        out["SeriesDescription"] = q.series_description
    return out


def _instances(dw, row: Row, filters: dict) -> list[tuple[str, str, str]]:
    """(study, series, instance) UIDs of a manifest row that match the query."""
    found = dw.search_for_instances(search_filters={KEYS[row.key]: row.uid, **filters},
                                    fields=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
                                    get_remaining=True)
    out = [(_value(i, "StudyInstanceUID"), _value(i, "SeriesInstanceUID"), _value(i, "SOPInstanceUID")) for i in found]
    return sorted(u for u in out if all(u) and all(UID.fullmatch(v) for v in u))  # a PACS's answer names files


def _retrieve(dw, uids: tuple[str, str, str]) -> bytes:
    """One whole instance as a DICOM file's bytes."""
    import pydicom

    ds = dw.retrieve_instance(*uids, media_types=(("application/dicom", "*"),))  # as stored: any transfer syntax
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _write_row(folder: Path, instances: dict[str, bytes]) -> None:
    """The row's folder holds exactly these instances; unchanged ones (the same bytes) are not
    touched (their modification time keys the decoded cache), changed ones replaced whole
    (write, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    for sop, data in instances.items():
        path = folder / sop
        if path.is_file() and path.read_bytes() == data:
            continue
        tmp = folder / f".{sop}.part"
        tmp.write_bytes(data)
        tmp.replace(path)
    for old in folder.iterdir():
        if old.name not in instances:
            old.unlink()


def pacs_inventory(cfg: FilesConfig, inv) -> None:
    """Fill `inv` (a files.Inventory) with the PACS's labelled instances, retrieved into the store:
    one item per instance (2D) or per row (3D: the row's instances are the slices of a volume)."""
    from common.i18n import Text

    from medimaging.dicom import captured
    from medimaging.items import Item, Problem

    web = cfg.dicomweb
    rows = _manifest(web, inv.problems)
    dw, filters, store = client(web), _query_filters(web), store_of(cfg)
    notes: list[str] = []
    for row in rows:
        name = f"{row.key} {row.uid}"
        try:
            with captured(notes, LOGGERS):
                uids = _instances(dw, row, filters)
                if not uids:
                    why = (Text("matches no instance of the query (data.files.dicomweb.query) (listed in {where})",
                                where=row.where) if filters else Text("not on the PACS (listed in {where})", where=row.where))
                    inv.problems.append(Problem.of(name, why))
                    continue
                got = {sop: _retrieve(dw, (study, series, sop)) for study, series, sop in uids}
        except Exception as exc:  # noqa: BLE001 - every transport error becomes the row's reason or stops the source
            reason, fatal = _why(exc, web)
            if fatal:
                raise SourceError(reason) from None
            inv.problems.append(Problem.of(name, Text("{reason}; nothing of it was stored (listed in {where})",
                                                      reason=reason, where=row.where)))
            continue
        folder = store / f"{row.key}-{row.uid}"
        _write_row(folder, got)
        if cfg.spatial_dims == 3 and len(got) > 1:
            inv.items.append(Item(folder, row.label, row.split))
        else:
            inv.items += [Item(folder / sop, row.label, row.split) for sop in sorted(got)]
    keep = {f"{r.key}-{r.uid}" for r in rows}
    if store.is_dir():  # rows no longer in the manifest: their instances leave the store
        for folder in store.iterdir():
            if folder.is_dir() and folder.name not in keep:
                shutil.rmtree(folder)
    for note in notes:
        log.debug("dicomweb: %s", note)
