"""Compiled graphs kept between runs (xfeat.extraction.compiled): the key covers what the code depends
on, a later run loads the package instead of compiling, a damaged package or a folder that
cannot be written never stops extraction."""

import logging
import os

import pytest
import torch
from torch import nn

from xfeat.extraction.compiled import AheadOfTime, Frozen, compile_for_inference, package_key


def tiny_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()


X = torch.randn(4, 3, 16, 16)


def test_the_key_covers_weights_shape_layout_and_structure():
    net = tiny_net()
    key = package_key(net, X)
    assert package_key(tiny_net(), X) == key  # same module, same weights
    assert package_key(tiny_net(seed=1), X) != key
    with torch.no_grad():
        changed = tiny_net()
        changed[1].running_mean[3] += 1e-6  # a buffer, not a parameter
    assert package_key(changed, X) != key
    assert package_key(net, torch.randn(8, 3, 16, 16)) != key
    assert package_key(net, X.contiguous(memory_format=torch.channels_last)) != key
    other = tiny_net()
    other[2] = nn.GELU()  # no weights, another computation
    assert package_key(other, X) != key
    assert package_key(net, X, b"calibration A") != package_key(net, X, b"calibration B")


def test_torchscript_is_left_as_it_is_and_in_memory_compiles_what_build_makes(tmp_path):
    scripted = torch.jit.script(tiny_net())
    assert compile_for_inference(scripted, tmp_path) is None
    built = []
    frozen = compile_for_inference(
        tiny_net(), tmp_path, ahead_of_time=False, build=lambda: built.append(1) or tiny_net(seed=1)
    )
    assert isinstance(frozen, Frozen) and built == [1]


def test_an_unwritable_folder_falls_back_to_compiling_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    runner = AheadOfTime(tiny_net(), blocker / "compiled", "tiny")
    with caplog.at_level(logging.WARNING):
        built = runner._build(X)
    assert isinstance(built, Frozen) and "torch.compile in memory" in caplog.text


@pytest.mark.slow
def test_a_later_run_loads_the_package_and_a_damaged_one_is_rebuilt(tmp_path, caplog):
    net = tiny_net()
    with torch.inference_mode():
        expected = net(X)
        first = AheadOfTime(net, tmp_path, "tiny")
        torch.testing.assert_close(first(X), expected, rtol=1e-5, atol=1e-6)
        assert first.path.is_file() and not first.loaded
        assert not list(tmp_path.glob("*.tmp*"))  # written under a temporary name, then moved

        again = AheadOfTime(tiny_net(), tmp_path, "tiny")
        torch.testing.assert_close(again(X), expected, rtol=1e-5, atol=1e-6)
        assert again.loaded and again.path == first.path

        first.path.write_bytes(b"not a package")
        orphan = tmp_path / "tiny-0.tmp999999999.pt2"  # left by a killed run (no such pid)
        orphan.write_bytes(b"half")
        with caplog.at_level(logging.WARNING):
            rebuilt = AheadOfTime(tiny_net(), tmp_path, "tiny")
            torch.testing.assert_close(rebuilt(X), expected, rtol=1e-5, atol=1e-6)
        assert "cannot be loaded" in caplog.text and not rebuilt.loaded
        assert not orphan.exists()
        assert oct(first.path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


@pytest.mark.slow
def test_build_runs_only_when_no_package_was_kept(tmp_path):
    """As for int8: the key is the source module's plus a salt; ``build`` (calibration and
    quantization) is skipped when an earlier run kept the package."""
    source, target = tiny_net(), tiny_net(seed=1)
    with torch.inference_mode():
        expected = target(X)
        calls = []
        first = AheadOfTime(
            source, tmp_path, "tiny-int8", salt=b"images A", build=lambda: calls.append("A") or target
        )
        torch.testing.assert_close(first(X), expected, rtol=1e-5, atol=1e-6)
        again = AheadOfTime(
            tiny_net(),
            tmp_path,
            "tiny-int8",
            salt=b"images A",
            build=lambda: calls.append("again") or target,
        )
        torch.testing.assert_close(again(X), expected, rtol=1e-5, atol=1e-6)
        assert again.loaded and calls == ["A"]
        other = AheadOfTime(
            tiny_net(),
            tmp_path,
            "tiny-int8",
            salt=b"images B",
            build=lambda: calls.append("B") or target,
        )
        other(X)
        assert not other.loaded and calls == ["A", "B"] and other.path != first.path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
