"""Comparison table and the per-run HTML report, from synthetic inputs."""
import base64
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from pipeline.evaluation.compare import comparison_table, to_markdown
from pipeline.evaluation.maxboxacc import Heatmap, max_box_acc
from pipeline.evaluation.protocol import evaluate
from pipeline.evaluation.references import cai_table3, wang_table
from pipeline.evaluation.report import HIT_IOU, Case, plot_case, select_cases, write_report

FINDINGS = ["Atelectasis", "Cardiomegaly", "Mass", "Nodule"]
FRAME = 1024.0


def synthetic_run(seed, quality):
    """GT boxes on 1024x1024 images; mined boxes = GT jittered by `quality` (0 perfect .. 1 poor)."""
    rng = np.random.default_rng(seed)
    gts, boxes = [], []
    for i in range(24):
        c = FINDINGS[i % len(FINDINGS)]
        x, y = rng.uniform(100, 600, 2)
        w, h = rng.uniform(100, 300, 2)
        gts.append((f"img{i:03d}", c, x, y, w, h))
        for r in (1, 2, 3):
            jit = rng.normal(0, quality * 150 * r, 4)
            boxes.append((f"img{i:03d}", c, r, x + jit[0], y + jit[1], max(w + jit[2], 5), max(h + jit[3], 5),
                          1.0 - 0.2 * r))
    return (pd.DataFrame(boxes, columns=["image_id", "finding", "rank", "x", "y", "w", "h", "score"]),
            pd.DataFrame(gts, columns=["image_id", "finding", "x", "y", "w", "h"]))


def test_comparison_table_puts_runs_next_to_paper_rows():
    results = []
    runs = {"am1": ("AM", "t=1"), "am2": ("AM", "t=2"), "am3": ("AM", "t=3"), "bil": ("MSA", "bilinear")}
    for k, run in enumerate(runs):
        boxes, gt = synthetic_run(k, quality=0.2 + 0.1 * k)
        results.append(evaluate(boxes, gt, run, findings=FINDINGS))
    results = pd.concat(results)
    table = comparison_table(results, runs, findings=FINDINGS)
    assert list(table.columns[:6]) == ["group", "t_iou", "setting", "source", "protocol", "run_id"]
    assert set(table.group) == {"AM", "MSA", "ref"}           # no KP runs -> no KP paper rows
    am = table[(table.group == "AM") & (table.t_iou == 0.1)]
    assert list(zip(am.setting, am.source)) == [("t=1", "ours"), ("t=1", "Cai 2018"), ("t=2", "ours"),
                                                ("t=2", "Cai 2018"), ("t=3", "ours"), ("t=3", "Cai 2018")]
    cai = cai_table3().query("group == 'AM' and setting == 't=3' and t_iou == 0.3").set_index("finding").acc
    row = table.query("setting == 't=3' and source == 'Cai 2018' and t_iou == 0.3").iloc[0]
    assert all(row[c] == cai[c] for c in FINDINGS)
    ours = table.query("run_id == 'am2' and t_iou == 0.3").iloc[0]
    expect = results.query("run_id == 'am2' and protocol == 'all/iou' and t == 0.3").set_index("finding").acc
    assert all(ours[c] == pytest.approx(expect[c]) for c in FINDINGS)
    assert ours["mean"] == pytest.approx(expect.mean())
    wang = table.query("source == 'Wang 2017' and t_iou == 0.1").iloc[0]
    assert wang["Nodule"] == wang_table().query("finding == 'Nodule' and t_iou == 0.1").acc.item()
    md = to_markdown(table)
    assert md.count("\n") == len(table) + 2 and "| group | t_iou |" in md and "Cai 2018" in md
    # an oracle run stays labeled in the table
    oracle = results.assign(protocol=results.protocol + "/oracle")
    assert set(comparison_table(oracle, runs, protocol="all/iou/oracle").query("source == 'ours'").protocol) == {
        "all/iou/oracle"}
    with pytest.raises(ValueError, match="setting"):
        comparison_table(results, {"x": ("AM", "t=9")})


