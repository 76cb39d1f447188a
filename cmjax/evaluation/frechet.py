"""The Frechet distance between Gaussian statistics of features, in float64 (the math of FID).

    features (N, D) -> statistics -> FIDStats(mu (D,), sigma (D, D), num_images)
    fid(a, b) = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))

Statistics are saved as ``.npz`` files of ``mu``/``sigma`` (the format pytorch-fid and clean-fid
write too). Where the features come from is :mod:`cmjax.evaluation.fid`'s job.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

from cmjax.files import array_headers, atomic_write

__all__ = ["FIDStats", "fid", "frechet_distance", "statistics"]


@dataclasses.dataclass(frozen=True, eq=False)
class FIDStats:
    """Gaussian statistics of Inception features: ``mu (D,)``, ``sigma (D, D)`` float64, ``num_images``.

    ``factor``: optionally a ``(D, k)`` matrix with ``sigma = factor @ factor.T`` (kept by
    :func:`statistics` when there are fewer images than dimensions, so that FIDs of small sets
    cost ``O(D^2 k)`` instead of ``O(D^3)``); it is not saved.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    factor: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False)

    @functools.cached_property
    def sigma_factor(self) -> np.ndarray:
        """A ``(D, r)`` matrix ``C`` with ``sigma = C C^T`` (``r`` = numerical rank): ``factor`` if
        given, else from one eigendecomposition, the costly part of an FID, done once per object:
        keep the reference's object to score many sample sets against it."""
        if self.factor is not None:
            return self.factor
        w, v = np.linalg.eigh((self.sigma + self.sigma.T) / 2)
        w = _psd_eigvals(w)
        keep = w > 0
        return v[:, keep] * np.sqrt(w[keep])

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``mu``, ``sigma``, ``num_images`` to an ``.npz`` (atomically: temp file + rename)."""
        path = Path(path)
        atomic_write(path, lambda f: np.savez(f, mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FIDStats":
        """Read an ``.npz`` with ``mu`` and ``sigma`` (cmjax's, pytorch-fid's or clean-fid's)."""
        try:
            array_headers(path)  # sizes checked against the file before np.load allocates them
            with np.load(path) as f:
                if "mu" not in f or "sigma" not in f:
                    raise ValueError(f"{path}: an FID statistics file needs arrays 'mu' and 'sigma', "
                                     f"found {sorted(f.files)}")
                mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
                num = int(f["num_images"]) if "num_images" in f else -1
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from e
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith(f"{path}: ") else f"{path}: {e}") from None
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        return cls(mu, sigma, num)


def statistics(features: np.ndarray) -> FIDStats:
    """``(N, D)`` features -> mean and unbiased covariance (float64). Needs N >= 2."""
    feats = np.asarray(features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows (N, D), got shape {feats.shape}")
    n, d = feats.shape
    mu = feats.mean(axis=0, dtype=np.float64)
    if n <= d:
        centered = (feats.astype(np.float64) - mu) / np.sqrt(n - 1)
        return FIDStats(mu, centered.T @ centered, n, centered.T)
    sigma = np.zeros((d, d), np.float64)
    for i in range(0, n, 4096):  # float64 a chunk at a time: 50k x 2048 features stay float32
        c = feats[i:i + 4096].astype(np.float64) - mu
        sigma += c.T @ c
    return FIDStats(mu, sigma / (n - 1), n)


def _psd_eigvals(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with those below its numerical-rank tolerance
    (``max * n * eps``, as ``np.linalg.matrix_rank``) set to 0: they are rounding noise, and their
    square roots would otherwise add up to a visible bias (e.g. FID of a set with itself)."""
    tol = max(float(w.max()), 0.0) * w.size * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in float64.

    ``tr((S1 S2)^(1/2))`` is the sum of the square roots of the eigenvalues of ``S1 S2``, which are
    those of the symmetric PSD matrix ``C^T S2 C`` for any factor ``S1 = C C^T`` (here from
    ``eigh(S1)``): exact for covariances, no complex parts, no failure on the singular matrices
    that fewer than D+1 samples give (pytorch-fid uses ``scipy.linalg.sqrtm(S1 S2)``; the two
    agree to rounding).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    return fid(FIDStats(mu1, s1, -1), FIDStats(mu2, s2, -1))


def fid(a: FIDStats, b: FIDStats) -> float:
    """FID between two sets of statistics (symmetric). The factored side is the one whose
    :attr:`FIDStats.sigma_factor` is cheaper (given or already computed, fewest columns), else
    ``a``: pass the reference first to reuse its factor."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics do not match: mu {a.mu.shape} / {b.mu.shape}, "
                         f"sigma {a.sigma.shape} / {b.sigma.shape}")

    def cost(st: FIDStats) -> float:
        ready = st.factor if st.factor is not None else st.__dict__.get("sigma_factor")
        return ready.shape[1] if ready is not None else math.inf

    if cost(b) < cost(a):
        a, b = b, a
    c = a.sigma_factor
    m = c.T @ b.sigma @ c
    tr_covmean = float(np.sum(np.sqrt(_psd_eigvals(np.linalg.eigvalsh((m + m.T) / 2)))))
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)
