"""Helpers for the training tests: a learnable blob dataset in NIH layout, and the torchrun DDP worker.

Blob data: each image has a smooth background; `Mass` adds a bright disk and `Pneumothorax` a dark disk at a
random place (each positive with probability 0.4, independently), and both are written to BBox_List_2017.csv,
so they are findings with boxes. The dataset goes through the real NIH ingestion into the cache.

Run as a script under torchrun: `torchrun --nproc-per-node 2 ddp_worker.py HOME OUT.pt` trains a few steps of
the `base` stage and rank 0 saves the weights to OUT.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

BLOB_FINDINGS = ("Mass", "Pneumothorax")
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def blob_image(rng: np.random.Generator, size: int, findings: list[str]) -> tuple[np.ndarray, list]:
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 100 + 50 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.1) + rng.normal(0, 8, (size, size))
    boxes = []
    for f in findings:
        r = rng.uniform(0.08, 0.14) * size
        cx, cy = rng.uniform(r + 2, size - r - 2, 2)
        disk = (xx * size - cx) ** 2 + (yy * size - cy) ** 2 < r ** 2
        img[disk] += 80 if f == "Mass" else -80
        boxes.append((f, cx - r, cy - r, 2 * r, 2 * r))
    return np.clip(img, 0, 255).astype(np.uint8), boxes


def write_blob_nih(root: Path, n: int = 160, size: int = 128, seed: int = 0, test_fraction: float = 0.2) -> Path:
    """Write `n` blob images as an NIH-layout dataset under `root` (one patient per two images)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries, bbox, test, trainval = [HEADER], ["Image Index,Finding Label,Bbox [x,y,w,h],,,\n"], [], []
    for k in range(n):
        name = f"{k:08d}_000.png"
        findings = [f for f in BLOB_FINDINGS if rng.random() < 0.4]
        img, boxes = blob_image(rng, size, findings)
        Image.fromarray(img).save(root / "images" / name)
        entries.append(f"{name},{'|'.join(findings) or 'No Finding'},0,{k // 2},50,F,PA,{size},{size},0.1,0.1\n")
        bbox += [f"{name},{f},{x:.2f},{y:.2f},{w:.2f},{h:.2f}\n" for f, x, y, w, h in boxes]
        (test if k >= n * (1 - test_fraction) else trainval).append(f"{name}\n")
    (root / "Data_Entry_2017_v2020.csv").write_text("".join(entries))
    (root / "BBox_List_2017.csv").write_text("".join(bbox))
    (root / "test_list.txt").write_text("".join(test))
    (root / "train_val_list.txt").write_text("".join(trainval))
    return root


def blob_home(tmp: Path, n: int = 160, input_size: int = 64, seed: int = 0) -> Path:
    """A home with `n` blob images ingested and cached at `input_size`."""
    from pipeline.ingest.nih import ingest_nih

    root = write_blob_nih(tmp / "nih", n=n, seed=seed)
    home = tmp / "home"
    ingest_nih(home, root, sizes=(input_size,), workers=1)
    return home


def tiny_config(**overrides) -> dict:
    """A resnet18 config at 64 px that trains in seconds on 2 cores."""
    from pipeline.config.check import merge

    base = {
        "name": "tiny", "seed": 0,
        "model": {"arch": "resnet18", "neck": "bilinear", "imagenet": False},
        "data": {"input_size": 64, "val_fraction": 0.3},
        "runtime": {"device": "cpu", "amp": "auto", "batch_size": 16, "eval_batch_size": 64, "log_every": 0},
        "stages": {"base": {"epochs": 5, "lr": 0.1, "warmup_steps": 4},
                   "msa_init": {"epochs": 2, "lr": 0.1},
                   "end_to_end": {"epochs": 1, "lr": 0.02, "patience": 2}},
        "am": {"steps": 2, "mode": "kp", "am_fraction": 0.25, "stage": {"epochs": 1, "lr": 0.002, "freeze_bn": True}},
    }
    return merge(base, overrides)


def main(home: str, out: str) -> None:
    """DDP worker: train a few `base` steps (BN frozen, see test_ddp.py) and let rank 0 save the weights."""
    import torch

    from pipeline.config.train import load_config
    from pipeline.training.checkpoint import load_checkpoint
    from pipeline.training.stages import train

    cfg = load_config(tiny_config(**ddp_overrides()))
    model_id = train(home, cfg)
    assert torch.distributed.get_world_size() == 2
    if torch.distributed.get_rank() == 0:
        state = load_checkpoint(Path(home) / "checkpoints" / model_id / "final.pt")
        torch.save(state["model"], out)
    torch.distributed.destroy_process_group()


def ddp_overrides() -> dict:
    """One short `base` stage, fp32, no augmentation, frozen BatchNorm: the gradient math alone is compared."""
    return {"runtime": {"amp": "none", "channels_last": False, "batch_size": 8, "threads": 1},
            "data": {"augment": {"enabled": False}},
            "stages": {"base": {"epochs": 1, "lr": 0.05, "freeze_bn": True},
                       "msa_init": {"epochs": 0}, "end_to_end": {"epochs": 0}},
            "am": {"steps": 0}}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main(*sys.argv[1:3])
