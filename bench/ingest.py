"""PNG-to-cache ingestion rate per core vs cache reading rate, and ingestion from NIH's `images_0xx.tar.gz`
archives vs from the same files extracted, measured in one run.

Targets: cache reading >= 10x faster than PNG decoding (issue 2, `cache/png speedup`); ingesting the archives as
a stream about as fast as the extracted folder (issue 22). Last line: `archive/folder ingest ratio: X`.
"""
from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.images.dataset import CacheDataset, normalize
from pipeline.ingest.nih import ingest_nih

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def _write_pngs(root: Path, ks: range, size: int, seed: int) -> None:
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 80 + 70 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.1)
    for k in ks:
        rng = np.random.default_rng((seed, k))
        img = base + 25 * np.sin(xx * 40 + k) * np.exp(-(yy - 0.4) ** 2 / 0.05) + rng.normal(0, 4, base.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"{k + 1:08d}_000.png")


def make_dataset(root: Path, n: int, size: int, seed: int = 0, workers: int = 1) -> None:
    """Radiograph-like 8-bit PNGs (smooth anatomy + noise: compresses like real CXRs, not like flat images),
    written by `workers` processes (the same files whatever their number)."""
    (root / "images").mkdir(parents=True)
    chunks = [range(k, min(k + 256, n)) for k in range(0, n, 256)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_pngs, [root] * len(chunks), chunks, [size] * len(chunks), [seed] * len(chunks)))
    else:
        for ks in chunks:
            _write_pngs(root, ks, size, seed)
    lines = [HEADER] + [f"{k + 1:08d}_000.png,No Finding,0,{k + 1},50,F,PA,{size},{size},0.143,0.143\n"
                        for k in range(n)]
    (root / "Data_Entry_2017_v2020.csv").write_text("".join(lines))


def make_archives(root: Path, dest: Path, n_archives: int) -> None:
    """NIH's download of `root`: its CSV beside `images_001.tar.gz` ... (members `images/<name>`, gzip level 6)."""
    dest.mkdir()
    (dest / "Data_Entry_2017_v2020.csv").write_bytes((root / "Data_Entry_2017_v2020.csv").read_bytes())
    names = sorted(p.name for p in (root / "images").iterdir())
    per = -(-len(names) // n_archives)
    for k in range(0, len(names), per):
        with tarfile.open(dest / f"images_{k // per + 1:03d}.tar.gz", "w:gz", compresslevel=6) as tar:
            for name in names[k:k + per]:
                tar.add(root / "images" / name, arcname=f"images/{name}")


def _ingest_rate(source: Path, home: Path, n: int, size: int) -> float:
    t0 = time.perf_counter()
    counts = ingest_nih(home, source, sizes=(size,), workers=1)
    assert counts["decoded"] == n, counts
    return n / (time.perf_counter() - t0)


def _rate(ds, order, batch: int, fn, seconds: float) -> float:
    t0, seen = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for s in range(0, len(ds), batch):
            seen += fn(ds.get_batch(order[s:s + batch])).shape[0]
    return seen / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small run (< 1 min)")
    ap.add_argument("--n", type=int, default=None, help="images (default 512, quick 128)")
    ap.add_argument("--src-size", type=int, default=1024, help="PNG side, NIH is 1024")
    ap.add_argument("--size", type=int, default=256, help="cache size")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    n = args.n or (128 if args.quick else 512)
    rounds = 1 if args.quick else 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "nih"
        make_dataset(root, n, args.src_size)
        make_archives(root, Path(tmp) / "download", 4)
        folder, archive = [], []
        for r in range(rounds):   # alternating, each into a fresh home; the best of each
            folder.append(_ingest_rate(root, Path(tmp) / f"home-f{r}", n, args.size))
            archive.append(_ingest_rate(Path(tmp) / "download", Path(tmp) / f"home-a{r}", n, args.size))
        png_rate = max(folder)
        ds = CacheDataset(Path(tmp) / "home-f0", size=args.size)
        order = np.random.default_rng(0).permutation(len(ds))
        read_rate = _rate(ds, order, args.batch, lambda b: b["image"], 2 if args.quick else 5)
        norm_rate = _rate(ds, order, args.batch, lambda b: normalize(b["image"]), 2 if args.quick else 5)
    print(f"images: {n} PNGs at {args.src_size}px -> cache {args.size}px, 1 process, {os.cpu_count()} cores seen")
    print(f"png->cache ingest: {png_rate:.1f} img/s per core (read, sha256, decode, resize, commit)")
    print(f"cache read (shuffled batches of {args.batch} -> uint8 tensor): {read_rate:.0f} img/s")
    print(f"cache read + normalize to float32 on the CPU: {norm_rate:.0f} img/s "
          "(on a GPU the uint8 batch moves and is normalized on the device)")
    print(f"cache/png speedup: {read_rate / png_rate:.1f}")
    print(f"archives ({n} members in 4 images_0xx.tar.gz, streamed) -> cache: {max(archive):.1f} img/s per core; "
          f"folder: {png_rate:.1f} img/s per core (best of {rounds})")
    print(f"archive/folder ingest ratio: {max(archive) / png_rate:.2f}")


if __name__ == "__main__":
    main()
