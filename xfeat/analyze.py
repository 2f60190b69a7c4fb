"""``analyze``: what is wrong with a dataset, before a model is blamed for it.

This module owns the data analysis of one feature cache and the images behind it, written as
``analysis.json``, ``analysis.md``, PNG figures and CSV lists of flagged images:

1. class balance and prior shift (class fractions per split, the majority-class baseline);
2. train/test covariate shift: a domain classifier's out-of-fold AUC (0.5 = no shift);
3. exact duplicates (hashes of decoded pixels), near duplicates (cosine similarity of
   embeddings) and patient ids present in more than one split;
4. label-noise candidates: out-of-fold probabilities on train, confident-learning rule;
5. train/val/test gaps of a logistic probe and of any given runs;
6. calibration of the probe and the effect of the val-chosen threshold on test.

Only the pixel hashes read images (each decoded once); everything else works on the cached
arrays. Every probe here is :class:`~xfeat.heads.LogisticHead` (standardised features, L2,
balanced class weights), so the numbers mean the same as ``fit_head``'s.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from . import cache as cache_io
from . import report
from .data import DEFAULT_GROUP_PATTERN, DataError, Dataset, ImageReadError, SplitRecipe
from .data import load_dataset, patient_groups
from .extract import extract, plan_extraction, split_extract_options
from .fit import default_run_dir, fit_head
from .heads import LogisticHead
from .metrics import bootstrap_ci, compute_metrics, reliability_curve
from .results import load_result

logger = logging.getLogger(__name__)

SCHEMA = "xfeat-analysis/1"
SPLIT_ORDER = ("train", "val", "test")
# The domain classifier's L2 strength (scikit-learn's C on standardised features), fixed
# rather than tuned: the out-of-fold AUC of any fixed classifier is an honest (if
# conservative) test of shift, and tuning C on the same folds would bias it upwards.
DOMAIN_C = 0.1
# Train is subsampled to at most this many times the test size for the domain classifier:
# a near-balanced problem, and 5,216 train rows add time but little power against 624.
MAX_TRAIN_PER_TEST = 3
MAX_NEAR_PAIRS = 10_000  # near-duplicate pairs kept (the most similar); the total is counted
SIMILARITY_CHUNK = 1024  # rows of the similarity matrix held at once (1024 x N float32)
TOP_LABEL_NOISE = 20  # candidates shown in the report (all go to the CSV)
GAP_FLAG = 0.05  # an accuracy gap above this many points is called out
GAP_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "log_loss")


@dataclass
class Analysis:
    """The analysis of one dataset: ``record`` (as in ``analysis.json``) and where it went."""

    record: dict
    out_dir: Optional[Path] = None

    def __getitem__(self, key):
        return self.record[key]

    def summary(self) -> str:
        """Headline findings as readable lines for a terminal."""
        r = self.record
        n = sum(r["class_balance"]["counts"][s]["total"] for s in r["class_balance"]["counts"])
        lines = [f"xfeat analysis: {r['dataset']['name']} | {r['model']} ({r['weights']['id']}) "
                 f"| {n} images | {r['timing']['total_seconds']:.1f} s"]
        lines += [f"  - {h}" for h in r["headlines"]]
        if self.out_dir is not None:
            lines.append(f"report: {Path(self.out_dir) / 'analysis.md'}")
        return "\n".join(lines)


def analyze(data=None, model: str = "resnet18", *, weights="none",
            cache: Union[str, Path, cache_io.FeatureSet, None] = None,
            out_dir: Union[str, Path, None] = None, runs: Sequence = (),
            near_duplicate_threshold: float = 0.995, n_folds: int = 5, n_boot: int = 1000,
            seed: int = 0, extract_options: Optional[dict] = None,
            progress: bool = True) -> Analysis:
    """Analyse a dataset through the cached features of ``model``; write the report.

    Parameters
    ----------
    data, model, weights : what to extract (the cache is built or reused, as ``fit_head``);
        or give ``cache``. The images are needed too (pixel hashes): with ``cache`` alone
        they are reloaded from the cache's recorded source, and must still match it.
    cache : a cache file (``.h5``) or a :class:`~xfeat.cache.FeatureSet`.
    out_dir : default ``runs/DATASET/MODEL-WEIGHTS/analysis``.
    runs : run folders (``results.json``) whose train/val/test gaps join the report.
    near_duplicate_threshold : cosine similarity of L2-normalised embeddings at or above
        which two images that are not pixel-identical are listed as near duplicates.
    n_folds : stratified folds of the out-of-fold predictions (shift and label noise).
    n_boot, seed : bootstrap resamples of the confidence intervals; seed of every random
        choice (folds, subsamples, bootstrap).
    extract_options : as ``fit_head``'s (cache_dir, image_size, num_workers, ...).

    Returns
    -------
    Analysis
        ``record`` with keys ``class_balance``, ``shift``, ``duplicates``, ``label_noise``,
        ``overfitting``, ``calibration`` and ``headlines``; ``summary()`` prints them.
    """
    t_start = time.perf_counter()
    _check_params(near_duplicate_threshold, n_folds, n_boot)
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    options = dict(extract_options or {})
    options.setdefault("progress", progress)
    dataset = None
    if cache is None:
        if data is None:
            raise ValueError("analyze needs data= (to build or reuse a cache) or cache=")
        plan_options, run_options = split_extract_options(options)
        plan = plan_extraction(data, model, weights=weights, **plan_options)
        cache = extract(plan=plan, **run_options)
        dataset = plan.dataset
    features = cache if isinstance(cache, cache_io.FeatureSet) else cache_io.read_cache(cache)
    meta = features.meta
    for split in ("train", "val"):
        if split not in features.splits:
            raise cache_io.CacheError(f"{features.path} has no {split!r} split; analyze needs "
                                      "train and val")
    if dataset is None:
        dataset = load_matching_dataset(
            meta, data, ids={s: sp.ids + features.skipped.get(s, [])
                             for s, sp in features.splits.items()},
            cache_dir=options.get("cache_dir"))
    if out_dir is None:
        out_dir = default_run_dir(meta, "analysis", "").parent / "analysis"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = meta["class_names"]
    timing = {}

    t = time.perf_counter()
    balance = class_balance(features)
    report.plot_class_balance(balance["fractions"], class_names, out_dir / "class_balance.png",
                              title=f"class fractions per split ({meta['dataset']['name']})")
    timing["class_balance_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    hashes = hash_images(dataset, progress=progress)
    timing["pixel_hash_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    duplicates, dup_rows = find_duplicates(features, dataset, hashes,
                                           threshold=near_duplicate_threshold)
    timing["duplicates_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    shift = domain_shift(features, n_folds=n_folds, n_boot=n_boot, seed=seed)
    proj = shift.pop("projection", None)
    if proj is not None:
        report.plot_projection(proj["coords"], proj["splits"], proj["labels"], class_names,
                               out_dir / "shift_projection.png",
                               title="PCA of standardised features",
                               axis_labels=[f"PC {k + 1} ({v:.0%} of variance)"
                                            for k, v in enumerate(proj["explained"])])
    timing["shift_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    probe = fit_head(cache=features, save=False, n_boot=n_boot, seed=seed)
    overfit = overfitting_gaps(probe.record, runs, fingerprint=meta["dataset"]["fingerprint"],
                               out_dir=out_dir)
    timing["overfitting_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    noise, noise_rows = find_label_noise(features, C=probe.record["selection"]["C"],
                                         n_folds=n_folds, seed=seed)
    timing["label_noise_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    calibration = calibration_report(probe)
    report.plot_reliability(calibration["curves"], out_dir / "reliability.png",
                            ece={s: calibration["ece"][s] for s in calibration["curves"]},
                            title="logistic probe: reliability",
                            xlabel=calibration["x"])
    timing["calibration_seconds"] = time.perf_counter() - t
    timing["total_seconds"] = time.perf_counter() - t_start

    files = {"json": "analysis.json", "markdown": "analysis.md",
             "class_balance_png": "class_balance.png", "reliability_png": "reliability.png",
             "duplicates_exact_csv": "duplicates_exact.csv",
             "duplicates_near_csv": "duplicates_near.csv",
             "patients_across_splits_csv": "patients_across_splits.csv",
             "label_noise_csv": "label_noise_candidates.csv"}
    if proj is not None:
        files["shift_projection_png"] = "shift_projection.png"
    files.update({f"curves_{r['name']}_png": r["curves_png"] for r in overfit["runs"]
                  if r.get("curves_png")})
    record = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "out_dir": str(out_dir),
        "dataset": {k: meta["dataset"][k] for k in ("name", "source", "fingerprint")}
        | {"class_names": class_names, "split": meta["split"]},
        "model": meta["model"],
        "weights": {k: meta["weights"].get(k) for k in ("kind", "id", "sha256")},
        "cache": {"path": str(features.path), "key": features.key},
        "params": {"near_duplicate_threshold": near_duplicate_threshold, "n_folds": n_folds,
                   "n_boot": n_boot, "seed": seed, "runs": [str(r) for r in runs],
                   "domain_C": DOMAIN_C, "max_train_per_test": MAX_TRAIN_PER_TEST},
        "headlines": [],
        "class_balance": balance,
        "shift": shift,
        "duplicates": duplicates,
        "label_noise": noise,
        "overfitting": overfit,
        "calibration": calibration,
        "files": files,
        "timing": timing,
    }
    record["headlines"] = headlines(record)
    record = _jsonable(record)

    _write_csv(out_dir / "duplicates_exact.csv", dup_rows["exact"],
               ["group", "split", "id", "label", "path"])
    _write_csv(out_dir / "duplicates_near.csv", dup_rows["near"],
               ["similarity", "cross_split", "split_a", "id_a", "label_a", "split_b", "id_b",
                "label_b", "path_a", "path_b"])
    _write_csv(out_dir / "patients_across_splits.csv", dup_rows["patients"],
               ["patient", "splits", "split", "id", "label"])
    _write_csv(out_dir / "label_noise_candidates.csv", noise_rows,
               ["rank", "id", "given_label", "p_given", "predicted_label", "p_predicted"])
    (out_dir / "analysis.json").write_text(json.dumps(record, indent=2, allow_nan=False))
    (out_dir / "analysis.md").write_text(render_markdown(record))
    logger.info("analysis of %s written to %s in %.1f s", meta["dataset"]["name"], out_dir,
                timing["total_seconds"])
    return Analysis(record, out_dir)


def _check_params(threshold, n_folds, n_boot) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not 0.0 < threshold <= 1.0:
        raise ValueError(f"near_duplicate_threshold={threshold!r}; expected a cosine "
                         "similarity in (0, 1], such as 0.995")
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds={n_folds!r}; expected an integer >= 2")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot={n_boot!r}; expected an integer >= 0 (0: no intervals)")


def load_matching_dataset(meta: dict, data=None, *, ids: Optional[dict] = None,
                          cache_dir=None) -> Dataset:
    """The dataset a cache was made from (``data``, else its recorded source), verified.

    ``data`` may be a path, a built-in name or a :class:`~xfeat.data.Dataset`. The split
    recipe is rebuilt from the cache's metadata, as ``fit.check_cache_matches_data`` does; a
    different content or split fingerprint is refused. A cache of a subsample (``--quick``)
    reloaded from its source cannot be fingerprinted again: its images are then picked from
    the source by the cache's ``ids`` ({split: ids}), and every id must be there.
    """
    if isinstance(data, Dataset):
        dataset, source = data, data.source
    else:
        recipe = SplitRecipe.from_split_info(meta["split"])
        source = data if data is not None else meta["dataset"]["source"]
        try:
            dataset = load_dataset(source, recipe=recipe, cache_dir=cache_dir)
        except DataError as exc:
            if data is not None:
                raise
            raise DataError(f"the cache was made from {source}, which cannot be loaded now "
                            f"({exc}); pass data= with the images it was made from") from None
    if dataset.fingerprint == meta["dataset"]["fingerprint"]:
        return dataset
    if "subsample" in meta["split"] and ids is not None and not isinstance(data, Dataset):
        return _select_ids(dataset, meta, ids)
    raise cache_io.CacheError(
        f"the cache {meta.get('key', '')[:16]} was made from different data than {source} "
        "(its content or split changed); analyse without cache= to extract a fresh one")


def _select_ids(dataset: Dataset, meta: dict, ids: dict) -> Dataset:
    splits = {}
    for name, wanted in ids.items():
        split = dataset.splits.get(name)
        index = {i: k for k, i in enumerate(split.ids)} if split is not None else {}
        missing = [i for i in wanted if i not in index]
        if missing:
            raise cache_io.CacheError(
                f"the cache {meta.get('key', '')[:16]} is a subsample of {dataset.source}, but "
                f"{len(missing)} of its {name} images are not there now (e.g. {missing[0]}); "
                "analyse without cache= to extract a fresh one")
        splits[name] = split.subset([index[i] for i in wanted])
    logger.warning("the cache is a subsample of %s: its images were matched by id, and their "
                   "content cannot be verified against the cache's fingerprint", dataset.source)
    return Dataset(name=meta["dataset"]["name"], source=dataset.source,
                   class_names=dataset.class_names, splits=splits,
                   content_digest=meta["dataset"].get("content_digest", ""),
                   split_info=meta["split"])


# --------------------------------------------------------------------------- 1. class balance

def class_balance(features: cache_io.FeatureSet) -> dict:
    """Counts and fractions per split, the majority-class baseline and the prior shift."""
    names = features.class_names
    k = len(names)
    counts = {s: np.bincount(features[s].labels, minlength=k) for s in _splits(features)}
    fractions = {s: (c / max(1, c.sum())).tolist() for s, c in counts.items()}
    majority = int(np.argmax(counts["train"]))
    baseline = {s: {"accuracy": fractions[s][majority], "balanced_accuracy": 1.0 / k}
                for s in counts if s != "train"}
    out = {
        "class_names": names,
        "counts": {s: {**{n: int(v) for n, v in zip(names, c)}, "total": int(c.sum())}
                   for s, c in counts.items()},
        "fractions": fractions,
        "majority_class": names[majority],
        "majority_baseline": baseline,
    }
    if "test" not in counts:
        out["prior_shift"] = None
        return out
    tr, te = np.asarray(fractions["train"]), np.asarray(fractions["test"])
    shift = {"total_variation": float(0.5 * np.abs(tr - te).sum()),
             "train": tr.tolist(), "test": te.tolist()}
    if k == 2:
        shift.update(positive_class=names[1], train_positive=float(tr[1]),
                     test_positive=float(te[1]))
    m = names[majority]
    diff = te[majority] - tr[majority]
    if abs(diff) < 0.02:
        shift["meaning"] = (f"train and test have similar class priors ({m} {tr[majority]:.1%} vs "
                            f"{te[majority]:.1%}): no prior shift to correct for.")
    elif diff < 0:
        shift["meaning"] = (
            f"train is {tr[majority]:.1%} {m} but test only {te[majority]:.1%}: a model whose "
            f"threshold reflects the train priors over-calls {m} on test. Balanced accuracy "
            "and a prevalence-free operating point (balanced class weights, a Youden threshold "
            "chosen on val) mitigate it.")
    else:
        shift["meaning"] = (
            f"test has more {m} ({te[majority]:.1%}) than train ({tr[majority]:.1%}): a model "
            f"tuned to the train priors under-calls {m} on test; balanced accuracy and a "
            "prevalence-free operating point mitigate it.")
    out["prior_shift"] = shift
    return out


# --------------------------------------------------------------------------- 2. shift

def domain_shift(features: cache_io.FeatureSet, *, n_folds: int = 5, n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """How well a linear probe tells train embeddings from test ones (AUC; 0.5 = no shift).

    Train is subsampled (seeded) to at most ``MAX_TRAIN_PER_TEST`` times the test size. A
    :class:`~xfeat.heads.LogisticHead` with fixed ``C = DOMAIN_C`` gives stratified
    out-of-fold scores; the AUC's 95% interval bootstraps those scores (the folds' training
    variability is not included). Per class, the same on that class's images only: shift that
    survives within a class is not explained by the different class mix.
    """
    if "test" not in features.splits:
        return {"skipped": "the cache has no test split"}
    rng = np.random.default_rng(seed)
    tr, te = features["train"], features["test"]
    out = {"method": f"LogisticHead(C={DOMAIN_C}) on standardised features, {n_folds}-fold "
                     "stratified out-of-fold scores, train subsampled to at most "
                     f"{MAX_TRAIN_PER_TEST}x the test size (seed {seed})"}
    rows = _subsample(np.arange(len(tr)), MAX_TRAIN_PER_TEST * len(te), rng)
    out.update(_domain_auc(tr.features[rows], te.features, n_folds, n_boot, seed))
    out["n_train_used"], out["n_test"] = int(len(rows)), int(len(te))
    out["per_class"] = {}
    for c, name in enumerate(features.class_names):
        tr_c = np.flatnonzero(tr.labels == c)
        te_c = np.flatnonzero(te.labels == c)
        if len(te_c) < 2 or len(tr_c) < 2:
            out["per_class"][name] = {"skipped": "fewer than 2 images in train or test"}
            continue
        tr_c = _subsample(tr_c, MAX_TRAIN_PER_TEST * len(te_c), rng)
        out["per_class"][name] = {**_domain_auc(tr.features[tr_c], te.features[te_c], n_folds,
                                                n_boot, seed),
                                  "n_train_used": int(len(tr_c)), "n_test": int(len(te_c))}
    out["meaning"] = _shift_meaning(out.get("auc"))
    out["projection"] = _projection(features, rows, seed)
    return out


def _domain_auc(X_train, X_test, n_folds, n_boot, seed) -> dict:
    X = np.concatenate([X_train, X_test])
    is_test = np.r_[np.zeros(len(X_train), np.int64), np.ones(len(X_test), np.int64)]
    proba, folds = out_of_fold_proba(X, is_test, C=DOMAIN_C, n_folds=n_folds, seed=seed)
    if proba is None:
        return {"skipped": f"too few images for {n_folds}-fold cross-validation"}
    auc = float(roc_auc_score(is_test, proba[:, 1]))
    ci = bootstrap_ci(is_test, proba, metrics=("roc_auc",), n_boot=n_boot,
                      seed=seed)["roc_auc"] if n_boot else None
    return {"auc": auc, "ci": ci, "folds": folds}


def _shift_meaning(auc) -> str:
    if auc is None:
        return "not measured"
    if auc < 0.6:
        return "train and test embeddings look alike to a linear probe"
    if auc < 0.75:
        return "moderate shift: a linear probe tells test from train better than chance"
    return "strong shift: test images are easy to tell from train"


def _projection(features, train_rows, seed) -> dict:
    """PCA of the standardised features of the train subsample, val and test."""
    tr = features["train"]
    parts = [("train", tr.features[train_rows], tr.labels[train_rows])]
    parts += [(s, features[s].features, features[s].labels) for s in ("val", "test")
              if s in features.splits]
    X = np.concatenate([p[1] for p in parts]).astype(np.float64)
    X = (X - X.mean(axis=0)) / np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)
    n_comp = min(2, X.shape[0], X.shape[1])
    pca = PCA(n_components=n_comp, svd_solver="randomized", random_state=seed).fit(X)
    coords = pca.transform(X)
    if n_comp < 2:
        coords = np.column_stack([coords, np.zeros(len(coords))])
    return {"coords": coords,
            "splits": np.concatenate([[s] * len(p) for s, p, _ in parts]),
            "labels": np.concatenate([p[2] for p in parts]),
            "explained": pca.explained_variance_ratio_.tolist() + [0.0] * (2 - n_comp)}


def out_of_fold_proba(X: np.ndarray, y: np.ndarray, *, C: float, n_folds: int = 5,
                      seed: int = 0):
    """Stratified out-of-fold probabilities of ``LogisticHead(C=C)``: ``(proba, folds)``.

    ``folds`` is ``min(n_folds, smallest class count)``; ``(None, 0)`` if that is below 2.
    The held-out fold is passed as the head's val split only because ``fit`` takes one; with
    C fixed it chooses nothing.
    """
    y = np.asarray(y)
    counts = np.bincount(y)
    folds = int(min(n_folds, counts[counts > 0].min())) if (counts > 0).sum() >= 2 else 0
    if folds < 2:
        return None, 0
    if folds < n_folds:
        logger.warning("only %d folds: the smallest class has %d images", folds,
                       counts[counts > 0].min())
    proba = np.zeros((len(y), len(counts)))
    for fit_rows, held_out in StratifiedKFold(folds, shuffle=True,
                                              random_state=seed).split(X, y):
        head = LogisticHead(C=C).fit(X[fit_rows], y[fit_rows], X[held_out], y[held_out])
        p = head.predict_proba(X[held_out])
        proba[held_out, :p.shape[1]] = p
    return proba, folds


def _subsample(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return np.sort(rng.choice(rows, size=limit, replace=False))


# --------------------------------------------------------------------------- 3. duplicates

def hash_images(dataset: Dataset, *, progress: bool = True) -> dict:
    """sha256 of each image's pixels: ``{split: [hex digest or None if unreadable]}``.

    Folder images are decoded to RGB (so a PNG and a JPEG re-save of the same pixels, or two
    files with different metadata, hash alike); npz images hash their array bytes and shape.
    """
    total = sum(len(s) for s in dataset.splits.values())
    hashes = {}
    with tqdm(total=total, unit="img", desc="pixel hashes", disable=not progress,
              dynamic_ncols=True) as bar:
        for name, split in dataset.splits.items():
            digests = []
            for i in range(len(split)):
                if split.paths is None:
                    arr = np.ascontiguousarray(split.arrays[split.array_rows[i]])
                    head = f"{arr.shape}{arr.dtype}".encode()
                else:
                    try:
                        arr = np.asarray(split.read_image(i))
                    except ImageReadError as exc:
                        logger.warning("not hashed: %s", exc)
                        digests.append(None)
                        bar.update()
                        continue
                    head = f"{arr.shape}".encode()
                digests.append(hashlib.sha256(head + arr.tobytes()).hexdigest())
                bar.update()
            hashes[name] = digests
    return hashes


def find_duplicates(features: cache_io.FeatureSet, dataset: Dataset, hashes: dict, *,
                    threshold: float = 0.995, max_pairs: int = MAX_NEAR_PAIRS):
    """Exact duplicate groups, near-duplicate pairs and patients across splits.

    Returns ``(summary for the record, {"exact": rows, "near": rows, "patients": rows})``
    where the rows are for the CSV files.
    """
    names = features.class_names
    images = _image_table(dataset, hashes)
    exact_groups = exact_duplicate_groups(images)
    exact_rows = [{"group": g["group"], "split": m["split"], "id": m["id"],
                   "label": m["label"], "path": m["path"]}
                  for g in exact_groups for m in g["members"]]

    # Near duplicates on the cached embeddings; pixel-identical pairs are already listed.
    splits = _splits(features)
    ids = [i for s in splits for i in features[s].ids]
    row_split = np.array([s for s in splits for _ in range(len(features[s]))], dtype=object)
    labels = np.concatenate([features[s].labels for s in splits])
    content = np.array([images["content"].get(i, -1 - k) for k, i in enumerate(ids)])
    X = np.concatenate([features[s].features for s in splits])
    a, b, sim, n_total = near_duplicate_pairs(X, content, threshold=threshold,
                                              max_pairs=max_pairs)
    cross = (row_split[a] != row_split[b]).astype(bool)
    path = images["path"]
    near_rows = [{"similarity": round(float(s), 6), "cross_split": bool(c),
                  "split_a": row_split[i], "id_a": ids[i], "label_a": names[labels[i]],
                  "split_b": row_split[j], "id_b": ids[j], "label_b": names[labels[j]],
                  "path_a": path.get(ids[i], ""), "path_b": path.get(ids[j], "")}
                 for i, j, s, c in zip(a, b, sim, cross)]

    pattern = dataset.split_info.get("group_pattern", DEFAULT_GROUP_PATTERN) \
        if dataset.split_info.get("val") == "carved from train" else DEFAULT_GROUP_PATTERN
    patients, patient_rows = patients_across_splits(images, pattern, exact_groups, near_rows)

    pair_counts = {}
    for g in exact_groups:
        if g["across_splits"]:
            key = "-".join(g["splits"])
            pair_counts[key] = pair_counts.get(key, 0) + 1
    near_cross = {}
    for r in near_rows:
        if r["cross_split"]:
            key = "-".join(sorted((r["split_a"], r["split_b"]), key=SPLIT_ORDER.index))
            near_cross[key] = near_cross.get(key, 0) + 1
    summary = {
        "exact": {
            "method": "sha256 of decoded RGB pixels and shape (npz: array bytes)",
            "n_images_hashed": int(sum(h is not None for v in hashes.values() for h in v)),
            "unreadable": [i for s, sp in dataset.splits.items()
                           for i, h in zip(sp.ids, hashes[s]) if h is None],
            "n_groups": len(exact_groups),
            "n_images_in_groups": sum(len(g["members"]) for g in exact_groups),
            "n_groups_across_splits": sum(g["across_splits"] for g in exact_groups),
            "across_split_pairs": pair_counts,
            "n_groups_label_conflict": sum(g["label_conflict"] for g in exact_groups),
            "groups": [{**g, "members": [{k: m[k] for k in ("split", "id", "label")}
                                         for m in g["members"]]} for g in exact_groups],
        },
        "near": {
            "method": "cosine similarity of L2-normalised embeddings, pixel-identical pairs "
                      "excluded",
            "threshold": threshold,
            "n_pairs": int(n_total),
            "n_listed": len(near_rows),
            "truncated": bool(n_total > len(near_rows)),
            "n_pairs_across_splits": int(cross.sum()),
            "across_split_pairs": near_cross,
            "top": near_rows[:50],
        },
        "patients": patients,
    }
    return summary, {"exact": exact_rows, "near": near_rows, "patients": patient_rows}


def _image_table(dataset: Dataset, hashes: dict) -> dict:
    """Flat per-image lists over every split, and id -> content index / path lookups."""
    table = {"split": [], "id": [], "label": [], "path": {}, "hash": []}
    names = dataset.class_names
    for s, sp in dataset.splits.items():
        table["split"] += [s] * len(sp)
        table["id"] += list(sp.ids)
        table["label"] += [names[y] for y in sp.labels]
        table["hash"] += hashes[s]
        if sp.paths is not None:
            table["path"].update(zip(sp.ids, sp.paths))
    readable = [k for k, h in enumerate(table["hash"]) if h is not None]
    _, inverse = np.unique(np.array([table["hash"][k] for k in readable], dtype=object)
                           .astype(str), return_inverse=True)
    table["content"] = {table["id"][k]: int(c) for k, c in zip(readable, inverse.ravel())}
    return table


def exact_duplicate_groups(images: dict) -> list:
    """Groups of two or more pixel-identical images, members and groups in a stable order."""
    members = {}
    for k, image_id in enumerate(images["id"]):
        c = images["content"].get(image_id)
        if c is not None:
            members.setdefault(c, []).append(k)
    groups = []
    for rows in members.values():
        if len(rows) < 2:
            continue
        rows = sorted(rows, key=lambda k: (SPLIT_ORDER.index(images["split"][k]), images["id"][k]))
        splits = sorted({images["split"][k] for k in rows}, key=SPLIT_ORDER.index)
        labels = sorted({images["label"][k] for k in rows})
        groups.append({
            "members": [{"split": images["split"][k], "id": images["id"][k],
                         "label": images["label"][k],
                         "path": images["path"].get(images["id"][k], "")} for k in rows],
            "splits": splits, "across_splits": len(splits) > 1,
            "labels": labels, "label_conflict": len(labels) > 1,
        })
    groups.sort(key=lambda g: (SPLIT_ORDER.index(g["members"][0]["split"]), g["members"][0]["id"]))
    for n, g in enumerate(groups, 1):
        g["group"] = n
    return [{"group": g.pop("group"), **g} for g in groups]


def near_duplicate_pairs(X: np.ndarray, content: np.ndarray, *, threshold: float,
                         max_pairs: int = MAX_NEAR_PAIRS, chunk: int = SIMILARITY_CHUNK):
    """Pairs ``i < j`` with cosine similarity >= threshold and different ``content``.

    Computed ``chunk`` rows at a time against the rows after them (memory ``chunk x N``);
    only the ``max_pairs`` most similar pairs are kept, the total is counted. Returns
    ``(i, j, similarity, n_total)``, sorted by decreasing similarity.
    """
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    Xn = X / np.where(norms > 0, norms, 1.0)
    content = np.asarray(content)
    keep_i, keep_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    keep_s = [np.zeros(0, np.float32)]
    n_total = 0
    kept = 0
    for start in range(0, len(Xn), chunk):
        stop = min(start + chunk, len(Xn))
        S = Xn[start:stop] @ Xn[start:].T  # columns start.. : each pair once
        i_local, j_local = np.nonzero(S >= threshold)
        i, j = i_local + start, j_local + start
        upper = (j > i) & (content[i] != content[j])
        i, j = i[upper], j[upper]
        s = S[i_local[upper], j_local[upper]]
        n_total += len(i)
        keep_i.append(i)
        keep_j.append(j)
        keep_s.append(s)
        kept += len(i)
        if kept > 2 * max_pairs:  # bound memory when the threshold is loose
            keep_i, keep_j, keep_s = _top_pairs(keep_i, keep_j, keep_s, max_pairs)
            kept = len(keep_i[0])
    (i,), (j,), (s,) = _top_pairs(keep_i, keep_j, keep_s, max_pairs)
    return i, j, s, n_total


def _top_pairs(keep_i, keep_j, keep_s, max_pairs):
    i, j, s = np.concatenate(keep_i), np.concatenate(keep_j), np.concatenate(keep_s)
    order = np.lexsort((j, i, -s))[:max_pairs]  # most similar first; ties by index
    return [i[order]], [j[order]], [s[order]]


def patients_across_splits(images: dict, pattern: Optional[str], exact_groups: list,
                           near_rows: list):
    """Patient ids (from file names, where ``pattern`` matched) present in several splits.

    Each such patient is marked ``pixel_evidence`` when one of its cross-split image pairs
    is also an exact or near duplicate: matching ids then likely are the same person.
    """
    if not pattern:
        return {"pattern": None, "skipped": "no patient pattern (grouping disabled)"}, []
    groups = patient_groups(images["id"], pattern)
    by_patient = {}
    for k, (g, image_id) in enumerate(zip(groups, images["id"])):
        if g != image_id:  # the pattern matched this file name
            by_patient.setdefault(g, []).append(k)
    n_matched = sum(len(v) for v in by_patient.values())
    leaking = {}
    for g, rows in by_patient.items():
        splits = sorted({images["split"][k] for k in rows}, key=SPLIT_ORDER.index)
        if len(splits) > 1:
            leaking[g] = (splits, rows)
    patient_of = dict(zip(images["id"], groups))
    evidence = set()
    pairs = [(m["id"], n["id"]) for grp in exact_groups for m in grp["members"]
             for n in grp["members"] if m["split"] != n["split"]]
    pairs += [(r["id_a"], r["id_b"]) for r in near_rows if r["cross_split"]]
    for a, b in pairs:
        if patient_of.get(a) == patient_of.get(b) and patient_of.get(a) in leaking:
            evidence.add(patient_of[a])
    rows_out, listed = [], []
    split_pairs = {}
    for g in sorted(leaking):
        splits, rows = leaking[g]
        key = "-".join(splits)
        split_pairs[key] = split_pairs.get(key, 0) + 1
        listed.append({"patient": g, "splits": splits,
                       "images": {s: sum(images["split"][k] == s for k in rows) for s in splits},
                       "pixel_evidence": g in evidence})
        for k in sorted(rows, key=lambda k: (SPLIT_ORDER.index(images["split"][k]),
                                             images["id"][k])):
            rows_out.append({"patient": g, "splits": ";".join(splits), "split": images["split"][k],
                             "id": images["id"][k], "label": images["label"][k]})
    summary = {
        "pattern": pattern,
        "n_images_matched": n_matched,
        "n_patients": len(by_patient),
        "n_across_splits": len(leaking),
        "n_images_across_splits": sum(len(r) for _, r in leaking.values()),
        "across_split_pairs": split_pairs,
        "n_with_pixel_evidence": len(evidence),
        "note": "patient ids are parsed from file names; if a split numbers its patients "
                "independently, equal ids may be different people. pixel_evidence marks "
                "patients with an exact or near duplicate across splits.",
        "patients": listed,
    }
    return summary, rows_out


# --------------------------------------------------------------------------- 4. label noise

def find_label_noise(features: cache_io.FeatureSet, *, C: float, n_folds: int = 5,
                     seed: int = 0):
    """Train images whose given label the out-of-fold probe doubts (confident learning).

    Out-of-fold probabilities come from ``LogisticHead(C=C)`` (C chosen once on val).
    Per class j, the threshold t_j is the mean probability of j over the images labelled j
    (its average self-confidence). An image labelled y is a candidate when p_y < t_y and some
    other class k has p_k >= t_k; its predicted label is the most probable such k. Candidates
    are ranked by p_y, lowest first.

    Returns ``(summary for the record, CSV rows)``.
    """
    tr = features["train"]
    names = features.class_names
    y = tr.labels
    proba, folds = out_of_fold_proba(tr.features, y, C=C, n_folds=n_folds, seed=seed)
    if proba is None:
        return {"skipped": f"too few train images per class for {n_folds}-fold "
                           "cross-validation"}, []
    n, k = proba.shape
    p_given = proba[np.arange(n), y]
    has = np.bincount(y, minlength=k) > 0
    thresholds = np.array([proba[y == j, j].mean() if has[j] else 1.0 for j in range(k)])
    other = proba >= thresholds
    other[np.arange(n), y] = False
    flagged = (p_given < thresholds[y]) & other.any(axis=1)
    predicted = np.where(other, proba, -np.inf).argmax(axis=1)
    order = [r for r in np.lexsort((np.array(tr.ids, dtype=object).astype(str), p_given))
             if flagged[r]]
    rows = [{"rank": rank, "id": tr.ids[r], "given_label": names[y[r]],
             "p_given": round(float(p_given[r]), 6), "predicted_label": names[predicted[r]],
             "p_predicted": round(float(proba[r, predicted[r]]), 6)}
            for rank, r in enumerate(order, 1)]
    oof = compute_metrics(y, proba, threshold=0.5)
    summary = {
        "method": f"out-of-fold probabilities ({folds} stratified folds) of LogisticHead with "
                  "C chosen once on val; flagged when p(given) < the given class's average "
                  "self-confidence and another class's probability reaches its own",
        "C": float(C),
        "folds": folds,
        "thresholds": {names[j]: float(thresholds[j]) for j in range(k)},
        "out_of_fold": {m: oof[m] for m in ("accuracy", "balanced_accuracy", "roc_auc")},
        "n_train": int(n),
        "n_flagged": len(rows),
        "fraction_flagged": len(rows) / n,
        "flagged_per_class": {names[j]: int((flagged & (y == j)).sum()) for j in range(k)},
        "top": rows[:TOP_LABEL_NOISE],
    }
    return summary, rows


# --------------------------------------------------------------------------- 5. overfitting

def overfitting_gaps(probe_record: dict, runs: Sequence = (), *, fingerprint: str = "",
                     out_dir: Optional[Path] = None) -> dict:
    """Train, val and test metrics of the logistic probe and of each run; gaps; a reading."""
    entries = [("logistic probe (fit_head)", probe_record, None)]
    for run in runs:
        result = load_result(run)
        name = Path(run).name if Path(run).is_dir() else Path(run).parent.name
        entries.append((name, result.record, run))
    out = {"metrics": list(GAP_METRICS), "runs": []}
    for name, rec, run in entries:
        metrics = rec.get("metrics", {})
        table = {s: {m: metrics[s].get(m) for m in GAP_METRICS} for s in SPLIT_ORDER
                 if s in metrics}
        gaps = {}
        for a, b in (("train", "val"), ("val", "test")):
            if a in table and b in table:
                gaps[f"{a}-{b}"] = {m: _diff(table[a][m], table[b][m]) for m in GAP_METRICS}
        entry = {"name": name, "model": rec.get("model"), "mode": rec.get("mode"),
                 "head": rec.get("head"), "run_dir": str(run) if run else None,
                 "metrics": table, "gaps": gaps,
                 "threshold": (rec.get("threshold") or {}).get("value"),
                 "test_ci": rec.get("ci", {}).get("test", {}),
                 "same_data": rec.get("dataset", {}).get("fingerprint") == fingerprint}
        if run is not None and not entry["same_data"]:
            logger.warning("run %s was made on other data than this analysis; its gaps are "
                           "shown but not comparable", run)
        entry["interpretation"] = _gap_meaning(entry)
        history = rec.get("history") or []
        if out_dir is not None and history and all(
                f"{p}_{m}" in history[0] for p in ("train", "val") for m in ("accuracy", "loss")):
            png = f"curves_{_safe(name)}.png"
            report.plot_training_curves(history, out_dir / png, title=name,
                                        best_epoch=(rec.get("selection") or {}).get("best_epoch"))
            entry["curves_png"] = png
        out["runs"].append(entry)
    return out


def _diff(a, b):
    return None if a is None or b is None or _nan(a) or _nan(b) else float(a) - float(b)


def _gap_meaning(entry: dict) -> str:
    parts = []
    tv = entry["gaps"].get("train-val", {}).get("accuracy")
    vt = entry["gaps"].get("val-test", {}).get("accuracy")
    if tv is not None:
        if tv > GAP_FLAG:
            parts.append(f"train accuracy exceeds val by {100 * tv:.1f} points: it fits the "
                         "training images better than new ones (overfitting)")
        elif tv < -GAP_FLAG:
            parts.append(f"val accuracy exceeds train by {100 * -tv:.1f} points: no "
                         "overfitting, but val is small or easier than train (train may hold "
                         "the hard or mislabelled images; see label noise)")
        else:
            parts.append(f"train and val accuracy agree within {100 * abs(tv):.1f} points: no "
                         "sign of overfitting to the training images")
    if vt is not None:
        ci = entry["test_ci"].get("accuracy")
        val_acc = entry["metrics"]["val"]["accuracy"]
        outside = ci is not None and not any(_nan(c) for c in ci) and not ci[0] <= val_acc <= ci[1]
        if vt > GAP_FLAG:
            parts.append(f"val overstates test accuracy by {100 * vt:.1f} points"
                         + (" (val is outside the test 95% CI, so not noise)" if outside else "")
                         + ": val shares train's distribution, test does not (see shift)")
        elif vt < -GAP_FLAG:
            parts.append(f"test accuracy exceeds val by {100 * -vt:.1f} points"
                         + (" (outside the test 95% CI)" if outside else ""))
        else:
            parts.append(f"val predicts test accuracy within {100 * abs(vt):.1f} points")
    th = entry.get("threshold")
    if th is not None and not 0.02 < th < 0.98:
        parts.append(f"caution: the threshold chosen on val is extreme ({th:.3f}; val is "
                     "probably separated perfectly), so accuracies at it are unstable; compare "
                     "roc_auc and log_loss")
    return "; ".join(parts) + "." if parts else "not enough splits to compare."


# --------------------------------------------------------------------------- 6. calibration

def calibration_report(probe) -> dict:
    """Reliability curves and ECE of the probe on val and test; threshold vs 0.5 on test.

    ECE is ``compute_metrics``'s (top-label, 15 bins), as everywhere in xfeat. For binary
    problems the diagram plots the positive-class probability against the observed rate.
    """
    rec = probe.record
    splits = [s for s in ("val", "test") if s in probe.predictions]
    curves = {s: reliability_curve(probe.predictions[s][1], probe.predictions[s][2])
              for s in splits}
    binary = len(rec["dataset"]["class_names"]) == 2
    out = {
        "x": (f"predicted probability of {rec['dataset']['class_names'][1]}" if binary
              else "top-label confidence"),
        "ece": {s: rec["metrics"][s]["ece"] for s in splits},
        "brier": {s: rec["metrics"][s]["brier"] for s in splits},
        "curves": curves,
        "threshold": None,
    }
    if binary and "test" in rec["metrics"]:
        keys = ("accuracy", "balanced_accuracy", "sensitivity", "specificity")
        chosen = {k: rec["metrics"]["test"][k] for k in keys}
        half = {k: rec["metrics_at_0.5"]["test"][k] for k in keys}
        out["threshold"] = {"rule": rec["threshold"]["rule"], "value": rec["threshold"]["value"],
                            "chosen_on": "val", "test_at_chosen": chosen, "test_at_0.5": half,
                            "difference": {k: _diff(chosen[k], half[k]) for k in keys}}
    return out


# --------------------------------------------------------------------------- headlines, report

def headlines(record: dict) -> list:
    """The findings worth reading first, one sentence each, most consequential first."""
    lines = []
    d = record["duplicates"]
    ex = d["exact"]
    if ex["n_groups"]:
        text = (f"{_count(ex['n_groups'], 'group')} of pixel-identical images "
                f"({ex['n_images_in_groups']} images), "
                f"{ex['n_groups_across_splits']} across splits")
        if ex["across_split_pairs"]:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in ex["across_split_pairs"].items()) + ")"
        if ex["n_groups_label_conflict"]:
            text += f"; {ex['n_groups_label_conflict']} with conflicting labels"
        lines.append(text)
    else:
        lines.append(f"no pixel-identical images among {ex['n_images_hashed']}")
    near = d["near"]
    if near["n_pairs"]:
        more = "+" if near["truncated"] else ""
        lines.append(f"{_count(near['n_pairs'], 'near-duplicate pair')}{more} "
                     f"(cosine >= {near['threshold']}, not pixel-identical), "
                     f"{near['n_pairs_across_splits']}{more} across splits")
    pat = d["patients"]
    if pat.get("n_across_splits"):
        lines.append(f"{_count(pat['n_across_splits'], 'patient id')} in more than one split "
                     f"({', '.join(f'{k}: {v}' for k, v in pat['across_split_pairs'].items())}; "
                     f"{pat['n_with_pixel_evidence']} confirmed by duplicate pixels or embeddings)")
    s = record["shift"]
    if "auc" in s:
        ci = f" [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]" if s.get("ci") else ""
        per = ", ".join(f"{n} {v['auc']:.2f}" for n, v in s["per_class"].items() if "auc" in v)
        lines.append(f"train/test shift AUC {s['auc']:.2f}{ci}: {s['meaning']}"
                     + (f" (within class: {per})" if per else ""))
    ps = record["class_balance"].get("prior_shift")
    if ps and "train_positive" in ps:
        lines.append(f"class priors: train {ps['train_positive']:.1%} {ps['positive_class']} vs "
                     f"test {ps['test_positive']:.1%}; majority-class baseline accuracy on test "
                     f"{record['class_balance']['majority_baseline']['test']['accuracy']:.3f}")
    elif ps:
        lines.append(f"class priors: train vs test total variation {ps['total_variation']:.3f}")
    ln = record["label_noise"]
    if "n_flagged" in ln:
        lines.append(f"{_count(ln['n_flagged'], 'train image')} ({ln['fraction_flagged']:.1%}) "
                     "flagged as possible label errors (out-of-fold probe accuracy "
                     f"{ln['out_of_fold']['accuracy']:.3f})")
    probe = record["overfitting"]["runs"][0]
    m = probe["metrics"]
    if {"train", "val", "test"} <= set(m):
        lines.append(f"logistic probe accuracy train {m['train']['accuracy']:.3f}, val "
                     f"{m['val']['accuracy']:.3f}, test {m['test']['accuracy']:.3f}: "
                     f"{probe['interpretation']}")
    cal = record["calibration"]
    if cal["ece"]:
        text = "probe ECE " + ", ".join(f"{k} {v:.3f}" for k, v in cal["ece"].items())
        th = cal["threshold"]
        if th:
            text += (f"; threshold {th['value']:.2f} chosen on val vs 0.5 on test: balanced "
                     f"accuracy {th['test_at_chosen']['balanced_accuracy']:.3f} vs "
                     f"{th['test_at_0.5']['balanced_accuracy']:.3f}")
        lines.append(text)
    return lines


def render_markdown(record: dict) -> str:
    """``analysis.md``: the headlines, then one section per analysis, figures inline."""
    r = record
    names = r["dataset"]["class_names"]
    out = [f"# Data analysis: {r['dataset']['name']}", "",
           f"Features: `{r['model']}` ({r['weights']['id']}), cache `{r['cache']['key'][:16]}`. "
           f"Source: `{r['dataset']['source']}`. Made {r['created']} in "
           f"{r['timing']['total_seconds']:.1f} s.", "", "## Headlines", ""]
    out += [f"- {h}" for h in r["headlines"]] + [""]

    cb = r["class_balance"]
    out += ["## 1. Class balance", ""]
    out += _md_table(["split", *names, "total"],
                     [[s, *[f"{cb['counts'][s][n]} ({f:.1%})" for n, f in
                            zip(names, cb["fractions"][s])], cb["counts"][s]["total"]]
                      for s in cb["counts"]])
    out += ["", f"Majority class in train: **{cb['majority_class']}**. Predicting it for every "
            "image scores: " + "; ".join(f"{s} accuracy {v['accuracy']:.3f}, balanced accuracy "
                                       f"{v['balanced_accuracy']:.3f}"
                                       for s, v in cb["majority_baseline"].items()) + ".", ""]
    if cb["prior_shift"]:
        out += [f"Prior shift: {cb['prior_shift']['meaning']}", ""]
    out += ["![class fractions per split](class_balance.png)", ""]

    s = r["shift"]
    out += ["## 2. Train/test shift", ""]
    if "auc" in s:
        out += [f"A domain classifier ({s['method']}) tells train from test with AUC "
                f"**{s['auc']:.3f}** (95% CI {_fmt_ci(s.get('ci'))})"
                + f": {s['meaning']}. 0.5 means no detectable shift.", ""]
        rows = [[n, f"{v['auc']:.3f}", _fmt_ci(v.get("ci")), v["n_train_used"], v["n_test"]]
                if "auc" in v else [n, "-", v.get("skipped", ""), "", ""]
                for n, v in s["per_class"].items()]
        out += _md_table(["class", "AUC", "95% CI", "train used", "test"], rows)
        out += ["", "Within one class the class mix cannot drive the AUC: shift that remains "
                "there comes from acquisition (devices, sites, preprocessing), not labels.", ""]
        if "shift_projection_png" in r["files"]:
            out += ["![PCA projection: colour = split, marker = class](shift_projection.png)", ""]
    else:
        out += [f"Not measured: {s.get('skipped', 'no test split')}.", ""]

    d = r["duplicates"]
    ex, near, pat = d["exact"], d["near"], d["patients"]
    out += ["## 3. Duplicates and leakage", "", "### Pixel-identical images", "",
            f"{ex['n_images_hashed']} images hashed ({ex['method']}): **{ex['n_groups']} "
            f"groups** ({ex['n_images_in_groups']} images), {ex['n_groups_across_splits']} "
            f"across splits, {ex['n_groups_label_conflict']} with conflicting labels. "
            "All in `duplicates_exact.csv`.", ""]
    if ex["unreadable"]:
        out += [f"Unreadable, not hashed: {', '.join(ex['unreadable'][:10])}", ""]
    if ex["groups"]:
        out += _md_table(["group", "splits", "labels", "images"],
                         [[g["group"], ", ".join(g["splits"]), ", ".join(g["labels"]),
                           "<br>".join(f"{m['split']}: `{m['id']}`" for m in g["members"])]
                          for g in ex["groups"][:40]])
        out += [""] + ([f"... and {len(ex['groups']) - 40} more groups.", ""]
                       if len(ex["groups"]) > 40 else [])
    out += ["### Near duplicates", "",
            f"{near['method']}, at or above {near['threshold']}: **{near['n_pairs']} pairs**, "
            f"{near['n_pairs_across_splits']} across splits"
            + (f" (the {near['n_listed']} most similar are listed)" if near["truncated"] else "")
            + ". All in `duplicates_near.csv`.", ""]
    if near["top"]:
        out += _md_table(["similarity", "a", "b", "cross split"],
                         [[f"{p['similarity']:.4f}", f"{p['split_a']}: `{p['id_a']}`",
                           f"{p['split_b']}: `{p['id_b']}`", "yes" if p["cross_split"] else ""]
                          for p in near["top"][:20]])
        out += [""]
    out += ["### Patients in more than one split", ""]
    if pat.get("pattern"):
        out += [f"Patient ids from file names (pattern `{pat['pattern']}`, matched "
                f"{pat['n_images_matched']} images, {pat['n_patients']} patients): "
                f"**{_count(pat['n_across_splits'], 'patient')}** "
                f"({pat['n_images_across_splits']} images) "
                f"in more than one split; {pat['n_with_pixel_evidence']} of them have a duplicate "
                f"image across splits. {pat['note']} All in `patients_across_splits.csv`.", ""]
        if pat["patients"]:
            out += _md_table(["patient", "splits", "images", "pixel evidence"],
                             [[p["patient"], ", ".join(p["splits"]),
                               ", ".join(f"{k} {v}" for k, v in p["images"].items()),
                               "yes" if p["pixel_evidence"] else ""]
                              for p in pat["patients"][:30]])
            out += [""] + ([f"... and {len(pat['patients']) - 30} more.", ""]
                           if len(pat["patients"]) > 30 else [])
    else:
        out += [f"Not checked: {pat.get('skipped')}.", ""]

    ln = r["label_noise"]
    out += ["## 4. Label-noise candidates", ""]
    if "n_flagged" in ln:
        out += [f"Method: {ln['method']} (C = {ln['C']:.3g}; thresholds "
                + ", ".join(f"{k} {v:.3f}" for k, v in ln["thresholds"].items())
                + f"). Out-of-fold accuracy {ln['out_of_fold']['accuracy']:.3f}, balanced "
                f"{ln['out_of_fold']['balanced_accuracy']:.3f}: the weaker the probe, the more "
                "candidates are its own mistakes.", "",
                f"**{ln['n_flagged']} of {ln['n_train']}** train images flagged "
                f"({ln['fraction_flagged']:.1%}; "
                + ", ".join(f"{k} {v}" for k, v in ln["flagged_per_class"].items())
                + "). All in `label_noise_candidates.csv`; to review by eye, not to drop blindly.",
                ""]
        if ln["top"]:
            out += _md_table(["rank", "image", "given", "p(given)", "predicted", "p(predicted)"],
                             [[c["rank"], f"`{c['id']}`", c["given_label"], f"{c['p_given']:.3f}",
                               c["predicted_label"], f"{c['p_predicted']:.3f}"]
                              for c in ln["top"]])
            out += [""]
    else:
        out += [f"Not measured: {ln.get('skipped')}.", ""]

    of = r["overfitting"]
    out += ["## 5. Overfitting and generalisation gaps", "",
            "Metrics at each run's threshold chosen on val (so val is slightly optimistic); "
            "log_loss: lower is better, the others: higher is better. Gaps are differences "
            "(train - val, val - test).", ""]
    for run in of["runs"]:
        title = f"**{run['name']}** ({run['model']}, {run['mode']}, head {run['head']})"
        if not run["same_data"] and run["run_dir"]:
            title += " — made on other data, not comparable"
        out += [title, ""]
        cols = list(run["metrics"]) + list(run["gaps"])
        rows = [[m, *[_fmt(run["metrics"][s][m]) for s in run["metrics"]],
                 *[_fmt(run["gaps"][g][m], signed=True) for g in run["gaps"]]]
                for m in of["metrics"]]
        out += _md_table(["metric", *cols], rows)
        out += ["", run["interpretation"], ""]
        if run.get("curves_png"):
            out += [f"![training curves of {run['name']}]({run['curves_png']})", ""]

    cal = r["calibration"]
    out += ["## 6. Calibration and operating point", "",
            "ECE: top-label expected calibration error, 15 bins (as in results.json). "
            + ", ".join(f"{s} {v:.3f}" for s, v in cal["ece"].items())
            + "; Brier " + ", ".join(f"{s} {v:.3f}" for s, v in cal["brier"].items()) + ".", "",
            "![reliability diagram of the logistic probe](reliability.png)", ""]
    th = cal["threshold"]
    if th:
        out += [f"Threshold {th['value']:.3f} ({th['rule']}, chosen on val) vs 0.5, on test:", ""]
        out += _md_table(["metric", f"at {th['value']:.3f}", "at 0.5", "difference"],
                         [[k, _fmt(th["test_at_chosen"][k]), _fmt(th["test_at_0.5"][k]),
                           _fmt(th["difference"][k], signed=True)] for k in th["test_at_chosen"]])
        out += [""]
    out += ["## Timing", "", ", ".join(f"{k.replace('_seconds', '')} {v:.1f} s"
                                       for k, v in r["timing"].items()), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- helpers

def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _splits(features: cache_io.FeatureSet) -> list:
    return [s for s in SPLIT_ORDER if s in features.splits]


def _md_table(header: list, rows: list) -> list:
    def cell(v):
        return str(v).replace("|", "\\|")
    return (["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _fmt(v, signed: bool = False) -> str:
    if v is None or _nan(v):
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _fmt_ci(ci) -> str:
    return f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and not any(c is None or _nan(c) for c in ci) else "-"


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _jsonable(obj):
    """Plain JSON types; NaN and infinities become None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _write_csv(path: Path, rows: list, columns: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
