"""Multi-label tables (NIH and CheXpert styles, uncertain and blank labels) on the real chest
X-rays, with labels from their file names: reading, the cache, one-vs-rest heads, metrics,
bootstrap over patients, predict's per-label columns, and one-line errors."""

import csv
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CHEST, MOBILENET_WEIGHTS, REPO, TINY
from sklearn.metrics import average_precision_score, roc_auc_score

import xfeat
from xfeat.cache import read_cache
from xfeat.cli import cli
from xfeat.config import DataSpec
from xfeat.data import load_dataset
from xfeat.errors import ConfigError, DataError
from xfeat.evaluation.core import weighted_auc, weighted_average_precision
from xfeat.evaluation.multilabel import (
    bootstrap_multilabel_ci,
    choose_label_thresholds,
    multilabel_metrics,
)
from xfeat.heads import OneVsRestHead, load_head, save_head

sys.path.insert(0, str(REPO / "scripts"))
from kermany_tables import LABELS, kind_of, write_tables  # noqa: E402

EXTRACT = dict(image_size=TINY, num_workers=0, progress=False)
NIH = dict(
    image_col="Image Index", label_col="Finding Labels", label_sep="|", negative_label="No Finding"
)
CHEXPERT = dict(image_col="Path", label_cols=",".join(LABELS))


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    if not CHEST.is_dir():
        pytest.fail(f"the shared chest X-ray data is missing at {CHEST}; see ../shared/README.md")
    return write_tables(tmp_path_factory.mktemp("tables"), CHEST, per_class=12)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_nih_and_chexpert_tables_give_the_same_label_matrix(tables):
    nih = load_dataset(DataSpec(tables["nih"], patient_col="Patient ID", **NIH))
    chex = load_dataset(DataSpec(tables["chexpert"], patient_col="Patient ID", **CHEXPERT))
    assert nih.multilabel and chex.multilabel
    assert nih.class_names == ["Bacterial", "Pneumonia", "Viral"]  # sorted train labels
    assert chex.class_names == list(LABELS)  # the order of --label-cols
    order = [chex.class_names.index(c) for c in nih.class_names]
    for split in ("train", "val", "test"):
        a, b = nih.splits[split], chex.splits[split]
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.labels, b.labels[:, order])
    # the labels are the file names' truth, row by row
    test = chex.splits["test"]
    for path, row in zip(test.paths, test.labels):
        kind = kind_of(__import__("pathlib").Path(path))
        assert row.tolist() == [int(kind != "normal"), int(kind == "bacterial"), int(kind == "viral")]
    # val was carved by patient: no patient on both sides
    train_patients = set(chex.splits["train"].groups)
    assert not train_patients & set(chex.splits["val"].groups)
    assert chex.counts()["test"] == [24, 12, 12]


def test_joined_labels_are_split_never_substring_matched(tmp_path, tables):
    rows = _read(tables["nih"])
    # "Pneumonia" must not match inside "Pneumonia-like"; the separator may carry spaces
    for i, r in enumerate(rows):
        if r["Finding Labels"] == "No Finding" and i % 2:
            r["Finding Labels"] = "Pneumonia-like"
        r["Finding Labels"] = r["Finding Labels"].replace("|", " | ")
    ds = load_dataset(DataSpec(_write(tmp_path / "t.csv", rows), **NIH))
    assert ds.class_names == ["Bacterial", "Pneumonia", "Pneumonia-like", "Viral"]
    train = ds.splits["train"]
    like = train.labels[:, 2] == 1
    assert like.any() and (train.labels[like, 1] == 0).all()


