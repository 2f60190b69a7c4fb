"""Faults that must end in one line, never a traceback or a silently wrong number: damaged
caches and results, interrupted runs, inputs out of bounds, Ctrl-C."""

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, make_feature_set, make_image_folder, run_killed_at

import xfeat
from xfeat.backbones.preprocessing import Preprocessing
from xfeat.cache import CacheError, read_cache
from xfeat.cli import cli
from xfeat.data import load_dataset
from xfeat.errors import ConfigError, DataError, OutputError
from xfeat.extraction.runtime import resolve_num_workers
from xfeat.files import atomic_write
from xfeat.fitting import fit_head
from xfeat.runs.results import load_result

EXTRACT = dict(image_size=TINY, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    base = tmp_path_factory.mktemp("r3")
    root = make_image_folder(base / "d", n_train=16, n_test=4)
    return root, xfeat.extract(root, "resnet18", cache_dir=base / "c", **EXTRACT)


def test_a_flipped_bit_in_features_or_labels_is_never_used(cached, tmp_path):
    _, path = cached
    for dataset in ("features/penultimate", "labels"):
        damaged = tmp_path / f"{dataset.replace('/', '_')}.h5"
        damaged.write_bytes(path.read_bytes())
        with h5py.File(damaged, "r") as f:
            offset = f["train"][dataset].id.get_chunk_info(0).byte_offset
        data = bytearray(damaged.read_bytes())
        data[offset + 3] ^= 0x04
        damaged.write_bytes(bytes(data))
        with pytest.raises(CacheError, match="is damaged .*extract again with --force"):
            read_cache(damaged)


def test_results_json_is_written_last(cached, tmp_path):
    """Killed after the head and before results.json: the folder is not a finished run, so
    nothing reuses it; a damaged results.json is an error naming it, never a traceback."""
    _, path = cached
    out = tmp_path / "run"
    run_killed_at(
        "xfeat.runs.results:RunResult.save", 1, ["-q", "fit-head", "--cache", path, "--out", out]
    )
    assert (out / "head.npz").is_file() and not (out / "results.json").exists()
    fit_head(cache=path, out_dir=out, n_boot=0)
    assert load_result(out).record.mode == "cached"
    (out / "results.json").write_text('{"schema": "xfeat-result/1", "model": ')
    with pytest.raises(ConfigError, match="results.json is not valid JSON"):
        load_result(out)
    (out / "results.json").write_text(json.dumps({"schema": "xfeat-result/1", "model": "m"}))
    with pytest.raises(ConfigError, match="is damaged or incomplete"):
        load_result(out)
    (out / "predictions.npz").write_bytes(b"PK\x03\x04 truncated")
    (out / "results.json").unlink()
    fit_head(cache=path, out_dir=out, n_boot=0)  # rewritten whole
    assert load_result(out).predictions["test"][2].shape[1] == 2


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mean": (float("nan"), 0.4, 0.4)}, "three finite values each"),
        ({"std": (0.2, float("inf"), 0.2)}, "three finite values each"),
        ({"std": (0.2, 0.0, 0.2)}, "std > 0"),
        ({"crop_size": 100_000, "resize_size": 100_000}, "more than 4096 pixels a side"),
    ],
)
def test_preprocessing_values_are_checked_before_any_work(options, message):
    with pytest.raises(ConfigError, match=message):
        Preprocessing(**options)


def test_num_workers_capped_at_the_cpus(caplog):
    import os

    cpus = len(os.sched_getaffinity(0))
    assert resolve_num_workers(128) == cpus
    assert f"num_workers=128 is more than the {cpus} CPUs" in caplog.text
    with pytest.raises(ConfigError, match="num_workers=-1"):
        resolve_num_workers(-1)


def test_npz_object_arrays_are_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(
        path, train_images=np.array([np.zeros((4, 4)), "x"], dtype=object), train_labels=np.array([0, 1])
    )
    with pytest.raises(DataError, match="train_images is an array of Python objects"):
        load_dataset(path)


def test_a_failed_torch_save_is_an_output_error(tmp_path):
    def write(f):
        raise RuntimeError(
            "[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file"
        )

    with pytest.raises(OutputError, match="cannot write .*checkpoint.pt .*free some space"):
        atomic_write(tmp_path / "checkpoint.pt", write)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_one_class_val_split_names_the_split_and_class():
    rng = np.random.default_rng(0)
    features = make_feature_set(
        {
            "train": (rng.normal(size=(40, 4)), [0] * 20 + [1] * 20),
            "val": (rng.normal(size=(10, 4)), [0] * 10),
            "test": (rng.normal(size=(10, 4)), [0] * 5 + [1] * 5),
        }
    )
    with pytest.raises(DataError, match="the val split has no images of class 'PNEUMONIA'"):
        fit_head(cache=features, save=False, n_boot=0)


