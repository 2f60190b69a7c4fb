"""xfeat: transfer learning on medical images with cached backbone features.

The notebook API::

    import xfeat
    path = xfeat.extract("chest_xray", "resnet18", weights="DEFAULT")
    features = xfeat.read_cache(path)          # numpy arrays per split
    result = xfeat.fit_head(cache=path)        # logistic probe, C and threshold chosen on val
    tuned = xfeat.finetune("chest_xray", "resnet18", weights="DEFAULT", mode="full", epochs=5)

Names are imported on first use, so ``import xfeat`` (and ``xfeat --help``) is instant and
changes nothing in the process (no matplotlib backend, no torch settings).
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.2.0"

# public name -> module that defines it
_API = {
    "analyze": "xfeat.analyze",
    "compare": "xfeat.compare",
    "create_backbone": "xfeat.backbones",
    "list_backbones": "xfeat.backbones",
    "read_cache": "xfeat.cache",
    "read_meta": "xfeat.cache",
    "load_dataset": "xfeat.data",
    "extract": "xfeat.extract",
    "plan_extraction": "xfeat.extract",
    "finetune": "xfeat.finetune",
    "fit_head": "xfeat.fit",
    "predict": "xfeat.predict",
    "load_result": "xfeat.results",
    "FinetuneConfig": "xfeat.config",
    "XfeatError": "xfeat.errors",
}

__all__ = ["__version__", *sorted(_API)]


class _Package(types.ModuleType):
    """``xfeat.extract`` etc. stay the API functions even after their modules are imported.

    Importing a submodule binds it as an attribute of the package; for the names that are
    both a module and the function it defines (extract, analyze, compare, ...), the function
    wins, as ``from xfeat import extract`` promises. Modules are in ``sys.modules``.
    """

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xfeat' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
