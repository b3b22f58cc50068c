"""Bootstrap intervals of Acc (#11, #13): the point estimate is the protocol's own Acc, the interval brackets it,
and a resample that doubles every image changes nothing."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.base.vocab import BOXED_FINDINGS
from pipeline.evaluation.bootstrap import acc_counts, acc_intervals, acc_values, boot_acc, resample_weights
from pipeline.evaluation.protocol import THRESHOLDS, evaluate


def random_run(seed: int, n_images: int = 40):
    rng = np.random.default_rng(seed)
    ids = [f"{k:08d}_000.png" for k in range(n_images)]
    gt, boxes = [], []
    for iid in ids:
        for f in rng.choice(BOXED_FINDINGS, size=rng.integers(0, 3), replace=False):
            x, y = rng.uniform(0, 800, 2)
            w, h = rng.uniform(40, 200, 2)
            gt.append((iid, f, x, y, w, h))
            for rank in range(1, rng.integers(1, 4)):
                jitter = rng.normal(0, 60, 4)
                boxes.append((iid, f, rank, x + jitter[0], y + jitter[1], max(5, w + jitter[2]),
                              max(5, h + jitter[3]), 1.0 / rank))
    return (pd.DataFrame(boxes, columns=["image_id", "finding", "rank", "x", "y", "w", "h", "score"]),
            pd.DataFrame(gt, columns=["image_id", "finding", "x", "y", "w", "h"]), ids)


@pytest.mark.parametrize("family", ["iou", "iobb"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_point_estimate_is_the_protocols_acc_and_the_interval_brackets_it(seed, family):
    boxes, gt, ids = random_run(seed)
    ci = acc_intervals(boxes, gt, ids, BOXED_FINDINGS, n_boot=200, seed=seed, thresholds=THRESHOLDS[family],
                       family=family)
    ref = evaluate(boxes, gt, "r", protocols=(("all", family),))
    ref = ref[(ref["metric"] == "acc") & (ref["n_gt"] > 0)].set_index(["finding", "t"])["acc"]
    got = ci.set_index(["finding", "t"])["acc"]
    joined = pd.concat([got, ref.rename("ref")], axis=1, join="inner")
    assert len(joined) == len(ref) > 0
    np.testing.assert_allclose(joined["acc"], joined["ref"], atol=1e-12)
    assert ((ci["lo"] <= ci["acc"] + 1e-12) & (ci["acc"] <= ci["hi"] + 1e-12)).all()
    assert (ci["hi"] - ci["lo"]).max() > 0       # some spread: the resamples differ


def test_seeded_and_duplicated_images_change_nothing():
    boxes, gt, ids = random_run(5)
    a = acc_intervals(boxes, gt, ids, BOXED_FINDINGS, n_boot=50, seed=3)
    pd.testing.assert_frame_equal(a, acc_intervals(boxes, gt, ids, BOXED_FINDINGS, n_boot=50, seed=3))
    twice = lambda d: pd.concat([d, d.assign(image_id=d["image_id"] + "#2")], ignore_index=True)
    b = acc_intervals(twice(boxes), twice(gt), ids + [i + "#2" for i in ids], BOXED_FINDINGS, n_boot=50, seed=3)
    np.testing.assert_allclose(a["acc"], b["acc"], atol=1e-12)


def test_the_matrix_bootstrap_equals_the_per_resample_reference():
    boxes, gt, ids = random_run(8)
    findings = [f for f in BOXED_FINDINGS if (gt["finding"] == f).any()]
    counts = acc_counts(boxes, gt, ids, findings)
    weights = resample_weights(len(ids), 30, seed=1)
    for f in findings:
        if counts.n_gt[f].sum():
            ref = np.array([acc_values(counts, f, w)[0] for w in weights])
            np.testing.assert_allclose(boot_acc(counts, f, weights), ref, atol=1e-12)
