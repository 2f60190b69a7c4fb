"""How far an image's features lie from the training data: a k-nearest-neighbour distance,
read as a percentile of the validation images' own distances.

The score follows Sun et al., "Out-of-distribution detection with deep nearest neighbors"
(ICML 2022): features are L2-normalised, and an image's distance is the cosine distance to
its ``k``-th nearest neighbour among (a stratified sample of at most ``max_reference``) training
images. The validation images' distances, computed the same way, calibrate it: ``ood_score``
is the percentage of validation images closer to the training data than this image, and an
image is flagged (``ood``) above the 99th percentile.

What it means: the backbone sees something unlike every training image (a photograph, a
digit, another body part, a scan of another modality, heavy artefacts). What it does not
mean: a low score does not make a prediction right (a chest X-ray of a disease the head was
never trained on looks in-distribution), and about 1% of images like the validation ones are
flagged by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xfeat.errors import DataError

DEFAULT_K = 5
MAX_REFERENCE = 2000
OOD_PERCENTILE = 99.0
_CHUNK = 512


def _normalise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


@dataclass
class NearestNeighbourOOD:
    """A fitted out-of-distribution scorer: the normalised reference rows and the sorted
    validation distances. ``fit`` builds it from train and val features; ``to_arrays`` and
    ``from_arrays`` store it in a head file."""

    reference: np.ndarray  # (R, D) float16, L2-normalised training features
    val_distances: np.ndarray  # (V,) float32, sorted
    k: int = DEFAULT_K

    @classmethod
    def fit(
        cls,
        X_train: np.ndarray,
        y_train: np.ndarray,
        X_val: np.ndarray,
        *,
        k: int = DEFAULT_K,
        max_reference: int = MAX_REFERENCE,
        seed: int = 0,
    ) -> NearestNeighbourOOD:
        """The reference sample (stratified by class, seeded) and the val distances to it."""
        if len(X_train) <= k or len(X_val) == 0:
            raise DataError(
                f"an out-of-distribution reference needs more than {k} train images and some "
                f"val images; got {len(X_train)} and {len(X_val)}"
            )
        rows = np.arange(len(X_train))
        if len(rows) > max_reference:
            rng = np.random.default_rng(seed)
            y = np.asarray(y_train)
            rows = np.sort(
                np.concatenate(
                    [
                        rng.choice(
                            np.flatnonzero(y == c),
                            size=max(1, round(max_reference * np.mean(y == c))),
                            replace=False,
                        )
                        for c in np.unique(y)
                    ]
                )
            )
        scorer = cls(_normalise(X_train[rows]).astype(np.float16), np.zeros(0, np.float32), k)
        scorer.val_distances = np.sort(scorer.distances(X_val)).astype(np.float32)
        return scorer

    def distances(self, X: np.ndarray) -> np.ndarray:
        """Cosine distance of each row of ``X`` to its ``k``-th nearest reference row."""
        X = _normalise(X)
        if X.shape[1] != self.reference.shape[1]:
            raise DataError(
                f"features have {X.shape[1]} dimensions but the out-of-distribution reference "
                f"has {self.reference.shape[1]}"
            )
        reference = self.reference.astype(np.float32)
        k = min(self.k, len(reference))
        out = np.empty(len(X), dtype=np.float32)
        for i in range(0, len(X), _CHUNK):
            similarity = X[i : i + _CHUNK] @ reference.T
            kth = np.partition(-similarity, k - 1, axis=1)[:, k - 1]
            out[i : i + _CHUNK] = 1.0 + kth  # 1 - (k-th largest similarity)
        return out

    def scores(self, X: np.ndarray) -> tuple:
        """``(ood_score, ood)``: the percentage of val images closer than each row, and
        whether it lies beyond the 99th percentile of the val distances."""
        d = self.distances(X)
        below = np.searchsorted(self.val_distances, d, side="left")
        score = 100.0 * below / len(self.val_distances)
        return score, d > np.percentile(self.val_distances, OOD_PERCENTILE)

    def to_arrays(self) -> dict:
        return {
            "ood_reference": self.reference,
            "ood_val_distances": self.val_distances,
            "ood_k": np.array(self.k),
        }

    @classmethod
    def from_arrays(cls, arrays: dict):
        """The scorer stored with a head, or None (heads saved before it existed)."""
        if "ood_reference" not in arrays:
            return None
        return cls(arrays["ood_reference"], arrays["ood_val_distances"], int(arrays["ood_k"]))
