"""``predict``: a saved head (or fine-tuned network) on new image files, with the backbone,
geometry and preprocessing it was trained with."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from scipy.special import expit, softmax

from xfeat.backbones import Preprocessing, create_backbone
from xfeat.config import GEOMETRY_CHOICES, PREDICT_ADAPTATIONS
from xfeat.data.images import IMAGE_EXTENSIONS, check_utf8_names, scan_image_files, warn_skipped
from xfeat.errors import ConfigError, DataError
from xfeat.extraction.view_names import parse_tta
from xfeat.files import write_csv
from xfeat.heads import NearestNeighbourOOD, load_head, load_head_extra

logger = logging.getLogger(__name__)


def expand_images(inputs: Sequence[Union[str, Path]]) -> list:
    """Files as given, folders searched recursively for images (sorted); errors name the path."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found, skipped = scan_image_files(p, recursive=True)
            warn_skipped(skipped, str(p))
            if not found:
                raise DataError(
                    f"folder {p} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}"
                )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.is_symlink():
            raise DataError(f"{p} is a dangling symbolic link; expected an image file")
        else:
            raise DataError(f"no such image file or folder: {p}")
    check_utf8_names(files, "the images given")
    return files


def _backbone_for(meta: dict, weights_override: Optional[str], frame: Optional[int] = None):
    w = meta["weights"]
    if w["kind"] == "random":
        if weights_override:
            raise ConfigError(
                f"the head's backbone has random weights ({w['id']}); --weights does not apply"
            )
        seed = w.get("seed")
        if seed is None:  # caches written before the seed was recorded
            seed = int(w["id"].split("seed=")[1].rstrip(")"))
        weights, kwargs = "none", {"seed": seed}
    elif w["kind"] == "torchvision":
        weights, kwargs = weights_override or w["id"].rsplit(".", 1)[-1], {}
    elif w["kind"] == "torchscript":  # the weights are inside the model's file
        weights, kwargs = weights_override or "none", {}
    elif w["kind"] in ("timm", "hf", "open_clip"):  # the model's own pretrained weights
        weights, kwargs = weights_override or "DEFAULT", {}
    else:
        weights, kwargs = weights_override or w["id"], {}
        if not Path(weights).is_file():
            raise ConfigError(
                f"the head was trained on features of weights file {w['id']}, "
                "which is not there; pass its current location with --weights"
            )
    backbone = create_backbone(meta["model"], weights, progress=False, **kwargs)
    if w.get("sha256") and backbone.weights.sha256 and backbone.weights.sha256 != w["sha256"]:
        raise ConfigError(
            f"weights {weights} (sha256 {backbone.weights.sha256[:12]}) are not the "
            f"weights the head was trained with (sha256 {w['sha256'][:12]})"
        )
    backbone.preprocessing = with_frame(Preprocessing.from_dict(meta["preprocessing"]), frame)
    return backbone


def with_frame(preprocessing: Preprocessing, frame: Optional[int]) -> Preprocessing:
    """The recorded preprocessing, reading frame ``frame`` of multi-frame DICOM files instead
    of the recorded one (None keeps it)."""
    if frame is None or frame == preprocessing.dicom_frame:
        return preprocessing
    _check_frame(frame)
    logger.info(
        "reading frame %d of multi-frame DICOM files (the features were made from %s)",
        frame,
        "single-frame files"
        if preprocessing.dicom_frame is None
        else f"frame {preprocessing.dicom_frame}",
    )
    return preprocessing.with_dicom(frame=frame)


def _check_frame(frame) -> None:
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 0):
        raise ConfigError(f"frame={frame!r}: expected a frame number >= 0 (0 is the first)")


def _features(
    sources: list,
    blocks: list,
    files: list,
    *,
    weights,
    device,
    compile,
    embed: dict,
    frame: Optional[int] = None,
):
    """``(X (N, D) per view, errors, stats)``: the head's blocks, every source's backbone run
    once; ``embed``: :func:`~xfeat.extraction.forward.embed_files`'s options."""
    from xfeat.extraction.forward import Runner, embed_files
    from xfeat.extraction.runtime import resolve_device

    dev = resolve_device(device)
    prefixed = len(sources) > 1
    columns, errors, stats = {v: {} for v in embed["views"]}, None, None
    for src in sources:
        prefix = src["model"] + ":"
        mine = [
            (b[len(prefix) :] if prefixed else b, d)
            for b, d in blocks
            if not prefixed or b.startswith(prefix)
        ]
        backbone = _backbone_for(src, weights if not prefixed else None, frame)
        runner = Runner(backbone, mine, dev, batch_size=embed["batch_size"], compile=compile)
        outputs, errs, stats = embed_files(runner, files, **embed)
        errors = errs if errors is None else [a or b for a, b in zip(errors, errs)]
        for view, out in outputs.items():
            for b, _ in mine:
                columns[view][f"{src['model']}:{b}" if prefixed else b] = out[b]
    X = {v: np.concatenate([cols[b] for b, _ in blocks], axis=1) for v, cols in columns.items()}
    return X, errors, stats


