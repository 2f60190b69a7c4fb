"""Multi-label and 3-class accuracy on the full shared chest X-rays, labels from the file names.

    python scripts/bench_multilabel.py [--data ../shared/data/chest_xray224] [--json FILE]

Writes the NIH-style multi-label table (Pneumonia, Bacterial, Viral, pipe-joined, with the
patient id) and the 3-class table (normal / bacterial / viral) of ``kermany_tables.py``,
extracts ImageNet MobileNetV2 features once (cached), then, on the same cached features:

* xfeat's one-vs-rest logistic head (``fit_head``: each label's C chosen on its val rows,
  thresholds on val) -- per-label and macro AUC / AP on test;
* plain scikit-learn probes: ``StandardScaler`` + ``OneVsRestClassifier(LogisticRegression())``
  at C = 1 fitted on train, and the same with each label's C chosen on val by
  ``LogisticRegressionCV`` over a ``PredefinedSplit`` (train fits, val scores by ROC AUC,
  ``refit=False``: the train-fitted coefficients) -- scored with scikit-learn's own metrics;
* the 3-class head: accuracy and macro AUC on test.

The test split is never used to choose anything. Prints a table and, with ``--json``, writes
the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kermany_tables import write_tables  # noqa: E402

WEIGHTS = HERE.parents[1] / "shared" / "weights" / "mobilenet_v2_imagenet_features.pth"


def sklearn_probe(features, names: list, tuned: bool) -> dict:
    """Plain scikit-learn: standardise (on train), one-vs-rest logistic regression; C = 1, or
    (``tuned``) each label's C chosen on val by LogisticRegressionCV over a PredefinedSplit."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.model_selection import PredefinedSplit
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    train, val, test = features["train"], features["val"], features["test"]
    scaler = StandardScaler().fit(train.features)
    t0 = time.perf_counter()
    if tuned:
        X = scaler.transform(np.concatenate([train.features, val.features]))
        Y = np.concatenate([train.labels, val.labels])
        fold = np.r_[np.full(len(train), -1), np.zeros(len(val))]  # -1: always train; 0: val
        estimator = LogisticRegressionCV(
            Cs=np.logspace(-6, 2, 17),
            cv=PredefinedSplit(fold),
            scoring="roc_auc",
            refit=False,
            max_iter=2000,
        )
        with warnings.catch_warnings():  # scikit-learn 1.8's notices of 1.10's attribute changes
            warnings.simplefilter("ignore", FutureWarning)
            probe = OneVsRestClassifier(estimator).fit(X, Y)  # no unknown entries in these tables
    else:
        probe = OneVsRestClassifier(LogisticRegression(max_iter=2000))
        probe.fit(scaler.transform(train.features), train.labels)
    seconds = time.perf_counter() - t0
    P = probe.predict_proba(scaler.transform(test.features))
    Y = test.labels
    per_label = {
        n: {
            "roc_auc": float(roc_auc_score(Y[:, j], P[:, j])),
            "average_precision": float(average_precision_score(Y[:, j], P[:, j])),
        }
        for j, n in enumerate(names)
    }
    return {
        "per_label": per_label,
        "roc_auc": float(roc_auc_score(Y, P, average="macro")),
        "average_precision": float(average_precision_score(Y, P, average="macro")),
        "micro_roc_auc": float(roc_auc_score(Y, P, average="micro")),
        "fit_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(HERE.parents[1] / "shared" / "data" / "chest_xray224"))
    parser.add_argument("--cache-dir", default="cache")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import xfeat
    from xfeat.cache import read_cache
    from xfeat.config import DataSpec

    tables = write_tables(Path(tempfile.mkdtemp(prefix="xfeat-tables-")), args.data)
    options = {"cache_dir": args.cache_dir, "image_size": args.image_size}
    nih = DataSpec(
        tables["nih"],
        image_col="Image Index",
        label_col="Finding Labels",
        label_sep="|",
        negative_label="No Finding",
        patient_col="Patient ID",
    )
    with tempfile.TemporaryDirectory() as out:
        ml = xfeat.fit_head(
            nih, "mobilenet_v2", weights=str(WEIGHTS), extract_options=options, out_dir=f"{out}/ml"
        )
        three = xfeat.fit_head(
            DataSpec(tables["three_class"]),
            "mobilenet_v2",
            weights=str(WEIGHTS),
            extract_options=options,
            out_dir=f"{out}/three",
        )
    features = read_cache(ml.record.cache.path)
    names = list(ml.record.dataset.class_names)
    plain = sklearn_probe(features, names, tuned=False)
    tuned = sklearn_probe(features, names, tuned=True)
    test = ml.record.metrics["test"]
    ci = ml.record.ci["test"]
    figures = {
        "images": {s: int(m["n"]) for s, m in ml.record.metrics.items()},
        "xfeat": {
            "roc_auc": test["roc_auc"],
            "roc_auc_ci": ci["roc_auc"],
            "average_precision": test["average_precision"],
            "micro_roc_auc": test["micro_roc_auc"],
            "per_label": {
                n: {
                    k: test["per_label"][n][k]
                    for k in ("roc_auc", "average_precision", "n", "prevalence")
                }
                for n in names
            },
            "bootstrap": ci["resampled"],
            "fit_seconds": ml.record.timing["fit_seconds"],
            "C": {n: s.get("C") for n, s in ml.record.selection.items()},
        },
        "sklearn_ovr_logistic_C1": plain,
        "sklearn_ovr_logistic_C_on_val": tuned,
        "three_class": {
            "classes": list(three.record.dataset.class_names),
            "accuracy": three.record.metrics["test"]["accuracy"],
            "accuracy_ci": three.record.ci["test"].get("accuracy"),
            "macro_roc_auc": three.record.metrics["test"]["roc_auc"],
            "balanced_accuracy": three.record.metrics["test"]["balanced_accuracy"],
        },
    }
    print(f"multi-label, test ({figures['images']['test']} images), MobileNetV2 ImageNet features")
    print(f"{'':30s}{'xfeat OvR head':>16s}{'sklearn C=1':>13s}{'sklearn C on val':>18s}")
    rows = [
        (f"{n} {m}", test["per_label"][n][m], plain["per_label"][n][m], tuned["per_label"][n][m])
        for n in names
        for m in ("roc_auc", "average_precision")
    ]
    rows += [(f"macro {m}", test[m], plain[m], tuned[m]) for m in ("roc_auc", "average_precision")] + [
        ("micro roc_auc", test["micro_roc_auc"], plain["micro_roc_auc"], tuned["micro_roc_auc"])
    ]
    for name, a, b, c in rows:
        print(f"{name:30s}{a:16.3f}{b:13.3f}{c:18.3f}")
    lo, hi = ci["roc_auc"]
    print(f"xfeat macro AUC 95% CI [{lo:.3f}, {hi:.3f}] (bootstrap over {ci['resampled']})")
    t = figures["three_class"]
    print(
        f"3-class ({', '.join(t['classes'])}): test accuracy {t['accuracy']:.3f}, "
        f"balanced accuracy {t['balanced_accuracy']:.3f}, macro AUC {t['macro_roc_auc']:.3f}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
