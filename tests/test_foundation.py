"""Foundation-model backbones (``hf:``), on tiny random models saved in the test: features equal
to the library's own forward, the image processor mapped onto xfeat's preprocessing (checked on
real chest X-rays), pooling, ``--layers last:N``, the offline error, and the pipeline."""

from __future__ import annotations

import json
import shutil
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
from xfeat.config import with_pool, with_trusted_code
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
    "convnext": lambda t: t.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875),
    "convnext-384": lambda t: t.ConvNextImageProcessor(size={"shortest_edge": 384}),
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


def test_processor_settings_it_cannot_reproduce_are_refused():
    for spec, named in (
        ({"image_processor_type": "PoolFormerImageProcessor", "crop_pct": 0.9}, "crop_pct=0.9"),
        ({"image_processor_type": "MobileViTImageProcessor", "do_flip_channel_order": True}, "do_flip"),
        ({"size": {"height": 32, "width": 32}, "do_pad": True}, "do_pad"),
    ):
        with pytest.raises(ConfigError, match=named):
            preprocessing_from_processor(spec, source="preprocessor_config.json")
    convnext = preprocessing_from_processor(
        {
            "image_processor_type": "ConvNextImageProcessor",
            "size": {"shortest_edge": 224},
            "crop_pct": 0.875,
        }
    )
    assert (convnext.resize_size, convnext.crop_size, convnext.resize_mode) == (256, 224, "crop")


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
    out = CliRunner().invoke(cli, ["weights"])
    assert out.exit_code == 0 and "tiny/dino" in out.output and "hf download REPO" in out.output


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


# ---- open_clip: a tiny model config saved as an open_clip:DIR folder ----

OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 30, "layers": 2, "width": 32, "patch_size": 6, "head_width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    from xfeat.backbones.open_clip_models import save_folder

    torch.manual_seed(0)
    model = open_clip.CLIP(**OPEN_CLIP_CFG).eval()
    folder = save_folder(model, OPEN_CLIP_CFG, tmp_path_factory.mktemp("oc") / "tiny")
    return {"folder": folder, "model": model, "name": f"open_clip:{folder}"}


def test_open_clip_features_equal_encode_image(open_clip_model):
    x = _x(6)
    backbone = create_backbone(open_clip_model["name"], "DEFAULT")
    with torch.inference_mode():
        torch.testing.assert_close(
            backbone.model(x), open_clip_model["model"].encode_image(x), rtol=0, atol=1e-6
        )
    assert backbone.feature_dim == 16 and backbone.weights.kind == "open_clip"


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_open_clip_transform_mapping_equals_its_own_on_real_images(resize_mode):
    """open_clip's eval transform (torchvision on PIL images): identical to 1e-5."""
    import open_clip

    from xfeat.backbones.open_clip_models import preprocessing_from_open_clip

    cfg = {
        "size": 224,
        "mean": (0.48, 0.45, 0.40),
        "std": (0.26, 0.26, 0.27),
        "interpolation": "bicubic",
    }
    transform = open_clip.image_transform(
        224,
        is_train=False,
        resize_mode=resize_mode,
        **{k: cfg[k] for k in ("mean", "std", "interpolation")},
    )
    pre = preprocessing_from_open_clip({**cfg, "resize_mode": resize_mode})
    for image in _real_images():
        ref = transform(image)[None]
        ours = pre.normalize(torch.from_numpy(pre.resize_and_crop(image)).permute(2, 0, 1)[None])
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_open_clip_extract_zero_shot_and_finetune(open_clip_model, data, tmp_path):
    import open_clip

    name = open_clip_model["name"]
    prompts = {
        "NORMAL": ["a chest x-ray with no findings", "a normal chest x-ray"],
        "PNEUMONIA": "pneumonia",
    }
    result = xfeat.zero_shot(
        data,
        name,
        prompts=prompts,
        weights="DEFAULT",
        out_dir=tmp_path / "zs",
        n_boot=0,
        extract_options={"cache_dir": tmp_path / "c", **RUN},
    )
    record = xfeat.load_result(tmp_path / "zs").record
    assert record.mode == "zero-shot" and record.selection["training_labels_used"] is False
    assert record.threshold.chosen_on == "fixed (no labels)" and set(record.metrics) == {
        "train",
        "val",
        "test",
    }
    # the probabilities are open_clip's own zero-shot softmax on the cached image embeddings
    model, tokenizer = (
        open_clip_model["model"],
        open_clip.get_tokenizer(f"local-dir:{open_clip_model['folder']}"),
    )
    with torch.inference_mode():
        text = [
            torch.nn.functional.normalize(
                model.encode_text(tokenizer(p if isinstance(p, list) else [p])), dim=-1
            ).mean(0)
            for p in prompts.values()
        ]
        text = torch.nn.functional.normalize(torch.stack(text), dim=-1)
        fs = read_cache(next((tmp_path / "c").glob("*.h5")))
        image = torch.nn.functional.normalize(torch.from_numpy(fs["test"].features).double(), dim=-1)
        ref = (model.logit_scale.exp().double() * image @ text.double().T).softmax(-1).numpy()
    np.testing.assert_allclose(result.predictions["test"][2], ref, atol=1e-5)
    # fine-tuning the image tower, and predict from the saved network
    xfeat.finetune(
        data,
        name,
        weights="DEFAULT",
        mode="full",
        epochs=1,
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "ft",
        n_boot=0,
        **RUN,
    )
    rows = xfeat.predict(tmp_path / "ft" / "model.pt", [data / "test"], **RUN)
    assert len(rows) == 8 and all(r["predicted"] and not r["error"] for r in rows)


