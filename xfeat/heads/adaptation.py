"""Unsupervised site adaptation: *transductive* uses of the target images, never their labels.

The target is the test split's images in ``fit-head``/``finetune`` and the batch of new
images in ``predict``. Every result that uses one is labelled transductive.

- ``standardize``: target features standardised with the target's own mean and std, then
  mapped to the source's (feature-level AdaBN).
- ``coral``: CORAL (Sun et al., AAAI 2016): target features whitened with their own
  covariance and re-coloured with the source's, in standardised space, ``+ I`` on both.
- ``em``: prior shift (Saerens et al., 2002) after bias-corrected temperature scaling fitted
  on val (Alexandari et al., ICML 2020); reports the estimated target prior, and warns when
  the images themselves shifted (EM assumes they did not).
- ``adabn`` (fine-tuned networks, :mod:`xfeat.finetuning`): BatchNorm statistics re-estimated
  on the target images.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from xfeat.config import FIT_ADAPTATIONS
from xfeat.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FEATURE_METHODS = ("standardize", "coral")
METHODS = FIT_ADAPTATIONS
MIN_TARGET_IMAGES = 20  # fewer cannot estimate a mean and spread per feature
EM_SHIFT_WARNING_AUC = 0.6  # within-class train/target separability above which EM is unsafe


def check_method(method: Optional[str], allowed=METHODS) -> Optional[str]:
    if method in (None, "", "none"):
        return None
    if method not in allowed:
        raise ConfigError(
            f"--adapt {method!r}: expected one of {', '.join(allowed)} (all "
            "transductive: they use the unlabelled target images)"
        )
    return method


def _check_target(X: np.ndarray, what: str) -> None:
    if len(X) < MIN_TARGET_IMAGES:
        raise DataError(
            f"--adapt needs at least {MIN_TARGET_IMAGES} target images to estimate "
            f"their statistics; {what} has {len(X)}"
        )


def standardize(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Target features with the source's per-feature mean and std (feature-level AdaBN)."""
    return standardize_to(target, source.mean(0), source.std(0))


def standardize_to(target: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Target features standardised with their own statistics, then given ``mean``/``std``."""
    _check_target(target, "the target")
    mu_t, sd_t = target.mean(0), target.std(0)
    sd_t = np.where(sd_t > 1e-12, sd_t, 1.0)
    return ((target - mu_t) / sd_t * np.asarray(std) + np.asarray(mean)).astype(np.float32)


def em_on_batch(proba: np.ndarray, calibration: dict) -> tuple:
    """EM on new images with the calibration and prior recorded when the head was fitted."""
    _check_target(proba, "the batch")
    calibrated = calibrator(calibration["temperature"], calibration["bias"])(proba)
    prior, adjusted, iterations = em_prior(calibrated, np.asarray(calibration["source_prior"]))
    return adjusted, {"target_prior": prior.tolist(), "iterations": iterations}


def coral(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """CORAL: target second-order statistics aligned to the source's."""
    _check_target(target, "the target")
    mu_s, sd_s = source.mean(0), source.std(0)
    sd_s = np.where(sd_s > 1e-12, sd_s, 1.0)
    zs = (source - mu_s) / sd_s
    zt = (target - target.mean(0)) / sd_s
    eye = np.eye(zs.shape[1])
    whiten = _matrix_power(np.cov(zt, rowvar=False) + eye, -0.5)
    colour = _matrix_power(np.cov(zs, rowvar=False) + eye, 0.5)
    return ((zt @ whiten @ colour) * sd_s + mu_s).astype(np.float32)


def _matrix_power(c: np.ndarray, p: float) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v * np.clip(w, 1e-12, None) ** p) @ v.T


def fit_bcts(logits: np.ndarray, y: np.ndarray) -> tuple:
    """Bias-corrected temperature scaling on val: ``(T, b)`` minimising the NLL of
    ``softmax(logits / T + b)`` (one temperature, one bias per class, the first fixed at 0)."""
    k = logits.shape[1]

    def nll(params):
        t, b = np.exp(params[0]), np.concatenate([[0.0], params[1:]])
        lp = log_softmax(logits / t + b, axis=1)
        return -lp[np.arange(len(y)), y].mean()

    # Bounded: on a perfectly separated val set the NLL keeps falling as T -> 0, which would
    # saturate every target probability and tie them.
    bounds = [(np.log(0.05), np.log(20.0))] + [(-10.0, 10.0)] * (k - 1)
    res = minimize(nll, np.zeros(k), method="L-BFGS-B", bounds=bounds)
    return float(np.exp(res.x[0])), np.concatenate([[0.0], res.x[1:]])


