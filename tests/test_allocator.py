"""glibc's malloc keeping freed memory during a pass: it takes effect (no page faults for a
tensor allocated again), the defaults come back after the pass, and an allocator the user
chose is left alone."""

import os
import subprocess
import sys

import pytest

from xfeat.extraction import allocator

# Page faults of a 64 MiB tensor, filled and freed 20 times, summed over the last 5 times:
# with malloc's defaults the kernel maps and zero-fills its 16,384 pages again every time;
# with freed memory kept the heap settles after a few rounds and its pages are reused. Then
# the memory held after freeing eight such tensors: kept inside the block, returned after it.
FAULTS = """
import resource, torch
from xfeat.extraction.allocator import freed_memory_kept
torch.set_num_threads(1)

def faults():
    counts = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 * 2**20, dtype=torch.float32)
        t.fill_(1.0)
        del t
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(counts[-5:])

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024

default = faults()
with freed_memory_kept() as outer:
    with freed_memory_kept() as inner:
        pass
    kept = faults()  # still kept: only the outermost block restores
    tensors = [torch.ones(16 * 2**20) for _ in range(8)]
    del tensors
    held_inside = rss_mib()
held_after = rss_mib()
print(outer, inner, default, kept, held_inside - held_after)
"""


def clean_env() -> dict:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", allocator.OPT_OUT) and not k.startswith("MALLOC_")
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_inside_the_block_and_returned_after_it():
    out = subprocess.run(
        [sys.executable, "-c", FAULTS], capture_output=True, text=True, env=clean_env(), check=True
    )
    outer, inner, default, kept, returned_mib = out.stdout.split()
    assert outer == inner == "True"
    assert int(default) > 5 * 10_000  # 16,384 pages of 4 KiB each time
    assert int(kept) < 500
    assert int(returned_mib) > 400  # of the 512 MiB freed inside the block


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"XFEAT_MALLOC": "system"}, "XFEAT_MALLOC=system"),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "preloaded"),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, "environment"),
        ({"MALLOC_ARENA_MAX_": "2"}, "environment"),
    ],
)
def test_an_allocator_the_user_chose_is_left_alone(monkeypatch, env, reason):
    for key in ("LD_PRELOAD", "GLIBC_TUNABLES", allocator.OPT_OUT, "MALLOC_ARENA_MAX_"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if sys.platform.startswith("linux"):
        assert reason in allocator._user_choice()
    with allocator.freed_memory_kept() as active:
        assert active is False
    assert allocator._state == {"depth": 0, "active": False}


def test_extraction_restores_the_defaults_even_when_it_fails(tmp_path):
    from conftest import TINY, make_image_folder

    import xfeat
    from xfeat.errors import ImageReadError

    data = make_image_folder(tmp_path / "xray", n_train=4, n_test=2)
    bad = sorted((data / "test" / "NORMAL").iterdir())[0]
    bad.write_bytes(b"not an image")  # fails inside the extraction pass
    with pytest.raises(ImageReadError, match=bad.name):
        xfeat.extract(
            data,
            "resnet18",
            image_size=TINY,
            cache_dir=tmp_path / "cache",
            num_workers=0,
            progress=False,
        )
    assert allocator._state == {"depth": 0, "active": False}
