"""``LinearHead``: ``nn.Linear(D, C)`` on raw features, the best epoch chosen on val.

torch is imported inside the methods, so ``import xfeat.heads`` stays light.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import time

import numpy as np

from xfeat.errors import ConfigError
from xfeat.heads.base import (
    BaseHead,
    check_fit_inputs,
    check_positive_int,
    need_val,
    proba_from_logits,
    single_blas_thread,
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _single_thread():
    """torch and BLAS single-threaded inside the block, the settings restored after.

    An epoch is hundreds of 32-row mini-batches: overhead-bound, so with another process
    holding one of two cores, thread hand-offs made an epoch ~70x slower (measured).
    """
    import torch

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with single_blas_thread():
            yield
    finally:
        torch.set_num_threads(torch_threads)


class LinearHead(BaseHead):
    """``nn.Linear(D, C)`` on raw features, trained as in PyTorch's transfer-learning tutorial.

    SGD with momentum, StepLR, cross-entropy on shuffled mini-batches (seeded generator),
    ``epochs`` epochs.  After every epoch the loss and accuracy on the full train and val
    splits are recorded; the weights of the best epoch by val accuracy are kept (the first
    one on ties), so ``fit`` needs ``X_val`` and ``y_val``.  Features are not standardised,
    as when training a frozen network's last layer.

    Attributes
    ----------
    coef_ (C, D), intercept_ (C,), best_epoch_ (1-based), history_ (one dict per epoch),
    classes_, n_features_in_, selection_, fit_seconds_.
    """

    _arrays = ("classes_", "coef_", "intercept_")
    _scalars = ("best_epoch_", "history_", "n_features_in_", "fit_seconds_")

    def __init__(
        self,
        *,
        epochs=25,
        lr=1e-3,
        momentum=0.9,
        step_size=7,
        gamma=0.1,
        batch_size=32,
        weight_decay=0.0,
        seed=0,
    ):
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.step_size = step_size
        self.gamma = gamma
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.seed = seed

    def _check_params(self) -> None:
        for name in ("epochs", "step_size", "batch_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("lr", "momentum", "gamma", "weight_decay"):
            value = getattr(self, name)
            if not (
                isinstance(value, numbers.Real)
                and math.isfinite(value)
                and (value > 0 if name == "lr" else value >= 0)
            ):
                raise ConfigError(
                    f"{name}={value!r}; expected a "
                    f"{'positive' if name == 'lr' else 'non-negative'} number."
                )
        if not isinstance(self.seed, numbers.Integral):
            raise ConfigError(f"seed={self.seed!r}; expected an integer.")

    def _train(self, X, y, Xv, yv, n_classes):
        """The training loop; returns (history, (best_epoch, val_acc, weight, bias))."""
        import torch
        import torch.nn.functional as F

        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        Xvt, yvt = torch.from_numpy(Xv), torch.from_numpy(yv)
        gen = torch.Generator().manual_seed(int(self.seed))
        layer = torch.nn.Linear(X.shape[1], n_classes)
        bound = 1.0 / math.sqrt(X.shape[1])  # nn.Linear's default init, from our own generator
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
        opt = torch.optim.SGD(
            layer.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.step_size, gamma=self.gamma)

        def evaluate(inputs, targets) -> tuple[float, float]:
            with torch.no_grad():
                logits = layer(inputs)
                return (
                    float(F.cross_entropy(logits, targets)),
                    float((logits.argmax(dim=1) == targets).double().mean()),
                )

        history, best = [], None
        for epoch in range(1, self.epochs + 1):
            t_epoch = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            order = torch.randperm(len(X), generator=gen)
            for i in range(0, len(X), self.batch_size):
                idx = order[i : i + self.batch_size]
                loss = F.cross_entropy(layer(Xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            train_loss, train_acc = evaluate(Xt, yt)
            val_loss, val_acc = evaluate(Xvt, yvt)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "train_accuracy": train_acc,
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                    "seconds": time.perf_counter() - t_epoch,
                    "lr": lr,
                }
            )
            logger.debug(
                "LinearHead epoch %d/%d: val_acc=%.4f val_loss=%.4f (%.0f ms)",
                epoch,
                self.epochs,
                val_acc,
                val_loss,
                1e3 * history[-1]["seconds"],
            )
            if best is None or val_acc > best[1]:
                best = (epoch, val_acc, layer.weight.detach().clone(), layer.bias.detach().clone())
        return history, best

    def fit(self, X, y, *, X_val=None, y_val=None) -> LinearHead:
        """Train for ``epochs`` epochs, keep the best epoch by val accuracy; return self."""
        t0 = time.perf_counter()
        self._check_params()
        X, y, Xv, yv, classes = check_fit_inputs(X, y, X_val, y_val)
        if Xv is None:
            raise need_val(
                "LinearHead's best epoch", "use LogisticHead(C=...) for a head that needs no val"
            )
        with _single_thread():
            history, best = self._train(X, y, Xv, yv, len(classes))
        self._set_common(classes, X.shape[1])
        self.best_epoch_ = best[0]
        self.coef_, self.intercept_ = best[2].numpy(), best[3].numpy()
        self.history_ = history
        self.selection_ = {
            "best_epoch": self.best_epoch_,
            "criterion": "val_accuracy",
            "val_accuracy": best[1],
            "epochs": self.epochs,
        }
        self.fit_seconds_ = time.perf_counter() - t0
        logger.info(
            "LinearHead: best epoch %d/%d (val_acc=%.4f); fit in %.2f s",
            self.best_epoch_,
            self.epochs,
            best[1],
            self.fit_seconds_,
        )
        return self

    def _proba(self, X: np.ndarray) -> np.ndarray:
        logits = X.astype(np.float64) @ self.coef_.T.astype(np.float64) + self.intercept_
        return proba_from_logits(logits)
