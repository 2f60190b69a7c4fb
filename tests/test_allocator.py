"""glibc's malloc keeping freed memory: it takes effect (no page faults for a tensor allocated
again), and it stays out of the way of an allocator the user chose."""
import os
import subprocess
import sys

import pytest

from xfeat import allocator

# Page faults of a 64 MiB tensor, filled and freed 20 times, over the last 5 times: with the
# default malloc the kernel maps and zero-fills its 16,384 pages again every time; with freed
# memory kept the heap settles after a few rounds and its pages are reused.
FAULTS = """
import resource, sys, torch
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    from xfeat.allocator import keep_freed_memory
    assert keep_freed_memory()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20, dtype=torch.float32)
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-5:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_freed_memory_is_reused_without_page_faults(mode):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", allocator.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True,
                         text=True, env=env, check=True)
    faults = int(out.stdout.split()[-1])
    if mode == "keep":
        assert faults < 500
    else:
        assert faults > 5 * 10_000  # 16,384 pages of 4 KiB each time


@pytest.mark.parametrize("env, reason", [
    ({"XFEAT_MALLOC": "system"}, "XFEAT_MALLOC=system"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "preloaded"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, "environment"),
    ({"MALLOC_ARENA_MAX_": "2"}, "environment"),
])
def test_an_allocator_the_user_chose_is_left_alone(monkeypatch, env, reason):
    for key in ("LD_PRELOAD", "GLIBC_TUNABLES", allocator.OPT_OUT, "MALLOC_ARENA_MAX_"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if sys.platform.startswith("linux"):
        assert reason in allocator._user_choice()
    monkeypatch.setattr(allocator, "_state", {})
    assert allocator.keep_freed_memory() is False


def test_the_command_line_keeps_freed_memory_from_the_start():
    code = ("import sys; from xfeat.cli import cli; from xfeat import allocator\n"
            "try:\n    cli(['info', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(allocator._state)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", allocator.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip().endswith(str({"active": sys.platform.startswith("linux")}))
