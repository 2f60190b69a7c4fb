"""The cached path: a request answered from the cache index without torch, and every change
that must send it back to the full path (which keys on content)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY, child_env, make_image_folder

import xfeat
from xfeat.extraction.entry import find_entry, request_signature
from xfeat.files import sha256_file

# Runs the xfeat CLI, then fails if torch was imported by it.
NO_TORCH = (
    "import sys\n"
    "from xfeat.cli import cli\n"
    "try:\n"
    "    cli(sys.argv[1:], prog_name='xfeat')\n"
    "except SystemExit as exc:\n"
    "    assert not exc.code, exc.code\n"
    "assert 'torch' not in sys.modules, 'the cached path imported torch'\n"
)


def _cli_without_torch(*args):
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *map(str, args)],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture
def extracted(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=16, n_test=4)
    cache = tmp_path / "c"
    path = xfeat.extract(
        root, "resnet18", image_size=TINY, cache_dir=cache, num_workers=0, progress=False
    )
    return root, cache, path


def test_a_cache_hit_and_the_commands_on_it_never_import_torch(extracted, tmp_path):
    root, cache, path = extracted
    request = ["--data", root, "--model", "resnet18", "--weights", "none", "--image-size", TINY]
    request += ["--cache-dir", cache]
    out = _cli_without_torch("-q", "extract", *request, "--json")
    assert json.loads(out)["path"] == str(path)
    _cli_without_torch("-q", "fit-head", *request, "--out", tmp_path / "run", "--n-boot", 20)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["cache"]["hit"] is True and record["cache"]["path"] == str(path)
    _cli_without_torch("-q", "fit-head", "--cache", path, "--out", tmp_path / "run2", "--n-boot", 0)
    _cli_without_torch("-q", "info", path)
    _cli_without_torch(
        "-q", "analyze", "--cache", path, "--out", tmp_path / "a", "--n-boot", 0, "--folds", 2
    )


def test_any_change_of_files_or_options_misses_the_index(extracted, tmp_path):
    root, cache, path = extracted
    options = {"image_size": TINY, "cache_dir": cache, "batch_size": 64}
    signature = request_signature(root, "resnet18", "none", options)
    assert find_entry(signature, cache) == path
    # spelled-out defaults are the same request; a changed option is another
    assert request_signature(root, "resnet18", "none", {**options, "seed": 0, "views": 0}) == signature
    assert request_signature(root, "resnet18", "none", {**options, "seed": 1}) != signature
    assert request_signature(root, "resnet18", "none", {**options, "num_workers": 3}) == signature
    image = next((root / "test" / "NORMAL").glob("*.png"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched
    touched = request_signature(root, "resnet18", "none", options)
    assert touched != signature and find_entry(touched, cache) is None
    # the full path then finds the entry by content (nothing changed), and remembers it
    again = xfeat.extract(
        root, "resnet18", image_size=TINY, cache_dir=cache, num_workers=0, progress=False
    )
    assert again == path and find_entry(touched, cache) == path


def test_weights_digests_are_remembered_by_path_size_and_time(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(np.arange(1000, dtype=np.int64).tobytes())
    memo = tmp_path / "memo"
    digest = sha256_file(weights, memo)
    assert digest == sha256_file(weights)
    recorded = json.loads((memo / "digests.json").read_text())[str(weights.resolve())]
    assert recorded[2] == digest
    # a remembered digest is used as long as size and time match (no re-hash) ...
    (memo / "digests.json").write_text(json.dumps({str(weights.resolve()): [*recorded[:2], "cafe"]}))
    assert sha256_file(weights, memo) == "cafe"
    # ... and recomputed when the file changes
    weights.write_bytes(b"other")
    assert sha256_file(weights, memo) == sha256_file(weights) != digest
