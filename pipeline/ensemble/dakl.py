"""Domain-adaptive kernel learning (DAKL): the paper's kernel ridge step on top of the ensemble.

The method: U = the labelled points X (the k-means centroids) stacked on the unlabeled target points
(U = X alone when there is no target domain); the normalised linear (cosine) kernel
K^(a, b) = a.b / sqrt(a.a b.b); one feature per element of U, phi(x)_j = exp(-gamma (1 - K^(x, u_j)));
a linear kernel on phi, G = phi(X) phi(X)^T; dual ridge A = (G + alpha I)^-1 Y; and
predict(Z) = phi(Z) phi(X)^T A.

Why it is not written the textbook way:

* Size. The textbook materialises the (n+m) x (n+m) kernel (40,000^2 float64 = 12.8 GB at the paper's
  10,000 centroids + 30,000 targets). Only phi(X) phi(X)^T (n x n) and phi(Z) phi(X)^T are needed, so the
  features are built in column blocks over U and never stored whole: memory O(n^2 + n b + (n+m) p).
* Numerics. With the paper's gamma = 0.001 every feature is ~1 (phi in [e^-0.002, 1]); the Gram is a huge
  near-constant part plus a tiny informative part, condition numbers ~1e6 and more. Plain float32
  features lose the informative part to rounding. We split every feature as phi = c + r, where the scalar
  c = exp(-gamma (1 - k0)) is phi at the mean cosine k0 and r = c * expm1(gamma (K^ - k0)) is the small
  remainder, exact to float32's *relative* precision. Then, exactly,
      phi(a).phi(b) = N c^2 + c (s_a + s_b) + r(a).r(b),   s_a = sum_j r_aj,  N = n + m,
  so the large constant part is added in float64 and only r(a).r(b) goes through the fast float32 GEMM
  (a symmetric rank-k update for the Gram). The Gram is assembled and Cholesky-solved in float64.
  The same split makes predict cheap: phi(Z) phi(X)^T A = (N c^2 + c s_Z) 1^T A + c (s_X^T A) + r(Z) W
  with W = r(X)^T A ((n+m) x p), computed once at fit time.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from pipeline.metrics import normalise_rows

__all__ = ["DAKLRegressor", "cosine_normalise", "dense_reference_predict"]


def cosine_normalise(X: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows scaled to unit length so that dot products are K^; zero rows stay zero (K^ = 0 against them)."""
    return normalise_rows(X, np.float64).astype(dtype, copy=False)


def dense_reference_predict(X, Y, X_target, Z, gamma: float = 0.001, alpha: float = 1.0) -> np.ndarray:
    """The formula evaluated plainly in float64 (n x (n+m) features): the yardstick for tests and benches."""
    U = cosine_normalise(np.vstack([X, X_target]), np.float64)
    phi_x = np.exp(-gamma * (1.0 - cosine_normalise(X, np.float64) @ U.T))
    phi_z = np.exp(-gamma * (1.0 - cosine_normalise(Z, np.float64) @ U.T))
    G = phi_x @ phi_x.T
    A = scipy.linalg.solve(G + alpha * np.eye(len(G)), np.asarray(Y, dtype=np.float64), assume_a="pos")
    return phi_z @ phi_x.T @ A


