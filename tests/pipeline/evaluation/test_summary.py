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
