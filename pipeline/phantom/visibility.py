"""How visible each finding is on the phantom, at each input size: a check of the phantom, not of a model.

Every instance is rendered twice with the same anatomy, noise and display window: with its lesion and without
(`build.render_image`), then both are shrunk as the cache shrinks them (PIL bilinear). Per instance and size,
with D = with - without (grey levels):
- contrast: mean |D| over the lesion's core (the pixels of its truth box where |D| >= half its maximum);
- clutter: the standard deviation of the lesion-free image over the truth box grown to twice its side (anatomy,
  noise and window together: what the lesion has to stand out from);
- contrast/clutter, and d' = sqrt(sum D^2) / clutter over the box (a matched filter that knows the lesion, under
  white clutter: an optimistic bound, since anatomy is not white);
- core: the side in pixels of a square with the core's area.
`bench/visibility.py` prints the medians per finding, size and difficulty.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.images.cache import resize
from pipeline.phantom import build

SEED = 1999          # a pretraining seed (pipeline.phantom.seeds): no evaluation phantom is rendered here


def measure(with_lesion: np.ndarray, without: np.ndarray, box, size: int) -> dict | None:
    """The instance's figures at `size` (`box`: x, y, w, h in the 1024 frame of the renders)."""
    a1 = resize(with_lesion, size).astype(np.float32)
    a0 = resize(without, size).astype(np.float32)
    k = size / with_lesion.shape[0]
    x, y, w, h = (v * k for v in box)
    r0, r1 = int(np.floor(y)), int(np.ceil(y + h))
    c0, c1 = int(np.floor(x)), int(np.ceil(x + w))
    d = np.abs(a1 - a0)[r0:r1, c0:c1]
    if d.size == 0 or d.max() == 0:
        return None
    core = d >= d.max() / 2
    gr0, gr1 = max(0, int(y - h / 2)), min(size, int(np.ceil(y + 1.5 * h)))
    gc0, gc1 = max(0, int(x - w / 2)), min(size, int(np.ceil(x + 1.5 * w)))
    clutter = float(a0[gr0:gr1, gc0:gc1].std())
    contrast = float(d[core].mean())
    per = 1 / max(clutter, 1e-6)
    return {"contrast": contrast, "clutter": clutter, "contrast_clutter": contrast * per,
            "d_prime": float(np.sqrt((d ** 2).sum())) * per, "core_px": float(np.sqrt(core.sum()))}


def renders(finding: str, n: int, difficulty: float, seed: int = SEED):
    """n instances of `finding` alone: (with, without, box) at 1024 px, on 4 anatomy variants, PA and AP."""
    job = {"seed": seed, "size": 1024, "difficulty": difficulty}
    out, i = [], 0
    while len(out) < n and i < 4 * n:
        item = {"index": i, "variant": i % 4, "view": "PA" if i % 3 else "AP", "findings": [finding]}
        img, truth = build.render_image(job, item)
        i += 1
        if not truth:
            continue            # projected behind the dome or outside the frame: no box, as in the phantom
        bare, _ = build.render_image(job, {**item, "findings": []})
        out.append((img, bare, truth[0][1:]))
    return out


def table(findings, n: int, sizes, difficulties) -> pd.DataFrame:
    rows = []
    for diff in difficulties:
        for f in findings:
            for img, bare, box in renders(f, n, diff):
                for s in sizes:
                    m = measure(img, bare, box, s)
                    if m is not None:
                        rows.append({"difficulty": diff, "finding": f, "size": s, **m})
    df = pd.DataFrame(rows)
    return (df.groupby(["difficulty", "finding", "size"], sort=False)
            .agg(n=("contrast", "size"), contrast=("contrast", "median"), clutter=("clutter", "median"),
                 contrast_clutter=("contrast_clutter", "median"), d_prime=("d_prime", "median"),
                 core_px=("core_px", "median")).reset_index())
