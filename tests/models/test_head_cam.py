"""Class-wise head and CAM (sec. 2.1, eq. 1-3): CAM linearity and fast == literal erasure."""
import pytest
import torch

from models import ClassWiseHead, classwise_logits_reference, create_model


@pytest.fixture()
def head_and_X():
    torch.manual_seed(0)
    head = ClassWiseHead(32, 14)
    torch.nn.init.normal_(head.bias)
    return head, torch.randn(3, 32, 7, 5)


def test_cam_of_erased_features_equals_erased_cam(head_and_X):
    head, X = head_and_X
    masks = (torch.rand(3, 14, 7, 5) > 0.4).float()
    cams = head.cam(X)
    for c in range(14):
        erased = head.cam(X * masks[:, c:c + 1])    # M^c replicated over D (eq. 1)
        torch.testing.assert_close(erased[:, c], cams[:, c] * masks[:, c])
    # and with one shared mask for all classes
    torch.testing.assert_close(head.cam(X * masks[:, :1]), cams * masks[:, :1])


def test_cam_is_the_per_class_contraction(head_and_X):
    head, X = head_and_X
    cams = head.cam(X)
    assert cams.shape == (3, 14, 7, 5)
    c, b, i, j = 4, 1, 6, 2
    torch.testing.assert_close(cams[b, c, i, j], X[b, :, i, j] @ head.weight[c])
    # eq. 2 without erasure: logit = mean CAM + bias
    torch.testing.assert_close(head(X), cams.mean(dim=(2, 3)) + head.bias)


def test_masked_logits_equal_literal_reference(head_and_X):
    head, X = head_and_X
    masks = (torch.rand(3, 14, 7, 5) > 0.5).float()
    X1 = X.clone().requires_grad_(True)
    X2 = X.clone().requires_grad_(True)
    fast = head(X1, masks)
    ref = classwise_logits_reference(X2, masks, head.weight, head.bias)
    torch.testing.assert_close(fast, ref)
    g = torch.randn_like(fast)
    wf = torch.autograd.grad(fast, (X1, head.weight, head.bias), g)
    wr = torch.autograd.grad(ref, (X2, head.weight, head.bias), g)
    for a, b in zip(wf, wr):
        torch.testing.assert_close(a, b)


def test_masks_all_keep_and_all_erased(head_and_X):
    head, X = head_and_X
    torch.testing.assert_close(head(X, torch.ones(3, 14, 7, 5)), head(X))
    torch.testing.assert_close(head(X, torch.zeros(3, 14, 7, 5)), head.bias.expand(3, 14))


def test_erasing_one_class_leaves_other_branches(head_and_X):
    head, X = head_and_X
    masks = torch.ones(3, 14, 7, 5)
    masks[:, 2, 1:4, 1:3] = 0
    out, base = head(X, masks), head(X)
    torch.testing.assert_close(out[:, [0, 1, 3]], base[:, [0, 1, 3]])
    assert not torch.allclose(out[:, 2], base[:, 2])


def test_bad_masks_and_pre_logits(head_and_X):
    head, X = head_and_X
    with pytest.raises(ValueError, match="masks"):
        head(X, torch.ones(3, 13, 7, 5))
    assert head(X, pre_logits=True).shape == (3, 32)
    with pytest.raises(ValueError):
        head(X, torch.ones(3, 14, 7, 5), pre_logits=True)


def test_model_forward_head_with_masks_matches_reference():
    torch.manual_seed(1)
    m = create_model("resnet18", "bilinear").eval()
    with torch.no_grad():
        X = m.forward_features(torch.randn(2, 1, 64, 64))
        masks = (torch.rand(2, 14, *X.shape[-2:]) > 0.5).float()
        torch.testing.assert_close(m.forward_head(X, masks),
                                   classwise_logits_reference(X, masks, m.head.weight, m.head.bias),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.cam(X * masks[:, 5:6])[:, 5], m.cam(X)[:, 5] * masks[:, 5],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("top", [0.1, 0.3, 1 / 35])
def test_top_share_pooling_equals_literal_reference(head_and_X, top):
    """k-max pooling (`pool_top` < 1): fast == sorted cell scores, with and without erasure, values and grads."""
    _, X = head_and_X
    torch.manual_seed(2)
    head = ClassWiseHead(32, 14, pool_top=top)
    torch.nn.init.normal_(head.bias)
    for masks in (torch.ones(3, 14, 7, 5), (torch.rand(3, 14, 7, 5) > 0.5).float()):
        X1 = X.clone().requires_grad_(True)
        fast = head(X1, masks)
        ref = classwise_logits_reference(X, masks, head.weight, head.bias, pool_top=top)
        torch.testing.assert_close(fast, ref)
        torch.testing.assert_close(head(X), classwise_logits_reference(X, torch.ones_like(masks), head.weight,
                                                                       head.bias, pool_top=top))
    # the top share is never below the mean, and a single hot cell moves it (GAP dilutes it 35-fold)
    gap = ClassWiseHead(32, 14)
    gap.load_state_dict(head.state_dict())
    assert (head(X) >= gap(X) - 1e-6).all()
    hot = X.clone()
    hot[:, :, 3, 2] += 10 * head.weight[0] / head.weight[0].norm()
    assert (head(hot)[:, 0] - head(X)[:, 0]).min() > 3 * (gap(hot)[:, 0] - gap(X)[:, 0]).max()
    with pytest.raises(ValueError, match="pre_logits"):
        head(X, pre_logits=True)
    with pytest.raises(ValueError, match="pool_top"):
        ClassWiseHead(32, 14, pool_top=0)
