"""Input-pipeline throughput on synthetic 1080p crowded scenes, 0 vs N grain worker processes.

    python benchmarks/data_bench.py                       # 0 and 2 workers, 48 images each
    python benchmarks/data_bench.py --workers=0,2,4 --images=96 --difficulty=hard

Each setting builds the full pipeline (scene rendering, Qwen-VL preprocessing at the
Qwen2.5-VL default max_pixels, tokenisation, bucketed batching) and times the batches
after the first one (the first includes worker start-up, reported separately). The
ratio to the first setting is measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dipr1_jax.data.pipeline import PipelineConfig, make_dataset  # noqa: E402
from dipr1_jax.data.synthetic import SceneConfig, SyntheticCrowds  # noqa: E402
from dipr1_jax.tokenizer import load_tokenizer  # noqa: E402


def run(workers: int, args, tokenizer) -> dict:
    source = SyntheticCrowds(args.images + args.batch_size,
                             SceneConfig(width=args.width, height=args.height,
                                         difficulty=args.difficulty), seed=args.seed)
    cfg = PipelineConfig(batch_size=args.batch_size, worker_count=workers, num_epochs=1,
                         shuffle=False, shard_index=0, shard_count=1, drop_remainder=True,
                         worker_buffer_size=2)
    t0 = time.perf_counter()
    it = iter(make_dataset(source, cfg, tokenizer))
    first = next(it)
    t1 = time.perf_counter()
    n, patches, boxes = 0, 0, 0
    for batch in it:
        n += int(batch["valid"].sum())
        patches += int(batch["image_grid_thw"].prod(-1).sum())
        boxes += int(batch["num_gt"].sum())
    t2 = time.perf_counter()
    del it
    return {"workers": workers, "startup_s": t1 - t0, "images": n, "steady_s": t2 - t1,
            "ips": n / (t2 - t1), "patches_per_image": patches / max(n, 1),
            "gt_per_image": boxes / max(n, 1), "batch_shape": first["pixel_values"].shape}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    p.add_argument("--images", type=int, default=48, help="timed images per setting")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--difficulty", default="hard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tokenizer = load_tokenizer()
    print(f"synthetic {args.width}x{args.height} '{args.difficulty}' scenes, batch {args.batch_size}, "
          f"{args.images} timed images per setting, {os.cpu_count()} CPUs visible")
    results = [run(int(w), args, tokenizer) for w in args.workers.split(",")]
    base = results[0]["ips"]
    for r in results:
        print(f"workers={r['workers']}: {r['ips']:.2f} images/s over {r['images']} images "
              f"({r['steady_s']:.1f} s; start-up + first batch {r['startup_s']:.1f} s; "
              f"{r['patches_per_image']:.0f} patches and {r['gt_per_image']:.1f} GT boxes per "
              f"image; pixel_values {r['batch_shape']}) ratio vs workers={results[0]['workers']}: "
              f"{r['ips'] / base:.2f}x")


if __name__ == "__main__":
    main()
