"""analyze: planted duplicates, leaks, shift and label errors are found on tiny generated data."""

import csv
import json
import shutil

import numpy as np
import pytest
from conftest import (
    MOBILENET_WEIGHTS,
    TINY,
    _blob_image,
    chest_subset,
    make_feature_set,
    make_image_folder,
    make_npz,
)
from PIL import Image

import xfeat
from xfeat.analysis import analyze
from xfeat.analysis.adaptation import adaptation_section
from xfeat.analysis.balance import balance_section
from xfeat.analysis.calibration import calibration_section
from xfeat.analysis.duplicates import (
    _image_table,
    duplicates_section,
    exact_duplicate_groups,
    hash_images,
    near_duplicate_pairs,
)
from xfeat.analysis.gaps import gaps_section
from xfeat.analysis.label_noise import label_noise_section
from xfeat.analysis.shift import shift_section
from xfeat.cache import CacheError, WeightsRecord, read_cache
from xfeat.data import load_dataset
from xfeat.errors import ConfigError
from xfeat.evaluation.metrics import compute_metrics, evaluate_splits
from xfeat.extraction.features import load_matching_dataset
from xfeat.fitting import fit_head
from xfeat.heads import LogisticHead
from xfeat.runs.results import RunDataset, RunRecord, RunResult, RunThreshold

EXTRACT = dict(image_size=TINY, num_workers=0, progress=False)
# Hand counts of the planted folder below (make_image_folder gives 40 train and 12 test per
# class; the plants add or move the files noted in `planted`).
HAND_COUNTS = {
    "train+val": {"NORMAL": 40 + 1 - 1, "PNEUMONIA": 40 + 1 + 1},
    "test": {"NORMAL": 12 + 1 + 1, "PNEUMONIA": 12 + 1 + 1},
}


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
        "pair_across": {
            "train/NORMAL/IM-0001-0002.png",
            _copy(root, "train/NORMAL/IM-0001-0002.png", "test/NORMAL/IM-0950-0001.png"),
        },
        "triple": {
            "train/PNEUMONIA/person3_bacteria_6.png",
            _copy(
                root, "train/PNEUMONIA/person3_bacteria_6.png", "train/PNEUMONIA/person3_bacteria_90.png"
            ),
            _copy(
                root, "train/PNEUMONIA/person3_bacteria_6.png", "test/PNEUMONIA/person951_bacteria_1.png"
            ),
        },
        "pair_within": {
            "train/NORMAL/IM-0005-0010.png",
            _copy(root, "train/NORMAL/IM-0005-0010.png", "train/NORMAL/IM-0005-0091.png"),
        },
    }
    # near duplicate: a train image with slight noise, in test
    src = np.asarray(Image.open(root / "train/NORMAL/IM-0007-0014.png"), dtype=np.int16)
    noise = np.random.default_rng(1).integers(-3, 4, size=src.shape)
    Image.fromarray(np.clip(src + noise, 0, 255).astype(np.uint8), "L").save(
        root / "test/NORMAL/IM-0960-0001.png"
    )
    plants["near"] = {"train/NORMAL/IM-0007-0014.png", "test/NORMAL/IM-0960-0001.png"}
    # a patient of train also in test, with a new image
    Image.fromarray(_blob_image(np.random.default_rng(7), 1), "L").save(
        root / "test/PNEUMONIA/person2_virus_99.png"
    )
    plants["patient"] = "person2"
    # a NORMAL image filed as PNEUMONIA in train
    (root / "train/NORMAL/IM-0010-0020.png").rename(root / "train/PNEUMONIA/person700_bacteria_1.png")
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
    assert exact["across_split_pairs"] == {"train-test": 2}


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
    assert len(rows) == noise["n_flagged"] and [int(r["rank"]) for r in rows] == list(
        range(1, len(rows) + 1)
    )


