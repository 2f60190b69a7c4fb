"""DICOM in: pydicom's own test files, DICOM copies of the shared chest X-rays, damaged and
lying headers, patients from the tags, and the commands over a DICOM class-folder set."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom  # xfeat[dicom], which make test installs
import pytest
from click.testing import CliRunner
from conftest import CHEST, REPO, TINY
from PIL import Image

sys.path.insert(0, str(REPO / "scripts"))
from dicom_copies import ENCODINGS, gray_of, write_copy  # noqa: E402

import xfeat  # noqa: E402
from xfeat.backbones.preprocessing import Preprocessing  # noqa: E402
from xfeat.cache import read_cache, read_meta  # noqa: E402
from xfeat.cli import cli  # noqa: E402
from xfeat.config import DataSpec  # noqa: E402
from xfeat.data import load_dataset  # noqa: E402
from xfeat.data.dicom import DicomOptions, read_dicom  # noqa: E402
from xfeat.data.images import read_image_file, read_image_with_header, scan_image_files  # noqa: E402
from xfeat.errors import ImageReadError  # noqa: E402

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# pydicom's test files that must decode: each transfer syntax, modality and colour model
MUST_DECODE = {
    "CT_small.dcm",  # CT, rescale
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "JPGExtended.dcm",  # JPEG extended, 12 bits
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR
    "SC_rgb_rle.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "examples_palette.dcm",  # US, palette colour
    "examples_jpeg2k.dcm",
    "image_dfl.dcm",  # deflated
    "liver_1frame.dcm",  # 1 bit
    "rtdose_1frame.dcm",  # 32 bits
}
# ... and the reasons the others fail with
MUST_FAIL = {
    "MR_truncated.dcm": "truncated",
    "rtdose.dcm": "pass --frame N",
    "examples_ybr_color.dcm": "pass --frame N",
    "rtplan.dcm": "no pixel data",
    "JPEG2000-embedded-sequence-delimiter.dcm": "cannot decode JPEG 2000",
}


def test_every_pydicom_test_file_decodes_or_fails_in_one_line():
    decoded, failed = set(), {}
    for path in sorted(PYDICOM_FILES.glob("*.dcm")):
        try:
            pixels, (width, height, _, bits) = read_dicom(path)
        except ImageReadError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            failed[path.name] = exc.reason
            if "pass --frame N" in exc.reason:  # multi-frame files decode a frame when asked
                assert read_dicom(path, DicomOptions(frame=1))[0].ndim in (2, 3)
            continue
        assert pixels.dtype == np.float32 and np.isfinite(pixels).all()
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and pixels.max() > pixels.min()
        assert pixels.shape[:2] == (height, width) and 1 <= bits <= 32
        decoded.add(path.name)
    assert MUST_DECODE <= decoded, sorted(MUST_DECODE - decoded)
    for name, why in MUST_FAIL.items():
        assert why in failed[name], (name, failed[name])
    multi_frame = [n for n, why in failed.items() if "--frame" in why]
    assert len(decoded) >= 51 and len(multi_frame) == 7, sorted(failed)


def test_a_frame_of_a_multi_frame_file():
    path = PYDICOM_FILES / "examples_ybr_color.dcm"
    first, _ = read_dicom(path, DicomOptions(frame=0))
    later, _ = read_dicom(path, DicomOptions(frame=29))
    assert first.shape == later.shape == (240, 320, 3) and not np.array_equal(first, later)
    with pytest.raises(ImageReadError, match="has 30 frame.*--frame 30 does not exist"):
        read_dicom(path, DicomOptions(frame=30))


def _lying(tmp_path, **tags):
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    for name, value in tags.items():
        setattr(ds, name, value)
    path = tmp_path / "lying.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize(
    "tags, message",
    [
        ({"Rows": 60000, "Columns": 60000}, "over the limit"),
        ({"Rows": 4096, "Columns": 4096}, "truncated or its header lies"),
        ({"HighBit": 7}, "HighBit 7 for 16 bits stored"),
        ({"BitsStored": 24}, "24 bits stored in 16 allocated"),
        ({"Rows": 0}, "0 x 64 pixels"),
    ],
)
def test_a_lying_header_is_one_line_not_an_allocation(tmp_path, tags, message):
    with pytest.raises(ImageReadError, match=message) as info:
        read_dicom(_lying(tmp_path, **tags))
    assert "\n" not in str(info.value)


def test_a_lying_header_is_refused_before_the_pixel_bytes_are_read(tmp_path):
    """48 MB of pixel data behind a header over the pixel limit: refused with at most a few
    MB allocated (the pixel data stay on disk until the header has passed), and a file whose
    pixel data are cut short is still refused for it."""
    import tracemalloc

    path = _lying(tmp_path, Rows=60000, Columns=60000)
    ds = pydicom.dcmread(path)
    ds.PixelData = bytes(48 << 20)
    ds.save_as(path)
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError, match="over the limit"):
            read_dicom(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    ds.Rows, ds.Columns = 4096, 4096  # 32 MB needed at 16 bits: the 48 MB cut to 20 MB
    ds.save_as(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - (28 << 20))
    with pytest.raises(ImageReadError, match="truncated or its header lies"):
        read_dicom(path)


def test_an_encapsulated_frame_beyond_the_limit_is_refused_before_decoding(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "JPEG2000.dcm")
    ds.Rows, ds.Columns = 50000, 50000
    ds.save_as(tmp_path / "big.dcm")
    with pytest.raises(ImageReadError, match="over the limit"):
        read_dicom(tmp_path / "big.dcm")


def test_damaged_bytes_are_one_line_errors(tmp_path):
    data = (PYDICOM_FILES / "MR_small_RLE.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 3000])
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    for name in ("cut.dcm", "junk.dcm"):
        with pytest.raises(ImageReadError) as info:
            read_image_file(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)


def test_a_syntax_without_decoder_names_the_syntax_and_the_package(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(ImageReadError, match="MPEG2.*has no decoder in pydicom"):
        read_dicom(tmp_path / "mpeg.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.99.1"  # a private syntax
    ds.save_as(tmp_path / "private.dcm")
    with pytest.raises(ImageReadError, match="1.2.826.0.1.3680043.99.1.*has no decoder"):
        read_dicom(tmp_path / "private.dcm")
    # As if pydicom were installed without pylibjpeg (the only JPEG-LS decoder), and as if
    # pydicom were not installed at all: the syntax, and what to install.
    jpeg_ls = str(PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm")
    assert "no decoder for transfer syntax JPEG-LS Lossless" in _read_without("pylibjpeg", jpeg_ls)
    assert "reading DICOM files needs pydicom" in _read_without("pydicom", jpeg_ls)


def _read_without(package: str, path: str) -> str:
    """The error of reading ``path`` in a fresh interpreter where ``package`` cannot be imported."""
    code = (
        f"import sys; sys.modules[{package!r}] = sys.modules['libjpeg'] = None\n"
        "from xfeat.data.images import read_image_file\n"
        "from xfeat.errors import ImageReadError\n"
        f"try: read_image_file({path!r})\n"
        "except ImageReadError as e: print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    ).stdout
    assert out.count("\n") == 1 and "pip install 'xfeat[dicom]'" in out and "--skip-bad" in out
    return out


def _chest_files(n_per_class=3, split="train"):
    files = []
    for cls in ("NORMAL", "PNEUMONIA"):
        found = sorted(p for p in (CHEST / split / cls).iterdir() if p.suffix == ".jpeg")
        files += found[:: len(found) // n_per_class][:n_per_class]
    return files


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_dicom_copies_show_the_jpeg_pixels(tmp_path, encoding):
    """The network's input from each DICOM copy is the JPEG's within one gray level (float
    resize against PIL's 8-bit resize), 0 for the encapsulated JPEG."""
    p = Preprocessing(resize_size=256, crop_size=224)
    window = "none" if encoding in ("native8", "rle") else "file"  # native8 has no window
    for jpeg in _chest_files(2):
        dcm = write_copy(jpeg, tmp_path / f"{jpeg.stem}.dcm", encoding)
        image = read_image_file(dcm, draft_size=256, dicom=DicomOptions(window))
        diff = np.abs(
            p.resize_and_crop(image).astype(int) - p.resize_and_crop(read_image_file(jpeg)).astype(int)
        )
        assert diff.max() <= (0 if encoding == "jpeg" else 1) and diff.mean() < 0.3


def test_jpeg_and_jpeg_2000_decode_at_a_reduced_resolution(tmp_path):
    """A 1400x1000 X-ray: libjpeg's scale and OpenJPEG's resolution level halve it for a
    256 resize; the header keeps the full size, the network input stays within 2 gray levels
    on average (at most 8) of the full decode's."""
    with Image.open(_chest_files(1)[0]) as im:
        im.convert("L").resize((1400, 1000), Image.BICUBIC).save(tmp_path / "big.jpeg", quality=90)
    p = Preprocessing(resize_size=256, crop_size=224)
    for encoding in ("jpeg", "j2k"):
        dcm = write_copy(tmp_path / "big.jpeg", tmp_path / f"{encoding}.dcm", encoding)
        reduced, header = read_image_with_header(dcm, draft_size=256)
        full = read_image_file(dcm)
        assert reduced.size == (700, 500) and full.size == header[:2] == (1400, 1000)
        diff = np.abs(p.resize_and_crop(reduced).astype(int) - p.resize_and_crop(full).astype(int))
        assert diff.mean() < 2 and diff.max() <= 8, (encoding, diff.mean(), diff.max())


def test_monochrome1_is_inverted_and_12_bits_are_kept(tmp_path):
    jpeg = _chest_files(1)[0]
    dcm = write_copy(jpeg, tmp_path / "m1.dcm", "mono1_12")
    shown, header = read_dicom(dcm)  # stored values are 4095 - 16 x gray: dark is high
    assert header[2:] == ("MONOCHROME1", 12)
    np.testing.assert_allclose(shown, gray_of(jpeg) / 255.0, atol=1e-5)
    # none: no window, the 12-bit range through the rescale, inverted: 16 x gray / 4095
    raw, _ = read_dicom(dcm, DicomOptions("none"))
    np.testing.assert_allclose(raw, 16 * gray_of(jpeg).astype(float) / 4095.0, atol=1e-5)
    ds = pydicom.dcmread(dcm)  # a 12-bit ramp keeps its 4096 levels (no 8-bit round trip)
    ds.Rows, ds.Columns = 64, 64
    ds.PixelData = np.arange(4096, dtype="<u2").tobytes()
    ds.PhotometricInterpretation, ds.PresentationLUTShape = "MONOCHROME2", "INVERSE"
    ds.save_as(tmp_path / "ramp.dcm")
    ramp, _ = read_dicom(tmp_path / "ramp.dcm", DicomOptions("none"))
    assert len(np.unique(ramp)) == 4096
    np.testing.assert_allclose(ramp.ravel(), 1 - np.arange(4096) / 4095.0, atol=1e-6)  # INVERSE


def _dicom_folder(root, encoding, n_per_class=3, test_per_class=1, frames=1):
    for split, n in (("train", n_per_class), ("test", test_per_class)):
        for jpeg in _chest_files(n, split):
            out = root / split / jpeg.parent.name / f"{jpeg.stem}.dcm"
            out.parent.mkdir(parents=True, exist_ok=True)
            write_copy(jpeg, out, encoding, frames=frames, patient_id=jpeg.stem)
    return root


def _features(root, cache, **options):
    path = xfeat.extract(
        root, cache_dir=cache, model="resnet18", image_size=224, num_workers=0, progress=False, **options
    )
    return read_cache(path)


def test_dicom_features_agree_with_the_jpeg_features(tmp_path):
    """resnet18 (seeded random weights) features of DICOM copies against the JPEGs': cosine
    similarity above 0.999 for every image and encoding (identical for the encapsulated JPEG)."""
    jpegs = tmp_path / "jpeg"
    for split, n in (("train", 3), ("test", 1)):
        for jpeg in _chest_files(n, split):
            (jpegs / split / jpeg.parent.name).mkdir(parents=True, exist_ok=True)
            os.symlink(jpeg, jpegs / split / jpeg.parent.name / jpeg.name)
    reference = _by_stem(_features(jpegs, tmp_path / "c"))
    for encoding in ("mono1_12", "jpeg"):
        copy = _by_stem(_features(_dicom_folder(tmp_path / encoding, encoding), tmp_path / "c"))
        assert sorted(copy) == sorted(reference) and len(copy) == 8
        a = np.stack([reference[k] for k in sorted(copy)])
        b = np.stack([copy[k] for k in sorted(copy)])
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > (0.99999 if encoding == "jpeg" else 0.999), (encoding, cosine)


def _by_stem(features) -> dict:
    return {
        Path(i).stem: row
        for split in features.splits.values()
        for i, row in zip(split.ids, split.features)
    }


def test_patients_come_from_the_patient_id_tag(tmp_path):
    """Names that carry no patient id: PatientID keeps each patient on one side of val."""
    jpegs = _chest_files(12)
    for n, jpeg in enumerate(jpegs):
        out = tmp_path / "train" / jpeg.parent.name / f"img{n:03d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_copy(jpeg, out, "native8", patient_id=f"P{n // 3}", study_uid=f"1.2.3.{n}")
    dataset = load_dataset(DataSpec(str(tmp_path), val_fraction=0.3))
    train, val = dataset.splits["train"], dataset.splits["val"]
    assert set(train.groups).isdisjoint(val.groups) and len(val) % 3 == 0 and len(val) >= 3
    assert {g.split(":")[0] for g in train.groups} == {"PatientID"}
    assert dataset.split_info["dicom_group"] == "PatientID" and dataset.split_info["groups"] == 8
    by_study = load_dataset(DataSpec(str(tmp_path), val_fraction=0.3, dicom_group="StudyInstanceUID"))
    assert by_study.split_info["groups"] == 24 and by_study.fingerprint != dataset.fingerprint


def test_cli_dicom_group_splits_by_the_study_tag_and_records_it(tmp_path):
    """``--dicom-group StudyInstanceUID`` from the command line: val takes whole studies, the
    choice is in the cache's data record, and the other tag makes another entry."""
    jpegs = _chest_files(6)
    for n, jpeg in enumerate(jpegs):
        out = tmp_path / "d" / "train" / jpeg.parent.name / f"img{n:03d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        # one patient, four studies of three images: only the study tag can split them
        write_copy(jpeg, out, "native8", patient_id="P0", study_uid=f"1.2.3.{n // 3}")
    common = ["--data", tmp_path / "d", "--model", "resnet18", "--weights", "none"]
    common += ["--image-size", TINY, "--cache-dir", tmp_path / "c", "--val-fraction", 0.3]
    by_study = CliRunner().invoke(
        cli, [str(a) for a in ["extract", *common, "--dicom-group", "StudyInstanceUID", "--json"]]
    )
    assert by_study.exit_code == 0, by_study.output
    features = read_cache(json.loads(by_study.stdout)["path"])
    assert features.meta.data.dicom_group == "StudyInstanceUID"
    splits = load_dataset(
        DataSpec(str(tmp_path / "d"), val_fraction=0.3, dicom_group="StudyInstanceUID")
    ).splits
    assert [len(features.splits[s].ids) for s in ("train", "val")] == [
        len(splits[s]) for s in ("train", "val")
    ]
    studies = {s: set(splits[s].groups) for s in ("train", "val")}
    assert studies["train"].isdisjoint(studies["val"]) and len(splits["val"]) % 3 == 0
    by_patient = CliRunner().invoke(cli, [str(a) for a in ["extract", *common, "--json"]])
    assert by_patient.exit_code == 1 and "Traceback" not in by_patient.output
    assert "1 patient group(s) by the DICOM tag PatientID" in by_patient.output


def test_analyze_finds_the_same_pixels_in_two_encodings(tmp_path):
    from xfeat.analysis.duplicates import hash_images

    jpegs = _chest_files(3)

    def copy(jpeg, split, name, encoding):
        (tmp_path / split / jpeg.parent.name).mkdir(parents=True, exist_ok=True)
        write_copy(jpeg, tmp_path / split / jpeg.parent.name / name, encoding, patient_id=name)
        return f"{split}/{jpeg.parent.name}/{name}"

    firsts = [copy(jpeg, "train", f"a{n}.dcm", "native8") for n, jpeg in enumerate(jpegs)]
    twin = copy(jpegs[0], "test", "twin.dcm", "rle")  # the first train image, RLE-compressed
    other = copy(_chest_files(1, "test")[-1], "test", "other.dcm", "native8")  # another image
    dataset = load_dataset(DataSpec(str(tmp_path)))
    hashes = hash_images(dataset, progress=False)
    by_id = {i: h for s, sp in dataset.splits.items() for i, h in zip(sp.ids, hashes[s])}
    assert None not in by_id.values() and len({by_id[i] for i in firsts}) == len(firsts)
    assert by_id[twin] == by_id[firsts[0]] and by_id[other] not in {by_id[i] for i in firsts}


def test_an_extensionless_dicom_file_is_found_by_its_preamble(tmp_path):
    jpeg = _chest_files(1)[0]
    write_copy(jpeg, tmp_path / "IMG0001", "native8")
    write_copy(jpeg, tmp_path / "IMG0002", "native8", preamble=False)  # no DICM: not found
    (tmp_path / "notes").write_text("not an image")
    files, skipped = scan_image_files(tmp_path)
    assert [f.name for f in files] == ["IMG0001"] and not skipped
    assert read_image_file(files[0]).size == (224, 224)


def test_cli_extract_fit_and_predict_replay_the_dicom_settings(tmp_path):
    """Two-frame DICOM files: --frame 1 is recorded with the features and replayed by predict
    (without it every file would be refused as multi-frame)."""
    root = _dicom_folder(tmp_path / "mf", "native8", n_per_class=4, frames=2)
    cache = tmp_path / "c"
    common = [
        "--data",
        root,
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        TINY,
        "--cache-dir",
        cache,
    ]
    run = CliRunner().invoke(
        cli, [str(a) for a in ["extract", *common, "--frame", 1, "--dicom-window", "minmax"]]
    )
    assert run.exit_code == 0, run.output
    entry = next(cache.rglob("*.h5"))
    recorded = read_meta(entry).preprocessing
    assert recorded["dicom_frame"] == 1 and recorded["dicom_window"] == "minmax"
    fit = CliRunner().invoke(
        cli,
        [str(a) for a in ["fit-head", *common, "--frame", 1, "--dicom-window", "minmax"]]
        + ["--out", str(tmp_path / "run"), "--n-boot", "0"],
    )
    assert fit.exit_code == 0, fit.output
    out = tmp_path / "p.csv"
    pred = CliRunner().invoke(
        cli,
        ["predict", "--head", str(tmp_path / "run" / "head.npz"), str(root / "test"), "--out", str(out)],
    )
    assert pred.exit_code == 0, pred.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and all(r["path"].endswith(".dcm") and not r["error"] for r in rows)
    refused = CliRunner().invoke(cli, [str(a) for a in ["extract", *common]])
    assert refused.exit_code != 0 and "pass --frame N" in refused.output


def test_predict_reads_the_frame_it_is_told(tmp_path):
    """A head fitted on single-frame files, then multi-frame files to predict: refused in one
    line naming --frame; frame 0 (the same pixels) gives the same probabilities as the
    single-frame copies, frame 1 (inverted) different ones."""
    single = _dicom_folder(tmp_path / "one", "native8", n_per_class=4)
    multi = _dicom_folder(tmp_path / "two", "native8", n_per_class=4, frames=2)
    common = ["--model", "resnet18", "--weights", "none", "--image-size", TINY]
    fit = CliRunner().invoke(
        cli,
        [str(a) for a in ["fit-head", "--data", single, *common, "--cache-dir", tmp_path / "c"]]
        + ["--out", str(tmp_path / "run"), "--n-boot", "0"],
    )
    assert fit.exit_code == 0, fit.output
    head = str(tmp_path / "run" / "head.npz")

    def predict(folder, *extra):
        out = tmp_path / f"p{len(list(tmp_path.glob('p*.csv')))}.csv"
        run = CliRunner().invoke(
            cli, ["predict", "--head", head, str(folder / "test"), "--out", str(out), *extra]
        )
        return run, (list(csv.DictReader(out.open())) if out.exists() else None)

    refused, _ = predict(multi)
    assert refused.exit_code == 1 and "pass --frame N" in refused.output
    assert "Traceback" not in refused.output
    _, reference = predict(single)
    run0, frame0 = predict(multi, "--frame", "0")
    assert run0.exit_code == 0, run0.output
    run1, frame1 = predict(multi, "--frame", "1")
    assert run1.exit_code == 0, run1.output
    p = [[float(r["p_NORMAL"]) for r in rows] for rows in (reference, frame0, frame1)]
    np.testing.assert_allclose(p[1], p[0], atol=1e-6)
    assert not np.allclose(p[2], p[0], atol=1e-6)


def test_a_damaged_dicom_file_is_a_recorded_skip(tmp_path):
    """--skip-bad: a truncated DICOM file among good ones is recorded, the rest extracted; a
    different window is a different cache entry."""
    root = _dicom_folder(tmp_path / "d", "native8")
    bad = root / "train" / "NORMAL" / "truncated.dcm"
    bad.write_bytes((PYDICOM_FILES / "MR_truncated.dcm").read_bytes())
    options = dict(cache_dir=tmp_path / "c", model="resnet18", image_size=TINY, num_workers=0)
    path = xfeat.extract(root, skip_bad=True, progress=False, **options)
    skipped = [i for ids in read_cache(path).skipped.values() for i in ids]
    assert skipped == ["train/NORMAL/truncated.dcm"]
    other = xfeat.extract(root, skip_bad=True, progress=False, dicom_window="none", **options)
    assert other != path and read_meta(other).preprocessing["dicom_window"] == "none"


def test_finetune_reads_the_chosen_frame(tmp_path):
    """The fine-tuning store decodes the frame asked for (each file has two)."""
    from xfeat.finetuning import finetune

    root = _dicom_folder(tmp_path / "mf", "native8", frames=2)
    result = finetune(
        root,
        "resnet18",
        mode="frozen",
        epochs=1,
        n_boot=0,
        image_size=TINY,
        dicom_frame=1,
        num_workers=0,
        progress=False,
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "r",
    )
    assert len(result.predictions["test"][0]) == 2  # every test image decoded and scored
    with pytest.raises(ImageReadError, match="pass --frame N"):
        finetune(
            root,
            "resnet18",
            mode="frozen",
            epochs=1,
            n_boot=0,
            image_size=TINY,
            num_workers=0,
            progress=False,
            cache_dir=tmp_path / "c2",
            out_dir=tmp_path / "r2",
        )


def test_compare_runs_every_mode_on_dicom_files_with_their_settings(tmp_path):
    """compare on a folder of two-frame DICOM files: --frame and --dicom-window reach every
    mode (cached, frozen, full, lp-ft; without the frame each would refuse every file), and
    every run records them."""
    root = _dicom_folder(tmp_path / "mf", "native8", n_per_class=8, test_per_class=2, frames=2)
    result = xfeat.compare(
        root,
        ["resnet18"],
        weights="none",
        out_dir=tmp_path / "cmp",
        cache_dir=tmp_path / "c",
        dicom_window="minmax",
        dicom_frame=1,
        epochs=1,
        image_size=TINY,
        num_workers=0,
        n_boot=20,
        progress=False,
    )
    assert sorted(r["mode"] for r in result.rows) == ["cached", "frozen", "full", "lp-ft"]
    entry = next((tmp_path / "c").rglob("*.h5"))
    recorded = read_meta(entry).preprocessing
    assert recorded["dicom_frame"] == 1 and recorded["dicom_window"] == "minmax"
    from xfeat.finetuning import load_finetuned

    models = sorted((tmp_path / "cmp").rglob("model.pt"))
    assert len(models) >= 2  # the fine-tuned modes keep their network and its preprocessing
    for path in models:
        backbone, _ = load_finetuned(path)
        assert (backbone.preprocessing.dicom_frame, backbone.preprocessing.dicom_window) == (1, "minmax")
