"""The console entry point ends the process without the interpreter's teardown only where nothing
can be lost: exit handlers run, output arrives whole, the status is the command's, and torch, a
live thread or an open HDF5 file take the normal exit."""

import subprocess
import sys

import pytest
from conftest import child_env

import xfeat

# A child running the console entry point. A module global whose __del__ prints shows whether
# the interpreter's teardown ran; an exit handler shows that atexit handlers still run.
# ``SETUP`` is replaced by the state the test puts the process in before the command.
CHILD = """
import atexit, sys

class Teardown:
    def __del__(self):
        sys.stdout.write("module teardown\\n")

kept = Teardown()
atexit.register(lambda: sys.stdout.write("exit handler ran\\n"))
SETUP
from xfeat.cli import main
main(sys.argv[1:])
"""


def _console(*args, setup="pass"):
    return subprocess.run(
        [sys.executable, "-c", CHILD.replace("SETUP", setup), *map(str, args)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )


def test_a_finished_command_skips_the_teardown_yet_runs_exit_handlers_and_flushes():
    done = _console("--version")
    assert done.returncode == 0, done.stderr
    # stdout is a pipe, so block-buffered: both lines arrive only if it was flushed
    assert done.stdout.splitlines() == [f"xfeat, version {xfeat.__version__}", "exit handler ran"]


def test_the_exit_status_is_the_commands():
    usage = _console("fit-head", "--no-such-option")
    assert usage.returncode == 2 and "No such option" in usage.stderr
    assert "module teardown" not in usage.stdout and "exit handler ran" in usage.stdout
    missing = _console("info", "/no/such/cache.h5")
    assert missing.returncode != 0 and "/no/such/cache.h5" in missing.stderr
    assert "exit handler ran" in missing.stdout


@pytest.mark.parametrize(
    "setup",
    [
        "import torch",
        "import threading, time; threading.Thread(target=time.sleep, args=(0.5,)).start()",
        "import h5py; f = h5py.File(TMP, 'w')",
    ],
    ids=["torch imported", "a live thread", "an open HDF5 file"],
)
def test_torch_a_live_thread_or_an_open_hdf5_file_take_the_normal_exit(setup, tmp_path):
    done = _console("--version", setup=setup.replace("TMP", repr(str(tmp_path / "open.h5"))))
    assert done.returncode == 0, done.stderr
    assert "exit handler ran" in done.stdout and "module teardown" in done.stdout


GC_PROBE = """
import gc
seen = {}
def probe(event, args):
    if event == "import" and args[0] == "xfeat.cache.read":  # imported by the command itself
        seen.setdefault("during", gc.isenabled())
sys.addaudithook(probe)
atexit.register(lambda: sys.stdout.write(
    f"imports {seen.get('during')} after {gc.isenabled()} frozen {gc.get_freeze_count() > 0}\\n"))
"""


def test_the_commands_imports_run_with_the_collector_paused_and_it_resumes_after(tmp_path):
    not_a_cache = tmp_path / "notes.h5"
    not_a_cache.write_text("not HDF5")
    done = _console("info", not_a_cache, setup=GC_PROBE)
    assert done.returncode == 1 and "notes.h5" in done.stderr  # the command ran past its imports
    assert "imports False after True frozen True" in done.stdout


def test_in_process_the_collector_is_left_as_it_was(tmp_path):
    import gc

    from click.testing import CliRunner

    from xfeat.cli import cli

    not_a_cache = tmp_path / "notes.h5"
    not_a_cache.write_text("not HDF5")
    frozen = gc.get_freeze_count()
    result = CliRunner().invoke(cli, ["info", str(not_a_cache)])
    assert result.exit_code == 1 and "notes.h5" in result.output
    assert gc.isenabled() and gc.get_freeze_count() == frozen