def test_uncertain_and_blank_entries(tmp_path, tables):
    rows = _read(tables["chexpert"])
    train_rows = [r for r in rows if r["split"] == "train"]
    train_rows[0]["Viral"], train_rows[1]["Viral"] = "-1.0", ""
    path = _write(tmp_path / "t.csv", rows)
    viral = LABELS.index("Viral")
    got = {}
    for policy, expected in (("ignore", -1), ("zeros", 0), ("ones", 1)):
        ds = load_dataset(DataSpec(path, uncertain=policy, val_fraction=0.2, **CHEXPERT))
        train, val = ds.splits["train"], ds.splits["val"]
        by_id = dict(zip(train.ids + val.ids, np.concatenate([train.labels, val.labels])))
        got[policy] = by_id[train_rows[0]["Path"]][viral]
        assert by_id[train_rows[1]["Path"]][viral] == -1  # blank is always unknown
        assert got[policy] == expected
    # the policy is part of the data set's identity
    a = load_dataset(DataSpec(path, uncertain="zeros", **CHEXPERT)).fingerprint
    b = load_dataset(DataSpec(path, uncertain="ones", **CHEXPERT)).fingerprint
    assert a != b


def test_table_errors_are_one_line_and_name_the_problem(tmp_path, tables):
    rows = _read(tables["chexpert"])
    with pytest.raises(DataError, match=r"no column 'Edema' \(the --label-cols\); its columns are"):
        load_dataset(DataSpec(tables["chexpert"], image_col="Path", label_cols="Pneumonia,Edema"))
    bad = [dict(r) for r in rows]
    bad[3]["Viral"] = "maybe"
    with pytest.raises(DataError, match=r"row 4: 'maybe' in column 'Viral'; expected 1, 0, -1"):
        load_dataset(DataSpec(_write(tmp_path / "bad.csv", bad), **CHEXPERT))
    one = [dict(r) for r in rows]
    for r in one:
        if r["split"] == "train":
            r["Viral"] = "0.0"
    with pytest.raises(DataError, match=r"the label 'Viral' has only the value 0 in train"):
        load_dataset(DataSpec(_write(tmp_path / "one.csv", one), **CHEXPERT))
    nih = _read(tables["nih"])
    nih[-1]["Finding Labels"] = "Edema"  # a test row with a label train never has
    with pytest.raises(DataError, match=r"the test rows have labels \['Edema'\] that no train row has"):
        load_dataset(DataSpec(_write(tmp_path / "nih.csv", nih), **NIH))
    with pytest.raises(ConfigError, match="either label_cols .* or label_sep"):
        DataSpec(tables["nih"], label_sep="|", label_cols="A,B")
    with pytest.raises(ConfigError, match="uncertain='maybe'"):
        DataSpec(tables["nih"], uncertain="maybe")


def test_weighted_auc_and_ap_equal_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(bool)
    s = np.round(rng.random(200) + 0.3 * y, 2)  # rounded: many ties
    ones = np.ones((1, 200))
    assert weighted_auc(ones, y, s)[0] == pytest.approx(roc_auc_score(y, s))
    assert weighted_average_precision(ones, y, s)[0] == pytest.approx(average_precision_score(y, s))
    counts = rng.integers(0, 3, 200)  # a resample is a row of counts: the same as repeating rows
    rows = np.repeat(np.arange(200), counts)
    assert weighted_auc(counts[None].astype(float), y, s)[0] == pytest.approx(
        roc_auc_score(y[rows], s[rows])
    )
    assert weighted_average_precision(counts[None].astype(float), y, s)[0] == pytest.approx(
        average_precision_score(y[rows], s[rows])
    )


