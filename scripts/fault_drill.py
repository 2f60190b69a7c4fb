"""Kill -9 drill: `xfeat extract` and `xfeat finetune` killed at random moments, then resumed.

For each phase the drill first runs the command once, uninterrupted, as the reference (its
wall time sets the window in which kills fall). Then it starts the same command in a fresh
output folder and sends SIGKILL to it after a random delay in [0, reference wall time];
every killed process is restarted with the same command (extract resumes by itself,
finetune gets --resume), until the command finishes; then a new round starts in a fresh
folder, until --kills kills have landed. A process that finishes before its kill ends the
round early and is not counted as a kill.

After every kill the drill reads what is on disk (the cache's rows written so far; the
checkpoint's epochs and history) and checks it at the next observation (the next kill or
the finished run):

- extract: rows lost = rows present after a kill that are missing or different after the
  restart, or that the restart's log says it threw away ("starting it again").
- finetune: epochs lost = checkpointed epochs missing or changed afterwards; epochs
  duplicated = checkpointed epochs trained again (from the restart's log), plus repeated
  epochs in the final history.

Each finished round is compared with the reference: features (extract); final weights,
history (losses, accuracies, learning rates) and predictions (finetune). Every child runs
with OMP_NUM_THREADS=1, so the expected difference is exactly 0. Exit status 1 when anything
was lost, duplicated or differs, or a restart failed.

    python scripts/fault_drill.py --data ../shared/data/chest_xray224 --kills 20

The phases ``corrupt``, ``disk``, ``readonly`` and ``interrupt`` (scripts/file_faults.py) damage
the files of one small real run set (bit flips, truncation), fill a small tmpfs under each
output, make output folders read-only, and SIGKILL a run at each of its writes; each trial is
classified (detected, recomputed, unaffected, fallback, or the failures SILENT WRONG,
TRACEBACK, UNCLEAR ERROR) into a table of fault, times tried, outcome and files lost. ``disk``
and ``readonly`` mount tmpfs folders, so they need root.

    python scripts/fault_drill.py --phases corrupt,disk,readonly,interrupt --trials 5 --json t.json
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import file_faults  # scripts/ is on sys.path when run as a script
import h5py
import numpy as np
import torch
from bench_extract import make_subset

import xfeat
from xfeat.cache import partial_path
from xfeat.files import dumps

REPO = Path(__file__).resolve().parents[1]
# Timings differ from run to run by nature; everything else in a history entry must not.
KILL_PHASES = ["extract", "finetune"]
FILE_PHASES = ["corrupt", "disk", "readonly", "interrupt"]
_TIMING_KEYS = {"train_seconds", "val_seconds", "seconds", "images_per_second"}


@dataclass
class PhaseResult:
    phase: str
    kills: int = 0
    kills_with_data: int = 0  # kills that found rows / epochs already on disk
    rounds: int = 0
    lost: int = 0
    duplicated: int = 0
    diff_result: float = 0.0  # features (extract) or final weights (finetune)
    diff_history: float = float("nan")
    diff_predictions: float = float("nan")
    seconds: float = 0.0
    reference_seconds: float = 0.0
    stray: list = field(default_factory=list)  # files a finished round has, the reference not
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        diffs = [
            d for d in (self.diff_result, self.diff_history, self.diff_predictions) if not np.isnan(d)
        ]
        return not (self.lost or self.duplicated or self.failures or any(diffs))


def _env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def _start(cmd: list, log: Path) -> subprocess.Popen:
    # Own session: its data-loader workers are a process group the drill can clean up.
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=f, start_new_session=True
        )


def _reap(killed: list) -> None:
    """End what is left of the killed processes' groups (orphaned loader workers)."""
    for proc in killed:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed.clear()


def _files(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}


