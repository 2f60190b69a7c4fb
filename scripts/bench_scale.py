"""Sharded extraction: images/s with 1 process vs N processes under torchrun, same images.

Both runs go through the CLI in fresh processes (start-up counted alike), into fresh caches.
Reported per run: wall seconds of the whole command, and the extraction's own images/s from
the cache (for N processes: the slowest shard's seconds, the shards run in parallel); for N
processes also the merge time rank 0 logs. On a 2-core CPU expect little gain: both
processes share the same cores that one process already keeps busy.

    python scripts/bench_scale.py --data ../shared/data/chest_xray224 --n 400 --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_extract import make_subset  # scripts/ is on sys.path when run as a script

import xfeat


def run(cmd: list, env: dict) -> tuple:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0, proc.stderr


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray224"))
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_subset(args.data, tmp / "data", args.n)
        common = [
            "extract",
            "--data",
            str(root),
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--num-workers",
            "0",
        ]
        results = {}
        for nproc in (1, args.nproc):
            cache_dir = tmp / f"cache{nproc}"
            launcher = (
                [sys.executable, "-m", "xfeat"]
                if nproc == 1
                else [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={nproc}",
                    "-m",
                    "xfeat",
                ]
            )
            wall, log = run(launcher + common + ["--cache-dir", str(cache_dir)], env)
            path = next(cache_dir.glob("*.h5"))
            meta = xfeat.read_meta(path)
            n = sum(s["n"] for s in meta.splits.values())
            seconds = sum(s["seconds_total"] for s in meta.splits.values())
            merge = re.search(r"merged \d+ shards into .* in ([0-9.]+) s", log)
            results[nproc] = {
                "wall_seconds": wall,
                "extract_seconds": seconds,
                "images": n,
                "images_per_second": n / seconds,
                "merge_seconds": float(merge.group(1)) if merge else None,
            }
    one, many = results[1], results[args.nproc]
    summary = {
        "model": args.model,
        "images": one["images"],
        "runs": results,
        "speedup_images_per_second": many["images_per_second"] / one["images_per_second"],
        "speedup_wall": one["wall_seconds"] / many["wall_seconds"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"{args.model}, {one['images']} images of {args.data}, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs"
    )
    for nproc, r in results.items():
        merge = f", merge {r['merge_seconds']:.2f} s" if r["merge_seconds"] is not None else ""
        print(
            f"{nproc} process(es): {r['images_per_second']:6.1f} img/s extracting "
            f"({r['extract_seconds']:.1f} s{merge}); whole command {r['wall_seconds']:.1f} s"
        )
    print(
        f"speed-up with {args.nproc} processes: {summary['speedup_images_per_second']:.2f}x "
        f"img/s, {summary['speedup_wall']:.2f}x wall"
    )


if __name__ == "__main__":
    main()
