"""What the training images looked like: the input profile that ``predict`` checks new images
against, and the geometry it brings them to.

Every image read for extraction (or prediction) gets one row of :data:`STAT_COLUMNS`: its
width and height as a viewer shows it (EXIF orientation applied) and its colour mode and bit
depth, all read from the file's header (the decoder reads them anyway: no second pass), and
the mean and standard deviation of the preprocessed tensor the network receives. The feature
cache stores these rows beside the features; :func:`summarize` turns a split's rows into its
profile (quantiles of sizes, aspect ratios and intensities; counts of modes and bit depths).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

STAT_COLUMNS = ("width", "height", "mode", "bit_depth", "mean", "std")
# PIL modes (and "array" for npz rows), coded by their index; unknown modes get the last code.
# Codes are stored in caches: new modes go after "other", whose code must not move.
MODES = (
    "1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA", "I", "I;16", "F", "array", "other",
    "MONOCHROME1", "MONOCHROME2",  # DICOM grayscale (PhotometricInterpretation)
)  # fmt: skip
_BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
QUANTILES = (0.0, 0.01, 0.5, 0.99, 1.0)
SAME_GEOMETRY = 0.02  # sizes or aspect ratios within 2% are the same geometry
_EXIF_ROTATED = (5, 6, 7, 8)  # orientations that swap width and height


def header_info(image) -> tuple:
    """``(width, height, mode, bit depth)`` of an opened, not yet decoded PIL image, as a
    viewer shows it (EXIF orientations 5-8 swap width and height)."""
    width, height = image.size
    try:
        if image.getexif().get(0x0112) in _EXIF_ROTATED:
            width, height = height, width
    except Exception:  # a damaged EXIF block: the pixels still decode
        pass
    return width, height, image.mode, bit_depth(image.mode)


def bit_depth(mode: str) -> int:
    return _BITS.get(mode, 8)


def mode_code(mode: str) -> int:
    return MODES.index(mode) if mode in MODES else MODES.index("other")


def stat_row(header: tuple, crop: np.ndarray, mean, std) -> np.ndarray:
    """One row of :data:`STAT_COLUMNS`: the header facts and the intensity of the
    ``(H, W, 3)`` uint8 crop after normalisation with ``mean``/``std`` (averaged over channels;
    estimated on every 4th pixel of every 4th row: 1/16 of the pixels, ~0.05 ms a crop)."""
    width, height, mode, bits = header
    pixels = crop[::4, ::4].reshape(-1, 3).astype(np.float32) / 255.0
    normalised = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.array(
        [width, height, mode_code(mode), bits, normalised.mean(), normalised.std()], dtype=np.float32
    )


def empty_row() -> np.ndarray:
    """The row of an image that could not be read."""
    return np.full(len(STAT_COLUMNS), np.nan, dtype=np.float32)


def _quantiles(values: np.ndarray) -> dict:
    q = np.quantile(values, QUANTILES)
    return {f"p{round(100 * p):g}": float(v) for p, v in zip(QUANTILES, q)}


def summarize(rows: np.ndarray) -> Optional[dict]:
    """The profile of one split from its stat rows (unreadable images, all NaN, left out);
    None when no row is usable (a cache written before profiles existed)."""
    rows = np.asarray(rows, dtype=np.float64)
    rows = rows[np.isfinite(rows).all(axis=1)] if rows.size else rows
    if len(rows) == 0:
        return None
    width, height, modes, bits, mean, std = rows.T
    return {
        "n": int(len(rows)),
        "width": _quantiles(width),
        "height": _quantiles(height),
        "aspect": _quantiles(width / height),
        "modes": {MODES[int(c)]: int(n) for c, n in zip(*np.unique(modes, return_counts=True))},
        "bit_depths": {str(int(b)): int(n) for b, n in zip(*np.unique(bits, return_counts=True))},
        "mean": _quantiles(mean),
        "std": _quantiles(std),
        "tensor_mean": float(mean.mean()),
        "tensor_std": float(np.sqrt((std**2 + mean**2).mean() - mean.mean() ** 2)),
    }


def _shared(q: dict) -> Optional[float]:
    """The median when the 1st and 99th percentiles are within 2% of it, else None."""
    mid = q["p50"]
    return (
        mid
        if abs(q["p1"] / mid - 1) <= SAME_GEOMETRY and abs(q["p99"] / mid - 1) <= SAME_GEOMETRY
        else None
    )


def training_geometry(profile: Optional[dict]) -> dict:
    """``{"aspect": a or None, "size": (w, h) or None}``: what the training images share."""
    if not profile:
        return {"aspect": None, "size": None}
    aspect = _shared(profile["aspect"])
    w, h = _shared(profile["width"]), _shared(profile["height"])
    return {"aspect": aspect, "size": (round(w), round(h)) if w and h and aspect else None}


def match_geometry(width: int, height: int, geometry: dict) -> Optional[tuple]:
    """The ``(w, h)`` to resize an image of ``width x height`` to before the recorded
    preprocessing, or None when it already has the training aspect (or there is none): the
    training size when the training images share one, else the training aspect with the long
    side shrunk (never enlarged)."""
    aspect = geometry["aspect"]
    if aspect is None or abs((width / height) / aspect - 1) <= SAME_GEOMETRY:
        return None
    if geometry["size"] is not None:
        return tuple(geometry["size"])
    if width / height > aspect:
        return max(1, round(height * aspect)), height
    return width, max(1, round(width / aspect))


def check_inputs(row: np.ndarray, profile: Optional[dict]) -> list:
    """What of one image falls outside the training profile, as short phrases (``[]``: nothing)."""
    if not profile or not np.isfinite(row).all():
        return []
    width, height, mode, bits, mean, _ = (float(v) for v in row)
    issues = []
    name = MODES[int(mode)]
    if name not in profile["modes"]:
        issues.append(f"mode {name} (training: {', '.join(profile['modes'])})")
    if str(int(bits)) not in profile["bit_depths"]:
        issues.append(f"{int(bits)}-bit (training: {', '.join(profile['bit_depths'])}-bit)")
    tol = 1 + SAME_GEOMETRY
    for what, value, q in (("width", width, profile["width"]), ("height", height, profile["height"])):
        if not q["p0"] / tol <= value <= q["p100"] * tol:
            issues.append(f"{what} {int(value)} (training {int(q['p0'])}-{int(q['p100'])})")
    aspect, qa = width / height, profile["aspect"]
    if not qa["p0"] / tol <= aspect <= qa["p100"] * tol:
        issues.append(f"aspect {aspect:.2f} (training {qa['p0']:.2f}-{qa['p100']:.2f})")
    qm = profile["mean"]
    margin = 0.5 * (qm["p99"] - qm["p1"])  # half the central range either side: tails pass
    if not qm["p1"] - margin <= mean <= qm["p99"] + margin:
        issues.append(f"intensity {mean:.2f} (training {qm['p1']:.2f} to {qm['p99']:.2f})")
    return issues
