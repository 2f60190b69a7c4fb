"""The logistic probes of the analysis: the one fitted (or reused) on the cache, out-of-fold ones.

The main probe is ``fit_head``'s logistic head (C and threshold chosen on val); its record and
predictions feed the gaps, label-noise and calibration sections. A probe already fitted on the
same cache (by ``fit_head`` or ``compare``) is reused rather than fitted again. Out-of-fold
probabilities of :class:`~xfeat.heads.LogisticHead` serve the shift and label-noise sections.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from xfeat.errors import ConfigError
from xfeat.fitting import fit_head
from xfeat.heads import LogisticHead, load_head
from xfeat.runs.results import RunResult, load_result

logger = logging.getLogger(__name__)


def fit_or_reuse_probe(features, probe=None, *, n_boot: int = 1000, seed: int = 0) -> RunResult:
    """``probe`` checked against ``features``, or a logistic probe fitted on them.

    ``probe`` is a :class:`~xfeat.runs.results.RunResult` of ``fit_head(head="logreg")`` or its
    run folder (``results.json``; predictions are recomputed from ``head.npz`` where it is
    there, else read from ``predictions.npz``). It must have been fitted on this very cache
    (same key); anything else is a :class:`~xfeat.errors.ConfigError`.
    """
    if probe is None:
        return fit_head(cache=features, save=False, n_boot=n_boot, seed=seed)
    if isinstance(probe, (str, Path)):
        probe = _load_probe(Path(probe), features)
    elif not isinstance(probe, RunResult):
        raise ConfigError(
            f"probe={type(probe).__name__}; expected a RunResult of fit_head, a "
            "run folder, or None to fit one"
        )
    _check_probe(probe, features)
    return probe


def _load_probe(run_dir: Path, features) -> RunResult:
    try:
        result = load_result(run_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"probe={str(run_dir)!r}: {exc}; expected a fit_head run folder") from None
    head_path = (run_dir if run_dir.is_dir() else run_dir.parent) / "head.npz"
    if head_path.is_file():
        head, meta = load_head(head_path)
        if meta.get("cache_key") == features.key:  # else _check_probe says why not
            result.predictions = {
                s: (sp.ids, sp.labels, head.predict_proba(sp.features))
                for s, sp in features.splits.items()
            }
            result.head = head
    return result


def _check_probe(probe: RunResult, features) -> None:
    rec = probe.record
    where = rec.run_dir or "the given run"
    if (rec.mode, rec.head) != ("cached", "logreg"):
        raise ConfigError(
            f"probe= {where} is a {rec.mode} {rec.head} run; analyze "
            "reuses only a logistic probe on the cache (fit_head with "
            "head='logreg'), or pass probe=None to fit one"
        )
    params = rec.params
    changed = [
        name
        for name, value in (
            ("adapt", params.get("adapt")),
            ("tta", params.get("tta")),
            ("train views", params.get("train_views")),
        )
        if value
    ]
    if rec.transductive or changed:
        raise ConfigError(
            f"probe= {where} used {', '.join(changed) or 'adaptation'}: analyze "
            "diagnoses the plain probe on the centre crops; pass a fit-head run "
            "without those options, or probe=None to fit one"
        )
    key = (rec.cache.key if rec.cache is not None else None) or ""
    if key != features.key:
        raise ConfigError(
            f"probe= {where} was fitted on cache {key[:16] or '(none)'}, but this "
            f"analysis reads cache {features.key[:16]} ({features.path}); pass a "
            "probe fitted on this cache, or probe=None to fit one"
        )
    for split, sp in features.splits.items():
        pred = probe.predictions.get(split)
        if pred is None or list(pred[0]) != list(sp.ids):
            raise ConfigError(
                f"probe= {where} has no predictions for the {len(sp)} {split} "
                f"images of cache {features.key[:16]}; save it with its "
                "predictions.npz or head.npz, or pass probe=None to fit one"
            )


def out_of_fold_proba(X: np.ndarray, y: np.ndarray, *, C: float, n_folds: int = 5, seed: int = 0):
    """Stratified out-of-fold probabilities of ``LogisticHead(C=C)``: ``(proba, folds)``.

    ``folds`` is ``min(n_folds, smallest class count)``; ``(None, 0)`` if that is below 2.
    """
    y = np.asarray(y)
    counts = np.bincount(y)
    present = counts[counts > 0]
    folds = int(min(n_folds, present.min())) if len(present) >= 2 else 0
    if folds < 2:
        return None, 0
    if folds < n_folds:
        logger.warning("only %d folds: the smallest class has %d images", folds, present.min())
    return _oof_proba(X, y, C, folds, seed), folds


def _oof_proba(X: np.ndarray, y: np.ndarray, C: float, n_folds: int, seed: int) -> np.ndarray:
    return cross_val_predict(
        LogisticHead(C=C),
        X,
        y,
        method="predict_proba",
        cv=StratifiedKFold(n_folds, shuffle=True, random_state=seed),
    )