class DAKLRegressor(MultiOutputMixin, RegressorMixin, BaseEstimator):
    """Kernel ridge on domain-adaptive features phi(x) = exp(-gamma (1 - cos(x, u))), u in centroids + targets.

    ``fit(X, y, X_target=None)`` learns from labelled X (n x d), y (n x p or n,) and the unlabeled target
    points X_target (m x d), which only add features (columns of U). Without X_target, U = X: plain
    kernel ridge on these features, so the estimator works in pipelines and cross-validation helpers.

    Parameters
    ----------
    gamma : float, default=0.001
        Width of the feature map, > 0 (the paper's best value is the default).
    alpha : float, default=1.0
        Ridge term added to the Gram diagonal, >= 0, as in sklearn.kernel_ridge.KernelRidge.
    block_size : int, default=2048
        Columns of U (features) computed at once; bounds the work memory to n x block_size values.
    dtype : {"float32", "float64"}, default="float32"
        Precision of the feature blocks and their products. float32 is fast and stays accurate thanks to
        the shifted split; the Gram is always accumulated and solved in float64.

    Attributes
    ----------
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during fit; defined only when X has string column names.
    U_ : ndarray of shape (n_basis_, n_features_in_)
        The normalised basis points: X stacked on X_target, in the work dtype.
    n_basis_ : int
        Number of basis points, n + m (one feature per basis point).
    k0_ : float
        Mean cosine between X and U, the point where each feature is split as phi = c + r.
    gamma_ : float
        The gamma the fitted state belongs to (set_params after fit cannot skew it).
    shift_ : float
        The constant part c = exp(-gamma (1 - k0_)) of every feature.
    dual_coef_ : ndarray of shape (n,) or (n, p)
        Dual ridge coefficients A, as in KernelRidge (1-d for a 1-d y).
    W_ : ndarray of shape (n_basis_, p)
        r(X)^T A, the remainder part of the features contracted with A once for predict.
    coef_sum_ : ndarray of shape (p,)
        1^T A, column sums of the dual coefficients.
    coef_s_ : ndarray of shape (p,)
        s_X^T A, where s_X holds the row sums of r(X).

    See Also
    --------
    sklearn.kernel_ridge.KernelRidge : kernel ridge on a precomputed or named kernel.
    """

    def __init__(self, *, gamma: float = 0.001, alpha: float = 1.0, block_size: int = 2048, dtype: str = "float32"):
        self.gamma = gamma
        self.alpha = alpha
        self.block_size = block_size
        self.dtype = dtype

    # --- helpers ---------------------------------------------------------------------------------
    def _check_params(self) -> np.dtype:
        if not np.isfinite(self.gamma) or self.gamma <= 0:
            raise ValueError(f"gamma must be a positive finite number, got {self.gamma!r}")
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a non-negative finite number, got {self.alpha!r}")
        if int(self.block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size!r}")
        dtype = np.dtype(self.dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        return dtype

    def _remainder(self, Xn: np.ndarray, start: int, stop: int) -> np.ndarray:
        """r = phi - c for rows Xn (already normalised) against U columns [start, stop), in the work dtype."""
        cos = Xn @ self.U_[start:stop].T
        cos -= self.k0_
        cos *= self.gamma_
        r = np.expm1(cos, out=cos)
        r *= self.shift_
        return r

    # --- estimator API ---------------------------------------------------------------------------
    def fit(self, X, y, X_target=None):
        """Learn the dual coefficients from centroids X, their labels y and the optional unlabeled X_target.

        Returns
        -------
        self : DAKLRegressor
        """
        dtype = self._check_params()
        X, Y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64)
        if X_target is None:
            X_target = np.empty((0, X.shape[1]))
        X_target = check_array(X_target, dtype=np.float64, ensure_min_samples=0, input_name="X_target")
        if X_target.shape[1] != X.shape[1]:
            raise ValueError(f"X_target has {X_target.shape[1]} features but X has {X.shape[1]}; they must match")
        Y2 = Y.reshape(len(Y), -1)
        n = len(X)
        Xn = cosine_normalise(X, dtype)
        self.U_ = np.vstack([Xn, cosine_normalise(X_target, dtype)])
        N = len(self.U_)
        self.n_basis_ = N
        # k0 = mean cosine between X and U (exact: mean(Xn) . mean(U)); the split point of phi = c + r.
        self.k0_ = float(np.clip(Xn.mean(0, dtype=np.float64) @ self.U_.mean(0, dtype=np.float64), -1, 1))
        self.gamma_ = float(self.gamma)  # the gamma the fitted state belongs to (set_params cannot skew it)
        self.shift_ = float(np.exp(-self.gamma_ * (1.0 - self.k0_)))
        c = self.shift_
        b = int(self.block_size)

        # Pass 1: R R^T (lower triangle, rank-b updates) and row sums s, both accumulated in float64.
        syrk = scipy.linalg.blas.get_blas_funcs("syrk", dtype=dtype)
        RRt = np.zeros((n, n), dtype=np.float64, order="F")
        s_x = np.zeros(n, dtype=np.float64)
        for start in range(0, N, b):
            r = self._remainder(Xn, start, min(start + b, N))  # n x b, C order
            s_x += r.sum(axis=1, dtype=np.float64)
            RRt += syrk(1.0, r.T, trans=1, lower=1)  # r.T is Fortran-ordered: no copy; = r r^T
        G = RRt
        G += N * c * c
        G += c * s_x[:, None]
        G += c * s_x[None, :]
        G[np.diag_indices_from(G)] += self.alpha
        try:
            factor = scipy.linalg.cho_factor(G, lower=True, overwrite_a=True, check_finite=False)
            A = scipy.linalg.cho_solve(factor, Y2, check_finite=False)
        except np.linalg.LinAlgError:  # alpha = 0 with a singular Gram: least-squares fallback
            G = np.tril(G) + np.tril(G, -1).T
            A = scipy.linalg.lstsq(G, Y2)[0]
        del G, RRt

        # Pass 2: what predict needs: W = r(X)^T A (N x p), 1^T A and s_X^T A.
        A_w = A.astype(dtype)
        W = np.empty((N, Y2.shape[1]), dtype=np.float64)
        for start in range(0, N, b):
            stop = min(start + b, N)
            W[start:stop] = self._remainder(Xn, start, stop).T @ A_w
        self.W_ = W.astype(dtype)
        self.coef_sum_ = A.sum(axis=0)
        self.coef_s_ = s_x @ A
        self.dual_coef_ = A[:, 0] if Y.ndim == 1 else A  # (n,) for 1-d Y, as KernelRidge
        return self

    def predict(self, X):
        """phi(X) phi(X_fit)^T A, computed in blocks of rows of X and columns of U.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,) or (n_samples, p), float64
        """
        check_is_fitted(self)
        dtype = self.U_.dtype
        X = validate_data(self, X, reset=False, dtype=np.float64)
        c, N, b = self.shift_, self.n_basis_, int(self.block_size)
        out = np.empty((len(X), self.W_.shape[1]), dtype=np.float64)
        rows = max(1, min(len(X), 4096))
        for r0 in range(0, len(X), rows):
            Zn = cosine_normalise(X[r0 : r0 + rows], dtype)
            acc = np.zeros((len(Zn), self.W_.shape[1]), dtype=np.float64)
            s_z = np.zeros(len(Zn), dtype=np.float64)
            for start in range(0, N, b):
                stop = min(start + b, N)
                r = self._remainder(Zn, start, stop)
                s_z += r.sum(axis=1, dtype=np.float64)
                acc += r @ self.W_[start:stop]
            acc += (N * c * c + c * s_z)[:, None] * self.coef_sum_[None, :]
            acc += c * self.coef_s_[None, :]
            out[r0 : r0 + rows] = acc
        return out[:, 0] if self.dual_coef_.ndim == 1 else out
