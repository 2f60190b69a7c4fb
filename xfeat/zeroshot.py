"""``zero_shot``: classify the cached image embeddings by their similarity to class prompts.

Protocol: no label is used to make the classifier. Each class's prompts are embedded by the
model's text tower, L2-normalised and averaged (CLIP's prompt ensemble), and an image's class
probabilities are ``softmax(logit_scale * cos(image, class))``. With two classes the default
threshold is 0.5 on them (the most similar class), fixed, so val labels are not used either;
``threshold="youden"`` chooses it on val instead (and says so). The run is recorded like a
head's (``results.json``, mode ``zero-shot``), so ``compare`` and reports treat it alike.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np

from xfeat.cache import WeightsRecord
from xfeat.config import parse_threshold_rule
from xfeat.errors import ConfigError
from xfeat.evaluation.metrics import evaluate_splits
from xfeat.extraction.features import load_features
from xfeat.runs.folders import check_writable, default_run_dir, run_lock
from xfeat.runs.results import CacheUse, RunDataset, RunRecord, RunResult, RunThreshold

logger = logging.getLogger(__name__)

MODE = "zero-shot"
FIXED_THRESHOLD = "0.5"


def parse_prompts(prompts) -> dict:
    """``["CLASS=text", ...]`` or ``{class: text or [texts]}`` -> ``{class: [texts]}``."""
    if isinstance(prompts, dict):
        items = [
            (k, v)
            for k, values in prompts.items()
            for v in ([values] if isinstance(values, str) else values)
        ]
    else:
        items = []
        for p in prompts or ():
            name, sep, text = str(p).partition("=")
            if not sep or not name.strip() or not text.strip():
                raise ConfigError(
                    f"--prompts {p!r}: expected CLASS=text, e.g. 'NORMAL=a chest x-ray with no findings'"
                )
            items.append((name.strip(), text.strip()))
    out = {}
    for name, text in items:
        out.setdefault(name, []).append(text)
    if not out:
        raise ConfigError("zero-shot needs prompts: --prompts 'CLASS=text' for every class")
    return out


def refuse_multilabel() -> None:
    """Zero-shot prompts score one class per image (a softmax over the prompts)."""
    raise ConfigError(
        "zero-shot scores one class per image (a softmax over the class prompts); these data "
        "are multi-label: fit a linear probe (xfeat fit-head) instead, or drop --prompts"
    )


def zero_shot(
    data=None,
    model: str = "open_clip:ViT-B-32:openai",
    *,
    prompts,
    weights="DEFAULT",
    cache=None,
    threshold: Union[str, float, None] = None,
    out_dir: Union[str, Path, None] = None,
    n_boot: int = 1000,
    seed: int = 0,
    extract_options: Optional[dict] = None,
    save: bool = True,
) -> RunResult:
    """Zero-shot classification of every split with ``prompts``; results like ``fit_head``'s.

    Parameters
    ----------
    data, model, weights : what to extract (the cache is built or reused); or give ``cache``.
        ``model`` needs a text tower: ``open_clip:...`` or a CLIP/SigLIP ``hf:`` checkpoint.
    prompts : ``{"NORMAL": "a chest x-ray with no findings", ...}`` (a list of texts per class
        is averaged) or ``["NORMAL=...", "PNEUMONIA=..."]``; every class needs one.
    threshold : two classes: 0.5 (None: fixed, no labels used) or a rule chosen on val.
    out_dir : where results.json and predictions.npz go
        (default ``runs/DATASET/MODEL-WEIGHTS/zero-shot``).
    """
    from xfeat.backbones import check_text_tower, text_tower

    t_start = time.perf_counter()
    by_class = parse_prompts(prompts)
    if data is not None and not isinstance(data, (str, Path)) and getattr(data, "multilabel", False):
        refuse_multilabel()  # before any extraction
    threshold = FIXED_THRESHOLD if threshold is None else threshold
    parse_threshold_rule(threshold)
    check_writable(out_dir)
    if cache is None:
        check_text_tower(model)  # from its name and configuration, before any extraction
    loaded = load_features(
        data, model, weights=weights, cache=cache, extract_options=extract_options, command="zero_shot"
    )
    features = loaded.features
    if features.multilabel:
        refuse_multilabel()
    meta = features.meta
    classes = list(features.class_names)
    missing, unknown = (
        [c for c in classes if c not in by_class],
        [c for c in by_class if c not in classes],
    )
    if missing or unknown:
        raise ConfigError(
            f"--prompts name {sorted(by_class)} but the data's classes are {classes}"
            + (f"; give a prompt for {missing}" if missing else "")
            + (f"; no class {unknown}" if unknown else "")
        )
    if "+" in meta.model or [b for b, _ in features.blocks] != ["penultimate"]:
        raise ConfigError(
            "zero-shot uses one model's image embedding: extract it with --layers penultimate"
        )
    t0 = time.perf_counter()
    encode, logit_scale = text_tower(meta.model, _weights_arg(meta.weights), seed=meta.weights.seed or 0)
    text = np.stack([_unit(_unit(encode(by_class[c]).float().numpy()).mean(0)) for c in classes])
    probas = {
        s: _softmax(logit_scale * _unit(sp.features.astype(np.float64)) @ text.T)
        for s, sp in features.splits.items()
    }
    labels = {s: sp.labels for s, sp in features.splits.items()}
    encode_seconds = time.perf_counter() - t0
    t_eval = time.perf_counter()
    evaluation = evaluate_splits(labels, probas, threshold=threshold, n_boot=n_boot, seed=seed)
    evaluation["threshold"]["chosen_on"] = "fixed (no labels)" if threshold == FIXED_THRESHOLD else "val"
    extract_seconds = sum(s.get("seconds_total") or 0 for s in meta.splits.values())
    eval_seconds = time.perf_counter() - t_eval
    record = RunRecord(
        model=meta.model,
        weights=WeightsRecord(meta.weights.kind, meta.weights.id, meta.weights.sha256),
        mode=MODE,
        head="prompts",
        dataset=RunDataset(
            meta.dataset.name,
            meta.dataset.source,
            meta.dataset.fingerprint,
            tuple(classes),
            meta.dataset.counts,
        ),
        threshold=RunThreshold(**evaluation["threshold"]),
        selection={"prompts": by_class, "logit_scale": logit_scale, "training_labels_used": False},
        metrics=evaluation["metrics"],
        metrics_at_half=evaluation["metrics_at_0.5"],
        ci=evaluation["ci"],
        timing={
            "extract_seconds": extract_seconds,
            "fit_seconds": encode_seconds,  # the prompts embedded: zero-shot's only "fit"
            "evaluate_seconds": eval_seconds,
            "total_seconds": extract_seconds + encode_seconds + eval_seconds,
            "wall_seconds": time.perf_counter() - t_start,
        },
        cache=CacheUse(
            path=str(features.path), key=features.key, hit=loaded.cache_hit, feature_dim=text.shape[1]
        ),
        history=[],
        params={"prompts": by_class, "threshold": threshold, "n_boot": n_boot, "seed": seed},
        skipped=features.skipped,
    )
    record.notes.append(
        "zero-shot: no training labels used; classes scored by similarity to their prompts"
    )
    result = RunResult(record, {s: (sp.ids, labels[s], probas[s]) for s, sp in features.splits.items()})
    if save:
        run_dir = (
            Path(out_dir)
            if out_dir
            else default_run_dir(meta.dataset.name, meta.model, meta.weights.to_dict(), MODE)
        )
        with run_lock(run_dir, "zero-shot run"):
            result.save(run_dir)
        logger.info("saved %s", run_dir)
    return result


def _weights_arg(weights) -> str:
    """The ``--weights`` value that rebuilds the cache's weights."""
    if weights.kind == "random":
        return "none"
    if weights.kind == "file":
        return weights.id
    return "DEFAULT"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
