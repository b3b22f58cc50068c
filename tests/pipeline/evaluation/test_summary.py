"""The per-finding summary of an evaluation (#22 item 4): n and a 95 % interval for every Acc, every finding with
truth, and the harvest's counts; the point estimate is the protocol's own Acc."""
from __future__ import annotations

import numpy as np

from pipeline.base.vocab import FINDINGS
from pipeline.evaluation.protocol import evaluate
from pipeline.evaluation.summary import acc_summary, formatted, harvest_summary
from tests.pipeline.evaluation.test_bootstrap import random_run


def test_every_finding_with_truth_gets_n_and_an_interval_around_the_protocols_acc():
    boxes, gt, ids = random_run(3, n_images=60)
    gt.loc[gt.index[:5], "finding"] = "Hernia"                  # a finding NIH's list never boxes
    boxes = boxes.drop_duplicates(["image_id", "finding", "rank"])
    summary = acc_summary(boxes, gt, ids, "truth", n_boot=200)
    assert summary.attrs["protocol"] == "all/iou@truth"
    assert list(summary["finding"]) == [f for f in FINDINGS if f in set(gt["finding"])]
    assert "Hernia" in set(summary["finding"])
    ref = evaluate(boxes, gt, "r", findings=FINDINGS, protocols=(("all", "iou"),))
    ref = ref[(ref["t"].round(3) == 0.3) & (ref["n_gt"] > 0)].set_index("finding")
    got = summary.set_index("finding")
    np.testing.assert_allclose(got.loc[ref.index, "acc@0.3"], ref["acc"], atol=1e-12)
    assert (got.loc[ref.index, "n_gt"] == ref["n_gt"]).all()
    assert ((got["lo@0.3"] <= got["acc@0.3"] + 1e-12) & (got["acc@0.3"] <= got["hi@0.3"] + 1e-12)).all()
    cell = formatted(summary).set_index("finding").loc["Hernia", "Acc@0.3"]
    assert cell.count("[") == 1 and cell.endswith("]")


def test_the_harvest_summary_counts_boxes_and_images():
    boxes, _, ids = random_run(4, n_images=30)
    h = harvest_summary(boxes, len(ids))
    assert h.attrs["images"] == 30
    assert h["boxes"].sum() == len(boxes)
    assert (h.set_index("finding")["images"] == boxes.groupby("finding")["image_id"].nunique()).all()


def test_the_harvest_summary_says_what_trust_kept_and_where_the_exports_are():
    import pandas as pd

    from pipeline.evaluation.summary import harvest_lines
    boxes, _, ids = random_run(4, n_images=30)
    found = sorted(set(boxes["finding"]), key=FINDINGS.index)
    trust = pd.DataFrame({"finding": found[:2], "source": "truth@val", "t": 0.3, "n_gt": [40, 12],
                          "rank": [2, 1], "min_score": [0.857, np.nan], "acc": [0.6, 0.3], "lo": [0.44, 0.1],
                          "hi": [0.74, 0.6], "floor": 0.5, "kept": [True, False]})
    h = harvest_summary(boxes, len(ids), trust, [("coco", "/x/coco")]).set_index("finding")
    assert h.loc[found[0], "exported"] == "yes" and h.loc[found[1], "exported"] == "no"
    assert h.loc[found[0], "est. Acc@0.3 [95 %] (n)"] == "0.60 [0.44, 0.74] (40)"
    assert h.loc[found[0], "exported boxes"] == "rank 2, score >= 0.857" and h.loc[found[1], "exported boxes"] == "rank 1"
    assert all(h.loc[f, "exported"] == "no" and h.loc[f, "exported boxes"] == "–" for f in found[2:])
    lines = harvest_lines(harvest_summary(boxes, len(ids), trust, [("coco", "/x/coco")]))
    assert lines[0].endswith(f": {found[0]}.") and lines[1] == "Exported coco: /x/coco"
    assert "not measured" in harvest_lines(harvest_summary(boxes, len(ids)))[0]