def _run(cmd: list, log: Path, kill_after, timeout: float, killed: list) -> int:
    """Run ``cmd``; SIGKILL the process (not its workers, as the OOM killer or `kill -9 PID`
    would) after ``kill_after`` seconds unless it has finished. Its exit status."""
    proc = _start(cmd, log)
    try:
        proc.wait(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed.append(proc)
        if kill_after is None:
            return -999  # hung
    return proc.returncode


def _written_rows(group: h5py.Group) -> np.ndarray:
    """The rows of one split written so far: its features dataset, or its blocks side by
    side (a cache with several feature blocks keeps one dataset per block in a group)."""
    done, features = int(group["rows_done"][0]), group["features"]
    if isinstance(features, h5py.Dataset):
        return features[:done]
    return np.concatenate([features[name][:done] for name in sorted(features)], axis=1)


class ExtractPhase:
    name = "extract"

    def __init__(self, root: Path, model: str, batch_size: int, image_size, loader: list):
        self.args = ["--data", str(root), "--model", model, "--weights", "none"]
        self.args += ["--batch-size", str(batch_size), *loader]
        if image_size:
            self.args += ["--image-size", str(image_size)]
        self.entry = xfeat.plan_extraction(
            root, model, cache_dir="cache", image_size=image_size
        ).path.name

    def command(self, out: Path, first: bool) -> list:
        return [sys.executable, "-m", "xfeat", "extract", *self.args, "--cache-dir", str(out)]

    def state(self, out: Path) -> dict:
        """Rows written so far, per split (complete entry first, else the partial file)."""
        for path in (out / self.entry, partial_path(out / self.entry)):
            if path.exists():
                try:
                    with h5py.File(path, "r", locking=False) as f:
                        return {s: _written_rows(f[s]) for s in f}
                except (OSError, KeyError):  # killed while the file was being created
                    return {}
        return {}

    @staticmethod
    def has_data(state: dict) -> bool:
        return any(len(v) for v in state.values())

    @staticmethod
    def lost_and_duplicated(before: dict, after: dict, log: str) -> tuple:
        lost = 0
        for split, rows in before.items():
            now = after.get(split, rows[:0])
            n = min(len(rows), len(now))
            same = (rows[:n] == now[:n]) | (np.isnan(rows[:n]) & np.isnan(now[:n]))
            lost += len(rows) - n + int((~same.all(axis=1)).sum())
        if re.search(r"starting (it|the extraction) again", log):  # the partial was discarded
            lost = max(lost, sum(len(v) for v in before.values()))
        m = re.search(r"rows already written (\{.*?\})", log)
        if m:
            resumed = ast.literal_eval(m.group(1))
            lost = max(lost, sum(max(0, len(v) - resumed.get(s, 0)) for s, v in before.items()))
        return lost, 0

    def compare(self, out: Path, reference: Path, result: PhaseResult) -> None:
        a = xfeat.read_cache(out / self.entry, include_skipped=True)
        b = xfeat.read_cache(reference / self.entry, include_skipped=True)
        for split in b.splits:
            if a[split].ids != b[split].ids:
                result.failures.append(f"{split}: ids differ from the uninterrupted run")
                continue
            diff = np.abs(a[split].features.astype(np.float64) - b[split].features)
            result.diff_result = max(result.diff_result, float(np.nanmax(diff, initial=0)))


class FinetunePhase:
    name = "finetune"

    def __init__(self, root: Path, model: str, image_size: int, epochs: int, loader: list):
        self.args = [
            "--data",
            str(root),
            "--model",
            model,
            "--weights",
            "none",
            "--image-size",
            str(image_size),
            "--epochs",
            str(epochs),
            "--n-boot",
            "20",
            *loader,
        ]
        self.epochs = epochs

    def command(self, out: Path, first: bool) -> list:
        return [
            sys.executable,
            "-m",
            "xfeat",
            "finetune",
            *self.args,
            "--cache-dir",
            str(out / "cache"),
            "--out",
            str(out / "run"),
            *([] if first else ["--resume"]),
        ]

    @staticmethod
    def state(out: Path) -> list:
        """The checkpointed history (one entry per finished epoch)."""
        try:
            return torch.load(out / "run" / "checkpoint.pt", weights_only=True)["history"]
        except FileNotFoundError:
            return []

    @staticmethod
    def has_data(state: list) -> bool:
        return bool(state)

    @staticmethod
    def lost_and_duplicated(before: list, after: list, log: str) -> tuple:
        kept = next(
            (i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after))
        )
        retrained = [int(e) for e in re.findall(r"epoch (\d+)/\d+: train loss", log)]
        return len(before) - kept, sum(e <= len(before) for e in retrained)

    def compare(self, out: Path, reference: Path, result: PhaseResult) -> None:
        history = self.state(out)
        epochs = [h["epoch"] for h in history]
        result.duplicated += len(epochs) - len(set(epochs))
        if epochs != list(range(1, self.epochs + 1)):
            result.failures.append(f"final history has epochs {epochs}")
            return
        ref = self.state(reference)
        result.diff_history = max(
            np.nan_to_num(result.diff_history),
            max(abs(a[k] - b[k]) for a, b in zip(history, ref) for k in a if k not in _TIMING_KEYS),
        )
        weights = [
            torch.load(d / "run" / "checkpoint.pt", weights_only=True)["model"] for d in (out, reference)
        ]
        result.diff_result = max(
            result.diff_result,
            max((a.double() - weights[1][k].double()).abs().max().item() for k, a in weights[0].items()),
        )
        with (
            np.load(out / "run" / "predictions.npz") as a,
            np.load(reference / "run" / "predictions.npz") as b,
        ):
            diff = max(
                (
                    float(np.abs(a[k] - b[k]).max(initial=0))
                    for k in b.files
                    if np.issubdtype(b[k].dtype, np.number)
                ),
                default=0.0,
            )
        result.diff_predictions = max(np.nan_to_num(result.diff_predictions), diff)


