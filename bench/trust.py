"""Does the trust estimate hold? (#22 item 3) The estimate of each finding, measured on the run's tuning set
(the phantom truth of the validation images: `pipeline.evaluation.trust`), against the Acc of the boxes its rule
keeps (one rank, score >= the finding's cut) on held-out truth that the estimate never saw: the `test` split. The
`train` column is the harvest itself (the images the model trained on), for comparison.

    python bench/trust.py --home H --run RUN [--csv docs/results/trust-demo.csv]
    python bench/trust.py --quick     # a 200-image phantom at 64 px, an untrained tiny model (< 1 min)

Last line: `trust within interval: k/n` (findings with at least MIN_GT tuning boxes whose test Acc lies in the
estimate's 95 % interval).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.evaluation import trust  # noqa: E402
from pipeline.evaluation.bootstrap import acc_intervals  # noqa: E402
from warehouse import db  # noqa: E402


def quick_home(root: Path) -> tuple[Path, str]:
    """A phantom home mined with an untrained tiny model: the code path, not a figure."""
    from pipeline.ingest.nih import ingest_nih
    from pipeline.mining.shard import mine_shard
    from pipeline.phantom import generate
    from pipeline.runs.parts import write_part
    from pipeline.base.home import Home
    from tests.conftest import register_tiny_model
    generate(root / "phantom", n=200, seed=5, size=128, workers=1, progress=False)
    home = Home(root / "home")
    ingest_nih(home, root / "phantom", sizes=(64,))
    register_tiny_model(home.root, "tiny", input_size=64, config={"seed": 0, "data": {"input_size": 64, "val_fraction": 0.3}})
    con = db.connect(home)
    ids = [r[0] for r in con.execute("SELECT image_id FROM images ORDER BY 1").fetchall()]
    con.execute("INSERT INTO runs VALUES ('mine-quick', 'mine', '{}', 'tiny', NULL, now(), now(), 'completed')")
    con.close()
    write_part(home, "mine-quick", 0, mine_shard(home, "tiny", ids, {"batch_size": 32}, "mine-quick"), ids)
    return home, "mine-quick"


def held_out_acc(con, run_id: str, rows: pd.DataFrame, split: str) -> pd.DataFrame:
    """Acc@T of the boxes each finding's rule keeps (its rank, score >= its cut) on the `split` images' truth."""
    gt = con.execute("SELECT g.image_id, g.finding, g.x, g.y, g.w, g.h FROM gt_boxes g JOIN images i USING (image_id) "
                     "WHERE g.source = 'truth' AND i.split = ? AND g.image_id IN (SELECT image_id FROM mined_boxes "
                     "WHERE run_id = ?)", [split, run_id]).df()
    boxes = con.execute("SELECT image_id, finding, rank, x, y, w, h, score FROM mined_boxes WHERE run_id = ?",
                        [run_id]).df()
    rule = rows.set_index("finding")
    boxes = boxes[(boxes["rank"] == boxes["finding"].map(rule["rank"]).fillna(0))
                  & (boxes["score"] >= boxes["finding"].map(rule["min_score"].fillna(-np.inf)).fillna(np.inf))]
    if split == "train":   # the harvest: training images, not those held out for validation
        gt = gt[~gt["image_id"].isin(set(trust.tuning_set(con, run_id)[1]))]
    return acc_intervals(boxes, gt, sorted(set(gt["image_id"])), list(rows["finding"]), thresholds=(rows["t"].iloc[0],))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home")
    ap.add_argument("--run", dest="run_id")
    ap.add_argument("--csv", default=None, help="write the table here")
    ap.add_argument("--quick", action="store_true", help="a tiny phantom home in a temporary folder")
    args = ap.parse_args()
    tmp = None
    if args.quick:
        tmp = tempfile.TemporaryDirectory(prefix="bench-trust-")
        home, run_id = quick_home(Path(tmp.name))
    else:
        home, run_id = args.home, args.run_id
    con = db.connect(home, read_only=True)
    try:
        rows = trust.trust_run(con, run_id)
        test, train = (held_out_acc(con, run_id, rows, s).set_index("finding") for s in ("test", "train"))
    finally:
        con.close()
    table = rows.set_index("finding")[["n_gt", "acc", "lo", "hi", "rank", "min_score", "kept"]].rename(
        columns={"n_gt": "n_val", "acc": "est_acc", "lo": "est_lo", "hi": "est_hi"})
    table = table.join(test[["acc", "lo", "hi", "n_gt"]].add_prefix("test_")).join(
        train[["acc", "n_gt"]].add_prefix("train_"))
    table["within"] = (table["test_acc"] >= table["est_lo"]) & (table["test_acc"] <= table["est_hi"])
    judged = table[(table["n_val"] >= trust.MIN_GT) & table["test_acc"].notna()]
    pd.set_option("display.width", 200)
    print(table.round(3).to_string())
    if args.csv:
        table.round(4).reset_index().to_csv(args.csv, index=False)
    print(f"\nkept by default: {', '.join(table.index[table['kept']]) or 'none'}; mean |test - estimate| "
          f"{(judged['test_acc'] - judged['est_acc']).abs().mean():.3f} over {len(judged)} findings")
    print(f"trust within interval: {int(judged['within'].sum())}/{len(judged)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
