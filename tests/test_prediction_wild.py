"""Predictions on images from the wild: resize modes, the training-input profile, the geometry
match, input checks, the out-of-distribution score, the CSV's columns, and multi-class fixes."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CHEST, MOBILENET_WEIGHTS, TINY, chest_subset, make_feature_set, make_image_folder
from PIL import Image

import xfeat
from xfeat.backbones.preprocessing import Preprocessing
from xfeat.cli import cli
from xfeat.data.profile import (
    check_inputs,
    match_geometry,
    stat_row,
    summarize,
    training_geometry,
)
from xfeat.errors import ConfigError, DataError
from xfeat.fitting import fit_head
from xfeat.heads import NearestNeighbourOOD
from xfeat.prediction import predict
from xfeat.prediction.rows import columns
from xfeat.report.figures import roc_figure
from xfeat.runs.results import RunDataset, RunRecord, RunResult, RunThreshold

EXTRACT = dict(image_size=TINY, num_workers=0, progress=False)


# --------------------------------------------------------------------------- resize modes


def _gradient(width, height):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.broadcast_to((x + y) / 2, (height, width, 3)).astype(np.uint8))


def test_resize_modes_make_the_square_as_named():
    image = _gradient(120, 60)  # aspect 2
    crop = Preprocessing(64, 64, resize_mode="crop").resize_square(image)
    stretch = Preprocessing(64, 64, resize_mode="stretch").resize_square(image)
    pad = Preprocessing(64, 64, resize_mode="pad").resize_square(image)
    assert crop.shape == stretch.shape == pad.shape == (64, 64, 3)
    # crop keeps the middle half of the width: its left column is mid-grey, stretch's is dark
    assert int(crop[32, 0, 0]) > int(stretch[32, 0, 0]) + 20
    # pad letterboxes: black bands above and below (a quarter each), the image in between
    assert pad[:14].max() == 0 and pad[-14:].max() == 0 and pad[32].max() > 0
    assert stretch[:14].max() > 0


def test_crop_mode_keeps_old_cache_keys_and_other_modes_change_them(tmp_path):
    assert "resize_mode" not in Preprocessing().to_dict()  # keys made before modes existed
    assert Preprocessing.from_dict(Preprocessing(resize_mode="pad").to_dict()).resize_mode == "pad"
    root = make_image_folder(tmp_path / "d")
    plans = [
        xfeat.plan_extraction(root, "resnet18", cache_dir=tmp_path / "c", image_size=TINY, resize_mode=m)
        for m in (None, "crop", "stretch", "pad")
    ]
    assert plans[0].key == plans[1].key and len({p.key for p in plans[1:]}) == 3
    with pytest.raises(ConfigError, match="resize_mode='zoom'"):
        Preprocessing(resize_mode="zoom")


# --------------------------------------------------------------------------- the profile


def test_profile_geometry_and_checks():
    rows = np.array(
        [
            stat_row((224, 224, "L", 8), np.full((8, 8, 3), v, np.uint8), (0.5,) * 3, (0.25,) * 3)
            for v in range(100, 140)
        ]
    )
    profile = summarize(rows)
    assert profile["n"] == 40 and profile["modes"] == {"L": 40} and profile["bit_depths"] == {"8": 40}
    assert profile["aspect"]["p50"] == 1.0
    geometry = training_geometry(profile)
    assert geometry == {"aspect": 1.0, "size": (224, 224)}
    assert match_geometry(1400, 1000, geometry) == (224, 224)  # to the training size
    assert match_geometry(1000, 1000, geometry) is None  # the same aspect: left as it is
    only_aspect = {"aspect": 1.0, "size": None}
    assert match_geometry(1400, 1000, only_aspect) == (1000, 1000)  # the long side shrunk
    assert match_geometry(1000, 1400, only_aspect) == (1000, 1000)
    wide = stat_row((1400, 1000, "I;16", 16), np.full((8, 8, 3), 255, np.uint8), (0.5,) * 3, (0.25,) * 3)
    issues = check_inputs(wide, profile)
    kinds = [i.split(" ")[0] for i in issues]
    assert kinds == ["mode", "16-bit", "width", "height", "aspect", "intensity"], issues
    assert check_inputs(rows[5], profile) == []
    varied = profile | {"aspect": {"p0": 0.8, "p1": 0.8, "p50": 1.0, "p99": 1.3, "p100": 1.3}}
    assert training_geometry(varied) == {"aspect": None, "size": None}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A head on 48x40 images (aspect 1.2, all of them)."""
    base = tmp_path_factory.mktemp("wild")
    root = make_image_folder(base / "xray", n_train=30, n_test=6)
    fit_head(
        root,
        "resnet18",
        extract_options=dict(cache_dir=base / "c", **EXTRACT),
        out_dir=base / "run",
        n_boot=0,
    )
    return root, base / "run" / "head.npz"


