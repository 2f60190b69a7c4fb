"""Damaged files, full disks, read-only folders and kills between writes: the drill's phases
beyond kill -9 (``corrupt``, ``disk``, ``readonly``, ``interrupt``), run by fault_drill.py.

Every trial runs a real ``xfeat`` command in a child process on a small set of real images
and classifies what it did:

- ``detected``: exit status non-zero, exactly one line starting with ``Error:`` that names
  the damaged file or folder, no traceback;
- ``recomputed``: the command redid the work (a rerun after the fault) and its numbers equal
  the reference exactly;
- ``unaffected``: a damaged byte that does not matter (zip padding, a timing); the outcome
  equals the reference exactly;
- ``fallback``: a documented fallback (compiling on a nearly full disk runs eagerly, with a
  warning), its numbers equal to the reference;
- ``SILENT WRONG``, ``TRACEBACK``, ``UNCLEAR ERROR`` (an error that is not one line naming
  the file): failures of the drill.

``files lost``: files of the reference run that a finished run lacks after the fault, or
half-written files left under a name a later run would read.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xfeat.finetuning.model import load_verified

REPO = Path(__file__).resolve().parents[1]
FAILURES = ("SILENT WRONG", "TRACEBACK", "UNCLEAR ERROR", "HUNG")
NOBODY = 65534

# A child xfeat that counts calls of the functions in XFEAT_DRILL_TARGETS (``module:attr``,
# comma-separated), SIGKILLs itself at call XFEAT_DRILL_KILL_AT (counted over all of them;
# 0: never) and writes the number of calls it made to XFEAT_DRILL_COUNT at exit.
_CHILD = """
import atexit, importlib, os, signal, sys

at, calls = int(os.environ.get("XFEAT_DRILL_KILL_AT", "0")), [0]


def wrap(original):
    def counting(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return counting


for target in filter(None, os.environ.get("XFEAT_DRILL_TARGETS", "").split(",")):
    module, _, path = target.partition(":")
    *owners, name = path.split(".")
    owner = importlib.import_module(module)
    for part in owners:
        owner = getattr(owner, part)
    setattr(owner, name, wrap(getattr(owner, name)))
if os.environ.get("XFEAT_DRILL_COUNT"):
    atexit.register(lambda: open(os.environ["XFEAT_DRILL_COUNT"], "w").write(str(calls[0])))
from xfeat.cli import cli

cli(sys.argv[1:], prog_name="xfeat")
"""

# load_result, as compare and analyze call it, with the command line's error handling.
_LOAD_RESULT = """
import json, sys
import numpy as np
from xfeat.errors import XfeatError
from xfeat.runs.results import load_result

try:
    r = load_result(sys.argv[1])
except XfeatError as exc:
    print(f"Error: {exc}", file=sys.stderr)
    sys.exit(1)
record = r.record.to_dict()
record.pop("run_dir", None)
preds = {
    s: [list(map(str, i)), np.asarray(l).tolist(), np.asarray(p).tolist()]
    for s, (i, l, p) in r.predictions.items()
}
print(json.dumps({"record": record, "predictions": preds}, sort_keys=True))
"""


@dataclass
class FaultRow:
    fault: str
    tried: int = 0
    outcomes: Counter = field(default_factory=Counter)
    files_lost: int = 0
    notes: list = field(default_factory=list)

    def add(self, outcome: str, note: str = "") -> None:
        self.tried += 1
        self.outcomes[outcome] += 1
        if note and (outcome in FAILURES or outcome == "unaffected"):  # where it landed
            self.notes.append(note)

    @property
    def ok(self) -> bool:
        return not self.files_lost and not any(self.outcomes[f] for f in FAILURES)

    def to_dict(self) -> dict:
        return {
            "fault": self.fault,
            "times_tried": self.tried,
            "outcome": dict(sorted(self.outcomes.items())),
            "files_lost": self.files_lost,
            "ok": self.ok,
            "notes": self.notes,
        }


def env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


@dataclass
class Child:
    rc: int
    stderr: str


def xfeat(args, *, kill_at: int = 0, targets=(), count: Path = None, user=None, timeout=600):
    """``xfeat -q ARGS`` in a child (as ``user`` when given), killed at call ``kill_at`` of
    ``targets``."""
    e = {**env(), "XFEAT_DRILL_KILL_AT": str(kill_at), "XFEAT_DRILL_TARGETS": ",".join(targets)}
    if count is not None:
        e["XFEAT_DRILL_COUNT"] = str(count)
    return _child([sys.executable, "-c", _CHILD, "-q", *map(str, args)], e, user, timeout)


def _child(cmd: list, e: dict, user, timeout) -> Child:
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        e = {**e, "HOME": "/tmp"}
    try:
        p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Child(-999, "hung")
    return Child(p.returncode, p.stderr + p.stdout if p.returncode else p.stderr)


def classify(child: Child, names, same) -> tuple:
    """``(outcome, note)`` of one trial; ``names``: what a good error line names;
    ``same()``: whether the command's result equals the reference."""
    errors = [line for line in child.stderr.splitlines() if line.startswith("Error:")]
    if "Traceback" in child.stderr:
        return "TRACEBACK", _tail(child.stderr)
    if child.rc == -999:
        return "HUNG", "the command did not finish"
    if child.rc != 0:
        if len(errors) == 1 and any(str(n) in errors[0] for n in names):
            return "detected", ""
        return "UNCLEAR ERROR", f"exit {child.rc}: {_tail(child.stderr)}"
    return ("unaffected", "") if same() else ("SILENT WRONG", _tail(child.stderr) or "exit 0")


def _tail(text: str, n: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-n:])[:600]


