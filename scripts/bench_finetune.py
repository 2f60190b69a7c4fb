"""`xfeat finetune` training speed against the fastest training step this machine runs.

On the same real images, batch size and threads:

(a) the fastest fp32 training step on in-memory tensors (normalise, forward, cross-entropy,
    backward, SGD step; steady state after warm-up): the best of eager NCHW, eager
    channels_last and ``torch.compile`` in channels_last;
(b) ``xfeat finetune --mode full`` as a user runs it (decoded store, random-resized-crop +
    flip every epoch from seeded generators, loader workers, val pass not counted): its
    training images per second, by default and with ``--compile``; ``--mode frozen`` for
    reference.
Prints (b)/(a) per configuration.

    python scripts/bench_finetune.py --data ../shared/data/chest_xray224 --model resnet18
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import xfeat
from xfeat.backbones import create_backbone
from xfeat.data import load_dataset
from xfeat.extraction.allocator import freed_memory_kept


def make_subset(src: Path, dst: Path, n_train: int, n_val: int) -> Path:
    """train/ and val/ folders of symlinks to src/train (stratified, disjoint)."""
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    files = {c: sorted(p for p in (src / "train" / c).iterdir() if p.suffix == ".jpeg") for c in classes}
    total = sum(len(v) for v in files.values())
    for c, fs in files.items():
        k_train, k_val = round(n_train * len(fs) / total), round(n_val * len(fs) / total)
        for split, chosen in (("train", fs[:k_train]), ("val", fs[k_train : k_train + k_val])):
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for p in chosen:
                os.symlink(p.resolve(), dst / split / c / p.name)
    return dst


def training_step_speed(
    model: str, x: torch.Tensor, y: torch.Tensor, batch: int, layout: str, compiled: bool, steps: int
) -> dict:
    """Steady-state img/s of full training steps on in-memory tensors."""
    backbone = create_backbone(model, "none")
    backbone.replace_classifier(backbone.new_classifier(2))
    net = backbone.model.train()
    cl = layout == "channels_last"
    if cl:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    step_fn = net
    t0 = time.perf_counter()
    if compiled:
        step_fn = torch.compile(net)

    def step(i):
        xb = backbone.preprocessing.normalize(x[i : i + batch])
        xb = xb.contiguous(memory_format=torch.channels_last) if cl else xb
        loss = nn.functional.cross_entropy(step_fn(xb), y[i : i + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(0)
    setup = time.perf_counter() - t0
    step(batch)
    starts = [(k * batch) % (len(x) - batch + 1) for k in range(steps)]
    t0 = time.perf_counter()
    for i in starts:
        step(i)
    seconds = time.perf_counter() - t0
    return {
        "layout": layout,
        "compiled": compiled,
        "images_per_second": steps * batch / seconds,
        "setup_seconds": setup,
    }


def xfeat_epochs(
    root: Path, model: str, mode: str, epochs: int, batch: int, tmp: Path, compile: bool
) -> dict:
    out = tmp / f"run-{mode}-{int(compile)}"
    t0 = time.perf_counter()
    result = xfeat.finetune(
        root,
        model,
        mode=mode,
        epochs=epochs,
        batch_size=batch,
        compile=compile,
        cache_dir=tmp / "cache",
        out_dir=out,
        n_boot=0,
        progress=False,
    )
    history = result["history"]
    return {
        "mode": mode,
        "compile": compile,
        "wall_seconds": time.perf_counter() - t0,
        "images_per_second_per_epoch": [h["images_per_second"] for h in history],
        "images_per_second": max(h["images_per_second"] for h in history),
        "store_seconds": result["timing"]["store_seconds"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray224"))
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="timed steps of (a)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_subset(args.data, tmp / "data", args.n_train, args.n_val)
        prep = create_backbone(args.model, "none").preprocessing
        split = load_dataset(root).splits["train"]
        x = torch.from_numpy(
            np.stack([prep.resize_and_crop(split.read_image(i)) for i in range(len(split))])
        ).permute(0, 3, 1, 2)
        y = torch.from_numpy(split.labels)
        with freed_memory_kept():  # as xfeat finetune runs: no page faults per activation
            reference = [
                training_step_speed(args.model, x, y, args.batch_size, layout, compiled, args.steps)
                for layout, compiled in (
                    ("contiguous", False),
                    ("channels_last", False),
                    ("channels_last", True),
                )
            ]
        fastest = max(reference, key=lambda r: r["images_per_second"])
        runs = [
            xfeat_epochs(root, args.model, "full", args.epochs, args.batch_size, tmp, False),
            xfeat_epochs(root, args.model, "full", args.epochs, args.batch_size, tmp, True),
            xfeat_epochs(root, args.model, "frozen", args.epochs, args.batch_size, tmp, False),
        ]
    result = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "reference": reference,
        "fastest": fastest,
        "xfeat": runs,
        "ratios": [r["images_per_second"] / fastest["images_per_second"] for r in runs],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.model}, {len(split)} train images, batch {args.batch_size}, {result['threads']} threads"
    )
    for r in reference:
        print(
            f"(a) training step in memory, {r['layout']}{' compiled' if r['compiled'] else ''}: "
            f"{r['images_per_second']:.1f} img/s (setup {r['setup_seconds']:.1f} s)"
        )
    for r, ratio in zip(runs, result["ratios"]):
        print(
            f"(b) xfeat finetune --mode {r['mode']}{' --compile' if r['compile'] else ''}: "
            f"best epoch {r['images_per_second']:.1f} img/s (epochs: "
            f"{', '.join(f'{v:.1f}' for v in r['images_per_second_per_epoch'])}; store "
            f"{r['store_seconds']:.1f} s once) -> {ratio:.2f}x the fastest step "
            f"({fastest['layout']}{' compiled' if fastest['compiled'] else ''})"
        )


if __name__ == "__main__":
    main()
