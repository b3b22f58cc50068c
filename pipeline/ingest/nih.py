"""NIH ChestX-ray14 ingestion: `Data_Entry_2017[_v2020].csv`, `BBox_List_2017.csv`, split lists, PNGs.

Conventions (README "Ingestion rules"):
- `images.width/height` are those of the PNG we have (1024x1024 in NIH), the frame of `BBox_List_2017.csv`;
  with `--metadata-only` the NIH frame 1024x1024 is assumed. Pixel spacing is rescaled from the original
  detector image (`OriginalImage[Width,Height]`) to that frame.
- `split` is `test` for `test_list.txt`, else `train` (validation is carved from train by patient later).
- Images are files under `images/` or `images_*/images/`, or members of NIH's own `images_*.tar.gz` archives
  beside the CSVs, read as a stream (`pipeline.ingest.archives`); a file of the same name wins over a member.
- A dataset holding `truth.csv` is a phantom: its every-instance boxes land in `gt_boxes` with source `truth`;
  `BBox_List_2017.csv` boxes always land with source `bbox_list`.
"""
from __future__ import annotations

import gzip
import itertools
import os
from pathlib import Path, PurePosixPath
from typing import Iterator

import pandas as pd

from pipeline.base.coords import box_inside
from pipeline.base.home import Home
from pipeline.base.vocab import UnknownFinding, normalize_finding, parse_labels
from pipeline.images.rejects import Reject
from pipeline.ingest.archives import ArchiveBroken, Member, archive_files, members
from pipeline.ingest.common import (Item, clear_rejects, decode_png, ingest_images, ingest_lock, reject_rows,
                                    upsert_images)
from pipeline.ingest.layout import image_files
from pipeline.runs.record import writer
from warehouse import db

STAGE = "ingest.nih"
NIH_FRAME = (1024, 1024)
DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")


def _find(root: Path, name: str) -> Path | None:
    for cand in (root / name, root / f"{name}.gz"):
        if cand.exists():
            return cand
    return None


def read_data_entry(path) -> pd.DataFrame:
    """Either Data_Entry version -> columns image_id, labels_raw, follow_up, patient_id, age, sex, view,
    orig_w, orig_h, orig_spacing_x, orig_spacing_y (positional: the header's `[Width,Height]` splits)."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    raw = raw.loc[:, [c for c in raw.columns if not c.startswith("Unnamed")]]
    if raw.shape[1] < 11:
        raise ValueError(f"{path}: expected 11 columns as in NIH's Data_Entry_2017, found {raw.shape[1]}")
    df = raw.iloc[:, :11].copy()
    df.columns = ["image_id", "labels_raw", "follow_up", "patient_id", "age", "sex", "view",
                  "orig_w", "orig_h", "orig_spacing_x", "orig_spacing_y"]
    df["age"] = pd.to_numeric(df["age"].str.rstrip("YMDW").str.lstrip("0").replace("", "0"), errors="coerce")
    for col in ("follow_up", "orig_w", "orig_h", "orig_spacing_x", "orig_spacing_y"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["patient_id"] = df["patient_id"].str.strip().str.lstrip("0").replace("", "0")
    return df


def read_bbox_csv(path) -> pd.DataFrame:
    """BBox_List_2017.csv -> image_id, finding_raw, x, y, w, h (its header splits into `Bbox [x`,`y`,`w`,`h]`)."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = raw.iloc[:, :6].copy()
    df.columns = ["image_id", "finding_raw", "x", "y", "w", "h"]
    for col in "xywh":
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def read_list(path: Path | None) -> set[str]:
    if path is None:
        return set()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return {line.strip() for line in f if line.strip()}


def safe_name(root: Path, name: str) -> str:
    """Reject names that escape the dataset root (`../`, absolute paths, backslashes)."""
    p = PurePosixPath(name.replace("\\", "/"))
    if not name or p.is_absolute() or ".." in p.parts or name.startswith("~") or len(p.parts) != 1:
        raise Reject("path_escape", f"image name {name!r} is not a plain file name inside the dataset root")
    return name


def _png_decoder(data: bytes, suffix: str):
    return decode_png(data, suffix), {}


