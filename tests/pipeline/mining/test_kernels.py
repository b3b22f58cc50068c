"""Fast (batched torch) and reference (numpy/skimage) mining kernels agree; eq. 8 and sec. 3.2 on hand-made maps."""
import zlib

import numpy as np
import pytest
import torch

from pipeline.mining.boxes import boxes_from_heatmaps
from pipeline.mining.heatmap_fusion import attention_mining, fuse, fused_heatmap
from pipeline.mining.reference import boxes_reference, fused_heatmap_reference


def test_eq8_fill_in_on_a_hand_made_map():
    cam = torch.tensor([[8., 0, 4, 0, 2]])
    H, M = attention_mining(cam, steps=3)
    # t=1: H1 = cam/8; {8} is the maximum's component (4/8 = 0.5 is foreground but apart): M1 erases column 0.
    # t=2: over columns 1..4 the max is 4: H2 = [0, 0, 1, 0, .5]; M2 also erases column 2.
    # t=3: over columns 1, 3, 4 the max is 2: H3 = [0, 0, 0, 0, 1].
    torch.testing.assert_close(H, torch.tensor([[[1, 0, .5, 0, .25]], [[0, 0, 1, 0, .5]], [[0, 0, 0, 0, 1]]]))
    torch.testing.assert_close(M, torch.tensor([[[0., 1, 1, 1, 1]], [[0., 1, 0, 1, 1]]]))
    # Eq. 8: column 0 (erased at t=1) is filled from H1 at t=2 and t=3: (1 + 1 + 1)/3 = 1;
    # column 2 (erased at t=2) from H2 at t=3: (.5 + 1 + 1)/3; column 4 never erased: (.25 + .5 + 1)/3.
    expect = torch.tensor([[1, 0, 2.5 / 3, 0, 1.75 / 3]])
    torch.testing.assert_close(fuse(H, M), expect)
    np.testing.assert_allclose(fused_heatmap_reference(cam.numpy()), expect.numpy(), rtol=1e-6)


def test_eq8_with_one_step_is_the_normalized_cam_and_steps_fill_from_the_step_that_erased():
    g = torch.Generator().manual_seed(1)
    cam = torch.randn(5, 3, 16, 16, generator=g)
    H, M = attention_mining(cam, steps=1)
    torch.testing.assert_close(fuse(H, M), H[0])
    H, M = attention_mining(cam, steps=3)
    fused = fuse(H, M)
    erased1, erased2, kept = M[0] == 0, (M[0] == 1) & (M[1] == 0), M[1] == 1
    torch.testing.assert_close(fused[erased1], H[0][erased1])
    torch.testing.assert_close(fused[erased2], ((H[0] + 2 * H[1]) / 3)[erased2])
    torch.testing.assert_close(fused[kept], H.mean(0)[kept])
    assert fused.min() >= 0 and torch.allclose(fused.flatten(-2).amax(-1), torch.ones(5, 3))


@pytest.mark.parametrize("size", [16, 32])
def test_fused_heatmap_fast_equals_reference(size):
    g = torch.Generator().manual_seed(size)
    cam = torch.nn.functional.avg_pool2d(torch.randn(12, 1, size, size, generator=g), 3, 1, 1)[:, 0]
    fast = fused_heatmap(cam)
    for n in range(len(cam)):
        np.testing.assert_allclose(fast[n].numpy(), fused_heatmap_reference(cam[n].numpy()), atol=1e-6)


def _maps(kind, n, size, g):
    if kind == "noise":
        return torch.rand(n, size, size, generator=g)
    if kind == "smooth":
        return torch.nn.functional.avg_pool2d(torch.randn(n, 1, size, size, generator=g), 5, 1, 2,
                                              count_include_pad=False)[:, 0]
    # phantom-like: a few Gaussian lesions of random size and strength over a weak background
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cam = 0.05 * torch.rand(n, size, size, generator=g)
    for _ in range(3):
        cy, cx = (torch.rand(2, n, 1, 1, generator=g) * size).unbind(0)
        s = 0.5 + torch.rand(n, 1, 1, generator=g) * size / 6
        cam += torch.rand(n, 1, 1, generator=g) * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s ** 2))
    return cam


FLIP = 0.01   # a threshold change this small can flip a neck thinner than a pixel (see the test below)


def _edges(box) -> np.ndarray:
    x, y, w, h = (float(box[k]) for k in "xywh") if isinstance(box, dict) else box
    return np.array([x, y, x + w, y + h])


def _close(a, b) -> bool:
    """Two xywh boxes (lists or reference dicts) whose edges are within 1 px."""
    return bool(np.abs(_edges(a) - _edges(b)).max() <= 1)


def _between(inner, box, outer) -> bool:
    """`inner` inside `box` inside `outer`, to 1 px."""
    i, b, o = _edges(inner), _edges(box), _edges(outer)
    return bool((b[:2] <= i[:2] + 1).all() and (b[2:] >= i[2:] - 1).all()
                and (o[:2] <= b[:2] + 1).all() and (o[2:] >= b[2:] - 1).all())


@pytest.mark.parametrize("kind,size,frame", [("noise", 16, (1024, 1024)), ("smooth", 32, (1024, 1024)),
                                             ("phantom", 32, (1024, 1024)), ("phantom", 16, (700, 900))])