def _char_tokenizer(tmp_path, folder, **options) -> tuple:
    """``(tokenizer, vocabulary)``: a CLIP tokenizer over single characters (no merges), made
    here and saved in ``folder`` (no hub)."""
    import string

    chars = list(string.ascii_lowercase) + list("-.,0123456789")
    vocab = {
        t: i
        for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])
    }
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), **options
    )
    tokenizer.save_pretrained(folder)
    return tokenizer, vocab


def test_hf_clip_zero_shot_from_the_cli_and_lp_ft(data, tmp_path):
    """A tiny CLIP with both towers and a tokenizer made here (a character vocabulary)."""
    folder = tmp_path / "clip"
    _, vocab = _char_tokenizer(tmp_path, folder)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=CLIP_VISION, projection_dim=16)
    ).eval()
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
    ).save_pretrained(folder)
    x = _x(7)
    backbone = create_backbone(f"hf:{folder}", "DEFAULT")
    with torch.inference_mode():  # the dual model's image features: get_image_features
        ref = model.get_image_features(pixel_values=x)
        torch.testing.assert_close(
            backbone.model(x),
            ref if isinstance(ref, torch.Tensor) else ref.pooler_output,
            rtol=0,
            atol=1e-6,
        )
    out = CliRunner().invoke(
        cli,
        [
            "zero-shot",
            "--data",
            str(data),
            "--model",
            f"hf:{folder}",
            "--weights",
            "DEFAULT",
            "--prompts",
            "NORMAL=a chest x-ray with no findings",
            "--prompts",
            "PNEUMONIA=a chest x-ray showing pneumonia",
            "--cache-dir",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "zs"),
            "--n-boot",
            "0",
            "--num-workers",
            "0",
        ],
    )
    assert out.exit_code == 0, out.output
    assert xfeat.load_result(tmp_path / "zs").record.mode == "zero-shot"
    result = xfeat.finetune(
        data,
        f"hf:{folder}",
        weights="DEFAULT",
        mode="lp-ft",
        epochs=1,
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "ft",
        n_boot=0,
        **RUN,
    )
    assert result.record.mode == "lp-ft"


