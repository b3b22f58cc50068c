"""The cost of verifying cached images on every read (issue #21, item 2): cache read throughput with each image's
crc32 checked against `cache_checksums` over the same reads without, in one run.

The rule of the issue: verify on every read if the ratio stays >= 0.9, otherwise at `harvest check` and when
mining reads. Reads are shuffled batches (`CacheDataset.get_batch`, as training reads); the pairs (plain, verified)
alternate and each is timed by process CPU time (a shared machine distorts it less than wall time), the ratio
is the median over the pairs. Also measured: the same with the CPU's uint8->float normalization after the read
(training's data path on a CPU), and one thread's verified read rate, against which a GPU's forward rate is set.

    python bench/cache_verify.py [--quick] [--size 512] [--n 512] [--batch 64]

Last line: `cache verified/plain read ratio: X`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.images.dataset import CacheDataset, normalize  # noqa: E402
from pipeline.ingest.nih import ingest_nih  # noqa: E402


def _pass(ds: CacheDataset, batches, verify: bool, then=None) -> float:
    """Images per CPU second over `batches` read once."""
    t0, seen = time.process_time(), 0
    for idx in batches:
        b = ds.get_batch(idx, verify=verify)
        seen += len(then(b["image"]) if then else b["image"])
    return seen / max(time.process_time() - t0, 1e-9)


def ratio(ds: CacheDataset, batches, repeats: int, then=None) -> tuple[float, float, float]:
    """(median verified/plain ratio, median plain rate, median verified rate) over alternating pairs."""
    pairs = [(_pass(ds, batches, False, then), _pass(ds, batches, True, then)) for _ in range(repeats)]
    plain, verified = (float(np.median([p[k] for p in pairs])) for k in (0, 1))
    return float(np.median([v / p for p, v in pairs])), plain, verified


def main(argv=None) -> None:
    from ingest import make_dataset   # bench/ingest.py, beside this script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 1 min)")
    ap.add_argument("--n", type=int, default=None, help="images (default 512, quick 192)")
    ap.add_argument("--size", type=int, default=512, help="cache size (the paper trains at 512)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="alternating pairs (default 9, quick 5)")
    args = ap.parse_args(argv)
    n, repeats = args.n or (192 if args.quick else 512), args.repeats or (5 if args.quick else 9)
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp) / "nih", n, 256)
        ingest_nih(Path(tmp) / "home", Path(tmp) / "nih", sizes=(args.size,), workers=1)
        ds = CacheDataset(Path(tmp) / "home", size=args.size)
        order = np.random.default_rng(0).permutation(len(ds))
        batches = [order[s:s + args.batch] for s in range(0, len(ds), args.batch)]
        _pass(ds, batches, True)   # warm: page cache, descriptors
        read, plain, verified = ratio(ds, batches, repeats)
        norm = ratio(ds, batches, repeats, then=normalize)[0]
    mb = args.size * args.size / 2**20
    print(f"{n} cached images at {args.size} px ({mb:.2f} MiB each), shuffled batches of {args.batch}, "
          f"{repeats} alternating pairs, process CPU time")
    print(f"plain read: {plain:.0f} img/s ({plain * mb:.0f} MiB/s); verified: {verified:.0f} img/s "
          f"({verified * mb:.0f} MiB/s), one thread")
    print(f"read + uint8->float normalize on the CPU, verified/plain: {norm:.2f}")
    print(f"cache verified/plain read ratio: {read:.2f}")


if __name__ == "__main__":
    main()
