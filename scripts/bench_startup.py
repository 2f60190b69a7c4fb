"""Start-up time of the command line against importing torch, measured side by side.

Each command runs in a fresh interpreter ``--repeats`` times, alternating, and the median
wall time is reported; the target is ``xfeat --help`` under 0.3x ``python -c "import torch"``.

    python scripts/bench_startup.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "xfeat --help": [sys.executable, "-m", "xfeat", "--help"],
    "xfeat finetune --help": [sys.executable, "-m", "xfeat", "finetune", "--help"],
    "import xfeat": [sys.executable, "-c", "import xfeat"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    times = {name: [] for name in COMMANDS}
    for cmd in COMMANDS.values():  # warm the file cache once
        subprocess.run(cmd, check=True, capture_output=True)
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(v) for name, v in times.items()}
    ratio = medians["xfeat --help"] / medians["import torch"]
    if args.json:
        print(json.dumps({"median_seconds": medians, "runs": times, "ratio": ratio}, indent=2))
        return
    for name, m in medians.items():
        print(f"{name:<24} median {m:6.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"ratio xfeat --help / import torch = {ratio:.3f}   (target < 0.3)")


if __name__ == "__main__":
    main()
