"""Why boxes do or do not localize (#11 item 1): heatmap statistics against truth boxes, per stage and finding.

For each (image, finding) pair with truth boxes, and for each map (`cam`: the normalized step-1 CAM H_1;
`fused`: H_f of eq. 8), on the heatmap grid:
- `pointing`: the map's maximum falls inside a truth box of the finding (pointing game; the first maximum);
- `inside`, `outside`: the map's mean over the cells whose centre lies inside any truth box of the finding, and
  over the other cells; `contrast` = inside / outside (> 1: the map prefers the finding);
- `share_ge_0.5`: the fraction of the grid at or above 0.5. Boxes come from thresholded H_f, so a share near
  1 is what makes the rank-1 box the whole image.
Rows are means over the pairs of each finding (`n` pairs). Run it on validation images only (the model's own
validation split is the default), so nothing here looks at evaluation boxes.

    python -m pipeline.evaluation.diagnose --home H --model latest [--out DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.evaluation.compare import to_markdown
from pipeline.evaluation.maxboxacc import Heatmap

STATS = ("pointing", "inside", "outside", "contrast", "share_ge_0.5")


def cell_mask(shape: tuple[int, int], boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Cells `[h, w]` whose centre lies inside any xywh box (image frame `width x height`)."""
    gh, gw = shape
    cy = (np.arange(gh) + 0.5) * height / gh
    cx = (np.arange(gw) + 0.5) * width / gw
    mask = np.zeros(shape, dtype=bool)
    for x, y, w, h in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        mask |= ((cy >= y) & (cy < y + h))[:, None] & ((cx >= x) & (cx < x + w))[None, :]
    return mask


def map_stats(heatmap: np.ndarray, boxes: np.ndarray, width: float, height: float) -> dict:
    """The statistics of one map against the truth boxes of its finding (vectorized)."""
    hm = np.asarray(heatmap, dtype=np.float64)
    inside = cell_mask(hm.shape, boxes, width, height)
    peak = np.unravel_index(np.argmax(hm), hm.shape)
    mean_in = hm[inside].mean() if inside.any() else np.nan
    mean_out = hm[~inside].mean() if (~inside).any() else np.nan
    return {"pointing": float(inside[peak]), "inside": mean_in, "outside": mean_out,
            "contrast": mean_in / mean_out if mean_out > 0 else np.nan, "share_ge_0.5": float((hm >= 0.5).mean())}


def map_stats_reference(heatmap: np.ndarray, boxes: np.ndarray, width: float, height: float) -> dict:
    """The same, cell by cell: the slow, obviously correct version."""
    gh, gw = len(heatmap), len(heatmap[0])
    best, peak_in, ins, outs, high = -np.inf, False, [], [], 0
    for i in range(gh):
        for j in range(gw):
            v = float(heatmap[i][j])
            cx, cy = (j + 0.5) * width / gw, (i + 0.5) * height / gh
            hit = any(x <= cx < x + w and y <= cy < y + h for x, y, w, h in np.reshape(boxes, (-1, 4)))
            (ins if hit else outs).append(v)
            high += v >= 0.5
            if v > best:
                best, peak_in = v, hit
    mean_in = sum(ins) / len(ins) if ins else np.nan
    mean_out = sum(outs) / len(outs) if outs else np.nan
    return {"pointing": float(peak_in), "inside": mean_in, "outside": mean_out,
            "contrast": mean_in / mean_out if mean_out > 0 else np.nan, "share_ge_0.5": high / (gh * gw)}


def localization_stats(maps: dict[str, list[Heatmap]], gt: pd.DataFrame) -> pd.DataFrame:
    """Per map kind and finding: the mean of each statistic over the pairs, and `n`."""
    boxes = {key: g[list("xywh")].to_numpy(float) for key, g in gt.groupby(["image_id", "finding"])}
    rows = []
    for kind, hms in maps.items():
        for h in hms:
            rows.append({"map": kind, "finding": h.finding,
                         **map_stats(h.heatmap, boxes[(h.image_id, h.finding)], h.width, h.height)})
    if not rows:
        return pd.DataFrame(columns=["map", "finding", "n", *STATS])
    df = pd.DataFrame(rows)
    out = df.groupby(["map", "finding"])[list(STATS)].mean()
    return out.assign(n=df.groupby(["map", "finding"]).size()).reset_index()[["map", "finding", "n", *STATS]]