def test_the_profile_travels_from_the_cache_to_the_head(trained):
    root, head_path = trained
    _, meta = xfeat.heads.load_head(head_path)
    profile = meta["input_profile"]
    assert profile["width"]["p50"] == 48 and profile["height"]["p50"] == 40
    assert profile["modes"] == {"L": sum(profile["modes"].values())}
    assert training_geometry(profile) == {"aspect": 1.2, "size": (48, 40)}
    ood = NearestNeighbourOOD.from_arrays(xfeat.heads.load_head_extra(head_path))
    assert ood.reference.shape[1] == 512 and len(ood.val_distances) > 0


def test_geometry_round_trip_on_synthetic_images(trained, tmp_path):
    """Test images stretched to twice their width: the default predict brings them back to
    the training geometry and agrees with the originals; as-recorded does not."""
    root, head_path = trained
    originals = sorted((root / "test").rglob("*.png"))
    wide = []
    for p in originals:
        out = tmp_path / f"{p.parent.name}_{p.name}"
        Image.open(p).resize((96, 40), Image.BILINEAR).save(out)
        wide.append(out)
    base = predict(head_path, originals, num_workers=0, progress=False)
    matched = predict(head_path, wide, num_workers=0, progress=False)
    kept = predict(head_path, wide, num_workers=0, progress=False, geometry="as-recorded")
    p = [np.array([r["p_PNEUMONIA"] for r in rows]) for rows in (base, matched, kept)]
    assert all(r["geometry"] == "resized 96x40 to 48x40 (training size)" for r in matched)
    assert all(r["geometry"] == "as-recorded" for r in kept + base)
    assert [r["predicted"] for r in matched] == [r["predicted"] for r in base]
    assert np.abs(p[1] - p[0]).max() < np.abs(p[2] - p[0]).max()
    assert all(
        r["input_check"].startswith("width 96") and "aspect 2.40" in r["input_check"] for r in kept
    )
    assert all(r["input_check"] == "ok" for r in base), [r["input_check"] for r in base]


def test_rows_carry_threshold_rule_and_scores_and_the_csv_its_columns(trained, tmp_path):
    root, head_path = trained
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)).save(noise)
    image = next((root / "test" / "NORMAL").glob("*.png"))
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "predict",
            "--head",
            str(head_path),
            str(image),
            str(noise),
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    with open(out) as f:
        header = next(csv.reader(f))
    assert header == columns(["NORMAL", "PNEUMONIA"], adapted=False) == list(rows[0])
    good, photo = rows
    assert good["rule"] == "youden" and 0 < good["threshold"] < 1 and good["ood"] is False
    assert 0 <= good["ood_score"] <= 100
    assert photo["ood"] is True and photo["ood_score"] == 100.0
    assert "mode RGB" in photo["input_check"] and photo["geometry"].startswith("resized 300x300")


def test_nothing_predicted_is_an_error(trained, tmp_path):
    _, head_path = trained
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="none of the 1 images could be predicted"):
        predict(head_path, [bad], num_workers=0, progress=False)
    with pytest.raises(ConfigError, match="geometry='fit'"):
        predict(head_path, [bad], geometry="fit", progress=False)


# --------------------------------------------------------------------------- multi-class


def _three_classes(rng, n):
    y = np.arange(n) % 3
    return rng.normal(size=(n, 6)) + 2.0 * np.eye(6)[y * 2], y


def test_threshold_with_three_classes_is_an_error():
    rng = np.random.default_rng(0)
    features = make_feature_set(
        {s: _three_classes(rng, n) for s, n in (("train", 60), ("val", 30), ("test", 30))},
        class_names=("NORMAL", "BACTERIA", "VIRUS"),
    )
    with pytest.raises(ConfigError, match="applies to two classes, but these data have 3"):
        fit_head(cache=features, threshold="0.5", save=False, n_boot=0)
    result = fit_head(cache=features, save=False, n_boot=0)  # the default: argmax
    assert result.record.threshold.rule == "argmax" and result.record.threshold.value is None
    assert "macro over classes" in result.table()


