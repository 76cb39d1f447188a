"""Consistency models: parameterisation, curricula, losses and samplers (pure JAX).

Everything here is a pure function of arrays and callables: no Flax modules, no global state.
Networks enter as plain callables, so any model fits; closing over parameters and dropout
keys is the caller's job.

Conventions
-----------
* Images are NHWC arrays ``(B, H, W, C)`` with data values in ``[-1, 1]``.
* Noise levels follow EDM: ``sigma = t`` and ``x_t = x + t * z`` with ``z ~ N(0, I)``.
* Noise levels enter callables as a per-example vector ``t`` of shape ``(B,)``.
* The training grid is **increasing**: ``t_0 = sigma_min < t_1 < ... < t_{N-1} = sigma_max``,
  and a training pair is ``(t_n, t_{n+1})`` for ``n in [0, N-2]`` (the CM paper's notation,
  shifted to 0-based indices).  Samplers take **decreasing** schedules (first = sigma_max).

Sources (facts only, no code taken): Song et al., "Consistency Models" (2023) and
openai/consistency_models(_cifar10); Song & Dhariwal, "Improved Techniques for Training
Consistency Models" (iCT, 2023); Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models" (EDM, 2022).

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
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SIGMA_MIN", "SIGMA_MAX", "SIGMA_DATA", "RHO",
    "karras_sigmas", "karras_sigma_at", "cm_scalings", "noise_conditioning",
    "consistency_function", "edm_denoiser",
    "ct_num_scales", "ct_ema_decay", "ict_num_scales",
    "lognormal_pair_probs", "lognormal_pair_logits", "sample_pair_indices",
    "GridFn", "pseudo_huber", "huber_c", "ict_weighting", "heun_step",
    "ict_loss", "ct_loss", "cd_loss", "edm_denoising_loss",
    "sample_onestep", "sample_multistep",
]

SIGMA_MIN = 0.002   # eps, the boundary time t_min
SIGMA_MAX = 80.0    # T
SIGMA_DATA = 0.5
RHO = 7.0

ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]        # (x_scaled, noise_cond) -> F
ConsistencyFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t) -> x0_hat
DenoiserFn = Callable[[jax.Array, jax.Array], jax.Array]     # (x, sigma) -> D(x, sigma)

IntLike = Union[int, np.integer, jax.Array]
# (i, N) -> t_i: an increasing noise-level grid evaluated at (possibly traced) integer indices.
GridFn = Callable[[jax.Array, IntLike], jax.Array]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def _is_static_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _float_dtype(x) -> jnp.dtype:
    """float32, or float64 when ``x`` is float64 (x64 mode); bf16/fp16 inputs give float32."""
    return jnp.result_type(jnp.asarray(x).dtype, jnp.float32)


def _per_example(t, x: jax.Array) -> jax.Array:
    """Broadcast a scalar or ``(B,)`` noise level to a ``(B,)`` vector for batch ``x``."""
    t = jnp.asarray(t, _float_dtype(x))
    if t.ndim > 1:
        raise ValueError(f"t must be a scalar or a (B,) vector, got shape {t.shape}")
    return jnp.broadcast_to(t, (x.shape[0],))


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """``(B,)`` -> ``(B, 1, 1, 1)`` (as many trailing singleton axes as ``x`` needs)."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def _sum_flat(v: jax.Array) -> jax.Array:
    return jnp.sum(v, axis=tuple(range(1, v.ndim)))


def _mean_flat(v: jax.Array) -> jax.Array:
    return jnp.mean(v, axis=tuple(range(1, v.ndim)))


# --------------------------------------------------------------------------------------
# 1. Parameterisation (CM paper, appendix C; EDM, Table 1)
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
    if not _is_static_int(n) or n < 2:
        raise ValueError(f"karras_sigmas needs a static int n >= 2, got {n!r}")
    return karras_sigma_at(jnp.arange(n), n, sigma_min, sigma_max, rho)


