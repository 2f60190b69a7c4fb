"""The kill -9 drill (scripts/fault_drill.py): its bookkeeping, a short run on the real X-rays,
and the loss it found."""

import json
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import CHEST, REPO, child_env, make_feature_set, make_image_folder, run_killed_at

import xfeat
from xfeat.cache import partial_path, read_cache
from xfeat.cli import cli
from xfeat.errors import ConfigError
from xfeat.finetuning.model import load_checkpoint, save_checkpoint
from xfeat.fitting import fit_head
from xfeat.runs.results import load_result

sys.path.insert(0, str(REPO / "scripts"))
import fault_drill  # noqa: E402
import file_faults  # noqa: E402


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


# ---- bugs the file-fault drill found ------------------------------------------------------


def _flip_in_record(path, suffix: str) -> None:
    """Flip one bit in the middle of the zip record of ``path`` whose name ends in ``suffix``
    (a tensor's bytes in a torch file): what a bad disk sector does."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if i.filename.endswith(suffix)), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # the local header: 30 bytes, then the name and the extra field
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_checkpoint_tensor_is_an_error_not_a_weight(tmp_path):
    """torch.load does not check the zip's CRC-32: before the fix a flipped bit in a weight
    resumed training from a wrong number."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, config={"a": 1}, model={"w": torch.arange(4096, dtype=torch.float32)})
    assert load_checkpoint(path, {"a": 1})["model"]["w"][7] == 7
    _flip_in_record(path, "/data/0")
    loaded = torch.load(path, weights_only=True)["model"]["w"]  # torch itself: silently
    assert (loaded != torch.arange(4096, dtype=torch.float32)).sum() == 1
    with pytest.raises(ConfigError, match=r"checkpoint.pt is damaged \(record .* CRC-32"):
        load_checkpoint(path, {"a": 1})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="checkpoint.pt is damaged"):
        load_checkpoint(path, {"a": 1})


