"""``predict``: apply a saved head to new image files with the backbone it was trained on."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from scipy.special import softmax

from .backbones import Preprocessing, create_backbone
from .errors import ConfigError, DataError
from .extract import embed_files
from .files import write_csv
from .heads import load_head
from .images import IMAGE_EXTENSIONS, check_utf8_names, scan_image_files, warn_skipped

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
                raise DataError(f"folder {p} holds no images with extensions "
                                f"{', '.join(IMAGE_EXTENSIONS)}")
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
            raise ConfigError(f"the head's backbone has random weights ({w['id']}); --weights "
                             "does not apply")
        seed = w.get("seed")
        if seed is None:  # caches written before the seed was recorded
            seed = int(w["id"].split("seed=")[1].rstrip(")"))
        weights, kwargs = "none", {"seed": seed}
    elif w["kind"] == "torchvision":
        weights, kwargs = weights_override or w["id"].rsplit(".", 1)[-1], {}
    else:
        weights, kwargs = weights_override or w["id"], {}
        if not Path(weights).is_file():
            raise ConfigError(f"the head was trained on features of weights file {w['id']}, "
                                    "which is not there; pass its current location with --weights")
    backbone = create_backbone(meta["model"], weights, progress=False, **kwargs)
    if w.get("sha256") and backbone.weights.sha256 and backbone.weights.sha256 != w["sha256"]:
        raise ConfigError(f"weights {weights} (sha256 {backbone.weights.sha256[:12]}) are not the "
                         f"weights the head was trained with (sha256 {w['sha256'][:12]})")
    backbone.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    return backbone


def predict(head_path: Union[str, Path], images: Sequence[Union[str, Path]], *,
            out_csv: Union[str, Path, None] = None, weights: Optional[str] = None,
            batch_size: int = 32, num_workers: Optional[int] = None,
            device: Optional[str] = None, progress: bool = True) -> list:
    """Classify image files with a saved head (``head.npz`` from fit-head) or a fine-tuned
    network (``model.pt`` from finetune); one dict per image (and a CSV if asked).

    Each row: ``path``, ``p_<class>`` per class, ``predicted`` (class name, using the head's
    val-chosen threshold for binary problems) and ``error`` (non-empty for unreadable files).
    """
    if out_csv is not None:
        from .runs import check_writable

        check_writable(Path(out_csv).parent)
    if Path(head_path).suffix == ".pt":  # a network from `xfeat finetune`
        from .finetune import load_finetuned

        network, meta = load_finetuned(head_path)
        head = None
    else:
        head, meta = load_head(head_path)
        network = _backbone_for(meta, weights)
    files = expand_images(images)
    outputs, errors = embed_files(network, files, batch_size=batch_size,
                                  num_workers=num_workers, device=device, progress=progress)
    ok = np.array([not e for e in errors], dtype=bool)
    classes = meta["class_names"]
    proba = np.full((len(files), len(classes)), np.nan)
    if ok.any():
        proba[ok] = head.predict_proba(outputs[ok]) if head is not None else \
            softmax(outputs[ok].astype(np.float64), axis=1)
    threshold = meta.get("threshold")
    rows = []
    for i, path in enumerate(files):
        row = {"path": str(path), **{f"p_{c}": float(proba[i, j]) for j, c in enumerate(classes)}}
        if ok[i]:
            label = int(proba[i, 1] >= threshold) if threshold is not None and len(classes) == 2 \
                else int(np.argmax(proba[i]))
            row.update(predicted=classes[label], error="")
        else:
            logger.warning("%s", errors[i])
            row.update(predicted="", error=errors[i])
        rows.append(row)
    if out_csv:
        write_csv(out_csv, rows, ["path", *[f"p_{c}" for c in classes], "predicted", "error"])
    return rows
