"""Image views beyond the centre crop: augmented train views and test-time views.

``--views K`` caches K augmented views of every train image, made with the fine-tuning
augmentation (RandomResizedCrop + horizontal flip on the resized square), each drawn from a
generator seeded by (seed, image id, view): the same pixels whether a run is resumed, sharded
or made again. ``--tta flip|crops|flip,crops`` caches deterministic views of val and test:
``flip`` (the mirrored centre crop), ``crops`` (the four corner crops of the resized square),
both (the corners mirrored too). ``fit-head --tta`` and ``predict --tta`` average the
*features* of a split's views (for a linear head: its logits), so the val choices and the
threshold see exactly what test sees.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image

from xfeat.data.profile import empty_row, match_geometry, stat_row
from xfeat.errors import ConfigError, ImageReadError
from xfeat.extraction.runtime import mix_seed
from xfeat.extraction.view_names import (  # noqa: F401  (re-exported)
    CORNERS,
    TTA_KINDS,
    parse_tta,
    train_views,
    tta_views,
)


def render(
    square: np.ndarray, preprocessing, view: Optional[str], *, seed: int = 0, image_id: str = ""
) -> np.ndarray:
    """The ``(crop, crop, 3)`` uint8 pixels of ``view`` from an ``(R, R, 3)`` resized square."""
    crop = preprocessing.crop_size
    if view is None:
        return np.ascontiguousarray(preprocessing.center_crop(square))
    flip = view.startswith("flip")
    name = view[5:] if view.startswith("flip_") else view
    if name.startswith("view"):
        return _augmented(square, crop, mix_seed(seed, image_id, name))
    if name == "flip":
        out = preprocessing.center_crop(square)
    elif name in CORNERS:
        r = square.shape[0]
        top = 0 if name[-2] == "t" else r - crop
        left = 0 if name[-1] == "l" else r - crop
        out = square[top : top + crop, left : left + crop]
    else:
        raise ConfigError(f"unknown view {view!r}")
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def _augmented(square: np.ndarray, crop: int, seed: int) -> np.ndarray:
    """The fine-tuning augmentation (see ``xfeat.finetuning.loaders``), from a seeded generator."""
    import torchvision.transforms.v2.functional as TF

    from xfeat.extraction.store import random_resized_crop_params

    image = torch.from_numpy(np.array(square)).permute(2, 0, 1)
    g = torch.Generator().manual_seed(seed)
    top, left, h, w = random_resized_crop_params(image.shape[1], image.shape[2], g)
    image = TF.resized_crop(image, top, left, h, w, [crop, crop], antialias=True)
    if torch.rand(1, generator=g).item() < 0.5:
        image = TF.horizontal_flip(image)
    return image.permute(1, 2, 0).numpy()


class ViewImages(torch.utils.data.Dataset):
    """``(uint8 CHW crop, error, stat row)`` of one split's images in one view, from row
    ``start`` on; the stat row (:data:`xfeat.data.profile.STAT_COLUMNS`) describes the file
    and the preprocessed pixels.

    An unreadable image gives zeros, its error message and a NaN stat row instead of raising,
    so the loop decides (stop, or record and skip with ``--skip-bad``). ``geometry``
    (:func:`xfeat.data.profile.training_geometry`) first resizes an image whose aspect ratio
    differs from the training images' to their geometry (``predict``).
    """

    def __init__(
        self,
        split,
        preprocessing,
        view: Optional[str] = None,
        *,
        seed: int = 0,
        start: int = 0,
        geometry: Optional[dict] = None,
    ):
        self.split, self.preprocessing, self.view = split, preprocessing, view
        self.seed, self.start, self.geometry = seed, start, geometry
        # augmented views are drawn with torchvision's tensor ops, not PIL's and numpy's
        self.uses_torch_ops = view is not None and view.removeprefix("flip_").startswith("view")

    def __len__(self) -> int:
        return len(self.split) - self.start

    def __getitem__(self, i: int):
        row = self.start + i
        p = self.preprocessing
        try:
            image, header = self.split.read_image_with_header(
                row, draft_size=p.resize_size, exif_transpose=p.exif_transpose, dicom=p.dicom
            )
            target = match_geometry(header[0], header[1], self.geometry) if self.geometry else None
            if target is not None and image.size != target:
                image = image.resize(target, Image.BILINEAR, reducing_gap=None)
            array = render(
                p.resize_square(image), p, self.view, seed=self.seed, image_id=self.split.ids[row]
            )
            error, stats = "", stat_row(header, array, p.mean, p.std)
        except ImageReadError as exc:
            array, error = np.zeros((p.crop_size, p.crop_size, 3), dtype=np.uint8), exc.reason
            stats = empty_row()
        return torch.from_numpy(array).permute(2, 0, 1), error, stats
