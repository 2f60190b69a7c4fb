"""int8 extraction fidelity and speed on the real chest X-rays, against fp32, side by side.

Extracts the full data set twice with the same backbone and weights: ``--precision fp32``
(compiled, as ``xfeat extract`` runs on this many images) and ``--precision int8``, then
reports the extraction speed of each, the cosine similarity of int8 to fp32 features per
image, and the logistic probe's val and test AUC on each (C and threshold chosen on val).
Targets: int8 >= 1.5x fp32, cosine >= 0.99, test AUC within 0.005.

    python scripts/bench_int8.py --weights ../shared/weights/mobilenet_v2_imagenet_features.pth
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import xfeat
from xfeat.cache import read_cache, read_meta
from xfeat.fitting import fit_head


def extraction(args, precision: str) -> dict:
    path = xfeat.extract(
        args.data,
        args.model,
        weights=args.weights,
        precision=precision,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        progress=False,
        force=True,
    )  # both timed in this run
    meta = read_meta(path)
    seconds = sum(s.get("seconds_total") or 0 for s in meta.splits.values())
    n = sum(s["n"] for s in meta.splits.values())
    probe = fit_head(cache=path, save=False, n_boot=args.n_boot)
    return {
        "path": str(path),
        "seconds": seconds,
        "images": n,
        "images_per_second": n / seconds,
        "val_auc": probe["metrics"]["val"]["roc_auc"],
        "test_auc": probe["metrics"]["test"]["roc_auc"],
        "test_auc_ci": probe["ci"]["test"]["roc_auc"],
        "test_accuracy": probe["metrics"]["test"]["accuracy"],
    }


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/chest_xray224")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--weights", default="../shared/weights/mobilenet_v2_imagenet_features.pth")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    fp32, int8 = extraction(args, "fp32"), extraction(args, "int8")
    a, b = read_cache(fp32["path"]), read_cache(int8["path"])
    cos = np.concatenate([cosine(a[s].features, b[s].features) for s in a.splits])
    result = {
        "model": args.model,
        "weights": args.weights,
        "fp32": fp32,
        "int8": int8,
        "speedup": int8["images_per_second"] / fp32["images_per_second"],
        "cosine_mean": float(cos.mean()),
        "cosine_p01": float(np.quantile(cos, 0.01)),
        "cosine_min": float(cos.min()),
        "test_auc_difference": int8["test_auc"] - fp32["test_auc"],
        "val_auc_difference": int8["val_auc"] - fp32["val_auc"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, r in (("fp32", fp32), ("int8", int8)):
        print(
            f"{name}: {r['images']} images in {r['seconds']:.1f} s ({r['images_per_second']:.1f}"
            f" img/s); probe val AUC {r['val_auc']:.4f}, test AUC {r['test_auc']:.4f} "
            f"[{r['test_auc_ci'][0]:.3f}, {r['test_auc_ci'][1]:.3f}], test accuracy "
            f"{r['test_accuracy']:.3f}"
        )
    print(
        f"int8 / fp32 speed {result['speedup']:.2f}x (target >= 1.5x); feature cosine mean "
        f"{result['cosine_mean']:.4f}, 1st percentile {result['cosine_p01']:.4f}, min "
        f"{result['cosine_min']:.4f} (target >= 0.99); test AUC difference "
        f"{result['test_auc_difference']:+.4f} (target within 0.005), val "
        f"{result['val_auc_difference']:+.4f}"
    )


if __name__ == "__main__":
    main()