def _probabilities(
    network,
    head,
    meta: dict,
    files: list,
    *,
    weights,
    tta,
    adapt,
    batch_size,
    num_workers,
    device,
    compile,
    progress,
    geometry,
    frame=None,
):
    """``(proba (N, C) with NaN rows, errors, adaptation, stats, features)`` of the files.

    ``tta``: features averaged over the centre crop and the test-time views. ``adapt``
    (transductive): the batch of files is the target of the adaptation.
    """
    from xfeat.extraction.view_names import tta_views

    views = [None] + tta_views(tta)
    embed = dict(
        views=views,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        geometry=geometry,
    )
    if head is None:  # a fine-tuned network returns logits
        blocks, sources = [("penultimate", len(meta["class_names"]))], None
    else:
        blocks = [tuple(b) for b in meta.get("blocks") or [("penultimate", meta["feature_dim"])]]
        sources = meta.get("sources") or [meta]
    if sources is None:
        from xfeat.extraction.forward import Runner, embed_files
        from xfeat.extraction.runtime import resolve_device

        network.preprocessing = with_frame(network.preprocessing, frame)
        runner = Runner(network, blocks, resolve_device(device), batch_size=batch_size, compile=compile)
        out, errors, stats = embed_files(runner, files, **embed)
        X = {v: o["penultimate"] for v, o in out.items()}
    else:
        X, errors, stats = _features(
            sources,
            blocks,
            files,
            weights=weights,
            device=device,
            compile=compile,
            embed=embed,
            frame=frame,
        )
    features = np.mean([X[v] for v in views], axis=0) if X else np.zeros((0, 0), np.float32)
    ok = np.array([not e for e in errors], dtype=bool)
    proba = np.full((len(files), len(meta["class_names"])), np.nan)
    adaptation = None
    if ok.any():
        if head is None:
            logits = features[ok].astype(np.float64)
            # a multi-label network has one independent logit per label
            proba[ok] = expit(logits) if meta.get("label_thresholds") else softmax(logits, axis=1)
        else:
            proba[ok], adaptation = _head_proba(head, meta, features[ok], adapt)
    return proba, errors, adaptation, stats, features


def _head_proba(head, meta: dict, X: np.ndarray, adapt):
    """The head's probabilities; with ``adapt`` (transductive), the files given are the target,
    aligned to the statistics the head recorded when it was fitted."""
    from xfeat.heads import adaptation

    if adapt is None:
        return head.predict_proba(X), None
    recorded = meta.get("adaptation_source")
    if not recorded:
        raise ConfigError(
            "this head file records no source statistics for --adapt; fit it again with this xfeat"
        )
    details = {"method": adapt, "transductive": True, "target": f"the {len(X)} images given"}
    if adapt == "standardize":
        X = adaptation.standardize_to(X, recorded["mean"], recorded["std"])
        return head.predict_proba(X), details
    if recorded.get("calibration") is None:
        raise ConfigError(
            f"--adapt {adapt} re-estimates a single-label class prior; this head is multi-label: "
            "use --adapt standardize"
        )
    adjusted, em = adaptation.em_on_batch(head.predict_proba(X), recorded["calibration"])
    # EM's probabilities are calibrated ones: their threshold was chosen on calibrated val.
    return adjusted, {**details, **em, "threshold": recorded["calibration"].get("threshold")}


