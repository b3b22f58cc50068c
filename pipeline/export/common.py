"""What the export formats share: where each exported image comes from and how it is written (`ImageFiles`),
the per-split order and counts of an export, and what their readers give back (`ReviewItem`)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.base.files import sha256_file
from pipeline.base.home import Home
from pipeline.base.vocab import FINDINGS, SPLITS
from warehouse.db import reading

IMAGE_MODES = ("link", "copy", "none")
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")   # Label Studio renames uploaded files `<8 hex>-<name>`


def short(v: float) -> float:
    """Shortest decimal that reads back as the same float32 (boxes are stored as float32)."""
    return float(str(np.float32(v)))


def by_split(images: list[dict]) -> dict[str, list[dict]]:
    order = {s: k for k, s in enumerate(SPLITS)}
    out: dict[str, list[dict]] = {}
    for im in sorted(images, key=lambda im: (order.get(im["split"], len(order)), im["split"], im["image_id"])):
        out.setdefault(im["split"], []).append(im)
    return out


def counts(images: list[dict], written: list[dict]) -> dict:
    per_finding = Counter(b["finding"] for b in written)
    split_of = {im["image_id"]: im["split"] for im in images}
    boxes_per_split = Counter(split_of[b["image_id"]] for b in written)
    boxed = {b["image_id"] for b in written}
    return {"images": len(images), "boxes": len(written), "negatives": len(images) - len(boxed),
            "splits": {s: {"images": len(ims), "boxes": boxes_per_split[s]} for s, ims in by_split(images).items()},
            "per_finding": {name: per_finding[name] for name in FINDINGS if per_finding[name]}}


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return fn(*args, **kwargs)


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 for v in values)


# ------------------------------------------------------------------------------------------ images

@dataclass
class ImageFiles:
    """Where each exported image comes from, and how it is written beside the labels."""
    mode: str
    sources: dict[str, Path]                # image_id -> source file (link, copy) or path under `root` (none)
    decode: set[str] = field(default_factory=set)   # DICOM ids: decoded to PNG, never linked
    root: Path | None = None                # none: the recorded image root the paths are relative to
    salt: bytes | None = None
    written: Counter = field(default_factory=Counter)
    folders: dict[str, str] = field(default_factory=dict)  # image folders written (none: the root)
    members: dict[str, tuple] = field(default_factory=dict)   # ids read from an archive: (it, member, sha256)
    staged: dict[str, Path] = field(default_factory=dict)   # members read out, not yet placed
    staging: Path | None = None

    @classmethod
    def locate(cls, home: Home, images: list[dict], mode: str, roots: list[Path], con=None) -> "ImageFiles":
        """Find the source of every image under `roots` (DICOM files by content, their checksums read on `con`, else
        on a read-only connection of its own); one line naming the fix when one is missing."""
        from pipeline.ingest.layout import image_files
        dicom = [im for im in images if im["source"] == "dicom"]
        if dicom and mode == "none":
            raise ValueError(f"{len(dicom)} image(s) come from DICOM files, whose names may carry PHI: "
                             "use --images link or copy, which write them decoded as PNG")
        sources: dict[str, Path] = {}
        wanted = {im["image_id"] for im in images} - {im["image_id"] for im in dicom}
        for root in roots:
            if not wanted:
                break
            for name, path in image_files(root).items():
                if name in wanted:
                    sources[name] = path
                    wanted.discard(name)
        members = _find_members(home, wanted, roots, con) if wanted else {}
        wanted -= set(members)
        if members and mode == "none":
            iid, (archive, member, _) = next(iter(sorted(members.items())))
            raise ValueError(f"{len(members)} image(s) were ingested from NIH's archives, e.g. {member} of {archive}: "
                             "--images none would name files that do not exist; use --images link or copy (they "
                             f"are read from the archives), or extract the archives (tar xzf) in {archive.parent} "
                             "and ingest that folder again")
        salt = None
        if dicom:
            from pipeline.ingest.dicom import home_salt
            salt = home_salt(home)
            sources.update(_find_dicoms(home, dicom, roots, con))
        missing = sorted(wanted | {im["image_id"] for im in dicom if im["image_id"] not in sources})
        if missing and mode != "none":
            where = ", ".join(map(str, roots)) or "no ingest root is recorded"
            raise FileNotFoundError(f"{len(missing)} source image(s) not found, e.g. {missing[0]!r} (searched: "
                                    f"{where}); pass --image-root DIR where they are, or --images none to write "
                                    "paths relative to the recorded image root")
        root = None
        if mode == "none":
            if not roots:
                raise FileNotFoundError("no ingest root is recorded in the runs table: pass --image-root DIR")
            for name in missing:  # not on this machine: NIH's own layout under the latest root
                sources[name] = roots[0].resolve() / "images" / name
            under = {r.resolve() for r in roots for p in sources.values() if p.is_relative_to(r.resolve())}
            root = under.pop() if len(under) == 1 else Path(os.path.commonpath([p.parent for p in sources.values()]))
            sources = {k: Path(os.path.relpath(p, root)) for k, p in sources.items()}
        else:
            _check_contents([im for im in images if im["image_id"] in sources and im["source"] != "dicom"], sources)
        return cls(mode, sources, {im["image_id"] for im in dicom}, root, salt, members=members)

    def name(self, im: dict) -> str:
        """The exported file's name: the source's, or `<image_id>.png` for a decoded DICOM."""
        iid = im["image_id"]
        return f"{iid}.png" if iid in self.decode else iid

    def place(self, im: dict, out: Path, sub: str) -> str:
        """Write `im` into the folder `out/sub` (unless mode none); return its path as an annotation names it:
        relative to that folder, or with mode none to the image root."""
        self.folders[sub] = sub if self.mode != "none" else str(self.root)
        if self.mode == "none":
            return self.sources[im["image_id"]].as_posix()
        folder = out / sub
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / self.name(im)
        src = self.sources.get(im["image_id"])
        from PIL import Image
        if im["image_id"] in self.decode:
            from pipeline.images.dicom import read_dicom
            pixels = read_dicom(src, salt=self.salt).pixels
            _check_frame(im, pixels.shape[1], pixels.shape[0], "decoded DICOM")
            Image.fromarray(pixels).save(dest, compress_level=1)
            self.written["decoded"] += 1
            return dest.name
        if im["image_id"] in self.members:
            staged = self._read_out(im["image_id"], out.parent)
            _check_frame(im, *image_size(staged), f"{self.members[im['image_id']][1]} of {self.members[im['image_id']][0]}")
            os.replace(staged, dest)   # a member has no file to link: it is written out once, here
            self.written["extracted"] += 1
            return dest.name
        _check_frame(im, *image_size(src), str(src))
        _check_content(im, src)
        if self.mode == "link":
            try:
                os.link(src, dest)
                self.written["linked"] += 1
                return dest.name
            except OSError:  # another filesystem (EXDEV), or links not allowed there: copy
                pass
        shutil.copyfile(src, dest)
        self.written["copied"] += 1
        return dest.name

    def _read_out(self, image_id: str, beside: Path) -> Path:
        """The member of `image_id` as a file in a staging folder `beside` the export: its archive is read once,
        every member this export wants from it written out as it passes (one member in memory at a time), each
        checked against the sha256 it was ingested with."""
        if image_id not in self.staged:
            from pipeline.ingest.archives import read_members
            if self.staging is None:
                self.staging = Path(tempfile.mkdtemp(prefix=".members-", suffix=".tmp", dir=beside))
            archive = self.members[image_id][0]
            names = {iid: m for iid, (a, m, _) in self.members.items() if a == archive and iid not in self.staged}
            for iid, data in read_members(archive, names):
                if self.members[iid][2] != hashlib.sha256(data).hexdigest():
                    raise ValueError(f"{names[iid]} of {archive} is not the image {iid} ingested (its sha256 "
                                     "differs): the archive changed since ingestion; ingest it again")
                (self.staging / iid).write_bytes(data)
                self.staged[iid] = self.staging / iid
            if image_id not in self.staged:
                raise FileNotFoundError(f"{self.members[image_id][1]} cannot be read from {archive} (missing, or "
                                        "past a break in the archive): download it again, or pass --images none")
        return self.staged.pop(image_id)

    def close(self) -> None:
        """Drop the staging folder of archive members."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging, self.staged = None, {}

    def summary(self) -> dict:
        return {"mode": self.mode, "root": None if self.root is None else str(self.root), "folders": self.folders,
                **{k: self.written[k] for k in ("linked", "copied", "decoded")},
                **({"extracted": self.written["extracted"]} if self.members else {})}


