"""xfeat: transfer learning on medical images with cached backbone features.

The notebook API::

    import xfeat
    path = xfeat.extract(data="chest_xray", model="resnet18", weights="DEFAULT")
    features = xfeat.read_cache(path)          # numpy arrays per split
"""
__version__ = "0.1.0"

from .backbones import create_backbone, list_backbones  # noqa: E402
from .cache import read_cache, read_meta  # noqa: E402
from .data import load_dataset  # noqa: E402
from .extract import extract, plan_extraction  # noqa: E402

__all__ = ["__version__", "create_backbone", "extract", "list_backbones", "load_dataset",
           "plan_extraction", "read_cache", "read_meta"]
