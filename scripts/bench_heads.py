"""Benchmark the heads on a chest-X-ray-sized feature problem.

    python scripts/bench_heads.py [--features FILE.npz] [--repeats 5] [--json]

Times ``LogisticHead().fit`` (full C sweep + refit) ``--repeats`` times, measures its peak
memory in a fresh subprocess, and times ``LinearHead`` (25 epochs) and ``KNNHead`` once.
Without ``--features`` the problem is synthetic (5,216 x 2,048 float32 train + 580 val,
ReLU-like features with a low-rank class signal, 26% / 74% classes); with it, the npz must
hold ``X_train, y_train, X_val, y_val``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xfeat.heads import KNNHead, LinearHead, LogisticHead

MEMORY_NOTE = (
    "peak memory = (peak RSS during fit) - (RSS just before fit), in a fresh subprocess that has "
    "already loaded the features and run one small warm-up fit (imports, BLAS buffers); the peak is "
    "reset before the fit via /proc/self/clear_refs, or, where that is refused, taken from ru_maxrss "
    "(then a lower bound if loading peaked higher). Ratio = growth / X_train.nbytes."
)


def make_synthetic(n_train=5216, n_val=580, dim=2048, rank=64, signal=0.6,
                   seed=0) -> dict[str, np.ndarray]:
    """ReLU-like non-negative features: low-rank factors + a class direction + noise."""
    rng = np.random.default_rng(seed)
    loadings = (rng.standard_normal((rank, dim)) / np.sqrt(rank)).astype(np.float32)
    direction = rng.standard_normal(dim).astype(np.float32)
    direction *= signal / np.linalg.norm(direction) * np.sqrt(dim) / 8
    bias = rng.uniform(-0.5, 0.2, dim).astype(np.float32)

    def split(n):
        y = (rng.random(n) >= 0.26).astype(np.int64)  # 26% class 0 (NORMAL), 74% class 1
        X = np.empty((n, dim), dtype=np.float32)
        for i in range(0, n, 1024):
            j = min(i + 1024, n)
            h = rng.standard_normal((j - i, rank), dtype=np.float32) @ loadings
            h += np.outer(y[i:j] - 0.74, direction)
            h += 0.5 * rng.standard_normal((j - i, dim), dtype=np.float32)
            X[i:j] = np.maximum(h + bias, 0.0)
        return X, y

    X_train, y_train = split(n_train)
    X_val, y_val = split(n_val)
    return {"X_train": X_train, "y_train": y_train, "X_val": X_val, "y_val": y_val}


def load_features(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in ("X_train", "y_train", "X_val", "y_val")}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(path: str) -> None:
    """Run in a fresh process: print the peak RSS growth of one LogisticHead fit as JSON."""
    data = load_features(path)
    small = {k: v[:: max(1, len(v) // 200)] for k, v in data.items()}  # keeps both classes
    LogisticHead().fit(small["X_train"], small["y_train"], small["X_val"], small["y_val"])  # warm-up
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
        method, before = "VmHWM after clear_refs", _rss_kib("VmRSS")
    except OSError:
        method, before = "ru_maxrss delta", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    LogisticHead().fit(data["X_train"], data["y_train"], data["X_val"], data["y_val"])
    if method.startswith("VmHWM"):
        after = _rss_kib("VmHWM")
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    growth = (after - before) * 1024
    print(json.dumps({"method": method, "peak_growth_bytes": growth,
                      "ratio": growth / data["X_train"].nbytes}))


def measure_memory(path: str) -> dict:
    cmd = [sys.executable, __file__, "--_memory-worker", path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement subprocess failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", help="npz with X_train, y_train, X_val, y_val (default: synthetic)")
    ap.add_argument("--cache", help="an xfeat feature cache (.h5): its train/val features, and "
                                    "the whole fit_head (sweep, threshold, metrics, bootstrap) timed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        return memory_worker(args.memory_worker)

    source = args.cache or args.features or "synthetic features"
    load_before = os.getloadavg()[0]
    features = None
    if args.cache:
        import xfeat

        features = xfeat.read_cache(args.cache)
        data = {"X_train": features["train"].features, "y_train": features["train"].labels,
                "X_val": features["val"].features, "y_val": features["val"].labels}
    else:
        data = load_features(args.features) if args.features else make_synthetic()
    Xtr, ytr, Xva, yva = data["X_train"], data["y_train"], data["X_val"], data["y_val"]

    times, head = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        head = LogisticHead().fit(Xtr, ytr, Xva, yva)
        times.append(time.perf_counter() - t0)
    val_acc = float(np.mean(head.predict(Xva) == yva))

    fit_head_times = []
    if features is not None:
        import xfeat

        for _ in range(args.repeats):
            t0 = time.perf_counter()
            xfeat.fit_head(cache=features, save=False)
            fit_head_times.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.features
        if path is None:
            path = str(Path(tmp) / "features.npz")
            np.savez(path, **data)
        memory = measure_memory(path)

    others = {}
    for name, h in (("LinearHead(epochs=25)", LinearHead()), ("KNNHead", KNNHead())):
        t0 = time.perf_counter()
        h.fit(Xtr, ytr, Xva, yva)
        seconds = time.perf_counter() - t0
        choice = f"best_epoch={h.best_epoch_}" if hasattr(h, "best_epoch_") else f"k={h.k_}"
        others[name] = {"seconds": seconds, "val_accuracy": float(np.mean(h.predict(Xva) == yva)),
                        "choice": choice}

    result = {
        "source": source,
        "machine": {"cpus": os.cpu_count(), "load_avg_1min_before": load_before,
                    "load_avg_1min_after": os.getloadavg()[0]},
        "shapes": {"X_train": list(Xtr.shape), "X_val": list(Xva.shape), "dtype": str(Xtr.dtype),
                   "class_fractions_train": (np.bincount(ytr) / len(ytr)).round(3).tolist()},
        "logreg": {"seconds": times, "median_seconds": statistics.median(times),
                   "n_C_tried": len(head.selection_["sweep"]), "C": head.C_, "val_accuracy": val_acc,
                   "peak_memory": memory, "feature_matrix_bytes": Xtr.nbytes},
        "others": others,
        "fit_head_seconds": fit_head_times,
        "memory_note": MEMORY_NOTE,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return result

    lr = result["logreg"]
    print(f"data: {source}  train {tuple(Xtr.shape)} {Xtr.dtype}, val {tuple(Xva.shape)}, "
          f"train class fractions {result['shapes']['class_fractions_train']}")
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before:.2f} before / "
          f"{result['machine']['load_avg_1min_after']:.2f} after (other processes share the CPUs)")
    print(f"LogisticHead().fit (C sweep scored on val + final model), {args.repeats} runs: "
          + ", ".join(f"{t:.2f}" for t in times) + " s")
    print(f"{'head':<24}{'median s':>10}{'val acc':>9}  choice")
    print(f"{'LogisticHead':<24}{lr['median_seconds']:>10.2f}{val_acc:>9.4f}  "
          f"C={head.C_:.3g} ({lr['n_C_tried']} C values tried)")
    if fit_head_times:
        print(f"xfeat.fit_head (sweep + threshold + metrics on every split + 1000-resample "
              f"bootstrap), {args.repeats} runs: " + ", ".join(f"{t:.2f}" for t in fit_head_times)
              + f" s; median {statistics.median(fit_head_times):.2f} s")
    for name, o in others.items():
        print(f"{name:<24}{o['seconds']:>10.2f}{o['val_accuracy']:>9.4f}  {o['choice']}  (1 run)")
    print(f"LogisticHead peak extra memory: {memory['peak_growth_bytes'] / 2**20:.1f} MiB = "
          f"{memory['ratio']:.2f}x the {Xtr.nbytes / 2**20:.1f} MiB feature matrix ({memory['method']})")
    print(f"note: {MEMORY_NOTE}")
    return result


if __name__ == "__main__":
    main()
