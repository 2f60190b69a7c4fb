"""torchrun: sharded extraction across 2 CPU processes (gloo) equals one process."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import REPO, TINY, make_image_folder

import xfeat
from xfeat.cache import partial_path, read_cache, shard_path
from xfeat.extraction.distributed import shard_bounds


@pytest.mark.parametrize("n, size", [(10, 2), (7, 3), (2, 4), (0, 2)])
def test_shard_bounds_cover_every_row_once(n, size):
    bounds = [shard_bounds(n, r, size) for r in range(size)]
    rows = [i for start, stop in bounds for i in range(start, stop)]
    assert rows == list(range(n))
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def _torchrun(*args, **popen):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "xfeat",
        *map(str, args),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, **popen)


def _extract_args(root, cache_dir, size):
    return [
        "extract",
        "--data",
        root,
        "--weights",
        "none",
        "--image-size",
        size,
        "--num-workers",
        0,
        "--batch-size",
        4,
        "--cache-dir",
        cache_dir,
    ]


def _reference(root, tmp_path, size):
    return read_cache(
        xfeat.extract(
            root,
            "resnet18",
            cache_dir=tmp_path / "single",
            image_size=size,
            batch_size=4,
            num_workers=0,
            progress=False,
        )
    )


def test_two_ranks_equal_one_process(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=15, n_test=5)
    cache_dir = tmp_path / "dist"
    proc = _torchrun(
        *_extract_args(root, cache_dir, TINY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.count("cache:") == 1  # only rank 0 reports
    reference = _reference(root, tmp_path, TINY)
    merged = read_cache(reference.path.parent.parent / "dist" / reference.path.name)
    assert merged.key == reference.key
    for split in reference.splits:
        assert merged[split].ids == reference[split].ids
        np.testing.assert_allclose(
            merged[split].features, reference[split].features, rtol=1e-4, atol=1e-5
        )
        assert merged.meta.splits[split]["shards"] == 2
    assert not list(cache_dir.glob("*shard*"))  # merged, then removed
    again = _torchrun(
        *_extract_args(root, cache_dir, TINY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "cache hit" in err


def _rows_done(path):
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f["train"]["rows_done"][0])
    except (OSError, KeyError):
        return 0


def _descendants(pid):
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in map(int, f.read().split()):
                    found += [child, *_descendants(child)]
    except OSError:
        pass
    return found


def test_killed_ranks_resume_their_shards(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=100, n_test=4)
    cache_dir = tmp_path / "dist"
    plan = xfeat.plan_extraction(root, "resnet18", cache_dir=cache_dir, image_size=64)
    shard0 = partial_path(shard_path(plan.path, 0, 2))
    job = _torchrun(
        *_extract_args(root, cache_dir, 64), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while _rows_done(shard0) < 8 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in [job.pid, *_descendants(job.pid)]:  # torchrun's workers too
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()
    done = _rows_done(shard0)
    assert 0 < done < 90, "the job finished before it could be killed"
    rerun = _torchrun(
        *_extract_args(root, cache_dir, 64), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "resuming" in err
    reference = _reference(root, tmp_path, 64)
    merged = read_cache(plan.path)
    for split in reference.splits:
        assert merged[split].ids == reference[split].ids
        np.testing.assert_allclose(
            merged[split].features, reference[split].features, rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("n, batch, world", [(10, 4, 2), (9, 4, 2), (13, 4, 3), (5, 8, 2)])
def test_epoch_batches_split_every_global_batch_across_ranks(n, batch, world):
    from xfeat.finetuning.loaders import EpochBatches

    single = list(EpochBatches(n, batch, seed=3))
    ranks = [list(EpochBatches(n, batch, seed=3, rank=r, world_size=world)) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)  # every rank takes every step
    for step, keys in enumerate(single):
        real = sorted(k[0] for r in ranks for k in r[step] if not k[3])
        assert real == sorted(k[0] for k in keys)
        assert all(k[2] == len(keys) for r in ranks for k in r[step])  # global batch size


def _checkpoint_epoch(path):
    import torch

    try:
        return torch.load(path, weights_only=True)["epoch"]
    except Exception:  # not written yet
        return 0


@pytest.mark.slow
def test_ddp_finetune_killed_resumed_equals_one_process(tmp_path):
    """vit_b_32 has no BatchNorm and no dropout: two ranks, killed after epoch 1 and resumed,
    must reproduce one uninterrupted process."""
    root = make_image_folder(tmp_path / "d", n_train=9, n_test=2)
    args = [
        "-q",
        "finetune",
        "--data",
        root,
        "--model",
        "vit_b_32",
        "--weights",
        "none",
        "--epochs",
        2,
        "--batch-size",
        5,
        "--num-workers",
        0,
        "--n-boot",
        20,
        "--lr",
        0.01,
        "--cache-dir",
        tmp_path / "c",
        "--out",
        tmp_path / "ddp",
    ]
    job = _torchrun(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while (
        _checkpoint_epoch(tmp_path / "ddp" / "checkpoint.pt") < 1
        and job.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    for pid in [job.pid, *_descendants(job.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()
    assert _checkpoint_epoch(tmp_path / "ddp" / "checkpoint.pt") == 1, "not killed in epoch 2"
    proc = _torchrun(*args, "--resume", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    args = args[:-2]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "xfeat", *map(str, args), "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    a = xfeat.load_result(tmp_path / "ddp")
    b = xfeat.load_result(tmp_path / "one")
    assert [h["epoch"] for h in a.record.history] == [1, 2]
    for ha, hb in zip(a.record.history, b.record.history):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-4)
        assert ha["val_loss"] == pytest.approx(hb["val_loss"], rel=1e-4)
    for split in ("train", "val", "test"):
        np.testing.assert_allclose(a.predictions[split][2], b.predictions[split][2], atol=1e-4)