def test_metrics_mask_unknown_entries_and_report_undefined_labels():
    rng = np.random.default_rng(1)
    Y = rng.integers(0, 2, (60, 3))
    Y[:10, 0] = -1
    Y[:, 2] = 0  # one class only: undefined, not averaged in
    P = np.clip(Y * 0.6 + rng.random((60, 3)) * 0.5, 0, 1)
    m = multilabel_metrics(Y, P, [0.5, 0.5, 0.5], ["a", "b", "c"])
    assert m["per_label"]["a"]["n"] == 50
    assert m["per_label"]["a"]["roc_auc"] == pytest.approx(roc_auc_score(Y[10:, 0], P[10:, 0]))
    assert np.isnan(m["per_label"]["c"]["roc_auc"]) and m["n_labels_defined"] == 2
    assert m["roc_auc"] == pytest.approx(
        (m["per_label"]["a"]["roc_auc"] + m["per_label"]["b"]["roc_auc"]) / 2
    )
    assert m["average_precision"] == pytest.approx(
        (average_precision_score(Y[10:, 0], P[10:, 0]) + average_precision_score(Y[:, 1], P[:, 1])) / 2
    )
    known = Y != -1
    assert m["micro_roc_auc"] == pytest.approx(roc_auc_score(Y[known], P[known]))
    with pytest.raises(DataError, match="the label 'c' has a single class in its val rows"):
        choose_label_thresholds(Y, P, "youden", ["a", "b", "c"])


def test_bootstrap_resamples_whole_patients():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (30, 2))
    p = np.clip(y * 0.3 + rng.random(y.shape) * 0.7, 0, 1)
    Y, P = np.repeat(y, 4, axis=0), np.repeat(p, 4, axis=0)  # 30 patients of 4 identical images
    patients = np.repeat(np.arange(30), 4).astype(str)
    by_patient = bootstrap_multilabel_ci(Y, P, ["a", "b"], groups=patients, n_boot=400)
    by_image = bootstrap_multilabel_ci(Y, P, ["a", "b"], n_boot=400)
    assert by_patient["resampled"] == "patients" and by_image["resampled"] == "images"
    width = lambda ci: ci["roc_auc"][1] - ci["roc_auc"][0]  # noqa: E731
    # 120 images of 30 patients hold 30 patients' worth of evidence: the honest interval is wider
    assert width(by_patient) > 1.3 * width(by_image)
    point = multilabel_metrics(Y, P, [0.5, 0.5], ["a", "b"])["roc_auc"]
    assert by_patient["roc_auc"][0] < point < by_patient["roc_auc"][1]
    assert set(by_patient["per_label"]) == {"a", "b"}


def test_one_vs_rest_head_fits_known_rows_and_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(120, 8)).astype(np.float32)
    Y = np.stack([(X[:, 0] > 0), (X[:, 1] > 0.5)], axis=1).astype(np.int64)
    Y[::5, 1] = -1  # unknown entries must not reach the label's head
    head = OneVsRestHead("logreg").fit(
        X[:80], Y[:80], X_val=X[80:], Y_val=Y[80:], label_names=["x0", "x1"]
    )
    assert set(head.selection_) == {"x0", "x1"} and "C" in head.selection_["x1"]
    assert head.estimators_[1].n_features_in_ == 8
    proba = head.predict_proba(X[80:])
    assert proba.shape == (40, 2)
    assert roc_auc_score(Y[80:, 0], proba[:, 0]) > 0.95
    path = save_head(head, tmp_path / "h.npz", metadata={"k": 1})
    loaded, meta = load_head(path)
    assert meta == {"k": 1} and loaded.label_names_ == ["x0", "x1"]
    np.testing.assert_allclose(loaded.predict_proba(X[80:]), proba)


