"""``analyze()``: read the inputs, run every diagnosis, then write the report in one go."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from xfeat import cache as cache_io
from xfeat.analysis.adaptation import adaptation_section
from xfeat.analysis.balance import balance_section
from xfeat.analysis.calibration import calibration_section
from xfeat.analysis.duplicates import duplicates_section, hash_images
from xfeat.analysis.gaps import gaps_section
from xfeat.analysis.label_noise import label_noise_section
from xfeat.analysis.labels import label_section, not_applicable
from xfeat.analysis.probe import fit_or_reuse_probe
from xfeat.analysis.shift import DOMAIN_C, MAX_TRAIN_PER_TEST, shift_section
from xfeat.data.dicom import DicomOptions
from xfeat.errors import ConfigError
from xfeat.extraction.features import load_features
from xfeat.files import jsonable, make_dirs, write_csv, write_json, write_text
from xfeat.report.analysis_figures import save_figure
from xfeat.runs.folders import default_run_dir

logger = logging.getLogger(__name__)

SCHEMA = "xfeat-analysis/1"
# The report runs in reading order (1-7); its headlines put first what most often explains
# a test gap: leaked images, then shift, then priors.
HEADLINE_ORDER = (
    "duplicates",
    "shift",
    "label_balance",
    "class_balance",
    "label_noise",
    "overfitting",
    "calibration",
    "adaptation",
)


@dataclass
class Analysis:
    """The analysis of one dataset: ``record`` (as in ``analysis.json``) and where it went."""

    record: dict
    out_dir: Optional[Path] = None

    def __getitem__(self, key):
        return self.record[key]

    def summary(self) -> str:
        """Headline findings as readable lines for a terminal."""
        r = self.record
        if "class_balance" in r:
            n = sum(c["total"] for c in r["class_balance"]["counts"].values())
        else:  # multi-label: the label section counts the images
            n = r["label_balance"]["n_images"]
        lines = [
            f"xfeat analysis: {r['dataset']['name']} | {r['model']} ({r['weights']['id']}) "
            f"| {n} images | {r['timing']['total_seconds']:.1f} s"
        ]
        lines += [f"  - {h}" for h in r["headlines"]]
        if self.out_dir is not None:
            lines.append(f"report: {Path(self.out_dir) / 'analysis.md'}")
        return "\n".join(lines)


def analyze(
    data=None,
    model: str = "resnet18",
    *,
    weights="none",
    cache: Union[str, Path, cache_io.FeatureSet, None] = None,
    out_dir: Union[str, Path, None] = None,
    runs: Sequence = (),
    probe=None,
    near_duplicate_threshold: float = 0.995,
    n_folds: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    extract_options: Optional[dict] = None,
    progress: bool = True,
) -> Analysis:
    """Analyse a dataset through the cached features of ``model``; write the report.

    Parameters
    ----------
    data, model, weights : what to extract (the cache is built or reused, as ``fit_head``);
        or give ``cache``. The images are needed too (pixel hashes): with ``cache`` alone
        they are reloaded from the cache's recorded source, and must still match it.
    cache : a cache file (``.h5``) or a :class:`~xfeat.cache.FeatureSet`.
    out_dir : default ``runs/DATASET/MODEL-WEIGHTS/analysis``.
    runs : run folders (``results.json``) whose train/val/test gaps join the report.
    probe : a logistic probe already fitted on this cache, to reuse instead of fitting one:
        the :class:`~xfeat.runs.results.RunResult` of ``fit_head(head="logreg")`` or its run
        folder. Its C, threshold, metrics and predictions feed the gaps, label-noise and
        calibration sections; a probe of another cache is refused (``ConfigError``).
    near_duplicate_threshold : cosine similarity of L2-normalised embeddings at or above
        which two images that are not pixel-identical are listed as near duplicates.
    n_folds : stratified folds of the out-of-fold predictions (shift and label noise).
    n_boot, seed : bootstrap resamples of the confidence intervals; seed of every random
        choice (folds, subsamples, bootstrap). They also apply to a probe fitted here.
    extract_options : as ``fit_head``'s (cache_dir, image_size, num_workers, ...).

    Returns
    -------
    Analysis
        ``record`` with keys ``class_balance``, ``shift``, ``duplicates``, ``label_noise``,
        ``overfitting``, ``calibration``, ``adaptation`` and ``headlines``; ``summary()``
        prints them.
    """
    t_start = time.perf_counter()
    _check_params(near_duplicate_threshold, n_folds, n_boot)
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    options = dict(extract_options or {})
    options.setdefault("progress", progress)
    loaded = load_features(
        data,
        model,
        weights=weights,
        cache=cache,
        extract_options=options,
        with_dataset=True,
        command="analyze",
    )
    features, dataset = loaded.features, loaded.dataset
    meta = features.meta
    if out_dir is None:
        out_dir = default_run_dir(meta.dataset.name, meta.model, meta.weights.to_dict(), "analysis")
    out_dir = make_dirs(out_dir)  # an unwritable folder fails now, not after the work

    timing = {}
    t = time.perf_counter()
    recorded = meta.preprocessing  # the DICOM window and frame the features were made with
    dicom = DicomOptions(recorded.get("dicom_window", "file"), recorded.get("dicom_frame"))
    hashes = hash_images(dataset, progress=progress, dicom=dicom)
    timing["pixel_hash_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    # multi-label data: no section reads a probe (see _multilabel_diagnoses)
    fitted = (
        None if features.multilabel else fit_or_reuse_probe(features, probe, n_boot=n_boot, seed=seed)
    )
    timing["probe_seconds"] = time.perf_counter() - t
    if features.multilabel:
        diagnoses = _multilabel_diagnoses(
            features, dataset, hashes, n_folds, n_boot, seed, near_duplicate_threshold
        )
    else:
        diagnoses = _diagnoses(
            features,
            dataset,
            hashes,
            fitted,
            runs,
            n_folds,
            n_boot,
            seed,
            near_duplicate_threshold,
            progress,
        )
    sections = []
    for diagnose in diagnoses:
        t = time.perf_counter()
        sections.append(diagnose())
        timing[f"{sections[-1].name}_seconds"] = time.perf_counter() - t
    timing["total_seconds"] = time.perf_counter() - t_start

    params = {
        "near_duplicate_threshold": near_duplicate_threshold,
        "n_folds": n_folds,
        "n_boot": n_boot,
        "seed": seed,
        "runs": [str(r) for r in runs],
        "probe": None if probe is None or fitted is None else str(fitted.run_dir or "given, not saved"),
        "domain_C": DOMAIN_C,
        "max_train_per_test": MAX_TRAIN_PER_TEST,
    }
    record = jsonable(_record(features, out_dir, params, sections, timing))
    _write(out_dir, record, sections)
    logger.info(
        "analysis of %s written to %s in %.1f s",
        meta.dataset.name,
        out_dir,
        timing["total_seconds"],
    )
    return Analysis(record, out_dir)


def _diagnoses(
    features, dataset, hashes, fitted, runs, n_folds, n_boot, seed, threshold, progress=False
) -> list:
    """The single-label diagnoses, in report order."""
    meta = features.meta
    return [
        functools.partial(balance_section, features),
        functools.partial(shift_section, features, n_folds=n_folds, n_boot=n_boot, seed=seed),
        functools.partial(duplicates_section, features, dataset, hashes, threshold=threshold),
        functools.partial(
            label_noise_section, features, C=fitted.record.selection["C"], n_folds=n_folds, seed=seed
        ),
        functools.partial(gaps_section, fitted, runs, fingerprint=meta.dataset.fingerprint),
        functools.partial(calibration_section, fitted),
        functools.partial(adaptation_section, features, fitted, seed=seed, progress=progress),
    ]


def _multilabel_diagnoses(features, dataset, hashes, n_folds, n_boot, seed, threshold) -> list:
    """Multi-label data: the label section replaces class balance; shift (per label) and
    duplicates apply as they are; the sections built on one class per image say why not."""
    why = {
        "label_noise": "label noise is estimated from one class per image (confident learning); "
        "these images have several labels",
        "overfitting": "the train/val/test gaps are read on accuracy, which multi-label data do "
        "not have; the per-label AUC of every split is in fit-head's results.json",
        "calibration": "the reliability diagram is drawn for one class per image; per-label "
        "calibration is not computed",
        "adaptation": "the transductive adaptations re-estimate one class prior; multi-label "
        "data have one prevalence per label",
    }
    titles = {
        "label_noise": "Label noise",
        "overfitting": "Train, val and test gaps",
        "calibration": "Calibration",
        "adaptation": "Adaptation to the test images (transductive)",
    }
    return [
        functools.partial(label_section, features),
        functools.partial(shift_section, features, n_folds=n_folds, n_boot=n_boot, seed=seed),
        functools.partial(duplicates_section, features, dataset, hashes, threshold=threshold),
        *(functools.partial(not_applicable, name, titles[name], why[name]) for name in why),
    ]


def _check_params(threshold, n_folds, n_boot) -> None:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0.0 < threshold <= 1.0
    ):
        raise ConfigError(
            f"near_duplicate_threshold={threshold!r}; expected a cosine "
            "similarity in (0, 1], such as 0.995"
        )
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ConfigError(f"n_folds={n_folds!r}; expected an integer >= 2")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ConfigError(f"n_boot={n_boot!r}; expected an integer >= 0 (0: no intervals)")


def _record(features, out_dir: Path, params: dict, sections: list, timing: dict) -> dict:
    """``analysis.json``: provenance, then the headlines and every section's summary."""
    meta = features.meta
    files = {"json": "analysis.json", "markdown": "analysis.md", "html": "analysis.html"}
    for s in sections:
        files.update({name.replace(".", "_"): name for name in [*s.figures, *s.tables]})
    by_priority = sorted(sections, key=lambda s: HEADLINE_ORDER.index(s.name))
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "out_dir": str(out_dir),
        "dataset": {
            "name": meta.dataset.name,
            "source": meta.dataset.source,
            "fingerprint": meta.dataset.fingerprint,
            "class_names": list(meta.class_names),
            "split": meta.split,
        },
        "model": meta.model,
        "weights": {"kind": meta.weights.kind, "id": meta.weights.id, "sha256": meta.weights.sha256},
        "cache": {"path": str(features.path), "key": features.key},
        "params": params,
        "headlines": [h for s in by_priority for h in s.headlines],
        **{s.name: s.summary for s in sections},
        "files": files,
        "timing": timing,
    }


