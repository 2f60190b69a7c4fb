"""``xfeat models``, ``extract`` and ``info``: the backbones and the feature cache."""

from __future__ import annotations

import json

import click

from xfeat.cli.app import api_errors, api_imports, cli
from xfeat.cli.options import (
    data_options,
    data_spec,
    default,
    feature_options,
    json_option,
    model_options,
    run_options,
)
from xfeat.config import COMPILE_CHOICES, FEATURE_DTYPES, ExtractConfig


@cli.command("models")
@json_option
@api_errors
def models_cmd(as_json):
    """List every backbone: feature dimension, parameters, torchvision weights."""
    with api_imports():
        from xfeat.backbones import describe_backbones

    rows = describe_backbones()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'model':<22} {'D':>5} {'params':>8}  weights")
    for r in rows:
        source = "" if r["source"] == "torchvision" else f"  [{r['source']}]"
        if r["feature_dim"] is None:  # a family named by a pattern
            click.echo(f"{r['name']:<22} {'-':>5} {'-':>8}  {', '.join(r['weights'])}{source}")
            continue
        click.echo(
            f"{r['name']:<22} {r['feature_dim']:>5} {r['params_m']:>7.1f}M  "
            f"{', '.join(r['weights'])}{source}"
        )
    click.echo(
        "Also: timm:NAME (pip install 'xfeat[timm]'), torchscript:PATH; hf:NAME_OR_DIR "
        "(pip install 'xfeat[hf]': a transformers image tower, e.g. hf:microsoft/rad-dino or "
        "hf:facebook/dinov2-small, --pool cls|mean|cls+mean|embed)."
    )


@cli.command("weights")
@json_option
@api_errors
def weights_cmd(as_json):
    """List the pretrained weights available offline, where they are, and how to add more."""
    with api_imports():
        from xfeat.backbones import offline_weights

    found = offline_weights()
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if found["files"]:
        click.echo("Available offline:")
        for f in found["files"]:
            check = {True: "verified", False: "WRONG HASH", None: "unchecked"}[f["verified"]]
            click.echo(
                f"  {f['model'] or '?':<18} {f['weights'] or '?':<36} sha256 "
                f"{f['sha256'][:12]} ({check})\n      {f['source']}: {f['path']}"
            )
    else:
        click.echo("No pretrained weights on this machine (only --weights none works offline).")
    if found.get("hf_cache"):
        click.echo("In the Hugging Face cache (--model hf:REPO --weights DEFAULT works offline):")
        for r in found["hf_cache"]:
            kind = "safetensors" if r["safetensors"] else "no safetensors"
            click.echo(f"  {r['repo']:<40} {r['size_mb']:>8.1f} MB  {kind}\n      {r['path']}")
    missing = [p for p in found["packages"] if not p["installed"]]
    click.echo(
        "\nTo add more:\n"
        "  - pass a state-dict file: --weights /path/to/file.pth (timm:NAME: its "
        "model.safetensors)\n"
        "  - copy torchvision's file (its URL's name, e.g. resnet50-11ad3fa6.pth) to "
        f"{found['checkpoints_dir']}\n"
        "  - hf:REPO: `hf download REPO` once on a connected machine (into the Hugging Face "
        "cache), or save a model with save_pretrained and pass --model hf:DIR\n"
        + "".join(f"  - {p['pip']}   ({p['license']})\n" for p in missing)
    )


