"""Evaluate one mining run from the warehouse: protocol tables, MaxBoxAccV2, and the visual report.

Ground-truth sets (`gt_boxes.source`):
- `bbox_list`: the boxes of `BBox_List_2017.csv`; on NIH the 880 boxed images, the paper's evaluation set.
  Protocol names are the plain ones (`bounded/iou`, `all/iou`, `all/iobb`).
- `truth`: a phantom's exact box of every finding instance, scored over every image the run mined. This is the
  harvest quality users get. Protocol names carry `@truth` (`all/iou@truth`).
- `review`: boxes people corrected (`harvest import-review`, pipeline.export.review), scored over the reviewed images
  the run mined. Protocol names carry `@review`.
MaxBoxAccV2 picks its CAM threshold on validation images: mined images with `truth` boxes that are not
evaluation images (phantom only). Without them the summary is labeled oracle (`maxboxacc/oracle`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import pandas as pd
import torch

from pipeline.base.home import Home
from pipeline.base.vocab import BOXED_FINDINGS, FINDINGS, INDEX
from pipeline.evaluation.maxboxacc import Heatmap, max_box_acc
from pipeline.evaluation.protocol import evaluate_warehouse, write_results
from pipeline.evaluation.report import Case, report_header, report_markdown, select_cases, write_report
from pipeline.evaluation.summary import acc_summary, harvest_summary
from pipeline.evaluation.trust import gate
from pipeline.images.dataset import CacheDataset, CacheIndex, normalize
from pipeline.runs.record import writer
from pipeline.phantom.seeds import check_scorable, ingested_phantom_seeds

GT_SETS = ("bbox_list", "truth", "review")
MAX_VAL_MAPS = 400   # validation heatmaps for the MaxBoxAcc threshold choice


def run_info(con, run_id: str) -> dict:
    row = con.execute("SELECT params, model_id FROM runs WHERE run_id = ?", [run_id]).fetchone()
    if row is None:
        model = con.execute("SELECT any_value(model_id) FROM mined_boxes WHERE run_id = ?", [run_id]).fetchone()
        if model is None or model[0] is None:
            raise KeyError(f"no mining run {run_id!r} in the warehouse (see `harvest sql \"SELECT * FROM runs\"`)")
        return {"params": {}, "model_id": model[0]}
    return {"params": json.loads(row[0] or "{}"), "model_id": row[1]}


def protocol_results(con, run_id: str) -> tuple[list[pd.DataFrame], dict[str, pd.DataFrame]]:
    """The Wang/Cai protocol rows of `run_id` on every ground-truth set present, and those sets' boxes."""
    results, gts = [], {}
    for gt_set in GT_SETS:
        view = f"gt_{gt_set}"
        quoted = run_id.replace("'", "''")   # a view cannot take prepared parameters
        con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM gt_boxes WHERE source = '{gt_set}'"
                    + (f" AND image_id IN (SELECT DISTINCT image_id FROM mined_boxes WHERE run_id = '{quoted}')"
                       if gt_set != "bbox_list" else ""))
        gt = con.execute(f"SELECT image_id, finding, x, y, w, h FROM {view}").df()
        if gt.empty:
            continue
        gts[gt_set] = gt
        # NIH's list boxes 8 findings; a phantom's truth and people's review may box all 14
        findings = BOXED_FINDINGS if gt_set == "bbox_list" else [f for f in FINDINGS if f in set(gt["finding"])]
        rows = evaluate_warehouse(con, run_id, gt_table=view, findings=findings)
        if gt_set != "bbox_list":
            rows["protocol"] = rows["protocol"] + f"@{gt_set}"
        results.append(rows)
    return results, gts


def evaluate_run(home, run_id: str, *, report: bool = True, n_cases: int = 1, device: str = "cpu") -> dict:
    """Score `run_id` on every ground-truth set present; write `eval_results` and the report.

    Returns `run_id, model_id, results, header` (:func:`report.report_header`), `report` (the HTML path, or
    None) and `markdown` (:func:`report.report_markdown`)."""
    home = Home.resolve(home)
    con = writer(home)
    try:
        for seed in ingested_phantom_seeds(con, home):
            check_scorable(seed)
        info = run_info(con, run_id)
        mined = [r[0] for r in con.execute("SELECT DISTINCT image_id FROM mined_boxes WHERE run_id = ?",
                                           [run_id]).fetchall()]
        results, gts = protocol_results(con, run_id)
        if not results:
            raise ValueError(f"no ground-truth boxes in {home.warehouse}: nothing to evaluate run {run_id} on")
        boxes = con.execute("SELECT image_id, finding, rank, x, y, w, h, score FROM mined_boxes WHERE run_id = ?",
                            [run_id]).df()
        # a detector run (`harvest detector predict`) has boxes but no heatmaps: no MaxBoxAccV2, no heatmap cases
        heatmaps = not con.execute("SELECT count(*) FROM mined_boxes WHERE run_id = ? AND method = 'detector'",
                                   [run_id]).fetchone()[0]
        trust_rows = gate(con, run_id)
        exports = con.execute("""SELECT params->>'format', arg_max(params->>'out_dir', finished_at) FROM runs
                                 WHERE flow = 'export' AND status = 'completed' AND params->>'run_id' = ?
                                 GROUP BY 1 ORDER BY 1""", [run_id]).fetchall()
        maps = _Maps.read(con, home, info, gts, device) if heatmaps else None
    finally:
        con.close()   # the heatmap pass below holds no connection: another process may write meanwhile
    eval_gt = next(gts[s] for s in GT_SETS if s in gts)   # MaxBoxAccV2's evaluation boxes
    if heatmaps:
        results.append(_max_box_acc(maps, run_id, eval_gt, gts.get("truth"), mined))
    table = pd.concat(results, ignore_index=True)
    con = writer(home)
    try:
        write_results(con, table)
    finally:
        con.close()
    header = report_header(run_id, info["model_id"], info["params"])
    gt_set = next(s for s in ("truth", "review", "bbox_list") if s in gts)   # the summary's truth: the widest
    summary = acc_summary(boxes, gts[gt_set], sorted(mined) if gt_set != "bbox_list" else None, gt_set)
    harvest = harvest_summary(boxes, len(mined), trust_rows, exports)
    out = {"run_id": run_id, "model_id": info["model_id"], "results": table, "header": header, "report": None,
           "summary": summary, "harvest": harvest}
    if report:
        cases = _cases(maps, boxes, eval_gt, n_cases) if heatmaps else []
        out["report"] = write_report(home.reports / run_id, run_id, table, cases, header=header, summary=summary,
                                     harvest=harvest)
    out["markdown"] = report_markdown(header, table, out["report"], summary=summary, harvest=harvest)
    return out


