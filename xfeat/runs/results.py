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

Next to it, ``predictions.npz`` holds ``{split}_ids``, ``{split}_labels`` and
``{split}_proba`` for every split, so later reports never need to recompute anything.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from xfeat.errors import ConfigError
from xfeat.evaluation.metrics import format_metrics_table
from xfeat.files import atomic_write, write_json

SCHEMA = "xfeat-result/1"


@dataclass
class RunResult:
    """One run's numbers plus its per-split predictions; ``save`` writes both."""

    record: dict
    predictions: dict = field(default_factory=dict)  # split -> (ids, labels, proba)
    head: object = None  # the fitted head, when the run made one in this process

    def __getitem__(self, key):
        return self.record[key]

    @property
    def run_dir(self) -> Optional[Path]:
        return Path(self.record["run_dir"]) if self.record.get("run_dir") else None

    def save(self, run_dir) -> Path:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.record["run_dir"] = str(run_dir)
        arrays = {}
        for split, (ids, labels, proba) in self.predictions.items():
            arrays[f"{split}_ids"] = np.asarray(ids, dtype=str)
            arrays[f"{split}_labels"] = np.asarray(labels)
            arrays[f"{split}_proba"] = np.asarray(proba, dtype=np.float32)
        atomic_write(run_dir / "predictions.npz", lambda f: np.savez(f, **arrays))
        write_json(run_dir / "results.json", self.record)
        return run_dir / "results.json"

    def table(self) -> str:
        r = self.record
        th = r["threshold"]
        w = r["weights"]
        weights = w["id"] if w["kind"] not in ("file", "torchscript") else Path(w["id"]).name
        lines = [
            f"{r['model']} ({weights}) | mode {r['mode']} | head {r['head']} | {r['dataset']['name']}"
        ]
        if r.get("transductive"):
            a = r.get("adaptation") or {}
            lines.append(
                f"TRANSDUCTIVE: --adapt {a.get('method')} used the {a.get('target')}; "
                "test numbers are not comparable with inductive runs"
            )
            if a.get("warning"):
                lines.append(f"warning: {a['warning']}")
        sel = r.get("selection") or {}
        chosen = {k: v for k, v in sel.items() if k in ("C", "k", "best_epoch", "scoring")}
        if chosen:
            lines.append("chosen on val: " + ", ".join(f"{k}={_fmt(v)}" for k, v in chosen.items()))
        if th.get("value") is not None:
            lines.append(f"threshold: {th['value']:.3f} ({th['rule']}, chosen on val)")
        lines.append(format_metrics_table(r["metrics"], r.get("ci", {}).get("test")))
        half = r.get("metrics_at_0.5", {}).get("test")
        if th.get("value") is not None and half:
            lines.append(
                "test at threshold 0.5: "
                + ", ".join(
                    f"{k} {half[k]:.3f}"
                    for k in ("accuracy", "balanced_accuracy", "sensitivity", "specificity")
                )
            )
        lines += [f"note: {n}" for n in r.get("notes", [])]
        t = r["timing"]
        lines.append(
            "time: "
            + ", ".join(
                f"{k} {v:.2f} s" for k, v in t.items() if k.endswith("seconds") and v is not None
            )
        )
        if r.get("run_dir"):
            lines.append(f"saved: {r['run_dir']}/results.json")
        return "\n".join(lines)


def load_result(path) -> RunResult:
    """Read ``results.json`` (a file or its run folder) and its predictions."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ConfigError(f"no results.json at {path}; expected a run folder of fit-head or finetune")
    record = json.loads(path.read_text())
    if record.get("schema") != SCHEMA:
        raise ConfigError(
            f"{path} is not an xfeat result (schema {record.get('schema')!r}, expected {SCHEMA!r})"
        )
    predictions = {}
    pred_path = path.with_name("predictions.npz")
    if pred_path.is_file():
        with np.load(pred_path, allow_pickle=False) as z:
            for split in ("train", "val", "test"):
                if f"{split}_proba" in z.files:
                    predictions[split] = (
                        z[f"{split}_ids"].tolist(),
                        z[f"{split}_labels"],
                        z[f"{split}_proba"],
                    )
    record["run_dir"] = str(path.parent)  # where it is now (folders get moved and copied)
    return RunResult(record, predictions)


def new_record(**fields) -> dict:
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_dir": None, **fields}


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