@cli.command("extract")
@data_options
@model_options
@run_options
@click.option(
    "--feature-dtype",
    type=click.Choice(FEATURE_DTYPES),
    default=default(ExtractConfig, "feature_dtype"),
    show_default=True,
    help="Stored feature precision.",
)
@feature_options
@click.option(
    "--compile",
    type=click.Choice(COMPILE_CHOICES),
    default="auto",
    show_default=True,
    help="Compile the backbone ahead of time, once (kept in --cache-dir/compiled: "
    "later runs load it in under a second): auto compiles from 3,000 images, "
    "where the first compilation (15-60 s) pays for itself.",
)
@click.option("--skip-bad", is_flag=True, help="Record and skip unreadable images.")
@click.option("--force", is_flag=True, help="Recompute even if a complete cache entry exists.")
@json_option
@click.pass_context
@api_errors
def extract_cmd(ctx, as_json, **options):
    """Run a backbone once over every split and cache the features (HDF5)."""
    with api_imports():
        from xfeat.cache import read_meta
        from xfeat.extraction.entry import extract

    data = data_spec(options.pop("data"), options)
    path = extract(data, progress=ctx.obj["progress"], **options)
    if not ctx.obj["report"]:
        return
    meta = read_meta(path)
    if as_json:
        click.echo(json.dumps({"path": str(path), **meta.to_dict()}, indent=2))
        return
    click.echo(describe_cache(path, meta))


@cli.command("info")
@click.argument("cache_file", type=click.Path(exists=True, dir_okay=False))
@json_option
@api_errors
def info_cmd(cache_file, as_json):
    """Show what a feature cache file holds and how it was made."""
    with api_imports():
        from xfeat.cache import read_meta

    meta = read_meta(cache_file)
    click.echo(json.dumps(meta.to_dict(), indent=2) if as_json else describe_cache(cache_file, meta))


def describe_cache(path, meta) -> str:
    w = meta.weights
    weights = w.id if w.kind != "file" else f"{w.id} (sha256 {w.sha256[:12]})"
    p = meta.preprocessing
    lines = [
        f"cache: {path}",
        f"  model {meta.model} ({meta.feature_dtype}"
        f"{', ' + meta.precision if meta.precision != 'fp32' else ''}), "
        f"weights {weights}",
        "  blocks: " + ", ".join(f"{name} (D={dim})" for name, dim in meta.blocks),
        f"  dataset {meta.dataset.name} ({meta.dataset.source}), classes "
        f"{', '.join(meta.class_names)}; val {meta.split.get('val')}",
        f"  preprocessing: resize {p['resize_size']} ({p.get('resize_mode', 'crop')}), "
        f"crop {p['crop_size']}, "
        f"{p['interpolation']}"
        + (", EXIF orientation applied" if p.get("exif_transpose") else "")
        + (f", DICOM window {p['dicom_window']}" if "dicom_window" in p else "")
        + (f", DICOM frame {p['dicom_frame']}" if "dicom_frame" in p else ""),
    ]
    profile = meta.splits.get("train", {}).get("input_profile")
    if profile:
        w, h, a = profile["width"], profile["height"], profile["aspect"]
        lines.append(
            f"  train images: {w['p0']:.0f}-{w['p100']:.0f} x {h['p0']:.0f}-{h['p100']:.0f} px, "
            f"aspect {a['p0']:.2f}-{a['p100']:.2f}; "
            + ", ".join(f"{m} {n}" for m, n in profile["modes"].items())
            + "; "
            + ", ".join(f"{b}-bit {n}" for b, n in profile["bit_depths"].items())
        )
    for split, s in meta.splits.items():
        rate = s.get("images_per_second")
        lines.append(
            f"  {split:<14} {s['n']:>6} images"
            + (f", {s['seconds_total']:.1f} s, {rate:.1f} img/s" if rate else "")
        )
    return "\n".join(lines)


@cli.command("nodes")
@click.argument("model")
@click.option("--image-size", type=int, default=224, show_default=True)
@json_option
@api_errors
def nodes_cmd(model, image_size, as_json):
    """The stage nodes (--layers stages) and every node name of a torchvision model."""
    with api_imports():
        from xfeat.extraction.blocks import describe_nodes

    info = describe_nodes(model, image_size)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(
        f"{model}: --layers stages caches "
        + ", ".join(f"{name} (D={dim})" for name, dim in info["blocks_for_stages"])
    )
    click.echo("nodes for --layers NODE,NODE: " + " ".join(info["nodes"]))
