"""`xfeat extract` against the fastest way this machine runs the same backbone, side by side.

For each model, on the same N real images:

(a) the fastest fp32 configuration on pre-decoded, pre-cropped uint8 tensors in memory
    (normalisation + forward, steady state after warm-up): the best of eager NCHW, eager
    channels_last and torch.compile (inductor, weight freezing) in channels_last;
(b) ``xfeat extract`` as a user runs it, a fresh ``python -m xfeat extract`` process timed from
    start to exit (scan and fingerprint, model build, JPEG decode, resize/crop, forward, HDF5
    writes; compile decided by ``--compile auto``): first with an empty compile cache (a first
    run) and again with a warm one (every later run).
The ratio (b)/(a) and the share of the machine's fp32 peak (a large matmul, measured in the
same run) are printed per model. ``--stages MODEL`` adds ``--layers stages`` against the
penultimate layer alone; ``--int8 MODEL`` adds ``--precision int8`` with the cosine similarity
of its features to fp32.

    python scripts/bench_extract.py --data ../shared/data/chest_xray224 --n 3000
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
from xfeat.runtime import compile_for_inference

MODELS = ("mobilenet_v2", "resnet18", "resnet50", "shufflenet_v2_x2_0")


def make_subset(src: Path, dst: Path, n: int) -> Path:
    """A stratified subset of src/train as symlinks in dst/train (nothing is copied)."""
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    files = {c: sorted(p for p in (src / "train" / c).iterdir() if p.suffix.lower() in
                       (".jpeg", ".jpg", ".png")) for c in classes}
    total = sum(len(f) for f in files.values())
    if n > total:
        raise SystemExit(f"--n {n} is larger than the {total} training images in {src}")
    for c, fs in files.items():
        (dst / "train" / c).mkdir(parents=True, exist_ok=True)
        for p in fs[:round(n * len(fs) / total)]:
            os.symlink(p.resolve(), dst / "train" / c / p.name)
    return dst


def matmul_peak(n: int = 4096, repeats: int = 3) -> float:
    """GFLOP/s of a float32 n x n matmul with the current threads: the fp32 roofline."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def decode_rate(root: Path, model: str) -> float:
    """Images/s of decoding + resizing + cropping alone, in this one process."""
    from xfeat.views import ViewImages

    split = load_dataset(root).splits["train"]
    images = ViewImages(split, create_backbone(model, "none").preprocessing)
    t0 = time.perf_counter()
    for i in range(len(images)):
        images[i]
    return len(images) / (time.perf_counter() - t0)