def test_zero_shot_needs_a_text_tower_and_every_class(models, open_clip_model, data, tmp_path):
    import time

    t0 = time.perf_counter()
    with pytest.raises(BackboneError, match="no text tower"):
        xfeat.zero_shot(
            data,
            f"hf:{models['root'] / 'dino'}",
            prompts=["NORMAL=a", "PNEUMONIA=b"],
            weights="DEFAULT",
            save=False,
            extract_options={"cache_dir": tmp_path, **RUN},
            n_boot=0,
        )
    assert not list(tmp_path.glob("*.h5"))  # refused from the configuration, before extracting
    assert time.perf_counter() - t0 < 30
    with pytest.raises(BackboneError, match="clip_vision_model image model"):
        xfeat.zero_shot(data, f"hf:{models['root'] / 'clipv'}", prompts=["NORMAL=a"], save=False)
    with pytest.raises(ConfigError, match="give a prompt for"):
        xfeat.zero_shot(
            data,
            open_clip_model["name"],
            prompts=["NORMAL=a"],
            weights="DEFAULT",
            save=False,
            extract_options={"cache_dir": tmp_path, **RUN},
            n_boot=0,
        )


def test_compare_shows_zero_shot_beside_the_linear_probe(open_clip_model, models, data, tmp_path):
    dino = f"hf:{models['root'] / 'dino'}"  # no text tower: its other runs go on, said in a note
    comparison = xfeat.compare(
        data,
        [open_clip_model["name"], dino],
        weights="DEFAULT",
        modes=["cached"],
        prompts=["NORMAL=normal", "PNEUMONIA=pneumonia"],
        out_dir=tmp_path / "cmp",
        cache_dir=tmp_path / "c",
        n_boot=0,
        num_workers=0,
        progress=False,
    )
    modes = sorted((row["model"] == dino, row["mode"]) for row in comparison.rows)
    assert modes == [(False, "cached"), (False, "zero-shot"), (True, "cached")]
    assert any(n.startswith(f"no zero-shot run of {dino}: ") for n in comparison.notes)


_REMOTE_CODE = """
from transformers import Dinov2Config, Dinov2Model


class TinyConfig(Dinov2Config):
    model_type = "xfeat_tiny_remote"


class TinyModel(Dinov2Model):
    config_class = TinyConfig
"""


