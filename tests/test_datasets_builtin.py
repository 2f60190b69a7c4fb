import hashlib
import http.server
import threading
from functools import partial

import pytest
from conftest import make_npz

from xfeat.data import builtin as datasets_builtin
from xfeat.data import load_dataset
from xfeat.data.builtin import DownloadError, download


@pytest.fixture
def local_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def tiny_builtin(local_server, monkeypatch):
    www, url = local_server
    npz = make_npz(www / "tinymnist.npz", n=(60, 60, 10))
    md5 = hashlib.md5(npz.read_bytes()).hexdigest()
    monkeypatch.setitem(datasets_builtin.BUILTIN, "tinymnist", ("tinymnist.npz", md5, ["a", "b"]))
    return www, url


def test_download_verifies_checksum_and_is_done_once(tiny_builtin, tmp_path):
    www, url = tiny_builtin
    path = download("tinymnist", cache_dir=tmp_path / "cache", base_url=url)
    assert path == tmp_path / "cache" / "datasets" / "tinymnist.npz" and path.is_file()
    (www / "tinymnist.npz").unlink()  # a second call must not touch the network
    assert download("tinymnist", cache_dir=tmp_path / "cache", base_url=url) == path


def test_builtin_name_loads_through_load_dataset(tiny_builtin, tmp_path, monkeypatch):
    _, url = tiny_builtin
    monkeypatch.setenv("XFEAT_DATASETS_URL", url)
    ds = load_dataset("tinymnist", cache_dir=tmp_path / "cache")
    assert ds.name == "tinymnist" and ds.class_names == ["a", "b"]
    assert [len(s) for s in ds.splits.values()] == [60, 60, 10]


def test_checksum_mismatch_leaves_nothing(tiny_builtin, tmp_path, monkeypatch):
    _, url = tiny_builtin
    monkeypatch.setitem(datasets_builtin.BUILTIN, "tinymnist", ("tinymnist.npz", "0" * 32, ["a"]))
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download("tinymnist", cache_dir=tmp_path / "cache", base_url=url)
    assert not list((tmp_path / "cache" / "datasets").iterdir())


def test_offline_is_a_clear_error(tmp_path):
    with pytest.raises(
        DownloadError,
        match=r"could not download built-in dataset "
        r"'pneumoniamnist'.*offline.*--data /path/to/file.npz",
    ):
        download("pneumoniamnist", cache_dir=tmp_path, base_url="http://127.0.0.1:9", timeout=5)


def test_registry_has_medmnist_size_variants():
    assert {"pneumoniamnist", "pneumoniamnist_64", "pneumoniamnist_128", "pneumoniamnist_224"} <= set(
        datasets_builtin.names()
    )
    with pytest.raises(ValueError, match="unknown built-in dataset 'x'"):
        download("x")
