"""Tests for xfeat.heads on small synthetic feature arrays (CPU, a few seconds)."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.utils.estimator_checks import parametrize_with_checks

from xfeat.errors import ConfigError, DataError
from xfeat.heads import (
    HEADS,
    KNNHead,
    LinearHead,
    LogisticHead,
    create_head,
    head_options,
    load_head,
    save_head,
)

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]


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


def fit_on(head, data):
    X, y, Xv, yv = data
    return head.fit(X, y, X_val=Xv, y_val=yv)


def fitted(name, data, **params):
    return fit_on(create_head(name, **{**FAST[name], **params}), data)


def choices(head):
    return {a: getattr(head, a) for a in ("C_", "k_", "best_epoch_") if hasattr(head, a)} | {
        "selection": head.selection_
    }


# --------------------------------------------------------------------------- all heads


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("n_classes", [2, 3])
def test_head_learns_separable_data(name, n_classes):
    X, y, Xv, yv = data = splits(n_classes, sep=5.0)
    head = create_head(name, **FAST[name])
    assert fit_on(head, data) is head
    proba = head.predict_proba(Xv)
    assert proba.shape == (len(Xv), n_classes) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert np.mean(head.predict(Xv) == yv) >= 0.95
    assert head.score(Xv, yv) == np.mean(head.predict(Xv) == yv)  # ClassifierMixin.score
    np.testing.assert_array_equal(head.classes_, np.arange(n_classes))
    assert head.n_features_in_ == X.shape[1] and head.fit_seconds_ > 0
    json.dumps(head.selection_)  # JSON-serialisable


@pytest.mark.parametrize("name", sorted(HEADS))
def test_predict_with_wrong_number_of_features_raises(name):
    head = fitted(name, splits())
    with pytest.raises(
        DataError, match=rf"X has 10 features, but {type(head).__name__} is expecting 64"
    ):
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
    with pytest.raises(DataError, match="Input X contains NaN"):
        head.fit(bad_X, y, X_val=Xv, y_val=yv)
    with pytest.raises(DataError, match="Expected 2D array, got 1D array"):
        head.fit(X[0], y, X_val=Xv, y_val=yv)
    with pytest.raises(DataError, match="Unknown label type: continuous"):
        head.fit(X, y + 0.5, X_val=Xv, y_val=yv)
    with pytest.raises(DataError, match="one label per row"):
        head.fit(X, y[:-1], X_val=Xv, y_val=yv)
    with pytest.raises(DataError, match="X_val has 63 features, but X has 64"):
        head.fit(X, y, X_val=Xv[:, :-1], y_val=yv)
    with pytest.raises(DataError, match=r"y_val has class\(es\) \[2\] that y lacks"):
        head.fit(X, y, X_val=Xv, y_val=np.where(yv == 1, 2, yv))
    with pytest.raises(DataError, match=r"y holds 1 class \(0\)"):
        head.fit(X, np.zeros_like(y), X_val=Xv, y_val=yv)
    with pytest.raises(ConfigError, match="X_val was given without y_val"):
        head.fit(X, y, X_val=Xv)
    with pytest.raises(NotFittedError, match="not fitted"):
        LogisticHead().predict(Xv)


def test_labels_need_not_be_class_indices():
    """Any labels work, as in scikit-learn: columns of predict_proba follow classes_."""
    X, y, Xv, yv = splits(3, sep=5.0)
    names = np.array(["NORMAL", "BACTERIA", "VIRUS"])
    head = LogisticHead(C=1.0).fit(X, names[y])
    np.testing.assert_array_equal(head.classes_, ["BACTERIA", "NORMAL", "VIRUS"])
    assert np.mean(head.predict(Xv) == names[yv]) >= 0.95
    by_index = LogisticHead(C=1.0).fit(X, y)
    np.testing.assert_allclose(
        head.predict_proba(Xv), by_index.predict_proba(Xv)[:, [1, 0, 2]], atol=1e-6
    )


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


def test_importing_heads_does_not_import_torch():
    # xfeat/__init__.py imports the whole API; load the heads package on its own.
    code = (
        "import sys, types; pkg = types.ModuleType('xfeat'); "
        f"pkg.__path__ = [{str(ROOT / 'xfeat')!r}]; sys.modules['xfeat'] = pkg; "
        "import xfeat.heads; print('torch' in sys.modules, 'xfeat.heads.linear' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


# --------------------------------------------------------------------------- estimator API


# check_supervised_y_no_nan casts a NaN label inside scikit-learn itself
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@parametrize_with_checks([LogisticHead(C=1.0), KNNHead(ks=(3,))])
def test_sklearn_estimator_checks(estimator, check):
    """scikit-learn's own estimator checks (LinearHead always needs val, so it is left out)."""
    check(estimator)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_clone_get_params_set_params(name):
    head = create_head(name)
    params = head.get_params(deep=True)
    assert params == head.get_params(deep=False)  # no nested estimators
    assert list(params) == head_options()[name]
    twin = clone(head)
    assert type(twin) is type(head) and twin is not head and twin.get_params() == params
    fitted_head = fitted(name, splits())
    unfitted = clone(fitted_head)
    assert not hasattr(unfitted, "classes_")  # clone copies parameters, not what was learned
    first = next(iter(params))
    value = {"C": 0.5, "batch_size": 16, "ks": (7,)}[first]
    assert head.set_params(**{first: value}) is head and head.get_params()[first] == value
    with pytest.raises(ValueError, match="Invalid parameter 'bogus'"):
        head.set_params(bogus=1)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_fit_signature_takes_val_by_keyword_only(name):
    params = inspect.signature(HEADS[name].fit).parameters
    assert list(params) == ["self", "X", "y", "X_val", "y_val"]
    assert params["X_val"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["X_val"].default is None and params["y_val"].default is None


def test_fixed_choices_need_no_val():
    X, y, Xv, yv = splits(sep=3.0)
    head = LogisticHead(C=0.1).fit(X, y)
    assert head.C_ == 0.1 and head.selection_["sweep"][0]["val_score"] is None
    np.testing.assert_array_equal(head.coef_, LogisticHead(C=0.1).fit(X, y, X_val=Xv, y_val=yv).coef_)
    knn = KNNHead(ks=5).fit(X, y)
    assert knn.k_ == 5 and knn.score(Xv, yv) > 0.9


@pytest.mark.parametrize(
    "head, match",
    [
        (LogisticHead(), r"C is chosen on validation data.*LogisticHead\(C=0.1\)"),
        (LogisticHead(C=1.0, refit_on_val=True), "refit_on_val=False"),
        (KNNHead(ks=(1, 5)), r"k \(among \[1, 5\]\).*KNNHead\(ks=\(5,\)\)"),
        (LinearHead(epochs=1), "best epoch is chosen on validation data.*pass X_val= and y_val="),
    ],
)
def test_choice_without_val_raises_config_error(head, match):
    X, y, _, _ = splits()
    with pytest.raises(ConfigError, match=match):
        head.fit(X, y)


def test_cross_val_predict_with_fixed_C():
    X, y, _, _ = splits(sep=1.0)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    proba = cross_val_predict(LogisticHead(C=0.1), X, y, cv=cv, method="predict_proba")
    assert proba.shape == (len(X), 2)
    by_hand = np.empty_like(proba)
    for train, held_out in cv.split(X, y):
        by_hand[held_out] = LogisticHead(C=0.1).fit(X[train], y[train]).predict_proba(X[held_out])
    np.testing.assert_array_equal(proba, by_hand)
    assert roc_auc_score(y, proba[:, 1]) > 0.75  # out-of-fold, yet well above chance


# --------------------------------------------------------------------------- LogisticHead


def test_logistic_chooses_C_from_recorded_sweep():
    head = fit_on(LogisticHead(), splits(sep=1.5))
    sweep = head.selection_["sweep"]
    Cs = [s["C"] for s in sweep]
    assert Cs == sorted(Cs) and len(Cs) >= 9 and min(Cs) == 1e-6 and max(Cs) == 1e2
    assert head.C_ in Cs and head.selection_["C"] == head.C_
    best = min(sweep, key=lambda s: (s["val_score"], s["C"]))  # log_loss: lower is better
    assert best["C"] == head.C_
    assert len(Cs) > 9  # the refinement added points between the decades
    assert head.coef_.shape == (1, 64) and head.intercept_.shape == (1,) and head.n_iter_ >= 1


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_matches_sklearn_on_standardised_features(n_classes):
    from sklearn.linear_model import LogisticRegression

    X, y, Xv, yv = splits(n_classes, sep=1.0)
    head = LogisticHead(C=0.05, tol=1e-8).fit(X, y)
    Z, Zv = ((a - X.mean(axis=0)) / X.std(axis=0) for a in (X, Xv))
    ref = LogisticRegression(C=0.05, class_weight="balanced", tol=1e-10, max_iter=10_000).fit(Z, y)
    np.testing.assert_allclose(head.coef_, ref.coef_, atol=2e-4)
    np.testing.assert_allclose(head.predict_proba(Xv), ref.predict_proba(Zv), atol=2e-4)


def test_logistic_multiclass_shapes_and_fixed_C():
    head = fit_on(LogisticHead(C=0.5), splits(3))
    assert head.coef_.shape == (3, 64) and head.C_ == 0.5
    assert [s["C"] for s in head.selection_["sweep"]] == [0.5]


# Held-out accuracy each head must reach on 3 blobs, as a margin below the Bayes accuracy
# (measured: logreg -0.027, knn -0.046, linear (SGD) -0.080 on this problem).
BAYES_MARGIN = {"logreg": 0.04, "knn": 0.06, "linear": 0.10}


@pytest.mark.parametrize("name", sorted(BAYES_MARGIN))
def test_multiclass_heads_reach_near_bayes_accuracy(name):
    """Three overlapping classes: each head, with its hyper-parameters chosen on val, comes
    close on fresh data to the Bayes accuracy (the nearest true centre, optimal for isotropic
    Gaussians of equal weight), and every class is recalled far above chance."""
    sep = 2.0
    data = splits(3, sep=sep, n_train=600, n_val=300)
    X_test, y_test = make_blobs(3000, 3, sep=sep, seed=3)
    centers = np.random.default_rng(123).standard_normal((3, 64))
    centers *= sep / np.linalg.norm(centers, axis=1, keepdims=True)
    nearest = ((X_test[:, None, :] - centers[None]) ** 2).sum(axis=2).argmin(axis=1)
    bayes = np.mean(nearest == y_test)
    predicted = fit_on(create_head(name), data).predict(X_test)
    assert 0.8 < bayes < 0.9  # a problem where heads can differ
    assert np.mean(predicted == y_test) >= bayes - BAYES_MARGIN[name]
    recall = [np.mean(predicted[y_test == c] == c) for c in range(3)]
    assert min(recall) > 0.6, recall


@pytest.mark.parametrize("scoring", ["accuracy", "balanced_accuracy", "roc_auc"])
def test_logistic_scorings_higher_is_better(scoring):
    head = fit_on(LogisticHead(scoring=scoring), splits(sep=1.5))
    sweep = head.selection_["sweep"]
    assert head.selection_["scoring"] == scoring
    assert max(s["val_score"] for s in sweep) == next(s["val_score"] for s in sweep if s["C"] == head.C_)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"scoring": "f1"}, "scoring='f1' is not supported; expected one of: 'log_loss', 'accuracy'"),
        ({"class_weight": "auto"}, "class_weight='auto'"),
        ({"C": -1}, "C=-1; expected a positive finite number"),
        ({"max_iter": 0}, "max_iter=0; expected a positive integer"),
    ],
)
def test_logistic_rejects_bad_parameters(params, match):
    with pytest.raises(ConfigError, match=match):
        fit_on(LogisticHead(**params), splits())