_PNG = b"\x89PNG\r\n\x1a\n"


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file: a PNG's from its IHDR chunk (24 bytes, what PIL reads, without PIL's
    start-up per file: an export checks thousands), any other format through PIL."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == _PNG and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    from PIL import Image
    with Image.open(path) as img:
        return img.size


def _check_contents(images: list[dict], sources: dict[str, Path]) -> None:
    """`_check_content` of every image found in a folder, before anything is written; the files are hashed on a
    thread per core (hashlib and reads release the GIL), and `place` then finds each hash remembered."""
    from concurrent.futures import ThreadPoolExecutor
    todo = [im for im in images if im.get("source_sha256")]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(content_sha256, [sources[im["image_id"]] for im in todo]))
    for im in todo:
        _check_content(im, sources[im["image_id"]])


def _check_content(im: dict, src: Path) -> None:
    """A file from a folder is the version ingested: its sha256 is the `source_sha256` of its `images` row (a file
    edited in place keeps its frame; its boxes would then be written beside other pixels). Rows from a
    metadata-only ingest carry no checksum and are not checked."""
    want = im.get("source_sha256")
    if want and content_sha256(src) != want:
        raise ValueError(f"{src} is not the image {im['image_id']} ingested (its sha256 differs): the file changed "
                         "since ingestion; re-ingest it")