def test_boxes_fast_and_reference_agree_within_one_pixel(kind, size, frame):
    """Per threshold, the fast box is the reference box within 1 px. The one allowed exception: where the
    component's connectivity hinges on a neck thinner than a pixel (nodes within ~1e-2 of τ), the pixel grid
    and the surface may disagree; then the fast box must lie between the reference boxes at τ + 0.01 and
    τ - 0.01 (components only grow as τ falls), and such flips must stay rare. Where no threshold flips, the
    ranked, de-duplicated outputs are equal too."""
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()) % 1000 + size)
    fused = fused_heatmap(_maps(kind, 24, size, g))
    frames = torch.tensor([frame], dtype=torch.float32).expand(len(fused), 2)
    thresholds = (0.5, 0.35, 0.2)
    per_tau = [boxes_from_heatmaps(fused, frames, (t,)) for t in thresholds]
    ranked = boxes_from_heatmaps(fused, frames, thresholds)
    flips = 0
    for n in range(len(fused)):
        flipped = False
        for t, fast in zip(thresholds, per_tau):
            box = fast.xywh[n, 0].tolist()
            ref = boxes_reference(fused[n].numpy(), frame, (t,))[0]
            if not _close(box, ref):
                outer, inner = (boxes_reference(fused[n].numpy(), frame, (t + d,))[0] for d in (-FLIP, FLIP))
                assert _between(inner, box, outer), (n, t, box, ref, inner, outer)
                flips, flipped = flips + 1, True
            else:
                assert float(fast.score[n, 0]) == pytest.approx(ref["score"], abs=1e-3)
        if not flipped:  # same boxes, same ranking, same duplicates collapsed
            ref = boxes_reference(fused[n].numpy(), frame, thresholds)
            assert int(ranked.valid[n].sum()) == len(ref)
            for k, r in enumerate(ref):
                assert abs(float(ranked.threshold[n, k]) - r["threshold"]) < 1e-6
                assert _close(ranked.xywh[n, k].tolist(), r)
    assert flips <= max(1, 0.03 * len(fused) * len(thresholds)), flips


def test_boxes_on_a_hand_made_plateau():
    # 8x8 grid on an 800x800 frame: 100 px per cell, node i at x = 100 i + 50. A plateau of 1 on cells
    # rows 2..4, columns 3..5, and a weaker blob apart that no box may reach.
    fused = torch.zeros(1, 8, 8)
    fused[0, 2:5, 3:6] = 1.0
    fused[0, 7, 0] = 0.9
    boxes = boxes_from_heatmaps(fused, torch.tensor([[800., 800.]]), thresholds=(0.5, 0.2))
    # tau=0.5: the surface crosses half-way between nodes, at x = 300 and 600, y = 200 and 500.
    # tau=0.2: 0.8 of the way out from the plateau: x = 270..630, y = 170..530 (first/last pixel centres inside).
    assert boxes.valid[0].tolist() == [True, True]
    assert boxes.xywh[0, 0].tolist() == [300, 200, 300, 300]
    assert boxes.xywh[0, 1].tolist() == [270, 170, 360, 360]
    assert boxes.threshold[0].tolist() == pytest.approx([0.5, 0.2])
    assert boxes.score[0, 0] > boxes.score[0, 1]  # ranked by mean H_f inside
    ref = boxes_reference(fused[0].numpy(), (800, 800), thresholds=(0.5, 0.2))
    assert [[r[k] for k in "xywh"] for r in ref] == boxes.xywh[0].tolist()


def test_duplicate_boxes_collapse():
    # One pixel per cell: a sharp plateau gives the same box at every threshold, so only one comes out.
    fused = torch.zeros(2, 8, 8)
    fused[:, 2:5, 3:6] = 1.0
    fused[1, 5, 3] = 0.4  # the second map grows at tau=0.35 and 0.2, to the same box: two boxes
    boxes = boxes_from_heatmaps(fused, torch.tensor([[8., 8.]]).expand(2, 2), thresholds=(0.5, 0.35, 0.2))
    assert boxes.valid.tolist() == [[True, False, False], [True, True, False]]
    assert boxes.xywh[0, 0].tolist() == [3, 2, 3, 3]
    assert sorted(boxes.threshold[1, :2].tolist()) == pytest.approx([0.35, 0.5])
    for n in range(2):
        assert len(boxes_reference(fused[n].numpy(), (8, 8))) == int(boxes.valid[n].sum())


def test_empty_batch():
    boxes = boxes_from_heatmaps(torch.zeros(0, 8, 8), torch.zeros(0, 2))
    assert boxes.xywh.shape == (0, 3, 4) and boxes.valid.shape == (0, 3)


def test_per_map_thresholds_equal_each_map_cut_alone():
    """Thresholds `[N, K]` (a box rule per finding): each map's boxes are those it gets alone with its own."""
    g = torch.Generator().manual_seed(7)
    fused = fused_heatmap(_maps("phantom", 6, 16, g))
    frames = torch.tensor([[1024., 1024.]]).expand(len(fused), 2)
    own = torch.tensor([[0.9, 0.8, 0.7], [0.5, 0.35, 0.2], [0.6, 0.4, 0.1]])[torch.arange(len(fused)) % 3]
    together = boxes_from_heatmaps(fused, frames, own)
    for n in range(len(fused)):
        alone = boxes_from_heatmaps(fused[n:n + 1], frames[:1], tuple(own[n].tolist()))
        for field in ("xywh", "score", "threshold", "valid"):
            assert torch.equal(getattr(together, field)[n], getattr(alone, field)[0]), (n, field)
    assert not torch.equal(together.threshold[0], together.threshold[1])
