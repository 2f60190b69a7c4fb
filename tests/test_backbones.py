import pytest
import torch
from conftest import MOBILENET_WEIGHTS
from torch import nn

from xfeat.backbones import (
    BackboneError,
    Preprocessing,
    WeightsUnavailableError,
    create_backbone,
    default_preprocessing,
    feature_dim,
    list_backbones,
    min_input_size,
    resolve_weights,
)
from xfeat.backbones.weights import download_state_dict

# One model per architecture family runs by default; every other name runs under the `slow`
# marker (in CI via `make test`): bigger variants take seconds each on 2 CPU cores.
FAST = {
    "alexnet",
    "convnext_tiny",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x2_0",
    "squeezenet1_1",
    "swin_t",
    "swin_v2_t",
    "vgg11",
    "vit_b_32",
    "wide_resnet50_2",
}


def _params(names):
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


def test_registry_lists_every_torchvision_classifier():
    names = list_backbones()
    assert {"resnet18", "resnet50", "shufflenet_v2_x2_0", "mobilenet_v2", "vit_b_16"} <= set(names)
    assert len(names) >= 80 and not any("quantized" in n or "raft" in n for n in names)


@pytest.mark.parametrize(
    "name, dim",
    [("resnet18", 512), ("resnet50", 2048), ("shufflenet_v2_x2_0", 2048), ("mobilenet_v2", 1280)],
)
def test_known_feature_dims(name, dim):
    assert feature_dim(name) == dim


@pytest.mark.parametrize("name", _params(list_backbones()))
def test_every_backbone_returns_n_by_d(name):
    torch.set_num_threads(2)
    size = min_input_size(name)
    backbone = create_backbone(name, "none", image_size=size)
    assert backbone.preprocessing.crop_size == size
    with torch.inference_mode():
        out = backbone.model(torch.randn(2, 3, size, size))
    assert out.shape == (2, feature_dim(name)) == (2, backbone.feature_dim)
    assert torch.isfinite(out).all()
    backbone.replace_classifier(backbone.new_classifier(3))  # what fine-tuning does
    with torch.inference_mode():
        assert backbone.model(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_random_init_is_seeded():
    a = create_backbone("resnet18", "none", seed=3).model.state_dict()
    b = create_backbone("resnet18", "none", seed=3).model.state_dict()
    c = create_backbone("resnet18", "none", seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_classifier_is_stripped_and_replaceable():
    backbone = create_backbone("mobilenet_v2", "none")
    assert backbone.classifier_path == "classifier.1"
    assert isinstance(backbone.model.classifier[1], nn.Identity)
    backbone.replace_classifier(nn.Linear(1280, 2))
    with torch.inference_mode():
        assert backbone.model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_preprocessing_travels_with_weights():
    info, w = resolve_weights("resnet50", "IMAGENET1K_V2")
    assert info.kind == "torchvision" and info.id == "ResNet50_Weights.IMAGENET1K_V2"
    p = default_preprocessing("resnet50", w)
    assert (p.resize_size, p.crop_size) == (232, 224)
    assert default_preprocessing("inception_v3").crop_size == 299
    assert Preprocessing(256, 224).with_size(32).resize_size == 37


def _save_features_only(model: nn.Module, path, wrap=None, prefix=""):
    state = {prefix + k: v for k, v in model.state_dict().items() if not k.startswith("classifier")}
    torch.save(wrap(state) if wrap else state, path)


@pytest.mark.parametrize(
    "wrap, prefix", [(None, ""), (lambda s: {"state_dict": s}, ""), (None, "module.")]
)
def test_local_weights_file_without_classifier(tmp_path, wrap, prefix):
    import torchvision

    torch.manual_seed(123)
    source = torchvision.models.mobilenet_v2()
    path = tmp_path / "w.pth"
    _save_features_only(source, path, wrap, prefix)
    backbone = create_backbone("mobilenet_v2", path)
    assert backbone.weights.kind == "file" and len(backbone.weights.sha256) == 64
    got = backbone.model.state_dict()
    assert torch.equal(got["features.0.0.weight"], source.state_dict()["features.0.0.weight"])


def test_weights_shape_mismatch_is_a_clear_error(tmp_path):
    import torchvision

    path = tmp_path / "half.pth"
    _save_features_only(torchvision.models.mobilenet_v2(width_mult=0.5), path)
    with pytest.raises(
        BackboneError,
        match=r"features.0.0.weight has shape \(16, 3, 3, 3\) but "
        r"MobileNetV2 expects \(32, 3, 3, 3\)",
    ):
        create_backbone("mobilenet_v2", path)


def test_weights_of_another_model(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(BackboneError, match="do not belong to MobileNetV2"):
        create_backbone("mobilenet_v2", path)


def test_weights_missing_backbone_keys(tmp_path):
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    del state["layer4.1.bn2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(BackboneError, match="backbone keys are missing.*layer4.1.bn2.weight"):
        create_backbone("resnet18", tmp_path / "partial.pth")


def test_not_a_state_dict(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(BackboneError, match="cannot read weights file .*junk.pth"):
        create_backbone("resnet18", tmp_path / "junk.pth")


def test_unknown_names():
    with pytest.raises(BackboneError, match="unknown model 'resnet1'.*resnet18"):
        feature_dim("resnet1")
    with pytest.raises(BackboneError, match=r"'IMAGENET9K'.*not understood.*IMAGENET1K_V1"):
        resolve_weights("resnet18", "IMAGENET9K")
    with pytest.raises(BackboneError, match="no such file"):
        resolve_weights("resnet18", "/nowhere/w.pth")


def test_offline_download_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    url = "http://127.0.0.1:9/resnet18-f37072fd.pth"  # nothing listens on the discard port
    with pytest.raises(WeightsUnavailableError, match=r"--weights /path/to/resnet18-f37072fd.pth"):
        download_state_dict(url, name="resnet18", weights_id="ResNet18_Weights.IMAGENET1K_V1")


def test_shared_pretrained_mobilenet_loads():
    backbone = create_backbone("mobilenet_v2", MOBILENET_WEIGHTS)
    assert backbone.weights.sha256 == "3e26d31cdedf2ea2ed69cc3c84a21c86902372a12e10e6d0ece4f6012fffdc97"
    random = create_backbone("mobilenet_v2", "none")
    w = backbone.model.state_dict()["features.0.0.weight"]
    assert not torch.equal(w, random.model.state_dict()["features.0.0.weight"])
    assert backbone.preprocessing.crop_size == 224
