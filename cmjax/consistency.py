"""Consistency models: parameterisation, losses and samplers (pure JAX).

Everything here is a pure function of arrays and callables: no Flax modules, no global state.
Networks enter as plain callables, so any model fits; closing over parameters and dropout
keys is the caller's job.  The noise levels a training step uses (the Karras grid, the curricula
N(k) and mu(k), the pair distribution) live in :mod:`cmjax.noise_levels`; their names are
re-exported here, so ``consistency.karras_sigmas`` is ``noise_levels.karras_sigmas``.

Conventions
-----------
* Images are NHWC arrays ``(B, H, W, C)`` with data values in ``[-1, 1]``.
* Noise levels follow EDM: ``sigma = t`` and ``x_t = x + t * z`` with ``z ~ N(0, I)``.
* Noise levels enter callables as a per-example vector ``t`` of shape ``(B,)``.
* The training grid is **increasing**: ``t_0 = sigma_min < t_1 < ... < t_{N-1} = sigma_max``,
  and a training pair is ``(t_n, t_{n+1})`` for ``n in [0, N-2]`` (the CM paper's notation,
  shifted to 0-based indices).  Samplers take **decreasing** schedules (first = sigma_max).
* Losses compute in float32, or float64 for float64 data (:func:`float_dtype`).

Sources (facts only, no code taken): Song et al., "Consistency Models" (2023) and
openai/consistency_models(_cifar10); Song & Dhariwal, "Improved Techniques for Training
Consistency Models" (iCT, 2023); Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models" (EDM, 2022).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cmjax.noise_levels import (
    RHO,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    GridFn,
    ct_ema_decay,
    ct_num_scales,
    grid_or_karras,
    ict_num_scales,
    karras_sigma_at,
    karras_sigmas,
    lognormal_pair_logits,
    lognormal_pair_probs,
    sample_pair_indices,
)

__all__ = [
    "SIGMA_MIN", "SIGMA_MAX", "SIGMA_DATA", "RHO", "GridFn",
    "karras_sigmas", "karras_sigma_at", "ct_num_scales", "ct_ema_decay", "ict_num_scales",
    "lognormal_pair_probs", "lognormal_pair_logits", "sample_pair_indices",
    "float_dtype", "per_example", "bcast", "sum_flat", "mean_flat",
    "cm_scalings", "noise_conditioning", "consistency_function", "edm_denoiser",
    "pseudo_huber", "huber_c", "ict_weighting", "heun_step",
    "ict_loss", "ct_loss", "cd_loss", "edm_denoising_loss",
    "sampling_sigmas", "check_sigmas", "multistep_loop", "sample_onestep", "sample_multistep",
]

ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]        # (x_scaled, noise_cond) -> F
ConsistencyFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t) -> x0_hat
DenoiserFn = Callable[[jax.Array, jax.Array], jax.Array]     # (x, sigma) -> D(x, sigma)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def float_dtype(x) -> jnp.dtype:
    """float32, or float64 when ``x`` is float64 (x64 mode); bf16/fp16 inputs give float32."""
    return jnp.result_type(jnp.asarray(x).dtype, jnp.float32)


def per_example(t, x: jax.Array) -> jax.Array:
    """Broadcast a scalar or ``(B,)`` noise level to a ``(B,)`` vector for batch ``x``."""
    t = jnp.asarray(t, float_dtype(x))
    if t.ndim > 1:
        raise ValueError(f"t must be a scalar or a (B,) vector, got shape {t.shape}")
    return jnp.broadcast_to(t, (x.shape[0],))


def bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """``(B,)`` -> ``(B, 1, 1, 1)`` (as many trailing singleton axes as ``x`` needs)."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def sum_flat(v: jax.Array) -> jax.Array:
    """Sum over every axis but the first: ``(B, ...) -> (B,)``."""
    return jnp.sum(v, axis=tuple(range(1, v.ndim)))


def mean_flat(v: jax.Array) -> jax.Array:
    """Mean over every axis but the first: ``(B, ...) -> (B,)``."""
    return jnp.mean(v, axis=tuple(range(1, v.ndim)))


# --------------------------------------------------------------------------------------
# 1. Parameterisation (CM paper, appendix C; EDM, Table 1)
# --------------------------------------------------------------------------------------

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
    t = t.astype(float_dtype(t))
    sd2 = sigma_data ** 2
    te = t - sigma_min
    c_skip = sd2 / (te ** 2 + sd2)
    c_out = te * sigma_data / jnp.sqrt(t ** 2 + sd2)
    c_in = 1.0 / jnp.sqrt(t ** 2 + sd2)
    return c_skip, c_out, c_in


def noise_conditioning(t) -> jax.Array:
    """The network's noise input ``c_noise(t) = 0.25 * ln(t)`` (EDM / CM). Same shape as ``t``."""
    t = jnp.asarray(t)
    return 0.25 * jnp.log(t.astype(float_dtype(t)))


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
    t = per_example(t, x_t)
    c_skip, c_out, c_in = cm_scalings(t, sigma_min, sigma_data)
    F = apply_fn(bcast(c_in, x_t) * x_t, noise_conditioning(t))
    return bcast(c_skip, x_t) * x_t + bcast(c_out, x_t) * F