def cm_scalings(t, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA
                ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Consistency-model preconditioning ``(c_skip, c_out, c_in)`` at noise level ``t``.

    CM paper, appendix C:
      ``c_skip = sd^2 / ((t - eps)^2 + sd^2)``,
      ``c_out  = (t - eps) * sd / sqrt(t^2 + sd^2)``,
      ``c_in   = 1 / sqrt(t^2 + sd^2)``.
    At ``t = eps`` this gives ``c_skip = 1`` and ``c_out = 0`` exactly, hence ``f(x, eps) = x``.
    With ``sigma_min = 0`` these are the EDM denoiser scalings.

    Args:
      t: noise level(s), any shape.
    Returns:
      three arrays with the shape of ``t`` (float32 unless ``t`` is float64).
    """
    t = jnp.asarray(t)
    t = t.astype(_float_dtype(t))
    sd2 = sigma_data ** 2
    te = t - sigma_min
    c_skip = sd2 / (te ** 2 + sd2)
    c_out = te * sigma_data / jnp.sqrt(t ** 2 + sd2)
    c_in = 1.0 / jnp.sqrt(t ** 2 + sd2)
    return c_skip, c_out, c_in


def noise_conditioning(t) -> jax.Array:
    """The network's noise input ``c_noise(t) = 0.25 * ln(t)`` (EDM / CM). Same shape as ``t``."""
    t = jnp.asarray(t)
    return 0.25 * jnp.log(t.astype(_float_dtype(t)))


def consistency_function(apply_fn: ApplyFn, x_t: jax.Array, t, *,
                         sigma_min: float = SIGMA_MIN,
                         sigma_data: float = SIGMA_DATA) -> jax.Array:
    """``f_theta(x_t, t) = c_skip(t) * x_t + c_out(t) * F(c_in(t) * x_t, 0.25 ln t)``.

    Args:
      apply_fn: plain callable ``(x_scaled (B,H,W,C), noise_cond (B,)) -> F (B,H,W,C)``;
        the caller closes over parameters, dropout keys, class labels, ...
      x_t: noisy images ``(B, H, W, C)``.
      t: noise level, a scalar or ``(B,)``; it reaches ``apply_fn`` as a ``(B,)`` vector.
    Returns:
      ``x0_hat`` with the shape of ``x_t`` (float32 for float32/bf16 inputs).
      ``f(x, sigma_min) == x`` exactly (c_skip = 1, c_out = 0) for any finite ``F``.
    """
    t = _per_example(t, x_t)
    c_skip, c_out, c_in = cm_scalings(t, sigma_min, sigma_data)
    F = apply_fn(_bcast(c_in, x_t) * x_t, noise_conditioning(t))
    return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * F


def edm_denoiser(apply_fn: ApplyFn, x: jax.Array, sigma, *,
                 sigma_data: float = SIGMA_DATA) -> jax.Array:
    """EDM-preconditioned denoiser ``D(x, sigma)`` (a teacher for CD), ``(B,H,W,C)``.

    ``D = c_skip x + c_out F(c_in x, 0.25 ln sigma)`` with the EDM scalings
    ``c_skip = sd^2/(sigma^2+sd^2)``, ``c_out = sigma sd/sqrt(sigma^2+sd^2)``,
    ``c_in = 1/sqrt(sigma^2+sd^2)``, i.e. :func:`consistency_function` with ``sigma_min = 0``.
    """
    return consistency_function(apply_fn, x, sigma, sigma_min=0.0, sigma_data=sigma_data)


# --------------------------------------------------------------------------------------
# 2. Curricula
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
    if _is_static_int(k) and _is_static_int(K):
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
    if _is_static_int(k) and _is_static_int(K):
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
# 3. iCT pieces: lognormal pair sampling, pseudo-Huber, weighting
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
    grid = _grid(grid_fn, sigma_min, sigma_max, rho)
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
    arr = None if _is_static_int(sigmas_or_N) else jnp.asarray(sigmas_or_N)
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
        if not _is_static_int(N):
            raise ValueError("lognormal sampling with a traced N needs a static max_scales")
        max_scales = int(N)
    logits = lognormal_pair_logits(N, max_scales, p_mean, p_std, sigma_min, sigma_max, rho,
                                   grid_fn=grid_fn)
    return jax.random.categorical(key, logits, shape=(batch,)).astype(jnp.int32)


def huber_c(dim: int) -> float:
    """iCT pseudo-Huber constant ``c = 0.00054 * sqrt(dim)``, ``dim = H*W*C`` (CIFAR: 0.03)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
    """Pseudo-Huber distance over the **whole image**, per example: ``(B,)`` float32.

    ``d(x, y) = sqrt(||x - y||_2^2 + c^2) - c`` with the squared norm summed over all
    non-batch axes (iCT), *not* applied element-wise.  Computed in float32 (float64 for float64).
    """
    x = jnp.asarray(x).astype(_float_dtype(x))
    y = jnp.asarray(y).astype(x.dtype)
    return jnp.sqrt(_sum_flat((x - y) ** 2) + c * c) - c


def ict_weighting(t_lo: jax.Array, t_hi: jax.Array) -> jax.Array:
    """iCT loss weight ``lambda = 1 / (t_{n+1} - t_n)`` (same shape as the inputs)."""
    return 1.0 / (t_hi - t_lo)


def _distance(metric: str, a: jax.Array, b: jax.Array, c: Optional[float]) -> jax.Array:
    a = a.astype(_float_dtype(a))
    b = b.astype(a.dtype)
    if metric == "l2":
        return _mean_flat((a - b) ** 2)
    if metric == "l1":
        return _mean_flat(jnp.abs(a - b))
    if metric == "pseudo_huber":
        cc = huber_c(int(np.prod(a.shape[1:]))) if c is None else c
        return pseudo_huber(a, b, cc)
    raise ValueError(f"unknown metric {metric!r}")


# --------------------------------------------------------------------------------------
# 4. Losses
# --------------------------------------------------------------------------------------

def _grid(grid_fn: Optional[GridFn], sigma_min, sigma_max, rho, dtype=jnp.float32) -> GridFn:
    """``grid_fn`` itself, or the Karras grid with the given constants (computed in ``dtype``)."""
    if grid_fn is not None:
        return grid_fn
    return lambda i, n: karras_sigma_at(i, n, sigma_min, sigma_max, rho, dtype)


def _pair_points(key, x, n, num_scales, sigma_min, sigma_max, rho, grid_fn=None):
    """Shared noise for a batch of pairs: ``(z, t_lo, t_hi)`` in x's float dtype (float32 for
    float32/bf16 data, float64 for float64), ``z = normal(key, x.shape)``."""
    dt = _float_dtype(x)
    grid = _grid(grid_fn, sigma_min, sigma_max, rho, dt)
    t_lo = grid(n, num_scales).astype(dt)
    t_hi = grid(n + 1, num_scales).astype(dt)
    z = jax.random.normal(key, x.shape, dt)
    return z, t_lo, t_hi


def ict_loss(student_fn: ConsistencyFn, target_fn: ConsistencyFn, x: jax.Array,
             key: jax.Array, num_scales, *, max_scales: Optional[int] = None,
             sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
             p_mean: float = -1.1, p_std: float = 2.0, c: Optional[float] = None,
             grid_fn: Optional[GridFn] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Improved consistency training loss (iCT, Song & Dhariwal 2023).

    ``L = mean_b lambda_b * d(f_theta(x + t_{n+1} z, t_{n+1}), sg(f_theta(x + t_n z, t_n)))``
    with ``n ~`` discrete lognormal, the same ``z`` at both levels, pseudo-Huber ``d`` over the
    whole image (``c = 0.00054 sqrt(H W C)`` by default) and ``lambda = 1/(t_{n+1} - t_n)``.

    Args:
      student_fn, target_fn: ``(x_t (B,H,W,C), t (B,)) -> x0_hat``.  In iCT both close over
        the **same** parameters (no EMA teacher) and the **same** dropout key, so the two
        evaluations differ only in their inputs; the target output is wrapped in
        ``stop_gradient`` here.
      x: clean data ``(B, H, W, C)`` in ``[-1, 1]``.
      key: PRNG key, used as ``key_n, key_z = jax.random.split(key)``: ``n`` from
        ``sample_pair_indices(key_n, N, B, max_scales=...)``, ``z = normal(key_z, x.shape)``.
      num_scales: ``N`` (Python int or traced int32 scalar, see :func:`ict_num_scales`).
      max_scales: static bound on ``N`` (e.g. ``s1 + 1 = 1281``); needed when ``N`` is traced.
        A jitted step with traced ``N`` and fixed ``max_scales`` compiles once for all ``N``.
      grid_fn: optional ``(i, N) -> t_i`` replacing the Karras grid (pairs, lognormal
        probabilities and weights then all use it); e.g. the consistency decoder's discrete
        VP schedule expressed as EDM sigmas.
    Returns:
      ``(loss, metrics)``; the loss and the distance are computed in float32 (float64 for
      float64 data, as every loss here).
    """
    key_n, key_z = jax.random.split(key)
    n = sample_pair_indices(key_n, num_scales, x.shape[0], distribution="lognormal",
                            max_scales=max_scales, p_mean=p_mean, p_std=p_std,
                            sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, grid_fn=grid_fn)
    z, t_lo, t_hi = _pair_points(key_z, x, n, num_scales, sigma_min, sigma_max, rho, grid_fn)
    xf = x.astype(z.dtype)
    student = student_fn(xf + _bcast(t_hi, x) * z, t_hi)
    target = jax.lax.stop_gradient(target_fn(xf + _bcast(t_lo, x) * z, t_lo))
    cc = huber_c(int(np.prod(x.shape[1:]))) if c is None else c
    d = pseudo_huber(student, target, cc)
    w = ict_weighting(t_lo, t_hi)
    loss = jnp.mean(w * d)
    metrics = {"loss": loss, "distance": jnp.mean(d), "weight": jnp.mean(w),
               "t_hi": jnp.mean(t_hi), "num_scales": jnp.asarray(num_scales)}
    return loss, metrics


