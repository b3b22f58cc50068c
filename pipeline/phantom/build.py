"""`generate`: write a phantom ChestX-ray14 in exactly the NIH on-disk layout, plus `truth.csv` and a manifest.

Work is grouped by (anatomy variant, view): a worker precomputes that base radiograph once and adds each
image's findings as projected local deltas (the issue's hint), then noise and the window. Every random draw
comes from a stream keyed by (seed, purpose, image index), so the output is byte-identical for a seed,
whatever the number of workers.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from pipeline.base.files import require_free
from pipeline.base.vocab import FINDINGS, parse_labels
from pipeline.config.harvest import parse_difficulty
from pipeline.phantom import anatomy, drr, findings, metadata

CHUNK = 24
PNG_BYTES_PER_PIXEL = 0.45   # measured: 2,000 images at 1024 px, difficulty 0.5, took 885 MB (0.42 B/px)


def n_variants(n: int) -> int:
    """Size of the pool of anatomy variants (patients map onto it): more images, more anatomies."""
    return int(np.clip(n // 250, 2, 48))


def code_version() -> str:
    """Hash of the phantom's own source: a change in the generator changes the manifest."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def encode_png(img: np.ndarray) -> bytes:
    """8-bit grayscale PNG with the Sub filter and Huffman-only deflate: several times faster than PIL's
    adaptive filtering on noisy radiographs, deterministic, and decodable by any reader."""
    h, w = img.shape
    rows = np.empty((h, w + 1), np.uint8)
    rows[:, 0] = 1                                              # filter type 1 = Sub
    rows[:, 1] = img[:, 0]
    np.subtract(img[:, 1:], img[:, :-1], out=rows[:, 2:], dtype=np.uint8, casting="unsafe")
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    data = z.compress(rows.tobytes()) + z.flush()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


# ---- worker side -------------------------------------------------------------------------------------------
_BASES: OrderedDict = OrderedDict()


def _base(variant_id: int, view: str, job: dict) -> drr.Base:
    key = (variant_id, view, job["seed"], job["size"])
    if key not in _BASES:
        if len(_BASES) >= 4:
            _BASES.popitem(last=False)
        variant = drr.sample_variant(_stream(job["seed"], 1, variant_id))
        _BASES[key] = drr.make_base(anatomy.load_atlas(), variant, view, job["size"])
    return _BASES[key]


def render_image(job: dict, item: dict, footprints: list | None = None):
    """One image -> (uint8 [size, size], truth rows [(finding, x, y, w, h)]). If `footprints` is a list, each
    finding's (row slice, col slice, footprint map) is appended to it (tests check the boxes against them)."""
    atlas = anatomy.load_atlas()
    base = _base(item["variant"], item["view"], job)
    L = base.L.copy()
    truth = []
    for f in item["findings"]:
        rng = _stream(job["seed"], 2, item["index"], FINDINGS.index(f))
        lesion = findings.make_lesion(f, rng, atlas, base, job["difficulty"])
        proj = drr.project_lesion(base, lesion)
        if proj is None:
            continue
        rs, cs, dP, fp = proj
        box = drr.footprint_box(rs, cs, fp)
        if box is None:
            continue
        drr.apply_lesion(base, L, rs, cs, dP)
        truth.append((f, *box))
        if footprints is not None:
            footprints.append((f, rs, cs, fp))
    img = drr.expose(base, L, _stream(job["seed"], 3, item["index"]))
    return img, truth


def _render_chunk(args):
    job, items = args
    out = []
    for item in items:
        img, truth = render_image(job, item)
        (Path(job["out"]) / "images" / item["image"]).write_bytes(encode_png(img))
        out.append((item["image"], truth))
    return out


# ---- parent side -------------------------------------------------------------------------------------------
def plan(n: int, seed: int):
    """Metadata, split, variants and boxed subset; cheap and deterministic."""
    rows = metadata.sample_rows(n, _stream(seed, 0, 0))
    is_test = metadata.assign_split(rows, _stream(seed, 0, 1))
    k = n_variants(n)
    pv = _stream(seed, 0, 2).integers(k, size=int(rows["patient"].max()) + 1)
    rows["variant"] = pv[rows["patient"].to_numpy()]
    rows["view"] = np.where(rows["view"].str.upper() == "AP", "AP", "PA")
    boxed = metadata.boxed_subset(rows, is_test, _stream(seed, 0, 3))
    return rows, is_test, boxed, k