def _check_frame(im: dict, width: int, height: int, what: str) -> None:
    if (width, height) != (im["width"], im["height"]):
        raise ValueError(f"{what} is {width}x{height} but {im['image_id']} was ingested as {im['width']}x"
                         f"{im['height']} (the frame of its boxes): the file changed since ingestion; re-ingest it")


def _find_members(home: Home, wanted: set[str], roots: list[Path], con=None) -> dict[str, tuple[Path, str, str]]:
    """NIH image id -> (archive, member, sha256) of the images ingested from an archive under a root now."""
    from pipeline.ingest.archives import recorded
    with reading(home, con) as con:
        return recorded(con, wanted, roots)


def _find_dicoms(home: Home, dicom: list[dict], roots: list[Path], con=None) -> dict[str, Path]:
    """DICOM image id -> file, matched by content: the sha256 of each file under the roots (names may carry PHI)."""
    from pipeline.ingest.dicom import dicom_files
    with reading(home, con) as con:
        wanted = {im["image_id"] for im in dicom}
        by_sha = {sha: iid for sha, iid in con.execute(
            "SELECT source_sha256, image_id FROM images WHERE source = 'dicom'").fetchall() if iid in wanted}
    found = {}
    for root in roots:
        for path in dicom_files(root) if root.is_dir() and len(found) < len(by_sha) else []:
            iid = by_sha.get(content_sha256(path))
            if iid is not None and iid not in found:
                found[iid] = path.resolve()
    return found


_SHA_BY_STAT: dict[tuple, str] = {}


def content_sha256(path: Path) -> str:
    """`sha256_file`, remembered for this process by the file's identity and version (device, inode, size,
    mtime, ctime): `harvest export` checks its sources before the flow, and the flow finds them again without reading
    every DICOM file a second time. A file rewritten since is read anew."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _SHA_BY_STAT:
        _SHA_BY_STAT[key] = sha256_file(path)
    return _SHA_BY_STAT[key]


# ------------------------------------------------------------------------------------------ reading back

class MalformedFile(ValueError):
    """JSON that is neither a Label Studio export nor a COCO file."""


class ReviewItem:
    """One reviewed image as a file states it: candidate image ids, boxes in the file's units (`scale`: the
    frame's size in those units), the frame the file claims (pixels, or None) and problems found reading it."""

    def __init__(self, index: int, where: str, names: list[str], scale=(100.0, 100.0), frame=None):
        self.index, self.where, self.names, self.scale, self.frame = index, where, names, scale, frame
        self.boxes: list[dict] = []
        self.problems: list[tuple[str, str, str]] = []   # (reason, detail, where)

    def bad(self, reason: str, detail: str, where: str | None = None) -> None:
        self.problems.append((reason, detail, where or self.where))


def name_candidates(*names) -> list[str]:
    """Image ids a file name may stand for: itself, its base name, without Label Studio's upload prefix,
    and without a `.png` a decoded DICOM got on export."""
    out = []
    for name in names:
        if not isinstance(name, str) or not name:
            continue
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        for n in (name, base, _UPLOAD_PREFIX.sub("", base)):
            out += [n, n[:-4]] if n.lower().endswith(".png") else [n]
    return list(dict.fromkeys(out))
