"""Noise levels of consistency training: the Karras grid, the curricula N(k) and mu(k), and which
pair of levels a training example uses (pure JAX, no cmjax imports but the schedule constant).

Conventions as in :mod:`cmjax.consistency`: the training grid is **increasing**,
``t_0 = sigma_min < ... < t_{N-1} = sigma_max``, a pair is ``(t_n, t_{n+1})``, ``n in [0, N-2]``.

Sources (facts only): Song et al., "Consistency Models" (2023) and openai/consistency_models(_cifar10);
Song & Dhariwal, "Improved Techniques for Training Consistency Models" (iCT, 2023); Karras et al.,
"Elucidating the Design Space of Diffusion-Based Generative Models" (EDM, 2022).

Traced number of scales
-----------------------
In iCT the number of discretisation steps ``N`` grows with the training step.  To keep a
jitted train step from recompiling whenever ``N`` changes, every function that needs grid
values at a training pair computes them from the index with the closed-form Karras formula
(:func:`karras_sigma_at`), and lognormal pair sampling draws from a categorical over a
fixed, static maximum length ``max_scales - 1`` with the entries ``n >= N - 1`` masked out
(:func:`lognormal_pair_logits`).  ``N`` itself may then be a traced int32 scalar.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_DATA = 0.5  # EDM's data standard deviation; the one definition (the decoder's schedule imports it)


__all__ = [
    "SIGMA_MIN", "SIGMA_MAX", "SIGMA_DATA", "RHO", "GridFn", "is_static_int",
    "karras_sigmas", "karras_sigma_at", "grid_or_karras",
    "ct_num_scales", "ct_ema_decay", "ict_num_scales",
    "lognormal_pair_probs", "lognormal_pair_logits", "sample_pair_indices",
]

SIGMA_MIN = 0.002   # eps, the boundary time t_min
SIGMA_MAX = 80.0    # T
RHO = 7.0

IntLike = Union[int, np.integer, jax.Array]
# (i, N) -> t_i: an increasing noise-level grid evaluated at (possibly traced) integer indices.
GridFn = Callable[[jax.Array, IntLike], jax.Array]


def is_static_int(v) -> bool:
    """A Python (or numpy) int, not a bool and not a traced value."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------
# The Karras grid (EDM; CM paper's notation reversed)
# --------------------------------------------------------------------------------------

def karras_sigma_at(i, num_scales, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                    rho: float = RHO, dtype=jnp.float32) -> jax.Array:
    """Value of the **increasing** Karras grid at (possibly traced) integer index ``i``.

    ``t_i = (eps^(1/rho) + i/(N-1) * (T^(1/rho) - eps^(1/rho)))^rho`` for ``i in [0, N-1]``,
    i.e. the CM paper's formula with the index reversed (``t_0 = eps``, ``t_{N-1} = T``).
    The endpoints are returned exactly (``t_0 == float32(eps)``, ``t_{N-1} == float32(T)``)
    so that the boundary condition ``f(x, eps) = x`` holds bit-exactly on the grid.

    Args:
      i: integer index, any shape, may be traced.
      num_scales: ``N >= 2`` (Python int or traced int scalar).
    Returns:
      ``dtype`` (float32 unless asked) array with the shape of ``i``.
    """
    i = jnp.asarray(i)
    n = jnp.asarray(num_scales)
    frac = i.astype(dtype) / (n - 1).astype(dtype)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    t = (lo + frac * (hi - lo)) ** rho
    t = jnp.where(i <= 0, jnp.asarray(sigma_min, dtype), t)
    t = jnp.where(i >= n - 1, jnp.asarray(sigma_max, dtype), t)
    return t.astype(dtype)


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> jax.Array:
    """The Karras (EDM) grid of ``n`` noise levels, **increasing**: ``(n,)`` float32.

    ``t_i = (eps^(1/rho) + i/(n-1) * (T^(1/rho) - eps^(1/rho)))^rho``, ``i = 0..n-1``;
    ``t_0 = sigma_min`` and ``t_{n-1} = sigma_max`` exactly.  The CM paper writes the same
    grid decreasing (``i = 0`` at T); for samplers use ``karras_sigmas(n)[::-1]``.

    Args:
      n: static Python int >= 2 (use :func:`karras_sigma_at` for a traced ``N``).
    """
    if not is_static_int(n) or n < 2:
        raise ValueError(f"karras_sigmas needs a static int n >= 2, got {n!r}")
    return karras_sigma_at(jnp.arange(n), n, sigma_min, sigma_max, rho)


def grid_or_karras(grid_fn: Optional[GridFn], sigma_min, sigma_max, rho, dtype=jnp.float32) -> GridFn:
    """``grid_fn`` itself, or the Karras grid with the given constants (computed in ``dtype``)."""
    if grid_fn is not None:
        return grid_fn
    return lambda i, n: karras_sigma_at(i, n, sigma_min, sigma_max, rho, dtype)



# --------------------------------------------------------------------------------------
# Curricula
# --------------------------------------------------------------------------------------

