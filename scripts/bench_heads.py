"""Benchmark the heads on a chest-X-ray-sized feature problem.

    python scripts/bench_heads.py [--features FILE.npz | --cache FILE.h5] [--repeats 3] [--json]

Times ``LogisticHead().fit`` (the full C sweep scored on val) against the fastest way to
do the same work with scikit-learn alone -- ``StandardScaler`` fitted on train, then
``LogisticRegressionCV`` over the same C values with a predefined train/val split
(warm-started along the C path, ``refit=False``) -- on the same data, ``--repeats`` times
each, alternating the two so that a change in the machine's load hits both; measures each
one's peak extra memory in a fresh subprocess; prints the speed ratio.  Then times ``LinearHead``
(25 epochs) and ``KNNHead`` once.  Without ``--features``/``--cache`` the problem is synthetic
(5,216 x 2,048 float32 train + 580 val, ReLU-like features with a low-rank class signal,
26% / 74% classes); an npz must hold ``X_train, y_train, X_val, y_val``.
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
import tracemalloc
from pathlib import Path

import numpy as np

from xfeat.heads import KNNHead, LinearHead, LogisticHead

MEMORY_NOTE = (
    "peak memory = (peak RSS during fit) - (RSS just before fit), in a fresh subprocess per solver "
    "that has already loaded the features and run one small warm-up fit (imports, BLAS buffers); "
    "the peak is reset before the fit via /proc/self/clear_refs, or, where that is refused, taken "
    "from ru_maxrss (then a lower bound if loading peaked higher). Ratio = growth / X_train.nbytes. "
    "tracemalloc = peak of the allocations Python and numpy report, in a second fit."
)


def make_synthetic(
    n_train=5216, n_val=580, dim=2048, rank=64, signal=0.6, seed=0
) -> dict[str, np.ndarray]:
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


IMPLEMENTATIONS = ("xfeat", "sklearn")


class _SklearnProbe:
    """The reference: scikit-learn alone, choosing C on the same val split over ``Cs``."""

    def __init__(self, Cs):
        self.Cs = sorted(Cs)

    def fit(self, X, y, *, X_val, y_val):
        from sklearn.linear_model import LogisticRegressionCV
        from sklearn.model_selection import PredefinedSplit
        from sklearn.preprocessing import StandardScaler

        self.scaler_ = StandardScaler().fit(X)
        Z = self.scaler_.transform(np.concatenate([X, X_val]))
        fold = PredefinedSplit(np.r_[np.full(len(X), -1), np.zeros(len(X_val), dtype=int)])
        self.model_ = LogisticRegressionCV(
            Cs=self.Cs,
            cv=fold,
            scoring="neg_log_loss",
            class_weight="balanced",
            refit=False,
            max_iter=1000,
            tol=1e-4,
        ).fit(Z, np.concatenate([y, y_val]))
        self.C_ = float(self.model_.C_[0])
        self.selection_ = {"sweep": [{"C": c} for c in self.Cs]}
        return self

    def predict_proba(self, X):
        return self.model_.predict_proba(self.scaler_.transform(X))

    def predict(self, X):
        return self.model_.classes_[self.predict_proba(X).argmax(axis=1)]


def _fit(data: dict, impl: str, Cs=None):
    head = LogisticHead() if impl == "xfeat" else _SklearnProbe(Cs or _xfeat_Cs(data))
    return head.fit(data["X_train"], data["y_train"], X_val=data["X_val"], y_val=data["y_val"])


def _xfeat_Cs(data: dict) -> list:
    """The C values xfeat's sweep tries on these data (the reference tries the same)."""
    return [s["C"] for s in _fit(data, "xfeat").selection_["sweep"]]


