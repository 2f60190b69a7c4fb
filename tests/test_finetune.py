import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, make_image_folder, run_killed_at

from xfeat.backbones import create_backbone
from xfeat.cache import read_cache
from xfeat.cli import cli
from xfeat.data import load_dataset
from xfeat.errors import ConfigError
from xfeat.finetuning import ProbeHead, finetune, load_finetuned
from xfeat.prediction import predict

QUICK = dict(model="resnet18", image_size=TINY, num_workers=0, progress=False, n_boot=50)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ft") / "xray", n_train=24, n_test=6)


def test_full_run_writes_everything(data, tmp_path):
    result = finetune(
        data, mode="full", epochs=3, cache_dir=tmp_path / "c", out_dir=tmp_path / "r", **QUICK
    )
    run = tmp_path / "r"
    for name in (
        "results.json",
        "predictions.npz",
        "history.json",
        "history.csv",
        "curves.png",
        "model.pt",
        "checkpoint.pt",
        "best_model.pt",
    ):
        assert (run / name).is_file(), name
    record = json.loads((run / "results.json").read_text())
    assert record["mode"] == "full" and record["head"] == "linear"
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3]
    assert record["history"][0]["lr"] == 1e-3 and record["history"][0]["images_per_second"] > 0
    assert record["params"]["trainable_parameters"] == record["params"]["parameters"]
    best = record["selection"]["best_epoch"]
    assert record["history"][best - 1]["val_accuracy"] == max(
        h["val_accuracy"] for h in record["history"]
    )
    # the table says how that epoch was chosen, with the history's own number
    history_value = record["history"][best - 1]["val_accuracy"]
    assert (
        f"chosen on val: epoch {best} of 3, the highest val_accuracy in history.json "
        f"({history_value:.3f}, argmax" in result.table()
    )
    assert record["threshold"]["chosen_on"] == "val" and set(record["metrics"]) == {
        "train",
        "val",
        "test",
    }
    assert result.record.timing["seconds_per_epoch"] > 0


def _initial(model="resnet18", size=TINY):
    return {
        k: v.detach().clone()
        for k, v in create_backbone(model, "none", image_size=size).model.state_dict().items()
    }


def test_full_moves_every_weight_and_the_loss_falls(data, tmp_path):
    result = finetune(
        data, mode="full", epochs=4, lr=0.01, cache_dir=tmp_path / "c", out_dir=tmp_path / "r", **QUICK
    )
    losses = [h["train_loss"] for h in result.record.history]
    assert losses[-1] < losses[0], losses
    trained = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["model"]
    initial = _initial()
    moved = [
        k
        for k in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight", "bn1.weight")
        if not torch.equal(trained[k], initial[k])
    ]
    assert len(moved) == 4, moved


def test_frozen_trains_only_the_new_layer(data, tmp_path):
    result = finetune(
        data, mode="frozen", epochs=3, lr=0.01, cache_dir=tmp_path / "c", out_dir=tmp_path / "r", **QUICK
    )
    trained = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["model"]
    initial = create_backbone("resnet18", "none", image_size=TINY).model
    for key, value in initial.named_parameters():  # no backbone weight moves
        assert torch.equal(trained[key], value.detach()), key
    # As in the tutorial the frozen network runs in train mode: BatchNorm statistics adapt.
    assert not torch.equal(trained["bn1.running_mean"], initial.bn1.running_mean)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fresh = torch.nn.Linear(512, 2)
    assert not torch.equal(trained["fc.weight"], fresh.weight)  # the new layer trained
    losses = [h["train_loss"] for h in result.record.history]
    assert losses[-1] < losses[0], losses
    assert result.record.params["trainable_parameters"] == 512 * 2 + 2


def test_lpft_layer_reproduces_the_probe(data, tmp_path):
    from xfeat.fitting import fit_head

    probe = fit_head(
        data,
        "resnet18",
        save=False,
        n_boot=0,
        extract_options=dict(cache_dir=tmp_path / "c", image_size=TINY, num_workers=0, progress=False),
    )
    features = read_cache(probe.record.cache.path)
    layer = ProbeHead.from_logistic(probe.head)
    with torch.no_grad():
        ours = torch.softmax(layer(torch.from_numpy(features["test"].features)), 1).numpy()
    np.testing.assert_allclose(ours, probe.head.predict_proba(features["test"].features), atol=1e-4)
    result = finetune(
        data, mode="lp-ft", epochs=1, cache_dir=tmp_path / "c", out_dir=tmp_path / "r", **QUICK
    )
    assert result.record.selection["lpft_probe"]["C"] == probe.head.C_


