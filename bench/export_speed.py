"""`harvest export` wall time, as a user runs it: a fresh process per export, on a demo-sized home (2,000 images in
the NIH frame, a mining run with a box on about a third of them, as `make demo` leaves).

Target (issue 22 item 6): a Label Studio or CVAT export of the demo run in under 3 s (it took 11.6-15.5 s when
every export started the home's Prefect server). The home is synthetic unless `--home` and `--run` name a real one
(e.g. a copy of a demo home): one 1024 px PNG hard-linked under every name (an export reads only its header),
metadata ingested, and a mining run's part written through `pipeline.runs.parts.write_part`. No Prefect server
runs unless `--with-server` starts the home's own first (then each export joins it and its flow run is kept).
Last line: `export seconds: X`, the slowest format's median.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.base.vocab import FINDINGS  # noqa: E402

RUN = "mine-all-bench"
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def build_home(tmp: Path, n: int, seed: int = 0) -> Path:
    """A home with `n` ingested 1024x1024 images (one PNG, hard-linked) and mining run RUN over all of them."""
    import pyarrow as pa

    from pipeline.base.home import Home
    from pipeline.ingest.nih import ingest_nih
    from pipeline.runs.parts import write_part
    from pipeline.runs.record import recorded_run
    from warehouse.db import PARQUET_TABLES

    rng = np.random.default_rng(seed)
    src, home = tmp / "nih", Home(tmp / "home").make()
    (src / "images").mkdir(parents=True)
    names = [f"{k + 1:08d}_000.png" for k in range(n)]
    first = src / "images" / names[0]
    Image.fromarray(rng.integers(0, 255, (1024, 1024), dtype=np.uint8)).save(first, compress_level=1)
    for name in names[1:]:
        os.link(first, src / "images" / name)
    labels = {name: [FINDINGS[i] for i in sorted(rng.choice(14, rng.integers(0, 3), replace=False))] for name in names}
    (src / "Data_Entry_2017_v2020.csv").write_text(HEADER + "".join(
        f"{name},{'|'.join(labels[name]) or 'No Finding'},0,{k // 3 + 1},50,F,PA,1024,1024,0.143,0.143\n"
        for k, name in enumerate(names)))
    (src / "test_list.txt").write_text("".join(f"{name}\n" for name in names[: n // 5]))
    with recorded_run(home, "ingest", {"kind": "nih", "root": str(src), "sizes": [256], "metadata_only": True}):
        ingest_nih(home, src, metadata_only=True)
    rows = [(name, finding, rank, *(rng.uniform(0, 600, 2)), *(rng.uniform(50, 400, 2)), float(rng.random()))
            for name in names if labels[name] for finding in labels[name] for rank in (1, 2, 3)]
    cols = list(zip(*rows))
    table = pa.table({"run_id": [RUN] * len(rows), "model_id": ["bench"] * len(rows), "image_id": cols[0],
                      "finding": cols[1], "rank": cols[2], "x": cols[3], "y": cols[4], "w": cols[5], "h": cols[6],
                      "score": cols[7], "prob": [0.9] * len(rows), "threshold": [0.5] * len(rows),
                      "method": ["am"] * len(rows)}, schema=PARQUET_TABLES["mined_boxes"])
    with recorded_run(home, "mine", {"split": "all"}, run_id=RUN):
        write_part(home, RUN, 0, table, names)
    return home.root


def export_seconds(home: Path, run: str, fmt: str, out: Path) -> tuple[float, float]:
    """Wall seconds of one `harvest export` in a fresh process (imports and all), as a user waits for it, and its
    CPU seconds (user + system: what other processes on a shared machine distort less)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    t0, cpu0 = time.perf_counter(), _children_cpu()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), "export", "--run", run,
                           "--format", fmt, "--out", str(out)], capture_output=True, text=True, env=env, cwd=REPO)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if done.returncode:
        raise SystemExit(f"harvest export --format {fmt} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Label Studio and CVAT once each (< 1 min on 2 cores)")
    ap.add_argument("--n", type=int, default=2000, help="images of the synthetic home (default 2000, the demo's)")
    ap.add_argument("--home", type=Path, help="an existing home to export from (with --run), not a synthetic one")
    ap.add_argument("--run", default=None, help="its mining run")
    ap.add_argument("--formats", nargs="+", default=None,
                    help="formats to time (default labelstudio cvat; full run adds coco yolo nih-csv)")
    ap.add_argument("--repeats", type=int, default=None, help="exports per format (default 3, quick 1)")
    ap.add_argument("--with-server", action="store_true",
                    help="start the home's Prefect server first: each export joins it (the flow path)")
    args = ap.parse_args(argv)
    formats = args.formats or (["labelstudio", "cvat"] if args.quick else ["labelstudio", "cvat", "coco", "yolo",
                                                                           "nih-csv"])
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmp = Path(tmp)
        if args.home:
            if not args.run:
                raise SystemExit("--home needs --run, a mining run of that home")
            home, run = args.home.resolve(), args.run
        else:
            t0 = time.perf_counter()
            home, run = build_home(tmp, args.n), RUN
            print(f"synthetic home: {args.n} images, run {run}, built in {time.perf_counter() - t0:.1f} s")
        from contextlib import nullcontext

        from flows._home_server import home_prefect_server
        with home_prefect_server(home) if args.with_server else nullcontext():
            times = {fmt: [export_seconds(home, run, fmt, tmp / "out" / fmt) for _ in range(repeats)]
                     for fmt in formats}
    how = "joined the home server" if args.with_server else "no server"
    print(f"{'format':<12} {'median s':>9} {'CPU s':>6}  wall s of each run ({how}, {os.cpu_count()} cores seen, "
          f"load {os.getloadavg()[0]:.1f})")
    for fmt, ts in times.items():
        print(f"{fmt:<12} {statistics.median(t for t, _ in ts):9.2f} {statistics.median(c for _, c in ts):6.2f}  "
              f"{' '.join(f'{t:.2f}' for t, _ in ts)}")
    print(f"export seconds: {max(statistics.median(t for t, _ in ts) for ts in times.values()):.2f}")


if __name__ == "__main__":
    main()