def test_a_flipped_bit_in_model_pt_is_one_line_from_predict(tmp_path):
    model = tmp_path / "model.pt"
    torch.save({"format": "x", "state_dict": {"w": torch.zeros(4096)}}, model)
    _flip_in_record(model, "/data/0")
    result = CliRunner().invoke(cli, ["predict", "--head", str(model), str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and "model.pt is damaged" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_changed_digit_in_results_json_is_refused(tmp_path):
    """results.json carries the SHA-256 of its content: before, a flipped bit in a metric
    was read as another number by compare and analyze."""
    fs = make_feature_set(
        {
            split: (np.random.default_rng(i).standard_normal((12, 4)), np.arange(12) % 2)
            for i, split in enumerate(("train", "val", "test"))
        }
    )
    out = tmp_path / "run"
    fit_head(cache=fs, out_dir=out, n_boot=0)
    path = out / "results.json"
    assert json.loads(path.read_text())["content_sha256"]
    good = load_result(out).record.to_dict()
    text = path.read_text()
    i = text.index('"accuracy": ') + len('"accuracy": ') + 2  # a digit of a metric
    digit = "1" if text[i] != "1" else "2"
    path.write_text(text[:i] + digit + text[i + 1 :])
    json.loads(path.read_text())  # still valid JSON
    with pytest.raises(ConfigError, match="results.json is damaged: its content does not match"):
        load_result(out)
    path.write_text(text)
    assert load_result(out).record.to_dict() == good


# ---- the file-fault phases (scripts/file_faults.py) ---------------------------------------


def test_classification_of_one_trial():
    classify, Child = file_faults.classify, file_faults.Child
    bad = "/w/run/results.json"
    one_line = Child(1, f"WARNING xfeat: x\nError: {bad} is damaged; delete it\n")
    assert classify(one_line, [bad], None) == ("detected", "")
    assert classify(Child(1, "Error: something else\n"), [bad], None)[0] == "UNCLEAR ERROR"
    assert classify(Child(1, f"Error: {bad}\nError: {bad}\n"), [bad], None)[0] == "UNCLEAR ERROR"
    assert classify(Child(1, "Traceback (most recent call last):\n"), [bad], None)[0] == "TRACEBACK"
    assert classify(Child(0, ""), [bad], lambda: True) == ("unaffected", "")
    assert classify(Child(0, ""), [bad], lambda: False)[0] == "SILENT WRONG"
    row = file_faults.FaultRow("bit flip: x")
    row.add("detected")
    row.add("unaffected")
    assert row.ok and row.to_dict()["outcome"] == {"detected": 1, "unaffected": 1}
    row.add("SILENT WRONG", "byte 3")
    assert not row.ok and row.notes == ["byte 3"]
    assert "| bit flip: x | 3 | SILENT WRONG 1, detected 1, unaffected 1 | 0 |" in (
        file_faults.format_rows([row])
    )


def test_damage_flips_one_bit_or_cuts_the_file(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(bytes(range(256)) * 4)
    rng = random.Random(0)
    file_faults.damage(src, tmp_path / "flip", "bit flip", rng)
    a, b = (
        np.frombuffer(src.read_bytes(), np.uint8),
        np.frombuffer((tmp_path / "flip").read_bytes(), np.uint8),
    )
    assert np.unpackbits(a ^ b).sum() == 1
    file_faults.damage(src, tmp_path / "cut", "truncation", rng)
    cut = (tmp_path / "cut").read_bytes()
    assert len(cut) < len(src.read_bytes()) and src.read_bytes().startswith(cut)
    file_faults.damage(src, tmp_path / "same", "none (control)", rng)
    assert (tmp_path / "same").read_bytes() == src.read_bytes()


@pytest.mark.integration
@pytest.mark.parametrize("phase", ["corrupt", "disk", "readonly", "interrupt"])
def test_file_fault_phase_on_the_real_xrays(tmp_path, phase):
    """One phase of the drill on 24 real X-rays (1 trial per damaged file and fault, the
    first 3 writes of each interrupted command): nothing silent, no traceback, nothing lost."""
    if not CHEST.is_dir():
        pytest.fail(f"the shared chest X-ray data is missing at {CHEST}")
    table = tmp_path / "faults.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fault_drill.py"), "--data", str(CHEST)]
        + ["--phases", phase, "--trials", "1", "--fault-images", "24", "--interrupt-limit", "3"]
        + ["--keep", str(tmp_path / "work"), "--json", str(table)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(table.read_text())["faults"]
    assert rows and all(r["ok"] and r["files_lost"] == 0 for r in rows), rows
    allowed = {"detected", "unaffected", "recomputed", "detected, then recomputed", "fallback"}
    for r in rows:
        assert set(r["outcome"]) <= allowed, r
        if r["fault"].startswith("none (control)"):  # an intact file reads as the reference
            assert r["outcome"] == {"unaffected": 1}, r
        if r["fault"].startswith(("bit flip: results.json", "truncation")):
            assert set(r["outcome"]) <= {"detected", "unaffected"}, r


def test_a_flipped_bit_in_a_cache_id_or_class_name_is_an_error(tmp_path):
    """HDF5 checksums the arrays but not the strings: before the fix a flipped bit in an id
    or in the metadata's class names was read as another id or class."""
    root = make_image_folder(tmp_path / "d", n_train=6, n_test=2)
    path = xfeat.extract(root, "resnet18", cache_dir=tmp_path / "c", image_size=32, progress=False)
    ref = read_cache(path)
    data = path.read_bytes()
    for text, message in ((ref["train"].ids[3].split("/")[-1], "its ids"), ("PNEUMONIA", "its meta")):
        damaged = bytearray(data)
        damaged[data.index(text.encode()) + 2] ^= 0x01
        bad = tmp_path / "bad.h5"
        bad.write_bytes(bytes(damaged))
        with pytest.raises(xfeat.cache.CacheError, match=f"is damaged \\({message} .*--force"):
            read_cache(bad)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs xfeat as the user nobody: needs root")
def test_paths_behind_a_folder_the_user_cannot_search_are_one_line(tmp_path):
    """Before the fix each was a PermissionError traceback (Path.exists raises EACCES)."""
    locked = tmp_path / "locked"  # under pytest's folder, root's and 0700: nobody cannot search it
    locked.mkdir()
    open_dir = Path(tempfile.mkdtemp(prefix="xfeat-test-"))  # one it may write
    os.chmod(open_dir, 0o777)
    try:
        for args in (
            ["fit-head", "--cache", locked / "x.h5", "--out", locked / "run"],
            ["fit-head", "--cache", locked / "x.h5", "--out", open_dir / "run"],
            ["predict", "--head", locked / "head.npz", locked],
            ["extract", "--data", locked / "data", "--model", "resnet18"],
        ):
            child = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
                + ["-m", "xfeat", "-q", *map(str, args)],
                env={**child_env(), "HOME": str(open_dir)},
                cwd=open_dir,
                capture_output=True,
                text=True,
                timeout=120,
            )
            errors = [line for line in child.stderr.splitlines() if line.startswith("Error:")]
            assert child.returncode == 1 and "Traceback" not in child.stderr, child.stderr[-1500:]
            assert len(errors) == 1 and f"{locked}/" in errors[0], child.stderr[-1500:]
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)
