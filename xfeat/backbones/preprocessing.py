"""Preprocessing: resize (short side, stretch or letterbox), centre-crop, scale, normalise.
Part of every cache key.

The same object decodes images for extraction, for the fine-tuning store and for ``predict``,
so every path sees identical pixels; it reproduces torchvision's ``weights.transforms()``
(checked by a parity test) on uint8 arrays.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
from PIL import Image

from xfeat.config import RESIZE_MODES
from xfeat.data.dicom import DicomOptions
from xfeat.data.images import to_uint8_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PIL_INTERPOLATION = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
}
INTERPOLATIONS = tuple(_PIL_INTERPOLATION)
CROP_OFFSETS = ("round", "floor")
MAX_SIDE = 4096  # the largest resize or crop size accepted, in pixels


@dataclass(frozen=True)
class Preprocessing:
    """The ``resize_size`` square (``resize_mode``: see :data:`RESIZE_MODES`), its centre
    ``crop_size`` square, ``(x / 255 - mean) / std``.

    ``exif_transpose``: rotate images as their EXIF orientation says (as a viewer shows them).
    ``dicom_window`` and ``dicom_frame``: how a DICOM file is shown (:class:`DicomOptions`).
    ``crop_offset``: how an odd margin is split by the centre crop: ``round`` (to even, as
    torchvision's ``CenterCrop``) or ``floor`` (as transformers' image processors).
    """

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"
    exif_transpose: bool = True
    resize_mode: str = "crop"
    dicom_window: str = "file"
    dicom_frame: Optional[int] = None
    crop_offset: str = "round"

    def __post_init__(self):
        from xfeat.errors import ConfigError

        DicomOptions(self.dicom_window, self.dicom_frame)  # validates both

        for name in ("crop_size", "resize_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected a positive number of pixels, such as 224")
            if value > MAX_SIDE:  # a sidecar or config asking for 100000 would allocate 240 GB
                raise ConfigError(
                    f"{name}={value}: more than {MAX_SIDE} pixels a side; expected the network's "
                    "input size, such as 224 (check the model's sidecar or configuration)"
                )
        if self.crop_size > self.resize_size:
            raise ConfigError(
                f"crop_size={self.crop_size} is larger than resize_size="
                f"{self.resize_size}; the centre crop must fit in the resized image"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(
                f"resize_mode={self.resize_mode!r}; expected one of {', '.join(RESIZE_MODES)}"
            )
        if self.crop_offset not in CROP_OFFSETS:
            raise ConfigError(
                f"crop_offset={self.crop_offset!r}; expected one of {', '.join(CROP_OFFSETS)}"
            )
        if self.interpolation not in _PIL_INTERPOLATION:
            raise ConfigError(
                f"interpolation={self.interpolation!r}; expected one of {sorted(_PIL_INTERPOLATION)}"
            )
        values = [*self.mean, *self.std] if len(self.mean) == len(self.std) == 3 else []
        if (
            not values
            or not all(isinstance(v, numbers.Real) and np.isfinite(v) for v in values)
            or min(self.std) <= 0
        ):
            raise ConfigError(
                f"mean={self.mean!r}, std={self.std!r}: expected three finite values each, std > 0"
            )
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        """A JSON-ready record; ``resize_mode``, ``crop_offset`` and the DICOM settings only
        when they are not the defaults, so that caches keyed before they existed keep their keys."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        defaults = (
            ("resize_mode", "crop"),
            ("dicom_window", "file"),
            ("dicom_frame", None),
            ("crop_offset", "round"),
        )
        for name, default in defaults:
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """The inverse of :meth:`to_dict` (records written before ``exif_transpose`` existed
        did not apply it)."""
        return cls(
            int(d["resize_size"]),
            int(d["crop_size"]),
            tuple(d["mean"]),
            tuple(d["std"]),
            d.get("interpolation", "bilinear"),
            bool(d.get("exif_transpose", False)),
            d.get("resize_mode", "crop"),
            d.get("dicom_window", "file"),
            d.get("dicom_frame"),
            d.get("crop_offset", "round"),
        )

    @classmethod
    def from_transforms(cls, t) -> Preprocessing:
        """From a torchvision ``ImageClassification`` transform (``weights.transforms()``)."""
        return cls(
            int(t.resize_size[0]),
            int(t.crop_size[0]),
            tuple(t.mean),
            tuple(t.std),
            t.interpolation.value.lower(),
        )

    def with_size(self, crop_size: Optional[int], resize_size: Optional[int] = None):
        """The same preprocessing at another crop size, keeping the resize/crop ratio."""
        if crop_size is None and resize_size is None:
            return self
        crop_size = self.crop_size if crop_size is None else crop_size
        if resize_size is None:
            resize_size = (
                int(round(crop_size * self.resize_size / self.crop_size))
                if isinstance(crop_size, int) and crop_size > 0
                else crop_size
            )
        return replace(self, crop_size=crop_size, resize_size=resize_size)

    def with_resize_mode(self, resize_mode: Optional[str]) -> Preprocessing:
        """The same preprocessing with another resize mode (None keeps it)."""
        return self if resize_mode is None else replace(self, resize_mode=resize_mode)

    def with_dicom(self, window: Optional[str] = None, frame: Optional[int] = None) -> Preprocessing:
        """The same preprocessing with another DICOM window and/or frame (None keeps them)."""
        return replace(
            self,
            dicom_window=self.dicom_window if window is None else window,
            dicom_frame=self.dicom_frame if frame is None else frame,
        )

    @property
    def dicom(self) -> DicomOptions:
        """The options the image reader takes for a DICOM file."""
        return DicomOptions(self.dicom_window, self.dicom_frame)

    def with_normalization(self, mean=None, std=None) -> Preprocessing:
        """The same preprocessing with ``mean`` and/or ``std`` replaced (None keeps them)."""
        if mean is None and std is None:
            return self
        return replace(
            self,
            mean=self.mean if mean is None else tuple(mean),
            std=self.std if std is None else tuple(std),
        )

    def resized_shape(self, width: int, height: int) -> tuple:
        """``(w, h)`` after resizing the short side to ``resize_size`` (torchvision's rule:
        the long side is truncated, not rounded)."""
        size = self.resize_size
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size

    def resize_square(self, image: Image.Image) -> np.ndarray:
        """The ``(R, R, 3)`` uint8 square of ``image`` (R = ``resize_size``) as ``resize_mode``
        says; a float (``F``) DICOM image is resized at full precision, then made 8-bit. In
        ``crop`` mode its centre crop is exactly torchvision's ``CenterCrop(crop_size)`` of the
        short-side-resized image (the store)."""
        resample = _PIL_INTERPOLATION[self.interpolation]
        size = self.resize_size
        if self.resize_mode == "pad":
            image = letterbox(image)
        if self.resize_mode in ("stretch", "pad"):
            if image.size != (size, size):
                image = image.resize((size, size), resample, reducing_gap=None)
            return to_uint8_rgb(image)
        new_w, new_h = self.resized_shape(*image.size)
        if (new_w, new_h) != image.size:
            image = image.resize(
                (new_w, new_h), _PIL_INTERPOLATION[self.interpolation], reducing_gap=None
            )
        size, inner = self.resize_size, self._inner_offset()
        # torchvision centres the crop with round((side - crop) / 2); place the square so that
        # its own centre crop (offset ``inner``) lands on the same pixels.
        left = min(max(0, self._offset(new_w - self.crop_size) - inner), new_w - size)
        top = min(max(0, self._offset(new_h - self.crop_size) - inner), new_h - size)
        return to_uint8_rgb(image.crop((left, top, left + size, top + size)))

    def describe(self) -> str:
        """``resize 256 (short side), crop 224, bilinear``: one line for tables and logs."""
        how = {"crop": "short side", "stretch": "stretched", "pad": "letterboxed"}[self.resize_mode]
        return f"resize {self.resize_size} ({how}), crop {self.crop_size}, {self.interpolation}"

    def center_crop(self, square: np.ndarray) -> np.ndarray:
        """The centre ``crop_size`` square of a ``(R, R, ...)`` array from :meth:`resize_square`."""
        o = self._inner_offset(square.shape[0])
        return square[o : o + self.crop_size, o : o + self.crop_size]

    def _inner_offset(self, side: Optional[int] = None) -> int:
        side = self.resize_size if side is None else side
        return self._offset(side - self.crop_size)

    def _offset(self, margin: int) -> int:
        """Where a centre crop starts in ``margin`` spare pixels (see ``crop_offset``)."""
        if self.crop_offset == "floor":
            return margin // 2
        return int(round(margin / 2.0))  # torchvision's CenterCrop

    def resize_and_crop(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> ``(crop, crop, 3)`` uint8, exactly the store's eval view."""
        return np.ascontiguousarray(self.center_crop(self.resize_square(image)))

    def normalize(self, batch):
        """``(N, 3, H, W)`` uint8 tensor -> float32 normalised with ``mean`` / ``std``."""
        import torch

        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1) * 255.0
        return (batch.float() - mean) / std


def letterbox(image: Image.Image) -> Image.Image:
    """``image`` centred on a black square as wide as its long side (nothing cut)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square
