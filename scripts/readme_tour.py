"""Run the README's command-line examples, one by one, offline, on a small copy of the data.

    python scripts/readme_tour.py [--data ../shared/data/chest_xray224] [--n 240] [--keep DIR]

Every ``xfeat ...`` line of the README's bash blocks (continuation lines joined) and the
``python scripts/...`` lines they rely on run in a scratch folder, in order, with ``$D`` a
stratified subset of ``--n`` shared images under the same folder name (so the run folders the
README names exist) and ``$W`` the shared MobileNetV2 weights. ``some/xrays/`` is the
subset's test folder; the label tables are written over the subset, inside the scratch
folder. Without a network (``unshare -n`` when it can be used, else the hub libraries'
offline switches), an example that needs a model hub must fail at once in one line that says
how to download the model; every other example must succeed. Prints a table: line, exit
status, seconds, verdict; exits 1 when an example does not behave as stated.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HUB = re.compile(r"hf:microsoft|hf:facebook|open_clip:hf-hub|\$\(hf download")


def examples(readme: Path) -> list:
    """The README's ``xfeat`` and ``python scripts/`` lines, continuation lines joined."""
    lines, out, block = readme.read_text().splitlines(), [], False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            block = line.strip() == "```bash"
        elif block and re.match(r"(xfeat|python scripts/)\S* ", line):
            text = line
            while text.rstrip().endswith("\\"):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            out.append(text.split("  #")[0].strip())
        i += 1
    return out


def subset(data: Path, n: int, out: Path) -> Path:
    """``n`` images (every k-th per class and split) as links, under ``out / data.name``."""
    root = out / data.name
    files = {p: sorted(p.glob("*.jpeg")) for p in sorted(data.glob("*/*")) if p.is_dir()}
    total = sum(len(v) for v in files.values())
    for folder, paths in files.items():
        take = max(2, round(n * len(paths) / total))
        target = root / folder.relative_to(data)
        target.mkdir(parents=True, exist_ok=True)
        for p in paths[:: max(1, len(paths) // take)][:take]:
            os.symlink(p, target / p.name)
    return root


def offline_prefix() -> list:
    """``unshare -n`` (no network at all) when this process may use it, else nothing."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"]).returncode == 0:
        return ["unshare", "-n"]
    return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "chest_xray224")
    ap.add_argument(
        "--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
    )
    ap.add_argument("--n", type=int, default=240, help="images in the copy of the data")
    ap.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary folder)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per example")
    args = ap.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="xfeat-readme-"))
    if not args.keep:
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    data = subset(args.data.resolve(), args.n, work / "data")
    env = {
        **os.environ,
        "D": str(data),
        "W": str(args.weights.resolve()),
        "BIOMEDCLIP": "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        "HF_HUB_OFFLINE": "1",  # also where unshare cannot be used
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    prefix = offline_prefix()
    rows, failed = [], 0
    for text in examples(REPO / "README.md"):
        command = text.replace("../shared/data/chest_xray224", "$D").replace("some/xrays/", "$D/test/")
        command = command.replace("python scripts/", f"{shlex.quote(sys.executable)} {REPO}/scripts/")
        command = command.replace("/tmp/tables", "tables")  # inside the scratch folder
        if "kermany_tables.py" in command and "--data" not in command:
            command += " --data $D"  # tables over the copy, not the whole data set
        t0 = time.perf_counter()
        done = subprocess.run(
            [*prefix, "bash", "-c", command],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        seconds = time.perf_counter() - t0
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
        if HUB.search(text):  # needs a hub: a fast one-line error saying how to download
            ok = (
                done.returncode in (1, 2)  # 2: click's usage error (an empty --weights)
                and "Traceback" not in done.stderr
                and len(errors) == 1
                and "download" in errors[0]
                and seconds < 60
            )
            verdict = (
                "offline error, one line" if ok else "FAILED: " + (errors or ["no error line"])[0][:120]
            )
        else:
            ok = done.returncode == 0
            verdict = "ok" if ok else "FAILED: " + (done.stderr.strip().splitlines() or ["?"])[-1][:120]
        failed += not ok
        rows.append((text if len(text) <= 90 else text[:87] + "...", done.returncode, seconds, verdict))
        print(
            f"[{len(rows)}] {rows[-1][0]}: exit {done.returncode}, {seconds:.1f} s, {verdict}",
            flush=True,
        )
    print(
        f"\nREADME examples, offline ({'unshare -n' if prefix else 'HF_HUB_OFFLINE=1'}), "
        f"{args.n} images of {args.data.name}"
    )
    print("| example | exit | s | verdict |\n|---|---|---|---|")
    for text, rc, seconds, verdict in rows:
        print(f"| `{text}` | {rc} | {seconds:.1f} | {verdict} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
