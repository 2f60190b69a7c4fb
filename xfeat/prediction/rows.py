"""One row per predicted image, and the few summary lines a user must read.

A row holds the file's ``path``, a ``p_<class>`` probability per class, the ``predicted``
class, the ``threshold`` and ``rule`` that decided it, what was done to the image's geometry
(``geometry``), what of it falls outside the training profile (``input_check``), its
out-of-distribution percentile (``ood_score``) and flag (``ood``), and the ``error`` that
kept it from being predicted.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from xfeat.data.profile import check_inputs, match_geometry

logger = logging.getLogger(__name__)

AS_RECORDED = "as-recorded"


def columns(class_names, adapted: bool, multilabel: bool = False) -> list:
    """The CSV's columns, in order (multi-label: a ``p_`` and a ``pred_`` column per label)."""
    return [
        "path",
        *[f"p_{c}" for c in class_names],
        *([f"pred_{c}" for c in class_names] if multilabel else []),
        "predicted",
        "threshold",
        "rule",
        "geometry",
        "input_check",
        "ood_score",
        "ood",
        "error",
        *(["adaptation"] if adapted else []),
    ]


def decision(proba_row: np.ndarray, threshold: Optional[float]) -> int:
    """Class index: ``p(class 1) >= threshold`` for two classes with a threshold, else argmax."""
    if threshold is not None and len(proba_row) == 2:
        return int(proba_row[1] >= threshold)
    return int(np.argmax(proba_row))


def geometry_note(stats_row: np.ndarray, geometry: Optional[dict], mode: str) -> str:
    """What was done to the image before the recorded preprocessing."""
    if mode == AS_RECORDED or geometry is None or not np.isfinite(stats_row[:2]).all():
        return AS_RECORDED
    width, height = int(stats_row[0]), int(stats_row[1])
    target = match_geometry(width, height, geometry)
    if target is None:
        return AS_RECORDED
    why = "training size" if geometry["size"] else f"training aspect {geometry['aspect']:.2f}"
    return f"resized {width}x{height} to {target[0]}x{target[1]} ({why})"


def build_rows(
    files,
    proba: np.ndarray,
    errors: list,
    stats: np.ndarray,
    *,
    class_names,
    threshold: Optional[float],
    rule: str,
    profile: Optional[dict],
    geometry: Optional[dict],
    geometry_mode: str,
    ood: Optional[tuple],
    label_thresholds: Optional[list] = None,
) -> list:
    """The rows of :mod:`this module <xfeat.prediction.rows>`; ``ood`` is ``(scores, flags)``
    or None (no reference to score against). ``label_thresholds``: multi-label heads' per-label
    thresholds; each label then has a ``pred_<label>`` column (1 or 0) and ``predicted`` joins
    the positive labels with ``|`` (``none`` when there are none)."""
    rows = []
    for i, path in enumerate(files):
        row = {"path": str(path), **{f"p_{c}": float(proba[i, j]) for j, c in enumerate(class_names)}}
        if label_thresholds is not None:
            calls = [bool(proba[i, j] >= t) for j, t in enumerate(label_thresholds)]
            row.update({f"pred_{c}": "" if errors[i] else int(y) for c, y in zip(class_names, calls)})
        if errors[i]:
            row.update(
                predicted="",
                threshold="",
                rule="",
                geometry="",
                input_check="",
                ood_score="",
                ood="",
                error=errors[i],
            )
        else:
            issues = check_inputs(stats[i], profile)
            if label_thresholds is not None:
                predicted = "|".join(c for c, y in zip(class_names, calls) if y) or "none"
            else:
                predicted = class_names[decision(proba[i], threshold)]
            row.update(
                predicted=predicted,
                threshold="" if threshold is None or len(class_names) != 2 else float(threshold),
                rule=rule,
                geometry=geometry_note(stats[i], geometry, geometry_mode),
                input_check="; ".join(issues) if issues else ("ok" if profile else "no profile"),
                ood_score="" if ood is None else round(float(ood[0][i]), 1),
                ood="" if ood is None else bool(ood[1][i]),
                error="",
            )
        rows.append(row)
    return rows


def warn_summary(rows: list, stats: np.ndarray, *, profile, geometry_mode: str, has_ood: bool) -> None:
    """One warning line per finding that concerns several images: geometry changed, inputs
    outside the training profile, images unlike the training ones."""
    done = [r for r in rows if not r["error"]]
    n = len(rows)
    resized = [i for i, r in enumerate(rows) if r["geometry"].startswith("resized")]
    if resized:
        aspects = stats[resized, 0] / stats[resized, 1]
        logger.warning(
            "resized %d of %d images to the training geometry first (their aspect ratios "
            "%.2f-%.2f; the training images share one); --geometry as-recorded to keep them",
            len(resized),
            n,
            aspects.min(),
            aspects.max(),
        )
    elif geometry_mode == AS_RECORDED and profile:
        differ = [r for r in done if "aspect" in r["input_check"]]
        if differ:
            logger.warning(
                "%d of %d images have another aspect ratio than the training images and were "
                "preprocessed as they are (--geometry as-recorded): their predictions may be wrong",
                len(differ),
                n,
            )
    outside = [r for r in done if r["input_check"] not in ("ok", "no profile")]
    if outside:
        kinds = {}
        for r in outside:
            for issue in r["input_check"].split("; "):
                kind = issue.split(" ", 1)[0]
                kinds[kind] = kinds.get(kind, 0) + 1
        logger.warning(
            "%d of %d images fall outside the training profile (%s); see the input_check column",
            len(outside),
            n,
            ", ".join(f"{k} {v}" for k, v in kinds.items()),
        )
    if not profile and done:
        logger.warning(
            "the head records no profile of its training images (fitted before xfeat 0.3): "
            "neither the geometry nor the inputs were checked; fit it again to get them"
        )
    flagged = [r for r in done if r["ood"] is True]
    if flagged:
        logger.warning(
            "%d of %d images look unlike the training images (ood_score above 99: farther from "
            "them than 99%% of the validation images); do not trust their predictions",
            len(flagged),
            n,
        )
    if not has_ood and done:
        logger.info("no out-of-distribution reference: the ood_score column is empty")
