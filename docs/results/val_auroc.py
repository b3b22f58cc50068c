"""Validation AUROC of a weights file on a home's validation split (the split `config` makes), at input `size`:
the comparison of starting weights on one set of images in models/weights/README.md. From the repository root:
    PYTHONPATH=. python docs/results/val_auroc.py HOME CONFIG WEIGHTS SIZE POOL_TOP"""
import json, sys
import torch
from models.resnet_msa import create_model
from pipeline.base.home import Home
from pipeline.images.dataset import CacheDataset
from pipeline.training.data import split_ids
from pipeline.training.engine import evaluate
from pipeline.training.stages import resolved_config
from pipeline.training.weights import load_init
from pipeline.base.vocab import BOXED_FINDINGS

home_dir, config, weights, size, top = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
home = Home.resolve(home_dir)
cfg = resolved_config(config)
ids = split_ids(home, cfg)   # one read-only connection of its own
val = CacheDataset(home, size, image_ids=ids["val"])
model = create_model(cfg.model.arch, cfg.model.neck, pool_top=top)
load_init(model, weights, cfg.model.arch)
model = model.to(memory_format=torch.channels_last)
m = evaluate(model, val, device=torch.device("cpu"), runtime=cfg.runtime)
print(json.dumps({"weights": weights, "size": size, "n_val": len(val), "auroc_boxed_mean": m["auroc_boxed_mean"],
                  "boxed": {f: m["auroc"][f] and round(m["auroc"][f], 3) for f in BOXED_FINDINGS}}))
