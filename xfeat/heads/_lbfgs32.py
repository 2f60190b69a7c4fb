"""The hand-written logistic-regression solver: float32 products, scipy's L-BFGS-B.

Kept as ``LogisticHead(solver="lbfgs32")`` so ``scripts/bench_heads.py`` can time it against
scikit-learn's solver on the same data; it solves the same problem (see :class:`Lbfgs32Solver`).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_softmax


class Lbfgs32Solver:
    """Mean weighted cross-entropy + L2 on standardised float32 features, for L-BFGS.

    With ``alpha = 1 / (C * n)`` this is scikit-learn's objective divided by ``n``, so ``C``
    means what it means there.  Binary problems use one logit (sigmoid), like scikit-learn.
    """

    def __init__(self, Z: np.ndarray, y: np.ndarray, n_classes: int, *, sample_weight,
                 max_iter: int, tol: float):
        self.Z, self.y, self.max_iter, self.tol = Z, y, max_iter, tol
        self.sw = np.ones(len(y)) if sample_weight is None else sample_weight
        self.K = 1 if n_classes == 2 else n_classes
        self.target = y.astype(np.float64) if self.K == 1 else np.eye(self.K)[y]

    def _unpack(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        D = self.Z.shape[1]
        return params[: self.K * D].reshape(self.K, D), params[self.K * D:]

    def _loss_grad(self, params: np.ndarray, alpha: float) -> tuple[float, np.ndarray]:
        W, b = self._unpack(params)
        n = len(self.y)
        logits = (self.Z @ W.T.astype(np.float32)).astype(np.float64) + b
        if self.K == 1:
            z = logits[:, 0]
            loss = self.sw @ (np.logaddexp(0.0, z) - self.target * z)
            resid = (self.sw * (expit(z) - self.target))[:, None]
        else:
            logp = log_softmax(logits, axis=1)
            loss = -(self.sw @ logp[np.arange(n), self.y])
            resid = self.sw[:, None] * (np.exp(logp) - self.target)
        value = loss / n + 0.5 * alpha * float(np.vdot(W, W))
        grad_W = (resid.T.astype(np.float32) @ self.Z).astype(np.float64) / n + alpha * W
        return value, np.concatenate([grad_W.ravel(), resid.sum(axis=0) / n])

    def solve(self, C: float, start=None):
        """Minimise at ``C`` from ``start`` = (coef, intercept) or zeros.

        Returns ``(coef (K, D), intercept (K,), iterations, converged)``.
        """
        if start is None:
            x0 = np.zeros(self.K * (self.Z.shape[1] + 1))
        else:
            x0 = np.concatenate([np.ravel(start[0]), np.ravel(start[1])]).astype(np.float64)
        res = minimize(
            self._loss_grad, x0, args=(1.0 / (C * len(self.y)),), jac=True, method="L-BFGS-B",
            options={"maxiter": self.max_iter, "gtol": self.tol,
                     "ftol": 64 * np.finfo(float).eps},
        )
        W, b = self._unpack(res.x)
        # A line-search stop before max_iter means float32 gradients cannot resolve a smaller
        # step: the optimum is reached to the data's precision, so count it as converged.
        converged = bool(res.success or res.nit < self.max_iter)
        return W.copy(), b.copy(), int(res.nit), converged