def ingest_nih(home, root, sizes=(256,), metadata_only: bool = False, workers: int | None = None) -> dict:
    """Ingest an NIH-layout folder into the warehouse (and the image cache unless `metadata_only`)."""
    home = (home if isinstance(home, Home) else Home.resolve(home)).make()
    root = Path(root).resolve()
    source = str(root)
    entry_path = next((p for n in DATA_ENTRY_NAMES if (p := _find(root, n))), None)
    if entry_path is None:
        raise FileNotFoundError(f"no {' or '.join(DATA_ENTRY_NAMES)} under {root}")
    entries = read_data_entry(entry_path)
    test = read_list(_find(root, "test_list.txt"))
    phantom = (root / "truth.csv").exists()
    rejects: list[tuple[str, Reject]] = []
    items: list[Item] = []
    files = {} if metadata_only else image_files(root)
    seen: set[str] = set()
    for rec in entries.itertuples(index=False):
        try:
            name = safe_name(root, rec.image_id)
            if name in seen:
                raise Reject("duplicate_row", f"{name} appears more than once in {entry_path.name}")
            labels = parse_labels(rec.labels_raw)
        except Reject as rej:
            rejects.append((f"{entry_path.name}:{rec.image_id}", rej))
            continue
        except UnknownFinding as exc:
            rejects.append((f"{entry_path.name}:{rec.image_id}", Reject("unknown_finding", str(exc))))
            continue
        seen.add(name)
        row = {"image_id": name, "patient_id": rec.patient_id, "follow_up": rec.follow_up,
               "age": None if pd.isna(rec.age) else int(rec.age), "sex": rec.sex or None,
               "view": rec.view or None, "split": "test" if name in test else "train",
               "source": "phantom" if phantom else "nih"}
        item = Item(path=str(files.get(name, root / "images" / name)), rel=f"images/{name}", row=row, labels=labels)
        if metadata_only:
            item.row.update(width=NIH_FRAME[0], height=NIH_FRAME[1], source_sha256=None)
        items.append((item, rec))
    spacing = {it.row["image_id"]: (rec.orig_w, rec.orig_h, rec.orig_spacing_x, rec.orig_spacing_y)
               for it, rec in items}
    items = [it for it, _ in items]
    stream = _Sources(root, entry_path.name, {it.row["image_id"]: it for it in items if it.row["image_id"] not in files})
    with ingest_lock(home):   # short connections only: readers get in between the chunk commits
        con = writer(home)
        try:
            with db.transaction(con):
                reject_rows(con, STAGE, source, rejects)
            if metadata_only:
                for it in items:
                    _set_spacing(it.row, spacing[it.row["image_id"]], NIH_FRAME)
                with db.transaction(con):
                    upsert_images(con, [it.row for it in items], {it.row["image_id"]: it.labels for it in items})
        finally:
            con.close()
        if metadata_only:
            counts = {"images": len(items), "decoded": 0, "skipped_cached": 0, "rejects": 0, "broken_sources": 0}
        else:
            found = [it for it in items if it.row["image_id"] in files]
            counts = ingest_images(home, itertools.chain(found, stream), sizes, STAGE, source, _png_decoder,
                                   workers, desc="ingest nih", total=len(items))
        con = writer(home)
        try:
            if not metadata_only:
                _fix_spacing(con, spacing)
                with db.transaction(con):
                    clear_rejects(con, STAGE, source, stream.whole)
                    counts["rejects"] += reject_rows(con, STAGE, source, stream.damaged)
            counts["rejects"] += len(rejects)
            counts["boxes"], n_box_rejects = _ingest_boxes(con, root, source, phantom)
            counts["rejects"] += n_box_rejects
        finally:
            con.close()
    return counts


class _Sources:
    """The images not found as files, in the order they come: members of the archives under `root` (each read
    once, stopping when nothing is left to find), then the ones no archive held, as `missing_image` faults.
    Afterwards `whole` names the archives read to their end and `damaged` holds a reject per broken one."""

    def __init__(self, root: Path, entry_name: str, pending: dict[str, Item]):
        self.root, self.entry_name, self.pending = root, entry_name, pending
        self.whole: list[str] = []
        self.damaged: list[tuple[str, Reject]] = []

    def __iter__(self) -> Iterator[Item]:
        for archive in archive_files(self.root):
            if not self.pending:
                break
            rel = archive.relative_to(self.root).as_posix()
            try:
                for m in members(archive, self.pending):
                    yield self._take(m, archive, rel)
            except ArchiveBroken as exc:
                self.damaged.append((rel, exc.reject))
                if exc.member is not None:
                    yield self._take(exc.member, archive, rel)
            else:
                self.whole.append(rel)
        note = "".join(f"; {rel} broke before its end and may hold it" for rel, _ in self.damaged)
        for name, item in self.pending.items():
            item.fault = Reject("missing_image", f"{self.entry_name} lists {name} but no such file is under images/ "
                                                 f"or images_*/images/, nor a member of images_*.tar.gz{note}")
            yield item

    def _take(self, m: Member, archive: Path, rel: str) -> Item:
        item = self.pending.pop(m.name)
        item.path, item.data, item.fault = f"{archive}/{m.member}", m.data, m.fault
        item.row.update(archive=rel, member=m.member)
        return item


