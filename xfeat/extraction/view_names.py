"""The names of image views, parsed without torch: ``--tta`` specs, test-time view names and
augmented train view names (the pixels are made in :mod:`xfeat.extraction.views`)."""

from __future__ import annotations

from typing import Sequence, Union

from xfeat.errors import ConfigError

TTA_KINDS = ("flip", "crops")
CORNERS = ("crop_tl", "crop_tr", "crop_bl", "crop_br")


def parse_tta(spec: Union[str, Sequence[str], None]) -> tuple:
    """``"flip"``, ``"crops"``, ``"flip,crops"`` or None -> the kinds, in a fixed order."""
    if not spec:
        return ()
    kinds = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [k for k in kinds if k not in TTA_KINDS]
    if bad:
        raise ConfigError(f"--tta {spec!r}: expected flip, crops or flip,crops")
    return tuple(k for k in TTA_KINDS if k in kinds)


def tta_views(kinds: tuple) -> list:
    """The view names a TTA spec stores for val and test (the centre crop is the split)."""
    views = []
    if "flip" in kinds:
        views.append("flip")
    if "crops" in kinds:
        views += list(CORNERS)
        if "flip" in kinds:
            views += [f"flip_{c}" for c in CORNERS]
    return views


def train_views(k: int) -> list:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"--views {k!r}: expected an integer >= 0 (augmented views per train image)")
    return [f"view{i}" for i in range(1, k + 1)]
