"""What the focal findings' scores track: a fresh phantom of a pretraining seed, scored by a weights file; for
each focal finding, the labels its score correlates with most, and its AUROC on images that hold the finding
alone against images with no finding (no co-occurring label to lean on). From the repository root:
    PYTHONPATH=. python docs/results/label_shortcuts.py WORKDIR [WEIGHTS] [SEED]
(2,000 images at difficulty 0.5, 384 px, k-max head; about 4 min on 2 cores.)"""
import sys
from pathlib import Path

import numpy as np
import torch

from models.resnet_msa import create_model
from pipeline.base.amp import autocast
from pipeline.base.home import Home
from pipeline.base.vocab import FINDINGS
from pipeline.config.train import RuntimeConfig
from pipeline.images.dataset import CacheDataset
from pipeline.ingest.nih import ingest_nih
from pipeline.phantom import generate
from pipeline.phantom.seeds import require_pretrain_seed
from pipeline.training.engine import batch_loader, prepare
from pipeline.training.metrics import auroc
from pipeline.training.weights import load_init

FOCAL = ("Atelectasis", "Nodule", "Pneumothorax", "Mass", "Infiltration")


def main(work: Path, weights: str, seed: int) -> None:
    require_pretrain_seed(seed)
    if not (work / "phantom" / "truth.csv").exists():
        generate(work / "phantom", n=2000, seed=seed, size=1024, difficulty=0.5, progress=False)
    home = Home(work / "home").make()
    if not (work / "home" / "ingested").exists():
        ingest_nih(home, work / "phantom", sizes=(384,))
        (work / "home" / "ingested").touch()
    ds = CacheDataset(home, 384)
    model = create_model("resnet18", "bilinear", pool_top=0.1)
    load_init(model, weights, "resnet18")
    model = model.to(memory_format=torch.channels_last).eval()
    rt, dev = RuntimeConfig(amp="auto", channels_last=True, eval_batch_size=64, workers=0), torch.device("cpu")
    idx = np.arange(len(ds))
    scores, labels = [], []
    with torch.no_grad():
        for b in batch_loader(ds, [idx[i:i + 64] for i in range(0, len(idx), 64)], rt, dev):
            with autocast(dev, rt.amp):
                scores.append(model(prepare(b["image"], dev, rt)).float().numpy())
            labels.append(b["labels"].numpy())
    S, Y = np.concatenate(scores), np.concatenate(labels)
    print(f"phantom seed {seed}, difficulty 0.5, {len(Y)} images, weights {weights}")
    print("finding | AUROC, all images | positives alone | AUROC, alone vs no finding | labels its score tracks (r)")
    for f in FOCAL:
        k = FINDINGS.index(f)
        r = sorted(((float(np.corrcoef(S[:, k], Y[:, j])[0, 1]), g) for j, g in enumerate(FINDINGS)
                    if Y[:, j].std() > 0), reverse=True)[:3]
        alone = Y.sum(1) == Y[:, k]
        a_all = auroc(S[:, [k]], Y[:, [k]])[0]
        a_alone = auroc(S[alone][:, [k]], Y[alone][:, [k]])[0]
        print(f"{f} | {a_all:.3f} | {int(Y[alone, k].sum())} | {a_alone:.3f} | "
              + ", ".join(f"{g} {v:.2f}" for v, g in r))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "models/weights/localize-384-resnet18-bilinear-384.pt",
         int(sys.argv[3]) if len(sys.argv) > 3 else 1006)