def _set_spacing(row: dict, orig, frame) -> None:
    ow, oh, sx, sy = orig
    row["spacing_x"] = None if pd.isna(sx) or pd.isna(ow) else float(sx) * float(ow) / frame[0]
    row["spacing_y"] = None if pd.isna(sy) or pd.isna(oh) else float(sy) * float(oh) / frame[1]


def _fix_spacing(con, spacing: dict) -> None:
    """Rescale the original detector spacing to the stored frame, once widths are known."""
    df = pd.DataFrame([(k, *v) for k, v in spacing.items()], columns=["image_id", "ow", "oh", "sx", "sy"])
    con.register("_sp", df)
    con.execute("""UPDATE images SET spacing_x = _sp.sx * _sp.ow / images.width,
                                     spacing_y = _sp.sy * _sp.oh / images.height
                   FROM _sp WHERE images.image_id = _sp.image_id""")
    con.unregister("_sp")


def _ingest_boxes(con, root: Path, source: str, phantom: bool) -> tuple[int, int]:
    """Load BBox_List_2017.csv (and a phantom's truth.csv), validated against the ingested images."""
    tables = []
    if (p := _find(root, "BBox_List_2017.csv")) is not None:
        tables.append(("bbox_list", p, read_bbox_csv(p)))
    if phantom:
        truth = pd.read_csv(root / "truth.csv")
        truth = truth.iloc[:, :6].set_axis(["image_id", "finding_raw", "x", "y", "w", "h"], axis=1)
        tables.append(("truth", root / "truth.csv", truth))
    n_rows, rejects = 0, []
    known = dict((r[0], r[1:]) for r in con.execute("SELECT image_id, width, height FROM images").fetchall())
    labels: dict[str, set] = {}
    for iid, f in con.execute("SELECT image_id, finding FROM labels").fetchall():
        labels.setdefault(iid, set()).add(f)
    for box_source, path, df in tables:
        good = []
        for k, rec in enumerate(df.itertuples(index=False)):
            where = f"{path.name}:{k + 2}:{rec.image_id}"
            try:
                finding = normalize_finding(str(rec.finding_raw))
            except UnknownFinding as exc:
                rejects.append((where, Reject("unknown_finding", str(exc))))
                continue
            if rec.image_id not in known:
                rejects.append((where, Reject("box_image_unknown", f"box for {rec.image_id}, which is not an "
                                                                   "ingested image (missing or rejected)")))
                continue
            w_img, h_img = known[rec.image_id]
            box = (rec.x, rec.y, rec.w, rec.h)
            if any(pd.isna(v) for v in box) or not box_inside(box, w_img, h_img):
                rejects.append((where, Reject("box_outside_image", f"box {box} is empty or outside the "
                                                                   f"{w_img}x{h_img} image")))
                continue
            if finding not in labels.get(rec.image_id, set()):
                rejects.append((where, Reject("box_finding_not_labeled", f"{finding} box on an image whose "
                                                                         "labels do not include it")))
                continue
            good.append((rec.image_id, finding, *map(float, box), box_source))
        out = pd.DataFrame(good, columns=["image_id", "finding", "x", "y", "w", "h", "source"])
        with db.transaction(con):
            con.register("_box", out)
            con.execute("DELETE FROM gt_boxes WHERE source = ? AND image_id IN (SELECT image_id FROM _box)",
                        [box_source])
            con.execute("INSERT INTO gt_boxes SELECT * FROM _box")
            con.unregister("_box")
        n_rows += len(out)
    with db.transaction(con):
        reject_rows(con, STAGE, source, rejects)
    return n_rows, len(rejects)
