"""DICOM files -> the image a viewer shows, as float pixels in [0, 1].

The steps, in the order of the standard's grayscale pipeline (PS3.4 N.2), each a function:
:func:`check_header` (sizes against the bytes present, before anything is allocated),
:func:`decode_frame` (pydicom's decoders; JPEG and JPEG 2000 at a reduced scale when asked),
:func:`modality_lut` (rescale slope/intercept or a Modality LUT, C.11.1), :func:`voi_lut`
(the file's VOI LUT or window, C.11.2, or ``minmax``/``none``: ``window``), then
:func:`presentation` (MONOCHROME1 and Presentation LUT Shape INVERSE inverted, C.11.6);
:func:`grayscale` runs the three. Colour (RGB, YBR, palette) becomes RGB in [0, 1] by
:func:`colour`. pydicom is imported when a DICOM file is read; without it each file's error
says to install ``xfeat[dicom]``.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from xfeat.config import DICOM_WINDOWS
from xfeat.errors import ConfigError, ImageReadError

DICOM_EXTENSIONS = (".dcm", ".dicom")
_INSTALL = "pip install 'xfeat[dicom]'"
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_JPEG_2000 = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")


@dataclass(frozen=True)
class DicomOptions:
    """How a DICOM file is shown: ``window`` (``file``: its VOI LUT or window, else the image's
    own range; ``minmax``: the image's own range; ``none``: the range its header allows) and
    ``frame`` (0-based; required for a multi-frame file)."""

    window: str = "file"
    frame: Optional[int] = None

    def __post_init__(self):
        if self.window not in DICOM_WINDOWS:
            raise ConfigError(
                f"dicom window {self.window!r}; expected one of {', '.join(DICOM_WINDOWS)}"
            )
        if self.frame is not None and (
            isinstance(self.frame, bool)
            or not isinstance(self.frame, (int, np.integer))
            or self.frame < 0
        ):
            raise ConfigError(f"frame={self.frame!r}: expected a frame number >= 0 (0 is the first)")


DEFAULT_DICOM = DicomOptions()


def _pydicom(path):
    try:
        import pydicom
        import pydicom.pixels
    except ImportError:
        raise _fail(path, f"reading DICOM files needs pydicom: {_INSTALL}") from None
    return pydicom


def has_preamble(path) -> bool:
    """Whether the file has the ``DICM`` marker after its 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom(path) -> bool:
    """A ``.dcm``/``.dicom`` file, or any file with the ``DICM`` marker."""
    return Path(path).suffix.lower() in DICOM_EXTENSIONS or has_preamble(path)


DEFER_BYTES = 1 << 20


def _pixel_bytes(ds, path) -> int:
    """How many bytes of pixel data the file holds, without reading them when they were
    deferred: the declared length, cut to what the file has after the value's start."""
    raw = ds.get_item("PixelData")
    if getattr(raw, "value", None) is None and getattr(raw, "value_tell", None) is not None:
        try:
            return max(0, min(int(raw.length), os.path.getsize(path) - int(raw.value_tell)))
        except OSError as exc:
            raise _fail(path, f"cannot read it ({exc.strerror or exc})") from None
    return len(ds.PixelData)


def _fail(path, reason: str):
    return ImageReadError(os.fsencode(str(path)).decode("utf-8", "backslashreplace"), reason)


def _read(path, stop_before_pixels: bool = False):
    pydicom = _pydicom(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every lenient read
            # values over DEFER_BYTES (the pixel data) stay on disk until used: the header is
            # checked before a byte of a hostile file's pixels is read
            ds = pydicom.dcmread(
                path, force=True, stop_before_pixels=stop_before_pixels, defer_size=DEFER_BYTES
            )
    except Exception as exc:  # pydicom raises many kinds on damaged files; all mean the same
        raise _fail(path, f"not a readable DICOM file ({type(exc).__name__}: {_line(exc)})") from None
    if "TransferSyntaxUID" not in ds.file_meta:  # no file meta: the encoding it was read with
        from pydicom import uid

        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            uid.ImplicitVRLittleEndian
            if implicit
            else (uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
        )
    return ds


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def read_tag(path, keyword: str) -> Optional[str]:
    """One tag's value as text (``PatientID``), read without the pixel data; None if absent."""
    try:
        value = getattr(_read(path, stop_before_pixels=True), keyword, None)
    except ImageReadError:
        return None
    value = "" if value is None else str(value).strip()
    return value or None


def check_header(ds, path, frame: Optional[int]) -> tuple:
    """``(rows, columns, samples, frames, index)``, or a one-line error when the header is
    missing, insane, lies about its bits or promises more pixels than the file holds."""
    if "PixelData" not in ds:
        extra = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        raise _fail(
            path, "float pixel data are not supported" if extra else "no pixel data (not an image)"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        allocated, stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        high = None if ds.get("HighBit") is None else int(ds.HighBit)
    except (AttributeError, TypeError, ValueError) as exc:
        missing = [k for k in ("Rows", "Columns", "BitsAllocated") if k not in ds]
        why = f"no {', '.join(missing)}" if missing else _line(exc)
        raise _fail(path, f"incomplete image header ({why})") from None
    if rows < 1 or cols < 1 or samples not in (1, 3) or frames < 1:
        raise _fail(path, f"header gives {rows} x {cols} pixels, {samples} samples, {frames} frames")
    if allocated not in (1, 8, 16, 32) or not 1 <= stored <= allocated:
        raise _fail(
            path,
            f"header gives {stored} bits stored in {allocated} allocated; not an image DICOM can hold",
        )
    if high is not None and high != stored - 1:
        raise _fail(
            path, f"header gives HighBit {high} for {stored} bits stored (expected {stored - 1})"
        )
    limit = max_pixels()
    if rows * cols > limit:
        raise _fail(
            path,
            f"header gives {rows} x {cols} pixels, over the limit of {limit} (raise "
            "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)",
        )
    if frame is None and frames > 1:
        raise _fail(path, f"has {frames} frames; pass --frame N (0 is the first) to pick one")
    index = frame or 0
    if index >= frames:
        raise _fail(path, f"has {frames} frame(s); --frame {index} does not exist")
    if not _compressed(ds.file_meta.TransferSyntaxUID):
        per_pixel = samples * allocated
        if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
            per_pixel = 2 * allocated  # chroma subsampled by two horizontally
        need = (rows * cols * per_pixel * frames + 7) // 8
        have = _pixel_bytes(ds, path)
        if have < need:
            raise _fail(
                path,
                f"pixel data hold {have} bytes but the header ({rows} x {cols} x {samples} x "
                f"{frames} frames, {allocated} bits) needs {need}; the file is truncated or "
                "its header lies",
            )
    return rows, cols, samples, frames, index


def max_pixels() -> int:
    """The most pixels a frame may have: PIL's limit for every image (``MAX_IMAGE_PIXELS``,
    about 89 million), or 2**28 where it is switched off."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS or 2**28


def _compressed(uid) -> bool:
    """Whether the pixel data are encapsulated; an unknown or private syntax counts as such
    (no native size to check; :func:`_check_decoder` refuses it)."""
    try:
        return bool(uid.is_compressed)
    except ValueError:
        return True


def _check_decoder(ds, path) -> None:
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise _fail(path, f"transfer syntax {uid.name} ({uid}) has no decoder in pydicom") from None
    if not decoder.is_available:
        raise _fail(path, f"no decoder for transfer syntax {uid.name} ({uid}) is installed: {_INSTALL}")


def decode_frame(ds, path, index: int, draft_size: Optional[int]) -> np.ndarray:
    """The stored values of frame ``index``; colour as RGB (YBR converted), palette indices as
    stored. With ``draft_size``, an 8-bit baseline JPEG is decoded by libjpeg at a reduced
    scale, as ordinary JPEG files are, and a grayscale JPEG 2000 at a reduced resolution level
    by OpenJPEG (never below ``draft_size``)."""
    from pydicom.pixels import pixel_array

    uid = ds.file_meta.TransferSyntaxUID
    arr = None
    if draft_size and str(uid) == _JPEG_BASELINE and int(ds.BitsAllocated) == 8:
        arr = _jpeg_draft(ds, index, draft_size)
    elif draft_size and str(uid) in _JPEG_2000:
        arr = _j2k_reduced(ds, index, draft_size)
    if arr is not None:
        return arr
    _check_decoder(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixel_array(ds, index=index)
    except Exception as exc:  # a damaged codestream: every decoder raises its own kind
        raise _fail(
            path, f"cannot decode {uid.name} pixel data ({type(exc).__name__}: {_line(exc)})"
        ) from None


def _jpeg_draft(ds, index: int, draft_size: int) -> Optional[np.ndarray]:
    from PIL import Image
    from pydicom.encaps import get_frame

    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "YBR_FULL_422", "YBR_FULL", "RGB"):
        return None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        data = get_frame(ds.PixelData, index, number_of_frames=frames)
        with Image.open(io.BytesIO(data)) as im:
            mode = "L" if photometric.startswith("MONO") else "RGB"
            if im.mode != mode:
                return None
            im.draft(mode, (draft_size, draft_size))
            return np.asarray(im)
    except Exception:  # left to pydicom's decoders, whose errors are reported
        return None


def _j2k_reduced(ds, index: int, draft_size: int) -> Optional[np.ndarray]:
    """An unsigned grayscale JPEG 2000 frame at the lowest resolution level whose short side is
    still ``draft_size`` or more (Pillow's OpenJPEG ``reduce``); None when no level is smaller
    or Pillow cannot read it (pydicom's decoders then decode it in full)."""
    from PIL import Image
    from pydicom.encaps import get_frame

    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("PixelRepresentation", 0)) != 0:
        return None
    short = min(int(ds.Rows), int(ds.Columns))
    level = 0
    while short >> (level + 1) >= draft_size:
        level += 1
    if level == 0:
        return None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        data = get_frame(ds.PixelData, index, number_of_frames=frames)
        if data[:4] != b"\xff\x4f\xff\x51":  # a raw codestream, as DICOM requires
            return None
        precision = (data[42] & 0x7F) + 1  # the first component's, from the SIZ marker
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "I;16"):
                return None
            im.reduce = level
            im.load()
            # Pillow scales the values to fill 8 or 16 bits; the stored values are wanted
            return np.asarray(im) >> ((8 if im.mode == "L" else 16) - precision)
    except Exception:  # left to pydicom's decoders, whose errors are reported
        return None


def modality_lut(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality values: rescale slope/intercept or a Modality LUT (C.11.1)."""
    from pydicom.pixels import apply_modality_lut

    return apply_modality_lut(arr, ds)


def _stored_range(ds) -> np.ndarray:
    """Every value the header allows (BitsStored, PixelRepresentation), for at most 16 bits;
    else None."""
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if bits > 16:
        return None
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=np.int32)
    return np.arange(0, 2**bits, dtype=np.int32)


def voi_lut(
    arr: np.ndarray, ds, index: int, window: str, image_range: Optional[tuple] = None
) -> np.ndarray:
    """Modality values -> [0, 1]. ``file``: the file's VOI LUT or window (C.11.2), its output
    range spanning [0, 1], else (as viewers do) the image's own range; ``minmax``: the image's
    own range (``image_range``, else ``arr``'s); ``none``: the range the header allows
    (BitsStored through the modality LUT)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    if window == "minmax" or (window == "file" and not has_voi):
        lo, hi = image_range or (float(arr.min()), float(arr.max()))
    else:
        probe = _stored_range(ds)
        if probe is not None:
            probe = apply_modality_lut(probe, ds)
        if window == "file" and has_voi:
            arr = apply_voi_lut(arr, ds, index=index)
            if probe is not None:
                probe = apply_voi_lut(probe, ds, index=index)
        if probe is None:  # 32-bit data: the image's own range
            lo, hi = float(arr.min()), float(arr.max())
        else:
            lo, hi = float(np.min(probe)), float(np.max(probe))
    arr = np.asarray(arr, dtype=np.float32)
    if hi <= lo:
        return np.zeros_like(arr)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def grayscale(arr: np.ndarray, ds, index: int, window: str) -> np.ndarray:
    """Stored values -> [0, 1]: :func:`modality_lut`, :func:`voi_lut`, :func:`presentation`.
    Integer data of up to 16 bits go through a table of the chain over every value the header
    allows (as viewers do): the same numbers, one look-up a pixel instead of float passes."""
    probe = _stored_range(ds)
    if probe is None or arr.dtype.kind not in "iu":
        return presentation(voi_lut(modality_lut(arr, ds), ds, index, window), ds)
    rows = np.clip(arr.astype(np.int64) - int(probe[0]), 0, len(probe) - 1)
    values = modality_lut(probe, ds)
    used = values[int(rows.min()) : int(rows.max()) + 1]
    table = voi_lut(values, ds, index, window, (float(used.min()), float(used.max())))
    return presentation(np.asarray(table, dtype=np.float32), ds)[rows]


def presentation(arr: np.ndarray, ds) -> np.ndarray:
    """MONOCHROME1 (low values white) and Presentation LUT Shape INVERSE shown inverted
    (C.11.6): one inversion, as the standard pairs the two."""
    inverse = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    inverse = inverse or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    return 1.0 - arr if inverse else arr


def colour(arr: np.ndarray, ds) -> np.ndarray:
    """Palette indices through the palette; RGB values scaled to [0, 1] by their bit depth."""
    from pydicom.pixels import apply_color_lut

    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 8 if arr.dtype == np.uint8 else 16
    return np.clip(np.asarray(arr, dtype=np.float32) / float(2**bits - 1), 0.0, 1.0)


def read_dicom(path, options: DicomOptions = DEFAULT_DICOM, draft_size: Optional[int] = None) -> tuple:
    """``(pixels, (width, height, mode, bit depth))``: float32 pixels in [0, 1], ``(H, W)``
    for grayscale, ``(H, W, 3)`` RGB for colour; the header facts are the file's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on every lenient value; errors are ours
        return _read_dicom(path, options, draft_size)


def _read_dicom(path, options: DicomOptions, draft_size: Optional[int]) -> tuple:
    ds = _read(path)
    rows, cols, samples, _, index = check_header(ds, path, options.frame)
    arr = decode_frame(ds, path, index, draft_size)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    try:
        if samples == 1 and photometric != "PALETTE COLOR":
            arr = grayscale(arr, ds, index, options.window)
            mode = photometric
        else:
            arr, mode = colour(arr, ds), "RGB"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise _fail(path, f"cannot apply the file's LUTs ({type(exc).__name__}: {_line(exc)})") from None
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise _fail(path, f"decoded to shape {arr.shape}; expected one frame of {rows} x {cols}")
    if not np.isfinite(arr).all():
        raise _fail(path, "the LUTs give non-finite values")
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    return np.ascontiguousarray(arr, dtype=np.float32), (cols, rows, mode, bits)