def damage(src: Path, dst: Path, how: str, rng: random.Random) -> str:
    """Copy ``src`` to ``dst`` with one bit flipped or the file cut short; what was done."""
    data = bytearray(src.read_bytes())
    if how.startswith("none"):  # an intact copy: the trial must come out unaffected
        what = "intact copy"
    elif how == "bit flip":
        offset, bit = rng.randrange(len(data)), rng.randrange(8)
        data[offset] ^= 1 << bit
        what = f"bit {bit} of byte {offset}/{len(data)}"
    else:
        offset = rng.randrange(len(data))
        data = data[:offset]
        what = f"cut at {offset}/{len(src.read_bytes())}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))
    return what


# ---- what a run folder, a cache and a prediction CSV amount to, for comparisons ----------

_TIMING = ("seconds", "timing", "peak_memory", "memory_increase", "run_dir", "created", "path")


def _strip(obj):
    """A results record without timings and paths (they differ between equal runs)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not any(t in k for t in _TIMING)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def run_outcome(run_dir: Path):
    """Metrics, choices and predictions of a finished run folder; None when it has none."""
    try:
        record = json.loads((run_dir / "results.json").read_text())
        with np.load(run_dir / "predictions.npz") as z:
            preds = {k: z[k].tolist() for k in sorted(z.files)}
    except (OSError, ValueError):
        return None
    keep = ("metrics", "threshold", "selection", "ci", "metrics_at_half", "class_names")
    return {"record": _strip({k: record.get(k) for k in keep}), "predictions": preds}


def csv_outcome(path: Path):
    try:
        with open(path) as f:
            return list(csv.reader(f))
    except OSError:
        return None


def cache_outcome(path: Path):
    import xfeat

    try:
        fs = xfeat.read_cache(path, include_skipped=True)
    except Exception:
        return None
    return {
        s: (p.ids, p.labels.tolist(), np.nan_to_num(p.features, nan=-7.0).tolist())
        for s, p in fs.splits.items()
    }


def entries(folder: Path) -> set:
    """Files a later run would read: everything but locks and temporary files."""
    return {
        p.relative_to(folder)
        for p in folder.rglob("*")
        if p.is_file() and not p.name.endswith((".lock", ".tmp")) and p.name != ".lock"
    }


# ---- the reference run set ------------------------------------------------------------------


class RunSet:
    """One small real run set, made once: a cache, a fit-head run from it, a 2-epoch fine-tune
    and the same fine-tune stopped after its first checkpoint."""

    def __init__(self, data: Path, work: Path, image_size: int = 64, batch_size: int = 8):
        self.data, self.work = data, work
        self.common = ["--model", "resnet18", "--weights", "none", "--image-size", image_size]
        self.common += ["--num-workers", 0, "--batch-size", batch_size]
        self.images = next(p for p in sorted((data / "train").iterdir()) if p.is_dir())
        ref = work / "reference"
        self.cache_dir, self.run, self.ft = ref / "cache", ref / "run", ref / "ft"
        self.ft_epoch1 = ref / "ft-epoch1"

    def extract_args(self, cache_dir: Path) -> list:
        return ["extract", "--data", self.data, *self.common, "--cache-dir", cache_dir]

    def fit_args(self, cache: Path, out: Path) -> list:
        return ["fit-head", "--cache", cache, "--out", out, "--n-boot", 20, "--num-workers", 0]

    def fit_data_args(self, cache_dir: Path, out: Path) -> list:
        args = ["fit-head", "--data", self.data, *self.common, "--cache-dir", cache_dir]
        return args + ["--out", out, "--n-boot", 20]

    def finetune_args(self, out: Path, resume=False) -> list:
        args = ["finetune", "--data", self.data, *self.common, "--epochs", 2, "--n-boot", 20]
        args += ["--cache-dir", self.work / "ft-cache", "--out", out]
        return args + (["--resume"] if resume else [])

    def predict_args(self, head: Path, out: Path) -> list:
        return ["predict", "--head", head, self.images, "--out", out, "--num-workers", 0]

    @property
    def cache(self) -> Path:
        return next(self.cache_dir.glob("*.h5"))

    def build(self) -> None:
        steps = [
            (self.extract_args(self.cache_dir), {}),
            (self.finetune_args(self.ft), {}),
            # the same fine-tune, killed when it writes its second checkpoint: epoch 1 on disk
            (
                self.finetune_args(self.ft_epoch1),
                dict(kill_at=2, targets=["xfeat.finetuning.run:save_checkpoint"]),
            ),
        ]
        for args, kill in steps:
            child = xfeat(args, **kill)
            if child.rc != (-signal.SIGKILL if kill else 0):
                raise SystemExit(f"reference run failed (exit {child.rc}): {_tail(child.stderr, 8)}")
        for args in (
            self.fit_args(self.cache, self.run),
            self.predict_args(self.run / "head.npz", self.work / "reference" / "head.csv"),
            self.predict_args(self.ft / "model.pt", self.work / "reference" / "model.csv"),
        ):
            child = xfeat(args)
            if child.rc != 0:
                raise SystemExit(f"reference run failed (exit {child.rc}): {_tail(child.stderr, 8)}")


# ---- corrupt: bit flips and truncation ------------------------------------------------------


def corrupt_phase(rs: RunSet, trials: int, rng: random.Random) -> list:
    """Per file kind: an intact copy (a control), ``trials`` copies with one bit flipped and
    ``trials`` cut short, each read by the command that uses that file."""
    work = rs.work / "corrupt"
    ref = rs.work / "reference"
    ref_fit, ref_ft = run_outcome(rs.run), run_outcome(rs.ft)
    rows = []

    def cache_trial(bad: Path, out: Path):
        child = xfeat(rs.fit_args(bad, out))
        return child, [bad], lambda: run_outcome(out) == ref_fit

    def predict_trial(reference_csv: Path):
        def trial(bad: Path, out: Path):
            child = xfeat(rs.predict_args(bad, out / "p.csv"))
            return child, [bad], lambda: csv_outcome(out / "p.csv") == csv_outcome(reference_csv)

        return trial

    def resume_trial(bad: Path, out: Path):
        child = xfeat(rs.finetune_args(bad.parent, resume=True))
        return child, [bad], lambda: run_outcome(bad.parent) == ref_ft

    def result_trial(bad: Path, out: Path):
        p = subprocess.run(
            [sys.executable, "-c", _LOAD_RESULT, str(bad.parent)],
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        child = Child(p.returncode, p.stderr)
        return child, [bad], lambda: json.loads(p.stdout) == reference_load

    reference_load = json.loads(
        subprocess.run(
            [sys.executable, "-c", _LOAD_RESULT, str(rs.run)],
            env=env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    kinds = [
        ("cache .h5", rs.cache, None, cache_trial),
        ("head.npz", rs.run / "head.npz", None, predict_trial(ref / "head.csv")),
        ("checkpoint.pt", rs.ft_epoch1 / "checkpoint.pt", rs.ft_epoch1, resume_trial),
        ("best_model.pt", rs.ft_epoch1 / "best_model.pt", rs.ft_epoch1, resume_trial),
        ("model.pt", rs.ft / "model.pt", None, predict_trial(ref / "model.csv")),
        ("results.json", rs.run / "results.json", rs.run, result_trial),
        ("predictions.npz", rs.run / "predictions.npz", rs.run, result_trial),
    ]
    for name, src, folder, trial in kinds:
        for how in ("none (control)", "bit flip", "truncation"):
            row = FaultRow(f"{how}: {name}")
            for t in range(1 if how.startswith("none") else trials):
                out = work / f"{name}-{how.replace(' ', '')}-{t}"
                if folder is not None:  # the damaged file in a copy of its run folder
                    shutil.copytree(folder, out / folder.name, symlinks=True)
                    bad = out / folder.name / src.name
                else:
                    bad = out / "in" / src.name
                what = damage(src, bad, how, rng)
                child, names, same = trial(bad, out)
                outcome, note = classify(child, names, same)
                if how.startswith("none") and outcome != "unaffected":  # the drill itself is wrong
                    outcome, note = "UNCLEAR ERROR", f"an intact copy was not read as intact: {note}"
                row.add(outcome, f"{what}: {note}" if note or outcome == "unaffected" else "")
                shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
    return rows


# ---- disk: a small tmpfs ----------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, read_only: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", folder], check=True)
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=False)


def _grow(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", folder], check=True)


def _pages(*sizes: int) -> str:
    """A tmpfs size holding files of these byte sizes but for the last page of the last."""
    pages = sum(-(-n // 4096) for n in sizes) - 1
    return f"{max(1, pages) * 4}k"


def disk_phase(rs: RunSet) -> list:
    """Each output on a tmpfs too small for it (it fills up at each file in turn): one line
    naming the file, nothing half-written left under a name a later run reads, and the same
    command, given room, equal to the reference."""
    work = rs.work / "disk"
    ref_fit, ref_cache = run_outcome(rs.run), cache_outcome(rs.cache)
    run_files = [(rs.run / n).stat().st_size for n in ("head.npz", "predictions.npz", "results.json")]
    cache_bytes = rs.cache.stat().st_size
    rows = []

    def half_written(folder: Path) -> list:
        """Files a later run would trust whose content is not a finished one."""
        bad = []
        for p in entries(folder):
            f = folder / p
            if f.suffix == ".h5" and cache_outcome(f) != ref_cache:
                bad.append(str(p))
            if f.name == "results.json" and run_outcome(f.parent) != ref_fit:
                bad.append(str(p))
        return bad

    def the_cache(d: Path):
        return cache_outcome(next(d.glob("*.h5"), d / "none"))

    cases = [
        (
            "full disk: cache folder (extract)",
            lambda d: xfeat(rs.extract_args(d)),
            lambda d: the_cache(d) == ref_cache,
            [_pages(cache_bytes // 2), _pages(cache_bytes)],
        ),
        (
            "full disk: run folder (fit-head --out)",
            lambda d: xfeat(rs.fit_args(rs.cache, d / "run")),
            lambda d: run_outcome(d / "run") == ref_fit,
            [_pages(*run_files[:i]) for i in (1, 2, 3)],  # head.npz, predictions, results
        ),
    ]
    for fault, run, same, sizes in cases:
        row = FaultRow(fault)
        for size in sizes:
            folder = work / "tmpfs"
            with tmpfs(folder, size):
                child = run(folder)
                outcome, note = classify(child, [folder], functools.partial(same, folder))
                left = half_written(folder)
                row.files_lost += len(left)
                if left:
                    row.notes.append(f"{size}: half-written files left: {left}")
                _grow(folder, "64m")
                again = run(folder)
                if outcome == "detected" and again.rc == 0 and same(folder):
                    outcome = "detected, then recomputed"
                elif outcome == "detected":
                    outcome, note = "UNCLEAR ERROR", f"the rerun with room: {_tail(again.stderr)}"
                row.add(outcome, f"{size}: {note}")
        rows.append(row)
    # Compiling needs about 1 GiB free: on a small disk extract runs eagerly, with a warning,
    # and leaves no compiled package behind.
    row = FaultRow("full disk: compile cache (extract --compile on)")
    folder = work / "tmpfs"
    with tmpfs(folder, "8m"):  # room for the cache, not for compiling
        child = xfeat(rs.extract_args(folder) + ["--compile", "on"])
        if child.rc == 0:
            fell_back = "running eagerly" in child.stderr and not any(folder.glob("compiled/*"))
            good = fell_back and the_cache(folder) == ref_cache
            row.add("fallback" if good else "SILENT WRONG", _tail(child.stderr))
        else:
            row.add(*classify(child, [folder], lambda: False))
    rows.append(row)
    # A fine-tune whose checkpoint does not fit: one line, no damaged checkpoint left.
    row = FaultRow("full disk: checkpoint folder (finetune --out)")
    best, checkpoint = ((rs.ft / n).stat().st_size for n in ("best_model.pt", "checkpoint.pt"))
    with tmpfs(folder, _pages(best, checkpoint // 2)):  # best_model.pt fits, the checkpoint not
        child = xfeat(rs.finetune_args(folder / "ft"))
        outcome, note = classify(child, [folder], lambda: False)
        for p in (p for p in entries(folder) if p.suffix == ".pt"):
            try:
                load_verified(folder / p, "")
            except Exception:
                row.files_lost += 1
                row.notes.append(f"half-written {p} left")
        row.add(outcome, note)
    rows.append(row)
    return rows


# ---- readonly: folders nobody may write ---------------------------------------------------


def readonly_phase(rs: RunSet) -> list:
    work = rs.work / "readonly"
    ref_fit = run_outcome(rs.run)
    rows = []
    # a read-only mount binds root as well
    for fault, run in (
        ("read-only: cache folder (extract)", lambda d: xfeat(rs.extract_args(d / "cache"))),
        ("read-only: run folder (fit-head --out)", lambda d: xfeat(rs.fit_args(rs.cache, d / "run"))),
        ("read-only: run folder (finetune --out)", lambda d: xfeat(rs.finetune_args(d / "ft"))),
    ):
        row = FaultRow(fault)
        folder = work / "ro"
        with tmpfs(folder, "1m", read_only=True):
            outcome, note = classify(run(folder), [folder], lambda: False)
            row.add(outcome, note)
        rows.append(row)
    # chmod'ed folders, the child an unprivileged user: in a folder it may search (the
    # drill's own work folder may sit under a private one, as pytest's does)
    base = Path(tempfile.mkdtemp(prefix="xfeat-drill-"))
    os.chmod(base, 0o755)
    try:
        rows += _unprivileged(rs, base, ref_fit)
    finally:
        for p in [base, *base.rglob("*")]:
            if p.is_dir():
                os.chmod(p, 0o755)
        shutil.rmtree(base, ignore_errors=True)
    return rows


def _unprivileged(rs: RunSet, base: Path, ref_fit) -> list:
    folder, out, locked = base / "chmod", base / "out", base / "locked"
    shutil.copytree(rs.cache_dir, folder / "cache")
    cache = next((folder / "cache").glob("*.h5"))
    os.chmod(folder, 0o555)
    row = FaultRow("read-only: run folder, chmod 0555, user nobody (fit-head --out)")
    row.add(*classify(xfeat(rs.fit_args(cache, folder / "run"), user=NOBODY), [folder], None))
    # a finished cache in a folder nobody may write is still read
    r2 = FaultRow("read-only: cache folder with a finished cache, user nobody (fit-head --cache)")
    out.mkdir()
    os.chmod(out, 0o777)
    for p in [folder / "cache", *(folder / "cache").rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    child = xfeat(rs.fit_args(cache, out / "run"), user=NOBODY)
    r2.add(*classify(child, [folder], lambda: run_outcome(out / "run") == ref_fit))
    # a folder it may not search (0700, root's): its cache, head and run folder
    r3 = FaultRow("unsearchable folder (0700), user nobody (extract, fit-head, predict)")
    locked.mkdir()
    shutil.copy(rs.cache, locked / rs.cache.name)
    shutil.copy(rs.run / "head.npz", locked / "head.npz")
    os.chmod(locked, 0o700)
    shutil.copytree(rs.data, base / "data", symlinks=True)  # links to readable images
    for args in (
        ["extract", "--data", base / "data", *rs.common, "--cache-dir", locked / "cache"],
        rs.fit_args(locked / rs.cache.name, out / "run2"),
        rs.fit_args(cache, locked / "run"),
        rs.predict_args(locked / "head.npz", out / "p.csv"),
    ):
        r3.add(*classify(xfeat(args, user=NOBODY), [locked], None))
    return [row, r2, r3]


# ---- interrupt: SIGKILL between every pair of writes ------------------------------------------

WRITES = {
    "extract": ["xfeat.files:atomic_write", "xfeat.cache.write:CacheWriter.write"],
    "fit-head": [
        "xfeat.files:atomic_write",
        "xfeat.cache.write:CacheWriter.write",
        "xfeat.heads.io:save_head",
        "xfeat.runs.results:RunResult.save",
    ],
}


def interrupt_phase(rs: RunSet, limit: int = 0) -> list:
    """Kill the run at each write call in turn (all of them, or the first ``limit``); between
    the kill and the rerun no reader may take the folder for a finished run; the rerun must
    equal the uninterrupted reference."""
    work = rs.work / "interrupt"
    ref_cache = cache_outcome(rs.cache)
    ref_fit_data = None
    rows = []
    for name, targets in WRITES.items():
        row = FaultRow(f"SIGKILL at each write: {name}")
        base = work / name
        count = work / f"{name}.count"

        def args(d, name=name):
            if name == "extract":
                return rs.extract_args(d / "cache")
            return rs.fit_data_args(d / "cache", d / "run")

        clean = xfeat(args(base / "clean"), targets=targets, count=count)
        if clean.rc != 0:
            row.add("UNCLEAR ERROR", f"uninterrupted run: {_tail(clean.stderr)}")
            rows.append(row)
            continue
        calls = int(count.read_text())
        reference_files = entries(base / "clean")
        if name == "fit-head":
            ref_fit_data = run_outcome(base / "clean" / "run")
        for at in range(1, (min(calls, limit) if limit else calls) + 1):
            d = base / f"kill{at}"
            killed = xfeat(args(d), kill_at=at, targets=targets)
            if killed.rc != -signal.SIGKILL:
                row.add("UNCLEAR ERROR", f"call {at}: not killed (exit {killed.rc})")
                continue
            # between kill and rerun: a run folder must be finished or refused
            note = ""
            if name == "fit-head" and (d / "run").exists():
                probe = subprocess.run(
                    [sys.executable, "-c", _LOAD_RESULT, str(d / "run")],
                    env=env(),
                    capture_output=True,
                    text=True,
                )
                if probe.returncode == 0 and run_outcome(d / "run") != ref_fit_data:
                    note = "an unfinished run folder read as finished"
            for entry in (d / "cache").glob("*.h5"):  # a cache entry by its final name is whole
                if cache_outcome(entry) not in (None, ref_cache):
                    note = f"an unfinished {entry.name} read as finished"
            again = xfeat(args(d))
            if name == "extract":
                same = cache_outcome(next((d / "cache").glob("*.h5"), d / "none")) == ref_cache
            else:
                same = run_outcome(d / "run") == ref_fit_data
            lost = reference_files - entries(d)
            row.files_lost += len(lost)
            if lost:
                row.notes.append(f"call {at}: lost {sorted(map(str, lost))}")
            if note:
                row.add("SILENT WRONG", f"call {at}: {note}")
            elif again.rc != 0:
                row.add(*classify(again, [d], lambda: False))
            else:
                row.add("recomputed" if same else "SILENT WRONG", f"call {at}: rerun differs")
            shutil.rmtree(d, ignore_errors=True)
        row.notes.append(f"{calls} write calls in an uninterrupted run")
        rows.append(row)
    return rows


def format_rows(rows: list) -> str:
    lines = ["| fault | times tried | outcome | files lost |", "|---|---|---|---|"]
    for r in rows:
        outcome = ", ".join(f"{k} {v}" for k, v in sorted(r.outcomes.items()))
        lines.append(f"| {r.fault} | {r.tried} | {outcome} | {r.files_lost} |")
    return "\n".join(lines)
