"""Faults found by a hostile-user probe: each gives a one-line message naming the file or
value and what to do, and nothing half-written breaks the next run."""

import logging
import os
import struct
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, make_image_folder, make_npz
from PIL import Image

import xfeat
from xfeat.backbones import Preprocessing
from xfeat.cache import partial_path, read_cache
from xfeat.cli import cli
from xfeat.data import load_dataset
from xfeat.data.images import read_image_file
from xfeat.errors import BackboneError, CacheError, DataError, ImageReadError, OutputError
from xfeat.fitting import fit_head
from xfeat.prediction import predict
from xfeat.runs.folders import run_lock

OPTS = dict(image_size=TINY, num_workers=0, progress=False)


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@contextmanager
def _tmpfs(path: Path, size: str):
    """A small tmpfs at ``path`` (root only): a disk that fills up, or turns read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the disk-full and read-only cases)")
    path.mkdir(parents=True, exist_ok=True)
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / "xray", n_train=40, n_test=10)


# --------------------------------------------------------------------------- caches


def test_disk_full_while_creating_a_cache_is_a_clear_error(data, tmp_path):
    with _tmpfs(tmp_path / "small", "200k") as small:
        with pytest.raises(CacheError, match=r"not enough space in .*small.*MiB are free"):
            xfeat.extract(data, "resnet18", cache_dir=small / "c", **OPTS)
        assert not list((small / "c").glob("*.partial"))
        result = _cli(
            "extract",
            "--data",
            data,
            "--weights",
            "none",
            "--image-size",
            TINY,
            "--num-workers",
            0,
            "--cache-dir",
            small / "c",
        )
        assert result.exit_code == 1 and "Error: not enough space" in result.output
        assert "Traceback" not in result.output


def test_a_damaged_partial_file_is_reported_and_restarted(data, tmp_path, caplog):
    plan = xfeat.plan_extraction(data, "resnet18", cache_dir=tmp_path / "c", image_size=TINY)
    good = xfeat.extract(plan=plan, num_workers=0, progress=False)
    expected = read_cache(good)["train"].features
    partial = partial_path(plan.path)
    data_bytes = plan.path.read_bytes()
    plan.path.unlink()
    partial.write_bytes(data_bytes[:3000])  # what a full disk or a crash in creation leaves
    with caplog.at_level(logging.WARNING):
        again = xfeat.extract(plan=plan, num_workers=0, progress=False)
    assert "is damaged" in caplog.text and "starting the extraction again" in caplog.text
    np.testing.assert_array_equal(read_cache(again)["train"].features, expected)


def test_a_read_only_cache_is_reused_and_a_read_only_out_is_a_clear_error(data, tmp_path):
    with _tmpfs(tmp_path / "ro", "20m") as ro:
        path = xfeat.extract(data, "resnet18", cache_dir=ro / "c", **OPTS)
        _remount_read_only(ro)
        assert xfeat.extract(data, "resnet18", cache_dir=ro / "c", **OPTS) == path
        result = _cli("-q", "fit-head", "--cache", path, "--out", ro / "run", "--n-boot", 0)
        assert result.exit_code == 1, result.output
        assert "Error: cannot write to" in result.output and "Traceback" not in result.output
        with pytest.raises(CacheError, match="permission denied|read-only"):
            xfeat.extract(data, "resnet18", cache_dir=ro / "c", seed=1, **OPTS)


# --------------------------------------------------------------------------- outputs


def test_an_out_path_under_a_regular_file(data, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = _cli(
        "-q",
        "fit-head",
        "--data",
        data,
        "--weights",
        "none",
        "--image-size",
        TINY,
        "--num-workers",
        0,
        "--cache-dir",
        tmp_path / "c",
        "--out",
        tmp_path / "afile" / "run",
    )
    assert result.exit_code == 1 and "is a file, not a folder" in result.output
    head = fit_head(
        data,
        "resnet18",
        out_dir=tmp_path / "run",
        n_boot=0,
        extract_options=dict(cache_dir=tmp_path / "c", **OPTS),
    )
    with pytest.raises(OutputError, match="is a file, not a folder"):
        predict(
            Path(head.record.run_dir) / "head.npz",
            [data / "test"],
            out_csv=tmp_path / "afile" / "p.csv",
            num_workers=0,
            progress=False,
        )


def test_disk_full_in_out_and_in_predict_leaves_no_half_file(data, tmp_path):
    fit_head(
        data,
        "resnet18",
        out_dir=tmp_path / "run",
        n_boot=0,
        extract_options=dict(cache_dir=tmp_path / "c", **OPTS),
    )
    with _tmpfs(tmp_path / "full", "64k") as full:
        (full / "ballast").write_bytes(b"\0" * (60 << 10))
        with pytest.raises(OutputError, match=r"no space left on the device while writing"):
            fit_head(
                cache=read_cache(next((tmp_path / "c").glob("*.h5"))), out_dir=full / "run", n_boot=0
            )
        with pytest.raises(OutputError, match=r"no space left .*p\.csv"):
            predict(
                tmp_path / "run" / "head.npz",
                [data / "test"] * 30,
                out_csv=full / "p.csv",
                num_workers=0,
                progress=False,
            )
        assert not (full / "p.csv").exists()
        assert not [p for p in full.rglob("*") if p.name.endswith(".tmp")]


def test_concurrent_writers_to_one_out_fail_clearly(data, tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(OutputError, match="another xfeat process is writing"):
            fit_head(
                data,
                "resnet18",
                out_dir=tmp_path / "run",
                n_boot=0,
                extract_options=dict(cache_dir=tmp_path / "c", **OPTS),
            )


# --------------------------------------------------------------------------- inputs


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width x height`` (a decompression bomb) without the pixels."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def test_a_decompression_bomb_is_named_and_skippable(data, tmp_path):
    bomb = _png_header_only(data / "train" / "NORMAL" / "huge.png", 14000, 14000)  # 196 MP
    with pytest.raises(ImageReadError, match=r"huge\.png.*(decompression|bomb)"):
        read_image_file(bomb)
    result = _cli(
        "extract",
        "--data",
        data,
        "--weights",
        "none",
        "--image-size",
        TINY,
        "--num-workers",
        0,
        "--cache-dir",
        tmp_path / "c",
    )
    assert result.exit_code == 1 and "huge.png" in result.output and "--skip-bad" in result.output
    path = xfeat.extract(data, "resnet18", cache_dir=tmp_path / "c", skip_bad=True, **OPTS)
    assert any(i.endswith("huge.png") for i in read_cache(path).skipped["train"])


def test_image_size_zero_is_a_one_line_error(data, tmp_path):
    result = _cli("extract", "--data", data, "--image-size", 0, "--cache-dir", tmp_path / "c")
    assert result.exit_code == 1 and "Error: crop_size=0" in result.output
    assert "Traceback" not in result.output


def _exif_rotated_jpeg(path: Path) -> np.ndarray:
    """A JPEG whose EXIF says 'rotate 90 clockwise'; returns the pixels a viewer shows."""
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:10, :, 0] = 255  # a red band on top of the stored image
    image = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    image.save(path, quality=98, exif=exif)
    return np.asarray(Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270))


def test_exif_orientation_is_applied_everywhere_and_recorded(tmp_path):
    data = make_image_folder(tmp_path / "xray", n_train=8, n_test=2)
    shown = _exif_rotated_jpeg(data / "train" / "NORMAL" / "exif.jpeg")
    decoded = np.asarray(read_image_file(data / "train" / "NORMAL" / "exif.jpeg"))
    assert decoded.shape == shown.shape == (60, 40, 3)
    assert np.abs(decoded.astype(int) - shown.astype(int)).mean() < 4  # JPEG noise only
    prep = Preprocessing(64, 48)
    assert prep.to_dict()["exif_transpose"] is True
    ds = load_dataset(data)
    split, row = next(
        (sp, i) for sp in ds.splits.values() for i, p in enumerate(sp.paths) if p.endswith("exif.jpeg")
    )
    from xfeat.extraction.store import build_store
    from xfeat.extraction.views import ViewImages

    extracted = ViewImages(split, prep)[row][0]  # extract and predict read this way
    store, _ = build_store(ds, prep, cache_dir=tmp_path / "c", progress=False)
    stored = prep.center_crop(store[split.name][row])  # fine-tuning reads this way
    np.testing.assert_array_equal(extracted.permute(1, 2, 0).numpy(), stored)
    plan = xfeat.plan_extraction(data, "resnet18", cache_dir=tmp_path / "c", image_size=TINY)
    assert plan.meta().preprocessing["exif_transpose"] is True


def test_dangling_links_and_folders_named_like_images_are_listed(tmp_path, caplog):
    data = make_image_folder(tmp_path / "xray", n_train=8, n_test=2)
    os.symlink(tmp_path / "gone.png", data / "train" / "NORMAL" / "dangling.png")
    (data / "train" / "PNEUMONIA" / "folder.jpg").mkdir()
    with caplog.at_level(logging.WARNING):
        load_dataset(data)
    assert "skipped 2 entries" in caplog.text
    assert "dangling.png (dangling symbolic link)" in caplog.text
    assert "folder.jpg (a folder, not an image file)" in caplog.text


def test_a_non_utf8_file_name_is_named(tmp_path):
    data = make_image_folder(tmp_path / "xray", n_train=8, n_test=2)
    src = next((data / "train" / "NORMAL").glob("*.png"))
    os.rename(src, os.path.join(os.fsencode(src.parent), b"caf\xe9.png"))
    with pytest.raises(DataError, match=r"not valid UTF-8, e\.g\. .*caf\\xe9\.png.*rename"):
        load_dataset(data)


def test_npz_non_finite_pixels_and_an_empty_test_split(tmp_path, caplog):
    arrays = dict(np.load(make_npz(tmp_path / "a.npz")))
    arrays["val_images"] = arrays["val_images"].astype(np.float32)
    arrays["val_images"][3, 5, 5] = np.inf
    np.savez(tmp_path / "inf.npz", **arrays)
    with pytest.raises(DataError, match=r"val_images holds NaN or infinite pixels .*index 3"):
        load_dataset(tmp_path / "inf.npz")
    arrays = dict(np.load(make_npz(tmp_path / "b.npz")))
    arrays["test_images"] = arrays["test_images"][:0]
    arrays["test_labels"] = arrays["test_labels"][:0]
    np.savez(tmp_path / "empty_test.npz", **arrays)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(tmp_path / "empty_test.npz")
    assert "test" not in ds.splits and "test_images has no rows" in caplog.text


def test_a_non_torch_weights_file_gets_no_unsafe_advice(tmp_path):
    import pickle

    path = tmp_path / "model.pth"
    path.write_bytes(pickle.dumps({"w": object()}))
    with pytest.raises(BackboneError) as info:
        xfeat.create_backbone("resnet18", path)
    message = str(info.value)
    assert "model.pth" in message and "weights_only=False" not in message
    assert "never runs pickled code" in message
