"""DICOM decode throughput against JPEG, side by side in one run, on one core.

    python scripts/bench_dicom_decode.py [--data ../shared/data/chest_xray224] [--n 200] [--large 50]

``--n`` shared test X-rays (224x224 JPEGs) are written as DICOM into a temporary folder in
each encoding of ``scripts/dicom_copies.py`` (native 8-bit MONOCHROME2, MONOCHROME1 12-bit with
rescale and window, RLE, the JPEG bytes encapsulated), then decoded as xfeat does for a
network of input 224 (``read_image_file(draft_size=256)``, then the resize and centre crop),
best of three passes. ``--large`` of them are also enlarged to 1400x1000 grayscale JPEGs
(quality 90) first: there the encapsulated JPEG is decoded at a reduced scale by libjpeg, as
JPEG files are, while the other encodings decode every pixel. Images/s per core and the ratio
to the JPEG files.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dicom_copies import ENCODINGS, write_copy
from PIL import Image

from xfeat.backbones.preprocessing import Preprocessing
from xfeat.data.images import read_image_file

SHARED = Path(__file__).resolve().parents[2] / "shared"


def rate(files, prep: Preprocessing, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in files:
            prep.resize_and_crop(read_image_file(f, draft_size=prep.resize_size))
        best = min(best, time.perf_counter() - t0)
    return len(files) / best


def compare(jpegs: list, work: Path, title: str, prep: Preprocessing) -> dict:
    results = {"jpeg file (PIL)": rate(jpegs, prep)}
    for encoding in ENCODINGS:
        folder = work / encoding
        folder.mkdir(parents=True)
        copies = [write_copy(j, folder / f"{j.stem}.dcm", encoding) for j in jpegs]
        results[f"dicom {encoding}"] = rate(copies, prep)
    base = results["jpeg file (PIL)"]
    print(f"{title} ({len(jpegs)} images)")
    for name, value in results.items():
        print(f"  {name:22s} {value:8.1f} img/s per core   {value / base:5.2f} x JPEG")
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "chest_xray224")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--large", type=int, default=50)
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    sources = sorted((args.data / "test").rglob("*.jpeg"))[: args.n]
    prep = Preprocessing()
    with tempfile.TemporaryDirectory(prefix="xfeat-dicom-") as tmp:
        work = Path(tmp)
        results = {"224x224": compare(sources, work / "small", "224x224 shared X-rays", prep)}
        large = []
        (work / "large").mkdir()
        for f in sources[: args.large]:
            with Image.open(f) as im:
                big = im.convert("L").resize((1400, 1000), Image.BICUBIC)
            big.save(work / "large" / f.name, quality=90)
            large.append(work / "large" / f.name)
        results["1400x1000"] = compare(large, work / "large-dicom", "1400x1000 grayscale", prep)
    return results


if __name__ == "__main__":
    main()
