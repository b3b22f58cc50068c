"""The phantom's visibility figures (pipeline.phantom.visibility): exact on a drawn case, and the phantom's own
`difficulty` lowers them."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.phantom.visibility import measure, renders, table


def striped(size=1024, period=32):
    """Rows alternating 90 / 110 every period/2 px: clutter of standard deviation 10 at any size it survives."""
    rows = (np.arange(size) // (period // 2)) % 2
    return np.repeat((90 + 20 * rows)[:, None], size, axis=1).astype(np.uint8)


def square():
    """(with, without, box): a 64 px square 40 grey levels above the striped clutter."""
    bare = striped()
    lesion = bare.copy()
    lesion[400:464, 400:464] += 40
    return lesion, bare, (400, 400, 64, 64)


def test_a_drawn_square_is_measured_exactly_at_full_size():
    m = measure(*square(), 1024)
    assert m["contrast"] == pytest.approx(40)
    assert m["clutter"] == pytest.approx(10, rel=0.02)
    assert m["contrast_clutter"] == pytest.approx(4, rel=0.02)
    assert m["core_px"] == pytest.approx(64)
    assert m["d_prime"] == pytest.approx(64 * 40 / 10, rel=0.02)


def test_shrinking_keeps_the_contrast_and_shrinks_the_core():
    lesion, bare, box = square()
    m = measure(lesion, bare, box, 256)
    assert m["core_px"] == pytest.approx(16, abs=1.5)
    assert 35 <= m["contrast"] <= 40
    assert measure(bare, bare, box, 256) is None     # no lesion: nothing to measure


def test_difficulty_makes_a_nodule_fainter():
    easy, hard = (table(["Nodule"], 2, [256], [d]).iloc[0] for d in (0.0, 1.0))
    assert easy["n"] == hard["n"] == 2
    assert hard["contrast"] < easy["contrast"]
    assert hard["core_px"] <= easy["core_px"]
    img, bare, box = renders("Nodule", 1, 0.0)[0]
    assert img.shape == bare.shape == (1024, 1024) and (img != bare).any()
