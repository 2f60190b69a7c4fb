"""The result of one run (a head on cached features, or a fine-tuning), in one schema.

``results.json`` (schema ``xfeat-result/1``) has these top-level keys:

- ``schema``, ``created``, ``run_dir``
- ``model``: backbone name; ``weights``: ``{kind, id, sha256}``
- ``mode``: ``cached`` (head on the feature cache) | ``frozen`` | ``full`` | ``lp-ft``
- ``head``: ``logreg`` | ``linear`` | ``knn`` (cached) or ``linear`` (fine-tuning)
- ``dataset``: ``{name, source, fingerprint, class_names, counts}``
- ``threshold``: ``{rule, value, chosen_on: "val"}`` (``value`` null for multi-class)
- ``selection``: what was chosen on val (C and its sweep, k, best epoch, ...)
- ``metrics``: ``{train, val, test}`` -> metric name -> value, at the chosen threshold
- ``metrics_at_0.5``: the same at the fixed 0.5 threshold
- ``ci``: ``{test: {accuracy, roc_auc, sensitivity, specificity: [lo, hi]}}`` (95% bootstrap)
- ``timing``: seconds per stage, all ending in ``_seconds``, with ``total_seconds`` their sum.
  Heads on the cache: ``extract`` (as measured when the cache was made), ``fit``,
  ``evaluate``, ``extract_images_per_second``. Fine-tuning: ``store`` (decoding the images
  once), ``train``, ``evaluate``, ``seconds_per_epoch``, ``train_images_per_second``.
  ``wall_seconds`` is this call's own duration (short when a cache was reused).
- ``cache``: ``{path, key, hit}`` of the feature cache used (lp-ft: its probe's; null for
  ``full`` and ``frozen``)
- ``history``: per-epoch records (trained heads and fine-tuning), else ``[]``
- ``params``: the options of the run
- ``transductive`` (true) and ``adaptation`` (``{method, target, ...}``): only when the run
  used the unlabelled test images (``--adapt``); ``em`` adds the estimated prior and a warning

Its last key, ``content_sha256``, is the SHA-256 of the rest as written (strict JSON,
indent 2): :func:`load_result` refuses a file whose bytes changed since (a flipped digit would
otherwise read as a number). Files without it (older xfeat) are read unchecked.

Next to it, ``predictions.npz`` holds ``{split}_ids``, ``{split}_labels`` and
``{split}_proba`` for every split, so later reports never need to recompute anything.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from xfeat.cache.meta import WeightsRecord
from xfeat.errors import ConfigError
from xfeat.evaluation.metrics import format_metrics_table
from xfeat.evaluation.multilabel import format_multilabel_table
from xfeat.files import atomic_write, dumps, write_json

# Every record of a run from random weights says so (results.json, its table, the reports).
RANDOM_INIT_NOTE = (
    "random init: the backbone was not pretrained (weights none); its numbers time the "
    "pipeline and say nothing about transfer learning"
)
SCHEMA = "xfeat-result/1"
READABLE_SCHEMAS = ("xfeat-result/1",)


@dataclass(frozen=True)
class RunDataset:
    """The data set a run was trained and evaluated on."""

    name: str
    source: str
    fingerprint: str
    class_names: tuple
    counts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunThreshold:
    """The decision threshold: its ``rule`` and the ``value`` it gave on val (None for
    multi-class, where the prediction is the argmax)."""

    rule: Union[str, float]
    value: Optional[float]
    chosen_on: str = "val"
    per_label: Optional[dict] = None  # multi-label: {label: threshold}, each chosen on val


@dataclass(frozen=True)
class CacheUse:
    """The feature cache a run read (``hit``: it existed before the run)."""

    path: str
    key: Optional[str] = None
    hit: Optional[bool] = None
    feature_dim: Optional[int] = None


@dataclass
class RunRecord:
    """One run's ``results.json`` as a typed record (see the module docstring for each field).

    ``metrics`` and ``metrics_at_half`` map split -> metric name -> value; ``ci`` maps split
    -> metric name -> ``[low, high]``; ``timing`` maps stage -> seconds; ``selection``,
    ``params``, ``adaptation`` and ``history`` hold what is specific to the kind of run.
    """

    model: str
    weights: WeightsRecord
    mode: str
    head: str
    dataset: RunDataset
    threshold: RunThreshold
    metrics: dict
    metrics_at_half: dict = field(default_factory=dict)
    ci: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    cache: Optional[CacheUse] = None
    transductive: bool = False
    adaptation: Optional[dict] = None
    notes: list = field(default_factory=list)

    def __post_init__(self):
        if self.weights.kind == "random" and RANDOM_INIT_NOTE not in self.notes:
            self.notes = [RANDOM_INIT_NOTE, *self.notes]

    skipped: dict = field(default_factory=dict)
    peak_memory_mib: Optional[float] = None
    memory_increase_mib: Optional[float] = None
    run_dir: Optional[str] = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    schema: str = SCHEMA

    @property
    def multilabel(self) -> bool:
        """Several labels per image: ``metrics.<split>.per_label`` and per-label thresholds."""
        return self.threshold.per_label is not None

    def to_dict(self) -> dict:
        """The JSON record, in the key order of ``results.json``."""
        record = {
            "schema": self.schema,
            "created": self.created,
            "run_dir": self.run_dir,
            "model": self.model,
            "weights": {"kind": self.weights.kind, "id": self.weights.id, "sha256": self.weights.sha256},
            "mode": self.mode,
            "head": self.head,
            "dataset": {**asdict(self.dataset), "class_names": list(self.dataset.class_names)},
            "threshold": asdict(self.threshold),
            "selection": self.selection,
            "metrics": self.metrics,
            "metrics_at_0.5": self.metrics_at_half,
            "ci": self.ci,
            "timing": self.timing,
            "cache": asdict(self.cache) if self.cache is not None else None,
            "history": self.history,
            "params": self.params,
            "skipped": self.skipped,
        }
        if self.transductive:
            record["transductive"] = True
            record["adaptation"] = self.adaptation
        if self.notes:
            record["notes"] = self.notes
        for name in ("peak_memory_mib", "memory_increase_mib"):
            if getattr(self, name) is not None:
                record[name] = getattr(self, name)
        return record

    @classmethod
    def from_dict(cls, record: dict, *, path="results.json") -> RunRecord:
        if record.get("schema") not in READABLE_SCHEMAS:
            raise ConfigError(
                f"{path} is not an xfeat result (schema {record.get('schema')!r}, expected {SCHEMA!r})"
            )
        try:
            w, d, th, c = record["weights"], record["dataset"], record["threshold"], record.get("cache")
            return cls(
                model=record["model"],
                weights=WeightsRecord(w["kind"], w["id"], w.get("sha256")),
                mode=record["mode"],
                head=record["head"],
                dataset=RunDataset(
                    d["name"],
                    d["source"],
                    d["fingerprint"],
                    tuple(d["class_names"]),
                    d.get("counts") or {},
                ),
                threshold=RunThreshold(
                    th["rule"], th["value"], th.get("chosen_on", "val"), th.get("per_label")
                ),
                metrics=record["metrics"],
                metrics_at_half=record.get("metrics_at_0.5") or {},
                ci=record.get("ci") or {},
                timing=record.get("timing") or {},
                selection=record.get("selection") or {},
                history=record.get("history") or [],
                params=record.get("params") or {},
                cache=CacheUse(**{k: c.get(k) for k in ("path", "key", "hit", "feature_dim")})
                if c
                else None,
                transductive=bool(record.get("transductive")),
                adaptation=record.get("adaptation"),
                notes=record.get("notes") or [],
                skipped=record.get("skipped") or {},
                peak_memory_mib=record.get("peak_memory_mib"),
                memory_increase_mib=record.get("memory_increase_mib"),
                run_dir=record.get("run_dir"),
                created=record.get("created", ""),
                schema=record["schema"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{path} is damaged or incomplete ({type(exc).__name__}: {exc}); delete its run "
                "folder and run the command again"
            ) from None


@dataclass
class RunResult:
    """One run's record plus its per-split predictions; ``save`` writes both."""

    record: RunRecord
    predictions: dict = field(default_factory=dict)  # split -> (ids, labels, proba)
    head: object = None  # the fitted head, when the run made one in this process

    @property
    def run_dir(self) -> Optional[Path]:
        return Path(self.record.run_dir) if self.record.run_dir else None

    def save(self, run_dir) -> Path:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.record.run_dir = str(run_dir)
        arrays = {}
        for split, (ids, labels, proba) in self.predictions.items():
            arrays[f"{split}_ids"] = np.asarray(ids, dtype=str)
            arrays[f"{split}_labels"] = np.asarray(labels)
            arrays[f"{split}_proba"] = np.asarray(proba, dtype=np.float32)
        atomic_write(run_dir / "predictions.npz", lambda f: np.savez(f, **arrays))
        record = self.record.to_dict()
        write_json(run_dir / "results.json", {**record, DIGEST: content_digest(record)})
        return run_dir / "results.json"

    def table(self) -> str:
        r = self.record
        th, w = r.threshold, r.weights
        weights = w.id if w.kind not in ("file", "torchscript") else Path(w.id).name
        if w.kind == "random":
            weights = "random init"
        lines = [f"{r.model} ({weights}) | mode {r.mode} | head {r.head} | {r.dataset.name}"]
        if r.transductive:
            a = r.adaptation or {}
            lines.append(
                f"TRANSDUCTIVE: --adapt {a.get('method')} used the {a.get('target')}; "
                "test numbers are not comparable with inductive runs"
            )
            if a.get("warning"):
                lines.append(f"warning: {a['warning']}")
        chosen = {k: v for k, v in r.selection.items() if k in ("C", "k", "best_epoch", "scoring")}
        metric = r.selection.get("metric")
        if r.history and metric and r.selection.get(metric) is not None:
            # a fine-tuned run: say how its epoch was chosen, in the history's own terms
            how = "argmax, before any threshold" if metric == "val_accuracy" else "macro over labels"
            lines.append(
                f"chosen on val: epoch {r.selection['best_epoch']} of {len(r.history)}, the highest "
                f"{metric} in history.json ({r.selection[metric]:.3f}, {how}); the table's "
                "metrics are that epoch's at the threshold chosen on val"
            )
        elif chosen:
            lines.append("chosen on val: " + ", ".join(f"{k}={_fmt(v)}" for k, v in chosen.items()))
        if th.value is not None:
            lines.append(f"threshold: {th.value:.3f} ({th.rule}, chosen on val)")
        if r.multilabel:
            chosen_c = {k: v.get("C") for k, v in r.selection.items() if isinstance(v, dict)}
            if any(v is not None for v in chosen_c.values()):
                lines.append(
                    "chosen on val, per label: "
                    + ", ".join(f"{k} C={_fmt(v)}" for k, v in chosen_c.items() if v is not None)
                )
            lines.append(
                f"per-label thresholds ({th.rule}, chosen on val): "
                + ", ".join(f"{k} {v:.3f}" for k, v in th.per_label.items())
            )
            lines.append(format_multilabel_table(r.metrics, list(th.per_label)))
            ci = r.ci.get("test") or {}
            if ci.get("roc_auc"):
                lo, hi = ci["roc_auc"]
                lines.append(
                    f"test macro AUC 95% interval [{lo:.3f}, {hi:.3f}] (bootstrap over "
                    f"{ci.get('resampled', 'images')})"
                )
        else:
            lines.append(format_metrics_table(r.metrics, r.ci.get("test")))
        half = r.metrics_at_half.get("test")
        if th.value is not None and half:
            lines.append(
                "test at threshold 0.5: "
                + ", ".join(
                    f"{k} {half[k]:.3f}"
                    for k in ("accuracy", "balanced_accuracy", "sensitivity", "specificity")
                )
            )
        lines += [f"note: {n}" for n in r.notes]
        lines.append(
            "time: "
            + ", ".join(
                f"{k} {v:.2f} s" for k, v in r.timing.items() if k.endswith("seconds") and v is not None
            )
        )
        if r.run_dir:
            lines.append(f"saved: {r.run_dir}/results.json")
        return "\n".join(lines)


