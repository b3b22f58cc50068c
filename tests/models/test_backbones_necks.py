"""Shape and contract tests for every backbone x neck (sec. 2.3, Table 1), plus bf16/channels_last."""
import pytest
import torch
from torch import nn

from models import BACKBONES, NECKS, create_model, list_models
from models.names import BACKBONE_NAMES, NECK_NAMES

CHANNELS = {"resnet18": (256, 512), "resnet34": (256, 512), "resnet50": (1024, 2048)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("arch,neck", list_models())
def test_contract_shapes(arch, neck):
    assert set(BACKBONES) == set(CHANNELS) and set(NECKS) == {"baseline", "bilinear", "deconv"}
    assert tuple(BACKBONES) == BACKBONE_NAMES and tuple(NECKS) == NECK_NAMES   # what configs check, torch-free
    m = create_model(arch, neck, num_classes=14).eval()
    c3, c4 = CHANNELS[arch]
    S = 64
    x = torch.randn(2, 1, S, S)
    stride, D = (32, c4) if neck == "baseline" else (16, 768)
    assert (m.feature_stride, m.num_features) == (stride, D)
    assert m.backbone.conv1.in_channels == 1
    assert all(isinstance(getattr(m, k), nn.Module) for k in ("backbone", "neck", "head"))
    with torch.no_grad():
        X = m.forward_features(x)
        feats = m.forward_intermediates(x)
        logits = m.forward_head(X)
        direct = m(x)
        cams = m.cam(X)
    assert X.shape == (2, D, S // stride, S // stride)
    assert feats["layer3"].shape == (2, c3, S // 16, S // 16)
    assert feats["layer4"].shape == (2, c4, S // 32, S // 32)
    assert set(feats) == {"layer3", "layer4", "msa", "logits"}
    torch.testing.assert_close(feats["msa"], X)
    torch.testing.assert_close(feats["logits"], logits)
    torch.testing.assert_close(direct, logits)
    with torch.no_grad():
        torch.testing.assert_close(m(x, intermediates=True)["msa"], X)
    assert logits.shape == (2, 14) and torch.isfinite(logits).all()
    assert cams.shape == (2, 14, S // stride, S // stride)


@pytest.mark.parametrize("neck", ["bilinear", "deconv"])
@pytest.mark.parametrize("S", [72, 100, 88])
def test_msa_odd_sizes_match_layer3(neck, S):
    # 72 -> layer3 5x5, layer4 3x3 (x2 = 6, cropped); 100 -> 7 / 4; 88 -> 6 / 3 (exact).
    m = create_model("resnet18", neck).eval()
    with torch.no_grad():
        feats = m.forward_intermediates(torch.randn(1, 1, S, S + 16))
    assert feats["msa"].shape[-2:] == feats["layer3"].shape[-2:]
    assert feats["msa"].shape[1] == 768


def test_msa_layers_as_in_the_paper():
    bil, dec = create_model("resnet50", "bilinear").neck, create_model("resnet50", "deconv").neck
    for neck in (bil, dec):
        assert (neck.reduce4.in_channels, neck.reduce4.out_channels, neck.reduce4.kernel_size) == (2048, 512, (1, 1))
        assert (neck.reduce3.in_channels, neck.reduce3.out_channels, neck.reduce3.kernel_size) == (1024, 256, (1, 1))
    assert not any(isinstance(mod, nn.ConvTranspose2d) for mod in bil.modules())
    deconvs = [mod for mod in dec.modules() if isinstance(mod, nn.ConvTranspose2d)]
    assert len(deconvs) == 1 and deconvs[0].kernel_size == (3, 3) and deconvs[0].stride == (2, 2)


def test_msa_concatenates_upsampled_layer4_and_lateral_layer3():
    neck = create_model("resnet18", "bilinear").neck
    feats = {"layer3": torch.randn(1, 256, 4, 4), "layer4": torch.randn(1, 512, 2, 2)}
    X = neck(feats)
    torch.testing.assert_close(X[:, 512:], neck.reduce3(feats["layer3"]))
    up = torch.nn.functional.interpolate(neck.reduce4(feats["layer4"]), scale_factor=2, mode="bilinear")
    torch.testing.assert_close(X[:, :512], up)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="resnet18"):
        create_model("resnet101", "bilinear")
    with pytest.raises(ValueError, match="deconv"):
        create_model("resnet18", "fpn")


@pytest.mark.parametrize("neck", ["bilinear", "deconv"])
def test_bf16_channels_last_close_to_fp32(neck):
    m = create_model("resnet18", neck).eval()
    x = torch.randn(2, 1, 100, 100)          # odd grid: layer3 7x7, layer4 4x4 (deconv output cropped)
    masks = (torch.rand(2, 14, 7, 7) > 0.3).float()
    with torch.no_grad():
        ref_X = m.forward_features(x)
        ref = m.forward_head(ref_X, masks)
        m_cl = m.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            X = m_cl.forward_features(x.to(memory_format=torch.channels_last))
            out = m_cl.forward_head(X, masks)
            cams = m_cl.cam(X)
    assert X.dtype == torch.bfloat16 and out.shape == (2, 14) and cams.shape == (2, 14, 7, 7)
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() <= 0.05 * scale + 1e-3
    assert torch.corrcoef(torch.stack([X.float().flatten(), ref_X.flatten()]))[0, 1] > 0.99


def test_bf16_channels_last_train_step_has_gradients():
    m = create_model("resnet18", "bilinear").to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 1, 64, 64).to(memory_format=torch.channels_last)
    y = (torch.rand(4, 14) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        X = m.forward_features(x)
        logits = m.forward_head(X, torch.ones(4, 14, 4, 4))
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
    loss.backward()
    for p in (m.backbone.conv1.weight, m.neck.reduce4.weight, m.head.weight, m.head.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