def test_multilabel_cli_extract_fit_head_predict(tmp_path, tables):
    run = tmp_path / "run"
    args = ["--data", str(tables["nih"]), "--image-col", "Image Index", "--label-col", "Finding Labels"]
    args += ["--label-sep", "|", "--negative-label", "No Finding", "--patient-col", "Patient ID"]
    args += ["--model", "resnet18", "--weights", "none", "--image-size", str(TINY)]
    args += ["--cache-dir", str(tmp_path / "cache"), "--num-workers", "0"]
    result = CliRunner().invoke(cli, ["fit-head", *args, "--out", str(run), "--n-boot", "200"])
    assert result.exit_code == 0, result.output
    assert "per-label thresholds (youden, chosen on val)" in result.output
    assert "bootstrap over patients" in result.output
    record = json.loads((run / "results.json").read_text())
    test = record["metrics"]["test"]
    assert set(test["per_label"]) == {"Bacterial", "Pneumonia", "Viral"}
    for row in test["per_label"].values():
        assert set(row) >= {"roc_auc", "average_precision", "n", "prevalence", "threshold"}
        assert row["n"] == 36
    assert record["threshold"]["per_label"].keys() == test["per_label"].keys()
    assert test["roc_auc"] == pytest.approx(np.mean([r["roc_auc"] for r in test["per_label"].values()]))
    assert record["ci"]["test"]["resampled"] == "patients"
    preds = np.load(run / "predictions.npz")
    assert preds["test_proba"].shape == (36, 3) and preds["test_labels"].shape == (36, 3)
    # the cache holds the (N, L) matrix, its mask and the patients
    features = read_cache(record["cache"]["path"])
    assert features.multilabel and features["test"].labels.shape == (36, 3)
    assert len(set(features.patient_groups("test"))) < 36  # several images of one patient
    # the cache records how the table was read: later commands reload the same data
    spec = features.meta.data_spec()
    assert (spec.label_sep, spec.negative_label, spec.patient_col) == ("|", "No Finding", "Patient ID")
    reloaded = load_dataset(spec)
    assert reloaded.fingerprint == features.meta.dataset.fingerprint
    # predict: a probability and a decision column per label, the decision at the val threshold
    images = [str(p) for p in sorted((CHEST / "test" / "PNEUMONIA").glob("*.jpeg"))[:3]]
    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(
        cli, ["predict", "--head", str(run / "head.npz"), "--out", str(out), *images]
    )
    assert result.exit_code == 0, result.output
    rows = _read(out)
    thresholds = record["threshold"]["per_label"]
    for row in rows:
        positive = [
            c for c in ("Bacterial", "Pneumonia", "Viral") if float(row[f"p_{c}"]) >= thresholds[c]
        ]
        assert [c for c in ("Bacterial", "Pneumonia", "Viral") if row[f"pred_{c}"] == "1"] == positive
        assert row["predicted"] == ("|".join(positive) or "none")


def test_three_class_table_gives_macro_metrics(tmp_path, tables):
    result = xfeat.fit_head(
        DataSpec(tables["three_class"]),
        "resnet18",
        extract_options={**EXTRACT, "cache_dir": tmp_path / "c"},
        out_dir=tmp_path / "run",
        n_boot=100,
    )
    record = result.record
    assert list(record.dataset.class_names) == ["bacterial", "normal", "viral"]
    assert record.threshold.rule == "argmax" and record.threshold.per_label is None
    assert len(record.metrics["test"]["confusion_matrix"]) == 3
    assert 0 <= record.metrics["test"]["accuracy"] <= 1


def test_masked_bce_ignores_unknown_entries():
    torch = pytest.importorskip("torch")
    from xfeat.finetuning.loop import loss_sum_of

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.2, -3.0]])
    y = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]])
    known = y >= 0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[known], y[known], reduction="sum"
    )
    assert loss_sum_of(logits, y).item() == pytest.approx(expected.item())
    # changing an unknown entry's logit changes nothing
    moved = logits.clone()
    moved[0, 1] = 40.0
    assert loss_sum_of(moved, y).item() == pytest.approx(expected.item())


def test_lpft_layer_from_one_vs_rest_probes_is_exact():
    torch = pytest.importorskip("torch")
    from xfeat.finetuning.model import ProbeHead

    rng = np.random.default_rng(4)
    X = (rng.normal(size=(150, 6)) * [1, 5, 0.2, 1, 3, 1] + 2).astype(np.float32)
    Y = np.stack([X[:, 0] > 2, X[:, 1] > 3, X[:, 4] > 1], axis=1).astype(np.int64)
    Y[::3, 2] = -1  # label 2's probe standardises with other rows' statistics
    head = OneVsRestHead("logreg").fit(X[:100], Y[:100], X_val=X[100:], Y_val=Y[100:])
    layer = ProbeHead.from_one_vs_rest(head).eval()
    with torch.no_grad():
        proba = torch.sigmoid(layer(torch.from_numpy(X[100:]))).numpy()
    np.testing.assert_allclose(proba, head.predict_proba(X[100:]), atol=1e-5)


