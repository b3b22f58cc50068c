"""erasure_step (batched torch) against erasure_step_reference (numpy + skimage), and hand-made maps."""
import numpy as np
import pytest
import torch

from models.erasure import (connected_component, erasure_step, erasure_step_reference, normalize_unerased,
                            normalize_unerased_reference)


def _reference_batch(cam, mask):
    out = np.empty_like(mask)
    for idx in np.ndindex(cam.shape[:-2]):
        out[idx] = erasure_step_reference(cam[idx], mask[idx])
    return out


@pytest.mark.parametrize("size,smooth", [(16, False), (16, True), (32, True), (64, True)])
def test_fast_equals_reference_on_random_maps_over_three_steps(size, smooth):
    g = torch.Generator().manual_seed(size + smooth)
    cam = torch.randn(4, 6, size, size, generator=g)
    if smooth:  # blobby maps, like real CAMs: several components per threshold
        cam = torch.nn.functional.avg_pool2d(cam, 5, stride=1, padding=2, count_include_pad=False)
    mask = torch.ones_like(cam)
    ref = mask.numpy().copy()
    for _ in range(3):  # masks are cumulative over t
        new = erasure_step(cam, mask)
        ref = _reference_batch(cam.numpy(), ref)
        np.testing.assert_array_equal(new.numpy(), ref)
        assert torch.all(new <= mask) and torch.any(new < mask)
        mask = new


def test_ties_and_degenerate_maps_match_reference():
    g = torch.Generator().manual_seed(0)
    cam = torch.randint(0, 3, (3, 5, 16, 16), generator=g).float()  # many tied maxima
    cam[0, 0] = 7.0  # constant map: everything is the maximum
    mask = torch.ones_like(cam)
    mask[1, 1] = 0  # fully erased map: stays erased
    mask[2, 2, 5:9] = 0
    ref = mask.numpy().copy()
    for _ in range(3):
        mask = erasure_step(cam, mask)
        ref = _reference_batch(cam.numpy(), ref)
        np.testing.assert_array_equal(mask.numpy(), ref)
    assert mask[0, 0].sum() == 0 and mask[1, 1].sum() == 0


def test_hand_made_map_erases_the_component_of_the_maximum_8_connected():
    cam = torch.tensor([[9., 0, 0, 0, 0, 0],
                        [0, 6, 0, 0, 8, 0],
                        [0, 0, 5, 0, 7, 0],
                        [0, 0, 0, 0, 0, 0],
                        [4, 0, 0, 0, 0, 2]])
    mask = torch.ones_like(cam)
    m1 = erasure_step(cam, mask)
    # norm = cam/9 >= 0.5: {9, 6, 5} joined diagonally (8-connectivity), {8, 7} apart: only the first goes.
    expect1 = torch.ones_like(cam)
    expect1[0, 0] = expect1[1, 1] = expect1[2, 2] = 0
    assert torch.equal(m1, expect1)
    # Step 2 renormalizes over the unerased area (max 8): {8, 7} goes; 4/8 = 0.5 is foreground but apart.
    m2 = erasure_step(cam, m1)
    expect2 = expect1.clone()
    expect2[1, 4] = expect2[2, 4] = 0
    assert torch.equal(m2, expect2)
    # Step 3: max 4 -> only the 4 (2/4 = 0.5 is another component).
    m3 = erasure_step(cam, m2)
    expect3 = expect2.clone()
    expect3[4, 0] = 0
    assert torch.equal(m3, expect3)


def test_batched_over_images_and_classes_without_cross_talk():
    cam = torch.zeros(2, 3, 8, 8)
    cam[0, 1, 2, 2] = 1.0
    cam[1, 2, 6, 6] = 1.0
    mask = erasure_step(cam, torch.ones_like(cam))
    assert mask[0, 1, 2, 2] == 0 and mask[0, 1].sum() == 63
    assert mask[1, 2, 6, 6] == 0 and mask[1, 2].sum() == 63
    # Zero maps are constant: the whole unerased area is the maximum's component.
    assert mask[0, 0].sum() == 0


def test_normalize_matches_reference_and_lies_in_unit_interval():
    g = torch.Generator().manual_seed(3)
    cam = torch.randn(5, 7, 9, generator=g) * 100
    mask = (torch.rand(5, 7, 9, generator=g) > 0.3).float()
    norm = normalize_unerased(cam, mask)
    for i in range(5):
        np.testing.assert_array_equal(norm[i].numpy(), normalize_unerased_reference(cam[i].numpy(), mask[i].numpy()))
    assert norm.min() == 0 and norm.max() == 1 and torch.all(norm[mask == 0] == 0)


def test_connected_component_handles_long_snakes():
    fg = torch.zeros(1, 9, 9, dtype=torch.bool)
    fg[0, ::2, :] = True       # rows 0, 2, 4, 6, 8
    fg[0, 1::4, 8] = True      # joined at alternating ends: one long snake
    fg[0, 3::4, 0] = True
    seed = torch.zeros_like(fg)
    seed[0, 8, 8] = True
    assert torch.equal(connected_component(fg, seed), fg)
