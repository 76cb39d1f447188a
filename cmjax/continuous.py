"""Continuous-time few-step objectives whose target needs a JVP: sCM (TrigFlow), ECT, MeanFlow.

Pure functions over plain callables, like :mod:`cmjax.consistency` (which holds the discrete-time
CT/iCT/CD math).  Images are NHWC float arrays, data in [-1, 1]; times are per-example ``(B,)``.

sCM: Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models"
(arXiv 2410.11081), Algorithm 1 and Sections 3-4::

    x_t = cos(t) x0 + sin(t) z,   z ~ N(0, sd^2 I),   t in [0, pi/2]
    f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, t)                  (f(x, 0) = x exactly)
    dx_t/dt = cos(t) z - sin(t) x0           (sCT; sCD: the teacher's (cos(t) x_t - D) / sin(t))
    cos(t) sin(t) dF/dt = jvp(F, (x_t/sd, t), (cos(t) sin(t) dx_t/dt / sd, cos(t) sin(t)))
    g = -cos(t)^2 (sd F - dx_t/dt) - r (cos(t) sin(t) x_t + sd cos(t) sin(t) dF/dt)
    g <- g / (||g|| + c)                                               (tangent normalisation)
    L = exp(-w(t)) / D ||F_theta - F_sg - g||^2 + w(t)                  (w: learned log-variance)

``g`` is ``cos(t) df/dt``: the loss gradient at theta = theta_sg is ``-2/D g . dF/dtheta``,
the limit of the discrete CT gradient with weight ``1 / (sd tan t)`` as dt -> 0 (tested).
``r = min(1, step / warmup)`` is the tangent warm-up.

ECT: Geng et al., "Consistency Models Made Easy" (arXiv 2406.14548) and locuslab/ect
``training/loss.py`` ``ECMLoss``: EDM coordinates ``x_t = x0 + t z``; ``t ~ lognormal``;
``r = max(0, t (1 - q^-(stage+1) (1 + k sigmoid(-b t))))``; loss
``w(t, r) (sqrt(||f(x_t,t) - sg f(x_r,r)||^2 + c^2) - c)`` with ``f(x_r, 0) = x0`` and the weight
of the branch followed: ``w = 1 / (t - r)`` (``main``, the CIFAR-10 code) or
``w = (t^2 + sd^2) / (t sd)^2`` (``imgnet``, ``snrpk``).  With the latter, as r -> t the gradient
tends to ``w (df/dt / ||df/dt||) . df_theta/dtheta`` (:func:`ect_continuous_loss`, with the JVP),
which the tests pin; with ``1 / (t - r)`` it grows like ``1 / (t - r)`` and has no such limit.

MeanFlow: Geng et al., "Mean Flows for One-step Generative Modeling" (arXiv 2505.13447)::

    z_t = (1 - t) x + t e,   v = e - x,   u(z, r, t): average velocity over [r, t]
    u_tgt = v - (t - r) (v . d_z u + d_t u) = v - (t - r) jvp(u, (z, r, t), (v, 0, 1))
    L = sg(w) ||u_theta - sg(u_tgt)||^2,   w = 1 / (||u_theta - u_tgt||^2 + c)^p
    one step: x = e - u(e, 0, 1);  z_r = z_t - (t - r) u(z_t, r, t) in general.

All targets, tangents and losses are computed in float32 (float64 when the inputs are float64):
network outputs and JVP tangents are cast right after the network, whatever its compute dtype.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from cmjax.consistency import SIGMA_DATA, bcast, float_dtype, mean_flat, sum_flat

__all__ = [
    "TrigFlowNet", "trigflow_consistency", "trigflow_time", "edm_sigma", "sample_trigflow_times",
    "tangent_warmup", "trigflow_tangent", "scm_loss",
    "ect_ratio", "ect_r", "ECT_WEIGHTINGS", "ect_weight", "ect_loss", "ect_continuous_loss",
    "AverageVelocityNet", "sample_meanflow_times", "meanflow_target", "meanflow_loss",
    "meanflow_sample",
]

# (x_scaled (B,H,W,C), t (B,)) -> F (B,H,W,C): TrigFlow's raw network.
TrigFlowNet = Callable[[jax.Array, jax.Array], jax.Array]
# (z (B,H,W,C), r (B,), t (B,)) -> u (B,H,W,C): MeanFlow's average velocity.
AverageVelocityNet = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _f32(v, like) -> jax.Array:
    return jnp.asarray(v).astype(float_dtype(like))


# --------------------------------------------------------------------------------------
# sCM / TrigFlow


def trigflow_time(sigma, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """EDM noise level -> TrigFlow time: ``t = arctan(sigma / sd)`` (``x_t = cos(t) (x0 + sigma n)``)."""
    return jnp.arctan(jnp.asarray(sigma) / sigma_data)


def edm_sigma(t, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """TrigFlow time -> EDM noise level ``sigma = sd tan(t)``."""
    return sigma_data * jnp.tan(jnp.asarray(t))


def trigflow_consistency(net: TrigFlowNet, x_t: jax.Array, t: jax.Array,
                         sigma_data: float = SIGMA_DATA) -> jax.Array:
    """``f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, t)``, float32; ``f(x, 0) = x`` exactly."""
    x_t = x_t.astype(float_dtype(x_t))
    t = _f32(t, x_t)
    F = net(x_t / sigma_data, t).astype(x_t.dtype)
    return bcast(jnp.cos(t), x_t) * x_t - bcast(jnp.sin(t), x_t) * sigma_data * F


def sample_trigflow_times(key: jax.Array, batch: int, p_mean: float = -1.0, p_std: float = 1.4,
                          sigma_data: float = SIGMA_DATA, dtype=jnp.float32) -> jax.Array:
    """sCM's proposal: ``tau ~ N(p_mean, p_std^2)``, ``t = arctan(exp(tau) / sd)``; (B,) ``dtype``.

    Equivalently the EDM noise level ``sd tan(t) = exp(tau)`` is lognormal (CIFAR-10: -1.0, 1.4).
    """
    tau = p_mean + p_std * jax.random.normal(key, (batch,), dtype)
    return jnp.arctan(jnp.exp(tau) / sigma_data)


def tangent_warmup(step, warmup_steps: int) -> jax.Array:
    """``r = min(1, step / warmup_steps)`` (sCM Sec. 4.2); 1 when ``warmup_steps <= 0``."""
    dt = jnp.result_type(float)  # float32, float64 in x64 mode
    if warmup_steps <= 0:
        return jnp.asarray(1.0, dt)
    return jnp.minimum(1.0, jnp.asarray(step).astype(dt) / float(warmup_steps))


def trigflow_tangent(net: TrigFlowNet, x_t: jax.Array, t: jax.Array, dxt_dt: jax.Array, *,
                     warmup=1.0, norm_c: float = 0.1, sigma_data: float = SIGMA_DATA
                     ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """The sCM target pieces ``(F, g, cos(t) sin(t) dF/dt)`` for a stop-gradient network ``net``.

    ``dF/dt`` is the total derivative along the path ``x_t`` (moving at ``dxt_dt``) from one
    ``jax.jvp``; it is taken with tangents pre-multiplied by ``cos(t) sin(t)``, which keeps it
    finite as t -> pi/2.  ``g`` is normalised per example by ``||g|| + norm_c`` (L2 over all
    of H, W, C) unless ``norm_c`` is None.  ``warmup`` is the tangent warm-up factor ``r``.
    """
    x_t = x_t.astype(float_dtype(x_t))
    t = _f32(t, x_t)
    cs = jnp.cos(t) * jnp.sin(t)
    fn = lambda u, s: net(u, s).astype(x_t.dtype)
    F, cs_dF = jax.jvp(fn, (x_t / sigma_data, t), (bcast(cs, x_t) * dxt_dt / sigma_data, cs))
    cos2 = bcast(jnp.cos(t) ** 2, x_t)
    g = -cos2 * (sigma_data * F - dxt_dt) - warmup * (bcast(cs, x_t) * x_t + sigma_data * cs_dF)
    if norm_c is not None:
        norm = jnp.sqrt(sum_flat(g ** 2))
        g = g / bcast(norm + norm_c, g)
    return jax.lax.stop_gradient(F), jax.lax.stop_gradient(g), jax.lax.stop_gradient(cs_dF)


def scm_loss(net: TrigFlowNet, target_net: TrigFlowNet, logvar_fn: Callable[[jax.Array], jax.Array],
             x0: jax.Array, key: jax.Array, *, warmup=1.0, p_mean: float = -1.0, p_std: float = 1.4,
             norm_c: float = 0.1, sigma_data: float = SIGMA_DATA,
             teacher_velocity: Callable[[jax.Array, jax.Array], jax.Array] | None = None
             ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """sCT (``teacher_velocity=None``) or sCD loss, sCM Algorithm 1.

    Args:
      net: the trained network ``F_theta(x/sd, t)``; ``target_net``: the same with
        stop-gradient params (and the same dropout key).
      logvar_fn: ``t (B,) -> w(t) (B,)``, the learned adaptive weight (a log-variance).
      x0: data (B, H, W, C); ``k_t, k_z = split(key)``: ``t = sample_trigflow_times(k_t, B, ...)``,
        ``z = sd * normal(k_z, x0.shape)``.
      teacher_velocity: sCD: ``(x_t, t) -> dx_t/dt`` from the teacher (e.g.
        ``(cos(t) x_t - D(x_t / cos t, sd tan t)) / sin(t)`` for an EDM teacher).
    """
    k_t, k_z = jax.random.split(key)
    x0 = x0.astype(float_dtype(x0))
    t = sample_trigflow_times(k_t, x0.shape[0], p_mean, p_std, sigma_data, x0.dtype)
    z = sigma_data * jax.random.normal(k_z, x0.shape, x0.dtype)
    ct, st = bcast(jnp.cos(t), x0), bcast(jnp.sin(t), x0)
    x_t = ct * x0 + st * z
    if teacher_velocity is None:
        dxt_dt = ct * z - st * x0
    else:
        dxt_dt = jax.lax.stop_gradient(teacher_velocity(x_t, t).astype(x0.dtype))
    F_sg, g, _ = trigflow_tangent(target_net, x_t, t, dxt_dt, warmup=warmup, norm_c=norm_c,
                                  sigma_data=sigma_data)
    F = net(x_t / sigma_data, t).astype(x0.dtype)
    logvar = logvar_fn(t).astype(x0.dtype)
    mse = mean_flat((F - F_sg - g) ** 2)
    per = jnp.exp(-logvar) * mse + logvar
    loss = jnp.mean(per)
    return loss, {"loss": loss, "mse": jnp.mean(mse), "logvar": jnp.mean(logvar),
                  "g_norm": jnp.mean(jnp.sqrt(sum_flat(g ** 2))), "t": jnp.mean(t)}


# --------------------------------------------------------------------------------------
# ECT


def ect_ratio(t: jax.Array, stage, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> jax.Array:
    """``r / t = 1 - q^-(stage+1) (1 + k sigmoid(-b t))`` (may be negative: r is clamped at 0)."""
    decay = jnp.power(float(q), -(jnp.asarray(stage, jnp.float32) + 1.0))
    return 1.0 - decay * (1.0 + k * jax.nn.sigmoid(-b * t))


def ect_r(t: jax.Array, stage, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> jax.Array:
    """ECT's mapping ``r(t) = max(0, t * ect_ratio(t, stage))``; stage = step // steps_per_stage."""
    return jnp.maximum(t * ect_ratio(t, stage, q, k, b), 0.0)