def test_multilabel_finetune_picks_the_epoch_by_val_macro_auc(tmp_path, tables):
    from xfeat.finetuning import finetune

    spec = DataSpec(tables["chexpert"], patient_col="Patient ID", val_fraction=0.25, **CHEXPERT)
    result = finetune(
        spec,
        "resnet18",
        mode="full",
        epochs=2,
        batch_size=16,
        n_boot=50,
        out_dir=tmp_path / "ft",
        cache_dir=tmp_path / "c",
        image_size=TINY,
        num_workers=0,
        progress=False,
    )
    record = result.record
    assert record.selection["metric"] == "val_roc_auc"
    best = record.selection["best_epoch"]
    history = record.history
    assert history[best - 1]["val_roc_auc"] == max(h["val_roc_auc"] for h in history)
    # the table's val macro AUC is the chosen epoch's, as the history says
    assert record.metrics["val"]["roc_auc"] == pytest.approx(history[best - 1]["val_roc_auc"], abs=1e-6)
    assert set(record.metrics["test"]["per_label"]) == set(LABELS)
    out = tmp_path / "pred.csv"
    images = [str(p) for p in sorted((CHEST / "test" / "NORMAL").glob("*.jpeg"))[:2]]
    outcome = CliRunner().invoke(
        cli, ["predict", "--head", str(tmp_path / "ft" / "model.pt"), "--out", str(out), *images]
    )
    assert outcome.exit_code == 0, outcome.output
    rows = _read(out)
    probs = np.array([[float(r[f"p_{c}"]) for c in LABELS] for r in rows])
    assert probs.shape == (2, 3) and not np.allclose(probs.sum(axis=1), 1.0)  # sigmoid, not softmax