def test_class_balance_matches_hand_counts(planted_run):
    result, _, _ = planted_run
    cb = result["class_balance"]
    for name in ("NORMAL", "PNEUMONIA"):
        assert cb["counts"]["train"][name] + cb["counts"]["val"][name] == HAND_COUNTS["train+val"][name]
        assert cb["counts"]["test"][name] == HAND_COUNTS["test"][name]
    train = cb["counts"]["train"]
    majority = max(("NORMAL", "PNEUMONIA"), key=lambda n: train[n])
    assert cb["majority_class"] == majority
    assert cb["majority_baseline"]["test"]["accuracy"] == pytest.approx(
        HAND_COUNTS["test"][majority] / 28
    )
    assert cb["prior_shift"]["train_positive"] == pytest.approx(train["PNEUMONIA"] / train["total"])
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
    assert shift["level"] == "strong"
    assert all(v["level"] == "strong" for v in shift["per_class"].values())


def test_files_written_and_json_round_trips(planted_run):
    result, _, _ = planted_run
    out = result.out_dir
    for name in (
        "analysis.json",
        "analysis.md",
        "class_balance.png",
        "shift_projection.png",
        "reliability.png",
        "duplicates_exact.csv",
        "duplicates_near.csv",
        "patients_across_splits.csv",
        "label_noise_candidates.csv",
        "adaptation_gaps.png",
        "adaptation_transductive.csv",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "analysis.json").read_text()) == result.record
    json.dumps(result.record, allow_nan=False)
    md = (out / "analysis.md").read_text()
    for section in (
        "## Headlines",
        "## 1. Class balance",
        "## 2. Train/test shift",
        "## 3. Duplicates",
        "## 4. Label-noise",
        "## 5. Overfitting",
        "## 6. Calibration",
        "## 7. Site adaptation to the test images (transductive)",
    ):
        assert section in md, section
    for png in ("class_balance.png", "shift_projection.png", "reliability.png", "adaptation_gaps.png"):
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
        m["train"]["accuracy"] - m["val"]["accuracy"]
    )
    tv = runs[0]["gaps"]["train-val"]["accuracy"]
    flag = result["overfitting"]["accuracy_gap_flag"]
    assert runs[0]["train_val_finding"] == (
        "overfitting" if tv > flag else "val_exceeds_train" if tv < -flag else "agree"
    )
    assert runs[0]["comparable"] and runs[1]["comparable"]


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
        compute_metrics(*probe.predictions["test"][1:], threshold=0.5)["accuracy"]
    )


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
    arrays["train_images"][5] = arrays["train_images"][3]  # same label (1)
    arrays["test_images"][1] = arrays["train_images"][3]  # across splits
    arrays["train_images"][8] = arrays["train_images"][9]  # labels 0 and 1: a conflict
    np.savez(path, **arrays)
    dataset = load_dataset(path)
    groups = exact_duplicate_groups(_image_table(dataset, hash_images(dataset, progress=False)))
    by_ids = {frozenset(m["id"] for m in g["members"]): g for g in groups}
    assert set(by_ids) == {
        frozenset({"train/000003", "train/000005", "test/000001"}),
        frozenset({"train/000008", "train/000009"}),
    }
    assert by_ids[frozenset({"train/000008", "train/000009"})]["label_conflict"]
    assert by_ids[frozenset({"train/000003", "train/000005", "test/000001"})]["across_splits"]


def test_cache_of_changed_data_and_bad_params_are_refused(tmp_path):
    root = make_image_folder(tmp_path / "x", n_train=8, n_test=3)
    cache = xfeat.extract(root, "resnet18", cache_dir=tmp_path / "c", **EXTRACT)
    assert (
        load_matching_dataset(read_cache(cache).meta).fingerprint
        == read_cache(cache).meta.dataset.fingerprint
    )
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
    result = analyze(
        path,
        "resnet18",
        out_dir=tmp_path / "out",
        n_boot=50,
        progress=False,
        extract_options=dict(cache_dir=tmp_path / "c", **EXTRACT),
    )
    assert result["calibration"]["threshold"] is None
    assert "total_variation" in result["class_balance"]["prior_shift"]
    assert result["class_balance"]["counts"]["test"]["total"] == 24
    assert (tmp_path / "out" / "analysis.md").is_file()