def test_logistic_refit_on_val_uses_train_plus_val():
    X, y, Xv, yv = data = splits()
    plain = fit_on(LogisticHead(), data)
    refit = fit_on(LogisticHead(refit_on_val=True), data)
    np.testing.assert_allclose(plain.mean_, X.mean(axis=0, dtype=np.float64), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        refit.mean_, np.concatenate([X, Xv]).mean(axis=0, dtype=np.float64), rtol=1e-6, atol=1e-7
    )
    assert refit.selection_["refit_on_val"] and not plain.selection_["refit_on_val"]
    assert refit.C_ == plain.C_  # the choice is the same; only the final fit data differ
    assert not np.allclose(refit.coef_, plain.coef_)


def test_logistic_class_weight_balanced_none_and_dict():
    X, y, Xv, yv = splits(sep=1.0, p=[0.9, 0.1])
    balanced = LogisticHead(C=1.0).fit(X, y)
    none = LogisticHead(C=1.0, class_weight=None).fit(X, y)
    # Balanced weights raise the minority class's predicted probability.
    assert balanced.predict_proba(Xv)[:, 1].mean() > none.predict_proba(Xv)[:, 1].mean() + 0.05
    np.testing.assert_array_equal(none.coef_, LogisticHead(C=1.0, class_weight="none").fit(X, y).coef_)
    counts = np.bincount(y)
    as_dict = LogisticHead(
        C=1.0, class_weight={0: len(y) / (2 * counts[0]), 1: len(y) / (2 * counts[1])}
    ).fit(X, y)
    np.testing.assert_allclose(as_dict.coef_, balanced.coef_, rtol=1e-6)


