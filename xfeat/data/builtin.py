"""Built-in datasets: MedMNIST's published ``.npz`` files, downloaded once with a checksum.

Set ``XFEAT_DATASETS_URL`` to a mirror (a folder URL holding the same file names) on machines
that cannot reach Zenodo.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Union

from tqdm.auto import tqdm

from xfeat.config import default_cache_dir
from xfeat.errors import DataError, DownloadError  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

ZENODO_URL = "https://zenodo.org/records/10519652/files"
# name -> (file name, md5 published by MedMNIST v3, class names)
_PNEUMONIA = ["normal", "pneumonia"]
_BREAST = ["malignant", "normal, benign"]
BUILTIN = {
    "pneumoniamnist": ("pneumoniamnist.npz", "28209eda62fecd6e6a2d98b1501bb15f", _PNEUMONIA),
    "pneumoniamnist_64": ("pneumoniamnist_64.npz", "8f4eceb4ccffa70c672198ea285246c6", _PNEUMONIA),
    "pneumoniamnist_128": ("pneumoniamnist_128.npz", "05b46931834c231683c68f40c47b2971", _PNEUMONIA),
    "pneumoniamnist_224": ("pneumoniamnist_224.npz", "d6a3c71de1b945ea11211b03746c1fe1", _PNEUMONIA),
    "breastmnist": ("breastmnist.npz", "750601b1f35ba3300ea97c75c52ff8f6", _BREAST),
    "breastmnist_224": ("breastmnist_224.npz", "b56378a6eefa9fed602bb16d192d4c8b", _BREAST),
}


def names() -> list:
    return sorted(BUILTIN)


def class_names(name: str) -> list:
    return list(BUILTIN[name][2])


def download(
    name: str,
    *,
    cache_dir: Union[str, Path, None] = None,
    base_url: Optional[str] = None,
    timeout: float = 30.0,
) -> Path:
    """Return the local path of built-in dataset ``name``, downloading and verifying it once."""
    if name not in BUILTIN:
        raise DataError(f"unknown built-in dataset {name!r}; expected one of: {', '.join(names())}")
    file_name, md5, _ = BUILTIN[name]
    target = Path(cache_dir or default_cache_dir()) / "datasets" / file_name
    if target.is_file():
        return target
    base = (base_url or os.environ.get("XFEAT_DATASETS_URL") or ZENODO_URL).rstrip("/")
    url = f"{base}/{file_name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    logger.info("downloading %s from %s", name, url)
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=file_name, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download built-in dataset {name!r} from {url}: {exc}. If this machine is "
            f"offline, fetch {file_name} elsewhere and either put it at {target}, pass the file "
            "with --data /path/to/file.npz, or set XFEAT_DATASETS_URL to a mirror"
        ) from None
    if digest.hexdigest() != md5:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5};"
            " the download was corrupted or the mirror serves another file"
        )
    os.replace(partial, target)
    return target
