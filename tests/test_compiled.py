"""Compiled graphs kept between runs (xfeat.compiled): the key covers what the code depends
on, a later run loads the package instead of compiling, a damaged package or a folder that
cannot be written never stops extraction."""
import logging
import os

import pytest
import torch
from torch import nn

from xfeat.compiled import AheadOfTime, Frozen, compile_for_inference, package_key


def tiny_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


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


def test_torchscript_is_left_as_it_is_and_int8_uses_freezing(tmp_path):
    scripted = torch.jit.script(tiny_net())
    assert compile_for_inference(scripted, tmp_path) is None
    assert isinstance(compile_for_inference(tiny_net(), tmp_path, ahead_of_time=False), Frozen)


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
