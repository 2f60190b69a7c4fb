"""int8 extraction on the CPU: PyTorch 2 export quantization with the x86 inductor quantizer.

The fp32 feature extractor is exported, observed on calibration images (the first train
images, centre crops), converted to int8 (static per-tensor activations, per-channel
weights) and compiled by inductor, which lowers it to oneDNN's int8 kernels (VNNI). Offered
only for the families where it is faster than the fastest fp32 configuration on this
machine (``INT8_FASTER``, measured with ``scripts/bench_extract.py --precision int8``).
"""

from __future__ import annotations

import logging
import warnings

import torch

from xfeat.errors import ConfigError

logger = logging.getLogger(__name__)

# Families where int8 beat compiled fp32 in scripts/bench_extract.py on this project's CPU
# (MobileNetV2 ~3x). ShuffleNetV2 was not faster (0.99x); ResNets are not offered: torchao
# 0.18's x86 quantizer fails on their residual add + ReLU with torch 2.14 ("Input partition has
# more than one output node").
INT8_FASTER = frozenset({"mobilenet_v2"})


def check_int8(model_name: str, device: torch.device) -> None:
    """A clear error where int8 is not offered (not a CPU, not faster, no torchao)."""
    from xfeat.extraction.runtime import family

    if device.type != "cpu":
        raise ConfigError("--precision int8 is for CPU extraction; on a GPU use fp32")
    if model_name.startswith(("hf:", "open_clip:")):
        raise ConfigError(
            f"--precision int8 is not offered for {model_name}: xfeat quantizes torchvision "
            "CNNs only (offered for: " + ", ".join(sorted(INT8_FASTER)) + "); use --precision fp32"
        )
    if family(model_name) not in INT8_FASTER:
        raise ConfigError(
            f"--precision int8 is not offered for {model_name}: it was not "
            "faster than compiled fp32 on this CPU (offered for: "
            f"{', '.join(sorted(INT8_FASTER))}); use --precision fp32"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ConfigError("--precision int8 needs torchao: pip install 'xfeat[int8]'") from None


def quantize_int8(
    module: torch.nn.Module, calibration: torch.Tensor, prepare, batch_size: int
) -> torch.nn.Module:
    """``module`` quantized to int8 after observing ``prepare(calibration)`` batch by batch.

    The graph is exported for batches of ``batch_size`` (the runner pads the last batch), so
    inductor compiles one static shape.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    _require(calibration)
    from xfeat.extraction.runtime import pad_batch

    batches = [
        prepare(pad_batch(calibration[i : i + batch_size], batch_size))
        for i in range(0, len(calibration), batch_size)
    ]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(module, (batches[0],)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for batch in batches:
            prepared(batch)
        converted = convert_pt2e(prepared)
    logger.info("int8: calibrated on %d train images", len(calibration))
    return converted


def calibration_salt(calibration: torch.Tensor) -> bytes:
    """What an int8 graph depends on beyond the fp32 module, for its package key: the
    calibration images and the quantizer's version."""
    import hashlib

    import torchao

    _require(calibration)
    digest = hashlib.blake2b(calibration.contiguous().numpy().tobytes(), digest_size=16)
    return f"int8 torchao {torchao.__version__} {digest.hexdigest()}".encode()


def _require(calibration) -> None:
    if calibration is None or len(calibration) == 0:
        raise ConfigError("int8 extraction needs calibration images from the train split")
