"""Foundation-model backbones (``hf:``), on tiny random models saved in the test: features equal
to the library's own forward, the image processor mapped onto xfeat's preprocessing (checked on
real chest X-rays), pooling, ``--layers last:N``, the offline error, and the pipeline."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import CHEST, child_env, make_image_folder
from PIL import Image

import xfeat
from xfeat.backbones import BackboneError, create_backbone, feature_dim
from xfeat.backbones.hf_models import preprocessing_from_processor
from xfeat.cache import read_cache
from xfeat.cli import cli
from xfeat.config import with_pool
from xfeat.errors import ConfigError

transformers = pytest.importorskip("transformers")

RUN = dict(num_workers=0, progress=False)
# Dinov2 of the issue: 30 px, patch 2 -> 225 patch tokens + CLS.
DINO = dict(
    image_size=30,
    patch_size=2,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
)
CLIP_VISION = dict(
    image_size=30,
    patch_size=6,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Tiny random transformers models saved with their image processors."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    dino = transformers.Dinov2Model(transformers.Dinov2Config(**DINO)).eval()
    dino.save_pretrained(root / "dino")
    transformers.BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 30, "width": 30},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(root / "dino")
    clip = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**CLIP_VISION, projection_dim=16)
    ).eval()
    clip.save_pretrained(root / "clipv")
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
    ).save_pretrained(root / "clipv")
    return {"root": root, "dino": dino, "clip": clip}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("img"), n_train=6, n_test=4)


def _x(seed=0, n=3, size=30):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_dinov2_features_equal_transformers_forward(models):
    name = f"hf:{models['root'] / 'dino'}"
    x = _x()
    with torch.inference_mode():
        ref = models["dino"](pixel_values=x, output_hidden_states=True)
        tokens = ref.last_hidden_state
        cls = create_backbone(name, "DEFAULT").model(x)
        mean = create_backbone(with_pool(name, "mean"), "DEFAULT").model(x)
        both = create_backbone(with_pool(name, "cls+mean"), "DEFAULT").model(x)
        blocks = create_backbone(name, "DEFAULT").model.forward_blocks(
            x, ["block.0", "block.1", "penultimate"]
        )
        normed = [models["dino"].layernorm(h)[:, 0] for h in ref.hidden_states[1:]]
    torch.testing.assert_close(cls, ref.pooler_output, rtol=0, atol=1e-6)  # the default: pooler_output
    torch.testing.assert_close(mean, tokens[:, 1:].mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        both, torch.cat([ref.pooler_output, tokens[:, 1:].mean(1)], 1), rtol=0, atol=1e-6
    )
    for i in (0, 1):  # DINOv2's linear evaluation: the normed CLS token of each block
        torch.testing.assert_close(blocks[f"block.{i}"], normed[i], rtol=0, atol=1e-6)
    torch.testing.assert_close(blocks["block.1"], ref.pooler_output, rtol=0, atol=1e-6)
    assert feature_dim(name) == 32 and feature_dim(with_pool(name, "cls+mean")) == 64


def test_clip_vision_tower_gives_the_projected_embedding(models):
    name = f"hf:{models['root'] / 'clipv'}"
    x = _x(1)
    with torch.inference_mode():
        ref = models["clip"](pixel_values=x)
        got = create_backbone(name, "DEFAULT").model(x)
        cls = create_backbone(with_pool(name, "cls"), "DEFAULT").model(x)
        inner = models["clip"].vision_model(pixel_values=x)
    torch.testing.assert_close(got, ref.image_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cls, inner.pooler_output, rtol=0, atol=1e-6)
    assert feature_dim(name) == 16


def test_random_weights_are_seeded_and_differ_from_the_checkpoint(models):
    name = f"hf:{models['root'] / 'dino'}"
    x = _x(2)
    with torch.inference_mode():
        a, b = (create_backbone(name, "none", seed=3).model(x) for _ in range(2))
        c = create_backbone(name, "DEFAULT").model(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_pickle_only_weights_are_refused_unless_passed_as_a_file(models, tmp_path):
    folder = tmp_path / "pickled"
    models["dino"].save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(models["dino"].state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(BackboneError, match=r"pytorch_model\.bin, a pickle.*--weights"):
        create_backbone(f"hf:{folder}", "DEFAULT")
    backbone = create_backbone(f"hf:{folder}", folder / "pytorch_model.bin")
    x = _x(4)
    with torch.inference_mode():
        torch.testing.assert_close(backbone.model(x), models["dino"](pixel_values=x).pooler_output)


def _real_images() -> list:
    if not CHEST.is_dir():
        pytest.fail(f"the shared chest X-ray data is missing at {CHEST}")
    files = sorted((CHEST / "test" / "PNEUMONIA").glob("*.jpeg"))[::50][:6]
    images = [Image.open(f).convert("RGB") for f in files]
    # non-square views of the same X-rays, so that the short-side rule and the crop are exercised
    return (
        images
        + [im.crop((0, 0, 224, 161)) for im in images[:3]]
        + [im.crop((0, 0, 150, 224)) for im in images[3:]]
    )


PROCESSORS = {
    "dinov2": lambda t: t.BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
    ),
    "clip": lambda t: t.CLIPImageProcessor(),
    "vit-stretch": lambda t: t.ViTImageProcessor(size={"height": 224, "width": 224}),
    "rad-dino": lambda t: t.BitImageProcessor(
        size={"shortest_edge": 518},
        crop_size={"height": 518, "width": 518},
        image_mean=[0.53] * 3,
        image_std=[0.26] * 3,
    ),
}


@pytest.mark.parametrize("kind", sorted(PROCESSORS))
def test_processor_mapping_equals_the_processor_on_real_images(kind, tmp_path):
    """Against transformers' default (torchvision) backend, on real X-rays and non-square views
    of them: at most 3 grey levels apart (its antialiased tensor resize against PIL's), 0.2 of a
    level on average. The PIL backend is identical on square images (1e-5); on non-square ones
    its centre crop rounds its offset down where torchvision rounds to even (one pixel)."""
    PROCESSORS[kind](transformers).save_pretrained(tmp_path)
    images = _real_images()
    for backend, max_levels, mean_levels in (("torchvision", 3.0, 0.2), ("pil", 1e-3, 1e-4)):
        processor = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
        pre = preprocessing_from_processor(processor.to_dict())
        if kind == "vit-stretch":
            assert pre.resize_mode == "stretch"
        for image in images if backend == "torchvision" else images[:6]:
            ref = processor(images=[image], return_tensors="pt")["pixel_values"]
            ours = pre.normalize(torch.from_numpy(pre.resize_and_crop(image)).permute(2, 0, 1)[None])
            assert ours.shape == ref.shape
            levels = (ours - ref).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255
            assert float(levels.max()) <= max_levels, (backend, image.size, float(levels.max()))
            assert float(levels.mean()) <= mean_levels, (backend, image.size, float(levels.mean()))


def test_rescale_factor_and_resample_are_mapped():
    pre = preprocessing_from_processor(
        {
            "size": {"height": 64, "width": 64},
            "resample": 2,
            "rescale_factor": 1 / 127.5,
            "image_mean": [1, 1, 1],
            "image_std": [1, 1, 1],
        }
    )
    # x / 127.5 - 1 == (x / 255 - 0.5) / 0.5
    assert (pre.resize_size, pre.crop_size, pre.resize_mode, pre.interpolation) == (
        64,
        64,
        "stretch",
        "bilinear",
    )
    assert pre.mean == pytest.approx((0.5,) * 3) and pre.std == pytest.approx((0.5,) * 3)
    with pytest.raises(ConfigError, match="square"):
        preprocessing_from_processor({"size": {"height": 64, "width": 32}})


def test_extract_fit_predict_and_last_blocks_through_the_pipeline(models, data, tmp_path):
    name = f"hf:{models['root'] / 'dino'}"
    path = xfeat.extract(data, name, weights="DEFAULT", cache_dir=tmp_path / "c", layers="last:2", **RUN)
    fs = read_cache(path)
    assert [b for b, _ in fs.meta.blocks] == ["block.0", "block.1", "penultimate"]
    assert fs.meta.preprocessing["interpolation"] == "bicubic" and fs.meta.versions.get("transformers")
    # the cached rows are the model's output on xfeat's preprocessed images
    plain = xfeat.extract(data, name, weights="DEFAULT", cache_dir=tmp_path / "c", **RUN)
    got = read_cache(plain)["test"]
    backbone = create_backbone(name, "DEFAULT")
    pre = backbone.preprocessing
    first = (
        Image.open(data / "test" / got.ids[0]).convert("RGB")
        if (data / "test" / got.ids[0]).is_file()
        else None
    )
    if first is not None:
        x = pre.normalize(torch.from_numpy(pre.resize_and_crop(first)).permute(2, 0, 1)[None])
        with torch.inference_mode():
            ref = models["dino"](pixel_values=x).pooler_output.numpy()
        np.testing.assert_allclose(got.features[:1], ref, atol=1e-5)
    xfeat.fit_head(cache=plain, out_dir=tmp_path / "head", n_boot=0)
    rows = xfeat.predict(tmp_path / "head" / "head.npz", [data / "test"], **RUN)
    assert len(rows) == 8 and all(r["predicted"] and not r["error"] for r in rows)


def test_compile_and_int8_are_declined_clearly(models, data, tmp_path):
    name = f"hf:{models['root'] / 'dino'}"
    with pytest.raises(ConfigError, match="--compile on is not offered"):
        xfeat.extract(data, name, cache_dir=tmp_path, compile="on", **RUN)
    with pytest.raises(ConfigError, match="int8 is not offered for hf:"):
        xfeat.extract(data, name, cache_dir=tmp_path, precision="int8", **RUN)
    with pytest.raises(ConfigError, match="last:N"):
        xfeat.extract(data, name, cache_dir=tmp_path, layers="stages", **RUN)


def _fake_hub_cache(root, repo: str, source) -> None:
    """``repo`` as huggingface_hub lays out a downloaded snapshot (files copied)."""
    import shutil

    folder = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(source, folder / "snapshots" / "0123abc")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abc")


def test_hub_name_is_read_from_the_local_cache_offline(models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _fake_hub_cache(tmp_path, "tiny/dino", models["root"] / "dino")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    backbone = create_backbone("hf:tiny/dino", "DEFAULT")
    assert backbone.weights.url == "https://huggingface.co/tiny/dino" and backbone.weights.tag == "dino"
    x = _x(5)
    with torch.inference_mode():
        torch.testing.assert_close(backbone.model(x), models["dino"](pixel_values=x).pooler_output)
    (row,) = xfeat.backbones.offline_weights()["hf_cache"]  # what `xfeat weights` lists
    assert row["repo"] == "tiny/dino" and row["safetensors"]


# Every socket refused, as on a machine without a network.
_NO_NETWORK = """
import socket, sys
def refuse(*a, **k):
    raise OSError("network blocked by the test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from xfeat.cli import cli
cli(sys.argv[1:], prog_name="xfeat")
"""


def test_uncached_hub_model_offline_is_a_one_line_error_at_once(data, tmp_path):
    env = child_env(HF_HOME=str(tmp_path / "hf"), XFEAT_CACHE=str(tmp_path / "c"))
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _NO_NETWORK,
            "extract",
            "--data",
            str(data),
            "--model",
            "hf:nobody/not-cached",
            "--weights",
            "DEFAULT",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and "hf download nobody/not-cached" in lines[0], proc.stderr[-2000:]
    assert seconds < 30, seconds  # process start and imports included; no network wait


def test_cli_pool_option_and_models_listing(models, data, tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["models"])
    assert out.exit_code == 0 and "hf:NAME_OR_DIR" in out.output
    result = runner.invoke(
        cli,
        [
            "extract",
            "--data",
            str(data),
            "--model",
            f"hf:{models['root'] / 'dino'}",
            "--weights",
            "DEFAULT",
            "--pool",
            "cls+mean",
            "--cache-dir",
            str(tmp_path),
            "--num-workers",
            "0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    (entry,) = tmp_path.glob("*.h5")
    fs = read_cache(entry)
    assert fs.meta.model.endswith(":pool=cls_mean") and fs["test"].features.shape == (8, 64)