# --------------------------------------------------------------------------- LinearHead


def test_linear_history_and_best_epoch():
    head = fit_on(LinearHead(epochs=6, step_size=2, gamma=0.5), splits(sep=1.0))
    assert [h["epoch"] for h in head.history_] == list(range(1, 7))
    assert set(head.history_[0]) == {
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "seconds",
        "lr",
    }
    val_acc = [h["val_accuracy"] for h in head.history_]
    assert head.best_epoch_ == int(np.argmax(val_acc)) + 1  # argmax: first best on ties
    assert [h["lr"] for h in head.history_] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    assert head.coef_.shape == (2, 64) and head.intercept_.shape == (2,)


def test_linear_keeps_weights_of_best_epoch():
    X, y, Xv, yv = data = splits(sep=1.0)
    head = fit_on(LinearHead(epochs=5), data)
    best = head.history_[head.best_epoch_ - 1]
    assert np.mean(head.predict(Xv) == yv) == pytest.approx(best["val_accuracy"])


@pytest.mark.parametrize(
    "params, match",
    [
        ({"epochs": 0}, "epochs=0; expected a positive integer"),
        ({"lr": 0.0}, "lr=0.0; expected a positive number"),
        ({"momentum": -0.1}, "momentum=-0.1; expected a non-negative number"),
    ],
)
def test_linear_rejects_bad_parameters(params, match):
    with pytest.raises(ConfigError, match=match):
        fit_on(LinearHead(**params), splits())


