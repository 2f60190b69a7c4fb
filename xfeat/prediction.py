"""``predict``: apply a saved head to new image files with the backbone it was trained on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from scipy.special import softmax

from xfeat.backbones import Preprocessing, create_backbone
from xfeat.config import PREDICT_ADAPTATIONS, default_cache_dir
from xfeat.data.images import IMAGE_EXTENSIONS, check_utf8_names, scan_image_files, warn_skipped
from xfeat.errors import ConfigError, DataError
from xfeat.extraction.views import parse_tta
from xfeat.files import write_csv
from xfeat.heads import load_head

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


def _backbone_for(meta: dict, weights_override: Optional[str]):
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
    elif w["kind"] == "timm":
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
    backbone.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    return backbone


def _features(
    sources: list,
    blocks: list,
    files: list,
    views,
    *,
    weights,
    batch_size,
    num_workers,
    device,
    compile,
    progress,
):
    """``(X (N, D) per view, errors)``: the head's blocks, every source's backbone run once."""
    from xfeat.extraction.forward import Runner, embed_files
    from xfeat.extraction.runtime import resolve_device

    dev = resolve_device(device)
    prefixed = len(sources) > 1
    columns, errors = {v: {} for v in views}, None
    for src in sources:
        prefix = src["model"] + ":"
        mine = [
            (b[len(prefix) :] if prefixed else b, d)
            for b, d in blocks
            if not prefixed or b.startswith(prefix)
        ]
        runner = Runner(
            _backbone_for(src, weights if not prefixed else None),
            mine,
            dev,
            batch_size=batch_size,
            compile=compile,
            cache_dir=default_cache_dir(),
        )
        outputs, errs = embed_files(
            runner, files, views=views, batch_size=batch_size, num_workers=num_workers, progress=progress
        )
        errors = errs if errors is None else [a or b for a, b in zip(errors, errs)]
        for view, out in outputs.items():
            for b, _ in mine:
                columns[view][f"{src['model']}:{b}" if prefixed else b] = out[b]
    X = {v: np.concatenate([cols[b] for b, _ in blocks], axis=1) for v, cols in columns.items()}
    return X, errors


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
):
    """``(proba (N, C) with NaN rows, errors, adaptation)`` of the files.

    ``tta``: features averaged over the centre crop and the test-time views. ``adapt``
    (transductive): the batch of files is the target of the adaptation.
    """
    from xfeat.extraction.views import tta_views

    views = [None] + tta_views(tta)
    if head is None:  # a fine-tuned network returns logits
        blocks, sources = [("penultimate", len(meta["class_names"]))], None
    else:
        blocks = [tuple(b) for b in meta.get("blocks") or [("penultimate", meta["feature_dim"])]]
        sources = meta.get("sources") or [meta]
    if sources is None:
        from xfeat.extraction.forward import Runner, embed_files
        from xfeat.extraction.runtime import resolve_device

        runner = Runner(
            network,
            blocks,
            resolve_device(device),
            batch_size=batch_size,
            compile=compile,
            cache_dir=default_cache_dir(),
        )
        out, errors = embed_files(
            runner, files, views=views, batch_size=batch_size, num_workers=num_workers, progress=progress
        )
        X = {v: o["penultimate"] for v, o in out.items()}
    else:
        X, errors = _features(
            sources,
            blocks,
            files,
            views,
            weights=weights,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            compile=compile,
            progress=progress,
        )
    features = np.mean([X[v] for v in views], axis=0) if X else np.zeros((0, 0), np.float32)
    ok = np.array([not e for e in errors], dtype=bool)
    proba = np.full((len(files), len(meta["class_names"])), np.nan)
    adaptation = None
    if ok.any():
        if head is None:
            proba[ok] = softmax(features[ok].astype(np.float64), axis=1)
        else:
            proba[ok], adaptation = _head_proba(head, meta, features[ok], adapt)
    return proba, errors, adaptation


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
    batch_size: int = 32,
    num_workers: Optional[int] = None,
    device: Optional[str] = None,
    compile: bool = False,
    progress: bool = True,
) -> list:
    """Classify image files with a saved head (``head.npz`` from fit-head) or a fine-tuned
    network (``model.pt`` from finetune); one dict per image (and a CSV if asked).

    Each row: ``path``, ``p_<class>`` per class, ``predicted`` (class name, using the head's
    val-chosen threshold for binary problems) and ``error`` (non-empty for unreadable files).
    ``tta``: ``flip``/``crops``/``flip,crops``, features averaged over the views.
    ``adapt``: ``standardize`` or ``em``, *transductive*: the images given are the target
    (at least 20 of them); their labels are not needed. ``compile``: compile the backbone
    ahead of time, kept in the cache folder for later calls (:mod:`xfeat.extraction.compiled`; the first
    compilation is worth it for thousands of images).
    """
    from xfeat.heads.adaptation import check_method

    adapt = check_method(adapt, PREDICT_ADAPTATIONS)
    tta_given = tta is not None
    if adapt and Path(head_path).suffix == ".pt":
        raise ConfigError(
            "--adapt applies to heads (head.npz); for a fine-tuned network use finetune --adapt adabn"
        )
    if out_csv is not None:
        from xfeat.runs.folders import check_writable

        check_writable(Path(out_csv).parent)
    if Path(head_path).suffix == ".pt":  # a network from `xfeat finetune`
        from xfeat.finetuning import load_finetuned

        network, meta = load_finetuned(head_path)
        head = None
    else:
        head, meta = load_head(head_path)
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
    proba, errors, adaptation = _probabilities(
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
    )
    if adaptation:
        logger.info("transductive adaptation (%s) to the %d images given", adapt, len(files))
    ok = np.array([not e for e in errors], dtype=bool)
    classes = meta["class_names"]
    threshold = meta.get("threshold")
    if adaptation and adaptation.get("threshold") is not None:
        threshold = adaptation["threshold"]
    rows = []
    for i, path in enumerate(files):
        row = {"path": str(path), **{f"p_{c}": float(proba[i, j]) for j, c in enumerate(classes)}}
        if ok[i]:
            label = (
                int(proba[i, 1] >= threshold)
                if threshold is not None and len(classes) == 2
                else int(np.argmax(proba[i]))
            )
            row.update(predicted=classes[label], error="")
        else:
            logger.warning("%s", errors[i])
            row.update(predicted="", error=errors[i])
        rows.append(row)
    if adaptation:  # every row says so: these probabilities depend on the whole batch
        for row in rows:
            row["adaptation"] = f"{adapt} (transductive)"
    if out_csv:
        columns = ["path", *[f"p_{c}" for c in classes], "predicted", "error"]
        write_csv(out_csv, rows, columns + (["adaptation"] if adaptation else []))
    return rows