def chest(size=128):
    """An 8-bit 'chest': dark background, two bright lungs."""
    yy, xx = np.mgrid[:size, :size] / size
    lungs = (((xx - 0.32) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1) | (((xx - 0.68) / 0.17) ** 2 +
                                                                        ((yy - 0.5) / 0.33) ** 2 < 1)
    return (40 + 150 * lungs).astype(np.uint8)


def gaussian_map(cx, cy, s, n=32):
    yy, xx = (np.mgrid[:n, :n] + 0.5) / n
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s ** 2))


def test_report_is_self_contained_and_figures_show_boxes(tmp_path):
    boxes, gt = synthetic_run(7, quality=0.3)
    results = evaluate(boxes, gt, "run7", findings=FINDINGS)
    maps = [Heatmap(r.image_id, r.finding,
                    gaussian_map((r.x + r.w / 2) / FRAME, (r.y + r.h / 2) / FRAME, r.w / FRAME / 3), FRAME, FRAME)
            for r in gt.itertuples()]
    results = pd.concat([results, max_box_acc(maps, gt, "run7", findings=FINDINGS)])
    chosen = select_cases(boxes, gt, n=1, findings=FINDINGS)
    hits = {f for f, g in chosen.groupby("finding") if (g.label == "best").any()}
    assert 0 < len(hits) and (chosen[chosen.label == "best"].best_iou > HIT_IOU).all()   # a best case is a hit
    assert chosen.groupby("finding").label.agg(lambda s: (s == "worst").sum()).eq(1).all()
    assert (chosen.groupby("finding").best_iou.agg(lambda s: s.iloc[0] >= s.iloc[-1])).all()

    cases = []
    for r in chosen.itertuples():
        g = gt[(gt.image_id == r.image_id) & (gt.finding == r.finding)]
        m = boxes[(boxes.image_id == r.image_id) & (boxes.finding == r.finding)].sort_values("rank")
        cx, cy, s = (g.x.item() + g.w.item() / 2) / FRAME, (g.y.item() + g.h.item() / 2) / FRAME, 0.08
        # t=1 finds the core, t=2 and t=3 spread (attention mining), H_f averages them
        hs = [gaussian_map(cx, cy, s), gaussian_map(cx + 0.1, cy, s), gaussian_map(cx, cy + 0.1, s)]
        hs.append(np.mean(hs, axis=0) / np.mean(hs, axis=0).max())
        cases.append(Case(r.image_id, r.finding, chest(), hs, g[["x", "y", "w", "h"]].to_numpy(),
                          m[["x", "y", "w", "h"]].to_numpy(), frame=(FRAME, FRAME), label=r.label,
                          best_iou=r.best_iou))
    html_path = write_report(tmp_path / "reports" / "run7", "run7", results, cases)
    text = html_path.read_text()
    pngs = sorted(html_path.parent.glob("*.png"))
    assert len(pngs) == 1 + len(cases)
    # self-contained: every figure inline, nothing linked
    assert text.count('src="data:image/png;base64,') == len(pngs) and not re.search(r'src="(?!data:)', text)
    for name in ("bounded/iou (acc)", "all/iou (acc)", "all/iobb (acc)", "maxboxacc/oracle (maxboxacc)", "V2 mean",
                 "n_images"):
        assert name in text
    first = re.search(r'base64,([^"]+)"', text).group(1)
    assert base64.b64decode(first) == (html_path.parent / "acc_vs_t.png").read_bytes()

    # the case figure shows vermillion GT and sky-blue mined boxes (Okabe-Ito) on the image
    img = imread(plot_case(cases[0], tmp_path / "one_case.png"))[..., :3]
    vermillion = (img[..., 0] > 0.75) & (abs(img[..., 1] - 0.37) < 0.1) & (img[..., 2] < 0.12)
    sky_blue = (abs(img[..., 0] - 0.34) < 0.1) & (abs(img[..., 1] - 0.71) < 0.1) & (img[..., 2] > 0.85)
    assert vermillion.sum() > 100 and sky_blue.sum() > 100
    assert img.shape[1] > 3 * img.shape[0]                    # four panels side by side


def test_a_finding_without_hits_shows_no_best_case():
    boxes, gt = synthetic_run(7, quality=0.3)
    missed = boxes.assign(x=boxes.x + 2000.0)                     # every box far from its truth
    chosen = select_cases(missed, gt, n=1, findings=FINDINGS)
    assert set(chosen.label) == {"worst"} and len(chosen) == len(FINDINGS)