def _ct_num_scales_exact(k: int, K: int, s0: int, s1: int) -> int:
    k = min(max(int(k), 0), int(K))
    a = (s1 + 1) ** 2 - s0 ** 2
    # q = k/K * a + s0^2 ;  N - 1 = ceil(sqrt(q) - 1) = r - 1 with r = smallest int, r^2 >= q.
    num = k * a + s0 ** 2 * K
    q_ceil = -(-num // K)                          # r^2 >= q  <=>  r^2 >= ceil(q)
    r = math.isqrt(q_ceil - 1) + 1 if q_ceil > 0 else 0
    return max(r - 1, 1) + 1


def ct_num_scales(k: IntLike, K: IntLike, s0: int = 2, s1: int = 150):
    """Original CT curriculum (CM paper; openai/consistency_models_cifar10's ``jcm/losses.py``).

    ``N(k) = ceil(sqrt(k/K * ((s1+1)^2 - s0^2) + s0^2) - 1) + 1``, so ``N(0) = s0`` and
    ``N(K) = s1 + 1`` (s1 counts intervals: 151 grid points for the defaults).  As in
    openai/consistency_models the number of intervals is floored at 1 (N >= 2).  ``k`` is
    clipped to ``[0, K]``, so training past ``K`` keeps ``N = s1 + 1``.

    Python ints in -> exact integer arithmetic, Python ``int`` out.  Any traced/array input ->
    ``jnp`` float32 arithmetic, int32 scalar out (may differ from the exact value by one at a
    ``k`` where ``sqrt(q)`` lands within float32 rounding of an integer).
    """
    if is_static_int(k) and is_static_int(K):
        return _ct_num_scales_exact(int(k), int(K), s0, s1)
    k = jnp.asarray(k).astype(jnp.float32)
    K = jnp.asarray(K).astype(jnp.float32)
    frac = jnp.clip(k / K, 0.0, 1.0)
    a = float((s1 + 1) ** 2 - s0 ** 2)
    scales = jnp.ceil(jnp.sqrt(frac * a + float(s0 ** 2)) - 1.0)
    return (jnp.maximum(scales, 1.0) + 1.0).astype(jnp.int32)


def ct_ema_decay(k: IntLike, K: IntLike, mu0: float = 0.9, s0: int = 2, s1: int = 150):
    """Target-network EMA rate of original CT: ``mu(k) = mu0^(s0 / (N(k) - 1))``.

    As coded in openai/consistency_models (``exp(s0 * ln(mu0) / (N - 1))``, N from
    :func:`ct_num_scales`); e.g. ``mu(0) = 0.9^(2/1) = 0.81`` and ``mu(K) = 0.9^(2/150)``.
    Python ints in -> Python float; traced -> float32 scalar.
    """
    n = ct_num_scales(k, K, s0, s1)
    if isinstance(n, int):
        return mu0 ** (s0 / (n - 1))
    return jnp.exp(s0 * math.log(mu0) / (n - 1).astype(jnp.float32))


def ict_num_scales(k: IntLike, K: IntLike, s0: int = 10, s1: int = 1280):
    """iCT exponential curriculum (Song & Dhariwal 2023, "Improved Techniques for Training CMs").

    ``K' = floor(K / (log2 floor(s1/s0) + 1))``, ``N(k) = min(s0 * 2^floor(k/K'), s1) + 1``.
    For K = 400000: K' = 50000 and N = 11, 21, 41, ..., 641, then capped at 1281 from
    k = 350000 on.  ``s0``, ``s1`` are static Python ints; ``k``, ``K`` Python ints (-> ``int``)
    or traced ints (-> int32 scalar).
    """
    ratio = s1 // s0
    if ratio < 1:
        raise ValueError("need s1 >= s0")
    denom = math.log2(ratio) + 1.0
    # number of doublings after which the cap s1 is reached (bounds the exponent: no overflow)
    max_e = max(int(math.ceil(math.log2(s1 / s0))), 0) + 1
    if is_static_int(k) and is_static_int(K):
        kp = max(int(math.floor(int(K) / denom)), 1)
        e = min(max(int(k), 0) // kp, max_e)
        return min(s0 * 2 ** e, s1) + 1
    k = jnp.asarray(k).astype(jnp.int32)
    K = jnp.asarray(K)
    if float(denom).is_integer():
        kp = K.astype(jnp.int32) // int(denom)
    else:
        kp = jnp.floor(K.astype(jnp.float32) / denom).astype(jnp.int32)
    kp = jnp.maximum(kp, 1)
    e = jnp.clip(k // kp, 0, max_e)
    return (jnp.minimum(s0 * jnp.left_shift(jnp.int32(1), e), s1) + 1).astype(jnp.int32)


# --------------------------------------------------------------------------------------
# iCT's lognormal pair distribution
# --------------------------------------------------------------------------------------

def _lognormal_cdf_diffs(t_lo: jax.Array, t_hi: jax.Array, p_mean: float, p_std: float
                         ) -> jax.Array:
    s = math.sqrt(2.0) * p_std
    return (jax.scipy.special.erf((jnp.log(t_hi) - p_mean) / s)
            - jax.scipy.special.erf((jnp.log(t_lo) - p_mean) / s))


def lognormal_pair_probs(sigmas, p_mean: float = -1.1, p_std: float = 2.0) -> jax.Array:
    """iCT discrete lognormal distribution over training pairs ``(t_n, t_{n+1})``.

    ``p(n) ∝ erf((ln t_{n+1} - Pm)/(sqrt2 Ps)) - erf((ln t_n - Pm)/(sqrt2 Ps))``, i.e. the
    mass that ``ln t ~ N(Pm, Ps^2)`` puts on ``[t_n, t_{n+1}]``, renormalised over the grid.

    Args:
      sigmas: **increasing** grid ``(N,)``.
    Returns:
      ``(N-1,)`` float32 probabilities summing to 1.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if not isinstance(sigmas, jax.core.Tracer):
        if np.any(np.diff(np.asarray(sigmas)) <= 0):
            raise ValueError("lognormal_pair_probs needs an increasing grid")
    w = _lognormal_cdf_diffs(sigmas[:-1], sigmas[1:], p_mean, p_std)
    return w / jnp.sum(w)


def lognormal_pair_logits(num_scales, max_scales: int, p_mean: float = -1.1,
                          p_std: float = 2.0, sigma_min: float = SIGMA_MIN,
                          sigma_max: float = SIGMA_MAX, rho: float = RHO,
                          grid_fn: Optional[GridFn] = None) -> jax.Array:
    """Log-probabilities of :func:`lognormal_pair_probs` for a **traced** ``N``.

    Returns a fixed-length ``(max_scales - 1,)`` float32 vector: entry ``n < N-1`` holds
    ``log p(n)`` on the N-point Karras grid (computed with :func:`karras_sigma_at`), entries
    ``n >= N-1`` are ``-inf``.  ``max_scales`` must be static and ``>= N``.  ``grid_fn(i, N)``,
    if given, replaces the Karras grid (e.g. a discrete diffusion schedule's sigmas).
    """
    grid = grid_or_karras(grid_fn, sigma_min, sigma_max, rho)
    n = jnp.arange(max_scales - 1)
    t_lo = grid(n, num_scales)
    t_hi = grid(n + 1, num_scales)
    w = _lognormal_cdf_diffs(t_lo, t_hi, p_mean, p_std)
    valid = n < jnp.asarray(num_scales) - 1
    w = jnp.where(valid, jnp.maximum(w, 1e-30), 1.0)
    logits = jnp.where(valid, jnp.log(w), -jnp.inf)
    return logits - jax.nn.logsumexp(logits)


def sample_pair_indices(key: jax.Array, sigmas_or_N, batch: int, *,
                        distribution: str = "lognormal", max_scales: Optional[int] = None,
                        p_mean: float = -1.1, p_std: float = 2.0,
                        sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                        rho: float = RHO, grid_fn: Optional[GridFn] = None) -> jax.Array:
    """Draw ``batch`` pair indices ``n in [0, N-2]`` (pair ``(t_n, t_{n+1})``): ``(batch,)`` int32.

    Args:
      key: PRNG key.
      sigmas_or_N: either an increasing grid ``(N,)`` (its lognormal probabilities are used),
        or the number of scales ``N`` as a Python int or a traced int scalar (the Karras grid
        with ``sigma_min``, ``sigma_max``, ``rho`` is implied).
      distribution: ``"lognormal"`` (iCT) or ``"uniform"`` (original CT / CD).
      max_scales: static upper bound on ``N``; required for lognormal sampling with a traced
        ``N`` (categorical over ``max_scales - 1`` entries, masked to ``N - 1``).  Defaults to
        ``N`` for a static ``N``.
      grid_fn: ``(i, N) -> t_i`` replacing the implied Karras grid (when ``N`` is given).
    """
    arr = None if is_static_int(sigmas_or_N) else jnp.asarray(sigmas_or_N)
    if arr is not None and arr.ndim == 1:                       # explicit grid
        if distribution == "uniform":
            return jax.random.randint(key, (batch,), 0, arr.shape[0] - 1, dtype=jnp.int32)
        probs = lognormal_pair_probs(arr, p_mean, p_std)
        return jax.random.categorical(key, jnp.log(probs), shape=(batch,)).astype(jnp.int32)
    N = sigmas_or_N
    if distribution == "uniform":
        return jax.random.randint(key, (batch,), 0, jnp.asarray(N) - 1, dtype=jnp.int32)
    if distribution != "lognormal":
        raise ValueError(f"unknown distribution {distribution!r}")
    if max_scales is None:
        if not is_static_int(N):
            raise ValueError("lognormal sampling with a traced N needs a static max_scales")
        max_scales = int(N)
    logits = lognormal_pair_logits(N, max_scales, p_mean, p_std, sigma_min, sigma_max, rho,
                                   grid_fn=grid_fn)
    return jax.random.categorical(key, logits, shape=(batch,)).astype(jnp.int32)