def test_lpft_survives_nearly_constant_features(tmp_path):
    """Random-init shufflenet's eval-mode features barely vary (std ~1e-10): folding the
    standardisation into the weights made them ~1e8 and training diverged."""
    data = make_image_folder(tmp_path / "xray", n_train=16, n_test=4)
    result = finetune(
        data,
        "shufflenet_v2_x2_0",
        mode="lp-ft",
        epochs=2,
        image_size=TINY,
        num_workers=0,
        progress=False,
        n_boot=0,
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "r",
    )
    assert all(np.isfinite(h["train_loss"]) for h in result.record.history)
    assert all(np.isfinite(h["val_loss"]) for h in result.record.history)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["model"]
    assert state["fc.linear.weight"].abs().max() < 1e3


def test_modern_recipe_warms_up_then_decays(data, tmp_path):
    result = finetune(
        data,
        mode="full",
        recipe="modern",
        epochs=3,
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "r",
        **QUICK,
    )
    params = result.record.params
    assert (
        params["recipe"],
        params["weight_decay"],
        params["label_smoothing"],
        params["backbone_lr_scale"],
        params["warmup_epochs"],
    ) == ("modern", 0.05, 0.1, 0.1, 1)
    lrs = [h["lr"] for h in result.record.history]  # the head's lr at the start of each epoch
    assert lrs[0] < lrs[1] and lrs[2] < lrs[1], lrs
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.1 * groups[0]["lr"])


def test_results_do_not_depend_on_the_number_of_loader_workers(data, tmp_path):
    runs = [
        finetune(
            data,
            epochs=2,
            cache_dir=tmp_path / "c",
            out_dir=tmp_path / f"w{w}",
            **{**QUICK, "num_workers": w},
        )
        for w in (0, 2)
    ]
    assert runs[0].record.history[1]["train_loss"] == runs[1].record.history[1]["train_loss"]
    np.testing.assert_array_equal(runs[0].predictions["test"][2], runs[1].predictions["test"][2])


def test_seeded_runs_are_identical(data, tmp_path):
    a = finetune(data, epochs=2, cache_dir=tmp_path / "c", out_dir=tmp_path / "a", **QUICK)
    b = finetune(data, epochs=2, cache_dir=tmp_path / "c", out_dir=tmp_path / "b", **QUICK)
    assert [h["train_loss"] for h in a.record.history] == [h["train_loss"] for h in b.record.history]
    np.testing.assert_array_equal(a.predictions["test"][2], b.predictions["test"][2])


def test_refuses_to_overwrite_and_checks_resume_options(data, tmp_path):
    finetune(data, epochs=1, cache_dir=tmp_path / "c", out_dir=tmp_path / "r", **QUICK)
    with pytest.raises(ConfigError, match="pass resume=True"):
        finetune(data, epochs=1, cache_dir=tmp_path / "c", out_dir=tmp_path / "r", **QUICK)
    with pytest.raises(ValueError, match=r"different options \(\['lr'\]\)"):
        finetune(
            data,
            epochs=1,
            lr=0.1,
            resume=True,
            cache_dir=tmp_path / "c",
            out_dir=tmp_path / "r",
            **QUICK,
        )


def test_predict_with_the_finetuned_model(data, tmp_path):
    result = finetune(data, epochs=1, cache_dir=tmp_path / "c", out_dir=tmp_path / "r", **QUICK)
    rows = predict(tmp_path / "r" / "model.pt", [data / "test"], num_workers=0, progress=False)
    ids, _, proba = result.predictions["test"]
    expected = dict(zip(ids, proba))
    for row in rows:
        rel = "test/" + row["path"].split("/test/", 1)[1]
        np.testing.assert_allclose([row["p_NORMAL"], row["p_PNEUMONIA"]], expected[rel], atol=1e-5)
    network, meta = load_finetuned(tmp_path / "r" / "model.pt")
    assert meta["class_names"] == ["NORMAL", "PNEUMONIA"]
    with torch.inference_mode():
        assert network.model(torch.randn(1, 3, TINY, TINY)).shape == (1, 2)