def _write(out_dir: Path, record: dict, sections: list) -> None:
    for s in sections:
        for name, (rows, columns) in s.tables.items():
            write_csv(out_dir / name, rows, columns)
        for name, figure in s.figures.items():
            save_figure(figure, out_dir / name)
    from xfeat.report import markdown_to_html

    write_json(out_dir / "analysis.json", record)
    text = render_markdown(record, sections)
    write_text(out_dir / "analysis.md", text)
    # A browser shows a .md as raw text; the same page as HTML, for the comparison's links.
    write_text(
        out_dir / "analysis.html",
        markdown_to_html(text, title=f"Data analysis: {record['dataset']['name']}"),
    )


def render_markdown(record: dict, sections: list) -> str:
    """``analysis.md``: provenance, the headlines, then the sections, numbered."""
    r = record
    out = [
        f"# Data analysis: {r['dataset']['name']}",
        "",
        f"Features: `{r['model']}` ({r['weights']['id']}), cache `{r['cache']['key'][:16]}`. "
        f"Source: `{r['dataset']['source']}`. Made {r['created']} in "
        f"{r['timing']['total_seconds']:.1f} s."
        + (f" Logistic probe reused from `{r['params']['probe']}`." if r["params"]["probe"] else ""),
        "",
        "## Headlines",
        "",
    ]
    out += [f"- {h}" for h in r["headlines"]] + [""]
    for k, s in enumerate(sections, 1):
        out += [f"## {k}. {s.title}", "", *s.markdown]
    out += [
        "## Timing",
        "",
        ", ".join(f"{k.replace('_seconds', '')} {v:.1f} s" for k, v in r["timing"].items()),
        "",
    ]
    return "\n".join(out)