def test_a_loaded_subsample_as_data_and_its_cache_alone(tmp_path):
    """compare --quick passes a Dataset subsample; its cache alone must also be analysable."""
    root = make_image_folder(tmp_path / "x", n_train=16, n_test=8)
    _copy(root, "train/NORMAL/IM-0001-0002.png", "test/NORMAL/IM-0950-0001.png")
    subset = load_dataset(root).subsample({"train": 20, "test": 12}, seed=0)
    first = analyze(
        subset,
        "resnet18",
        out_dir=tmp_path / "a",
        n_boot=0,
        n_folds=3,
        progress=False,
        extract_options=dict(cache_dir=tmp_path / "c", **EXTRACT),
    )
    second = analyze(
        cache=first["cache"]["path"], out_dir=tmp_path / "b", n_boot=0, n_folds=3, progress=False
    )
    assert first["dataset"]["fingerprint"] == subset.fingerprint
    assert first["class_balance"]["counts"] == second["class_balance"]["counts"]
    assert first["duplicates"]["exact"]["groups"] == second["duplicates"]["exact"]["groups"]
    assert second["duplicates"]["exact"]["n_images_hashed"] == sum(
        len(s) for s in subset.splits.values()
    )


# --------------------------------------------------------------------------- one per section
# Feature sets built from arrays, so each planted effect is exact and no backbone runs.


def _blobs(rng, n_per_class, shift=0.0, dim=8):
    """Two well-separated Gaussian classes (labels 0 then 1), optionally shifted."""
    y = np.repeat([0, 1], n_per_class)
    X = rng.normal(size=(len(y), dim)) + 3.0 * y[:, None] + shift
    return X, y


def _run_result(
    labels,
    probas,
    *,
    threshold=0.5,
    n_boot=0,
    history=(),
    fingerprint="fp",
    class_names=("NORMAL", "PNEUMONIA"),
):
    """A cached-logreg RunResult from given predictions, through the metrics fit_head uses."""
    ev = evaluate_splits(labels, probas, threshold=threshold, n_boot=n_boot)
    record = RunRecord(
        model="m",
        weights=WeightsRecord("random", "r"),
        mode="cached",
        head="logreg",
        dataset=RunDataset("d", "d.npz", fingerprint, tuple(class_names)),
        threshold=RunThreshold(**ev["threshold"]),
        selection={"C": 1.0},
        metrics=ev["metrics"],
        metrics_at_half=ev["metrics_at_0.5"],
        ci=ev["ci"],
        history=list(history),
    )
    return RunResult(
        record, {s: ([f"{s}/{i}" for i in range(len(y))], y, probas[s]) for s, y in labels.items()}
    )


def test_balance_section_counts_baseline_and_prior_shift():
    rng = np.random.default_rng(0)
    features = make_feature_set(
        {
            "train": (rng.normal(size=(40, 4)), [0] * 30 + [1] * 10),
            "val": (rng.normal(size=(8, 4)), [0] * 6 + [1] * 2),
            "test": (rng.normal(size=(20, 4)), [0] * 5 + [1] * 15),
        }
    )
    section = balance_section(features)
    s = section.summary
    assert s["counts"]["test"] == {"NORMAL": 5, "PNEUMONIA": 15, "total": 20}
    assert s["fractions"]["train"] == [0.75, 0.25] and s["majority_class"] == "NORMAL"
    assert s["majority_baseline"]["test"] == {"accuracy": 0.25, "balanced_accuracy": 0.5}
    assert s["prior_shift"]["total_variation"] == pytest.approx(0.5)
    ps = s["prior_shift"]
    assert ps["majority_test_vs_train"] == "lower"
    assert ps["majority_fraction_change"] == pytest.approx(-0.5)
    assert ps["positive_class"] == "PNEUMONIA"
    assert (ps["train_positive"], ps["test_positive"]) == (0.25, 0.75)
    assert len(section.headlines) == 1
    assert "| test | 5 (25.0%) | 15 (75.0%) | 20 |" in section.markdown
    bars = section.figures["class_balance.png"].axes[0].patches
    assert [b.get_height() for b in bars] == [0.75, 0.25, 0.75, 0.25, 0.25, 0.75]


