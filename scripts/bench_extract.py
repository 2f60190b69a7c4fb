"""`xfeat extract` against the fastest way this machine runs the same backbone, side by side.

For each model:

(a) the fastest fp32 configuration on pre-decoded, pre-cropped uint8 tensors in memory
    (normalisation + forward, steady state after warm-up, the best of three passes over
    ``--reference-images`` train images): the best of eager NCHW, eager channels_last,
    ``torch.compile`` (inductor, weight freezing) and AOTInductor (export + ahead-of-time
    compilation, weight freezing), both in channels_last with the normalisation inside the
    compiled graph, and glibc's malloc keeping freed memory for reuse (the process setting
    xfeat uses during a pass, ``xfeat.extraction.allocator.freed_memory_kept``; eager and torch.compile
    are also timed with the default malloc, which returns every large tensor to the kernel),
    the forward passes written out here with torch's own API (not xfeat's code path);
(b) ``xfeat extract`` as a user runs it on the whole data set (every split), a fresh
    ``python -m xfeat extract`` process timed from start to exit (interpreter and torch
    start-up, scan and fingerprint, model build, JPEG decode, resize/crop, forward, HDF5
    writes; compile decided by ``--compile auto``): first with nothing compiled yet (a first
    run), then again with its compiled graph kept from the first run (every later run).
The ratio (b)/(a) and the share of the machine's fp32 peak (a large matmul, measured in the
same run) are printed per model, and (b)'s pass alone (from the first batch to the last
write, without the process start-up that (a) does not pay either). ``--stages MODEL`` adds
``--layers stages`` against the penultimate layer alone; ``--int8 MODEL`` adds ``--precision
int8`` with the cosine similarity of its features to fp32.

    python scripts/bench_extract.py --data ../shared/data/chest_xray224

``--n N`` times (b) on a stratified subset of N train images instead of the whole data set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xfeat.backbones import create_backbone
from xfeat.cache import read_cache
from xfeat.data import load_dataset
from xfeat.extraction.allocator import freed_memory_kept

MODELS = ("mobilenet_v2", "resnet18", "resnet50", "shufflenet_v2_x2_0")


def make_subset(src: Path, dst: Path, n: int) -> Path:
    """A stratified subset of src/train as symlinks in dst/train (nothing is copied)."""
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    files = {
        c: sorted(
            p for p in (src / "train" / c).iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png")
        )
        for c in classes
    }
    total = sum(len(f) for f in files.values())
    if n > total:
        raise SystemExit(f"--n {n} is larger than the {total} training images in {src}")
    for c, fs in files.items():
        (dst / "train" / c).mkdir(parents=True, exist_ok=True)
        for p in fs[: round(n * len(fs) / total)]:
            os.symlink(p.resolve(), dst / "train" / c / p.name)
    return dst


def matmul_peak(n: int = 4096, repeats: int = 3) -> float:
    """GFLOP/s of a float32 n x n matmul with the current threads: the fp32 roofline."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def decode_rate(root: Path, model: str, n: int) -> float:
    """Images/s of decoding + resizing + cropping alone, in this one process."""
    from xfeat.extraction.views import ViewImages

    split = load_dataset(root).splits["train"]
    images = ViewImages(split, create_backbone(model, "none").preprocessing)
    n = min(n, len(images))
    t0 = time.perf_counter()
    for i in range(n):
        images[i]
    return n / (time.perf_counter() - t0)