def gflops_per_image(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def in_memory_images(root: Path, model: str) -> tuple:
    backbone = create_backbone(model, "none")
    split = load_dataset(root).splits["train"]
    prep = backbone.preprocessing
    x = torch.from_numpy(np.stack([prep.resize_and_crop(split.read_image(i))
                                   for i in range(len(split))])).permute(0, 3, 1, 2)
    return backbone, x


def forward_only(backbone, x: torch.Tensor, batch: int, layout: str, compiled: bool,
                 cache_dir: Path) -> dict:
    """Steady-state img/s of normalise + forward on in-memory tensors."""
    net = backbone.model
    cl = layout == "channels_last"
    if cl:
        net = net.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    runner = compile_for_inference(net, cache_dir) if compiled else net

    def prep(chunk):
        z = backbone.preprocessing.normalize(chunk)
        return z.contiguous(memory_format=torch.channels_last) if cl else z

    n = len(x) - len(x) % batch  # whole batches: one static shape when compiled
    with torch.inference_mode():
        runner(prep(x[:batch]))
        setup = time.perf_counter() - t0
        runner(prep(x[batch:2 * batch]))
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            runner(prep(x[i:i + batch]))
        seconds = time.perf_counter() - t0
    return {"layout": layout, "compiled": compiled, "images_per_second": n / seconds,
            "setup_seconds": setup}


def xfeat_extract(root: Path, model: str, cache_dir: Path, inductor: Path, batch: int,
                  *extra: str) -> dict:
    """``python -m xfeat extract`` in a fresh process, timed from start to exit."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    cmd = [sys.executable, "-m", "xfeat", "-q", "extract", "--data", str(root), "--model",
           model, "--cache-dir", str(cache_dir), "--batch-size", str(batch), "--json", *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    meta = json.loads(out.stdout)
    splits = meta["splits"].values()
    n = sum(s["n"] for s in splits)
    passes = sum(s.get("seconds_total") or 0 for s in splits)
    return {"images": n, "seconds": seconds, "images_per_second": n / seconds,
            "pass_seconds": passes, "other_seconds": seconds - passes,
            "data_wait_seconds": sum(s.get("data_wait_seconds", 0) for s in splits),
            "forward_seconds": sum(s.get("forward_seconds", 0) for s in splits),
            "path": meta["path"], "compiled": any(s.get("compiled") for s in splits)}


def bench_model(model: str, root: Path, tmp: Path, args, peak: float) -> dict:
    backbone, x = in_memory_images(root, model)
    size = backbone.preprocessing.crop_size
    gflops = gflops_per_image(backbone.model, size)
    inductor = tmp / f"inductor-{model}"
    configs = [forward_only(backbone, x, args.batch_size, "contiguous", False, inductor),
               forward_only(backbone, x, args.batch_size, "channels_last", False, inductor),
               forward_only(create_backbone(model, "none"), x, args.batch_size,
                            "channels_last", True, tmp / "inductor-reference")]
    fastest = max(configs, key=lambda c: c["images_per_second"])
    cold = xfeat_extract(root, model, tmp / f"cache-{model}-cold", inductor, args.batch_size)
    warm = xfeat_extract(root, model, tmp / f"cache-{model}-warm", inductor, args.batch_size)
    row = {"model": model, "gflops_per_image": gflops, "forward_only": configs,
           "fastest": fastest, "xfeat_cold": cold, "xfeat_warm": warm,
           "ratio_cold": cold["images_per_second"] / fastest["images_per_second"],
           "ratio_warm": warm["images_per_second"] / fastest["images_per_second"],
           "peak_fraction_fastest": fastest["images_per_second"] * gflops / peak,
           "peak_fraction_xfeat": warm["images_per_second"] * gflops / peak}
    if model in args.stages:
        stages = xfeat_extract(root, model, tmp / f"cache-{model}-stages", inductor,
                               args.batch_size, "--layers", "stages")
        row["stages"] = stages
        row["stages_ratio"] = stages["images_per_second"] / warm["images_per_second"]
    if model in args.int8:
        row["int8"] = int8_row(root, model, tmp, inductor, args, warm, fastest)
    return row


def int8_row(root, model, tmp, inductor, args, fp32_run: dict, fastest: dict) -> dict:
    weights = ["--weights", args.weights] if args.weights and model == "mobilenet_v2" else []
    fp32 = xfeat_extract(root, model, tmp / f"cache-{model}-fp32w", inductor, args.batch_size,
                         *weights) if weights else fp32_run
    int8 = xfeat_extract(root, model, tmp / f"cache-{model}-int8", inductor, args.batch_size,
                         "--precision", "int8", *weights)
    steady = int8_in_memory(root, model, args)
    a, b = read_cache(fp32["path"])["train"].features, read_cache(int8["path"])["train"].features
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"run": int8, "weights": weights[1] if weights else "none",
            "in_memory_images_per_second": steady,
            "in_memory_speedup_vs_fastest_fp32": steady / fastest["images_per_second"],
            "speedup_vs_fastest_fp32": int8["images_per_second"] / fastest["images_per_second"],
            "speedup_vs_xfeat_fp32": int8["images_per_second"] / fp32["images_per_second"],
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def int8_in_memory(root: Path, model: str, args) -> float:
    """Steady-state img/s of the int8 runner (quantized, compiled) on in-memory tensors."""
    from xfeat.extract import plan_extraction, _calibration_images
    from xfeat.forward import Runner

    backbone, x = in_memory_images(root, model)
    plan = plan_extraction(root, model, cache_dir=Path(tempfile.mkdtemp()))
    runner = Runner(backbone, plan.blocks, torch.device("cpu"), batch_size=args.batch_size,
                    precision="int8", calibration=_calibration_images(plan),
                    cache_dir=plan.path.parent)
    n = len(x) - len(x) % args.batch_size
    runner(x[:args.batch_size])
    runner(x[args.batch_size:2 * args.batch_size])
    t0 = time.perf_counter()
    for i in range(0, n, args.batch_size):
        runner(x[i:i + args.batch_size])
    return n / (time.perf_counter() - t0)


def report(rows: list, peak: float, args) -> str:
    lines = [f"{args.n} images of {args.data}, batch {args.batch_size}, "
             f"{torch.get_num_threads()} threads; fp32 matmul peak {peak:.0f} GFLOP/s", "",
             "| model | GFLOP/img | (a) fastest in memory | config | (b) xfeat extract, first run "
             "| (b) later runs | (b)/(a) first | (b)/(a) later | % of fp32 peak (a) / (b) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["fastest"]
        config = f"{f['layout']}{', compiled' if f['compiled'] else ''}"
        lines.append(f"| {r['model']} | {r['gflops_per_image']:.2f} | "
                     f"{f['images_per_second']:.1f} img/s | {config} | "
                     f"{r['xfeat_cold']['images_per_second']:.1f} img/s | "
                     f"{r['xfeat_warm']['images_per_second']:.1f} img/s | "
                     f"{r['ratio_cold']:.2f} | {r['ratio_warm']:.2f} | "
                     f"{100 * r['peak_fraction_fastest']:.0f}% / "
                     f"{100 * r['peak_fraction_xfeat']:.0f}% |")
    lines += ["", "where the time of (b, later runs) goes: the pass (decode + forward + write, "
              "overlapped) vs everything else (interpreter and torch start-up, scan and "
              "fingerprint, model build, compile):"]
    for r in rows:
        w = r["xfeat_warm"]
        lines.append(f"- {r['model']}: {w['seconds']:.1f} s = pass {w['pass_seconds']:.1f} s "
                     f"(waiting for images {w['data_wait_seconds']:.1f} s) + other "
                     f"{w['other_seconds']:.1f} s")
    lines.append(f"- decoding + resizing + cropping alone: {args.decode_rate:.0f} img/s on one "
                 "core (the loader worker shares the 2 cores with the forward pass)")
    lines += ["", "forward only on in-memory tensors, every configuration (img/s):"]
    for r in rows:
        lines.append(f"- {r['model']}: " + ", ".join(
            f"{c['layout']}{' compiled' if c['compiled'] else ''} {c['images_per_second']:.1f}"
            f" (setup {c['setup_seconds']:.1f} s)" for c in r["forward_only"]))
    for r in rows:
        if "stages" in r:
            lines.append(f"- {r['model']} --layers stages: {r['stages']['images_per_second']:.1f}"
                         f" img/s vs penultimate {r['xfeat_warm']['images_per_second']:.1f}: "
                         f"ratio {r['stages_ratio']:.3f} (target >= 0.95)")
        if "int8" in r:
            q = r["int8"]
            lines.append(f"- {r['model']} --precision int8 ({q['weights']} weights): in memory "
                         f"{q['in_memory_images_per_second']:.1f} img/s = "
                         f"{q['in_memory_speedup_vs_fastest_fp32']:.2f}x the fastest fp32; "
                         f"xfeat extract {q['run']['images_per_second']:.1f} img/s, "
                         f"{q['speedup_vs_fastest_fp32']:.2f}x the fastest fp32, "
                         f"{q['speedup_vs_xfeat_fp32']:.2f}x xfeat fp32; feature cosine to fp32 "
                         f"mean {q['cosine_mean']:.4f}, min {q['cosine_min']:.4f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray224"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--n", type=int, default=3000, help="images (>= 3000: --compile auto "
                                                            "compiles, as on the full data)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--stages", default="mobilenet_v2", help="models to time with "
                                                                  "--layers stages too")
    parser.add_argument("--int8", default="mobilenet_v2", help="models to time with int8 too")
    parser.add_argument("--weights", default="../shared/weights/mobilenet_v2_imagenet_features.pth",
                        help="real weights for mobilenet_v2's int8 fidelity ('' for random)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.stages = [m for m in args.stages.split(",") if m]
    args.int8 = [m for m in args.int8.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_subset(args.data, tmp / "images", args.n)
        args.decode_rate = decode_rate(root, args.models.split(",")[0])
        peak = matmul_peak()
        rows = [bench_model(m, root, tmp, args, peak) for m in args.models.split(",")]
        peak_after = matmul_peak()
    text = report(rows, max(peak, peak_after), args)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "peak_gflops": [peak, peak_after],
                                         "n": args.n, "batch_size": args.batch_size}, indent=2,
                                        default=str))


if __name__ == "__main__":
    main()