ECT_WEIGHTINGS = ("inverse_dt", "snr_plus")


def ect_weight(t: jax.Array, r: jax.Array, weighting: str = "inverse_dt",
               sigma_data: float = SIGMA_DATA) -> jax.Array:
    """ECT's loss weight: ``1 / (t - r)`` (``"inverse_dt"``, locuslab/ect ``main``) or
    ``(t^2 + sd^2) / (t sd)^2`` (``"snr_plus"``: 1/SNR(t) + 1/sd^2, the ``imgnet`` branch's ``snrpk``)."""
    if weighting == "inverse_dt":
        return 1.0 / (t - r)
    if weighting == "snr_plus":
        return (t ** 2 + sigma_data ** 2) / (t * sigma_data) ** 2
    raise ValueError(f"ect weighting {weighting!r}: expected one of {ECT_WEIGHTINGS}")


def _ect_times(key, x0, p_mean, p_std):
    """key -> (t, z): ``k_t, k_z = split(key)``; t lognormal (B,), z standard normal like x0."""
    k_t, k_z = jax.random.split(key)
    t = jnp.exp(p_mean + p_std * jax.random.normal(k_t, (x0.shape[0],), x0.dtype))
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    return t, z


def ect_loss(student_fn, target_fn, x0: jax.Array, key: jax.Array, stage, *, q: float = 2.0,
             k: float = 8.0, b: float = 1.0, c: float = 0.0, p_mean: float = -1.1, p_std: float = 2.0,
             weighting: str = "inverse_dt", sigma_data: float = SIGMA_DATA,
             t: jax.Array | None = None, r: jax.Array | None = None
             ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """ECT loss (locuslab/ect ``ECMLoss``); ``student_fn``/``target_fn``: ``(x_t, t) -> x0_hat``
    in EDM coordinates (the reference trains them with EDM's unshifted ``c_skip``/``c_out``).

    ``x_t = x0 + t z``, ``x_r = x0 + r z`` (shared z, shared dropout key via the callables);
    the target is ``x0`` where ``r == 0``; weight :func:`ect_weight` (``weighting``).
    ``k_t, k_z = split(key)``: ``t = exp(p_mean + p_std normal(k_t, (B,)))``,
    ``z = normal(k_z, x0.shape)``.  ``t``/``r`` may be given (tests) instead of drawn.
    """
    x0 = x0.astype(float_dtype(x0))
    t_drawn, z = _ect_times(key, x0, p_mean, p_std)
    t = t_drawn if t is None else _f32(t, x0)
    r = ect_r(t, stage, q, k, b) if r is None else _f32(r, x0)
    student = student_fn(x0 + bcast(t, x0) * z, t)
    safe_r = jnp.where(r > 0, r, 1.0)  # the network is never called at r = 0
    target = target_fn(x0 + bcast(safe_r, x0) * z, safe_r)
    target = jax.lax.stop_gradient(jnp.where(bcast(r > 0, x0), target, x0))
    sq = sum_flat((student - target) ** 2)
    dist = jnp.sqrt(sq + c ** 2) - c
    w = ect_weight(t, r, weighting, sigma_data)
    loss = jnp.mean(w * dist)
    return loss, {"loss": loss, "distance": jnp.mean(dist), "t": jnp.mean(t),
                  "r_over_t": jnp.mean(r / t)}


def ect_continuous_loss(student_fn, target_fn, x0: jax.Array, z: jax.Array, t: jax.Array,
                        sigma_data: float = SIGMA_DATA) -> jax.Array:
    """The r -> t limit of :func:`ect_loss` (c = 0, ``weighting="snr_plus"``) as a surrogate with the
    same gradient:
    ``mean_b w(t) <f_theta(x_t, t), sg(df/dt / ||df/dt||)>`` with ``df/dt`` from one JVP of the
    stop-gradient ``target_fn`` along ``x_t = x0 + t z`` (tangent ``(z, 1)``)."""
    x_t = x0 + bcast(t, x0) * z
    _, dfdt = jax.jvp(target_fn, (x_t, t), (z, jnp.ones_like(t)))
    dfdt = jax.lax.stop_gradient(dfdt)
    unit = dfdt / bcast(jnp.sqrt(sum_flat(dfdt ** 2)), dfdt)
    return jnp.mean(ect_weight(t, t, "snr_plus", sigma_data) * sum_flat(student_fn(x_t, t) * unit))


# --------------------------------------------------------------------------------------
# MeanFlow


def sample_meanflow_times(key: jax.Array, batch: int, p_mean: float = -0.4, p_std: float = 1.0,
                          equal_fraction: float = 0.75) -> Tuple[jax.Array, jax.Array]:
    """(r, t), (B,) each: two logit-normal draws ``sigmoid(N(p_mean, p_std^2))``, t the larger,
    r the smaller; then r = t for a fraction ``equal_fraction`` of the batch (MeanFlow Sec. 4)."""
    k_a, k_b, k_eq = jax.random.split(key, 3)
    a = jax.nn.sigmoid(p_mean + p_std * jax.random.normal(k_a, (batch,), jnp.float32))
    b = jax.nn.sigmoid(p_mean + p_std * jax.random.normal(k_b, (batch,), jnp.float32))
    t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    equal = jax.random.uniform(k_eq, (batch,)) < equal_fraction
    return jnp.where(equal, t, r), t


def meanflow_target(u_fn: AverageVelocityNet, z_t: jax.Array, r: jax.Array, t: jax.Array,
                    v: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """``(u, u_tgt)``: ``u(z_t, r, t)`` and ``v - (t - r) (v . d_z u + d_t u)`` from one JVP with
    tangent ``(v, 0, 1)``; both stop-gradient'ed; float32 (float64 for float64 inputs)."""
    dt = float_dtype(z_t)
    z_t, v = z_t.astype(dt), v.astype(dt)
    r, t = _f32(r, z_t), _f32(t, z_t)
    fn = lambda z, rr, tt: u_fn(z, rr, tt).astype(dt)
    u, dudt = jax.jvp(fn, (z_t, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    u_tgt = v - bcast(t - r, z_t) * dudt
    return jax.lax.stop_gradient(u), jax.lax.stop_gradient(u_tgt)


def meanflow_loss(u_fn: AverageVelocityNet, u_sg_fn: AverageVelocityNet, x0: jax.Array,
                  key: jax.Array, *, p_mean: float = -0.4, p_std: float = 1.0,
                  equal_fraction: float = 0.75, weight_p: float = 1.0, weight_c: float = 1e-3
                  ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """MeanFlow loss with its adaptive weight ``sg(1 / (||delta||^2 + c)^p)``, ||.||^2 summed
    over pixels; ``u_fn`` trains, ``u_sg_fn`` is the same network with stop-gradient params."""
    k_t, k_e = jax.random.split(key)
    x0 = x0.astype(float_dtype(x0))
    r, t = sample_meanflow_times(k_t, x0.shape[0], p_mean, p_std, equal_fraction)
    r, t = r.astype(x0.dtype), t.astype(x0.dtype)
    e = jax.random.normal(k_e, x0.shape, x0.dtype)
    tb = bcast(t, x0)
    z_t = (1.0 - tb) * x0 + tb * e
    v = e - x0
    _, u_tgt = meanflow_target(u_sg_fn, z_t, r, t, v)
    u = u_fn(z_t, r, t).astype(x0.dtype)
    sq = sum_flat((u - u_tgt) ** 2)
    w = jax.lax.stop_gradient(1.0 / (sq + weight_c) ** weight_p)
    loss = jnp.mean(w * sq)
    return loss, {"loss": loss, "mse": jnp.mean(sq) / math.prod(x0.shape[1:]),
                  "t": jnp.mean(t), "r_equals_t": jnp.mean((r == t).astype(jnp.float32))}


def meanflow_sample(u_fn: AverageVelocityNet, noise: jax.Array, times) -> jax.Array:
    """Few-step sampling from ``z_1 = noise``: for decreasing ``times`` 1 = t_0 > ... > t_n = 0,
    ``z_{i+1} = z_i - (t_i - t_{i+1}) u(z_i, t_{i+1}, t_i)``.  ``(1, 0)``: one step."""
    times = [float(s) for s in times]
    if times[0] != 1.0 or times[-1] != 0.0 or any(b >= a for a, b in zip(times[:-1], times[1:])):
        raise ValueError(f"times must decrease from 1 to 0, got {times}")
    z = noise.astype(float_dtype(noise))
    b = z.shape[0]
    for hi, lo in zip(times[:-1], times[1:]):
        u = u_fn(z, jnp.full((b,), lo, z.dtype), jnp.full((b,), hi, z.dtype))
        z = z - (hi - lo) * u.astype(z.dtype)
    return z
