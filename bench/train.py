"""Training step rate from the uint8 cache data path over the rate with synthetic in-memory input, one run.

Data path: shuffled index batches gathered from the cache shards (`CacheDataset.get_batch`, DataLoader
workers when `--workers`), uint8 to the device, augmentation and normalization there, then the step.
Synthetic: the same step on one prepared batch already on the device. Steps alternate one for one, so that
load from other processes hits both alike; rates are batch / median step time.
Target (docs/design.md#performance): >= 0.9. Last line: `train data/synthetic ratio: X`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ingest import make_dataset  # noqa: E402  (the radiograph-like PNG writer of bench/ingest.py)

from models import create_model  # noqa: E402
from pipeline.base.amp import MODES as AMP_MODES, describe, resolve_amp  # noqa: E402
from pipeline.config.train import AugmentConfig, RuntimeConfig  # noqa: E402
from pipeline.images.dataset import CacheDataset  # noqa: E402
from pipeline.ingest.nih import ingest_nih  # noqa: E402
from pipeline.training.engine import (ClassificationLoss, epoch_batches, init_distributed, prepare,  # noqa: E402
                                      train_one_epoch, train_step)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(step_module, opt, sched, ds, batches, x, y, device, runtime, augment) -> tuple[list, list]:
    """Per-step seconds of the data path and of the synthetic step, interleaved one for one.

    The engine's real epoch loop runs the data path; its per-step hook runs one synthetic step, so both
    see the same machine load. A data step's time runs from the end of the previous synthetic step to
    the end of its own optimizer step (gather, transfer, augment, normalize, step).
    """
    data, synthetic, mark = [], [], [_clock(device)]

    def hook(step: int) -> None:
        now = _clock(device)
        data.append(now - mark[0])
        train_step(step_module, opt, sched, x, y, device, runtime)
        mark[0] = _clock(device)
        synthetic.append(mark[0] - now)
    train_one_epoch(step_module, opt, sched, ds, batches, device=device, runtime=runtime, augment=augment,
                    seed=0, on_step=hook, desc="bench")
    return data[1:], synthetic[1:]         # the first data step includes the loader's start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small run (< 1 min on 2 cores)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--neck", default="bilinear")
    ap.add_argument("--size", type=int, default=None, help="input size (default 256, quick 128)")
    ap.add_argument("--batch", type=int, default=None, help="batch (default 32, quick 16)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps of each kind (default 16, quick 8)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto", choices=AMP_MODES, help="autocast (auto: bf16 where native)")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers gathering batches")
    ap.add_argument("--images", type=int, default=None, help="cached images (default 4 batches)")
    args = ap.parse_args(argv)
    size = args.size or (128 if args.quick else 256)
    batch = args.batch or (16 if args.quick else 32)
    steps = args.steps or (8 if args.quick else 16)
    runtime = RuntimeConfig(device=args.device, amp=args.amp, channels_last=args.channels_last, batch_size=batch,
                            workers=args.workers)
    _, device = init_distributed(runtime)
    runtime = replace(runtime, amp=resolve_amp(args.amp, device))
    augment = AugmentConfig()
    with tempfile.TemporaryDirectory() as tmp:
        n = args.images or 4 * batch
        make_dataset(Path(tmp) / "nih", n, max(size, 256))
        ingest_nih(Path(tmp) / "home", Path(tmp) / "nih", sizes=(size,))
        ds = CacheDataset(Path(tmp) / "home", size)
        model = create_model(args.arch, args.neck).to(device).train()
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        step_module = ClassificationLoss(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        first = ds.get_batch(np.arange(batch))
        x = prepare(first["image"], device, runtime, augment, seed=0)
        y = first["labels"].to(device)
        for _ in range(2):                                                           # warm-up
            train_step(step_module, opt, sched, x, y, device, runtime)
        order = [b for e in range(steps // max(1, n // batch) + 2) for b in epoch_batches(n, batch, seed=e)]
        data, synthetic = measure(step_module, opt, sched, ds, order[:steps + 1], x, y, device, runtime, augment)
        rate = {"data": batch / float(np.median(data)), "synthetic": batch / float(np.median(synthetic))}
    print(f"device: {device} ({describe(device)})  model: {args.arch}-{args.neck}  input: {size}  batch: {batch}  "
          f"amp: {runtime.amp}  "
          f"channels_last: {args.channels_last}  workers: {args.workers}")
    print(f"train img/s, cache data path: {rate['data']:.1f}")
    print(f"train img/s, synthetic input: {rate['synthetic']:.1f}")
    print(f"train data/synthetic ratio: {rate['data'] / rate['synthetic']:.3f}")


if __name__ == "__main__":
    main()