def drill(phase, kills: int, work: Path, rng: random.Random) -> PhaseResult:
    result = PhaseResult(phase.name)
    reference = work / f"{phase.name}-reference"
    t0 = time.perf_counter()
    killed = []
    rc = _run(
        phase.command(reference, first=True), work / f"{phase.name}-reference.log", None, 1800, killed
    )
    result.reference_seconds = time.perf_counter() - t0
    if rc != 0:
        result.failures.append(
            f"the uninterrupted run failed (status {rc}); see {work / f'{phase.name}-reference.log'}"
        )
        return result
    window, timeout = result.reference_seconds, 20 * result.reference_seconds + 60
    t0 = time.perf_counter()
    while result.kills < kills and not result.failures:
        out = work / f"{phase.name}-round{result.rounds + 1}"
        before, first, attempt = phase.state(out), True, 0
        while True:
            attempt += 1
            log = out.with_name(f"{out.name}-attempt{attempt}.log")
            kill_after = rng.uniform(0, window) if result.kills < kills else None
            rc = _run(phase.command(out, first), log, kill_after, timeout, killed)
            first = False
            after = phase.state(out)
            lost, duplicated = phase.lost_and_duplicated(before, after, log.read_text())
            result.lost += lost
            result.duplicated += duplicated
            if rc == -signal.SIGKILL and kill_after is not None:
                result.kills += 1
                result.kills_with_data += phase.has_data(after)
                before = after
                continue
            if rc != 0:
                tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
                result.failures.append(f"{log.name}: exit status {rc}:\n{tail}")
            break
        _reap(killed)
        if not result.failures:
            phase.compare(out, reference, result)
            stray = sorted(_files(out) - _files(reference))
            result.stray += [f"{p} ({(out / p).stat().st_size} bytes)" for p in stray]
        result.rounds += 1
        shutil.rmtree(out, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    return result


def _fmt(x: float) -> str:
    return "—" if np.isnan(x) else f"{x:.3g}"


def format_table(results: list) -> str:
    header = [
        "phase",
        "kills",
        "kills w/ data on disk",
        "rounds",
        "lost",
        "duplicated",
        "max|Δ| features/weights",
        "max|Δ| history",
        "max|Δ| predictions",
        "stray files",
        "wall s (drill)",
        "wall s (1 run)",
        "ok",
    ]
    rows = [
        [
            r.phase,
            str(r.kills),
            str(r.kills_with_data),
            str(r.rounds),
            str(r.lost),
            str(r.duplicated),
            _fmt(r.diff_result),
            _fmt(r.diff_history),
            _fmt(r.diff_predictions),
            str(len(r.stray)),
            f"{r.seconds:.0f}",
            f"{r.reference_seconds:.1f}",
            "yes" if r.ok else "NO",
        ]
        for r in results
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/chest_xray224")
    parser.add_argument("--kills", type=int, default=20, help="kills per phase")
    parser.add_argument(
        "--phases",
        default="extract,finetune",
        help=f"comma-separated, of: {','.join(KILL_PHASES + FILE_PHASES)}",
    )
    parser.add_argument("--extract-images", type=int, default=200)
    parser.add_argument("--extract-model", default="resnet18")
    parser.add_argument("--extract-image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--finetune-images", type=int, default=60)
    parser.add_argument("--finetune-model", default="resnet18")
    parser.add_argument("--finetune-image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="data-loader processes of both commands [default: xfeat's]",
    )
    parser.add_argument("--trials", type=int, default=5, help="corrupt: trials per file and fault")
    parser.add_argument("--fault-images", type=int, default=40, help="images of the file-fault runs")
    parser.add_argument(
        "--interrupt-limit", type=int, default=0, help="interrupt: kill at the first N writes [all]"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the fault table here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument(
        "--keep", type=Path, default=None, help="work in this folder and keep it (logs, outputs)"
    )
    args = parser.parse_args(argv)
    names = args.phases.split(",")
    unknown = sorted(set(names) - set(KILL_PHASES + FILE_PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}")

    rng = random.Random(args.seed)
    loader = [] if args.num_workers is None else ["--num-workers", str(args.num_workers)]
    results, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        phases = {
            "extract": lambda: ExtractPhase(
                make_subset(args.data, work / "extract-data", args.extract_images),
                args.extract_model,
                args.batch_size,
                args.extract_image_size,
                loader,
            ),
            "finetune": lambda: FinetunePhase(
                make_subset(args.data, work / "finetune-data", args.finetune_images),
                args.finetune_model,
                args.finetune_image_size,
                args.epochs,
                loader,
            ),
        }
        for name in (n for n in names if n in KILL_PHASES):
            result = drill(phases[name](), args.kills, work, rng)
            results.append(result)
            for failure in result.failures:
                print(f"{name}: {failure}", file=sys.stderr)
        if any(n in FILE_PHASES for n in names):
            rows = file_phases(names, args, work, rng)
    workers = "xfeat's default" if args.num_workers is None else args.num_workers
    if results:
        print(
            f"kill -9 drill, seed {args.seed}, {args.kills} kills per phase, loader workers "
            f"{workers}, OMP_NUM_THREADS=1, data {args.data}"
        )
        print(format_table(results))
    for r in results:
        if r.stray:
            print(
                f"{r.phase}: stray files in finished rounds: {', '.join(r.stray[:5])}"
                + (f" and {len(r.stray) - 5} more" if len(r.stray) > 5 else "")
            )
    if rows:
        print(
            f"file-fault drill, seed {args.seed}, {args.trials} trials per damaged file and "
            f"fault, {args.fault_images} images at 64 px, resnet18 random init"
        )
        print(file_faults.format_rows(rows))
        for r in rows:
            for note in r.notes if not r.ok else []:
                print(f"{r.fault}: {note}", file=sys.stderr)
    if args.json:
        table = {
            "kill9": [{**vars(r), "ok": r.ok} for r in results],
            "faults": [r.to_dict() for r in rows],
        }
        args.json.write_text(dumps(table) + "\n")  # strict JSON: NaN is null
    return 0 if all(r.ok for r in results) and all(r.ok for r in rows) else 1


def file_phases(names: list, args, work: Path, rng: random.Random) -> list:
    """The file-fault phases on one small real run set, made once."""
    runs = file_faults.RunSet(make_subset(args.data, work / "faults-data", args.fault_images), work)
    runs.build()
    rows = []
    if os.geteuid() != 0 and {"disk", "readonly"} & set(names):
        print("disk and readonly mount tmpfs folders: run the drill as root", file=sys.stderr)
        names = [n for n in names if n not in ("disk", "readonly")]
    if "corrupt" in names:
        rows += file_faults.corrupt_phase(runs, args.trials, rng)
    if "disk" in names:
        rows += file_faults.disk_phase(runs)
    if "readonly" in names:
        rows += file_faults.readonly_phase(runs)
    if "interrupt" in names:
        rows += file_faults.interrupt_phase(runs, args.interrupt_limit)
    return rows


if __name__ == "__main__":
    sys.exit(main())