def edm_denoiser(apply_fn: ApplyFn, x: jax.Array, sigma, *,
                 sigma_data: float = SIGMA_DATA) -> jax.Array:
    """EDM-preconditioned denoiser ``D(x, sigma)`` (a teacher for CD), ``(B,H,W,C)``.

    ``D = c_skip x + c_out F(c_in x, 0.25 ln sigma)`` with the EDM scalings
    ``c_skip = sd^2/(sigma^2+sd^2)``, ``c_out = sigma sd/sqrt(sigma^2+sd^2)``,
    ``c_in = 1/sqrt(sigma^2+sd^2)``, i.e. :func:`consistency_function` with ``sigma_min = 0``.
    """
    return consistency_function(apply_fn, x, sigma, sigma_min=0.0, sigma_data=sigma_data)


# --------------------------------------------------------------------------------------
# 2. iCT's distance and weighting
# --------------------------------------------------------------------------------------

def huber_c(dim: int) -> float:
    """iCT pseudo-Huber constant ``c = 0.00054 * sqrt(dim)``, ``dim = H*W*C`` (CIFAR: 0.03)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
    """Pseudo-Huber distance over the **whole image**, per example: ``(B,)`` float32.

    ``d(x, y) = sqrt(||x - y||_2^2 + c^2) - c`` with the squared norm summed over all
    non-batch axes (iCT), *not* applied element-wise.  Computed in float32 (float64 for float64).
    """
    x = jnp.asarray(x).astype(float_dtype(x))
    y = jnp.asarray(y).astype(x.dtype)
    return jnp.sqrt(sum_flat((x - y) ** 2) + c * c) - c


def ict_weighting(t_lo: jax.Array, t_hi: jax.Array) -> jax.Array:
    """iCT loss weight ``lambda = 1 / (t_{n+1} - t_n)`` (same shape as the inputs)."""
    return 1.0 / (t_hi - t_lo)


def _distance(metric: str, a: jax.Array, b: jax.Array, c: Optional[float]) -> jax.Array:
    a = a.astype(float_dtype(a))
    b = b.astype(a.dtype)
    if metric == "l2":
        return mean_flat((a - b) ** 2)
    if metric == "l1":
        return mean_flat(jnp.abs(a - b))
    if metric == "pseudo_huber":
        cc = huber_c(int(np.prod(a.shape[1:]))) if c is None else c
        return pseudo_huber(a, b, cc)
    raise ValueError(f"unknown metric {metric!r}")


# --------------------------------------------------------------------------------------
# 3. Losses
# --------------------------------------------------------------------------------------

def _pair_points(key, x, n, num_scales, sigma_min, sigma_max, rho, grid_fn=None):
    """Shared noise for a batch of pairs: ``(z, t_lo, t_hi)`` in x's float dtype (float32 for
    float32/bf16 data, float64 for float64), ``z = normal(key, x.shape)``."""
    dt = float_dtype(x)
    grid = grid_or_karras(grid_fn, sigma_min, sigma_max, rho, dt)
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
    student = student_fn(xf + bcast(t_hi, x) * z, t_hi)
    target = jax.lax.stop_gradient(target_fn(xf + bcast(t_lo, x) * z, t_lo))
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
    student = student_fn(xf + bcast(t_hi, x) * z, t_hi)
    target = jax.lax.stop_gradient(target_fn(xf + bcast(t_lo, x) * z, t_lo))
    d = _distance(metric, student, target, c)
    loss = jnp.mean(d)
    return loss, {"loss": loss, "t_hi": jnp.mean(t_hi), "num_scales": jnp.asarray(num_scales)}


def heun_step(denoiser_fn: DenoiserFn, x: jax.Array, t_from, t_to) -> jax.Array:
    """One Heun (2nd-order) step of the probability-flow ODE ``dx/dt = (x - D(x, t)) / t``.

    ``d1 = (x - D(x, t_from)) / t_from``; ``x_e = x + (t_to - t_from) d1``;
    ``d2 = (x_e - D(x_e, t_to)) / t_to``; returns ``x + (t_to - t_from) (d1 + d2) / 2``.
    ``t_from``, ``t_to``: scalars or ``(B,)``, ``t_to > 0``.  Shapes ``(B, H, W, C)``.
    """
    t_from = per_example(t_from, x)
    t_to = per_example(t_to, x)
    tf, tt = bcast(t_from, x), bcast(t_to, x)
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
    x_hi = x.astype(z.dtype) + bcast(t_hi, x) * z
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
    b, dt = x.shape[0], float_dtype(x)
    if sigma_sampler is None:
        sigma = jnp.exp(p_mean + p_std * jax.random.normal(k_s, (b,), dt))
    else:
        sigma = jnp.asarray(sigma_sampler(k_s, b), dt)
    z = jax.random.normal(k_z, x.shape, dt)
    xf = x.astype(dt)
    y = xf + bcast(sigma, x) * z
    D = denoiser_fn(y, sigma).astype(dt)
    w = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    per = w * mean_flat((D - xf) ** 2)
    loss = jnp.mean(per)
    return loss, {"loss": loss, "sigma": jnp.mean(sigma)}


# --------------------------------------------------------------------------------------
# 4. Sampling (CM paper, Alg. 1)
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
