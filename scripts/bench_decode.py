"""Full-resolution JPEG decoding: libjpeg's draft mode (decode at a reduced scale, as xfeat
does) against decoding at full size, then the same resize to the network's input.

    python scripts/bench_decode.py [--data ../shared/data/chest_xray224] [--n 100]

The shared X-rays are 224x224; their originals were 1-3 Mpixel grayscale JPEGs. ``--n`` test
images are enlarged to 1400x1000 (1.4 Mpixel) and 2000x1500 (3 Mpixel), saved as JPEG
(quality 90, grayscale), and decoded on one core: ``read_image_file(draft_size=256)``
(xfeat's path) and PIL's full decode, each followed by the preprocessing's resize and centre
crop to 224. Images/s per core, and their ratio.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from xfeat.backbones.preprocessing import Preprocessing
from xfeat.data.images import read_image_file

SHARED = Path(__file__).resolve().parents[2] / "shared"


def rate(files, draft: bool, prep: Preprocessing, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in files:
            prep.resize_and_crop(read_image_file(f, draft_size=prep.resize_size if draft else None))
        best = min(best, time.perf_counter() - t0)
    return len(files) / best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "chest_xray224")
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args(argv)
    sources = sorted((args.data / "test").rglob("*.jpeg"))[: args.n]
    work = Path(tempfile.mkdtemp(prefix="xfeat-decode-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # no copies left behind
    prep = Preprocessing()
    results = {}
    small = rate(sources, True, prep)
    print(f"224x224 shared JPEGs            {small:7.1f} img/s per core")
    for w, h in ((1400, 1000), (2000, 1500)):
        files = []
        for i, src in enumerate(sources):
            out = work / f"{w}x{h}_{i:03d}.jpeg"
            Image.open(src).convert("L").resize((w, h), Image.BICUBIC).save(out, quality=90)
            files.append(out)
        draft, full = rate(files, True, prep), rate(files, False, prep)
        results[f"{w}x{h}"] = {"draft": draft, "full": full, "ratio": draft / full}
        print(
            f"{w}x{h} ({w * h / 1e6:.1f} Mpixel)   draft {draft:7.1f} img/s, full {full:7.1f} img/s: "
            f"{draft / full:.2f}x"
        )
    results["224x224"] = small
    return results


if __name__ == "__main__":
    main()
