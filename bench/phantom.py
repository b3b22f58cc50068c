"""Phantom generator throughput: images/s per core at 1024x1024 (issue 3 asks for >= 20).

Measures, in one run: the one-off atlas load, the per-(variant, view) base radiograph, and the steady-state
per-image cost of `pipeline.phantom.generate` (findings as projected deltas, noise, window, PNG write) in
CPU seconds of one worker process, so that other load on the machine does not distort it; with more than one
core it also runs all cores and reports the parallel speed-up. Last line: `phantom_images_per_s_per_core: X`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from pipeline.phantom import anatomy, build, findings


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="small run (< 1 min)")
    p.add_argument("--n", type=int, default=None, help="images (default 150 quick, 800 full)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    n = a.n or (150 if a.quick else 800)

    t = time.perf_counter()
    atlas = anatomy.load_atlas()
    findings.lungs(atlas)
    print(f"atlas load (once per process): {time.perf_counter() - t:.1f} s")

    rows, _, _, k = build.plan(n, a.seed)
    job = {"seed": a.seed, "size": a.size, "difficulty": 0.0}
    pairs = sorted({(int(v), w) for v, w in zip(rows["variant"], rows["view"])})
    c = time.process_time()
    for v, w in pairs[:4]:                       # warm the worker's base cache (it holds 4)
        build._base(v, w, job)
    per_base = (time.process_time() - c) / min(len(pairs), 4)
    print(f"base radiograph per (variant, view): {per_base:.2f} CPU s; {len(pairs)} needed for n={n} "
          f"({k} variants)")

    with tempfile.TemporaryDirectory() as tmp:
        c, t = time.process_time(), time.perf_counter()
        build.generate(os.path.join(tmp, "one"), n, a.seed, size=a.size, workers=1, progress=False)
        cpu, wall = time.process_time() - c, time.perf_counter() - t
        print(f"1 worker: {n} images in {wall:.1f} s wall, {cpu:.1f} CPU s "
              f"({n / wall:.1f} img/s wall, {n / cpu:.1f} img/s per CPU second)")
        cores = os.cpu_count() or 1
        if cores > 1 and not a.quick:
            t = time.perf_counter()
            build.generate(os.path.join(tmp, "all"), n, a.seed, size=a.size, workers=cores, progress=False)
            par = time.perf_counter() - t
            print(f"{cores} workers: {n / par:.1f} img/s wall, speed-up {wall / par:.2f}x over 1 worker "
                  f"(load average {os.getloadavg()[0]:.1f} on {cores} cores: other work shares them)")
    print(f"phantom_images_per_s_per_core: {n / cpu:.1f}")


if __name__ == "__main__":
    main()