def predict(
    head_path: Union[str, Path],
    images: Sequence[Union[str, Path]],
    *,
    out_csv: Union[str, Path, None] = None,
    weights: Optional[str] = None,
    tta=None,
    adapt: Optional[str] = None,
    geometry: str = "match",
    frame: Optional[int] = None,
    batch_size: int = 32,
    num_workers: Optional[int] = None,
    device: Optional[str] = None,
    compile: bool = False,
    progress: bool = True,
) -> list:
    """Classify image files with a saved head (``head.npz`` from fit-head) or a fine-tuned
    network (``model.pt`` from finetune); one dict per image (and a CSV if asked).

    Each row (:mod:`xfeat.prediction.rows`): ``path``, ``p_<class>`` per class,
    ``predicted``, the ``threshold`` and ``rule`` that decided it (the head's val-chosen
    threshold for two classes, else the argmax), ``geometry``, ``input_check``,
    ``ood_score``, ``ood`` and ``error`` (non-empty for unreadable files).

    ``geometry``: ``match`` (default) brings an image whose aspect ratio differs from the
    training images' (when those share one, within 2%) to their size or aspect first, as
    the training images were; ``as-recorded`` applies the recorded preprocessing to the
    image as it is. ``tta``: ``flip``/``crops``/``flip,crops``, features averaged over the
    views. ``adapt``: ``standardize`` or ``em``, *transductive*: the images given are the
    target (at least 20 of them); their labels are not needed. ``frame``: the frame of
    multi-frame DICOM files to read (default: the one the features were made from).
    ``compile``: compile the backbone ahead of time, kept in the cache folder for later calls.

    Warnings sum up the images resized, outside the training profile or out of
    distribution; a :class:`~xfeat.errors.DataError` only when no image could be predicted.
    """
    from xfeat.data.profile import training_geometry
    from xfeat.heads.adaptation import check_method
    from xfeat.prediction.rows import build_rows, columns, warn_summary

    adapt = check_method(adapt, PREDICT_ADAPTATIONS)
    _check_frame(frame)
    if geometry not in GEOMETRY_CHOICES:
        raise ConfigError(f"geometry={geometry!r}: expected one of {', '.join(GEOMETRY_CHOICES)}")
    tta_given = tta is not None
    if adapt and Path(head_path).suffix == ".pt":
        raise ConfigError(
            "--adapt applies to heads (head.npz); for a fine-tuned network use finetune --adapt adabn"
        )
    if out_csv is not None:
        from xfeat.runs.folders import check_writable

        check_writable(Path(out_csv).parent)
    ood_scorer = None
    if Path(head_path).is_dir() or Path(head_path).suffix not in (".npz", ".pt"):
        raise ConfigError(
            f"--head {head_path}: expected a head.npz (written by fit-head) or a model.pt "
            "(written by finetune); a run folder holds it next to results.json"
        )
    if Path(head_path).suffix == ".pt":  # a network from `xfeat finetune`
        from xfeat.finetuning import load_finetuned

        network, meta = load_finetuned(head_path)
        head = None
    else:
        head, meta = load_head(head_path)
        ood_scorer = NearestNeighbourOOD.from_arrays(load_head_extra(head_path))
        network = None  # each source backbone of the head is built below
    files = expand_images(images)
    if not tta_given and meta.get("tta"):
        tta = meta["tta"]  # the head's val choices and threshold were made on these views
        logger.info(
            "averaging the features of the views %s, as the head was fitted (--tta to change)",
            ",".join(tta),
        )
    if meta.get("precision", "fp32") != "fp32":
        logger.warning(
            "the head was fitted on %s features; predict extracts fp32 ones", meta["precision"]
        )
    profile = meta.get("input_profile")
    target = training_geometry(profile) if geometry == "match" else None
    proba, errors, adaptation, stats, features = _probabilities(
        network,
        head,
        meta,
        files,
        weights=weights,
        tta=parse_tta(tta),
        adapt=adapt,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        compile=compile,
        progress=progress,
        geometry=target,
        frame=frame,
    )
    if adaptation:
        logger.info("transductive adaptation (%s) to the %d images given", adapt, len(files))
    ok = np.array([not e for e in errors], dtype=bool)
    if not ok.any():
        raise DataError(
            f"none of the {len(files)} images could be predicted; the first error: {errors[0]}"
        )
    for i in np.flatnonzero(~ok):
        logger.warning("%s", errors[i])
    classes = meta["class_names"]
    threshold, rule = meta.get("threshold"), str(meta.get("threshold_rule") or "youden")
    label_thresholds = meta.get("label_thresholds")
    if label_thresholds is not None:  # multi-label: one val-chosen threshold per label
        label_thresholds = [label_thresholds[c] for c in classes]
        threshold, rule = None, f"{rule} per label"
    elif adaptation and adaptation.get("threshold") is not None:
        threshold, rule = adaptation["threshold"], f"{rule} on calibrated val ({adapt})"
    if label_thresholds is None and (threshold is None or len(classes) != 2):
        threshold, rule = None, "argmax"
    ood = None
    if ood_scorer is not None:
        scores, flags = np.full(len(files), np.nan), np.zeros(len(files), dtype=bool)
        scores[ok], flags[ok] = ood_scorer.scores(features[ok])
        ood = (scores, flags)
    rows = build_rows(
        files,
        proba,
        errors,
        stats,
        class_names=classes,
        threshold=threshold,
        rule=rule,
        profile=profile,
        geometry=target,
        geometry_mode=geometry,
        ood=ood,
        label_thresholds=label_thresholds,
    )
    warn_summary(rows, stats, profile=profile, geometry_mode=geometry, has_ood=ood is not None)
    if adaptation:  # every row says so: these probabilities depend on the whole batch
        for row in rows:
            row["adaptation"] = f"{adapt} (transductive)"
    if out_csv:
        write_csv(out_csv, rows, columns(classes, bool(adaptation), label_thresholds is not None))
    return rows