def gflops_per_image(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def in_memory_images(root: Path, model: str, n: int, batch: int) -> tuple:
    """Up to ``n`` decoded train images, at least two batches (the compiled references run
    whole batches of one static shape, the first one for warm-up)."""
    backbone = create_backbone(model, "none")
    split = load_dataset(root).splits["train"]
    if min(n, len(split)) < 2 * batch:
        raise SystemExit(
            f"(a) needs at least {2 * batch} train images in memory (two batches "
            f"of --batch-size {batch}); {root} gives {len(split)} and "
            f"--reference-images is {n}: raise them or lower --batch-size"
        )
    prep = backbone.preprocessing
    x = torch.from_numpy(
        np.stack([prep.resize_and_crop(split.read_image(i)) for i in range(min(n, len(split)))])
    ).permute(0, 3, 1, 2)
    return backbone, x


class NormalizedNet(torch.nn.Module):
    """uint8 images -> normalised -> ``net``: the input conversion inside the compiled graph."""

    def __init__(self, net: torch.nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, x):
        return self.net((x.float() - self.mean) / self.std)


def torch_compiled(net: torch.nn.Module, example: torch.Tensor, folder: Path):
    """``torch.compile`` with inductor's weight freezing, static shapes."""
    from torch._inductor import config

    compiled = torch.compile(net, dynamic=False)

    def run(x):
        with config.patch(freezing=True):
            return compiled(x)

    return run


def aot_compiled(net: torch.nn.Module, example: torch.Tensor, folder: Path):
    """AOTInductor: export, compile ahead of time with weight freezing (gradients off, or
    inductor skips freezing), load the package."""
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        exported = torch.export.export(net, (example,))
        path = torch._inductor.aoti_compile_and_package(
            exported, package_path=str(folder / "reference.pt2"), inductor_configs={"freezing": True}
        )
    return torch._inductor.aoti_load_package(path)


def forward_only(
    backbone,
    x: torch.Tensor,
    batch: int,
    layout: str,
    compiler,
    folder: Path,
    malloc: str = "kept",
    repeats: int = 3,
) -> dict:
    """Steady-state img/s of normalise + forward on in-memory uint8 tensors (the best of
    ``repeats`` passes over ``x``)."""
    cl = layout == "channels_last"
    p = backbone.preprocessing
    net = NormalizedNet(backbone.model, p.mean, p.std).eval()
    if cl:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous()
    t0 = time.perf_counter()
    runner = compiler(net, x[:batch], folder) if compiler else net
    n = len(x) - len(x) % batch  # whole batches: one static shape when compiled
    with torch.inference_mode():
        runner(x[:batch])
        setup = time.perf_counter() - t0
        runner(x[batch : 2 * batch])
        seconds = []
        for _ in range(repeats):  # the best of a few passes: the machine's noise only slows
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                runner(x[i : i + batch])
            seconds.append(time.perf_counter() - t0)
    return {
        "layout": layout,
        "compiled": compiler.__name__ if compiler else None,
        "malloc": malloc,
        "images_per_second": n / min(seconds),
        "setup_seconds": setup,
        "passes_images_per_second": [n / t for t in seconds],
    }


def xfeat_extract(
    root: Path, model: str, cache_dir: Path, inductor: Path, batch: int, *extra: str
) -> dict:
    """``python -m xfeat extract`` in a fresh process, timed from start to exit."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    cmd = [
        sys.executable,
        "-m",
        "xfeat",
        "-q",
        "extract",
        "--data",
        str(root),
        "--model",
        model,
        "--cache-dir",
        str(cache_dir),
        "--batch-size",
        str(batch),
        "--json",
        # random weights unless given: the speed does not depend on them (and the command
        # line's default, pretrained, may need the internet)
        *([] if "--weights" in extra else ["--weights", "none"]),
        *extra,
    ]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    meta = json.loads(out.stdout)
    splits = meta["splits"].values()
    n = sum(s["n"] for s in splits)
    passes = sum(s.get("seconds_total") or 0 for s in splits)
    return {
        "images": n,
        "seconds": seconds,
        "images_per_second": n / seconds,
        "pass_seconds": passes,
        "other_seconds": seconds - passes,
        "data_wait_seconds": sum(s.get("data_wait_seconds", 0) for s in splits),
        "forward_seconds": sum(s.get("forward_seconds", 0) for s in splits),
        "pass_images_per_second": n / passes if passes else None,
        "path": meta["path"],
        "compiled": any(s.get("compiled") for s in splits),
    }


def cold_and_warm(root: Path, model: str, cache: Path, inductor: Path, batch: int, *extra):
    """``xfeat extract`` twice: with nothing compiled yet, then (its features deleted) with
    the compiled graph the first run kept, as every later run finds it."""
    cold = xfeat_extract(root, model, cache, inductor, batch, *extra)
    Path(cold["path"]).unlink()
    return cold, xfeat_extract(root, model, cache, inductor, batch, *extra)


def bench_model(model: str, root: Path, tmp: Path, args, peak: float) -> dict:
    backbone, x = in_memory_images(root, model, args.reference_images, args.batch_size)
    size = backbone.preprocessing.crop_size
    gflops = gflops_per_image(backbone.model, size)
    configs = args.default_malloc.get(model, []) + [
        forward_only(
            create_backbone(model, "none"),
            x,
            args.batch_size,
            layout,
            compiler,
            tmp / f"reference-{model}",
        )
        for layout, compiler in (
            ("contiguous", None),
            ("channels_last", None),
            ("channels_last", torch_compiled),
            ("channels_last", aot_compiled),
        )
    ]
    fastest = max(configs, key=lambda c: c["images_per_second"])
    inductor, cache = tmp / f"inductor-{model}", tmp / f"cache-{model}"
    cold, warm = cold_and_warm(root, model, cache, inductor, args.batch_size)
    row = {
        "model": model,
        "gflops_per_image": gflops,
        "forward_only": configs,
        "fastest": fastest,
        "xfeat_cold": cold,
        "xfeat_warm": warm,
        "ratio_cold": cold["images_per_second"] / fastest["images_per_second"],
        "ratio_warm": warm["images_per_second"] / fastest["images_per_second"],
        "ratio_warm_pass": warm["pass_images_per_second"] / fastest["images_per_second"],
        "peak_fraction_fastest": fastest["images_per_second"] * gflops / peak,
        "peak_fraction_xfeat": warm["images_per_second"] * gflops / peak,
    }
    if model in args.stages:
        _, row["stages"] = cold_and_warm(
            root, model, cache, inductor, args.batch_size, "--layers", "stages"
        )
        row["stages_ratio"] = row["stages"]["images_per_second"] / warm["images_per_second"]
    if model in args.int8:
        row["int8"] = int8_row(root, model, tmp, inductor, args, warm, fastest)
    return row


def default_malloc_configs(model: str, root: Path, tmp: Path, args) -> list:
    """Eager and compiled channels_last with glibc's default malloc."""
    _, x = in_memory_images(root, model, args.reference_images, args.batch_size)
    return [
        forward_only(
            create_backbone(model, "none"),
            x,
            args.batch_size,
            "channels_last",
            compiler,
            tmp / f"reference-default-{model}",
            malloc="default",
        )
        for compiler in (None, torch_compiled)
    ]


def int8_row(root, model, tmp, inductor, args, fp32_run: dict, fastest: dict) -> dict:
    """int8 against fp32: speed with random weights (as every row), feature cosine with the
    real weights (``--weights``) where given."""
    weights = ["--weights", args.weights] if args.weights and model == "mobilenet_v2" else []
    first, int8 = cold_and_warm(
        root, model, tmp / f"cache-{model}-int8", inductor, args.batch_size, "--precision", "int8"
    )
    steady = int8_in_memory(root, model, args)
    if weights:
        fp32_real = xfeat_extract(
            root, model, tmp / f"cache-{model}-real", inductor, args.batch_size, *weights
        )
        int8_real = xfeat_extract(
            root,
            model,
            tmp / f"cache-{model}-real",
            inductor,
            args.batch_size,
            "--precision",
            "int8",
            *weights,
        )
        a, b = (read_cache(r["path"])["train"].features for r in (fp32_real, int8_real))
    else:
        a, b = (read_cache(r["path"])["train"].features for r in (fp32_run, int8))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {
        "first_run": first,
        "run": int8,
        "weights": weights[1] if weights else "none",
        "in_memory_images_per_second": steady,
        "in_memory_speedup_vs_fastest_fp32": steady / fastest["images_per_second"],
        "speedup_vs_fastest_fp32": int8["images_per_second"] / fastest["images_per_second"],
        "speedup_vs_xfeat_fp32": int8["images_per_second"] / fp32_run["images_per_second"],
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
    }


def int8_in_memory(root: Path, model: str, args) -> float:
    """Steady-state img/s of the int8 runner (quantized, compiled) on in-memory tensors."""
    from xfeat.extraction.forward import Runner
    from xfeat.extraction.pipeline import _calibration_images, plan_extraction

    backbone, x = in_memory_images(root, model, args.reference_images, args.batch_size)
    plan = plan_extraction(root, model, cache_dir=Path(tempfile.mkdtemp()))
    runner = Runner(
        backbone,
        plan.blocks,
        torch.device("cpu"),
        batch_size=args.batch_size,
        precision="int8",
        calibration=_calibration_images(plan),
        cache_dir=plan.path.parent,
    )
    n = len(x) - len(x) % args.batch_size
    runner(x[: args.batch_size])
    runner(x[args.batch_size : 2 * args.batch_size])
    t0 = time.perf_counter()
    for i in range(0, n, args.batch_size):
        runner(x[i : i + args.batch_size])
    return n / (time.perf_counter() - t0)


def report(rows: list, peak: float, args) -> str:
    images = rows[0]["xfeat_warm"]["images"]
    what = f"{args.n} train images" if args.n else "the whole data set"
    lines = [
        f"(b): {images} images of {args.data} ({what}); "
        f"(a): {args.reference_images} of its train images in memory, best of 3 passes; batch "
        f"{args.batch_size}, {torch.get_num_threads()} threads; fp32 matmul peak "
        f"{peak:.0f} GFLOP/s",
        "",
        "| model | GFLOP/img | (a) fastest in memory | config | (b) xfeat extract, first run "
        "| (b) later runs | (b)/(a) first | (b)/(a) later | (b) pass alone / (a) "
        "| % of fp32 peak (a) / (b) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["fastest"]
        lines.append(
            f"| {r['model']} | {r['gflops_per_image']:.2f} | "
            f"{f['images_per_second']:.1f} img/s | {config_name(f)} | "
            f"{r['xfeat_cold']['images_per_second']:.1f} img/s | "
            f"{r['xfeat_warm']['images_per_second']:.1f} img/s | "
            f"{r['ratio_cold']:.2f} | {r['ratio_warm']:.2f} | "
            f"{r['ratio_warm_pass']:.2f} | "
            f"{100 * r['peak_fraction_fastest']:.0f}% / "
            f"{100 * r['peak_fraction_xfeat']:.0f}% |"
        )
    lines += [
        "",
        "where the time of (b, later runs) goes: the pass (decode + forward + write, "
        "overlapped) vs everything else (interpreter and torch start-up, scan and "
        "fingerprint, model build, compile):",
    ]
    for r in rows:
        w = r["xfeat_warm"]
        lines.append(
            f"- {r['model']}: {w['seconds']:.1f} s = pass {w['pass_seconds']:.1f} s "
            f"(waiting for images {w['data_wait_seconds']:.1f} s) + other "
            f"{w['other_seconds']:.1f} s"
        )
    lines.append(
        f"- decoding + resizing + cropping alone: {args.decode_rate:.0f} img/s on one "
        "core (the decoding thread shares the cores with the forward pass)"
    )
    lines += ["", "forward only on in-memory tensors, every configuration (img/s):"]
    for r in rows:
        lines.append(
            f"- {r['model']}: "
            + ", ".join(
                f"{config_name(c)} {c['images_per_second']:.1f} (setup {c['setup_seconds']:.1f} s)"
                for c in r["forward_only"]
            )
        )
    lines += ["", "malloc keeping freed memory vs glibc's default (channels_last, in memory):"]
    for r in rows:
        rate = {(c["compiled"], c.get("malloc")): c["images_per_second"] for c in r["forward_only"]}
        lines.append(
            f"- {r['model']}: "
            + ", ".join(
                f"{name} {rate[(key, 'kept')]:.1f} vs {rate[(key, 'default')]:.1f} img/s "
                f"({rate[(key, 'kept')] / rate[(key, 'default')]:.2f}x)"
                for key, name in ((None, "eager"), ("torch_compiled", "torch.compile"))
                if (key, "default") in rate
            )
        )
    for r in rows:
        if "stages" in r:
            lines.append(
                f"- {r['model']} --layers stages: {r['stages']['images_per_second']:.1f}"
                f" img/s vs penultimate {r['xfeat_warm']['images_per_second']:.1f}: "
                f"ratio {r['stages_ratio']:.3f} (target >= 0.95)"
            )
        if "int8" in r:
            q = r["int8"]
            lines.append(
                f"- {r['model']} --precision int8 ({q['weights']} weights): in memory "
                f"{q['in_memory_images_per_second']:.1f} img/s = "
                f"{q['in_memory_speedup_vs_fastest_fp32']:.2f}x the fastest fp32; "
                f"xfeat extract first run {q['first_run']['images_per_second']:.1f} "
                f"img/s (calibration and compilation), later runs "
                f"{q['run']['images_per_second']:.1f} img/s, "
                f"{q['speedup_vs_fastest_fp32']:.2f}x the fastest fp32, "
                f"{q['speedup_vs_xfeat_fp32']:.2f}x xfeat fp32 (later runs); feature "
                f"cosine to fp32 "
                f"mean {q['cosine_mean']:.4f}, min {q['cosine_min']:.4f}"
            )
    return "\n".join(lines)


def config_name(c: dict) -> str:
    return (
        c["layout"]
        + {"torch_compiled": ", torch.compile", "aot_compiled": ", AOTInductor", None: ", eager"}[
            c["compiled"]
        ]
        + (", default malloc" if c.get("malloc") == "default" else "")
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray224"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--n",
        type=int,
        default=0,
        help="time (b) on a stratified subset of N "
        "train images (default: the whole data set; >= 3000 for --compile auto "
        "to compile)",
    )
    parser.add_argument(
        "--reference-images",
        type=int,
        default=640,
        help="train images held in memory for (a), timed three times",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--stages", default="mobilenet_v2", help="models to time with --layers stages too"
    )
    parser.add_argument("--int8", default="mobilenet_v2", help="models to time with int8 too")
    parser.add_argument(
        "--weights",
        default="../shared/weights/mobilenet_v2_imagenet_features.pth",
        help="real weights for mobilenet_v2's int8 fidelity ('' for random)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.stages = [m for m in args.stages.split(",") if m]
    args.int8 = [m for m in args.int8.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_subset(args.data, tmp / "images", args.n) if args.n else args.data
        # glibc's default malloc first, to show what keeping freed memory is worth; every
        # other figure keeps it, as xfeat does during a pass
        args.default_malloc = {
            m: default_malloc_configs(m, root, tmp, args) for m in args.models.split(",")
        }
        with freed_memory_kept() as kept:
            if not kept:
                raise SystemExit(
                    "malloc cannot keep freed memory here (not glibc, or "
                    "XFEAT_MALLOC / LD_PRELOAD / GLIBC_TUNABLES set): the "
                    "reference's configurations would be mislabelled"
                )
            args.decode_rate = decode_rate(root, args.models.split(",")[0], args.reference_images)
            peak = matmul_peak()
            rows = [bench_model(m, root, tmp, args, peak) for m in args.models.split(",")]
            peak_after = matmul_peak()
    text = report(rows, max(peak, peak_after), args)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "peak_gflops": [peak, peak_after],
                    "n": args.n,
                    "batch_size": args.batch_size,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
