"""The cached path's start-up, measured against importing torch, side by side in one run.

    python scripts/bench_cached.py [--data ../shared/data/chest_xray224] [--repeats 3] [--json FILE]

Each figure is the best of ``--repeats`` fresh processes (wall clock, this machine):

- ``import torch``: ``python -c "import torch"``, the cost every torch-based command pays;
- a cache-hit ``xfeat extract`` (the entry exists: the request is answered from the cache
  index, found by the data's file listing);
- the libraries every scikit-learn head needs (numpy, h5py, click, ``LogisticRegression``),
  imported by a bare ``python -c``: the floor under fit-head's overhead;
- ``xfeat fit-head`` on the same cached entry (logistic head, C and threshold chosen on val,
  1000-resample bootstrap), whole command, and its own fit + evaluate seconds as it records
  them in results.json.

It prints the ratios the design promises: a cache hit at most half of ``import torch``, and
fit-head's overhead (whole command minus fit + evaluate) at most 0.6x ``import torch``. It
also checks, in each measured process, that torch was never imported.

The first run extracts the features once (a few minutes on a CPU) if the cache lacks them.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECK = (
    "import runpy, sys\n"
    "sys.argv = ['xfeat', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('xfeat', run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    assert not exc.code, exc.code\n"
    "assert 'torch' not in sys.modules, 'torch was imported'\n"
)

FLOOR = "import numpy, h5py, click; from sklearn.linear_model import LogisticRegression"


def best_of(cmd: list, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{out.stderr[-3000:]}")
    return min(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(SHARED / "data" / "chest_xray224"))
    ap.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"))
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    request = [
        "--data",
        args.data,
        "--model",
        args.model,
        "--weights",
        args.weights,
        "--cache-dir",
        args.cache_dir,
    ]
    # Once, untimed: extract (or find) the entry, so that it is in the cache and its index.
    subprocess.run(
        [sys.executable, "-m", "xfeat", "-q", "extract", *request], check=True, capture_output=True
    )

    python = [sys.executable]
    torch_s = best_of([*python, "-c", "import torch"], args.repeats)
    # the floor of any scikit-learn head: the libraries fit-head cannot do without
    floor_s = best_of([*python, "-c", FLOOR], args.repeats)
    extract_s = best_of([*python, "-c", CHECK, "-q", "extract", *request], args.repeats)
    out = Path(tempfile.mkdtemp(prefix="xfeat-bench-cached-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # no copies left behind
    fit_runs = []
    for i in range(args.repeats):
        run_dir = out / f"run{i}"
        t0 = time.perf_counter()
        done = subprocess.run(
            [*python, "-c", CHECK, "-q", "fit-head", *request, "--out", str(run_dir)],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"fit-head failed:\n{done.stderr[-3000:]}")
        timing = json.loads((run_dir / "results.json").read_text())["timing"]
        fit_runs.append((seconds, timing["fit_seconds"] + timing["evaluate_seconds"]))
    fit_s, fit_own = min(fit_runs)
    figures = {
        "import_torch_seconds": torch_s,
        "cache_hit_extract_seconds": extract_s,
        "fit_head_seconds": fit_s,
        "fit_head_fit_evaluate_seconds": fit_own,
        "extract_over_import_torch": extract_s / torch_s,
        "fit_head_overhead_over_import_torch": (fit_s - fit_own) / torch_s,
        "library_imports_seconds": floor_s,
        "fit_head_overhead_beyond_library_imports_seconds": fit_s - fit_own - floor_s,
    }
    print(f"import torch                      {torch_s:.3f} s")
    print(
        f"xfeat extract (cache hit)         {extract_s:.3f} s  = "
        f"{extract_s / torch_s:.2f}x import torch (target <= 0.5)"
    )
    print(f"xfeat fit-head (whole command)    {fit_s:.3f} s  (fit + evaluate {fit_own:.3f} s)")
    print(
        f"fit-head overhead                 {fit_s - fit_own:.3f} s  = "
        f"{(fit_s - fit_own) / torch_s:.2f}x import torch (target <= 0.6)"
    )
    print(
        f"  of which importing numpy, h5py, scikit-learn's LogisticRegression (bare python -c) "
        f"{floor_s:.3f} s = {floor_s / torch_s:.2f}x; xfeat's own {fit_s - fit_own - floor_s:.3f} s"
    )
    print("torch imported by the measured xfeat processes: never (checked in each)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
