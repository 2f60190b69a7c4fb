"""Preprocessing and the training crop agree with torchvision, pixel for pixel."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights
from torchvision.transforms import RandomResizedCrop

from xfeat.backbones import Preprocessing
from xfeat.errors import ConfigError
from xfeat.extraction.store import random_resized_crop_params


def _image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode)


@pytest.mark.parametrize("weights", [ResNet50_Weights.IMAGENET1K_V2, MobileNet_V2_Weights.IMAGENET1K_V1])
@pytest.mark.parametrize("size", [(224, 224), (300, 241), (241, 300), (517, 233), (250, 999)])
def test_matches_the_weights_own_transforms(weights, size):
    reference = weights.transforms()
    prep = Preprocessing.from_transforms(reference)
    image = _image(*size)
    ours = prep.normalize(torch.from_numpy(prep.resize_and_crop(image)).permute(2, 0, 1)[None])
    theirs = reference(image)[None]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("resize, crop", [(39, 32), (37, 32), (256, 224), (35, 32)])
@pytest.mark.parametrize("size", [(64, 48), (48, 64), (41, 40), (40, 41)])
def test_store_square_holds_the_same_centre_crop(resize, crop, size):
    """The store keeps an R x R square; its centre crop is torchvision's CenterCrop."""
    from torchvision.transforms import functional as F

    prep = Preprocessing(resize, crop, exif_transpose=False)
    image = _image(*size, seed=1)
    square = prep.resize_square(image)
    assert square.shape == (resize, resize, 3)
    expected = np.asarray(F.center_crop(F.resize(image, [resize]), [crop, crop]))
    np.testing.assert_array_equal(prep.center_crop(square), expected)
    np.testing.assert_array_equal(prep.resize_and_crop(image), expected)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("hw", [(224, 224), (256, 256), (40, 300)])
def test_random_resized_crop_params_match_torchvision(seed, hw):
    torch.manual_seed(seed)
    theirs = RandomResizedCrop.get_params(torch.empty(3, *hw), [0.08, 1.0], [3 / 4, 4 / 3])
    ours = random_resized_crop_params(*hw, torch.Generator().manual_seed(seed))
    assert ours == tuple(theirs)


def test_round_trips_through_its_record():
    prep = Preprocessing(232, 224, interpolation="bicubic")
    assert Preprocessing.from_dict(prep.to_dict()) == prep


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"crop_size": 0}, "crop_size=0"),
        ({"resize_size": -3}, "resize_size=-3"),
        ({"resize_size": 100, "crop_size": 200}, "larger"),
        ({"interpolation": "cubic"}, "interpolation"),
    ],
)
def test_bad_values_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Preprocessing(**kwargs)
    with pytest.raises(ConfigError, match="crop_size=0"):
        Preprocessing().with_size(0)
