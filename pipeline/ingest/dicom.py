"""DICOM folder ingestion: every `*.dcm` (or extension-less DICOM) file under a root, decoded once.

Identifiers become pseudonyms in `pipeline.images.dicom.read_dicom`; nothing else from the header is kept
beyond sex, age, view position and pixel spacing. Rejects name the file by a pseudonym of its path relative to
the root (`reject_path`), keyed by the home's secret like the image and patient pseudonyms.
"""
from __future__ import annotations

import functools
from pathlib import Path

from pipeline.base.home import Home
from pipeline.ingest.common import Item, ingest_images, ingest_lock
from pipeline.runs.record import writer

STAGE = "ingest.dicom"


def home_salt(home: Home) -> bytes:
    """A per-home secret for pseudonyms, created once; keep it private to keep pseudonyms unlinkable."""
    path = home.root / ".pseudonym-salt"
    if not path.exists():
        import secrets
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


def reject_path(rel: str, salt: bytes) -> str:
    """The `rejects.path` of the file at `rel` (relative to the DICOM root), `salt` being `home_salt(home)`."""
    from pipeline.images.dicom import pseudonym
    return pseudonym("file", rel, salt)


def _decode(data: bytes, _suffix: str, salt: bytes):  # the content, not the name, says DICOM
    import io

    from pipeline.images.dicom import read_dicom
    img = read_dicom(io.BytesIO(data), salt=salt)
    meta = {k: img.meta.get(k) for k in ("image_id", "patient_id", "follow_up", "sex", "age", "view",
                                         "spacing_x", "spacing_y")}
    if meta["age"] is not None:
        meta["age"] = min(meta["age"], 90)   # HIPAA safe harbour: ages over 89 are one group, stored as 90
    return img.pixels, meta


def dicom_files(root: Path) -> list[Path]:
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and (p.suffix.lower() in (".dcm", ".dicom", "")):
            files.append(p)
    return files


def ingest_dicom(home, root, sizes=(256,), split: str = "train", workers: int | None = None) -> dict:
    home = (home if isinstance(home, Home) else Home.resolve(home)).make()
    root = Path(root).resolve()
    salt = home_salt(home)
    # The file name itself may carry PHI (e.g. a patient name): rejects name it by its path's pseudonym, keyed
    # by the home's secret so that a guessed name cannot be confirmed; find one with `reject_path`.
    items = [Item(path=str(p), rel=reject_path(p.relative_to(root).as_posix(), salt),
                  row={"split": split, "source": "dicom"}) for p in dicom_files(root)]
    with ingest_lock(home):
        con = writer(home)
        try:
            # rows named by the unsalted digest of earlier versions would confirm guessed names: this run renames them
            con.execute("DELETE FROM rejects WHERE stage = ? AND source = ? AND path LIKE 'file-%'", [STAGE, str(root)])
        finally:
            con.close()
        decoder = functools.partial(_decode, salt=salt)
        return ingest_images(home, items, sizes, STAGE, str(root), decoder, workers, desc="ingest dicom")