# --------------------------------------------------------------------------- KNNHead


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_chooses_k_on_val(weights):
    X, y, Xv, yv = data = splits(sep=1.5)
    head = fit_on(KNNHead(ks=(1, 5, 15, 1000), weights=weights), data)
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
    with pytest.raises(ConfigError, match="weights='cosine' is not supported"):
        fit_on(KNNHead(weights="cosine"), splits())
    with pytest.raises(ConfigError, match=r"ks=\(0, 3\); expected one positive integer"):
        fit_on(KNNHead(ks=(0, 3)), splits())
    with pytest.raises(DataError, match="exceeds the 300 training rows"):
        fit_on(KNNHead(ks=(500,)), splits())


# --------------------------------------------------------------------------- registry


def test_create_head():
    head = create_head("logreg", C=2.0)
    assert isinstance(head, LogisticHead) and head.C == 2.0
    with pytest.raises(ConfigError, match="unknown head 'foo'; expected one of: knn, linear, logreg"):
        create_head("foo")


def test_create_head_names_the_parameters_a_head_takes():
    with pytest.raises(ConfigError, match="^knn takes ks, weights; C does not apply$"):
        create_head("knn", C=1)
    with pytest.raises(ConfigError, match="linear takes .*epochs.*; C, scoring do not apply"):
        create_head("linear", C=1, scoring="accuracy")


def test_head_options_come_from_the_estimators():
    options = head_options()
    assert options["knn"] == ["ks", "weights"]
    assert {"C", "class_weight", "refit_on_val", "scoring"} <= set(options["logreg"])
    assert {"epochs", "lr", "seed"} <= set(options["linear"])
    for name, cls in HEADS.items():
        assert options[name] == sorted(inspect.signature(cls.__init__).parameters.keys() - {"self"})


# --------------------------------------------------------------------------- honest protocol


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
    meta = {
        "threshold": 0.37,
        "class_names": ["NORMAL", "PNEUMONIA", "X"][:n_classes],
        "cache_key": "abc123",
        "preprocessing": {"resize": 224, "mean": [0.485, 0.456, 0.406]},
    }
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
    assert info["format"] == "xfeat-head" and info["format_version"] == 2 and info["head"] == name


