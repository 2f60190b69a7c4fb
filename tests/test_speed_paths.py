"""The fast paths of extraction: memory layout policy, padded static batches, compile with its
fallback, decoding threads, int8 where it is offered. Speed itself is measured in
scripts/bench_*.py."""

import logging
import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, make_image_folder

import xfeat
from xfeat.backbones import create_backbone
from xfeat.cache import read_cache, read_meta
from xfeat.cli import cli
from xfeat.errors import ConfigError
from xfeat.extraction.forward import Runner
from xfeat.extraction.runtime import channels_last_default, pad_batch, should_compile

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("speed") / "xray", n_train=12, n_test=4)


def test_channels_last_only_where_it_is_faster():
    assert channels_last_default("resnet50", CPU) and channels_last_default("mobilenet_v2", CPU)
    assert not channels_last_default("convnext_tiny", CPU)
    assert not channels_last_default("vit_b_32", CPU)
    assert channels_last_default("vit_b_32", torch.device("cuda"))
    assert not channels_last_default("torchscript:/m.pt", CPU)


def test_compile_auto_amortises_and_bad_values_are_clear():
    assert not should_compile("auto", 500) and should_compile("auto", 5000)
    assert should_compile("on", 1) and not should_compile("off", 10**6)
    with pytest.raises(ConfigError, match="compile='sometimes'"):
        should_compile("sometimes", 10)


def test_a_padded_batch_keeps_its_layout_and_its_rows():
    runner = Runner(
        create_backbone("resnet18", "none", image_size=TINY),
        [("penultimate", 512)],
        CPU,
        batch_size=8,
        channels_last=True,
    )
    images = torch.randint(0, 255, (3, 3, TINY, TINY), dtype=torch.uint8)
    x = runner._prepare(pad_batch(images, 8))
    assert x.shape[0] == 8 and x.is_contiguous(memory_format=torch.channels_last)
    runner.static = True  # as for an exported graph: padded, then cut back
    out = runner(images)["penultimate"]
    assert out.shape == (3, 512)
    runner.static = False
    np.testing.assert_allclose(out, runner(images)["penultimate"], rtol=1e-5, atol=1e-6)


def test_the_runner_normalises_inside_its_module_exactly_as_the_preprocessing():
    backbone = create_backbone("resnet18", "none", image_size=TINY)
    runner = Runner(backbone, [("penultimate", 512)], CPU, batch_size=4)
    images = torch.randint(0, 255, (4, 3, TINY, TINY), dtype=torch.uint8)
    assert runner._prepare(images).dtype == torch.uint8  # the module takes the pixels
    with torch.inference_mode():
        expected = runner.module.module(
            backbone.preprocessing.normalize(images.contiguous(memory_format=torch.channels_last))
        )
    np.testing.assert_array_equal(runner(images)["penultimate"], expected["penultimate"].numpy())


def test_a_failed_compilation_falls_back_to_eager(caplog):
    runner = Runner(
        create_backbone("resnet18", "none", image_size=TINY), [("penultimate", 512)], CPU, batch_size=4
    )
    images = torch.randint(0, 255, (3, 3, TINY, TINY), dtype=torch.uint8)
    expected = runner(images)["penultimate"]

    def broken(x):
        raise RuntimeError("inductor cannot build this graph here")

    runner.compiled = broken
    out = runner(images)["penultimate"]  # padded to 4 for the compiled graph, cut to 3
    assert "continuing in eager mode" in caplog.text and runner.compiled is None
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_a_short_last_batch_runs_eagerly_instead_of_padded():
    runner = Runner(
        create_backbone("resnet18", "none", image_size=TINY), [("penultimate", 512)], CPU, batch_size=8
    )
    shapes = []
    runner.compiled = lambda x: shapes.append(tuple(x.shape)) or runner.module(x)
    images = torch.randint(0, 255, (8, 3, TINY, TINY), dtype=torch.uint8)
    full, tail, over_half = runner(images), runner(images[:4]), runner(images[:5])
    assert shapes == [(8, 3, TINY, TINY), (8, 3, TINY, TINY)]  # 8 as is, 5 padded; 4 eager
    assert len(tail["penultimate"]) == 4 and len(over_half["penultimate"]) == 5
    np.testing.assert_allclose(tail["penultimate"], full["penultimate"][:4], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_extraction_matches_eager(data, tmp_path):
    common = dict(image_size=TINY, num_workers=0, progress=False, batch_size=8)
    eager = xfeat.extract(data, "resnet18", cache_dir=tmp_path / "e", compile="off", **common)
    compiled = xfeat.extract(data, "resnet18", cache_dir=tmp_path / "c", compile="on", **common)
    assert read_meta(compiled).splits["train"]["compiled"] is True
    for split in ("train", "val", "test"):
        np.testing.assert_allclose(
            read_cache(compiled)[split].features, read_cache(eager)[split].features, rtol=1e-3, atol=1e-4
        )


def test_int8_is_offered_only_where_it_is_faster(data, tmp_path, monkeypatch):
    pytest.importorskip("torchao")
    with pytest.raises(ConfigError, match="not offered for resnet18"):
        xfeat.extract(
            data,
            "resnet18",
            precision="int8",
            image_size=TINY,
            cache_dir=tmp_path,
            num_workers=0,
            progress=False,
        )
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="without torchrun"):
        xfeat.extract(
            data,
            "mobilenet_v2",
            precision="int8",
            image_size=TINY,
            cache_dir=tmp_path,
            num_workers=0,
            progress=False,
        )
    assert not list(tmp_path.glob("*.h5*"))


