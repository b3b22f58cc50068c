"""How visible is each finding on the phantom, at each input size? (#19: is a finding the classifier misses
there to be seen at all?) The figures of `pipeline.phantom.visibility`: per finding, on renders with and without
the lesion (same anatomy, noise and window), the lesion's contrast over its core, the clutter around it, their
ratio, a matched-filter d' and the core's size in pixels; medians over instances. Nothing depends on a model.
Renders use a pretraining seed (1999): no evaluation phantom is drawn.

    python bench/visibility.py [--n 24] [--sizes 256,384,512,1024] [--difficulty 0,0.5] [--csv out.csv]
    python bench/visibility.py --quick      # 4 instances per finding, 256 and 1024 px, the last difficulty

Last line: `nodule/effusion contrast-clutter ratio at 256 px: X` (difficulty: the last one given).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.base.vocab import BOXED_FINDINGS  # noqa: E402
from pipeline.config.harvest import parse_difficulty  # noqa: E402
from pipeline.phantom.visibility import table  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 instances per finding, 256 and 1024 px (< 1 min)")
    ap.add_argument("--n", type=int, default=24, help="instances per finding and difficulty")
    ap.add_argument("--sizes", default="256,384,512,1024")
    ap.add_argument("--difficulty", default="0,0.5", help="comma-separated (easy, medium, hard or numbers)")
    ap.add_argument("--csv", help="write the table here")
    a = ap.parse_args(argv)
    n, sizes = (4, [256, 1024]) if a.quick else (a.n, [int(s) for s in a.sizes.split(",")])
    diffs = [parse_difficulty(d) for d in a.difficulty.split(",")]
    if a.quick:
        diffs = diffs[-1:]
    t0 = time.perf_counter()
    df = table(BOXED_FINDINGS, n, sizes, diffs)
    pd.set_option("display.width", 160)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if a.csv:
        df.to_csv(a.csv, index=False, float_format="%.4g")
    print(f"{time.perf_counter() - t0:.0f} s")
    at = df[(df["difficulty"] == diffs[-1]) & (df["size"] == 256)].set_index("finding")["contrast_clutter"]
    print(f"nodule/effusion contrast-clutter ratio at 256 px: {at['Nodule'] / at['Effusion']:.3f}")


if __name__ == "__main__":
    main()