DIGEST = "content_sha256"  # results.json's own checksum: a flipped digit is an error, not a number


def content_digest(record: dict) -> str:
    """The SHA-256 of ``record`` as results.json holds it (strict JSON, indent 2)."""
    return hashlib.sha256(dumps(record).encode()).hexdigest()


def load_result(path) -> RunResult:
    """Read ``results.json`` (a file or its run folder) and its predictions."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ConfigError(f"no results.json at {path}; expected a run folder of fit-head or finetune")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(
            f"{path} is not valid JSON ({exc}); delete its run folder and run the command again"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not an xfeat result (a JSON {type(raw).__name__})")
    stored = raw.pop(DIGEST, None)  # results written before xfeat 0.4 have none
    if stored is not None and stored != content_digest(raw):
        raise ConfigError(
            f"{path} is damaged: its content does not match its {DIGEST} (a changed byte); "
            "delete its run folder and run the command again"
        )
    record = RunRecord.from_dict(raw, path=path)
    predictions = {}
    pred_path = path.with_name("predictions.npz")
    if pred_path.is_file():
        try:
            with np.load(pred_path, allow_pickle=False) as z:
                for split in ("train", "val", "test"):
                    if f"{split}_proba" in z.files:
                        predictions[split] = (
                            z[f"{split}_ids"].tolist(),
                            z[f"{split}_labels"],
                            z[f"{split}_proba"],
                        )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(
                f"{pred_path} is damaged ({type(exc).__name__}); delete its run folder and run "
                "the command again"
            ) from None
    record.run_dir = str(path.parent)  # where it is now (folders get moved and copied)
    return RunResult(record, predictions)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
