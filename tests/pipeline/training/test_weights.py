"""Offline ImageNet weights: local torch cache only, conv1 RGB filters summed, clear message when absent."""
import logging

import pytest
import torch
import torchvision

from models import create_model
from pipeline.training.weights import checkpoint_dir, imagenet_candidates, load_imagenet


@pytest.fixture()
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("load_imagenet must never download")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return tmp_path


def test_file_names_are_torchvisions():
    assert [n for n, _ in imagenet_candidates("resnet18")] == ["resnet18-f37072fd.pth"]
    assert [n for n, _ in imagenet_candidates("resnet34")] == ["resnet34-b627a593.pth"]
    assert [n for n, _ in imagenet_candidates("resnet50")] == ["resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"]


def test_loads_from_local_cache_and_sums_conv1(torch_home):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    assert checkpoint_dir() == torch_home / "hub" / "checkpoints"
    checkpoint_dir().mkdir(parents=True)
    torch.save(state, checkpoint_dir() / "resnet18-f37072fd.pth")
    model = create_model("resnet18", "bilinear")
    head_before = model.head.weight.clone()
    assert load_imagenet(model, "resnet18") is True
    conv1 = model.backbone.conv1.weight
    assert conv1.shape == (64, 1, 7, 7)
    torch.testing.assert_close(conv1, state["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    torch.testing.assert_close(model.backbone.bn1.running_var, state["bn1.running_var"])
    torch.testing.assert_close(model.head.weight, head_before)      # our head stays as it was
    # gray input through the summed filter equals RGB-replicated input through the original one
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, conv1, stride=2, padding=3),
                               torch.nn.functional.conv2d(x.expand(1, 3, 32, 32), state["conv1.weight"],
                                                          stride=2, padding=3), rtol=1e-4, atol=1e-4)


def test_missing_file_names_the_exact_path(torch_home, caplog):
    model = create_model("resnet50", "baseline")
    before = model.backbone.conv1.weight.clone()
    with caplog.at_level(logging.WARNING, logger="pipeline.training.weights"):
        assert load_imagenet(model, "resnet50") is False
    expected = str(torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth")
    assert expected in caplog.text and "from scratch" in caplog.text
    assert torch.equal(model.backbone.conv1.weight, before)


def test_corrupt_file_is_an_error_naming_it(torch_home):
    checkpoint_dir().mkdir(parents=True)
    bad = checkpoint_dir() / "resnet18-f37072fd.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="resnet18-f37072fd.pth"):
        load_imagenet(create_model("resnet18", "baseline"), "resnet18")
