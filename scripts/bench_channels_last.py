"""channels_last vs contiguous (NCHW) on this CPU, one model per torchvision family.

xfeat uses channels_last on the CPU for a family only where it is faster here
(``xfeat.extraction.runtime.CHANNELS_LAST_SLOWER_ON_CPU`` lists the others). Eager mode, inference,
glibc's malloc keeping freed memory (as xfeat runs), random weights, the two layouts
alternated and the best of ``--repeats`` taken.

    python scripts/bench_channels_last.py --batch-size 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from xfeat.backbones import create_backbone, min_input_size
from xfeat.extraction.allocator import freed_memory_kept
from xfeat.extraction.runtime import family

FAMILIES = [
    "alexnet",
    "convnext_tiny",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet1_0",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "regnet_y_400mf",
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "shufflenet_v2_x2_0",
    "squeezenet1_1",
    "swin_t",
    "vgg11",
    "vit_b_32",
    "wide_resnet50_2",
]


def images_per_second(model, x, repeats: int) -> float:
    with torch.inference_mode():
        model(x)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    return len(x) / best


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(FAMILIES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with freed_memory_kept():  # as xfeat runs: no page faults for every activation
        for name in args.models.split(","):
            size = max(224, min_input_size(name)) if name != "inception_v3" else 299
            model = create_backbone(name, "none", image_size=size).model
            x = torch.randn(args.batch_size, 3, size, size)
            nchw = images_per_second(model, x, args.repeats)
            cl_model = model.to(memory_format=torch.channels_last)
            cl = images_per_second(
                cl_model, x.contiguous(memory_format=torch.channels_last), args.repeats
            )
            rows.append(
                {
                    "model": name,
                    "family": family(name),
                    "nchw": nchw,
                    "channels_last": cl,
                    "speedup": cl / nchw,
                }
            )
            if not args.json:
                print(
                    f"{name:<20} {family(name):<14} NCHW {nchw:7.1f} img/s  channels_last "
                    f"{cl:7.1f} img/s  x{cl / nchw:.2f}",
                    flush=True,
                )
    if args.json:
        print(
            json.dumps(
                {"threads": torch.get_num_threads(), "batch_size": args.batch_size, "rows": rows},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
