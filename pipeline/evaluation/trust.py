"""Trust in a mining run's boxes, measured without evaluation boxes (#22 item 3, docs/design.md#evaluation).

A run's boxes are judged on its **tuning set**: the validation images (the patients its model's training held
out) with a phantom's exact `truth` boxes, or else, on real data, the boxes people reviewed (`gt_boxes` source
`review`, `harvest import-review`) on mined images outside the evaluation split. The NIH list's boxes
(`bbox_list`) and every box of the `test` split are never looked at.

Per finding, on the tuning set, the **box rule** an export applies (:func:`box_rule`):
- `rank`: which of the run's ranked boxes to export, one per image (the ranks order the boxes of the three
  threshold levels of sec. 3.2 by the mean heatmap inside, so rank 1 is nearly always the tightest box, at the
  highest threshold: this picks the threshold per finding, and a large finding is often boxed best by a looser
  one), and `min_score`: the score cut below which those boxes are left out. Both maximize F1 of
  box precision (a kept box overlaps a truth box by more than T(IoU)) and Acc (the share of truth boxes hit);
  ties go to the lower rank and the lower cut;
- `acc, lo, hi`: the Acc at T(IoU) of the boxes the rule keeps, with its 95 % interval: the bootstrap one over
  images, widened to the Wilson interval of the hit count where that is wider (:func:`wilson`).
  The rule is cross-fitted: each half of the tuning images (a hash of the image id) is scored with the rule
  fitted on the other half, so the estimate never sees the data its rule was fitted on;
- `kept`: whether the finding is exported by default, `acc >= floor` (the point estimate, `FLOOR` unless
  stated) on at least `MIN_GT` truth boxes.
The rows are stored in the warehouse's `trust` table, keyed by the run (:func:`store`).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from pipeline.base.vocab import FINDINGS
from pipeline.config.harvest import TRUST_FLOOR as FLOOR   # a finding needs this estimated Acc@T(IoU) to be exported
from pipeline.evaluation.bootstrap import acc_intervals
from pipeline.evaluation.iou import number_gt, overlap_pairs
from pipeline.training.data import validation_rule
from warehouse import db

T_IOU = 0.3
MIN_GT = 10      # and the truth boxes it is estimated on
COLUMNS = ["run_id", "finding", "source", "t", "n_gt", "n_images", "rank", "min_score", "acc", "lo", "hi", "precision",
           "floor", "kept", "basis"]


class NoTuningSet(ValueError):
    """The run has no tuning truth: neither phantom truth on its validation images nor reviewed boxes."""


def tuning_set(con, run_id: str) -> tuple[pd.DataFrame, list[str], str] | None:
    """(truth boxes, image ids, source) of run `run_id`'s tuning set, or None where it has none. Source
    `truth@val`: the phantom truth of the mined validation images; `review`: reviewed boxes on mined images
    outside the `test` split."""
    row = con.execute("SELECT m.model_id, m.config FROM runs r JOIN models m USING (model_id) WHERE r.run_id = ?",
                      [run_id]).fetchone()
    model = {"model_id": row[0], "config": json.loads(row[1]) if isinstance(row[1], str) else row[1]} if row else None
    has_val = con.execute("SELECT count(*) FROM images WHERE split = 'val'").fetchone()[0] > 0
    is_val, _ = validation_rule(model, has_val)
    mined = con.execute("""SELECT DISTINCT b.image_id, i.patient_id, i.split FROM mined_boxes b
                           JOIN images i USING (image_id) WHERE b.run_id = ?""", [run_id]).fetchall()
    for source, ids in (("truth", [i for i, p, s in mined if is_val(p, s)]),
                        ("review", [i for i, p, s in mined if s != "test"])):
        gt = con.execute("SELECT image_id, finding, x, y, w, h FROM gt_boxes WHERE source = ? "
                         "AND image_id IN (SELECT unnest(?::VARCHAR[]))", [source, ids]).df()
        if not gt.empty:
            return gt, sorted(set(gt["image_id"])), "truth@val" if source == "truth" else source
    return None


def best_cut(scores: np.ndarray, hit_gt: np.ndarray, n_gt: int) -> float:
    """The score cut (keep boxes with score >= it) that maximizes F1 of precision (boxes with `hit_gt > 0`
    over boxes kept) and Acc (truth boxes hit over `n_gt`); the lowest such cut on ties, -inf without boxes."""
    if not len(scores) or n_gt == 0:
        return -np.inf
    order = np.argsort(-scores, kind="stable")
    s, hits = scores[order], hit_gt[order]
    kept = np.arange(1, len(s) + 1)
    precision, acc = np.cumsum(hits > 0) / kept, np.cumsum(hits) / n_gt
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * acc / (precision + acc))
    last = np.r_[s[1:] != s[:-1], True]          # a cut keeps every box of its score
    f1 = np.where(last, f1, -1.0)
    best = np.flatnonzero(f1 == f1.max())[-1]     # the most boxes among the best
    return float(s[best]) if best < len(s) - 1 else -np.inf


def best_cut_reference(scores, hit_gt, n_gt: int) -> float:
    """:func:`best_cut` one candidate at a time (the obviously correct version; a test holds them equal)."""
    best, best_f1 = -np.inf, -1.0
    for cut in sorted(set(scores), reverse=True):
        keep = [h for s, h in zip(scores, hit_gt) if s >= cut]
        p, a = sum(h > 0 for h in keep) / len(keep), sum(keep) / n_gt if n_gt else 0.0
        f1 = 2 * p * a / (p + a) if p + a else 0.0
        if f1 >= best_f1:
            best, best_f1 = cut, f1
    return -np.inf if best == min(scores, default=-np.inf) else float(best)


def _fold(image_id: str) -> int:
    return hashlib.sha256(image_id.encode()).digest()[0] & 1


def f1_at(scores: np.ndarray, hit_gt: np.ndarray, n_gt: int, cut: float) -> float:
    """F1 of precision and Acc for the boxes with score >= `cut` (:func:`best_cut`'s objective)."""
    keep = scores >= cut
    if not keep.any() or n_gt == 0:
        return 0.0
    p, a = (hit_gt[keep] > 0).mean(), hit_gt[keep].sum() / n_gt
    return float(2 * p * a / (p + a)) if p + a else 0.0


def box_rule(boxes: pd.DataFrame, n_gt: int) -> tuple[int, float]:
    """(rank, cut) of one finding: the box rank (which of the sec. 3.2 threshold levels) and score cut whose
    boxes score the best F1 on `boxes` (columns rank, score, hit_gt); the lowest rank on ties."""
    best = (1, -np.inf, -1.0)
    for rank, b in boxes.groupby("rank", sort=True):
        scores, hits = b["score"].to_numpy(np.float64), b["hit_gt"].to_numpy()
        cut = best_cut(scores, hits, n_gt)
        f1 = f1_at(scores, hits, n_gt, cut)
        if f1 > best[2]:
            best = (int(rank), cut, f1)
    return best[0], best[1]


def estimate(boxes: pd.DataFrame, gt: pd.DataFrame, images: list[str], t_iou: float = T_IOU,
             n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per finding with truth: `finding, n_gt, n_images, rank, min_score, acc, lo, hi, precision` (module
    docstring). `boxes`: the run's boxes (image_id, finding, rank, x, y, w, h, score); `gt`: the tuning truth on
    `images`. The rule (:func:`box_rule`) is fitted on all the tuning images; the estimate scores each half of
    them with the rule fitted on the other half."""
    images = sorted(images)
    gt = number_gt(gt[gt["image_id"].isin(set(images))])
    mine = boxes[boxes["image_id"].isin(set(images))].reset_index(drop=True)
    pairs = overlap_pairs(mine, gt)
    hits = pairs[pairs["overlap"] > t_iou].groupby(["image_id", "finding", "rank"]).size().rename("hit_gt")
    mine = mine.astype({"rank": np.int64}).merge(hits, on=["image_id", "finding", "rank"], how="left")
    mine = mine.fillna({"hit_gt": 0}).astype({"hit_gt": np.int64})
    mine["fold"] = mine["image_id"].map(_fold)
    gt_fold = gt["image_id"].map(_fold)
    rows, kept_parts = [], []
    for f in [f for f in FINDINGS if (gt["finding"] == f).any()]:
        b, n_f = mine[mine["finding"] == f], gt_fold[gt["finding"] == f]
        crossed = []
        for k in (0, 1):
            rank, cut = box_rule(b[b["fold"] != k], int((n_f != k).sum()))
            crossed.append(b[(b["fold"] == k) & (b["rank"] == rank) & (b["score"] >= cut)])
        kept = pd.concat(crossed)
        kept_parts.append(kept)
        rank, cut = box_rule(b, len(n_f))
        rows.append({"finding": f, "n_gt": int(len(n_f)),
                     "n_images": int(gt.loc[gt["finding"] == f, "image_id"].nunique()), "rank": rank,
                     "min_score": cut, "precision": float((kept["hit_gt"] > 0).mean()) if len(kept) else np.nan})
    out = pd.DataFrame(rows, columns=["finding", "n_gt", "n_images", "rank", "min_score", "precision"])
    if out.empty:
        return out.assign(acc=[], lo=[], hi=[])
    kept = pd.concat(kept_parts, ignore_index=True)
    ci = acc_intervals(kept, gt, images, list(out["finding"]), n_boot=n_boot, seed=seed, thresholds=(t_iou,))
    out = out.merge(ci[["finding", "acc", "lo", "hi"]], on="finding", how="left")
    w_lo, w_hi = wilson(np.rint(out["acc"] * out["n_gt"]), out["n_gt"])
    out["lo"], out["hi"] = np.fmin(out["lo"], w_lo), np.fmax(out["hi"], w_hi)
    return out[["finding", "n_gt", "n_images", "rank", "min_score", "acc", "lo", "hi", "precision"]]


def wilson(hits, n, z: float = 1.96):
    """The Wilson score interval of `hits` out of `n`. An estimate's interval is the union of it and the
    bootstrap one: the bootstrap's is empty when every box hits or none does (0/31 is not 'exactly 0')."""
    hits, n = np.asarray(hits, np.float64), np.asarray(n, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = hits / n
        mid, half = (p + z * z / (2 * n)), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return np.clip((mid - half) / (1 + z * z / n), 0, 1), np.clip((mid + half) / (1 + z * z / n), 0, 1)


def trust_run(con, run_id: str, floor: float = FLOOR, t_iou: float = T_IOU) -> pd.DataFrame:
    """The trust rows of every finding run `run_id` mined (`COLUMNS`); a finding without tuning truth gets no
    estimate and is not kept. Raises ValueError when the run has no tuning set at all."""
    found = tuning_set(con, run_id)
    if found is None:
        raise NoTuningSet(f"run {run_id!r} has no tuning set, so the trust in its boxes cannot be measured: "
                         "on real data, review some of its boxes (`harvest export --format labelstudio`, then "
                         "`harvest import-review`) and run `harvest tune --run` again; or export every finding "
                         "with `harvest export --all`")
    gt, images, source = found
    boxes = con.execute("SELECT image_id, finding, rank, x, y, w, h, score FROM mined_boxes WHERE run_id = ?",
                        [run_id]).df()
    est = estimate(boxes, gt, images, t_iou).set_index("finding")
    mined = [f for f in FINDINGS if f in set(boxes["finding"])]
    out = est.reindex(mined).reset_index()
    out["n_gt"] = out["n_gt"].fillna(0).astype(int)
    out["n_images"] = out["n_images"].fillna(0).astype(int)
    out["rank"] = out["rank"].astype("Int64")
    out["kept"] = (out["acc"] >= floor) & (out["n_gt"] >= MIN_GT)
    out = out.assign(run_id=run_id, source=source, t=t_iou, floor=floor, basis=basis(con, run_id))
    out["min_score"] = out["min_score"].replace(-np.inf, np.nan)   # stored NULL: no cut
    return out[COLUMNS]


def store(con, rows: pd.DataFrame) -> None:
    """Replace the trust rows of the runs in `rows` (one transaction)."""
    with db.transaction(con):
        for run_id in rows["run_id"].unique():
            con.execute("DELETE FROM trust WHERE run_id = ?", [run_id])
        con.register("new_trust", rows)
        con.execute(f"INSERT INTO trust ({', '.join(COLUMNS)}, created_at) "
                    f"SELECT {', '.join(COLUMNS)}, now() FROM new_trust")
        con.unregister("new_trust")


def read(con, run_id: str) -> pd.DataFrame | None:
    """The stored trust rows of `run_id`, or None (an old home's read-only connection sees an empty table)."""
    rows = con.execute(f"SELECT {', '.join(COLUMNS)} FROM trust WHERE run_id = ? ORDER BY array_position(?, finding)",
                       [run_id, list(FINDINGS)]).df()
    return rows if len(rows) else None


def basis(con, run_id: str) -> str:
    """What a measurement rests on: the run's box count and the truth and review box counts. A nightly run that
    adds boxes to the run, or reviews that add truth, change it, and the stored trust is measured again."""
    return "boxes {} truth {} review {}".format(
        con.execute("SELECT count(*) FROM mined_boxes WHERE run_id = ?", [run_id]).fetchone()[0],
        *con.execute("SELECT count(*) FILTER (source = 'truth'), count(*) FILTER (source = 'review') "
                     "FROM gt_boxes").fetchone())


def gate(con, run_id: str, floor: float = FLOOR) -> pd.DataFrame | None:
    """The trust rows of `run_id` with `kept` judged at `floor`: the stored ones while their `basis` holds, else
    measured and stored now. None when the run has no tuning set (its exports then keep every finding and say
    so)."""
    rows = read(con, run_id)
    if rows is None or rows["basis"].iloc[0] != basis(con, run_id):
        try:
            rows = trust_run(con, run_id, floor)
        except NoTuningSet:
            return None
        store(con, rows)
    return rows.assign(floor=floor, kept=(rows["acc"] >= floor) & (rows["n_gt"] >= MIN_GT))


def keep(boxes: list[dict], rows: pd.DataFrame) -> list[dict]:
    """The boxes of the kept findings whose score reaches their finding's `min_score`."""
    rules = {r.finding: (int(r.rank), -np.inf if pd.isna(r.min_score) else r.min_score)
             for r in rows.itertuples() if r.kept}
    return [b for b in boxes if b["finding"] in rules and b["rank"] == rules[b["finding"]][0]
            and b["score"] >= rules[b["finding"]][1]]


def _why(r) -> str:
    """Why a finding is left out of a trusted export."""
    if r.n_gt == 0:
        return "no truth box in the tuning set"
    if r.n_gt < MIN_GT:
        return f"{int(r.n_gt)} truth boxes in the tuning set, fewer than {MIN_GT}"
    return f"estimated Acc {r.acc:.2f} below the floor {r.floor:g}"


def manifest_entry(rows: pd.DataFrame | None, reason: str = "") -> dict:
    """What an export's manifest says of the trust it applied: per finding kept or left out, the estimate and
    its tuning source; or why none was applied."""
    if rows is None:
        return {"applied": False, "reason": reason or "the run has no tuning set (no validation truth, no "
                "reviewed boxes): every finding is exported, its trust not measured"}
    def num(v):
        return None if pd.isna(v) else round(float(v), 4)
    return {"applied": True, "floor": float(rows["floor"].iloc[0]), "min_gt": MIN_GT, "t_iou": float(rows["t"].iloc[0]),
            "source": rows["source"].iloc[0], "estimate": "Acc at t_iou of the boxes the finding's rule keeps (one "
            "rank, score >= min_score) on the tuning set, rule cross-fitted; 95 % interval: bootstrap over images, widened to Wilson's",
            "ranks": "each kept finding exports the boxes of its own rank; the filters' ranks apply without trust",
            "findings": {r.finding: {"kept": bool(r.kept), **({} if r.kept else {"why": _why(r)}), "acc": num(r.acc), "lo": num(r.lo), "hi": num(r.hi),
                                     "n_gt": int(r.n_gt), "rank": None if pd.isna(r.rank) else int(r.rank),
                                     "min_score": num(r.min_score),
                                     "precision": num(r.precision)} for r in rows.itertuples()}}
