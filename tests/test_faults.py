"""The kill -9 drill (scripts/fault_drill.py): its bookkeeping, a short run on the real X-rays,
and the loss it found."""

import logging
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import CHEST, REPO, make_image_folder, run_killed_at

import xfeat
from xfeat.cache import partial_path, read_cache

sys.path.insert(0, str(REPO / "scripts"))
import fault_drill  # noqa: E402


def _rows(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_extract_bookkeeping_counts_missing_changed_and_discarded_rows():
    lost = fault_drill.ExtractPhase.lost_and_duplicated
    before = {"train": _rows(32), "val": _rows(0)}
    grown = {"train": np.concatenate([_rows(32), _rows(16, 1)]), "val": _rows(8)}
    assert lost(
        before, grown, "resuming x.h5.partial: rows already written {'train': 32, 'val': 0}"
    ) == (0, 0)
    assert lost(before, {"train": _rows(20), "val": _rows(0)}, "") == (12, 0)
    changed = grown["train"].copy()
    changed[[3, 7]] += 1
    assert lost(before, {**grown, "train": changed}, "") == (2, 0)
    # Recomputed to the same values, but the rows on disk were thrown away: lost all the same.
    assert lost(before, grown, "x.h5.partial is damaged (...); starting the extraction again") == (32, 0)
    assert lost(
        before, grown, "resuming x.h5.partial: rows already written {'train': 16, 'val': 0}"
    ) == (16, 0)


def test_finetune_bookkeeping_counts_lost_and_retrained_epochs():
    lost = fault_drill.FinetunePhase.lost_and_duplicated
    history = [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    assert lost(history[:2], history, "epoch 3/3: train loss 0.33") == (0, 0)
    assert lost(history[:2], history[:1], "") == (1, 0)
    other = [history[0], {"epoch": 2, "train_loss": 0.4}, history[2]]
    assert lost(history[:2], other, "") == (1, 0)
    assert lost(history[:2], history, "epoch 2/3: train loss 0.5\nepoch 3/3: train loss 0.33") == (0, 1)


def test_a_table_row_fails_on_any_difference():
    clean = fault_drill.PhaseResult("extract", kills=3)
    assert clean.ok
    assert not fault_drill.PhaseResult("extract", lost=1).ok
    assert not fault_drill.PhaseResult("finetune", diff_history=1e-7).ok
    assert "| extract | 3 |" in fault_drill.format_table([clean])


@pytest.mark.integration
def test_short_drill_on_the_real_xrays_loses_nothing(tmp_path):
    """Two kills per phase through the CLI, as a user runs it (the default loader)."""
    if not CHEST.is_dir():
        pytest.fail(f"the shared chest X-ray data is missing at {CHEST}")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "fault_drill.py"),
            "--data",
            str(CHEST),
            "--kills",
            "2",
            "--extract-images",
            "48",
            "--extract-image-size",
            "64",
            "--finetune-images",
            "24",
            "--finetune-image-size",
            "32",
            "--epochs",
            "2",
            "--keep",
            str(tmp_path / "work"),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| extract | 2 |" in proc.stdout and "| finetune | 2 |" in proc.stdout, proc.stdout


def _rows_done(partial):
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f["train"]["rows_done"][0])
    except (OSError, KeyError):
        return 0


_HOLD_OPEN = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "r")
print("open", flush=True)
time.sleep(120)
"""


def test_resume_keeps_the_rows_while_another_process_holds_the_partial_open(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", n_train=120, n_test=4)
    cache_dir = tmp_path / "cache"
    options = dict(cache_dir=cache_dir, image_size=64)
    partial = partial_path(xfeat.plan_extraction(root, "resnet18", **options).path)
    args = ["extract", "--data", root, "--model", "resnet18", "--weights", "none", "--image-size", 64]
    args += ["--batch-size", 4, "--num-workers", 0, "--cache-dir", cache_dir]
    run_killed_at("xfeat.cache.write:CacheWriter.write", 11, args)  # 40 rows written
    killed_at = _rows_done(partial)
    # What an orphaned loader worker of the killed run does: it holds the file open.
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_OPEN, str(partial)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with caplog.at_level(logging.INFO, logger="xfeat"):
            path = xfeat.extract(
                root, "resnet18", batch_size=4, num_workers=0, progress=False, **options
            )
    finally:
        holder.kill()
        holder.wait()
    assert read_cache(path).meta.splits["train"]["resumed_from_row"] >= killed_at > 0
