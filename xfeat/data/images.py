"""Decoding images: any file or array -> an RGB PIL image, and finding image files in folders.

One decoder for every path (extraction, the fine-tuning store, ``predict``), so every path
sees the same pixels: EXIF orientation applied (as a viewer shows the image), grayscale,
palette, RGBA and 16-bit images made RGB, and files that cannot be decoded reported by name.
DICOM files (``.dcm``, ``.dicom`` or the ``DICM`` marker) are read by :mod:`xfeat.data.dicom`;
a grayscale one comes back as a float (``F``) image in [0, 1], which the resize keeps at full
precision until the network's 8-bit input.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from xfeat.data.dicom import (
    DEFAULT_DICOM,
    DICOM_EXTENSIONS,
    DicomOptions,
    has_preamble,
    is_dicom,
    read_dicom,
)
from xfeat.data.profile import header_info
from xfeat.errors import DataError, ImageReadError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".pgm",
    ".ppm",
    *DICOM_EXTENSIONS,
)


def read_image_file(
    path,
    draft_size: Optional[int] = None,
    exif_transpose: bool = True,
    dicom: DicomOptions = DEFAULT_DICOM,
) -> Image.Image:
    """Open any supported image file as RGB; grayscale, RGBA, palette and 16-bit all work.

    ``exif_transpose`` rotates/flips the pixels as the file's EXIF orientation tag says.
    ``draft_size`` lets libjpeg decode a large JPEG at a reduced scale (never below it).
    ``dicom``: the window and frame of a DICOM file (whose grayscale image is ``F``).
    """
    return read_image_with_header(path, draft_size, exif_transpose, dicom)[0]


def read_image_with_header(
    path,
    draft_size: Optional[int] = None,
    exif_transpose: bool = True,
    dicom: DicomOptions = DEFAULT_DICOM,
):
    """As :func:`read_image_file`, with the file's header facts: ``(RGB image, (width,
    height, mode, bit depth))``, the size as a viewer shows it, before any draft reduction."""
    if is_dicom(path):
        pixels, header = read_dicom(path, dicom, draft_size)
        return float_to_image(pixels), header
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS / 2 and raises above MAX_IMAGE_PIXELS * 2.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                header = header_info(im)
                if draft_size and im.format == "JPEG":
                    im.draft("RGB", (draft_size, draft_size))
                im.load()
                if exif_transpose:
                    im = ImageOps.exif_transpose(im)
                return pil_to_rgb(im), header
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(
            _printable(path),
            f"{exc} Downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted",
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageReadError(_printable(path), str(exc) or type(exc).__name__) from None


def float_to_image(pixels: np.ndarray) -> Image.Image:
    """``(H, W)`` float pixels in [0, 1] -> an ``F`` image (full precision); ``(H, W, 3)`` ->
    RGB (colour DICOM is 8 bits a sample in practice)."""
    if pixels.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    return Image.fromarray(np.rint(pixels * 255.0).astype(np.uint8), mode="RGB")


def to_uint8_rgb(image: Image.Image) -> np.ndarray:
    """An RGB image, or an ``F`` image in [0, 1], as ``(H, W, 3)`` uint8: the one place where a
    float image is reduced to the network's 8-bit input."""
    if image.mode != "F":
        return np.array(image, dtype=np.uint8)
    gray = np.rint(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def pil_to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return array_to_rgb(np.asarray(im))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite on black: medical images use transparency rarely, black is the background.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def array_to_rgb(arr: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1) or (H, W, 3) array of any numeric dtype -> RGB image.

    uint8 is used as is; other dtypes are min-max scaled per image to 0..255 (16-bit
    radiographs rarely use the full 16-bit range). Non-finite values are an error.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise DataError(f"image array has shape {arr.shape}; expected (H, W), (H, W, 1) or (H, W, 3)")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise DataError("image array holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]), mode="RGB")


def _printable(path) -> str:
    """A path as text even when its bytes are not UTF-8 (undecodable bytes as \\xNN)."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def is_utf8_name(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def scan_image_files(folder: Path, *, recursive: bool = False) -> tuple:
    """``(image files, skipped)`` in ``folder``, sorted. A file of another (or no) extension is
    an image when it has the DICOM ``DICM`` marker. Hidden files and others are ignored
    silently; ``skipped`` lists, with the reason, what looks like an image but cannot be one (a
    dangling link, a folder named ``*.jpg``) so the caller can warn about it."""
    entries: Iterable[Path] = folder.rglob("*") if recursive else folder.iterdir()
    files, skipped = [], []
    for p in sorted(entries):
        if p.name.startswith("."):
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS and not (p.is_file() and has_preamble(p)):
            continue
        if p.is_file():
            files.append(p)
        elif p.is_symlink() and not p.exists():
            skipped.append((p, "dangling symbolic link"))
        elif p.is_dir():
            if not recursive:
                skipped.append((p, "a folder, not an image file"))
        else:
            skipped.append((p, "not a regular file"))
    return files, skipped


def warn_skipped(skipped: list, where: str) -> None:
    """One warning naming what was skipped for cause (at most 10 paths, then a count)."""
    if not skipped:
        return
    shown = "; ".join(f"{_printable(p)} ({why})" for p, why in skipped[:10])
    more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    logger.warning(
        "skipped %d entr%s in %s that look like images but are not readable files: %s%s",
        len(skipped),
        "y" if len(skipped) == 1 else "ies",
        where,
        shown,
        more,
    )


def check_utf8_names(files: list, where: str) -> None:
    """File names end up in caches and CSVs as UTF-8 text: refuse others up front, by name."""
    bad = [f for f in files if not is_utf8_name(f)]
    if bad:
        names = ", ".join(_printable(f) for f in bad[:5])
        raise DataError(
            f"{len(bad)} file name(s) in {_printable(where)} are not valid UTF-8, "
            f"e.g. {names}; rename them (for example with `convmv -f latin1 -t utf8 "
            "-r --notest FOLDER`)"
        )
