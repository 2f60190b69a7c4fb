"""Benchmark `xfeat finetune` epochs against a plain PyTorch-tutorial loop, side by side.

Tutorial loop: ImageFolder + PIL decode + RandomResizedCrop/flip/ToTensor/Normalize every
epoch, then a val pass with Resize/CenterCrop; SGD(lr 1e-3, momentum 0.9), StepLR(7, 0.1).
xfeat: `finetune(mode="full")` and `finetune(mode="frozen")`, same model, batch size, images,
data-loader workers and torch threads. An epoch is the train pass plus the val pass; the
decoded store xfeat builds once is reported separately (a one-off cost).

    python scripts/bench_finetune.py --data ../shared/data/chest_xray224 --model resnet18
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import transforms

import xfeat
from xfeat.backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone
from xfeat.extract import default_num_workers


def make_subset(src: Path, dst: Path, n_train: int, n_val: int) -> Path:
    """train/ and val/ folders of symlinks to src/train (stratified, disjoint)."""
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    files = {c: sorted(p for p in (src / "train" / c).iterdir() if p.suffix == ".jpeg")
             for c in classes}
    total = sum(len(v) for v in files.values())
    for c, fs in files.items():
        k_train, k_val = round(n_train * len(fs) / total), round(n_val * len(fs) / total)
        for split, chosen in (("train", fs[:k_train]), ("val", fs[k_train:k_train + k_val])):
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for p in chosen:
                os.symlink(p.resolve(), dst / split / c / p.name)
    return dst


def tutorial_epochs(root: Path, model: str, epochs: int, batch_size: int, workers: int) -> list:
    """The PyTorch transfer-learning tutorial's loop, timed per epoch (train + val)."""
    prep = create_backbone(model, "none").preprocessing
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    tf = {"train": transforms.Compose([transforms.RandomResizedCrop(prep.crop_size),
                                       transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                       normalize]),
          "val": transforms.Compose([transforms.Resize(prep.resize_size),
                                     transforms.CenterCrop(prep.crop_size),
                                     transforms.ToTensor(), normalize])}
    sets = {s: torchvision.datasets.ImageFolder(root / s, tf[s]) for s in ("train", "val")}
    loaders = {s: torch.utils.data.DataLoader(sets[s], batch_size=batch_size,
                                              shuffle=s == "train", num_workers=workers)
               for s in sets}
    torch.manual_seed(0)
    backbone = create_backbone(model, "none")  # the same architecture and init as xfeat's
    backbone.replace_classifier(nn.Linear(backbone.feature_dim, len(sets["train"].classes)))
    net = backbone.model
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for phase in ("train", "val"):
            net.train(phase == "train")
            for x, y in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    loss = criterion(net(x), y)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - t0)
    return times


def xfeat_epochs(root: Path, model: str, mode: str, epochs: int, batch_size: int, workers: int,
                 tmp: Path) -> dict:
    result = xfeat.finetune(root, model, mode=mode, epochs=epochs, batch_size=batch_size,
                            num_workers=workers, cache_dir=tmp / "cache", out_dir=tmp / mode,
                            n_boot=0, progress=False)
    return {"epoch_seconds": [h["seconds"] for h in result["history"]],
            "store_seconds": result["timing"]["store_seconds"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray224"))
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=default_num_workers())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_subset(args.data, tmp / "data", args.n_train, args.n_val)
        common = (args.model, args.epochs, args.batch_size, args.num_workers)
        tutorial = tutorial_epochs(root, *common)
        full = xfeat_epochs(root, *common[:1], "full", *common[1:], tmp)
        frozen = xfeat_epochs(root, *common[:1], "frozen", *common[1:], tmp)
    med = statistics.median
    result = {"model": args.model, "train_images": args.n_train, "val_images": args.n_val,
              "batch_size": args.batch_size, "num_workers": args.num_workers,
              "threads": torch.get_num_threads(), "device": "cpu",
              "tutorial_epoch_seconds": tutorial, "xfeat_full_epoch_seconds": full["epoch_seconds"],
              "xfeat_frozen_epoch_seconds": frozen["epoch_seconds"],
              "xfeat_store_seconds": full["store_seconds"],
              "speedup_full_vs_tutorial": med(tutorial) / med(full["epoch_seconds"]),
              "speedup_frozen_vs_full": med(full["epoch_seconds"]) / med(frozen["epoch_seconds"])}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}, {args.n_train} train + {args.n_val} val images, batch {args.batch_size}, "
          f"{args.num_workers} loader workers, {result['threads']} torch threads, CPU")
    print(f"tutorial loop epoch (train+val):  median {med(tutorial):6.1f} s  {tutorial}")
    print(f"xfeat finetune --mode full epoch: median {med(full['epoch_seconds']):6.1f} s  "
          f"(+ {full['store_seconds']:.1f} s once to decode the store)")
    print(f"xfeat finetune --mode frozen:     median {med(frozen['epoch_seconds']):6.1f} s")
    print(f"speed-up full vs tutorial: {result['speedup_full_vs_tutorial']:.2f}x   (target >= 1.5x)")
    print(f"speed-up frozen vs full:   {result['speedup_frozen_vs_full']:.2f}x")


if __name__ == "__main__":
    main()
