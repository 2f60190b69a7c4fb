"""xfeat: transfer learning on medical images with cached backbone features.

The notebook API::

    import xfeat
    path = xfeat.extract("chest_xray", "resnet18", weights="DEFAULT")
    features = xfeat.read_cache(path)          # numpy arrays per split
    result = xfeat.fit_head(cache=path)        # logistic probe, C and threshold chosen on val
    tuned = xfeat.finetune("chest_xray", "resnet18", weights="DEFAULT", mode="full", epochs=5)

The functions are verbs and the subpackages nouns, so no name is both: ``xfeat.compare`` is
the function, ``xfeat.comparison`` its package; ``xfeat.analyze`` / ``xfeat.analysis``,
``xfeat.finetune`` / ``xfeat.finetuning``, ``xfeat.predict`` / ``xfeat.prediction``,
``xfeat.fit_head`` / ``xfeat.fitting``, ``xfeat.extract`` / ``xfeat.extraction``.

Names are imported on first use (a module-level ``__getattr__``, PEP 562), so ``import
xfeat`` (and ``xfeat --help``) is instant and changes nothing in the process (no matplotlib
backend, no torch settings).
"""

import importlib

__version__ = "0.2.0"

# public name -> module that defines it
_API = {
    "analyze": "xfeat.analysis",
    "compare": "xfeat.comparison",
    "create_backbone": "xfeat.backbones",
    "list_backbones": "xfeat.backbones",
    "read_cache": "xfeat.cache",
    "read_meta": "xfeat.cache",
    "load_dataset": "xfeat.data",
    "extract": "xfeat.extraction.entry",
    "plan_extraction": "xfeat.extraction.pipeline",
    "finetune": "xfeat.finetuning",
    "fit_head": "xfeat.fitting",
    "predict": "xfeat.prediction",
    "load_result": "xfeat.runs.results",
    "DataSpec": "xfeat.config",
    "FinetuneConfig": "xfeat.config",
    "XfeatError": "xfeat.errors",
    "zero_shot": "xfeat.zeroshot",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xfeat' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
