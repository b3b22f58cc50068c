"""How fast the CPU training step can go: memory format, torch.compile and the data path, in one run.

Variants of the real step (`create_model(arch, neck)`, SGD, ClassificationLoss, the engine's `train_step`
with the runtime's amp), each from the same initial weights (a deepcopy of one model), with its own optimizer:
  eager-cl      eager, channels_last (what training uses: RuntimeConfig.channels_last)
  eager-nchw    eager, contiguous NCHW
  compile-cl    torch.compile(model) (inductor, default mode), channels_last; compile time reported apart
  autotune-cl   torch.compile(mode="max-autotune-no-cudagraphs"), with --autotune only
  data-cl       eager-cl fed from the uint8 cache by the engine's epoch loop (gather + prepare + step)
All but data-cl run on one prepared in-memory batch. The engine's `train_one_epoch` drives data-cl, and its
per-step hook runs one step of every other variant, so steps go round-robin and load from other processes
hits all alike (as in bench/train.py, whose data/synthetic ratio is the data-cl / eager-cl ratio here).
Rates are batch / median step time. Inductor compiles into a fresh cache directory (a cold compile, as
on a first training run) unless --warm-cache. Last line: `train compile/eager ratio: X`; under --quick, which
skips the compile, `train channels_last/nchw ratio: X`.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ingest import make_dataset  # noqa: E402  (the radiograph-like PNG writer of bench/ingest.py)
from train import _clock  # noqa: E402

from models import create_model  # noqa: E402
from pipeline.base.amp import MODES as AMP_MODES, describe, resolve_amp  # noqa: E402
from pipeline.images.dataset import CacheDataset  # noqa: E402
from pipeline.ingest.nih import ingest_nih  # noqa: E402
from pipeline.config.train import AugmentConfig, RuntimeConfig  # noqa: E402
from pipeline.training.engine import (ClassificationLoss, epoch_batches, init_distributed, prepare,  # noqa: E402
                                      train_one_epoch, train_step)


class Variant:
    """One model copy with its own optimizer and input; `step()` runs one timed training step."""

    def __init__(self, name: str, model, x, y, device, runtime, compile_mode: str | None = None):
        self.name, self.x, self.y, self.device, self.runtime = name, x, y, device, runtime
        self.times: list[float] = []
        self.compile_s: float | None = None
        self.error: str | None = None
        self.model = model
        run = torch.compile(model, mode=compile_mode) if compile_mode else model
        self.step_module = ClassificationLoss(run)
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)

    def step(self) -> float:
        t0 = _clock(self.device)
        train_step(self.step_module, self.opt, self.sched, self.x, self.y, self.device, self.runtime)
        return _clock(self.device) - t0

    def warm_up(self, n: int) -> None:
        """`n` untimed steps; a compiled variant's first one (forward and backward graphs) is its compile
        time. An exception makes the variant unavailable, with the reason on one line."""
        try:
            first = self.step()
            if self.name.startswith(("compile", "autotune")):
                self.compile_s = first
                print(f"{self.name}: first step (compile) {first:.1f} s", flush=True)
            for _ in range(n - 1):
                self.step()
        except Exception as e:  # inductor without a compiler, an unsupported op, ...
            self.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            print(f"{self.name}: unavailable ({self.error})", flush=True)

    @property
    def rate(self) -> float:
        return len(self.x) / float(np.median(self.times)) if self.times else float("nan")


def measure(variants: list[Variant], data_variant: Variant, ds, batches, augment) -> None:
    """The engine's epoch loop steps `data_variant` from the cache; after each of its steps the hook runs one
    step of every available variant. A data step's time runs from the end of the previous hook to the end
    of its own optimizer step (gather, transfer, augment, normalize, step); the first one, which includes
    the loader's start, is dropped."""
    mark = [_clock(data_variant.device)]

    def hook(step: int) -> None:
        data_variant.times.append(_clock(data_variant.device) - mark[0])
        for v in variants:
            if v.error is None:
                try:
                    v.times.append(v.step())
                except Exception as e:  # a recompile that fails mid-run
                    v.error = f"{type(e).__name__}: {str(e).strip()[:200]}"
        mark[0] = _clock(data_variant.device)
    train_one_epoch(data_variant.step_module, data_variant.opt, data_variant.sched, ds, batches,
                    device=data_variant.device, runtime=data_variant.runtime, augment=augment, seed=0,
                    on_step=hook, desc="bench")
    data_variant.times = data_variant.times[1:]
    for v in variants:
        v.times = v.times[1:]            # alike: every variant drops its first round


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (< 1 min on 2 cores, compile skipped "
                    "unless --compile)")
    ap.add_argument("--compile", action="store_true", help="compile also under --quick")
    ap.add_argument("--no-compile", dest="no_compile", action="store_true", help="skip the compiled variants")
    ap.add_argument("--autotune", action="store_true", help="add mode=max-autotune-no-cudagraphs (slow compile)")
    ap.add_argument("--warm-cache", action="store_true", help="use inductor's default cache dir (warm compile)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--neck", default="bilinear")
    ap.add_argument("--size", type=int, default=None, help="input size (default 256, quick 128)")
    ap.add_argument("--batch", type=int, default=None, help="batch (default 32, quick 16)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 6, quick 4)")
    ap.add_argument("--amp", default="auto", choices=AMP_MODES, help="autocast (auto: bf16 where native)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args(argv)
    size = args.size or (128 if args.quick else 256)
    batch = args.batch or (16 if args.quick else 32)
    steps = args.steps or (4 if args.quick else 6)
    do_compile = not args.no_compile and (args.compile or not args.quick)
    runtime = RuntimeConfig(device="cpu", amp=args.amp, channels_last=True, batch_size=batch, threads=args.threads)
    _, device = init_distributed(runtime)
    runtime = replace(runtime, amp=resolve_amp(args.amp, device))
    nchw = replace(runtime, channels_last=False)
    augment = AugmentConfig()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.warm_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        n = (steps + 2) * batch          # one epoch covers warm-up round + timed steps: every batch distinct
        make_dataset(Path(tmp) / "nih", n, max(size, 256))
        ingest_nih(Path(tmp) / "home", Path(tmp) / "nih", sizes=(size,), workers=1)
        ds = CacheDataset(Path(tmp) / "home", size)
        torch.manual_seed(0)
        base = create_model(args.arch, args.neck).to(device).train()
        first = ds.get_batch(np.arange(batch))
        x = prepare(first["image"], device, runtime, augment, seed=0)
        y = first["labels"].to(device)

        def copy_of(channels_last: bool):
            m = copy.deepcopy(base)
            return m.to(memory_format=torch.channels_last) if channels_last else m
        variants = [Variant("eager-cl", copy_of(True), x, y, device, runtime),
                    Variant("eager-nchw", copy_of(False), x.contiguous(), y, device, nchw)]
        modes = (["default"] if do_compile else []) + (["max-autotune-no-cudagraphs"] if args.autotune else [])
        for mode in modes:
            name = "compile-cl" if mode == "default" else "autotune-cl"
            variants.append(Variant(name, copy_of(True), x, y, device, runtime, compile_mode=mode))
        data = Variant("data-cl", copy_of(True), x, y, device, runtime)
        for v in variants + [data]:
            v.warm_up(2)
        if not do_compile:
            print("compile-cl: skipped under --quick (a cold inductor compile takes minutes on 2 cores); "
                  "--compile to include it", flush=True)
        batches = epoch_batches(n, batch, seed=1)[:steps + 1]
        measure(variants, data, ds, batches, augment)

    ref = variants[0].rate
    print(f"device: {device} ({describe(device)})  torch {torch.__version__}  threads: {torch.get_num_threads()}  "
          f"model: {args.arch}-{args.neck}  input: {size}  batch: {batch}  amp: {runtime.amp}  "
          f"timed steps: {steps}  ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')} "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}")
    print(f"{'variant':<13}{'img/s':>8}{'ratio':>8}{'step s':>9}{'compile s':>11}")
    for v in variants + [data]:
        if v.error is not None or not v.times:
            print(f"{v.name:<13}{'unavailable':>16}   {v.error or 'no timed steps'}")
            continue
        cs = f"{v.compile_s:.1f}" if v.compile_s is not None else "-"
        print(f"{v.name:<13}{v.rate:>8.1f}{v.rate / ref:>8.3f}{float(np.median(v.times)):>9.3f}{cs:>11}")
    print(f"train data/synthetic ratio: {data.rate / ref:.3f}")
    compiled = next((v for v in variants if v.name == "compile-cl" and v.error is None and v.times), None)
    if compiled:
        print(f"train compile/eager ratio: {compiled.rate / ref:.3f}")
    else:                          # --quick skips the compile: the layout is the measured choice then
        print(f"train channels_last/nchw ratio: {ref / variants[1].rate:.3f}")


if __name__ == "__main__":
    main()
