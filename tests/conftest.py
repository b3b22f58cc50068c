"""Shared fixtures. Services a test needs are started by the test itself."""
from __future__ import annotations

import importlib.util
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def package_data(package: str) -> Path:
    """Data folder of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.fail(f"{package} is not installed; run `make test` (it installs the data wheels)")
    return Path(spec.submodule_search_locations[0]) / "data"


@contextmanager
def scratch(tmp_path_factory, name: str):
    """A folder for a module-scoped fixture, removed when the module is done: trained homes weigh hundreds of MB,
    and the suite must fit the disk CI gives it (a full suite once filled it)."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def gray_image(seed: int, size: int = 128) -> np.ndarray:
    """A smooth synthetic radiograph-like image with a marker in the top-left corner."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 90 + 60 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.55) ** 2) / 0.08) + rng.normal(0, 6, (size, size))
    img[: size // 8, : size // 8] = 250
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def make_nih(tmp_path):
    """Write a small NIH-layout dataset: `make_nih(rows, boxes)` -> root.

    rows: list of (name, labels, patient); the PNG of each name is written unless name starts with 'missing'.
    boxes: list of (name, finding_as_written, x, y, w, h).
    """
    def make(rows, boxes=(), size=128, test=()):
        root = tmp_path / "nih"
        (root / "images").mkdir(parents=True, exist_ok=True)
        lines = [HEADER]
        for k, (name, labels, patient) in enumerate(rows):
            lines.append(f"{name},{labels},0,{patient},{40 + k},M,PA,2500,2500,0.143,0.143\n")
            if not name.startswith("missing") and "/" not in name:
                Image.fromarray(gray_image(k, size)).save(root / "images" / name)
        (root / "Data_Entry_2017_v2020.csv").write_text("".join(lines))
        bl = ["Image Index,Finding Label,Bbox [x,y,w,h],,,\n"] + [",".join(map(str, b)) + "\n" for b in boxes]
        (root / "BBox_List_2017.csv").write_text("".join(bl))
        (root / "test_list.txt").write_text("".join(f"{t}\n" for t in test))
        (root / "train_val_list.txt").write_text("".join(f"{r[0]}\n" for r in rows if r[0] not in test))
        return root
    return make


def register_tiny_model(home, model_id: str = "tiny", arch: str = "resnet18", neck: str = "bilinear",
                        input_size: int = 64, seed: int = 0, config: dict | None = None, stage: str = "base",
                        parent_id: str | None = None) -> str:
    """Save an untrained model as a checkpoint and register it in the `models` table (mining and flow tests);
    `stage` and `parent_id` make lineages."""
    import torch

    from models import create_model
    from pipeline.training.checkpoint import model_meta, register_model, save_checkpoint
    torch.manual_seed(seed)
    model = create_model(arch, neck, 14)
    meta = model_meta(model_id=model_id, parent_id=parent_id, stage=stage, arch=arch, neck=neck, num_classes=14,
                      input_size=input_size, config=config or {})
    path = Path(home) / "checkpoints" / model_id / "final.pt"
    register_model(home, meta, path, save_checkpoint({"model": model.state_dict(), "meta": meta}, path))
    return model_id
