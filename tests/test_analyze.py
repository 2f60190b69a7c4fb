"""analyze: planted duplicates, leaks, shift and label errors are found on tiny generated data."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import xfeat
from xfeat.analyze import analyze
from xfeat.analyze.duplicates import (_image_table, exact_duplicate_groups, hash_images,
                                      near_duplicate_pairs)
from xfeat.analyze.inputs import load_matching_dataset
from xfeat.analyze.shift import shift_section
from xfeat.cache import CacheError, read_cache
from xfeat.data import load_dataset
from xfeat.fit import fit_head
from xfeat.metrics import compute_metrics

from conftest import TINY, _blob_image, make_image_folder, make_npz

EXTRACT = dict(image_size=TINY, num_workers=0, progress=False)
# Hand counts of the planted folder below (make_image_folder gives 40 train and 12 test per
# class; the plants add or move the files noted in `planted`).
HAND_COUNTS = {"train+val": {"NORMAL": 40 + 1 - 1, "PNEUMONIA": 40 + 1 + 1},
               "test": {"NORMAL": 12 + 1 + 1, "PNEUMONIA": 12 + 1 + 1}}


def _copy(root, src, dst):
    shutil.copyfile(root / src, root / dst)
    return dst


def planted(root):
    """A folder with known defects; returns the ids that the analysis must find."""
    make_image_folder(root, n_train=40, n_test=12)
    # Give test its own patient ids, so only the planted patient crosses splits.
    for k, p in enumerate(sorted((root / "test" / "NORMAL").iterdir())):
        p.rename(p.with_name(f"IM-{900 + k:04d}-0001.png"))
    for k, p in enumerate(sorted((root / "test" / "PNEUMONIA").iterdir())):
        p.rename(p.with_name(f"person{900 + k}_bacteria_{k}.png"))
    plants = {
        # exact: a pair across splits, a triple (two in one split, one in test), a pair within
        # one split (same patient id, so the val carve-out keeps them together)
        "pair_across": {"train/NORMAL/IM-0001-0002.png",
                        _copy(root, "train/NORMAL/IM-0001-0002.png",
                              "test/NORMAL/IM-0950-0001.png")},
        "triple": {"train/PNEUMONIA/person3_bacteria_6.png",
                   _copy(root, "train/PNEUMONIA/person3_bacteria_6.png",
                         "train/PNEUMONIA/person3_bacteria_90.png"),
                   _copy(root, "train/PNEUMONIA/person3_bacteria_6.png",
                         "test/PNEUMONIA/person951_bacteria_1.png")},
        "pair_within": {"train/NORMAL/IM-0005-0010.png",
                        _copy(root, "train/NORMAL/IM-0005-0010.png",
                              "train/NORMAL/IM-0005-0091.png")},
    }
    # near duplicate: a train image with slight noise, in test
    src = np.asarray(Image.open(root / "train/NORMAL/IM-0007-0014.png"), dtype=np.int16)
    noise = np.random.default_rng(1).integers(-3, 4, size=src.shape)
    Image.fromarray(np.clip(src + noise, 0, 255).astype(np.uint8), "L").save(
        root / "test/NORMAL/IM-0960-0001.png")
    plants["near"] = {"train/NORMAL/IM-0007-0014.png", "test/NORMAL/IM-0960-0001.png"}
    # a patient of train also in test, with a new image
    Image.fromarray(_blob_image(np.random.default_rng(7), 1), "L").save(
        root / "test/PNEUMONIA/person2_virus_99.png")
    plants["patient"] = "person2"
    # a NORMAL image filed as PNEUMONIA in train
    (root / "train/NORMAL/IM-0010-0020.png").rename(
        root / "train/PNEUMONIA/person700_bacteria_1.png")
    plants["flipped"] = "train/PNEUMONIA/person700_bacteria_1.png"
    return plants


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("d") / "xray"
    plants = planted(root)
    cache = xfeat.extract(root, "resnet18", cache_dir=tmp_path_factory.mktemp("c"), **EXTRACT)
    run_dir = tmp_path_factory.mktemp("runs") / "cached-logreg"
    fit_head(cache=cache, out_dir=run_dir, n_boot=0)
    # cache= alone: the images are reloaded from the cache's recorded source
    out = tmp_path_factory.mktemp("analysis")
    result = analyze(cache=cache, out_dir=out, runs=[run_dir], n_boot=200, progress=False)
    return result, plants, cache


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_exact_duplicates_are_grouped_within_and_across_splits(planted_run):
    result, plants, _ = planted_run
    exact = result["duplicates"]["exact"]
    groups = {frozenset(m["id"] for m in g["members"]): g for g in exact["groups"]}
    assert set(groups) == {frozenset(plants[k]) for k in ("pair_across", "triple", "pair_within")}
    assert groups[frozenset(plants["pair_across"])]["across_splits"]
    assert groups[frozenset(plants["triple"])]["across_splits"]
    assert not groups[frozenset(plants["pair_within"])]["across_splits"]
    assert exact["n_groups"] == 3 and exact["n_images_in_groups"] == 7
    assert exact["n_groups_across_splits"] == 2 and exact["n_groups_label_conflict"] == 0
    rows = _rows(result.out_dir / "duplicates_exact.csv")
    assert len(rows) == 7 and {r["group"] for r in rows} == {"1", "2", "3"}
    assert "3 groups of pixel-identical images (7 images), 2 across splits" in \
        result["headlines"][0]


def test_near_duplicate_found_and_exact_ones_not_double_listed(planted_run):
    result, plants, _ = planted_run
    near = result["duplicates"]["near"]
    rows = _rows(result.out_dir / "duplicates_near.csv")
    assert len(rows) == near["n_listed"] == near["n_pairs"]  # nothing truncated here
    pairs = [{r["id_a"], r["id_b"]} for r in rows]
    # The planted pair is found and is the most similar of all (random features make many
    # different images similar too, which is why the pixel-identical pairs must be excluded).
    assert pairs[0] == plants["near"] and rows[0]["cross_split"] == "True"
    assert float(rows[0]["similarity"]) >= 0.995
    for key in ("pair_across", "triple", "pair_within"):
        assert not any(p <= plants[key] for p in pairs), f"exact duplicate {key} listed as near"


def test_patient_across_splits(planted_run):
    result, plants, _ = planted_run
    patients = result["duplicates"]["patients"]
    assert [p["patient"] for p in patients["patients"]] == [plants["patient"]]
    assert patients["patients"][0]["splits"][-1] == "test"
    rows = _rows(result.out_dir / "patients_across_splits.csv")
    assert {r["patient"] for r in rows} == {plants["patient"]}
    assert "test/PNEUMONIA/person2_virus_99.png" in {r["id"] for r in rows}


def test_flipped_label_is_a_top_candidate(planted_run):
    result, plants, cache = planted_run
    assert plants["flipped"] in read_cache(cache)["train"].ids  # not carved into val
    noise = result["label_noise"]
    top = {c["id"]: c for c in noise["top"][:3]}
    assert plants["flipped"] in top, noise["top"][:5]
    assert top[plants["flipped"]]["given_label"] == "PNEUMONIA"
    assert top[plants["flipped"]]["predicted_label"] == "NORMAL"
    rows = _rows(result.out_dir / "label_noise_candidates.csv")
    assert len(rows) == noise["n_flagged"] and [int(r["rank"]) for r in rows] == \
        list(range(1, len(rows) + 1))


def test_class_balance_matches_hand_counts(planted_run):
    result, _, _ = planted_run
    cb = result["class_balance"]
    for name in ("NORMAL", "PNEUMONIA"):
        assert cb["counts"]["train"][name] + cb["counts"]["val"][name] == \
            HAND_COUNTS["train+val"][name]
        assert cb["counts"]["test"][name] == HAND_COUNTS["test"][name]
    train = cb["counts"]["train"]
    majority = max(("NORMAL", "PNEUMONIA"), key=lambda n: train[n])
    assert cb["majority_class"] == majority
    assert cb["majority_baseline"]["test"]["accuracy"] == pytest.approx(
        HAND_COUNTS["test"][majority] / 28)
    assert cb["prior_shift"]["train_positive"] == pytest.approx(
        train["PNEUMONIA"] / train["total"])
    assert cb["prior_shift"]["test_positive"] == pytest.approx(14 / 28)


def test_shift_near_chance_on_one_distribution(planted_run):
    result, _, _ = planted_run
    shift = result["shift"]
    assert abs(shift["auc"] - 0.5) < 0.2, shift
    assert shift["ci"][0] < 0.5 < shift["ci"][1]
    assert shift["n_train_used"] <= 3 * shift["n_test"]
    assert set(shift["per_class"]) == {"NORMAL", "PNEUMONIA"}


def test_shift_detected_when_test_is_brighter(tmp_path):
    root = make_image_folder(tmp_path / "bright", n_train=30, n_test=12, seed=3)
    for p in (root / "test").rglob("*.png"):
        arr = np.asarray(Image.open(p), dtype=np.int16)
        Image.fromarray(np.clip(arr + 70, 0, 255).astype(np.uint8), "L").save(p)
    features = read_cache(xfeat.extract(root, "resnet18", cache_dir=tmp_path / "c", **EXTRACT))
    shift = shift_section(features, n_boot=200).summary
    assert shift["auc"] > 0.9 and shift["ci"][0] > 0.75, shift
    assert all(v["auc"] > 0.9 for v in shift["per_class"].values())
    assert "strong shift" in shift["meaning"]


def test_files_written_and_json_round_trips(planted_run):
    result, _, _ = planted_run
    out = result.out_dir
    for name in ("analysis.json", "analysis.md", "class_balance.png", "shift_projection.png",
                 "reliability.png", "duplicates_exact.csv", "duplicates_near.csv",
                 "patients_across_splits.csv", "label_noise_candidates.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "analysis.json").read_text()) == result.record
    json.dumps(result.record, allow_nan=False)
    md = (out / "analysis.md").read_text()
    for section in ("## Headlines", "## 1. Class balance", "## 2. Train/test shift",
                    "## 3. Duplicates", "## 4. Label-noise", "## 5. Overfitting",
                    "## 6. Calibration"):
        assert section in md, section
    for png in ("class_balance.png", "shift_projection.png", "reliability.png"):
        assert f"]({png})" in md
    assert all(h in result.summary() for h in result["headlines"])
    assert str(out / "analysis.md") in result.summary()


def test_overfitting_includes_given_runs(planted_run):
    result, _, _ = planted_run
    runs = result["overfitting"]["runs"]
    assert [r["name"] for r in runs] == ["logistic probe (fit_head)", "cached-logreg"]
    assert runs[1]["same_data"]
    m = runs[0]["metrics"]
    assert runs[0]["gaps"]["train-val"]["accuracy"] == pytest.approx(
        m["train"]["accuracy"] - m["val"]["accuracy"])
    assert runs[0]["interpretation"]


def test_calibration_ece_equals_compute_metrics(planted_run):
    result, _, cache = planted_run
    probe = fit_head(cache=cache, save=False, n_boot=0)
    cal = result["calibration"]
    for split in ("val", "test"):
        _, labels, proba = probe.predictions[split]
        assert cal["ece"][split] == pytest.approx(compute_metrics(labels, proba)["ece"])
        assert sum(cal["curves"][split]["count"]) == len(labels)
    th = cal["threshold"]
    assert th["chosen_on"] == "val"
    assert th["test_at_0.5"]["accuracy"] == pytest.approx(
        compute_metrics(*probe.predictions["test"][1:], threshold=0.5)["accuracy"])


def test_near_duplicate_pairs_chunked_capped_and_excluding_same_content():
    X = np.array([[1, 0], [1, 0.01], [1, 0.02], [0, 1], [0, 1.001], [1, 0]], dtype=np.float32)
    content = np.array([0, 1, 2, 3, 4, 0])  # rows 0 and 5 are pixel-identical
    i, j, s, total = near_duplicate_pairs(X, content, threshold=0.999, chunk=2)
    pairs = set(zip(i.tolist(), j.tolist()))
    assert pairs == {(0, 1), (0, 2), (1, 2), (1, 5), (2, 5), (3, 4)} and total == 6
    assert np.all(np.diff(s) <= 0)
    i, j, s, total = near_duplicate_pairs(X, content, threshold=0.999, max_pairs=2, chunk=2)
    assert len(i) == 2 and total == 6 and s[0] == pytest.approx(1.0)


def test_npz_hashes_find_duplicates_and_label_conflicts(tmp_path):
    path = make_npz(tmp_path / "t.npz", n=(20, 0, 8))
    with np.load(path) as z:
        arrays = dict(z)
    arrays["train_images"][5] = arrays["train_images"][3]   # same label (1)
    arrays["test_images"][1] = arrays["train_images"][3]    # across splits
    arrays["train_images"][8] = arrays["train_images"][9]   # labels 0 and 1: a conflict
    np.savez(path, **arrays)
    dataset = load_dataset(path)
    groups = exact_duplicate_groups(_image_table(dataset, hash_images(dataset, progress=False)))
    by_ids = {frozenset(m["id"] for m in g["members"]): g for g in groups}
    assert set(by_ids) == {frozenset({"train/000003", "train/000005", "test/000001"}),
                           frozenset({"train/000008", "train/000009"})}
    assert by_ids[frozenset({"train/000008", "train/000009"})]["label_conflict"]
    assert by_ids[frozenset({"train/000003", "train/000005", "test/000001"})]["across_splits"]


def test_cache_of_changed_data_and_bad_params_are_refused(tmp_path):
    root = make_image_folder(tmp_path / "x", n_train=8, n_test=3)
    cache = xfeat.extract(root, "resnet18", cache_dir=tmp_path / "c", **EXTRACT)
    assert load_matching_dataset(read_cache(cache).meta).fingerprint == \
        read_cache(cache).meta["dataset"]["fingerprint"]
    with pytest.raises(ValueError, match="near_duplicate_threshold=1.5"):
        analyze(cache=cache, near_duplicate_threshold=1.5)
    with pytest.raises(ValueError, match="n_folds=1"):
        analyze(cache=cache, n_folds=1)
    with pytest.raises(ValueError, match="needs data= .* or cache="):
        analyze()
    target = next((root / "train" / "NORMAL").glob("*.png"))
    Image.fromarray(np.zeros((40, 48), np.uint8), "L").save(target)
    with pytest.raises(CacheError, match="made from different data"):
        analyze(cache=cache, out_dir=tmp_path / "out", progress=False)


def test_multiclass_npz_end_to_end(tmp_path):
    path = make_npz(tmp_path / "three.npz", n=(45, 24, 24), n_classes=3)
    result = analyze(path, "resnet18", out_dir=tmp_path / "out", n_boot=50, progress=False,
                     extract_options=dict(cache_dir=tmp_path / "c", **EXTRACT))
    assert result["calibration"]["threshold"] is None
    assert "total_variation" in result["class_balance"]["prior_shift"]
    assert result["class_balance"]["counts"]["test"]["total"] == 24
    assert (tmp_path / "out" / "analysis.md").is_file()


def test_a_loaded_subsample_as_data_and_its_cache_alone(tmp_path):
    """compare --quick passes a Dataset subsample; its cache alone must also be analysable."""
    root = make_image_folder(tmp_path / "x", n_train=16, n_test=8)
    _copy(root, "train/NORMAL/IM-0001-0002.png", "test/NORMAL/IM-0950-0001.png")
    subset = load_dataset(root).subsample({"train": 20, "test": 12}, seed=0)
    first = analyze(subset, "resnet18", out_dir=tmp_path / "a", n_boot=0, n_folds=3,
                    progress=False, extract_options=dict(cache_dir=tmp_path / "c", **EXTRACT))
    second = analyze(cache=first["cache"]["path"], out_dir=tmp_path / "b", n_boot=0,
                     n_folds=3, progress=False)
    assert first["dataset"]["fingerprint"] == subset.fingerprint
    assert first["class_balance"]["counts"] == second["class_balance"]["counts"]
    assert first["duplicates"]["exact"]["groups"] == second["duplicates"]["exact"]["groups"]
    assert second["duplicates"]["exact"]["n_images_hashed"] == \
        sum(len(s) for s in subset.splits.values())