def test_multilabel_compare_and_analyze_reports(tmp_path, tables):
    from xfeat.analysis import analyze
    from xfeat.comparison import compare

    spec = DataSpec(tables["nih"], patient_col="Patient ID", **NIH)
    comparison = compare(
        spec,
        ["mobilenet_v2"],
        weights=str(MOBILENET_WEIGHTS),  # random weights are never "best": nothing to test against
        modes=("cached", "frozen"),
        out_dir=tmp_path / "cmp",
        epochs=1,
        n_boot=50,
        image_size=TINY,
        num_workers=0,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert all(r["multilabel"] and r["test_accuracy"] is None for r in comparison.rows)
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "## Per label" in report and "### Label prevalence per split" in report
    assert "paired bootstrap of the macro AUC, DeLong per label" in report
    assert "Confusion matrices" not in report
    assert (tmp_path / "cmp" / "roc.png").is_file()
    tests = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["tests"]
    assert set(tests[1]["per_label"]) <= {"Bacterial", "Pneumonia", "Viral"}

    analysis = analyze(
        spec,
        "resnet18",
        out_dir=tmp_path / "an",
        n_boot=50,
        extract_options={**EXTRACT, "cache_dir": tmp_path / "c"},
        progress=False,
    )
    labels = analysis["label_balance"]
    assert labels["prevalence"]["test"] == pytest.approx(
        [1 / 3, 2 / 3, 1 / 3]
    )  # Bacterial, Pneumonia, Viral
    co = labels["cooccurrence"]  # every bacterial image is a pneumonia, no viral one bacterial
    assert co["both"][0][1] == co["both"][0][0] > 0 and co["conditional"][0][1] == 1.0
    assert co["both"][0][2] == 0
    assert set(analysis["shift"]["per_class"]) == {"Bacterial", "Pneumonia", "Viral"}
    for key, other in (("shift", "test"), ("shift_val", "val")):  # from train to each split
        assert set(labels[key]) == {"Bacterial", "Pneumonia", "Viral"}
        for name, s in labels[key].items():
            j = labels["label_names"].index(name)
            assert s[other] == pytest.approx(labels["prevalence"][other][j])
    for name in ("label_noise", "overfitting", "calibration", "adaptation"):
        assert analysis[name]["skip_reason"] == "multilabel"
    text = (tmp_path / "an" / "analysis.md").read_text()
    assert "Does not apply: label noise is estimated from one class per image" in text
    assert "Shift from train to val, per label" in text and "Shift from train to test" in text


def test_options_that_would_be_ignored_are_refused(tables):
    with pytest.raises(ConfigError, match="negative_label='No Finding' applies to joined labels"):
        DataSpec(tables["nih"], negative_label="No Finding")
    with pytest.raises(ConfigError, match="uncertain='zeros' maps the -1 entries of label columns"):
        DataSpec(tables["nih"], label_sep="|", uncertain="zeros")


def test_no_patient_ids_means_an_image_bootstrap(tmp_path, tables):
    rows = _read(tables["chexpert"])
    # no patient column, and no file-name pattern: nothing names a patient
    spec = DataSpec(_write(tmp_path / "t.csv", rows), group_pattern="", **CHEXPERT)
    result = xfeat.fit_head(
        spec, "resnet18", extract_options={**EXTRACT, "cache_dir": tmp_path / "c"}, save=False, n_boot=20
    )
    assert result.record.ci["test"]["resampled"] == "images"


def test_an_lpft_probe_of_other_labels_is_refused(tmp_path, tables):
    from xfeat.finetuning import finetune

    options = {**EXTRACT, "cache_dir": tmp_path / "c"}
    xfeat.fit_head(
        DataSpec(tables["three_class"]),
        "resnet18",
        extract_options=options,
        out_dir=tmp_path / "p",
        n_boot=0,
    )
    spec = DataSpec(tables["chexpert"], val_fraction=0.25, **CHEXPERT)
    with pytest.raises(
        ConfigError,
        match=r"was fitted on classes \['bacterial', 'normal', 'viral'\] but these data have labels",
    ):
        finetune(
            spec,
            "resnet18",
            mode="lp-ft",
            epochs=1,
            probe=tmp_path / "p" / "head.npz",
            out_dir=tmp_path / "r",
            cache_dir=tmp_path / "c",
            image_size=TINY,
            num_workers=0,
            progress=False,
        )


def test_the_carve_out_gives_every_label_both_values_on_both_sides():
    """A rare label held by two patients only: stratifying by each image's rarest label alone
    leaves val without it for some seeds; the carve-out then moves a whole patient so that
    every label is judged on val, and train keeps every value it had."""
    from xfeat.data.dataset import strata
    from xfeat.data.splits import carve_validation, cover_every_label

    rng = np.random.default_rng(0)
    groups = [f"p{i // 3}" for i in range(120)]  # 40 patients, 3 images each
    labels = (rng.random((120, 3)) < [0.5, 0.3, 0.0]).astype(np.int8)
    labels[[0, 1, 2, 3], 2] = 1  # the rare label: patients p0 (3 images) and p1 (1 image)
    labels[rng.random((120, 3)) < 0.05] = -1  # a few unknown entries
    missed = 0
    for seed in range(30):
        plain = carve_validation(strata(labels), groups, 0.2, seed)
        missed += not (labels[plain, 2] == 1).any()
        in_val = cover_every_label(labels, groups, plain, seed)
        assert (in_val | ~plain).all()  # only additions
        for side in (in_val, ~in_val):
            for value in (0, 1):
                assert (labels[side] == value).any(axis=0).all(), (seed, value)
        moved = {groups[i] for i in np.flatnonzero(in_val & ~plain)}
        assert all(all(in_val[i] for i in range(120) if groups[i] == g) for g in moved)
    assert missed > 0  # the case exists without the repair
