import csv
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, make_image_folder

from xfeat.cli import cli
from xfeat.errors import ConfigError, DataError
from xfeat.fitting import fit_head
from xfeat.prediction import expand_images, predict

EXTRACT = dict(image_size=TINY, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("p")
    root = make_image_folder(base / "xray", n_train=20, n_test=6, modes=("L", "JPEG"))
    result = fit_head(
        root,
        "resnet18",
        extract_options=dict(cache_dir=base / "c", **EXTRACT),
        out_dir=base / "run",
        n_boot=0,
    )
    return root, base / "run" / "head.npz", result


def test_predict_matches_the_cached_pipeline(trained):
    root, head_path, result = trained
    rows = predict(head_path, [root / "test"], num_workers=0, progress=False)
    ids, labels, proba = result.predictions["test"]
    by_id = {i: p for i, p in zip(ids, proba)}
    assert len(rows) == len(ids)
    for row in rows:
        rel = "test/" + row["path"].split("/test/", 1)[1]
        np.testing.assert_allclose([row["p_NORMAL"], row["p_PNEUMONIA"]], by_id[rel], atol=1e-4)
        threshold = result.record.threshold.value
        assert row["predicted"] == ("PNEUMONIA" if row["p_PNEUMONIA"] >= threshold else "NORMAL")


def test_unreadable_image_is_reported_not_fatal(trained, tmp_path):
    root, head_path, _ = trained
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    good = next((root / "test" / "NORMAL").iterdir())
    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "predict",
            "--head",
            str(head_path),
            str(good),
            str(bad),
            "--out",
            str(out),
            "--num-workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1 unreadable" in result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(good), str(bad)]
    assert rows[0]["predicted"] in ("NORMAL", "PNEUMONIA") and rows[0]["error"] == ""
    assert rows[1]["predicted"] == "" and "broken.png" in rows[1]["error"]


def test_missing_inputs(trained, tmp_path):
    _, head_path, _ = trained
    with pytest.raises(DataError, match="no such image file or folder"):
        expand_images([tmp_path / "nothing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        expand_images([tmp_path / "empty"])
    with pytest.raises(ValueError, match="not an xfeat head"):
        (tmp_path / "h.npz").write_text("x")
        predict(tmp_path / "h.npz", [tmp_path])


def test_moved_weights_file(tmp_path):
    import torch
    import torchvision

    torch.manual_seed(0)
    state = {
        k: v
        for k, v in torchvision.models.mobilenet_v2().state_dict().items()
        if not k.startswith("classifier")
    }
    weights = tmp_path / "w.pth"
    torch.save(state, weights)
    root = make_image_folder(tmp_path / "xray", n_train=8, n_test=2)
    fit_head(
        root,
        "mobilenet_v2",
        weights=weights,
        out_dir=tmp_path / "run",
        n_boot=0,
        extract_options=dict(cache_dir=tmp_path / "c", **EXTRACT),
    )
    moved = tmp_path / "moved.pth"
    shutil.move(weights, moved)
    head = tmp_path / "run" / "head.npz"
    with pytest.raises(ConfigError, match="pass its current location with --weights"):
        predict(head, [root / "test"], progress=False)
    rows = predict(head, [root / "test"], weights=moved, num_workers=0, progress=False)
    assert len(rows) == 4 and all(r["predicted"] for r in rows)
    torch.save({k: v + 1 for k, v in state.items()}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="are not the weights the head was trained with"):
        predict(head, [root / "test"], weights=tmp_path / "other.pth", progress=False)