def ct_loss(student_fn: ConsistencyFn, target_fn: ConsistencyFn, x: jax.Array,
            key: jax.Array, num_scales, *, metric: str = "l2",
            sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
            c: Optional[float] = None, grid_fn: Optional[GridFn] = None
            ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Original consistency training loss (CM paper, Alg. 3), ``lambda = 1``.

    ``L = mean_b d(f_theta(x + t_{n+1} z, t_{n+1}), sg(f_target(x + t_n z, t_n)))`` with
    ``n ~ U{0, ..., N-2}`` on the increasing Karras grid and one ``z`` for both points.

    Args:
      student_fn: ``(x_t, t) -> x0_hat`` with the online parameters.
      target_fn: same network with the EMA target parameters (:func:`ct_ema_decay`); the
        caller gives both the **same** dropout key.  Its output is stop-gradient'ed here.
      x: ``(B, H, W, C)`` data in ``[-1, 1]``; ``key`` is split as ``key_n, key_z``.
      num_scales: ``N`` (Python int or traced scalar; no recompilation needed).
      metric: ``"l2"`` (mean over pixels of the squared difference, as openai's ``mean_flat``),
        ``"l1"`` (mean absolute difference) or ``"pseudo_huber"`` (whole image, constant ``c``,
        default ``huber_c(H*W*C)``).
      grid_fn: optional ``(i, N) -> t_i`` replacing the Karras grid.
    """
    key_n, key_z = jax.random.split(key)
    n = sample_pair_indices(key_n, num_scales, x.shape[0], distribution="uniform")
    z, t_lo, t_hi = _pair_points(key_z, x, n, num_scales, sigma_min, sigma_max, rho, grid_fn)
    xf = x.astype(z.dtype)
    student = student_fn(xf + _bcast(t_hi, x) * z, t_hi)
    target = jax.lax.stop_gradient(target_fn(xf + _bcast(t_lo, x) * z, t_lo))
    d = _distance(metric, student, target, c)
    loss = jnp.mean(d)
    return loss, {"loss": loss, "t_hi": jnp.mean(t_hi), "num_scales": jnp.asarray(num_scales)}


def heun_step(denoiser_fn: DenoiserFn, x: jax.Array, t_from, t_to) -> jax.Array:
    """One Heun (2nd-order) step of the probability-flow ODE ``dx/dt = (x - D(x, t)) / t``.

    ``d1 = (x - D(x, t_from)) / t_from``; ``x_e = x + (t_to - t_from) d1``;
    ``d2 = (x_e - D(x_e, t_to)) / t_to``; returns ``x + (t_to - t_from) (d1 + d2) / 2``.
    ``t_from``, ``t_to``: scalars or ``(B,)``, ``t_to > 0``.  Shapes ``(B, H, W, C)``.
    """
    t_from = _per_example(t_from, x)
    t_to = _per_example(t_to, x)
    tf, tt = _bcast(t_from, x), _bcast(t_to, x)
    d1 = (x - denoiser_fn(x, t_from)) / tf
    x_e = x + (tt - tf) * d1
    d2 = (x_e - denoiser_fn(x_e, t_to)) / tt
    return x + (tt - tf) * 0.5 * (d1 + d2)


def cd_loss(student_fn: ConsistencyFn, target_fn: ConsistencyFn, denoiser_fn: DenoiserFn,
            x: jax.Array, key: jax.Array, num_scales, *, metric: str = "l2",
            sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
            c: Optional[float] = None, grid_fn: Optional[GridFn] = None
            ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Consistency distillation loss (CM paper, Alg. 2), ``lambda = 1``.

    ``x_hi = x + t_{n+1} z``; ``x_lo = heun_step(D, x_hi, t_{n+1}, t_n)`` with the teacher EDM
    denoiser ``denoiser_fn(x, sigma (B,)) -> D(x)``; loss
    ``mean_b d(f_theta(x_hi, t_{n+1}), sg(f_target(x_lo, t_n)))``, ``n ~ U{0..N-2}``.
    Key usage, grid and metrics exactly as :func:`ct_loss` (with an exact teacher for a
    point mass at ``x`` the two losses coincide).  The teacher output is stop-gradient'ed.
    ``grid_fn``: optional ``(i, N) -> t_i`` replacing the Karras grid.
    """
    key_n, key_z = jax.random.split(key)
    n = sample_pair_indices(key_n, num_scales, x.shape[0], distribution="uniform")
    z, t_lo, t_hi = _pair_points(key_z, x, n, num_scales, sigma_min, sigma_max, rho, grid_fn)
    x_hi = x.astype(z.dtype) + _bcast(t_hi, x) * z
    x_lo = jax.lax.stop_gradient(heun_step(denoiser_fn, x_hi, t_hi, t_lo))
    student = student_fn(x_hi, t_hi)
    target = jax.lax.stop_gradient(target_fn(x_lo, t_lo))
    d = _distance(metric, student, target, c)
    loss = jnp.mean(d)
    return loss, {"loss": loss, "t_hi": jnp.mean(t_hi), "num_scales": jnp.asarray(num_scales)}


def edm_denoising_loss(denoiser_fn: DenoiserFn, x: jax.Array, key: jax.Array,
                       p_mean: float = -1.2, p_std: float = 1.2,
                       sigma_data: float = SIGMA_DATA,
                       sigma_sampler: Optional[Callable[[jax.Array, int], jax.Array]] = None
                       ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """EDM training loss for a diffusion teacher (Karras et al. 2022).

    ``ln sigma ~ N(p_mean, p_std^2)``, ``y = x + sigma z``,
    ``L = mean_b w(sigma) * mean_pixels (D(y, sigma) - x)^2`` with
    ``w = (sigma^2 + sd^2) / (sigma sd)^2`` (EDM sums over pixels; the mean only rescales).
    ``denoiser_fn(x (B,H,W,C), sigma (B,)) -> D`` (e.g. :func:`edm_denoiser` over a network).
    ``sigma_sampler(key, B) -> sigma (B,)``, if given, replaces the lognormal draw (e.g. for a
    denoiser defined only on a discrete set of noise levels).
    """
    k_s, k_z = jax.random.split(key)
    b, dt = x.shape[0], _float_dtype(x)
    if sigma_sampler is None:
        sigma = jnp.exp(p_mean + p_std * jax.random.normal(k_s, (b,), dt))
    else:
        sigma = jnp.asarray(sigma_sampler(k_s, b), dt)
    z = jax.random.normal(k_z, x.shape, dt)
    xf = x.astype(dt)
    y = xf + _bcast(sigma, x) * z
    D = denoiser_fn(y, sigma).astype(dt)
    w = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    per = w * _mean_flat((D - xf) ** 2)
    loss = jnp.mean(per)
    return loss, {"loss": loss, "sigma": jnp.mean(sigma)}


# --------------------------------------------------------------------------------------
# 5. Sampling (CM paper, Alg. 1)
# --------------------------------------------------------------------------------------

def sampling_sigmas(num_steps: int, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN, rho: float = RHO,
                    *, mid_sigma: float | None = None) -> list[float]:
    """``num_steps`` decreasing noise levels from ``sigma_max``: the Karras grid of ``num_steps + 1``
    points without its last point ``sigma_min`` (where ``f`` is the identity). For two steps,
    ``mid_sigma`` (e.g. 0.821 for CIFAR-10, as the CM and iCT papers) replaces the grid's second level."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return [float(sigma_max)]
    if num_steps == 2 and mid_sigma is not None:
        return [float(sigma_max), float(mid_sigma)]
    grid = np.asarray(karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho), np.float64)[::-1]
    return [float(s) for s in grid[:-1]]


def check_sigmas(sigmas: Sequence[float], sigma_min: float = SIGMA_MIN) -> list[float]:
    """``sigmas`` as floats, or ValueError unless they are non-empty, strictly decreasing and >= sigma_min."""
    sig = [float(s) for s in np.asarray(sigmas, dtype=np.float64).reshape(-1)]
    if not sig:
        raise ValueError("sigmas must not be empty")
    if any(b >= a for a, b in zip(sig[:-1], sig[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {sig}")
    if sig[-1] < sigma_min:
        raise ValueError(f"every sigma must be >= sigma_min={sigma_min}, got {sig}")
    return sig


def multistep_loop(consistency_fn: ConsistencyFn, keys: jax.Array, x: jax.Array, sigmas: Sequence[float],
                   sigma_min: float = SIGMA_MIN, *, clip_denoised: bool = True,
                   post: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """The loop of Alg. 1 from a noisy ``x`` at ``sigmas[0]``: ``x0 = post(clip(f(x, t_i)))``, then
    ``x = x0 + sqrt(t_{i+1}^2 - eps^2) z`` with ``z`` from ``keys[i + 1]``; returns the last ``x0``.

    ``post`` is the hook zero-shot editing uses (Alg. 4: put the known part of the image back after
    every step); ``keys`` holds ``len(sigmas)`` keys, the first unused here.
    """
    b = x.shape[0]
    x0 = x
    for i, t in enumerate(sigmas):
        x0 = consistency_fn(x, jnp.full((b,), t, jnp.float32))
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        if post is not None:
            x0 = post(x0)
        if i + 1 < len(sigmas):
            std = math.sqrt(max(sigmas[i + 1] ** 2 - sigma_min ** 2, 0.0))
            x = x0 + std * jax.random.normal(keys[i + 1], x.shape, jnp.float32)
    return x0


def sample_multistep(consistency_fn: ConsistencyFn, key: jax.Array, shape: Sequence[int],
                     sigmas: Sequence[float], sigma_min: float = SIGMA_MIN, *,
                     clip_denoised: bool = True) -> jax.Array:
    """Multistep consistency sampling (CM paper, Alg. 1).

    ``x = t_0 z_0``; for each ``i``: ``x0 = clip(f(x, t_i), -1, 1)``; if a next level exists,
    ``x = x0 + sqrt(t_{i+1}^2 - eps^2) z_{i+1}``.  Returns the last ``x0``.

    Args:
      consistency_fn: ``(x_t (B,H,W,C), t (B,)) -> x0_hat``.
      key: split into ``len(sigmas)`` keys, one per noise draw.
      shape: ``(B, H, W, C)``.
      sigmas: static **decreasing** sequence, first = sigma_max (e.g. ``[80.0, 0.821]``;
        :func:`sampling_sigmas`).
      clip_denoised: clip every ``x0`` to ``[-1, 1]`` (the reference does).
    Returns:
      ``(B, H, W, C)`` float32 samples.
    """
    sig = check_sigmas(sigmas, sigma_min)
    keys = jax.random.split(key, len(sig))
    x = sig[0] * jax.random.normal(keys[0], tuple(shape), jnp.float32)
    return multistep_loop(consistency_fn, keys, x, sig, sigma_min, clip_denoised=clip_denoised)


def sample_onestep(consistency_fn: ConsistencyFn, key: jax.Array, shape: Sequence[int],
                   sigma_max: float = SIGMA_MAX, *, clip_denoised: bool = True) -> jax.Array:
    """One-step sampling ``x0 = f(T z, T)`` (clipped to [-1, 1] by default): ``(B,H,W,C)``.

    Identical to ``sample_multistep(consistency_fn, key, shape, [sigma_max])``.
    """
    return sample_multistep(consistency_fn, key, shape, [sigma_max], sigma_min=0.0,
                            clip_denoised=clip_denoised)
