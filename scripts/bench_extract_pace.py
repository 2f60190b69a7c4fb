"""Extraction at the CPU's pace: ``xfeat extract``'s pass against a channels_last eager forward
on the same images already decoded in memory, side by side in one run.

    python scripts/bench_extract_pace.py [--data ../shared/data/chest_xray224] [--n 1400]

A stratified subset of ``--n`` shared images (train and test, as symbolic links) is extracted
with MobileNetV2 (random weights: the speed does not depend on them) into a fresh cache, and
the pass's seconds per split are read from the cache as ``xfeat info`` reports them. The
reference decodes the same images once into uint8 tensors (xfeat's own preprocessing, so the
pixels are identical), then times ``model((x - mean) / std)`` eager, channels_last, batch 64,
under the same allocator setting (glibc keeping freed memory during the pass), after a warm-up
pass. Each of ``--rounds`` rounds times a fresh extraction and, right after it, one reference
pass, so that the machine's drift (large on a shared virtual machine) hits both alike. The
ratio is the reference's seconds over the pass's seconds: 1.0 would mean decoding costs
nothing at all; the JPEG decode + resize share of the CPU bounds it below 1.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_extract import xfeat_extract

SHARED = Path(__file__).resolve().parents[2] / "shared"


def subset(data: Path, n: int, out: Path) -> Path:
    """``n`` images: the first of every k-th file per class of train and test, as links."""
    files = {
        (s, c): sorted((data / s / c).glob("*.jpeg"))
        for s in ("train", "test")
        for c in ("NORMAL", "PNEUMONIA")
    }
    total = sum(len(v) for v in files.values())
    for (split, cls), paths in files.items():
        take = max(1, round(n * len(paths) / total))
        step = max(1, len(paths) // take)
        (out / split / cls).mkdir(parents=True, exist_ok=True)
        for p in paths[::step][:take]:
            os.symlink(p, out / split / cls / p.name)
    return out


class Reference:
    """The same images decoded once into memory, and a channels_last eager forward over them."""

    def __init__(self, root: Path, model: str, batch: int):
        import torch

        from xfeat.backbones import create_backbone
        from xfeat.data import load_dataset
        from xfeat.extraction.views import ViewImages

        backbone = create_backbone(model, "none")
        p = backbone.preprocessing
        dataset = load_dataset(root)
        crops = [
            ViewImages(split, p)[i][0] for split in dataset.splits.values() for i in range(len(split))
        ]
        self.images = torch.stack(crops).contiguous(memory_format=torch.channels_last)
        self.mean = torch.tensor(p.mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(p.std).view(1, 3, 1, 1) * 255
        self.net = backbone.model.eval().to(memory_format=torch.channels_last)
        self.batch = batch
        self.seconds()  # a warm-up pass

    def seconds(self) -> float:
        import torch

        from xfeat.extraction.allocator import freed_memory_kept

        with torch.inference_mode(), freed_memory_kept():
            t0 = time.perf_counter()
            for i in range(0, len(self.images), self.batch):
                self.net((self.images[i : i + self.batch].float() - self.mean) / self.std)
            return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "chest_xray224")
    ap.add_argument("--n", type=int, default=1400)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of (fresh extraction, reference pass)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="xfeat-pace-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # no copies left behind
    root = subset(args.data, args.n, work / "data")
    reference = Reference(root, args.model, args.batch_size)
    rounds = []
    for r in range(args.rounds):
        # the same fresh `python -m xfeat extract` process bench_extract.py times (eager here),
        # then the reference right after it: the machine's drift hits both alike
        run = xfeat_extract(
            root, args.model, work / f"cache{r}", work / "inductor", args.batch_size, "--compile", "off"
        )
        shutil.rmtree(work / f"cache{r}", ignore_errors=True)
        run["reference_seconds"] = reference.seconds()
        run["ratio"] = run["reference_seconds"] / run["pass_seconds"]
        rounds.append(run)
        print(
            f"round {r + 1}: extract pass {run['pass_seconds']:.2f} s (waiting for data "
            f"{run['data_wait_seconds']:.2f} s), reference {run['reference_seconds']:.2f} s, "
            f"ratio {run['ratio']:.3f}",
            flush=True,
        )
    n = rounds[0]["images"]
    best_pass = min(r["pass_seconds"] for r in rounds)
    best_ref = min(r["reference_seconds"] for r in rounds)
    median_ratio = statistics.median(r["ratio"] for r in rounds)
    figures = {
        "images": n,
        "rounds": [
            {k: r[k] for k in ("pass_seconds", "reference_seconds", "ratio", "data_wait_seconds")}
            for r in rounds
        ],
        "extract_images_per_second": n / best_pass,
        "reference_images_per_second": n / best_ref,
        "ratio_of_bests": best_ref / best_pass,
        "median_round_ratio": median_ratio,
    }
    print(
        f"{args.model}, {n} images, batch {args.batch_size}, eager (compile off), {os.cpu_count()} CPUs"
    )
    print(f"xfeat extract pass      {n / best_pass:7.1f} img/s  (best of {args.rounds})")
    print(
        f"in-memory reference     {n / best_ref:7.1f} img/s  (channels_last eager, decoded beforehand)"
    )
    print(
        f"ratio                   {best_ref / best_pass:.3f} best against best, "
        f"{median_ratio:.3f} median of the rounds  (target >= 0.9)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
