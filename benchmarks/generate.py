#!/usr/bin/env python3
"""Synthetic data generation speed: frames per second with 1 and with 2 worker processes.

Renders the same dataset (default: 8 sequences x 30 frames at 320x256, no bag)
once per worker count, timing the whole ``generate_dataset`` call (worker
start-up included, as a user would see it) and, separately, the steady rate
from the first to the last rendered frame. Sequences are identical in both
runs (same seed), so the comparison is like for like. Prints a table, then
one JSON object on the last line.

Usage: python benchmarks/generate.py [--sequences 8] [--frames 30] [--width 320 --height 256] [--bag]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pose_estimator.sim import GeneratorConfig, generate_dataset  # noqa: E402
from pose_estimator.sim import generate as gen  # noqa: E402


def run(cfg: GeneratorConfig, workers: int, root: str) -> dict:
    out = os.path.join(root, f"w{workers}")
    shutil.rmtree(out, ignore_errors=True)
    ticks: list[float] = []
    real_bar = None

    class Clock:  # stands in for tqdm: records when each frame finished
        def __init__(self, *a, **k):
            pass

        def update(self, n=1):
            ticks.extend([time.perf_counter()] * n)

        def close(self):
            pass

    import tqdm

    real_bar, tqdm.tqdm = tqdm.tqdm, Clock
    try:
        t0 = time.perf_counter()
        generate_dataset(cfg, out, workers=workers, progress=True)
        wall = time.perf_counter() - t0
    finally:
        tqdm.tqdm = real_bar
        gen._close_scene()
    n = cfg.sequences * cfg.frames_per_sequence
    # Steady rate: frames after the first one each worker delivers, over the time they took.
    steady = (len(ticks) - workers) / (ticks[-1] - ticks[workers - 1]) if len(ticks) > workers + 1 else float("nan")
    return {"workers": workers, "frames": n, "seconds": wall, "fps": n / wall, "fps_steady": steady}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--bag", action="store_true", help="also write the rosbag2 recordings")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = GeneratorConfig(sequences=args.sequences, frames_per_sequence=args.frames, width=args.width,
                          height=args.height, bag=args.bag, seed=args.seed)
    cores = gen.default_workers()
    root = tempfile.mkdtemp(prefix="pose_estimator_bench_")
    try:
        # Warm the file cache and imports so the first timed run is not penalised.
        generate_dataset(GeneratorConfig(sequences=1, frames_per_sequence=1, width=args.width, height=args.height),
                         os.path.join(root, "warm"), workers=1, progress=False)
        results = [run(cfg, w, root) for w in (1, 2)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"generate: {cfg.sequences} sequences x {cfg.frames_per_sequence} frames at {cfg.width}x{cfg.height}, "
          f"bag={'on' if cfg.bag else 'off'}, {cores} core(s) available, load average {os.getloadavg()[0]:.2f}")
    print(f"{'workers':>8} {'seconds':>8} {'fps (wall)':>11} {'fps (steady)':>13}")
    for r in results:
        print(f"{r['workers']:>8} {r['seconds']:>8.2f} {r['fps']:>11.1f} {r['fps_steady']:>13.1f}")
    one, two = results
    print(json.dumps({"benchmark": "generate", "width": cfg.width, "height": cfg.height,
                      "frames": one["frames"], "bag": cfg.bag, "cores": cores,
                      "fps_1_worker": round(one["fps"], 2), "fps_2_workers": round(two["fps"], 2),
                      "fps_steady_1_worker": round(one["fps_steady"], 2),
                      "fps_steady_2_workers": round(two["fps_steady"], 2),
                      "speedup": round(two["fps"] / one["fps"], 2), "target_fps_2_workers": 40}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
