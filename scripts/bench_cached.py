"""The cached path's start-up, measured against importing torch, side by side in one run.

    python scripts/bench_cached.py [--data ../shared/data/chest_xray224] [--rounds 7] [--json FILE]

Each of ``--rounds`` rounds times, one after the other, a fresh process of each (wall clock,
this machine), so that the machine's drift hits all four alike; the figures are the median over
the rounds of each round's own ratios:

- ``import torch``: ``python -c "import torch"``, the cost every torch-based command pays;
- a cache-hit ``xfeat extract`` (the entry exists: the request is answered from the cache
  index, found by the data's file listing);
- the libraries every scikit-learn head needs (numpy, h5py, click, ``LogisticRegression``),
  imported by a bare ``python -c``: the floor under fit-head's overhead;
- ``xfeat fit-head`` on the same cached entry (logistic head, C and threshold chosen on val,
  1000-resample bootstrap), whole command, and its own fit + evaluate seconds as it records
  them in results.json.

It prints the ratios the design promises: a cache hit at most half of ``import torch``, and
fit-head's overhead (whole command minus fit + evaluate) at most 0.6x ``import torch``, as the
median of the rounds' own ratios and as best against best. The xfeat processes run the console
entry point as users do (``python -m xfeat``), each checked not to import torch, with xfeat's
bytecode compiled first as ``pip install`` compiles it.

The first run extracts the features once (a few minutes on a CPU) if the cache lacks them.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
# The console entry point as users run it, which fails (status 3) if torch was imported: the
# check is an exit handler because the entry point may end the process without returning.
CHECK = (
    "import atexit, os, runpy, sys\n"
    "def no_torch():\n"
    "    if 'torch' in sys.modules:\n"
    "        sys.stderr.write('torch was imported\\n')\n"
    "        sys.stderr.flush()\n"
    "        os._exit(3)\n"
    "atexit.register(no_torch)\n"
    "sys.argv = ['xfeat', *sys.argv[1:]]\n"
    "runpy.run_module('xfeat', run_name='__main__')\n"
)

FLOOR = "import numpy, h5py, click; from sklearn.linear_model import LogisticRegression"


def timed(cmd: list) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{out.stderr[-3000:]}")
    return seconds


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(SHARED / "data" / "chest_xray224"))
    ap.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"))
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    request = ["--data", args.data, "--model", args.model, "--weights", args.weights]
    request += ["--cache-dir", args.cache_dir]
    # Once, untimed: extract (or find) the entry, so that it is in the cache and its index.
    subprocess.run(
        [sys.executable, "-m", "xfeat", "-q", "extract", *request], check=True, capture_output=True
    )
    # Python keeps each module's compiled bytecode (pip compiles a package when it installs
    # it; an editable install writes it on first import). Where PYTHONDONTWRITEBYTECODE is set,
    # as on the machine this was written on, xfeat's own modules would instead be compiled from
    # source on every run (0.1 s), so compile them once first, as pip does.
    package = Path(__file__).resolve().parents[1] / "xfeat"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    python = [sys.executable]
    out = Path(tempfile.mkdtemp(prefix="xfeat-bench-cached-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # no copies left behind
    rounds = []
    for i in range(args.rounds):
        torch_s = timed([*python, "-c", "import torch"])
        floor_s = timed([*python, "-c", FLOOR])  # the libraries no scikit-learn head can skip
        extract_s = timed([*python, "-c", CHECK, "-q", "extract", *request])
        run_dir = out / f"run{i}"
        fit_s = timed([*python, "-c", CHECK, "-q", "fit-head", *request, "--out", str(run_dir)])
        timing = json.loads((run_dir / "results.json").read_text())["timing"]
        own = timing["fit_seconds"] + timing["evaluate_seconds"]
        rounds.append(
            {
                "import_torch_seconds": torch_s,
                "library_imports_seconds": floor_s,
                "cache_hit_extract_seconds": extract_s,
                "fit_head_seconds": fit_s,
                "fit_head_fit_evaluate_seconds": own,
                "extract_over_import_torch": extract_s / torch_s,
                "fit_head_overhead_over_import_torch": (fit_s - own) / torch_s,
                "library_imports_over_import_torch": floor_s / torch_s,
            }
        )
        r = rounds[-1]
        print(
            f"round {i + 1}: import torch {torch_s:.3f} s, libraries {floor_s:.3f} s, "
            f"extract {extract_s:.3f} s ({r['extract_over_import_torch']:.2f}x), fit-head "
            f"{fit_s:.3f} s of which fit + evaluate {own:.3f} s (overhead "
            f"{r['fit_head_overhead_over_import_torch']:.2f}x)",
            flush=True,
        )
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    best = {k: min(r[k] for r in rounds) for k in rounds[0] if k.endswith("_seconds")}
    best["extract_over_import_torch"] = best["cache_hit_extract_seconds"] / best["import_torch_seconds"]
    best_fit = min(rounds, key=lambda r: r["fit_head_seconds"])  # its own fit + evaluate
    best["fit_head_overhead_over_import_torch"] = (
        best_fit["fit_head_seconds"] - best_fit["fit_head_fit_evaluate_seconds"]
    ) / best["import_torch_seconds"]
    figures = {"rounds": rounds, "median": median, "best": best}
    print(f"\nmedian of {len(rounds)} rounds (each figure and ratio taken within its round):")
    print(f"import torch                      {median['import_torch_seconds']:.3f} s")
    print(
        f"xfeat extract (cache hit)         {median['cache_hit_extract_seconds']:.3f} s  = "
        f"{median['extract_over_import_torch']:.2f}x import torch (target <= 0.5)"
    )
    print(
        f"xfeat fit-head (whole command)    {median['fit_head_seconds']:.3f} s  "
        f"(fit + evaluate {median['fit_head_fit_evaluate_seconds']:.3f} s)"
    )
    print(
        f"fit-head overhead                 "
        f"{median['fit_head_overhead_over_import_torch']:.2f}x import torch (target <= 0.6)"
    )
    print(
        f"  importing numpy, h5py, click, scikit-learn's LogisticRegression alone (bare "
        f"python -c) {median['library_imports_seconds']:.3f} s = "
        f"{median['library_imports_over_import_torch']:.2f}x import torch"
    )
    print(
        f"best of {len(rounds)} against best: extract {best['extract_over_import_torch']:.2f}x, "
        f"fit-head overhead {best['fit_head_overhead_over_import_torch']:.2f}x import torch"
    )
    print("torch imported by the measured xfeat processes: never (checked in each)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
