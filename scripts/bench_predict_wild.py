"""Predictions on images from the wild, measured on the shared chest X-rays.

    python scripts/bench_predict_wild.py [--data ../shared/data/chest_xray224] [--json FILE]

A logistic head is fitted on the cached features of the shared ImageNet MobileNetV2 (the full
train split, val carved out of it). Then every test image is "un-squashed": the shared
images were squashed to 224x224 from originals of aspect ratio about 1.2-1.6, so each is
resized to 314x224 (aspect 1.4) and saved as PNG. The script prints:

- how often ``predict`` on the un-squashed images agrees with ``predict`` on the squashed
  originals, by default (``--geometry match``) and with ``--geometry as-recorded``;
- the share of the test X-rays flagged out of distribution, and of scikit-learn's two sample
  photographs and 100 of its digits (upscaled to 224x224);
- the time the out-of-distribution score adds per image (the k-NN distances alone, timed on
  the test features, against the whole ``predict`` per image).
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import xfeat
from xfeat.heads import NearestNeighbourOOD, load_head_extra

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(SHARED / "data" / "chest_xray224"))
    ap.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"))
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="xfeat-wild-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # no copies left behind
    result = xfeat.fit_head(
        args.data,
        "mobilenet_v2",
        weights=args.weights,
        out_dir=work / "run",
        n_boot=0,
        extract_options={"cache_dir": args.cache_dir},
    )
    head = work / "run" / "head.npz"
    test = sorted(p for p in (Path(args.data) / "test").rglob("*.jpeg"))
    wide = []
    for i, p in enumerate(test):
        out = work / "wide" / f"{i:04d}.png"
        out.parent.mkdir(exist_ok=True)
        Image.open(p).convert("L").resize((314, 224), Image.BICUBIC).save(out)
        wide.append(out)

    t0 = time.perf_counter()
    squashed = xfeat.predict(head, test, progress=False)
    predict_seconds = time.perf_counter() - t0
    matched = xfeat.predict(head, wide, progress=False)
    kept = xfeat.predict(head, wide, progress=False, geometry="as-recorded")

    def agreement(rows):
        return float(np.mean([a["predicted"] == b["predicted"] for a, b in zip(squashed, rows)]))

    def mean_gap(rows):
        return float(np.mean([abs(a["p_PNEUMONIA"] - b["p_PNEUMONIA"]) for a, b in zip(squashed, rows)]))

    truth = ["PNEUMONIA" if "PNEUMONIA" in str(p) else "NORMAL" for p in test]

    def accuracy(rows):
        return float(np.mean([r["predicted"] == t for r, t in zip(rows, truth)]))

    from sklearn.datasets import load_digits, load_sample_images

    odd = []
    for i, photo in enumerate(load_sample_images().images):
        odd.append(work / f"photo{i}.png")
        Image.fromarray(photo).save(odd[-1])
    digits = load_digits().images[:100]
    for i, digit in enumerate(digits):
        odd.append(work / f"digit{i}.png")
        Image.fromarray((digit * 16).astype(np.uint8)).resize((224, 224), Image.NEAREST).save(odd[-1])
    odd_rows = xfeat.predict(head, odd, progress=False)

    scorer = NearestNeighbourOOD.from_arrays(load_head_extra(head))
    features = xfeat.read_cache(result.record.cache.path)["test"].features
    t0 = time.perf_counter()
    for _ in range(5):
        scorer.scores(features)
    ood_ms = 1000 * (time.perf_counter() - t0) / 5 / len(features)

    figures = {
        "test_images": len(test),
        "agreement_default_match": agreement(matched),
        "agreement_as_recorded": agreement(kept),
        "mean_abs_probability_gap_match": mean_gap(matched),
        "mean_abs_probability_gap_as_recorded": mean_gap(kept),
        "test_accuracy_squashed": accuracy(squashed),
        "test_accuracy_unsquashed_match": accuracy(matched),
        "test_accuracy_unsquashed_as_recorded": accuracy(kept),
        "ood_flagged_test_xrays": float(np.mean([r["ood"] for r in squashed])),
        "ood_flagged_unsquashed_match": float(np.mean([r["ood"] for r in matched])),
        "ood_flagged_photographs": float(np.mean([r["ood"] for r in odd_rows[:2]])),
        "ood_flagged_digits": float(np.mean([r["ood"] for r in odd_rows[2:]])),
        "ood_reference_rows": int(scorer.reference.shape[0]),
        "ood_ms_per_image": ood_ms,
        "predict_ms_per_image": 1000 * predict_seconds / len(test),
    }
    for key, value in figures.items():
        print(f"{key:<40} {value:.4g}" if isinstance(value, float) else f"{key:<40} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