def test_shift_section_finds_shift_within_one_class_only():
    rng = np.random.default_rng(0)
    X_test, y_test = _blobs(rng, 30)
    X_test[y_test == 0] += 2.0  # NORMAL test images come from elsewhere; PNEUMONIA do not
    features = make_feature_set(
        {"train": _blobs(rng, 60), "val": _blobs(rng, 10), "test": (X_test, y_test)}
    )
    section = shift_section(features, n_boot=0)
    s = section.summary
    assert s["per_class"]["NORMAL"]["auc"] > 0.9
    assert abs(s["per_class"]["PNEUMONIA"]["auc"] - 0.5) < 0.2
    assert s["n_train_used"] == 120 and s["ci"] is None and s["folds"] == 5
    assert s["per_class"]["NORMAL"]["level"] == "strong"
    assert s["per_class"]["PNEUMONIA"]["level"] == "none"
    assert len(section.headlines) == 1
    scatter = section.figures["shift_projection.png"].axes[0].collections
    assert sum(len(c.get_offsets()) for c in scatter) == 120 + 20 + 60
    no_test = shift_section(make_feature_set({"train": _blobs(rng, 5), "val": _blobs(rng, 2)}))
    assert no_test.summary["skip_reason"] == "no_test_split" and "auc" not in no_test.summary
    assert not no_test.figures


def test_duplicates_section_tables_follow_the_planted_pairs(tmp_path):
    path = make_npz(tmp_path / "t.npz", n=(20, 6, 8))
    with np.load(path) as z:
        arrays = dict(z)
    arrays["test_images"][1] = arrays["train_images"][3]
    np.savez(path, **arrays)
    dataset = load_dataset(path)
    rng = np.random.default_rng(0)
    split_features = {
        s: [rng.normal(size=(len(sp), 16)), sp.labels, sp.ids] for s, sp in dataset.splits.items()
    }
    split_features["test"][0][5] = split_features["train"][0][0] + 1e-3  # a near duplicate
    features = make_feature_set(split_features)
    section = duplicates_section(
        features, dataset, hash_images(dataset, progress=False), threshold=0.999
    )
    s = section.summary
    assert [[m["id"] for m in g["members"]] for g in s["exact"]["groups"]] == [
        ["train/000003", "test/000001"]
    ]
    assert s["exact"]["across_split_pairs"] == {"train-test": 1}
    near_rows, columns = section.tables["duplicates_near.csv"]
    assert [(r["id_a"], r["id_b"]) for r in near_rows] == [
        (dataset.splits["train"].ids[0], "test/000005")
    ]
    assert s["near"]["across_split_pairs"] == {"train-test": 1} and "similarity" in columns
    assert len(section.tables["duplicates_exact.csv"][0]) == 2
    assert s["patients"]["n_patients"] == 0  # npz ids name no patient
    assert (s["exact"]["n_groups"], s["exact"]["n_images_in_groups"]) == (1, 2)
    assert s["exact"]["n_groups_across_splits"] == 1 and s["exact"]["n_groups_label_conflict"] == 0
    assert (s["near"]["n_pairs"], s["near"]["n_pairs_across_splits"]) == (1, 1)
    assert s["near"]["threshold"] == 0.999 and not s["near"]["truncated"]
    assert len(section.headlines) == 2  # exact and near; no patient line


