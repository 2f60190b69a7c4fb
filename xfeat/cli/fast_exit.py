"""Ending the ``xfeat`` process once its command has finished, without the interpreter's teardown
where nothing can be lost by skipping it.

When a Python process ends normally, CPython tears down every imported module and collects
every object before it exits. After a cache-hit ``fit-head`` that is 0.2-0.3 s of the command's
2 s on a 2-core CPU (scipy's and scikit-learn's thousands of objects), for no result: the
operating system frees the memory anyway. :func:`leave` skips that teardown when it is safe:
the exit handlers every library registered (``atexit``: logging, joblib and multiprocessing
clean-up, temporary folders) still run, the output streams are flushed, and the process then
ends with :func:`os._exit` and the command's exit status. It takes the normal exit whenever
something could depend on the teardown:

- torch was imported (its own clean-up: CUDA, process groups; such a command runs for seconds
  or minutes anyway);
- a thread other than the main one is alive and not a daemon (the normal exit would wait for
  it);
- an HDF5 file is still open (HDF5 flushes and closes it in its own C exit handler).

What the teardown would have done and this skips: collecting objects, so a Python file object
left open would not be flushed; xfeat writes every file in a ``with`` block or through
:func:`xfeat.files.atomic_write`, which close them before the command returns.

This is the console entry point's business only: the Python API, in a notebook or a script,
never ends the process.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def teardown_needed() -> bool:
    """True when the process must end through the interpreter's normal exit (see above)."""
    if "torch" in sys.modules:
        return True
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return True
    h5f = sys.modules.get("h5py.h5f")
    return h5f is not None and h5f.get_obj_count(h5f.OBJ_ALL, h5f.OBJ_FILE) > 0


def leave(status) -> None:
    """End the process with ``status`` (a :class:`SystemExit` code) without the module
    teardown, when :func:`teardown_needed` says that is safe; otherwise return, and the caller
    exits normally. Exit handlers run and output streams are flushed first either way."""
    if not (status is None or isinstance(status, int)) or teardown_needed():
        return
    atexit._run_exitfuncs()  # what the normal exit runs first; each handler's error is printed
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`xfeat ... | head`), a closed stream
            pass
    os._exit(status or 0)