def _checkpoint_epoch(path):
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except Exception:  # not written yet
        return 0


@pytest.fixture
def one_thread():
    """The killed child runs with one thread; float sums must be ordered the same here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_kill_then_resume_equals_uninterrupted(tmp_path, one_thread):
    """SIGKILL in the middle of an epoch, default loader (workers), then --resume: the
    history and the final weights equal an uninterrupted run's, bit for bit."""
    data = make_image_folder(tmp_path / "xray", n_train=60, n_test=4)
    args = [
        "--data",
        str(data),
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        "48",
        "--epochs",
        "5",
        "--cache-dir",
        str(tmp_path / "c"),
        "--n-boot",
        "50",
    ]
    run = tmp_path / "killed"
    # SIGKILL on the first optimizer step of epoch 3 (the tutorial recipe's SGD), after its
    # first batch went forward and backward: epoch 2's checkpoint is the last one on disk.
    steps_per_epoch = -(-len(load_dataset(data).splits["train"]) // 32)
    run_killed_at(
        "torch.optim.sgd:SGD.step", 2 * steps_per_epoch + 1, ["-q", "finetune", *args, "--out", run]
    )
    killed_at = _checkpoint_epoch(run / "checkpoint.pt")
    assert killed_at == 2

    resumed = CliRunner().invoke(cli, ["-q", "finetune", *args, "--out", str(run), "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    straight = CliRunner().invoke(
        cli, ["-q", "finetune", *args, "--out", str(tmp_path / "ref"), "--json"]
    )
    a, b = json.loads(resumed.stdout), json.loads(straight.stdout)  # warnings go to stderr
    assert [h["epoch"] for h in a["history"]] == [1, 2, 3, 4, 5]
    for ha, hb in zip(a["history"], b["history"]):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert ha[key] == hb[key], (ha["epoch"], key)
    assert a["selection"]["best_epoch"] == b["selection"]["best_epoch"]
    final = [
        torch.load(d / "checkpoint.pt", weights_only=True)["model"] for d in (run, tmp_path / "ref")
    ]
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key]), key


def test_lpft_from_a_saved_probe_and_a_wrong_one(data, tmp_path):
    from xfeat.fitting import fit_head

    extract_options = dict(cache_dir=tmp_path / "c", image_size=TINY, num_workers=0, progress=False)
    fit_head(data, "resnet18", out_dir=tmp_path / "probe", n_boot=0, extract_options=extract_options)
    result = finetune(
        data,
        mode="lp-ft",
        epochs=1,
        probe=tmp_path / "probe" / "head.npz",
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "r",
        **QUICK,
    )
    assert result.record.selection["lpft_probe"]["probe"].endswith("head.npz")
    fit_head(data, "resnet34", out_dir=tmp_path / "other", n_boot=0, extract_options=extract_options)
    with pytest.raises(ConfigError, match="trained on backbone 'resnet34'"):
        finetune(
            data,
            mode="lp-ft",
            epochs=1,
            probe=tmp_path / "other" / "head.npz",
            cache_dir=tmp_path / "c",
            out_dir=tmp_path / "r2",
            **QUICK,
        )


def test_squeezenet_conv_classifier_finetunes(data, tmp_path):
    result = finetune(
        data,
        epochs=1,
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "r",
        **{**QUICK, "model": "squeezenet1_1", "image_size": 48},
    )
    assert result.record.params["trainable_parameters"] == result.record.params["parameters"]
    rows = predict(tmp_path / "r" / "model.pt", [data / "test"], num_workers=0, progress=False)
    assert len(rows) == 12 and all(r["predicted"] for r in rows)


def test_divergence_is_a_clear_error(data, tmp_path):
    from xfeat.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf).*lower the learning rate"):
        finetune(data, epochs=1, lr=1e12, cache_dir=tmp_path / "c", out_dir=tmp_path / "r", **QUICK)
