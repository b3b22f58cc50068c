"""The Wang/Cai protocol (docs/design.md#evaluation): hand-computed cases, properties, and the slow reference."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from pipeline.base.vocab import BOXED_FINDINGS
from pipeline.evaluation.iou import box_overlap, box_overlap_reference
from pipeline.evaluation.maxboxacc import (CAM_THRESHOLDS, Heatmap, component_boxes, component_boxes_reference,
                                           max_box_acc)
from pipeline.evaluation.protocol import (IOBB_THRESHOLDS, IOU_THRESHOLDS, RESULT_COLUMNS, evaluate,
                                          evaluate_reference, protocol_name, ranked_list)
from pipeline.evaluation.references import cai_table3, wang_afp_bound, wang_table


def gt_frame(*rows):
    return pd.DataFrame(rows, columns=["image_id", "finding", "x", "y", "w", "h"])


def box_frame(*rows):
    return pd.DataFrame(rows, columns=["image_id", "finding", "rank", "x", "y", "w", "h", "score"])


def row(res, protocol, finding, t):
    sel = res[(res.protocol == protocol) & (res.finding == finding) & np.isclose(res.t, t)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


def test_hits_misses_duplicates_and_missing_boxes():
    gt = gt_frame(("A", "Mass", 0, 0, 10, 10), ("B", "Mass", 100, 100, 20, 20), ("C", "Mass", 0, 0, 10, 10))
    boxes = box_frame(
        ("A", "Mass", 1, 0, 0, 10, 10, 0.9),    # hit
        ("A", "Mass", 2, 0, 0, 10, 10, 0.5),    # duplicate on the same GT: still a hit, not an FP
        ("A", "Mass", 3, 50, 50, 10, 10, 0.4),  # miss -> FP
        ("B", "Mass", 1, 0, 0, 5, 5, 0.8),      # miss -> FP; C has no box at all: its GT is missed
    )
    res = evaluate(boxes, gt, "r1", findings=["Mass"])
    r = row(res, "all/iou", "Mass", 0.5)
    assert (r.acc, r.afp, r.n_gt, r.n_images) == (pytest.approx(1 / 3), pytest.approx(2 / 3), 3, 3)
    # Mass at T=0.5: Wang AFP 0.7215 x 3 images -> FP budget 2: both FPs fit, bounded == all
    r = row(res, "bounded/iou", "Mass", 0.5)
    assert (r.acc, r.afp) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert list(res.columns) == RESULT_COLUMNS and set(res.metric) == {"acc"}
    assert len(res) == len(IOU_THRESHOLDS) * 2 + len(IOBB_THRESHOLDS)


def test_bounded_stops_before_budget_and_ignores_later_ranks():
    # Nodule at T=0.1: Wang AFP 0.6077 x 3 images -> budget floor(1.82) = 1 FP.
    gt = gt_frame(("A", "Nodule", 0, 0, 10, 10), ("B", "Nodule", 0, 0, 10, 10), ("C", "Nodule", 0, 0, 10, 10))
    boxes = box_frame(
        ("A", "Nodule", 1, 60, 60, 10, 10, 0.9),  # B_c[0] FP (1 FP, AFP 0.33 <= 0.61)
        ("B", "Nodule", 1, 0, 0, 10, 10, 0.8),    # B_c[1] hit
        ("C", "Nodule", 1, 60, 60, 10, 10, 0.7),  # B_c[2] FP #2 would give AFP 0.67 > 0.61: stop here
        ("C", "Nodule", 2, 0, 0, 10, 10, 0.99),   # B_c[3] rank 2 comes after all rank 1: beyond the stop
    )
    assert list(ranked_list(boxes, ["A", "B", "C"], "Nodule")[["image_id", "rank"]].itertuples(index=False)) == [
        ("A", 1), ("B", 1), ("C", 1), ("C", 2)]
    res = evaluate(boxes, gt, "r1", findings=["Nodule"])
    b, a = row(res, "bounded/iou", "Nodule", 0.1), row(res, "all/iou", "Nodule", 0.1)
    assert (b.acc, b.afp) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert (a.acc, a.afp) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert b.afp <= wang_afp_bound("Nodule", 0.1)


def test_strictly_greater_edge():
    gt = gt_frame(("A", "Mass", 0, 0, 10, 10))
    half = box_frame(("A", "Mass", 1, 0, 0, 10, 5, 0.9))    # IoU = 50/100 = 0.5 exactly; IoBB = 1
    shifted = box_frame(("A", "Mass", 1, 5, 0, 10, 10, 0.9))  # IoBB = 50/100 = 0.5 exactly
    assert box_overlap([0, 0, 10, 5], [0, 0, 10, 10]) == 0.5
    res = evaluate(half, gt, "r")
    assert row(res, "all/iou", "Mass", 0.5).acc == 0 and row(res, "all/iou", "Mass", 0.5).afp == 1  # 0.5 > 0.5 fails
    assert row(res, "all/iou", "Mass", 0.4).acc == 1 and row(res, "all/iou", "Mass", 0.4).afp == 0
    assert row(res, "all/iobb", "Mass", 0.9).acc == 1
    res = evaluate(shifted, gt, "r")
    assert row(res, "all/iobb", "Mass", 0.5).acc == 0 and row(res, "all/iobb", "Mass", 0.25).acc == 1


def test_image_with_two_findings_and_boxes_outside_I_c():
    gt = gt_frame(("D", "Mass", 0, 0, 10, 10), ("D", "Nodule", 50, 50, 10, 10))
    boxes = box_frame(
        ("D", "Mass", 1, 50, 50, 10, 10, 0.9),    # lies on the Nodule GT: a Mass FP, never a Nodule hit
        ("D", "Nodule", 1, 50, 50, 10, 10, 0.9),  # Nodule hit
    )
    res = evaluate(boxes, gt, "r", findings=["Mass", "Nodule"])
    m, n = row(res, "all/iou", "Mass", 0.3), row(res, "all/iou", "Nodule", 0.3)
    assert (m.acc, m.afp, n.acc, n.afp) == (0, 1, 1, 0)
    # boxes on an image without a GT box of c (E) are not in B_c: neither hit nor FP, |I_c| unchanged
    extra = box_frame(("E", "Mass", 1, 0, 0, 10, 10, 0.99), ("E", "Nodule", 1, 9, 9, 1, 1, 0.99))
    res2 = evaluate(pd.concat([boxes, extra]), gt, "r", findings=["Mass", "Nodule"])
    pd.testing.assert_frame_equal(res, res2)


def test_finding_without_gt_gives_nan_rows_and_names():
    res = evaluate(box_frame(), gt_frame(("A", "Mass", 0, 0, 1, 1)), "r", findings=["Mass", "Effusion"])
    e = row(res, "all/iou", "Effusion", 0.1)
    assert e.n_gt == 0 and math.isnan(e.acc) and math.isnan(e.afp)
    assert protocol_name("all", "iou", oracle=True) == "all/iou/oracle"
    assert set(evaluate(box_frame(), gt_frame(), "r", oracle=True).protocol) == {
        "bounded/iou/oracle", "all/iou/oracle", "all/iobb/oracle"}
    with pytest.raises(ValueError, match="IoBB"):
        protocol_name("bounded", "iobb")
    dup = box_frame(("A", "Mass", 1, 0, 0, 1, 1, 0.5), ("A", "Mass", 1, 0, 0, 1, 1, 0.5))
    with pytest.raises(ValueError, match="repeat"):
        evaluate(dup, gt_frame(("A", "Mass", 0, 0, 1, 1)), "r")


def test_references():
    w = wang_table()
    assert len(w) == 56 and set(w.finding) == set(BOXED_FINDINGS)
    assert wang_afp_bound("Mass", 0.2) == 0.6941
    assert wang_afp_bound("Mass", 0.25) == 0.6941        # missing T -> largest tabulated T below
    assert math.isnan(wang_afp_bound("Mass", 0.05))      # nothing below -> NaN
    c = cai_table3()
    assert len(c) == 12 * 8 and c.query("setting == 't=3' and t_iou == 0.1 and finding == 'Nodule'").acc.item() == 0.57


def random_case(rng, n_images=40, findings=("Mass", "Nodule", "Effusion"), size=100.0):
    gts, boxes = [], []
    for i in range(n_images):
        for c in findings:
            if rng.random() < 0.5:
                for _ in range(rng.integers(1, 3)):   # 1 or 2 GT boxes of c on the image
                    gts.append((f"im{i}", c, *rng.uniform(0, size / 2, 2), *rng.uniform(5, size / 2, 2)))
            for r in range(1, rng.integers(0, 4) + 1):  # 0..3 ranked boxes, also on images without GT
                boxes.append((f"im{i}", c, r, *rng.uniform(0, size / 2, 2), *rng.uniform(5, size / 2, 2),
                              float(rng.choice([0.3, 0.5, rng.random()]))))  # score ties happen
    return box_frame(*boxes), gt_frame(*gts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_protocol_equals_box_by_box_reference(seed):
    boxes, gt = random_case(np.random.default_rng(seed))
    res = evaluate(boxes, gt, "r", findings=["Mass", "Nodule", "Effusion"])
    for r in res.itertuples():
        mode, family = r.protocol.split("/")
        acc, afp = evaluate_reference(boxes, gt, r.finding, r.t, mode, family)
        assert (r.acc, r.afp) == (pytest.approx(acc, abs=1e-12), pytest.approx(afp, abs=1e-12)), r
    assert (res.query("protocol == 'bounded/iou'").acc.to_numpy()
            <= res.query("protocol == 'all/iou'").acc.to_numpy() + 1e-12).all()


def test_overlap_paths_agree():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0, 50, (200, 4)), rng.uniform(0, 50, (200, 4))
    a[:10, 2:] = 0                                               # degenerate boxes give 0, not NaN
    for kind in ("iou", "iobb"):
        fast = box_overlap(a, b, kind)
        slow = [box_overlap_reference(p, q, kind) for p, q in zip(a, b)]
        assert np.array_equal(fast, slow)
        assert box_overlap(a[:, None], b[None], kind).shape == (200, 200)
    assert np.allclose(box_overlap(a, a)[10:], 1) and np.all(box_overlap(a, b) <= box_overlap(a, b, "iobb") + 1e-15)


def test_perfect_boxes_give_acc_1_afp_0():
    _, gt = random_case(np.random.default_rng(4))
    gt = gt.drop_duplicates(["image_id", "finding"])   # one GT box per (image, finding), as in NIH
    boxes = gt.assign(rank=1, score=0.5)
    res = evaluate(boxes, gt, "r", findings=["Mass", "Nodule", "Effusion"])
    assert (res.acc == 1).all() and (res.afp == 0).all()


def test_shifting_boxes_monotonically_lowers_acc():
    _, gt = random_case(np.random.default_rng(5), n_images=60)
    gt = gt.drop_duplicates(["image_id", "finding"])
    accs = []
    for shift in (0, 2, 5, 10, 20, 40, 80):
        boxes = gt.assign(rank=1, score=0.5, x=gt.x + shift, y=gt.y + shift / 2)
        accs.append(evaluate(boxes, gt, "r", protocols=(("all", "iou"), ("all", "iobb"))).set_index(
            ["protocol", "finding", "t"]).acc)
    for before, after in zip(accs, accs[1:]):
        assert (after.dropna() <= before.dropna()).all()
    assert accs[0].dropna().eq(1).all() and accs[-1].dropna().eq(0).all()   # 80 px shift misses everything


# --- MaxBoxAccV2-style summary (Choe et al. 2020) ---


def test_component_boxes_match_skimage_reference():
    rng = np.random.default_rng(6)
    for _ in range(5):
        h = ndimage_smooth(rng.random((24, 31)))
        for tau in (0.0, 0.3, 0.5, 0.7, 1.01):
            fast, slow = component_boxes(h, tau), component_boxes_reference(h, tau)
            assert np.array_equal(fast[np.lexsort(fast.T[::-1])], slow[np.lexsort(slow.T[::-1])])
    assert component_boxes(np.zeros((4, 4)), 0.5).shape == (0, 4)


def ndimage_smooth(a):
    a = ndimage.gaussian_filter(a, 2)
    return (a - a.min()) / (a.max() - a.min())


def blob_map(image_id):
    """10x10 map over a 100x100 image: core cells rows 2-4, cols 3-6 at 0.6, a halo rows 1-7, cols 1-8 at 0.3."""
    h = np.zeros((10, 10))
    h[1:8, 1:9] = 0.3
    h[2:5, 3:7] = 0.6
    return Heatmap(image_id, "Mass", h, 100, 100)


def test_maxboxacc_threshold_from_validation_vs_oracle():
    core, halo = (30, 20, 40, 30), (10, 10, 80, 70)          # image-frame boxes of the core and the halo
    val_gt = gt_frame(("v1", "Mass", *core), ("v2", "Mass", *core))
    eval_gt = gt_frame(("e1", "Mass", *halo), ("e2", "Mass", *halo), ("e3", "Mass", *halo))  # e3 has no map
    val = [blob_map("v1"), blob_map("v2")]
    ev = [blob_map("e1"), blob_map("e2")]
    res = max_box_acc(ev, eval_gt, "r", val_maps=val, val_gt=val_gt, findings=["Mass"])
    tau = res.query("metric == 'cam_threshold'").set_index("t").acc
    acc = res.query("metric == 'maxboxacc'").set_index("t").acc
    assert set(res.protocol) == {"maxboxacc/val"} and (res.n_images == 3).all() and (res.n_gt == 3).all()
    assert tau[0.7] == pytest.approx(0.31)          # lowest tau that isolates the core (IoU 1 on val)
    # on eval the core box has IoU 1200/5600 = 0.21 with the halo GT: wrong at every delta
    assert (acc == 0).all()
    oracle = max_box_acc(ev, eval_gt, "r", findings=["Mass"])
    assert set(oracle.protocol) == {"maxboxacc/oracle"}
    o = oracle.query("metric == 'maxboxacc'").set_index("t").acc
    assert np.allclose(o, 2 / 3)     # halo box found at tau <= 0.3 on e1, e2; e3 (no map) wrong
    assert oracle.query("metric == 'cam_threshold'").acc.max() <= 0.3
    assert len(CAM_THRESHOLDS) == 100