def em_prior(
    proba: np.ndarray, source_prior: np.ndarray, max_iter: int = 1000, tol: float = 1e-8
) -> tuple:
    """Saerens et al.'s EM: ``(target prior, adjusted probabilities, iterations)``."""
    prior, iterations = source_prior.copy(), 0
    while iterations < max_iter:
        iterations += 1
        w = proba * (prior / source_prior)
        new = (w / w.sum(1, keepdims=True)).mean(0)
        done = np.abs(new - prior).max() < tol
        prior = new
        if done:
            break
    w = proba * (prior / source_prior)
    return prior, w / w.sum(1, keepdims=True), iterations


def calibrator(temperature: float, bias) -> callable:
    """``proba -> softmax(log(proba) / T + b)``: the bias-corrected temperature scaling."""
    bias = np.asarray(bias)

    def calibrate(proba: np.ndarray) -> np.ndarray:
        return softmax(np.log(np.clip(proba, 1e-12, 1)) / temperature + bias, axis=1)

    return calibrate


def em_adapt(
    val_proba: np.ndarray, val_labels: np.ndarray, target_proba: np.ndarray, source_prior: np.ndarray
) -> tuple:
    """BCTS on val, then EM on the target: ``(calibrate, adjusted target proba, details)``.

    The decision threshold for the adjusted probabilities must be chosen on
    ``calibrate(val_proba)``: the space they live in.
    """
    _check_target(target_proba, "the target")
    t, b = fit_bcts(np.log(np.clip(val_proba, 1e-12, 1)), val_labels)
    calibrate = calibrator(t, b)
    prior, adjusted, iterations = em_prior(calibrate(target_proba), source_prior)
    return (
        calibrate,
        adjusted,
        {
            "temperature": t,
            "bias": b.tolist(),
            "iterations": iterations,
            "source_prior": source_prior.tolist(),
            "target_prior": prior.tolist(),
        },
    )


def within_class_shift(
    source: np.ndarray,
    source_labels: np.ndarray,
    target: np.ndarray,
    target_predicted: np.ndarray,
    seed: int = 0,
) -> dict:
    """Label-free check of EM's assumption: can a classifier tell source from target images
    within one (predicted, for the target) class? Cross-validated AUC per class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = {}
    rng = np.random.default_rng(seed)
    for c in np.unique(source_labels):
        s, t = source[source_labels == c], target[target_predicted == c]
        if len(t) < 10:
            continue
        s = s[rng.permutation(len(s))[: 3 * len(t)]]
        X, d = np.vstack([s, t]), np.r_[np.zeros(len(s)), np.ones(len(t))]
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        p = cross_val_predict(
            model, X, d, method="predict_proba", cv=StratifiedKFold(5, shuffle=True, random_state=seed)
        )[:, 1]
        out[int(c)] = float(roc_auc_score(d, p))
    return out


def shift_bars(source_labels: np.ndarray, target_predicted: np.ndarray) -> dict:
    """Per class, the within-class shift AUC that says "shifted": above
    ``EM_SHIFT_WARNING_AUC`` and beyond chance for the images compared: z null standard errors
    above 0.5 (Mann-Whitney: sqrt((m + n + 1) / (12 m n))), z one-sided at 0.05 Bonferroni-
    corrected over the classes tested (1.64 for one class, 2.58 for ten). About 40 test images
    of one class among ten cannot show an AUC of 0.61 to be more than chance."""
    from scipy.stats import norm

    classes = [int(c) for c in np.unique(source_labels) if (target_predicted == c).sum() >= 10]
    z = float(norm.isf(0.05 / max(1, len(classes))))
    bars = {}
    for c in classes:
        n = int((target_predicted == c).sum())
        m = min(int((source_labels == c).sum()), 3 * n)  # as within_class_shift subsamples
        if m:
            bars[c] = max(EM_SHIFT_WARNING_AUC, 0.5 + z * float(np.sqrt((m + n + 1) / (12 * m * n))))
    return bars


def shifted_classes(shift_auc: dict, bars: dict) -> list:
    """The classes whose within-class shift AUC clears its bar (see :func:`shift_bars`)."""
    return [c for c, auc in shift_auc.items() if auc > bars.get(c, EM_SHIFT_WARNING_AUC)]


def em_warning(shift_auc: dict, class_names: list, bars: Optional[dict] = None) -> Optional[str]:
    """A warning when the images shifted within a class (covariate shift): EM is unsafe."""
    bad = {class_names[c]: shift_auc[c] for c in shifted_classes(shift_auc, bars or {})}
    if not bad:
        return None
    return (
        "EM assumes only the class priors changed, but within class "
        + ", ".join(f"{k} (AUC {v:.2f})" for k, v in bad.items())
        + " the target images differ from the source ones: the shift is in the images "
        "(covariate), so EM's prior estimate is unreliable; prefer --adapt standardize"
    )