def test_save_load_round_trip_with_string_labels(tmp_path):
    X, y, Xv, _ = splits()
    head = LogisticHead(C=1.0).fit(X, np.array(["NORMAL", "PNEUMONIA"])[y])
    loaded, _ = load_head(save_head(head, tmp_path / "h.npz", metadata={}))
    np.testing.assert_array_equal(loaded.classes_, ["NORMAL", "PNEUMONIA"])
    np.testing.assert_array_equal(loaded.predict(Xv), head.predict(Xv))


@pytest.mark.parametrize("path", sorted(DATA.glob("head_v1_*.npz")), ids=lambda p: p.stem)
def test_head_files_of_the_first_format_still_load(path):
    """Files written by the pre-package xfeat.heads (tests/data/README.md) give the same
    probabilities today."""
    with np.load(path, allow_pickle=False) as f:
        assert json.loads(f["__meta__"].item())["format_version"] == 1
    head, meta = load_head(path)
    probe = (
        np.random.default_rng(meta["probe_rng_seed"])
        .standard_normal(meta["probe_shape"])
        .astype(np.float32)
    )
    np.testing.assert_allclose(head.predict_proba(probe), meta["expected_proba"], rtol=1e-6, atol=1e-7)
    name = path.stem.split("_")[2]  # head_v1_NAME_NCLASSclass
    assert type(head) is HEADS[name] and list(head.get_params()) == head_options()[name]


class _Tripwire:
    """Unpickling this object creates the file at ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def test_load_never_unpickles(tmp_path):
    path = save_head(fitted("knn", splits()), tmp_path / "h.npz", metadata={})
    with np.load(path, allow_pickle=False) as f:
        entries = {k: f[k] for k in f.files}
    tripwire = tmp_path / "unpickled"
    entries["X_fit_"] = np.array([_Tripwire(tripwire)], dtype=object)
    np.savez(tmp_path / "evil.npz", **entries)  # an object array is stored as a pickle
    with pytest.raises(DataError, match="evil.npz is not an xfeat head file.*allow_pickle"):
        load_head(tmp_path / "evil.npz")
    assert not tripwire.exists()


def test_load_rejects_files_that_are_not_heads(tmp_path):
    with pytest.raises(ConfigError, match="no xfeat head file"):
        load_head(tmp_path / "missing.npz")
    np.savez(tmp_path / "plain.npz", a=np.arange(3))
    with pytest.raises(DataError, match=r"plain.npz is not an xfeat head file.*__meta__"):
        load_head(tmp_path / "plain.npz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt is not an xfeat head file"):
        load_head(tmp_path / "notes.txt")
    np.save(tmp_path / "array.npy", np.arange(3))
    with pytest.raises(DataError, match="array.npy is not an xfeat head file"):
        load_head(tmp_path / "array.npy")
    np.savez(tmp_path / "other.npz", __meta__=np.array(json.dumps({"format": "other"})))
    with pytest.raises(DataError, match="other.npz is not an xfeat head file"):
        load_head(tmp_path / "other.npz")


def _rewrite_meta(path, new_path, **changes):
    with np.load(path, allow_pickle=False) as f:
        entries = {k: f[k] for k in f.files}
    meta = json.loads(entries["__meta__"].item())
    entries["__meta__"] = np.array(json.dumps({**meta, **changes}))
    np.savez(new_path, **entries)
    return new_path


def test_load_rejects_newer_format_version_and_unknown_parameters(tmp_path):
    path = save_head(fit_on(LogisticHead(), splits()), tmp_path / "h.npz", metadata={})
    with pytest.raises(
        DataError, match="future.npz has format_version 4; this xfeat reads versions up to 3"
    ):
        load_head(_rewrite_meta(path, tmp_path / "future.npz", format_version=4))
    params = {**LogisticHead().get_params(), "momentum": 0.9}
    with pytest.raises(
        DataError,
        match=r"other.npz has parameters \['momentum'\] that "
        "LogisticHead does not take",
    ):
        load_head(_rewrite_meta(path, tmp_path / "other.npz", params=params))


def test_save_rejects_unfitted_head_and_bad_metadata(tmp_path):
    with pytest.raises(NotFittedError, match="not fitted"):
        save_head(LogisticHead(), tmp_path / "h.npz", metadata={})
    with pytest.raises(DataError, match="not JSON-serialisable"):
        save_head(fitted("knn", splits()), tmp_path / "h.npz", metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
