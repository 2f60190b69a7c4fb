"""Training and evaluation batches from the decoded uint8 store.

Augmentation draws from a generator seeded by (seed, epoch, image), and the batch order from
one seeded by (seed, epoch): a resumed run, a run with another number of loader workers and a
run split across torchrun ranks all see exactly the same batches.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from xfeat.backbones import Preprocessing
from xfeat.extraction.runtime import make_loader, mix_seed
from xfeat.extraction.store import random_resized_crop_params

IGNORE_LABEL = -100  # cross_entropy's ignore_index: padding samples
UNKNOWN = -1  # multi-label targets: an unknown entry (and every entry of a padding sample)


class StoreImages(torch.utils.data.Dataset):
    """uint8 CHW crops from a decoded store: random resized crop + flip, or a centre crop."""

    def __init__(
        self, array, labels: np.ndarray, preprocessing: Preprocessing, *, train: bool, seed: int = 0
    ):
        self.array, self.labels, self.preprocessing = array, labels, preprocessing
        self.crop = preprocessing.crop_size
        self.train, self.seed = train, seed

    def __len__(self) -> int:
        return len(self.labels)

    def _target(self, i: int, pad: bool = False):
        """Class index, or for multi-label data a float vector of 1 / 0 / -1 (unknown)."""
        if self.labels.ndim == 2:
            row = np.full(self.labels.shape[1], UNKNOWN) if pad else self.labels[i]
            return torch.as_tensor(row, dtype=torch.float32)
        return IGNORE_LABEL if pad else int(self.labels[i])

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key, 0, 0, False)
        i, epoch, batch_n, pad = key  # training keys come from EpochBatches
        if not self.train:
            crop = np.array(self.preprocessing.center_crop(self.array[i]))
            return torch.from_numpy(crop).permute(2, 0, 1), self._target(i)
        image = torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i))
        top, left, h, w = random_resized_crop_params(image.shape[1], image.shape[2], g)
        image = TF.resized_crop(image, top, left, h, w, [self.crop, self.crop], antialias=True)
        if torch.rand(1, generator=g).item() < 0.5:
            image = TF.horizontal_flip(image)
        # A padding sample (a rank with no share of a short last batch) carries no loss.
        return image, self._target(i, pad), batch_n


class EpochBatches(torch.utils.data.Sampler):
    """Batches of a permutation seeded by (seed, epoch), shared between torchrun ranks.

    Rank r takes items r, r + W, ... of every global batch, so W ranks see exactly the
    samples one process would, step by step (a rank left without a sample in a short last
    batch gets a padding sample that carries no loss). Keys are
    ``(index, epoch, global batch size, is padding)``; ``set_epoch`` before each epoch lets
    one loader with persistent workers serve them all.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _starts(self) -> list:
        """Batch starts. A last batch of one image joins the batch before it: BatchNorm cannot
        train on a batch of one."""
        starts = list(range(0, self.n, self.batch_size))
        if len(starts) > 1 and self.n - starts[-1] == 1:
            starts.pop()
        return starts

    def __len__(self) -> int:
        return len(self._starts())

    def __iter__(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.n, generator=g).tolist()
        starts = self._starts()
        for start, end in zip(starts, [*starts[1:], self.n]):
            batch = order[start:end]
            mine = batch[self.rank :: self.world_size]
            keys = [(i, self.epoch, len(batch), False) for i in mine]
            yield keys or [(batch[0], self.epoch, len(batch), True)]


class RowView:
    """Rows ``rows`` of an array, indexable like the array (for a training subset)."""

    def __init__(self, array, rows):
        self.array, self.rows = array, np.asarray(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.array[self.rows[i]]


def split_loader(
    store: dict,
    labels: dict,
    split: str,
    preprocessing: Preprocessing,
    *,
    train: bool,
    batch_size: int,
    seed: int,
    rows: Optional[np.ndarray] = None,
    num_workers: Optional[int],
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
):
    """A loader over ``split`` of the store (``rows`` of it when given)."""
    array = store[split] if rows is None else RowView(store[split], rows)
    y = labels[split] if rows is None else labels[split][rows]
    images = StoreImages(array, y, preprocessing, train=train, seed=seed)
    if not train:
        return make_loader(
            images, batch_size=batch_size, num_workers=num_workers, device=device, seed=seed
        )
    batches = EpochBatches(len(images), batch_size, seed, rank, world_size)
    return make_loader(
        images, batch_sampler=batches, num_workers=num_workers, device=device, persistent=True, seed=seed
    )