def diagnose(home, model_id: str = "latest", image_ids=None, split: str = "val", max_pairs: int = 800,
             steps: int = 3, device: str = "cpu", size: int | None = None, last_only: bool = False,
             data=None) -> pd.DataFrame:
    """`localization_stats` of every stage of `model_id`'s lineage (base ... am3; `last_only`: the model alone)
    on `image_ids`, else on `split` (`val`: the model's validation split; or a warehouse split), against their
    `truth` boxes. `size`: the input size (default: the model's training size; its cache must exist). The
    models are `home`'s, the images `data`'s (default: `home`'s; `pipeline.evaluation.tune`)."""
    from pipeline.base.home import Home
    from pipeline.evaluation.run import heatmaps
    from pipeline.evaluation.tune import validation_ids
    from pipeline.images.dataset import CacheDataset
    from pipeline.training.checkpoint import lineage, load_model
    from warehouse import db

    home = Home.resolve(home)
    stages = lineage(home, model_id)[-1:] if last_only else lineage(home, model_id)   # first stage first
    last, meta = load_model(home, stages[-1]["model_id"], device=device)   # loaded once: meta now, maps below
    src = Home.resolve(data) if data is not None else home
    con = db.connect(src, read_only=True)
    try:
        if image_ids is not None:
            ids = list(image_ids)
        elif split == "val":
            ids = validation_ids(src, meta)
        else:
            ids = [r[0] for r in con.execute("SELECT image_id FROM images WHERE split = ?", [split]).fetchall()]
        gt = con.execute("SELECT image_id, finding, x, y, w, h FROM gt_boxes WHERE source = 'truth' "
                         "AND image_id IN (SELECT unnest(?)) ORDER BY ALL", [ids]).df()
    finally:
        con.close()
    if gt.empty:
        raise ValueError("no `truth` boxes on these images: the diagnosis needs a phantom's exact boxes")
    pairs = gt[["image_id", "finding"]].drop_duplicates().head(max_pairs)
    size = size or int(meta.get("input_size", 256))
    ds = CacheDataset(src, size=size, image_ids=sorted(set(pairs["image_id"])))
    pos = {iid: i for i, iid in enumerate(ds.image_ids)}
    tables = []
    for row in stages:
        model = last if row is stages[-1] else load_model(home, row["model_id"], device=device)[0]
        hms = heatmaps(model, ds, [pos[i] for i in pairs["image_id"]], list(pairs["finding"]), steps, device)
        maps = {"cam": [], "fused": []}
        for (iid, f), h in zip(pairs.itertuples(index=False), hms):
            frame = ds.frames[pos[iid]]
            maps["cam"].append(Heatmap(iid, f, h[0], *frame))
            maps["fused"].append(Heatmap(iid, f, h[-1], *frame))
        tables.append(localization_stats(maps, gt).assign(stage=row["stage"], model_id=row["model_id"]))
    out = pd.concat(tables, ignore_index=True)
    return out[["stage", "model_id", "map", "finding", "n", *STATS]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", default=None)
    p.add_argument("--model", default="latest")
    p.add_argument("--split", default="val", help="val (the model's validation split, default) or a warehouse "
                                                    "split; never score a recipe on the evaluation images")
    p.add_argument("--max-pairs", type=int, default=800)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write diagnosis.csv and diagnosis.md here")
    args = p.parse_args(argv)
    df = diagnose(args.home, args.model, split=args.split, max_pairs=args.max_pairs, device=args.device)
    text = to_markdown(df.drop(columns="model_id"), digits=3)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        df.to_csv(out / "diagnosis.csv", index=False)
        (out / "diagnosis.md").write_text(text + "\n")
    fused = df[(df["map"] == "fused") & (df["stage"] == df["stage"].iloc[-1])]
    print(f"fused pointing game, last stage: {fused['pointing'].mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
