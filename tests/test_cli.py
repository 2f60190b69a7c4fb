import json

from click.testing import CliRunner
from conftest import TINY

from xfeat.cli import cli


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def test_models_lists_dims_as_json():
    result = _run("models", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["resnet18"]["feature_dim"] == 512 and rows["resnet50"]["feature_dim"] == 2048
    assert "IMAGENET1K_V1" in rows["resnet18"]["weights"]


def test_extract_then_reuse_then_info(image_folder, cache_dir):
    args = [
        "-q",
        "extract",
        "--data",
        image_folder,
        "--weights",
        "none",
        "--image-size",
        TINY,
        "--num-workers",
        0,
        "--cache-dir",
        cache_dir,
    ]
    first = _run(*args, "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)  # warnings go to stderr
    assert summary["model"] == "resnet18" and summary["splits"]["test"]["n"] == 12
    second = CliRunner().invoke(cli, [str(a) for a in args[1:]])
    assert second.exit_code == 0 and "cache hit" in second.stderr
    assert summary["path"] in second.output
    info = _run("info", summary["path"])
    assert info.exit_code == 0 and "model resnet18 (float32)" in info.output
    assert "blocks: penultimate (D=512)" in info.output


def test_bad_input_is_a_one_line_error(tmp_path, image_folder):
    result = _run("extract", "--data", tmp_path / "missing")
    assert (
        result.exit_code == 1 and "Error: --data" in result.output and "no such folder" in result.output
    )
    result = _run("extract", "--data", image_folder, "--model", "resnet1")
    assert result.exit_code == 1 and "unknown model 'resnet1'" in result.output
    result = _run("extract", "--data", image_folder, "--weights", "nofile.pth")
    assert result.exit_code == 1 and "no such file" in result.output


def test_fit_head_json_and_table(image_folder, cache_dir, tmp_path):
    common = [
        "-q",
        "fit-head",
        "--data",
        image_folder,
        "--weights",
        "none",
        "--image-size",
        TINY,
        "--num-workers",
        0,
        "--cache-dir",
        cache_dir,
        "--n-boot",
        50,
    ]
    result = _run(*common, "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["head"] == "logreg" and record["run_dir"] == str(tmp_path / "run")
    table = _run(*common, "--head", "knn", "--threshold", "0.5", "--out", tmp_path / "knn")
    assert table.exit_code == 0 and "head knn" in table.output and "chosen on val: k=" in table.output
    by_cache = _run(
        "-q",
        "fit-head",
        "--cache",
        record["cache"]["path"],
        "--C",
        0.1,
        "--out",
        tmp_path / "c",
        "--n-boot",
        0,
    )
    assert by_cache.exit_code == 0 and "C=0.1" in by_cache.output


def test_fit_head_needs_data_or_cache():
    result = CliRunner().invoke(cli, ["fit-head"])
    assert result.exit_code == 2 and "give --data" in result.output


def test_analyze_command(image_folder, cache_dir, tmp_path):
    result = _run(
        "-q",
        "analyze",
        "--data",
        image_folder,
        "--weights",
        "none",
        "--image-size",
        TINY,
        "--num-workers",
        0,
        "--cache-dir",
        cache_dir,
        "--n-boot",
        50,
        "--folds",
        3,
        "--out",
        tmp_path / "an",
    )
    assert result.exit_code == 0, result.output
    assert "xfeat analysis:" in result.output and (tmp_path / "an" / "analysis.md").is_file()
    assert json.loads((tmp_path / "an" / "analysis.json").read_text())["headlines"]


def test_fit_head_rejects_options_of_another_head(image_folder):
    result = CliRunner().invoke(
        cli, ["fit-head", "--data", str(image_folder), "--head", "knn", "--C", "1"]
    )
    assert result.exit_code == 2 and "--C do(es) not apply to --head knn" in result.output


def test_an_empty_weights_value_says_where_it_comes_from(tmp_path):
    """`-w "$(hf download ...)"` offline passes an empty value: refused before any work, naming
    the likely cause."""
    for command in (
        ["fit-head", "--data", str(tmp_path), "--model", "resnet18"],
        ["compare", "--data", str(tmp_path)],
    ):
        result = CliRunner().invoke(cli, [*command, "--weights", ""])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "is empty" in result.output and "hf download" in result.output