def test_predict_names_the_file_it_expected(cached, tmp_path):
    root, path = cached
    result = CliRunner().invoke(cli, ["predict", "--head", str(tmp_path / "results.json"), str(root)])
    assert result.exit_code == 1
    assert "expected a head.npz (written by fit-head) or a model.pt" in result.output
    assert "pickle" not in result.output


def test_ctrl_c_says_how_to_resume(monkeypatch, cached):
    root, _ = cached

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("xfeat.extraction.entry.extract", interrupted)
    result = CliRunner().invoke(cli, ["extract", "--data", str(root), "--image-size", str(TINY)])
    assert result.exit_code == 130
    assert "interrupted; run the same command again to resume" in result.output


def test_a_nearly_full_disk_extracts_eagerly_instead_of_compiling(cached, tmp_path, caplog):
    """Compiling on a nearly full disk aborts the process (SIGABRT in the compiler): with
    less than the room it needs under the cache folder, extraction runs eagerly and says so."""
    from test_reliability import _tmpfs

    root, path = cached
    with _tmpfs(tmp_path / "small", "20m") as small:
        with caplog.at_level("WARNING", logger="xfeat"):
            entry = xfeat.extract(root, "resnet18", cache_dir=small, compile="on", **EXTRACT)
        assert "compiling needs about 1024 MiB: running eagerly instead" in caplog.text
        assert not any(s.get("compiled") for s in xfeat.read_meta(entry).splits.values())
        np.testing.assert_allclose(
            read_cache(entry)["train"].features, read_cache(path)["train"].features, rtol=1e-4, atol=1e-5
        )


_OFFLINE = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network is unreachable (blocked by the test)")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from xfeat.cli import cli
cli(sys.argv[1:], prog_name="xfeat")
"""


def test_the_command_line_is_pretrained_by_default_and_says_how_offline(cached, tmp_path):
    import subprocess
    import sys
    import time

    from conftest import child_env

    root, _ = cached
    args = ["extract", "--data", str(root), "--model", "resnet18", "--image-size", str(TINY)]
    args += ["--num-workers", "0", "--cache-dir", str(tmp_path / "c")]
    t0 = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", _OFFLINE, *args],
        env=child_env(TORCH_HOME=str(tmp_path / "torch")),  # no weights file cached there
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    errors = [line for line in child.stderr.splitlines() if line.startswith("Error:")]
    assert child.returncode == 1 and len(errors) == 1, child.stderr
    assert "Traceback" not in child.stderr
    assert "ResNet18_Weights.IMAGENET1K_V1" in errors[0]  # DEFAULT, the pretrained weights
    assert "`xfeat weights`" in errors[0] and "--weights none builds a random network" in errors[0]
    assert seconds < 60  # fails fast: no retries, no hang


def test_a_random_init_run_says_so_everywhere(cached, tmp_path, caplog):
    root, path = cached
    with caplog.at_level("WARNING"):
        xfeat.extract(root, "resnet18", weights="none", cache_dir=tmp_path / "c", **EXTRACT)
    assert "random init (weights none): an untrained network" in caplog.text
    result = fit_head(cache=path, out_dir=tmp_path / "run", n_boot=10)
    assert result.record.notes[0].startswith("random init: the backbone was not pretrained")
    assert "resnet18 (random init)" in result.table().splitlines()[0]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["notes"][0].startswith("random init") and saved["weights"]["kind"] == "random"
    assert load_result(tmp_path / "run").record.notes.count(saved["notes"][0]) == 1


_LIMITED = """
import resource, sys
import torch  # noqa: F401  (loaded before the limit: only the extraction's memory is limited)
from xfeat.cli import cli
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
limit = vm + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
cli(sys.argv[2:], prog_name="xfeat")
"""


def test_a_memory_limit_is_one_line_that_names_the_batch_size(cached, tmp_path):
    import subprocess
    import sys

    from conftest import child_env

    root, _ = cached
    # 2048 px crops: 50 MB a float image, 1.6 GB a batch of 32, against 600 MB of headroom
    args = ["extract", "--data", str(root), "--model", "resnet18", "--weights", "none"]
    args += ["--image-size", "2048", "--batch-size", "32", "--num-workers", "0"]
    args += ["--cache-dir", str(tmp_path / "c")]
    child = subprocess.run(
        [sys.executable, "-c", _LIMITED, "600", *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in child.stderr.splitlines() if line.startswith("Error:")]
    assert child.returncode == 1 and len(errors) == 1, child.stderr[-2000:]
    assert "Traceback" not in child.stderr
    assert "out of memory" in errors[0] and "smaller --batch-size (now 32)" in errors[0]