def test_remote_code_runs_only_with_trust_remote_code(models, tmp_path):
    folder = tmp_path / "remote"
    models["dino"].save_pretrained(folder)
    (folder / "tiny_remote.py").write_text(_REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="xfeat_tiny_remote",
        architectures=["TinyModel"],
        auto_map={"AutoConfig": "tiny_remote.TinyConfig", "AutoModel": "tiny_remote.TinyModel"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(models["root"] / "dino" / "preprocessor_config.json", folder)
    with pytest.raises(BackboneError, match="only with --trust-remote-code"):
        create_backbone(f"hf:{folder}", "DEFAULT")
    name = with_trusted_code(f"hf:{folder}")
    assert name.endswith(":trust_remote_code")
    ref = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(ref).__name__ == "TinyModel"  # the repository's own class ran
    ref.save_pretrained(folder)  # a checkpoint in the custom class's own key names
    x = _x(8)
    with torch.inference_mode():
        got = create_backbone(name, "DEFAULT").model(x)
        torch.testing.assert_close(got, ref(pixel_values=x).last_hidden_state[:, 0])


def test_analyze_runs_on_an_hf_model(models, data, tmp_path):
    name = f"hf:{models['root'] / 'dino'}"
    analysis = xfeat.analyze(
        data,
        name,
        weights="DEFAULT",
        out_dir=tmp_path / "a",
        n_folds=2,
        n_boot=20,
        extract_options={"cache_dir": tmp_path / "c", **RUN},
        progress=False,
    )
    assert (tmp_path / "a").is_dir() and analysis is not None


def test_frozen_finetune_of_an_hf_model_trains_the_new_layer_only(models, data, tmp_path):
    name = with_pool(f"hf:{models['root'] / 'dino'}", "cls+mean")
    result = xfeat.finetune(
        data,
        name,
        weights="DEFAULT",
        mode="frozen",
        epochs=1,
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "ft",
        n_boot=0,
        **RUN,
    )
    assert result.record.params["trainable_parameters"] == 64 * 2 + 2  # Linear(2D, 2) on cls+mean
    network, meta = xfeat.finetuning.load_finetuned(
        tmp_path / "ft" / "model.pt"
    )  # rebuilt from the name
    with torch.inference_mode():
        assert network.model(_x(9)).shape == (3, 2)


def test_open_clip_compile_and_int8_are_declined_clearly(open_clip_model, data, tmp_path):
    name = open_clip_model["name"]
    with pytest.raises(ConfigError, match="--compile on is not offered"):
        xfeat.extract(data, name, weights="DEFAULT", cache_dir=tmp_path, compile="on", **RUN)
    with pytest.raises(ConfigError, match="int8 is not offered for open_clip:"):
        xfeat.extract(data, name, weights="DEFAULT", cache_dir=tmp_path, precision="int8", **RUN)


def test_open_clip_pretrained_tag_offline_is_a_clear_error_at_once(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    from huggingface_hub import constants

    from xfeat.backbones import hf_models

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_models, "hub_offline_reason", lambda: "the test blocks the hub")
    with pytest.raises(BackboneError, match=r"hf download timm/vit_base_patch32_clip_224\.openai"):
        xfeat.backbones.resolve_weights("open_clip:ViT-B-32:openai", "DEFAULT")
    with pytest.raises(BackboneError, match="its tags"):
        xfeat.backbones.resolve_weights("open_clip:ViT-B-32:no-such-tag", "DEFAULT")


def test_siglip_zero_shot_equals_the_model_s_own_logits(data, tmp_path):
    """A tiny SigLIP (both towers; a character tokenizer made here, padded to its full length
    as SigLIP was trained): zero-shot probabilities are the softmax over the classes of the
    model's own ``logits_per_image`` (its bias is the same for every class)."""
    from PIL import Image

    folder = tmp_path / "siglip"
    tokenizer, vocab = _char_tokenizer(tmp_path, folder, model_max_length=24)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=24,
        projection_size=32,
    )
    vision = dict(CLIP_VISION)
    torch.manual_seed(0)
    model = transformers.SiglipModel(
        transformers.SiglipConfig(text_config=text, vision_config=vision)
    ).eval()
    model.save_pretrained(folder)
    processor = transformers.SiglipImageProcessor(size={"height": 30, "width": 30})
    processor.save_pretrained(folder)
    prompts = {
        "NORMAL": "a chest x-ray with no findings",
        "PNEUMONIA": "a chest x-ray showing pneumonia",
    }
    result = xfeat.zero_shot(
        data,
        f"hf:{folder}",
        prompts=prompts,
        weights="DEFAULT",
        out_dir=tmp_path / "zs",
        n_boot=0,
        extract_options={"cache_dir": tmp_path / "c", **RUN},
    )
    assert result.record.mode == "zero-shot"
    assert result.record.selection["training_labels_used"] is False
    ids, _, probas = result.predictions["test"]
    split = xfeat.load_dataset(data).splits["test"]
    images = [Image.open(split.paths[split.ids.index(i)]).convert("RGB") for i in ids]
    tokens = tokenizer(
        list(prompts.values()), padding="max_length", truncation=True, return_tensors="pt"
    )
    with torch.inference_mode():
        logits = model(
            pixel_values=processor(images, return_tensors="pt")["pixel_values"], **tokens
        ).logits_per_image
    np.testing.assert_allclose(probas, torch.softmax(logits.double(), dim=1).numpy(), atol=1e-4)