@dataclass
class _Maps:
    """What the heatmap pass needs, read with the evaluation's other reads: the run's model (its `models` row; the
    model loads once, for MaxBoxAccV2 and the report's cases), its mining steps and the truth images' cache index."""
    home: Home
    row: dict
    steps: int
    index: CacheIndex
    device: str

    @classmethod
    def read(cls, con, home: Home, info: dict, gts: dict[str, pd.DataFrame], device: str) -> "_Maps":
        from pipeline.training.checkpoint import model_row, trained_input_size
        row = model_row(home, info["model_id"], con)
        ids = set().union(*(set(gt["image_id"]) for gt in gts.values()))
        return cls(home, row, _steps(info), CacheIndex.read(con, trained_input_size(home, row), image_ids=ids), device)

    @cached_property
    def model(self) -> torch.nn.Module:
        from pipeline.training.checkpoint import load_model
        return load_model(self.home, self.row["model_id"], device=self.device, row=self.row)[0]

    def dataset(self, image_ids) -> CacheDataset:
        return CacheDataset(self.home, image_ids=sorted(set(image_ids)), index=self.index)


@torch.no_grad()
def heatmaps(model, ds: CacheDataset, indices, findings: list[str], steps: int = 3, device: str = "cpu"):
    """H_1..H_T and H_f `[T+1, h, w]` for (image index, finding) pairs, one forward per image (eq. 7-8)."""
    from pipeline.mining.heatmap_fusion import attention_mining, fuse
    out = []
    for k in range(0, len(indices), 32):
        idx, fs = indices[k:k + 32], findings[k:k + 32]
        X = model.forward_features(normalize(ds.get_batch(idx)["image"], device))
        cams = model.cam(X.float())
        cam = cams[torch.arange(len(idx)), torch.tensor([INDEX[f] for f in fs])]
        H, M = attention_mining(cam, steps)
        stack = torch.cat([H, fuse(H, M)[None]]).permute(1, 0, 2, 3)   # [n, T+1, h, w]
        out.extend(stack.cpu().numpy())
    return out


def _steps(info: dict) -> int:
    """T of the mining run (its config is stored in the run's params)."""
    config = info["params"].get("config")
    return int(config.get("steps", 3)) if isinstance(config, dict) else 3


def _max_box_acc(m: _Maps, run_id, eval_gt, truth, mined) -> pd.DataFrame:
    def maps(gt: pd.DataFrame) -> list[Heatmap]:
        pairs = gt[["image_id", "finding"]].drop_duplicates()
        ds = m.dataset(pairs["image_id"])
        pos = {iid: i for i, iid in enumerate(ds.image_ids)}
        hm = heatmaps(m.model, ds, [pos[i] for i in pairs["image_id"]], list(pairs["finding"]), m.steps, m.device)
        return [Heatmap(i, f, h[-1], *ds.frames[pos[i]]) for (i, f), h in zip(pairs.itertuples(index=False), hm)]

    val_gt = None
    if truth is not None and eval_gt is not truth:
        val_gt = truth[~truth["image_id"].isin(set(eval_gt["image_id"])) & truth["image_id"].isin(set(mined))]
        keep = sorted(set(val_gt["image_id"]))[:MAX_VAL_MAPS]
        val_gt = val_gt[val_gt["image_id"].isin(keep)]
    eval_gt = eval_gt[eval_gt["finding"].isin(BOXED_FINDINGS)]
    if val_gt is not None and not val_gt.empty:
        return max_box_acc(maps(eval_gt), eval_gt, run_id, val_maps=maps(val_gt), val_gt=val_gt)
    return max_box_acc(maps(eval_gt), eval_gt, run_id)


def _cases(m: _Maps, boxes, gt, n) -> list[Case]:
    picks = select_cases(boxes, gt, n=n)
    if picks.empty:
        return []
    ds = m.dataset(picks["image_id"])
    pos = {iid: i for i, iid in enumerate(ds.image_ids)}
    hms = heatmaps(m.model, ds, [pos[i] for i in picks["image_id"]], list(picks["finding"]), m.steps, m.device)
    cases = []
    for p, hm in zip(picks.itertuples(index=False), hms):
        i = pos[p.image_id]
        sel = (boxes["image_id"] == p.image_id) & (boxes["finding"] == p.finding)
        g = (gt["image_id"] == p.image_id) & (gt["finding"] == p.finding)
        cases.append(Case(p.image_id, p.finding, ds.get_batch([i])["image"][0, 0].numpy(), list(hm),
                          gt.loc[g, list("xywh")].to_numpy(float),
                          boxes.loc[sel].sort_values("rank")[list("xywh")].to_numpy(float),
                          frame=tuple(ds.frames[i]), label=p.label, best_iou=float(p.best_iou)))
    return cases