def generate(out, n: int, seed: int, size: int = 1024, difficulty=0.0, workers: int | None = None,
             progress: bool = True) -> dict:
    """Write a phantom ChestX-ray14 of `n` images into `out` (NIH layout + truth.csv + phantom_manifest.json).

    Returns a summary dict: counts, variants, boxed images, per-finding truth instances, output paths.
    """
    from tqdm import tqdm
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    difficulty = parse_difficulty(difficulty)
    if n < 1:
        raise ValueError("n must be at least 1")
    require_free(out, int(n * PNG_BYTES_PER_PIXEL * size * size), f"a phantom of {n:,} images at {size} px")
    if size < 64 or size % 16:
        raise ValueError(f"size {size}: use a multiple of 16, at least 64 (NIH images are 1024)")
    rows, is_test, boxed, k = plan(n, seed)
    _clear_stale(out, set(rows["image"]))
    atlas = anatomy.load_atlas()           # before forking: workers share it
    findings.lungs(atlas)
    job = {"out": str(out), "seed": int(seed), "size": int(size), "difficulty": difficulty}
    items = [{"index": i, "image": r.image, "variant": int(r.variant), "view": r.view,
              "findings": parse_labels(r.labels)} for i, r in enumerate(rows.itertuples(index=False))]
    items.sort(key=lambda it: (it["variant"], it["view"], it["index"]))
    chunks = [(job, items[i:i + CHUNK]) for i in range(0, len(items), CHUNK)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(chunks)))
    truth: dict[str, list] = {}
    if workers == 1:
        results = map(_render_chunk, chunks)
        pool = None
    else:
        # fork shares the atlas with the workers; the pool starts before the progress bar's monitor thread
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers)
        results = pool.imap_unordered(_render_chunk, chunks)
    bar = tqdm(total=n, desc="phantom", unit="img", disable=not progress)
    try:
        for res in results:
            for name, t in res:
                truth[name] = t
            bar.update(len(res))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return _write_tables(out, rows, is_test, boxed, truth, k, job)


def _clear_stale(out: Path, keep: set) -> None:
    """Writing over an earlier phantom removes its images that this one does not have (ingestion would see
    them as orphans); any other non-empty folder is refused rather than mixed with."""
    others = [p for p in out.iterdir() if p.name != "images"] + list((out / "images").iterdir())
    if not others:
        return
    if not (out / "phantom_manifest.json").exists():
        raise ValueError(f"{out} is not empty and holds no phantom_manifest.json; choose an empty folder")
    for p in (out / "images").glob("*.png"):
        if p.name not in keep:
            p.unlink()


def _write_tables(out: Path, rows, is_test, boxed, truth, k, job) -> dict:
    header, _ = metadata.real_entries()
    size = job["size"]
    entries = []
    for r in rows.itertuples(index=False):
        variant = drr.sample_variant(_stream(job["seed"], 1, int(r.variant)))
        sp = round(drr.pixel_spacing(variant, size), 6)
        entries.append([r.image, r.labels, r.follow_up, r.patient, r.age, r.sex, r.view, size, size, sp, sp])
    metadata.write_csv(out / "Data_Entry_2017_v2020.csv", header, entries)
    truth_rows = [(name, f, *(round(v, 2) for v in box)) for name in sorted(truth) for f, *box in truth[name]]
    metadata.write_csv(out / "truth.csv", ["image_id", "finding", "x", "y", "w", "h"], truth_rows)
    lookup = {(name, f): box for name, f, *box in truth_rows}
    bbox_rows = [(name, "Infiltrate" if f == "Infiltration" else f, *lookup[(name, f)])
                 for name, f in sorted(boxed) if (name, f) in lookup]
    metadata.write_csv(out / "BBox_List_2017.csv", metadata.BBOX_HEADER, bbox_rows)
    names = rows["image"].tolist()
    (out / "train_val_list.txt").write_text("".join(f"{m}\n" for m, t in zip(names, is_test) if not t))
    (out / "test_list.txt").write_text("".join(f"{m}\n" for m, t in zip(names, is_test) if t))
    counts = {}
    for _, f, *_ in truth_rows:
        counts[f] = counts.get(f, 0) + 1
    summary = {"n": len(rows), "seed": job["seed"], "size": size, "difficulty": job["difficulty"],
               "variants": k, "patients": int(rows["patient"].nunique()), "test_images": int(is_test.sum()),
               "boxed_images": len({b[0] for b in bbox_rows}), "boxes": len(bbox_rows),
               "truth_boxes": len(truth_rows), "truth_per_finding": dict(sorted(counts.items())),
               "code_version": code_version(), "ct_sha256": dict(anatomy.SHA256),
               "metadata_sha256": dict(metadata.SHA256)}
    (out / "phantom_manifest.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return {**summary, "out": str(out)}


def sample_boxes(finding: str, count: int, seed: int = 0, size: int = 1024, difficulty=0.0,
                 variants: int = 2) -> np.ndarray:
    """Truth boxes [count, 4] (x, y, w, h) of `count` instances of `finding` on a few anatomy variants, made by
    the same code path as `generate` without writing images (box-size statistics, calibration)."""
    job = {"seed": int(seed), "size": int(size), "difficulty": parse_difficulty(difficulty)}
    atlas = anatomy.load_atlas()
    boxes = []
    for i in sorted(range(count), key=lambda i: (i % variants, i % 3 == 0)):   # one base at a time
        base = _base(i % variants, "AP" if i % 3 == 0 else "PA", job)
        lesion = findings.make_lesion(finding, _stream(seed, 4, i, FINDINGS.index(finding)), atlas, base,
                                      job["difficulty"])
        proj = drr.project_lesion(base, lesion)
        box = None if proj is None else drr.footprint_box(*proj[:2], proj[3])
        if box is not None:
            boxes.append(box)
    return np.array(boxes, float).reshape(-1, 4)
