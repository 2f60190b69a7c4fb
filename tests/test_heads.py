"""Tests for xfeat.heads on small synthetic feature arrays (CPU, a few seconds)."""

import inspect
import json

import numpy as np
import pytest

from xfeat.heads import (HEADS, KNNHead, LinearHead, LogisticHead, create_head, load_head,
                         save_head)


def make_blobs(n, n_classes=2, dim=64, sep=3.0, seed=0, centers_seed=123, p=None):
    """Gaussian blobs: class centers at distance ~sep, unit noise; labels drawn with probs p."""
    centers = np.random.default_rng(centers_seed).standard_normal((n_classes, dim))
    centers *= sep / np.linalg.norm(centers, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    y = rng.choice(n_classes, size=n, p=p)
    y[:n_classes] = np.arange(n_classes)  # every class present
    X = centers[y] + rng.standard_normal((n, dim))
    return X.astype(np.float32), y


def splits(n_classes=2, sep=3.0, n_train=300, n_val=150, **kw):
    X, y = make_blobs(n_train, n_classes, sep=sep, seed=1, **kw)
    Xv, yv = make_blobs(n_val, n_classes, sep=sep, seed=2, **kw)
    return X, y, Xv, yv


FAST = {"logreg": {}, "linear": {"epochs": 8}, "knn": {}}  # small configurations for speed


def fitted(name, data, **params):
    return create_head(name, **{**FAST[name], **params}).fit(*data)


def choices(head):
    return {a: getattr(head, a) for a in ("C_", "k_", "best_epoch_") if hasattr(head, a)} | {
        "selection": head.selection_}


# --------------------------------------------------------------------------- all heads


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("n_classes", [2, 3])
def test_head_learns_separable_data(name, n_classes):
    X, y, Xv, yv = data = splits(n_classes, sep=5.0)
    head = create_head(name, **FAST[name])
    assert head.fit(*data) is head
    proba = head.predict_proba(Xv)
    assert proba.shape == (len(Xv), n_classes) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert np.mean(head.predict(Xv) == yv) >= 0.95
    np.testing.assert_array_equal(head.classes_, np.arange(n_classes))
    assert head.n_features_in_ == X.shape[1] and head.fit_seconds_ > 0
    json.dumps(head.selection_)  # JSON-serialisable


@pytest.mark.parametrize("name", sorted(HEADS))
def test_predict_with_wrong_number_of_features_raises(name):
    head = fitted(name, splits())
    with pytest.raises(ValueError, match="features"):
        head.predict_proba(np.zeros((4, 10), dtype=np.float32))
    with pytest.raises(ValueError,
                       match=rf"X has 10 features, but {type(head).__name__} is expecting 64"):
        head.predict(np.zeros((4, 10), dtype=np.float32))


@pytest.mark.parametrize("name", sorted(HEADS))
def test_fit_is_deterministic(name):
    data = splits(sep=1.0)
    a, b = fitted(name, data), fitted(name, data)
    np.testing.assert_array_equal(a.predict_proba(data[2]), b.predict_proba(data[2]))
    assert choices(a) == choices(b)


def test_fit_validates_inputs():
    X, y, Xv, yv = splits()
    head = LogisticHead()
    bad_X = X.copy()
    bad_X[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        head.fit(bad_X, y, Xv, yv)
    with pytest.raises(ValueError, match="2-D"):
        head.fit(X[0], y, Xv, yv)
    with pytest.raises(ValueError, match="integer class indices"):
        head.fit(X, y.astype(float), Xv, yv)
    with pytest.raises(ValueError, match="one label per row"):
        head.fit(X, y[:-1], Xv, yv)
    with pytest.raises(ValueError, match="X_val has 63 features, but X_train has 64"):
        head.fit(X, y, Xv[:, :-1], yv)
    with pytest.raises(ValueError, match=r"no samples of class\(es\) \[2\]"):
        head.fit(X, y, Xv, np.where(yv == 1, 2, yv))  # class 2 never occurs in train
    with pytest.raises(ValueError, match="not fitted"):
        LogisticHead().predict(Xv)


def test_fit_does_not_modify_inputs():
    data = splits()
    copies = [a.copy() for a in data]
    for name in HEADS:
        fitted(name, data)
    for a, b in zip(data, copies):
        np.testing.assert_array_equal(a, b)


def test_fit_restores_thread_settings():
    import torch
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads(), [i["num_threads"] for i in threadpool_info()]
    for name in ("logreg", "linear"):
        fitted(name, splits())
        assert (torch.get_num_threads(), [i["num_threads"] for i in threadpool_info()]) == before


# --------------------------------------------------------------------------- LogisticHead


def test_logistic_chooses_C_from_recorded_sweep():
    head = LogisticHead().fit(*splits(sep=1.5))
    sweep = head.selection_["sweep"]
    Cs = [s["C"] for s in sweep]
    assert Cs == sorted(Cs) and len(Cs) >= 9 and min(Cs) == 1e-6 and max(Cs) == 1e2
    assert head.C_ in Cs and head.selection_["C"] == head.C_
    best = min(sweep, key=lambda s: (s["val_score"], s["C"]))  # log_loss: lower is better
    assert best["C"] == head.C_
    assert len(Cs) > 9  # the refinement added points between the decades
    assert head.coef_.shape == (1, 64) and head.intercept_.shape == (1,)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_matches_sklearn_on_standardised_features(n_classes):
    from sklearn.linear_model import LogisticRegression

    X, y, Xv, yv = splits(n_classes, sep=1.0)
    head = LogisticHead(C=0.05, tol=1e-8).fit(X, y, Xv, yv)
    Z, Zv = ((a - X.mean(axis=0)) / X.std(axis=0) for a in (X, Xv))
    ref = LogisticRegression(C=0.05, class_weight="balanced", tol=1e-10, max_iter=10_000).fit(Z, y)
    np.testing.assert_allclose(head.coef_, ref.coef_, atol=2e-4)
    np.testing.assert_allclose(head.predict_proba(Xv), ref.predict_proba(Zv), atol=2e-4)


def test_logistic_multiclass_shapes_and_fixed_C():
    head = LogisticHead(C=0.5).fit(*splits(3))
    assert head.coef_.shape == (3, 64) and head.C_ == 0.5
    assert [s["C"] for s in head.selection_["sweep"]] == [0.5]


@pytest.mark.parametrize("scoring", ["accuracy", "balanced_accuracy", "roc_auc"])
def test_logistic_scorings_higher_is_better(scoring):
    head = LogisticHead(scoring=scoring).fit(*splits(sep=1.5))
    sweep = head.selection_["sweep"]
    assert head.selection_["scoring"] == scoring
    assert max(s["val_score"] for s in sweep) == next(s["val_score"] for s in sweep if s["C"] == head.C_)


def test_logistic_rejects_bad_parameters():
    with pytest.raises(ValueError, match="scoring='f1'.*accuracy, balanced_accuracy, log_loss, roc_auc"):
        LogisticHead(scoring="f1").fit(*splits())
    with pytest.raises(ValueError, match="class_weight='auto'"):
        LogisticHead(class_weight="auto").fit(*splits())
    with pytest.raises(ValueError, match="C=-1"):
        LogisticHead(C=-1).fit(*splits())


def test_logistic_refit_on_val_uses_train_plus_val():
    X, y, Xv, yv = data = splits()
    plain = LogisticHead().fit(*data)
    refit = LogisticHead(refit_on_val=True).fit(*data)
    np.testing.assert_allclose(plain.mean_, X.mean(axis=0, dtype=np.float64), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(refit.mean_, np.concatenate([X, Xv]).mean(axis=0, dtype=np.float64),
                               rtol=1e-6, atol=1e-7)
    assert refit.selection_["refit_on_val"] and not plain.selection_["refit_on_val"]
    assert refit.C_ == plain.C_  # the choice is the same; only the final fit data differ
    assert not np.allclose(refit.coef_, plain.coef_)


def test_logistic_class_weight_balanced_vs_none():
    data = splits(sep=1.0, p=[0.9, 0.1])
    balanced = LogisticHead(C=1.0).fit(*data)
    none = LogisticHead(C=1.0, class_weight=None).fit(*data)
    # Balanced weights raise the minority class's predicted probability.
    assert balanced.predict_proba(data[2])[:, 1].mean() > none.predict_proba(data[2])[:, 1].mean() + 0.05
    np.testing.assert_array_equal(none.coef_, LogisticHead(C=1.0, class_weight="none").fit(*data).coef_)


# --------------------------------------------------------------------------- LinearHead


def test_linear_history_and_best_epoch():
    head = LinearHead(epochs=6, step_size=2, gamma=0.5).fit(*splits(sep=1.0))
    assert [h["epoch"] for h in head.history_] == list(range(1, 7))
    assert set(head.history_[0]) == {"epoch", "train_loss", "train_accuracy", "val_loss",
                                     "val_accuracy", "seconds", "lr"}
    val_acc = [h["val_accuracy"] for h in head.history_]
    assert head.best_epoch_ == int(np.argmax(val_acc)) + 1  # argmax: first best on ties
    assert [h["lr"] for h in head.history_] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    assert head.coef_.shape == (2, 64) and head.intercept_.shape == (2,)


def test_linear_keeps_weights_of_best_epoch():
    X, y, Xv, yv = data = splits(sep=1.0)
    head = LinearHead(epochs=5).fit(*data)
    best = head.history_[head.best_epoch_ - 1]
    assert np.mean(head.predict(Xv) == yv) == pytest.approx(best["val_accuracy"])


# --------------------------------------------------------------------------- KNNHead


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_chooses_k_on_val(weights):
    X, y, Xv, yv = data = splits(sep=1.5)
    head = KNNHead(ks=(1, 5, 15, 1000), weights=weights).fit(*data)
    sweep = head.selection_["sweep"]
    assert [s["k"] for s in sweep] == [1, 5, 15]  # k=1000 > 300 training rows is dropped
    best = max(sweep, key=lambda s: (s["val_accuracy"], -s["k"]))
    assert head.k_ == best["k"]
    assert np.mean(head.predict(Xv) == yv) == pytest.approx(best["val_accuracy"])
    proba = head.predict_proba(Xv)
    assert proba.min() > 0  # smoothing keeps log loss finite
    assert head.X_fit_.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(head.X_fit_, axis=1), 1.0, rtol=1e-5)


def test_knn_rejects_bad_parameters():
    with pytest.raises(ValueError, match="weights='cosine'"):
        KNNHead(weights="cosine").fit(*splits())
    with pytest.raises(ValueError, match="exceeds the 300 training rows"):
        KNNHead(ks=(500,)).fit(*splits())


# --------------------------------------------------------------------------- factory


def test_create_head():
    head = create_head("logreg", C=2.0)
    assert isinstance(head, LogisticHead) and head.C == 2.0
    with pytest.raises(ValueError, match="unknown head 'foo'; expected one of: knn, linear, logreg"):
        create_head("foo")


# --------------------------------------------------------------------------- honest protocol


@pytest.mark.parametrize("name", sorted(HEADS))
def test_fit_takes_only_train_and_val(name):
    params = list(inspect.signature(HEADS[name].fit).parameters)
    assert params == ["self", "X_train", "y_train", "X_val", "y_val"]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_choices_depend_on_val_labels(name):
    """The choice (C_, k_, best_epoch_) is a function of (train, val): the same inputs give the
    same choice, and changing only the val labels changes it, so val is what is used."""
    data = splits(sep=1.0)
    X, y, Xv, yv = data
    first = choices(fitted(name, data))
    assert choices(fitted(name, data)) == first
    flipped = choices(fitted(name, (X, y, Xv, 1 - yv)))
    assert flipped != first
    key = {"logreg": "C_", "knn": "k_", "linear": "best_epoch_"}[name]
    assert flipped[key] != first[key]


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("n_classes", [2, 3])
def test_save_load_round_trip(name, n_classes, tmp_path):
    X, y, Xv, yv = data = splits(n_classes, sep=1.5)
    head = fitted(name, data)
    meta = {"threshold": 0.37, "class_names": ["NORMAL", "PNEUMONIA", "X"][:n_classes],
            "cache_key": "abc123", "preprocessing": {"resize": 224, "mean": [0.485, 0.456, 0.406]}}
    path = save_head(head, tmp_path / "head.npz", metadata=meta)
    assert path == tmp_path / "head.npz" and [p.name for p in tmp_path.iterdir()] == ["head.npz"]

    loaded, loaded_meta = load_head(path)
    assert type(loaded) is type(head) and loaded_meta == meta
    np.testing.assert_array_equal(loaded.predict_proba(Xv), head.predict_proba(Xv))
    assert loaded.get_params() == head.get_params()
    assert loaded.selection_ == head.selection_
    assert choices(loaded) == choices(head)

    with np.load(path, allow_pickle=False) as f:  # every entry loads without pickle
        assert all(f[k].dtype != object for k in f.files)
        info = json.loads(f["__meta__"].item())
    assert info["format"] == "xfeat-head" and info["format_version"] == 1 and info["head"] == name


def test_load_never_unpickles(tmp_path, monkeypatch):
    path = save_head(fitted("knn", splits()), tmp_path / "h.npz", metadata={})
    calls = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    load_head(path)
    assert calls == [{"allow_pickle": False}]


def test_load_rejects_files_that_are_not_heads(tmp_path):
    with pytest.raises(FileNotFoundError, match="no xfeat head file"):
        load_head(tmp_path / "missing.npz")
    np.savez(tmp_path / "plain.npz", a=np.arange(3))
    with pytest.raises(ValueError, match=r"plain.npz is not an xfeat head file.*__meta__"):
        load_head(tmp_path / "plain.npz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is not an xfeat head file"):
        load_head(tmp_path / "notes.txt")
    np.save(tmp_path / "array.npy", np.arange(3))
    with pytest.raises(ValueError, match="array.npy is not an xfeat head file"):
        load_head(tmp_path / "array.npy")
    np.savez(tmp_path / "other.npz", __meta__=np.array(json.dumps({"format": "other"})))
    with pytest.raises(ValueError, match="other.npz is not an xfeat head file"):
        load_head(tmp_path / "other.npz")


def test_load_rejects_newer_format_version(tmp_path):
    path = save_head(fitted("logreg", splits()), tmp_path / "h.npz", metadata={})
    with np.load(path, allow_pickle=False) as f:
        entries = {k: f[k] for k in f.files}
    meta = json.loads(entries["__meta__"].item())
    entries["__meta__"] = np.array(json.dumps({**meta, "format_version": 2}))
    np.savez(tmp_path / "future.npz", **entries)
    with pytest.raises(ValueError, match="future.npz has format_version 2"):
        load_head(tmp_path / "future.npz")


def test_save_rejects_unfitted_head_and_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="not fitted"):
        save_head(LogisticHead(), tmp_path / "h.npz", metadata={})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_head(fitted("knn", splits()), tmp_path / "h.npz", metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
