"""Mining throughput: bare forward vs end-to-end mining (cache in -> arrow rows out), in one run, same model
and settings; fast vs reference post-processing per image; peak RSS at two dataset sizes (flat memory).

Targets (docs/design.md#performance, issue 5): end-to-end mining >= 0.8x the bare forward rate on CPU (0.9x on a GPU).
Forward and mining runs alternate; the ratio is the median over `--repeats` pairs (a forward run and the mining
run right after it). On a GPU it is by wall clock; on a CPU by process CPU time, which other processes on a
shared machine distort less (both are printed). Last line: `mine/forward ratio: X`.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.base.amp import MODES as AMP_MODES, autocast, describe  # noqa: E402
from pipeline.base.vocab import FINDINGS  # noqa: E402
from pipeline.config.mining import MiningConfig  # noqa: E402
from pipeline.images.dataset import CacheDataset, normalize  # noqa: E402
from pipeline.mining import mine_shard  # noqa: E402
from pipeline.mining.boxes import boxes_from_heatmaps  # noqa: E402
from pipeline.mining.heatmap_fusion import fused_heatmap  # noqa: E402
from pipeline.mining.reference import mine_reference  # noqa: E402
from pipeline.mining.shard import one_thread_on_cpu  # noqa: E402

MODEL_ID = "bench"


def make_dataset(root: Path, n: int, frame: int, seed: int = 0, workers: int = 1) -> None:
    """bench/ingest.py's radiograph-like PNGs, relabelled with 1-3 positive findings each (NIH averages fewer:
    this is the harder case for mining, which makes one heatmap per positive finding)."""
    import pandas as pd
    from ingest import make_dataset as make_pngs   # bench/ingest.py, beside this script

    make_pngs(root, n, frame, seed, workers)
    rng = np.random.default_rng(seed)
    entry = root / "Data_Entry_2017_v2020.csv"
    table = pd.read_csv(entry)
    table["Finding Labels"] = ["|".join(FINDINGS[i] for i in sorted(rng.choice(14, rng.integers(1, 4), replace=False)))
                               for _ in range(len(table))]
    table.to_csv(entry, index=False)


def build_home(tmp: Path, args) -> Path:
    """The bench's home under `tmp`: synthetic images, their cache, a registered random-weight model. Kept and
    reused when `tmp/bench.json` says it was built with the same settings (`--home`)."""
    from models import create_model
    from pipeline.ingest.nih import ingest_nih
    from pipeline.training.checkpoint import model_meta, register_model, save_checkpoint

    home, stamp = tmp / "home", tmp / "bench.json"
    settings = json.dumps({k: getattr(args, k) for k in ("arch", "neck", "size", "frame", "n")})
    if stamp.exists() and stamp.read_text() == settings:
        return home
    if any(tmp.iterdir()):
        raise SystemExit(f"{tmp} holds something else than a bench home built with these settings: empty it")
    make_dataset(tmp / "nih", max(args.n), args.frame, workers=args.workers)
    ingest_nih(home, tmp / "nih", sizes=(args.size,), workers=args.workers)
    torch.manual_seed(0)
    model = create_model(args.arch, args.neck, 14)
    meta = model_meta(model_id=MODEL_ID, parent_id=None, stage="bench", arch=args.arch, neck=args.neck,
                      num_classes=14, input_size=args.size, config={})
    path = home / "checkpoints" / MODEL_ID / "final.pt"
    register_model(home, meta, path, save_checkpoint({"model": model.state_dict(), "meta": meta}, path))
    stamp.write_text(settings)
    return home


def config_of(args) -> MiningConfig:
    return MiningConfig(batch_size=args.batch, device=args.device, amp=args.amp,
                        channels_last=not args.no_channels_last, compile=args.compile).resolved()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of `fn()`, the device synchronized at both ends."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def forward_rate(model, batches, config: MiningConfig, features) -> tuple[float, float]:
    """The bare forward: uint8 batches already in memory -> X and logits, nothing after. (img/s, img/CPU-s)"""
    device = next(model.parameters()).device

    def run():
        with torch.inference_mode(), autocast(device, config.amp):
            for images in batches:
                x = normalize(images, device)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                model.forward_head(features(x))

    wall, cpu, _ = _timed(run, config.device)
    n = sum(len(b) for b in batches)
    return n / wall, n / cpu


def mining_rate(home, ids, config, model) -> tuple[float, float, int]:
    """End to end: `mine_shard` from the cache to an arrow table. (img/s, img/CPU-s, rows)"""
    wall, cpu, table = _timed(lambda: mine_shard(home, MODEL_ID, ids, config, "bench", model=model), config.device)
    return len(ids) / wall, len(ids) / cpu, table.num_rows


def postprocess_speedup(model, ds, n: int, n_reference: int, config, frame: int):
    """Per-image seconds of the fast (torch, `n` images in one batch, as mining runs it) and the reference
    (numpy/skimage on the full-size map, the first `n_reference` images) post-processing: from step-1 CAMs to
    ranked boxes. Also checks that the two agree on these maps: (fast s, reference s, maps per image,
    worst edge difference in px, same box counts)."""
    device = next(model.parameters()).device
    batch = ds.get_batch(np.arange(n))
    b, c = (batch["labels"] > 0).nonzero(as_tuple=True)
    with torch.inference_mode(), autocast(device, config.amp):
        X = model.forward_features(normalize(batch["image"], device))
    with torch.inference_mode():   # float32 CAMs, outside autocast, as mine_batch makes them
        cams = torch.einsum("mdhw,md->mhw", X[b.to(device)].float(), model.head.weight[c.to(device)].float())
    frames = torch.full((len(cams), 2), float(frame), device=device)

    def fast_path():   # as mine_batch runs it: one thread on a CPU
        with one_thread_on_cpu(device):
            return boxes_from_heatmaps(fused_heatmap(cams, config.steps), frames, config.thresholds)

    fast_path()   # warm-up
    times = []
    for _ in range(3):
        wall, _, fast_boxes = _timed(fast_path, config.device)
        times.append(wall)
    t0 = time.perf_counter()
    ref_boxes = [mine_reference(cam, (frame, frame), config.thresholds, config.steps)
                 for cam in cams[(b < n_reference).to(device)].cpu().numpy()]
    ref = (time.perf_counter() - t0) / n_reference
    # The two paths must agree on these real CAMs too: same boxes per threshold, edges within 1 px.
    worst, same_count = 0.0, True
    for m, boxes in enumerate(ref_boxes):
        fast = {round(float(t), 4): xywh for t, xywh, v in zip(fast_boxes.threshold[m].tolist(),
                                                               fast_boxes.xywh[m].tolist(),
                                                               fast_boxes.valid[m].tolist()) if v}
        same_count &= len(fast) == len(boxes)
        for r in boxes:
            x, y, w, h = fast.get(round(r["threshold"], 4), (np.inf,) * 4)
            worst = max(worst, abs(x - r["x"]), abs(y - r["y"]), abs(x + w - r["x"] - r["w"]),
                        abs(y + h - r["y"] - r["h"]))
    return min(times) / n, ref, len(cams) / n, worst, same_count


def ds_size(home) -> int:
    from pipeline.training.checkpoint import load_model

    return int(load_model(home, MODEL_ID)[1]["input_size"])


def _vm(field: str) -> float:
    """MB of a /proc/self/status field (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_child(home: str, n: int, config: dict) -> None:
    """Mine the first `n` images in this fresh process (model loaded by mine_shard) and print the peak RSS
    of the mining itself: the high-water mark is reset after the imports (Linux clear_refs 5)."""
    ids = CacheDataset(home, size=ds_size(home)).image_ids[:n]
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # no reset: the peak then includes the imports
    before = _vm("VmRSS")
    rows = mine_shard(home, MODEL_ID, ids, MiningConfig.from_dict(config), "rss").num_rows
    print(json.dumps({"n": n, "rows": rows, "rss_before_mb": before, "peak_rss_mb": _vm("VmHWM")}))


def peak_rss(home: Path, n: int, config: MiningConfig) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(home), str(n),
                          json.dumps(config.to_dict())], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small run (< 1 min on 2 cores)")
    ap.add_argument("--arch", default=None, help="resnet18|resnet34|resnet50 (default resnet50, quick resnet18)")
    ap.add_argument("--neck", default="bilinear")
    ap.add_argument("--size", type=int, default=None, help="model input (default 512, quick 256)")
    ap.add_argument("--frame", type=int, default=1024, help="original image side (NIH: 1024)")
    ap.add_argument("--n", type=int, nargs=2, default=None,
                    help="two dataset sizes, 4+ batches each (default 256 1024, quick 48 96); peak RSS on both, "
                         "rates on the larger (a flow's shard is larger still: fill and drain weigh less there)")
    ap.add_argument("--batch", type=int, default=None, help="default 32, quick 16")
    ap.add_argument("--repeats", type=int, default=None, help="alternating timed repeats (default 3)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="auto", choices=AMP_MODES, help="autocast (auto: bf16 where native)")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone (GPU)")
    ap.add_argument("--workers", type=int, default=1, help="image-writing and ingestion processes (setup only)")
    ap.add_argument("--home", type=Path, help="build the bench's data here and keep it; reused by a later run "
                    "with the same model and sizes (default: a temporary folder)")
    ap.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        return peak_rss_child(args.rss_child[0], int(args.rss_child[1]), json.loads(args.rss_child[2]))
    q = args.quick
    args.arch = args.arch or ("resnet18" if q else "resnet50")
    args.size = args.size or (256 if q else 512)
    args.n = sorted(args.n or ((48, 96) if q else (256, 1024)))
    args.batch = args.batch or (16 if q else 32)
    repeats = args.repeats or 3
    config = config_of(args)

    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True    # as mine_shard sets it: one input size
    if args.home:
        args.home.mkdir(parents=True, exist_ok=True)
    with (nullcontext(str(args.home)) if args.home else tempfile.TemporaryDirectory()) as tmp:
        home = build_home(Path(tmp), args)
        from pipeline.training.checkpoint import load_model

        model, _ = load_model(home, MODEL_ID, device=args.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        features = torch.compile(model.forward_features) if config.compile else model.forward_features
        ds = CacheDataset(home, size=args.size)
        ids = ds.image_ids[:args.n[1]]
        batches = [ds.get_batch(np.arange(s, min(s + args.batch, len(ids))))["image"]
                   for s in range(0, len(ids), args.batch)]
        if args.device.startswith("cuda"):   # the bare forward's best case: page-locked, like mine_shard's
            batches = [b.pin_memory() for b in batches]
        forward_rate(model, batches[:1], config, features)                 # warm-up (and compile)
        mining_rate(home, ids[:args.batch], config, model)
        fwd, mine, rows = [], [], 0
        for _ in range(repeats):                                           # alternate: same load for both
            fwd.append(forward_rate(model, batches, config, features))
            *rates, rows = mining_rate(home, ids, config, model)
            mine.append(rates)
        fast, ref, maps, worst, same_count = postprocess_speedup(
            model, ds, min(len(ids), 64), 4 if q else 16, config, args.frame)
        rss = [peak_rss(home, n, config) for n in args.n]

    threads = torch.get_num_threads()
    print(f"model: {args.arch}+{args.neck} at {args.size}px, frame {args.frame}px, batch {args.batch}, "
          f"device {args.device} ({describe(args.device)}), amp {config.amp}, channels_last {config.channels_last}, "
          f"compile {config.compile}, {threads} threads")
    print(f"reference post-processing is one map at a time on the CPU; the fast one is batched on {args.device}")
    fwd, mine = np.array(fwd), np.array(mine)   # [repeats, (img/s, img per CPU-second)]
    runs = lambda r: ", ".join(f"{v:.1f}" for v in r)  # noqa: E731
    print(f"bare forward: {fwd[:, 0].max():.1f} img/s (runs: {runs(fwd[:, 0])}), "
          f"{fwd[:, 1].max():.1f} img per CPU-second (runs: {runs(fwd[:, 1])})")
    print(f"end-to-end mining (cache -> arrow rows, {rows} rows from {len(ids)} images): {mine[:, 0].max():.1f} img/s "
          f"(runs: {runs(mine[:, 0])}), {mine[:, 1].max():.1f} img per CPU-second (runs: {runs(mine[:, 1])})")
    # Each repeat pairs a forward run and a mining run taken back to back, under about the same load; the
    # median of the pairs' ratios shrugs off a run that another process slowed (or left alone).
    wall_ratio, cpu_ratio = np.median(mine / fwd, axis=0)
    print(f"mine/forward, median of the {repeats} paired runs: by wall clock {wall_ratio:.2f}; by CPU time "
          f"{cpu_ratio:.2f} (the headline on a CPU: other processes distort wall clock more than CPU time)")
    print(f"post-processing per image ({maps:.1f} maps each, T={config.steps}, {len(config.thresholds)} thresholds, "
          f"{args.frame}px frame): fast {fast * 1e3:.2f} ms, reference {ref * 1e3:.1f} ms, speed-up {ref / fast:.0f}x")
    print(f"fast vs reference on the model's CAMs: worst box edge difference {worst:.0f} px, "
          f"same number of boxes: {same_count}")
    small, large = rss
    print(f"peak RSS (fresh process, mine_shard loads the model): {small['peak_rss_mb']:.0f} MB mining "
          f"{small['n']} images, {large['peak_rss_mb']:.0f} MB mining {large['n']} images "
          f"(+{large['peak_rss_mb'] - small['peak_rss_mb']:.1f} MB for {large['n'] / small['n']:.0f}x the images; "
          f"{small['rss_before_mb']:.0f} MB before mining)")
    print(f"mine/forward ratio: {wall_ratio if args.device.startswith('cuda') else cpu_ratio:.2f}")


if __name__ == "__main__":
    main()