def test_three_class_roc_panel_has_a_curve_per_class_and_the_macro_average():
    rng = np.random.default_rng(1)
    y = np.arange(90) % 3
    logits = rng.normal(size=(90, 3)) + 2.0 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = ("NORMAL", "BACTERIA", "VIRUS")
    record = RunRecord(
        model="m",
        weights=xfeat.cache.WeightsRecord("file", "/w.pth"),
        mode="cached",
        head="logreg",
        dataset=RunDataset("d", "d", "f", names),
        threshold=RunThreshold("argmax", None),
        metrics={"test": {}},
    )
    result = RunResult(record, {"test": ([str(i) for i in range(90)], y, proba)})
    row = {"model": "m", "mode": "cached", "weights_kind": "file"}
    fig = roc_figure([row], [result])
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert [lab.split(":")[0] for lab in labels[:4]] == [*names, "macro average"]
    assert len(ax.get_lines()) == 5  # three classes, the macro average, the diagonal
    for line, c in zip(ax.get_lines()[:3], range(3)):
        fpr, tpr = line.get_data()
        assert fpr[0] == 0 and tpr[-1] == 1 and np.trapezoid(tpr, fpr) > 0.8, names[c]
    macro = ax.get_lines()[3].get_ydata()
    assert np.all(np.diff(macro) >= -1e-12)  # a mean of monotone curves is monotone


# --------------------------------------------------------------------------- real X-rays


@pytest.mark.integration
def test_unsquashed_chest_xrays_predict_as_the_squashed_ones(tmp_path_factory):
    """The shared X-rays were squashed to 224x224; "un-squashed" copies (314x224, aspect 1.4,
    as the originals had) must be predicted as the squashed ones by default. Photographs and
    digits must come out flagged, held-out X-rays at most a few percent."""
    from sklearn.datasets import load_digits, load_sample_images

    base = tmp_path_factory.mktemp("unsquash")
    data = chest_subset(base / "chest", 60)
    fit_head(
        data,
        "mobilenet_v2",
        weights=MOBILENET_WEIGHTS,
        out_dir=base / "run",
        n_boot=0,
        extract_options=dict(cache_dir=base / "c", num_workers=0, progress=False),
    )
    head = base / "run" / "head.npz"
    held_out = [
        p
        for cls in ("NORMAL", "PNEUMONIA")
        for p in sorted((CHEST / "test" / cls).glob("*.jpeg"))[1::12][:20]
    ]
    wide = []
    for i, p in enumerate(held_out):
        out = base / "wide" / f"{i:03d}.png"
        out.parent.mkdir(exist_ok=True)
        Image.open(p).resize((314, 224), Image.BICUBIC).save(out)
        wide.append(out)
    squashed = predict(head, held_out, progress=False)
    matched = predict(head, wide, progress=False)
    kept = predict(head, wide, progress=False, geometry="as-recorded")
    agree = np.mean([a["predicted"] == b["predicted"] for a, b in zip(squashed, matched)])
    agree_kept = np.mean([a["predicted"] == b["predicted"] for a, b in zip(squashed, kept)])
    gap = [
        np.mean([abs(a["p_PNEUMONIA"] - b["p_PNEUMONIA"]) for a, b in zip(squashed, rows)])
        for rows in (matched, kept)
    ]
    assert agree >= 0.95 and gap[0] < gap[1], (agree, agree_kept, gap)
    assert all(r["geometry"].startswith("resized 314x224 to 224x224") for r in matched)
    # Out of distribution: sklearn's two photographs and its digits (upscaled), vs X-rays
    odd = []
    for i, photo in enumerate(load_sample_images().images):
        odd.append(base / f"photo{i}.png")
        Image.fromarray(photo).save(odd[-1])
    for i, digit in enumerate(load_digits().images[:20]):
        odd.append(base / f"digit{i}.png")
        Image.fromarray((digit * 16).astype(np.uint8)).resize((224, 224), Image.NEAREST).save(odd[-1])
    flagged = [r["ood"] for r in predict(head, odd, progress=False)]
    assert all(flagged), flagged
    assert np.mean([r["ood"] for r in squashed]) <= 0.1
