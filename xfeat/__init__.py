"""xfeat: transfer learning on medical images with cached backbone features.

The notebook API::

    import xfeat
    path = xfeat.extract(data="chest_xray", model="resnet18", weights="DEFAULT")
    features = xfeat.read_cache(path)          # numpy arrays per split
    result = xfeat.fit_head(cache=path)        # logistic probe, C and threshold chosen on val
    tuned = xfeat.finetune(data="chest_xray", model="resnet18", mode="full", epochs=5)
"""
__version__ = "0.1.0"

from .analyze import analyze  # noqa: E402
from .backbones import create_backbone, list_backbones  # noqa: E402
from .cache import read_cache, read_meta  # noqa: E402
from .compare import compare  # noqa: E402
from .data import load_dataset  # noqa: E402
from .extract import extract, plan_extraction  # noqa: E402
from .finetune import finetune  # noqa: E402
from .fit import fit_head  # noqa: E402
from .predict import predict  # noqa: E402
from .results import load_result  # noqa: E402

__all__ = ["__version__", "analyze", "compare", "create_backbone", "extract", "finetune", "fit_head",
           "list_backbones", "load_dataset", "load_result", "plan_extraction", "predict",
           "read_cache", "read_meta"]