def test_label_noise_section_ranks_the_flipped_labels_first():
    rng = np.random.default_rng(0)
    X, y = _blobs(rng, 40)
    y[[3, 50]] = 1 - y[[3, 50]]  # one NORMAL filed as PNEUMONIA, and the reverse
    features = make_feature_set({"train": (X, y), "val": _blobs(rng, 5)})
    section = label_noise_section(features, C=1.0, n_folds=4)
    s = section.summary
    top = [(c["id"], c["given_label"], c["predicted_label"]) for c in s["top"][:2]]
    assert sorted(top) == [
        ("train/000003", "PNEUMONIA", "NORMAL"),
        ("train/000050", "NORMAL", "PNEUMONIA"),
    ]
    rows, columns = section.tables["label_noise_candidates.csv"]
    assert (
        len(rows) == s["n_flagged"]
        and [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
        and columns[0] == "rank"
    )
    assert s["folds"] == 4 and s["out_of_fold"]["accuracy"] == pytest.approx(78 / 80, abs=0.02)
    one = make_feature_set({"train": (X[:41], np.r_[np.zeros(40, int), 1]), "val": _blobs(rng, 5)})
    assert "skipped" in label_noise_section(one, C=1.0).summary  # one PNEUMONIA image: no folds


def test_gaps_section_reads_overfitting_and_a_val_test_gap(tmp_path):
    y = np.repeat([0, 1], 50)
    p = np.column_stack([1 - y, y]).astype(float) * 0.8 + 0.1  # right, at 0.9 confidence
    wrong = p[:, ::-1]
    labels = {"train": y, "val": y, "test": y}
    probas = {
        "train": p,
        "val": np.where((np.arange(100) % 25 == 0)[:, None], wrong, p),
        "test": np.where((np.arange(100) % 3 == 0)[:, None], wrong, p),
    }
    probe = _run_result(labels, probas, n_boot=200)
    history = [
        {"epoch": e, "train_accuracy": 0.5, "val_accuracy": 0.5, "train_loss": 1.0, "val_loss": 1.0}
        for e in (1, 2)
    ]
    other = _run_result(labels, probas, history=history, fingerprint="other data")
    other.save(tmp_path / "finetuned")
    probe.save(tmp_path / "probe")
    section = gaps_section(probe, [tmp_path / "finetuned", tmp_path / "probe"], fingerprint="fp")
    runs = section.summary["runs"]
    assert [r["name"] for r in runs] == ["logistic probe (fit_head)", "finetuned"]
    gaps = runs[0]["gaps"]
    assert gaps["train-val"]["accuracy"] == pytest.approx(0.04)
    assert gaps["val-test"]["accuracy"] == pytest.approx(0.96 - 0.66)
    assert runs[0]["val_test_finding"] == "val_overstates_test" and runs[0]["val_outside_test_ci"]
    assert runs[0]["train_val_finding"] == "agree" and not runs[0]["extreme_threshold"]
    assert runs[0]["comparable"] and runs[0]["same_data"]
    assert not runs[1]["same_data"] and runs[1]["curves_png"] == "curves_finetuned.png"
    assert not runs[1]["comparable"]
    section.figures["curves_finetuned.png"](tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    m = runs[0]["metrics"]
    assert [m[split]["accuracy"] for split in ("train", "val", "test")] == pytest.approx(
        [1.0, 0.96, 0.66]
    )
    assert len(section.headlines) == 1


def test_calibration_section_curves_and_threshold_effect():
    y = np.repeat([0, 1], 50)
    p1 = np.where(y == 1, 0.7, 0.4)  # at 0.5 every image is right; the rate in each bin is 0 or 1
    proba = np.column_stack([1 - p1, p1])
    probe = _run_result({"val": y, "test": y}, {"val": proba, "test": proba}, threshold=0.8)
    section = calibration_section(probe)
    s = section.summary
    curve = s["curves"]["test"]
    filled = [(c, a, n) for c, a, n in zip(curve["confidence"], curve["accuracy"], curve["count"]) if n]
    assert filled == [(pytest.approx(0.4), 0.0, 50), (pytest.approx(0.7), 1.0, 50)]
    assert s["ece"]["test"] == pytest.approx(compute_metrics(y, proba)["ece"])
    th = s["threshold"]
    assert th["value"] == 0.8 and th["test_at_0.5"]["accuracy"] == 1.0
    assert th["test_at_chosen"]["accuracy"] == 0.5 and th["difference"]["accuracy"] == -0.5
    assert th["test_at_chosen"]["balanced_accuracy"] == 0.5
    assert th["test_at_0.5"]["balanced_accuracy"] == 1.0
    assert s["positive_class"] == "PNEUMONIA" and len(section.headlines) == 1
    lines = section.figures["reliability.png"].axes[0].get_lines()[1:]  # after the diagonal
    for line, split in zip(lines, ("val", "test"), strict=True):
        assert list(line.get_ydata()) == [
            a for a, n in zip(s["curves"][split]["accuracy"], s["curves"][split]["count"]) if n
        ]
    three = calibration_section(
        _run_result(
            {"val": np.arange(6) % 3}, {"val": np.full((6, 3), 1 / 3)}, class_names=("a", "b", "c")
        )
    )
    assert three.summary["threshold"] is None and three.summary["positive_class"] is None


def _overlapping_classes(rng, n_normal, n_pneumonia, dim=8):
    """NORMAL then PNEUMONIA, three standard deviations apart along the first feature."""
    y = np.r_[np.zeros(n_normal, int), np.ones(n_pneumonia, int)]
    X = rng.normal(size=(len(y), dim))
    X[:, 0] += 3.0 * y
    return X, y


def test_adaptation_section_flags_em_under_covariate_shift():
    rng = np.random.default_rng(0)
    X_test, y_test = _overlapping_classes(rng, 60, 100)  # prior 0.625, train's 0.733
    # The NORMAL test images come from another site: off to the side, and part of the way
    # towards PNEUMONIA, so the probe calls more of them PNEUMONIA than it should.
    X_test[y_test == 0, 0] += 1.0
    X_test[y_test == 0, 1:4] += 1.5
    features = make_feature_set(
        {
            "train": _overlapping_classes(rng, 80, 220),
            "val": _overlapping_classes(rng, 20, 60),
            "test": (X_test, y_test),
        }
    )
    head = LogisticHead().fit(
        features["train"].features,
        features["train"].labels,
        X_val=features["val"].features,
        y_val=features["val"].labels,
    )
    probe = _run_result(
        {s: features[s].labels for s in features.splits},
        {s: head.predict_proba(features[s].features) for s in features.splits},
        threshold="youden",
    )
    probe.head = head
    section = adaptation_section(features, probe)
    s = section.summary
    rows, columns = section.tables["adaptation_transductive.csv"]
    assert [r["method"] for r in rows] == ["none", "standardize", "coral", "em"]
    assert [r["transductive"] for r in rows] == [False, True, True, True]
    assert len({(r["val_accuracy"], r["val_roc_auc"]) for r in rows}) == 1  # val never adapted
    plain = s["methods"][0]["val"]
    assert all(r["val"] == plain for r in s["methods"] if r["method"] != "em")
    em_val = next(r["val"] for r in s["methods"] if r["method"] == "em")  # calibrated on val
    assert em_val["roc_auc"] == pytest.approx(plain["roc_auc"])
    none = s["methods"][0]
    assert none["test"]["accuracy"] == pytest.approx(probe.record.metrics["test"]["accuracy"])
    assert none["gap"]["accuracy"] == pytest.approx(
        probe.record.metrics["val"]["accuracy"] - probe.record.metrics["test"]["accuracy"]
    )
    assert s["threshold"] == {
        "value": probe.record.threshold.value,
        "rule": "youden",
        "chosen_on": "val",
    }
    # EM: pushed further from the actual prior by the shifted NORMAL images, and says why.
    em = s["em"]
    assert em["actual_test_prior"]["PNEUMONIA"] == 0.625
    assert em["train_prior"]["PNEUMONIA"] == pytest.approx(220 / 300)
    assert em["estimated_test_prior"]["PNEUMONIA"] > em["train_prior"]["PNEUMONIA"] > 0.625
    assert em["within_class_shift_auc"]["NORMAL"] > 0.8 and em["shifted_classes"] == ["NORMAL"]
    assert em["implausible"] and em["moves_away_from_actual"]
    distance = em["distance_to_actual"]
    assert distance["estimate"] > distance["train"] + distance["standard_error"]
    assert s["recommended"] == "standardize" and len(section.headlines) == 2
    assert s["transductive"] is True and "transductive" in section.title.lower()
    assert s["head_source"] == "probe"
    # Test labels choose nothing: with every test label flipped, the threshold, EM's estimate,
    # its label-free check and the recommendation stay; only what is reported on test changes.
    flipped = adaptation_section(
        make_feature_set(
            {
                **{k: (features[k].features, features[k].labels) for k in ("train", "val")},
                "test": (X_test, 1 - y_test),
            }
        ),
        probe,
    ).summary
    assert flipped["em"]["actual_test_prior"]["PNEUMONIA"] == 0.375
    assert flipped["methods"][0]["test"]["accuracy"] == pytest.approx(1 - none["test"]["accuracy"])
    for key in ("threshold", "recommended", "head_source"):
        assert flipped[key] == s[key], key
    for key in ("train_prior", "estimated_test_prior", "within_class_shift_auc", "shifted_classes"):
        assert flipped["em"][key] == em[key], key
    bars = section.figures["adaptation_gaps.png"].axes[0].patches
    assert len(bars) == 4 * 3
    # Without the probe's head, a LogisticHead of its C is fitted; the table keeps its shape.
    probe.head = None
    refit = adaptation_section(features, probe).summary
    assert refit["head_source"] == "fitted_on_train" and len(refit["methods"]) == 4
    small = make_feature_set({"train": _blobs(rng, 10), "val": _blobs(rng, 5), "test": _blobs(rng, 5)})
    skipped = adaptation_section(small, probe)
    assert skipped.summary["skip_reason"] == "too_few_test_images"
    assert skipped.summary["n_test"] == 10 and skipped.summary["min_test_images"] == 20
    assert skipped.summary["transductive"] is True and not skipped.figures


# --------------------------------------------------------------------------- probe reuse


def test_a_given_probe_gives_the_analysis_of_a_fitted_one(planted_run, tmp_path):
    fitted_here, _, cache = planted_run
    run_dir = fitted_here["params"]["runs"][0]
    probe = fit_head(cache=cache, out_dir=tmp_path / "probe", n_boot=200)
    sections = (
        "class_balance",
        "shift",
        "duplicates",
        "label_noise",
        "overfitting",
        "calibration",
        "adaptation",
        "headlines",
    )
    for given in (probe, tmp_path / "probe"):  # in memory, and its folder (head.npz)
        # its own folder among runs= is not listed twice
        reused = analyze(
            cache=cache,
            out_dir=tmp_path / "out",
            runs=[run_dir, tmp_path / "probe"],
            probe=given,
            n_boot=200,
            progress=False,
        )
        for key in sections:
            assert reused[key] == fitted_here[key], key
        assert reused["params"]["probe"] == str(tmp_path / "probe")
        assert fitted_here["params"]["probe"] is None
    written = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert written["params"]["probe"] == str(tmp_path / "probe")
    # Reused, not refitted: a probe with another C drives label noise and the gaps.
    strong = fit_head(cache=cache, save=False, n_boot=0, head_params={"C": 1e-3})
    reused = analyze(cache=cache, out_dir=tmp_path / "out", probe=strong, n_boot=0, progress=False)
    assert reused["label_noise"]["C"] == 1e-3
    assert reused["overfitting"]["runs"][0]["metrics"]["test"]["log_loss"] == pytest.approx(
        strong.record.metrics["test"]["log_loss"]
    )
    assert reused["params"]["probe"] == "given, not saved"


def test_a_probe_of_another_cache_or_head_is_refused(planted_run, tmp_path):
    _, _, cache = planted_run
    root = make_image_folder(tmp_path / "other", n_train=8, n_test=3)
    other = fit_head(
        cache=xfeat.extract(root, "resnet18", cache_dir=tmp_path / "c", **EXTRACT),
        out_dir=tmp_path / "other_probe",
        n_boot=0,
    )
    for given in (other, tmp_path / "other_probe"):
        with pytest.raises(
            ConfigError,
            match=r"was fitted on cache [0-9a-f]{16}, but this "
            r"analysis reads cache [0-9a-f]{16}",
        ):
            analyze(cache=cache, out_dir=tmp_path / "out", probe=given, progress=False)
    knn = fit_head(cache=cache, head="knn", save=False, n_boot=0)
    with pytest.raises(ConfigError, match="is a cached knn run; analyze reuses only a logistic"):
        analyze(cache=cache, out_dir=tmp_path / "out", probe=knn, progress=False)
    with pytest.raises(ConfigError, match="no results.json"):
        analyze(cache=cache, out_dir=tmp_path / "out", probe=tmp_path, progress=False)


@pytest.mark.integration
def test_real_xrays_with_a_reused_probe(tmp_path):
    chest = chest_subset(tmp_path / "chest", n_per_class=40)
    cache = xfeat.extract(
        chest,
        "mobilenet_v2",
        weights=MOBILENET_WEIGHTS,
        batch_size=32,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    fit_head(cache=cache, out_dir=tmp_path / "probe", n_boot=200)
    result = analyze(
        cache=cache, probe=tmp_path / "probe", out_dir=tmp_path / "out", n_boot=200, progress=False
    )
    probe = result["overfitting"]["runs"][0]
    assert probe["metrics"]["test"]["roc_auc"] > 0.8  # ImageNet features separate the classes
    assert result["class_balance"]["counts"]["test"] == {"NORMAL": 40, "PNEUMONIA": 40, "total": 80}
    assert 0.0 <= result["shift"]["auc"] <= 1.0 and set(result["shift"]["per_class"]) == {
        "NORMAL",
        "PNEUMONIA",
    }
    assert result["label_noise"]["n_train"] == 72 and result["label_noise"]["fraction_flagged"] < 0.25
    assert result["params"]["probe"] == str(tmp_path / "probe")
    for name in result["files"].values():
        assert (tmp_path / "out" / name).stat().st_size > 0, name


def test_prior_shift_and_within_class_shift_are_judged_against_sampling_noise():
    """A 10-class split drawn from one distribution (sklearn's digits) shows neither a prior
    shift nor a within-class shift: the balance section and the adaptation check agree."""
    from sklearn.datasets import load_digits

    from xfeat.heads.adaptation import shift_bars, shifted_classes

    y = load_digits().target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = y[order[:1200]], y[order[1450:]]
    features = make_feature_set(
        {
            "train": (rng.normal(size=(len(train), 4)), train),
            "val": (rng.normal(size=(250, 4)), y[order[1200:1450]]),
            "test": (rng.normal(size=(len(test), 4)), test),
        },
        class_names=[str(k) for k in range(10)],
    )
    ps = balance_section(features).summary["prior_shift"]
    assert ps["total_variation"] > 0.05 and not ps["beyond_noise"]  # noise, though visible
    assert ps["majority_test_vs_train"] == "similar" and "sampling noise" in ps["meaning"]
    bars = shift_bars(train, test)  # ~35 test images per class, ten classes tested
    assert all(0.62 < b < 0.7 for b in bars.values())
    assert shifted_classes({1: 0.61, 3: 0.8}, bars) == [3]
    # two classes, a few hundred images each: the bar is the fixed 0.6
    big = np.repeat([0, 1], 300)
    assert shift_bars(big, big) == {0: 0.6, 1: 0.6}