def memory_worker(path: str, solver: str, Cs: list) -> None:
    """Run in a fresh process: print the peak memory growth of one probe fit as JSON."""
    data = load_features(path)
    _fit({k: v[:: max(1, len(v) // 200)] for k, v in data.items()}, solver, Cs)  # warm-up
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
        method, before = "VmHWM after clear_refs", _rss_kib("VmRSS")
    except OSError:
        method, before = "ru_maxrss delta", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _fit(data, solver, Cs)
    if method.startswith("VmHWM"):
        after = _rss_kib("VmHWM")
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    growth = (after - before) * 1024
    tracemalloc.start()
    _fit(data, solver, Cs)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(
        json.dumps(
            {
                "method": method,
                "peak_growth_bytes": growth,
                "ratio": growth / data["X_train"].nbytes,
                "tracemalloc_peak_bytes": traced,
            }
        )
    )


def measure_memory(path: str, solver: str, Cs: list) -> dict:
    cmd = [sys.executable, __file__, "--_memory-worker", path, "--_solver", solver]
    cmd += ["--_Cs", json.dumps(Cs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement subprocess failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_data(args) -> tuple[dict, object]:
    """(train/val arrays, the FeatureSet or None) from --cache, --features or synthetic."""
    if args.cache:
        import xfeat

        features = xfeat.read_cache(args.cache)
        return {
            "X_train": features["train"].features,
            "y_train": features["train"].labels,
            "X_val": features["val"].features,
            "y_val": features["val"].labels,
        }, features
    return (load_features(args.features) if args.features else make_synthetic()), None


def time_solvers(data: dict, solvers: list, repeats: int, Cs: list) -> dict:
    """Seconds per fit for each implementation, alternating within each repeat."""
    times = {s: [] for s in solvers}
    heads = {}
    for _ in range(repeats):
        for solver in solvers:
            t0 = time.perf_counter()
            heads[solver] = _fit(data, solver, Cs)
            times[solver].append(time.perf_counter() - t0)
    yv = data["y_val"]
    return {
        s: {
            "seconds": times[s],
            "median_seconds": statistics.median(times[s]),
            "n_C_tried": len(heads[s].selection_["sweep"]),
            "C": heads[s].C_,
            "val_accuracy": float(np.mean(heads[s].predict(data["X_val"]) == yv)),
            "max_abs_proba_diff_vs_first": float(
                np.max(
                    np.abs(
                        heads[s].predict_proba(data["X_val"])
                        - heads[solvers[0]].predict_proba(data["X_val"])
                    )
                )
            ),
        }
        for s in solvers
    }


def time_other_heads(data: dict) -> dict:
    others = {}
    Xva, yva = data["X_val"], data["y_val"]
    for name, h in (("LinearHead(epochs=25)", LinearHead()), ("KNNHead", KNNHead())):
        t0 = time.perf_counter()
        h.fit(data["X_train"], data["y_train"], X_val=Xva, y_val=yva)
        seconds = time.perf_counter() - t0
        choice = f"best_epoch={h.best_epoch_}" if hasattr(h, "best_epoch_") else f"k={h.k_}"
        others[name] = {
            "seconds": seconds,
            "val_accuracy": float(np.mean(h.predict(Xva) == yva)),
            "choice": choice,
        }
    return others


def print_report(result: dict, args) -> None:
    shapes, lr, memory = result["shapes"], result["logreg"], result["peak_memory"]
    print(
        f"data: {result['source']}  train {tuple(shapes['X_train'])} {shapes['dtype']}, val "
        f"{tuple(shapes['X_val'])}, train class fractions {shapes['class_fractions_train']}"
    )
    m = result["machine"]
    print(
        f"machine: {m['cpus']} CPUs, 1-min load average {m['load_avg_1min_before']:.2f} before / "
        f"{m['load_avg_1min_after']:.2f} after (other processes share the CPUs)"
    )
    print(
        f"logistic probe, C chosen on val over the same {len(result['Cs'])} values, "
        f"{args.repeats} runs each, alternating:"
    )
    print(
        f"{'probe':<10}{'median s':>10}{'C':>10}{'#C':>4}{'val acc':>9}{'peak MiB':>10}"
        f"{'x X':>6}{'traced MiB':>12}  runs (s)"
    )
    for solver, r in lr.items():
        mem = memory[solver]
        print(
            f"{solver:<10}{r['median_seconds']:>10.2f}{r['C']:>10.3g}{r['n_C_tried']:>4}"
            f"{r['val_accuracy']:>9.4f}{mem['peak_growth_bytes'] / 2**20:>10.1f}"
            f"{mem['ratio']:>6.2f}{mem['tracemalloc_peak_bytes'] / 2**20:>12.1f}  "
            + ", ".join(f"{t:.2f}" for t in r["seconds"])
        )
    print(
        f"time ratio: xfeat median / scikit-learn median = {result['xfeat_over_sklearn']:.2f}; "
        f"max |proba difference| on val = {lr['sklearn']['max_abs_proba_diff_vs_first']:.2g}"
    )
    if result["fit_head_seconds"]:
        times = result["fit_head_seconds"]
        print(
            "xfeat.fit_head (sweep + threshold + metrics on every split + 1000-resample "
            f"bootstrap), {args.repeats} runs: "
            + ", ".join(f"{t:.2f}" for t in times)
            + f" s; median {statistics.median(times):.2f} s"
        )
    for name, o in result["others"].items():
        print(
            f"{name:<24}{o['seconds']:>8.2f} s  val acc {o['val_accuracy']:.4f}  {o['choice']}  (1 run)"
        )
    print(
        f"memory ({memory[next(iter(memory))]['method']}), feature matrix "
        f"{result['logreg_feature_matrix_bytes'] / 2**20:.1f} MiB. note: {MEMORY_NOTE}"
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--features", help="npz with X_train, y_train, X_val, y_val (default: synthetic)")
    ap.add_argument(
        "--cache",
        help="an xfeat feature cache (.h5): its train/val features, and "
        "the whole fit_head (sweep, threshold, metrics, bootstrap) timed",
    )
    ap.add_argument("--repeats", type=int, default=3)

    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_solver", dest="solver", help=argparse.SUPPRESS)
    ap.add_argument("--_Cs", dest="Cs", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.solver, json.loads(args.Cs))

    load_before = os.getloadavg()[0]
    data, features = load_data(args)
    Cs = _xfeat_Cs(data)
    logreg = time_solvers(data, list(IMPLEMENTATIONS), args.repeats, Cs)
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
        memory = {impl: measure_memory(path, impl, Cs) for impl in IMPLEMENTATIONS}
    Xtr, ytr = data["X_train"], data["y_train"]
    result = {
        "source": args.cache or args.features or "synthetic features",
        "machine": {"cpus": os.cpu_count(), "load_avg_1min_before": load_before},
        "shapes": {
            "X_train": list(Xtr.shape),
            "X_val": list(data["X_val"].shape),
            "dtype": str(Xtr.dtype),
            "class_fractions_train": (np.bincount(ytr) / len(ytr)).round(3).tolist(),
        },
        "Cs": Cs,
        "logreg": logreg,
        "peak_memory": memory,
        "logreg_feature_matrix_bytes": Xtr.nbytes,
        "others": time_other_heads(data),
        "fit_head_seconds": fit_head_times,
        "memory_note": MEMORY_NOTE,
    }
    result["xfeat_over_sklearn"] = (
        logreg["xfeat"]["median_seconds"] / logreg["sklearn"]["median_seconds"]
    )
    result["machine"]["load_avg_1min_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result, args)
    return result


if __name__ == "__main__":
    main()
