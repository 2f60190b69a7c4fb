"""Class-folder datasets: ``ROOT/{train,val,test}/CLASS/*.jpg`` (the Kermany ``chest_xray`` layout)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from xfeat.data.dataset import SPLITS, Dataset, Split
from xfeat.data.images import IMAGE_EXTENSIONS, check_utf8_names, scan_image_files, warn_skipped
from xfeat.errors import DataError


def load_folder(root: Path) -> Dataset:
    root = root.resolve()
    present = [s for s in SPLITS if (root / s).is_dir()]
    if "train" not in present:
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"{root} has no train/ folder (found: {subdirs or 'nothing'}); expected "
            "ROOT/train/CLASS/*.jpg with optional ROOT/val and ROOT/test"
        )
    per_split_classes = {
        s: sorted(p.name for p in (root / s).iterdir() if p.is_dir() and not p.name.startswith("."))
        for s in present
    }
    class_names = per_split_classes["train"]
    if not class_names:
        raise DataError(f"{root / 'train'} has no class folders; expected train/CLASS/*.jpg")
    for s in present:
        if per_split_classes[s] != class_names:
            extra = sorted(set(per_split_classes[s]) - set(class_names))
            missing = sorted(set(class_names) - set(per_split_classes[s]))
            raise DataError(
                f"split {s!r} in {root} has different classes from train: "
                f"missing {missing}, extra {extra}; every split needs the same "
                "class folders"
            )
    digest = hashlib.sha256()
    splits, skipped = {}, []
    for s in present:
        ids, labels, paths = [], [], []
        for label, cls in enumerate(class_names):
            files, bad = scan_image_files(root / s / cls)
            skipped += bad
            check_utf8_names(files, root / s / cls)
            if not files:
                raise DataError(
                    f"class folder {root / s / cls} has no images; accepted "
                    f"extensions: {', '.join(IMAGE_EXTENSIONS)}"
                )
            for p in files:
                rel = p.relative_to(root).as_posix()
                ids.append(rel)
                labels.append(label)
                paths.append(str(p))
                digest.update(f"{s}\0{label}\0{rel}\0".encode())
                digest.update(hashlib.sha256(p.read_bytes()).digest())
        splits[s] = Split(s, ids, np.asarray(labels, dtype=np.int64), paths=paths)
    warn_skipped(skipped, str(root))
    return Dataset(
        name=root.name,
        source=str(root),
        class_names=class_names,
        splits=splits,
        content_digest=digest.hexdigest(),
    )
