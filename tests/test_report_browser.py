"""The comparison report as a reader sees it: report.html in a real headless Chromium.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on file descriptors 3 and 4), so the standard library is
enough. Checked in place, after moving the report folder, and after a zip round trip: every
``<img>`` is decoded and laid out, no image link is absolute, the page logs no error, the
verdict is the first section and starts on the first screen, and a screenshot of that screen
is written and is not blank.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_image_folder
from PIL import Image

from xfeat.comparison import compare

pytestmark = pytest.mark.integration

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
# Headless, and nothing that would reach for the network (this machine has none).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)
VIEWPORT = (1280, 1000)  # a laptop screen: what a reader sees first

_IMAGES_JS = """JSON.stringify(Array.from(document.images, im => ({
    src: im.getAttribute('src'), complete: im.complete, naturalWidth: im.naturalWidth,
    naturalHeight: im.naturalHeight, width: im.getBoundingClientRect().width})))"""
_SECTIONS_JS = """JSON.stringify(Array.from(document.querySelectorAll('h2'), h => {
    let bottom = h.getBoundingClientRect().bottom, right = 0;
    for (let e = h.nextElementSibling; e && e.tagName !== 'H2'; e = e.nextElementSibling) {
        bottom = Math.max(bottom, e.getBoundingClientRect().bottom);
        right = Math.max(right, e.scrollWidth > e.clientWidth ? Infinity : 0);
    }
    return {text: h.textContent, top: h.getBoundingClientRect().top, bottom: bottom,
            overflows: right > 0};
}))"""


def find_chromium():
    for name in (os.environ.get("XFEAT_CHROMIUM"), *CHROMIUM_NAMES):
        path = name and shutil.which(name)
        if path:
            return path
    return None


class DevToolsPipe:
    """A headless Chromium and one page, over the DevTools protocol on a pipe."""

    def __init__(self, executable: str, profile: Path, timeout: float = 60):
        self.timeout, self._next_id, self._buffer, self.events = timeout, 0, b"", []
        to_browser, from_browser = os.pipe(), os.pipe()
        # Above 4, so bash's `3<&N 4>&M` cannot overwrite one end with the other.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser[0], from_browser[1])]
        for fd in (*to_browser, *from_browser):
            if fd not in (to_browser[1], from_browser[0]):
                os.close(fd)
        self._write, self._read = to_browser[1], from_browser[0]
        self.log = open(profile.with_suffix(".log"), "w")
        self.proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$@" 3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-',
                "bash",
                executable,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            pass_fds=ends,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )
        for fd in ends:
            os.close(fd)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=VIEWPORT[0],
            height=VIEWPORT[1],
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str) -> dict:
        seen = next((e for e in self.events if e.get("method") == event), None)
        while seen is None:
            reply = self._receive()
            self.events.append(reply)
            seen = reply if reply.get("method") == event else None
        return seen

    def _receive(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"no answer from Chromium in {self.timeout} s; see {self.log.name}")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited ({self.proc.poll()}); see {self.log.name}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, path: Path) -> dict:
        """Load ``path`` and return what a reader gets: images, errors, a screenshot."""
        self.events.clear()
        self.call("Page.navigate", session=True, url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")  # <img> elements delay the load event
        images, sections = (
            json.loads(
                self.call("Runtime.evaluate", session=True, expression=js, returnByValue=True)["result"][
                    "value"
                ]
            )
            for js in (_IMAGES_JS, _SECTIONS_JS)
        )
        shot = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        return {
            "images": images,
            "sections": sections,
            "errors": _errors(self.events),
            "screenshot": base64.b64decode(shot),
        }

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)
        self.log.close()


def _errors(events: list) -> list:
    """Console errors, uncaught exceptions and failed loads (Log: network, security...)."""
    out = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            out.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            out.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            out.append(f"{entry['text']} {entry.get('url', '')}".strip())
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            "no Chromium found (tried $XFEAT_CHROMIUM, "
            + ", ".join(CHROMIUM_NAMES)
            + "); `apt-get install -y chromium` (.ci/run does it when run as root)"
        )
    chrome = DevToolsPipe(executable, tmp_path_factory.mktemp("chromium") / "profile")
    yield chrome
    chrome.close()


def _compare(out: Path):
    """A real comparison (beside ``out``: its data, weights and cache): every mode, every
    figure, a model from weights in a file and one from random weights."""
    import torch
    import torchvision

    data, weights = out.parent / "xray", out.parent / "r18.pt"
    if not data.exists():
        make_image_folder(data, n_train=20, n_test=8)
    if not weights.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), weights)
    compare(
        data,
        ["resnet18", "mobilenet_v3_small"],
        weights=f"resnet18={weights}",
        out_dir=out,
        cache_dir=out.parent / "cache",
        epochs=2,
        image_size=TINY,
        num_workers=0,
        n_boot=50,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return _compare(tmp_path_factory.mktemp("report") / "cmp")


def _check_as_a_reader(browser, folder: Path, screenshot: Path) -> dict:
    page = browser.open(folder / "report.html")
    screenshot.write_bytes(page["screenshot"])
    images = page["images"]
    srcs = sorted(im["src"] for im in images)
    assert {"pareto.png", "roc.png", "confusion.png"} <= set(srcs), srcs
    assert any(s.endswith("curves.png") for s in srcs), srcs
    for im in images:
        assert not (im["src"].startswith("/") or "://" in im["src"]), f"absolute link {im['src']}"
        assert im["complete"] and im["naturalWidth"] > 0 and im["naturalHeight"] > 0, (
            f"{im['src']} does not load in {folder}"
        )
        assert im["width"] > 0, f"{im['src']} is not laid out"
    assert page["errors"] == [], page["errors"]
    verdict = page["sections"][0]
    assert verdict["text"] == "Verdict" and verdict["top"] < VIEWPORT[1] / 3, page["sections"]
    shot = np.asarray(Image.open(io.BytesIO(page["screenshot"])).convert("L"))
    assert shot.shape == VIEWPORT[::-1] and shot.std() > 5, "the screenshot is blank"
    return page


def test_report_shows_every_figure_in_a_browser(browser, report, tmp_path):
    page = _check_as_a_reader(browser, report, tmp_path / "report.png")
    assert len(page["images"]) >= 9  # pareto, roc, confusion, curves of frozen/full/lp-ft x 2
    # The verdict, then the timings: both read on the first screen of a laptop, in full.
    timings = page["sections"][1]
    assert [s["text"] for s in page["sections"][:3]] == ["Verdict", "Time", "Results"]
    assert timings["bottom"] < VIEWPORT[1] and not timings["overflows"], page["sections"]


@contextlib.contextmanager
def _moved(folder: Path, to: Path):
    """``folder`` lives at ``to`` meanwhile: a link to the old place would not load."""
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(folder, to)
    try:
        yield to
    finally:
        shutil.move(to, folder)


def test_moved_report_still_shows_its_figures(browser, report, tmp_path):
    with _moved(report, tmp_path / "elsewhere" / "my report") as moved:
        _check_as_a_reader(browser, moved, tmp_path / "moved.png")


def test_zipped_report_still_shows_its_figures(browser, report, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "report"), "zip", root_dir=report)
    shutil.unpack_archive(archive, tmp_path / "unzipped")
    with _moved(report, tmp_path / "away"):
        _check_as_a_reader(browser, tmp_path / "unzipped", tmp_path / "unzipped.png")


def test_report_of_a_copied_comparison_shows_its_own_figures(browser, report, tmp_path):
    """Copy a comparison folder and run compare again in the copy (every run is reused):
    its report must not point back into the original."""
    copy = _compare(shutil.copytree(report, report.parent / "copy"))
    try:
        with _moved(report, tmp_path / "away"):
            _check_as_a_reader(browser, copy, tmp_path / "copy.png")
    finally:
        shutil.rmtree(copy)


def test_a_missing_figure_is_caught(browser, report, tmp_path):
    """The checks above can fail: a report folder without roc.png is reported."""
    broken = shutil.copytree(report, tmp_path / "broken")
    (broken / "roc.png").unlink()
    with pytest.raises(AssertionError, match="roc.png does not load"):
        _check_as_a_reader(browser, broken, tmp_path / "broken.png")