@pytest.mark.slow
def test_int8_extraction_is_its_own_cache_entry_and_its_graph_is_kept(data, tmp_path, caplog):
    pytest.importorskip("torchao")
    common = dict(image_size=TINY, num_workers=0, progress=False, batch_size=8, cache_dir=tmp_path)
    fp32 = xfeat.extract(data, "mobilenet_v2", **common)
    with caplog.at_level(logging.INFO, logger="xfeat"):
        int8 = xfeat.extract(data, "mobilenet_v2", precision="int8", **common)
    assert int8 != fp32 and read_meta(int8).precision == "int8"
    assert read_cache(int8)["train"].features.shape == read_cache(fp32)["train"].features.shape
    first = read_cache(int8)["test"].features
    assert np.isfinite(first).all() and "int8: calibrated on" in caplog.text
    assert len(list((tmp_path / "compiled").glob("mobilenet_v2-int8-*.pt2"))) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xfeat"):  # again: the kept graph, no calibration
        xfeat.extract(data, "mobilenet_v2", precision="int8", force=True, **common)
    assert "compiled graph loaded" in caplog.text and "calibrated" not in caplog.text
    np.testing.assert_array_equal(read_cache(int8)["test"].features, first)


def test_nodes_lists_the_stages():
    result = CliRunner().invoke(cli, ["nodes", "mobilenet_v2"])
    assert result.exit_code == 0
    assert (
        "features.3 (D=24), features.6 (D=32), features.13 (D=96), penultimate (D=1280)" in result.output
    )


def test_decoding_threads_give_the_loader_s_batches_in_order(data):
    from xfeat.data import load_dataset
    from xfeat.extraction.runtime import ThreadedBatches, inference_batches, make_loader
    from xfeat.extraction.views import ViewImages

    split = load_dataset(data).splits["train"]
    images = ViewImages(split, create_backbone("resnet18", "none", image_size=TINY).preprocessing)
    reference = list(make_loader(images, batch_size=5, num_workers=0, device=CPU))
    for workers in (0, 1, 3):
        batches = inference_batches(images, batch_size=5, num_workers=workers, device=CPU)
        assert isinstance(batches, ThreadedBatches) and len(batches) == len(reference)
        for (got, errors, stats), (want, want_errors, want_stats) in zip(batches, reference):
            assert got.dtype == torch.uint8 and got.shape == want.shape
            assert got.is_contiguous(memory_format=torch.channels_last)  # as decoded (HWC)
            assert torch.equal(got, want) and list(errors) == list(want_errors)
            np.testing.assert_array_equal(stats, want_stats.numpy())
    augmented = ViewImages(split, images.preprocessing, "view1")
    assert not isinstance(
        inference_batches(augmented, batch_size=5, num_workers=1, device=CPU), ThreadedBatches
    )  # torch ops: worker processes, one thread each
    with pytest.raises(ConfigError, match="num_workers=-1"):
        inference_batches(images, batch_size=5, num_workers=-1, device=CPU)
    batches = iter(inference_batches(images, batch_size=5, num_workers=2, device=CPU))
    assert torch.equal(next(batches)[0], reference[0][0])
    batches.close()  # stopping early: the decoding threads finish and exit
    for thread in threading.enumerate():
        if thread.name.startswith("xfeat-decode"):
            thread.join(timeout=30)
    assert not [t for t in threading.enumerate() if t.name.startswith("xfeat-decode")]


class _Recorded:
    """A dataset of blank items that records which of them were decoded, in order."""

    def __init__(self, name: str, n: int, calls: list):
        self.name, self.n, self.calls = name, n, calls

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.calls.append((self.name, i))
        return torch.full((3, 2, 2), i, dtype=torch.uint8), "", np.full(6, i, np.float32)


def _soon(condition, seconds=30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_each_split_s_first_batch_is_decoded_while_the_last_batch_of_the_one_before_runs():
    from xfeat.extraction.runtime import ThreadedBatches, decode_ahead, stop_decoding

    calls = []
    first, second, third = (
        ThreadedBatches(_Recorded(name, size, calls), 4, 1)
        for name, size in [("a", 10), ("b", 10), ("c", 40)]
    )
    decode_ahead([first, second, third])
    assert _soon(lambda: ("a", 0) in calls)  # decoding before anyone iterates
    assert ("b", 0) not in calls  # the next split waits for this one's last batch
    seen = []
    for i, (images, _, _) in enumerate(first):
        seen += images[:, 0, 0, 0].tolist()
        if i == len(first) - 1:  # while the last batch of the first split runs
            assert _soon(lambda: ("b", 3) in calls)  # the second's first batch is decoded
    assert seen == list(range(10))
    assert [int(v) for batch, _, _ in second for v in batch[:, 0, 0, 0]] == list(range(10))
    # the third split, primed and never read (an error stopped the run), stops decoding
    assert _soon(lambda: ("c", 0) in calls)
    stop_decoding([first, second, third, object()])  # a DataLoader has nothing to close
    for thread in threading.enumerate():
        if thread.name.startswith("xfeat-decode"):
            thread.join(timeout=30)
    assert not [t for t in threading.enumerate() if t.name.startswith("xfeat-decode")]
    # at most the batches decoded ahead (4 of 4 images) were decoded, the rest dropped
    assert len([c for c in calls if c[0] == "c"]) <= 16
