"""Training algorithms: one :class:`Algorithm` entry each, looked up by ``config.algorithm``.

An entry carries everything the trainer and the evaluation tools need to know about it:

    loss(family, config)   -> loss_fn(params, state, x, cond, frozen, loss_key, dropout_key, k)
                              -> (loss, metrics)          (k: optimizer updates done)
    model(family, config)  -> Model: init_params, consistency_fn (EDM coordinates, what
                              cmjax.edit/editing use) and sample(params, key, n_or_cond, steps)
    target_decay(config, k)   EMA rate of a target network kept in TrainState.target_params
                              (None: no target network)
    teacher / init_from       config -> workdir of a frozen teacher run / of a run whose EMA
                              params start this one ("" when unset)
    families, time_inputs     the families it supports; network time inputs (2: MeanFlow)

    ict  iCT (Song & Dhariwal 2023)       ct   CT (Song et al. 2023), EMA target mu(k)
    cd   CD, EDM teacher, fixed EMA target edm  the diffusion teacher
    sct  sCT (Lu & Song 2024), TrigFlow   scd  sCD: sCT with an EDM teacher's velocity
    ect  ECT (Geng et al. 2024)           meanflow  MeanFlow (Geng et al. 2025)

The math lives in :mod:`cmjax.consistency` (discrete time), :mod:`cmjax.noise_levels` (grids,
curricula) and :mod:`cmjax.continuous` (the JVP objectives and ECT); this module only binds it to a
family's network and to the config.  Each objective is pinned to its reference implementation in
tests/test_reference_values.py.  Adding an algorithm: its math, its entry here (added to
ALGORITHMS), its config and its test; nothing else lists the algorithms.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from cmjax import consistency as C
from cmjax import continuous
from cmjax.models.image_unet import POSITIONAL_SCALE, positional_features
from cmjax.training.families import Family


@dataclasses.dataclass(frozen=True)
class Model:
    """How a trained run's params are used (all pure and jittable).

    init_params: key -> params (the TrainState's params tree).
    consistency_fn: (params, y (B,H,W,C), sigma (B,), cond=None, dropout_rng=None) -> x0_hat,
      the one-jump map to clean data in EDM coordinates (y = x0 + sigma z).
    sample: (params, key, num (image) or latents (decoder), num_steps) -> images in [-1, 1].
    """

    init_params: Callable
    consistency_fn: Callable
    sample: Callable


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    loss: Callable[[Family, Any], Callable]
    model: Callable[[Family, Any], Model]
    num_scales: Optional[Callable[[Any, Any], Any]] = None  # (config, k) -> N(k)
    target_decay: Optional[Callable[[Any, Any], Any]] = None
    teacher: Callable[[Any], str] = lambda config: ""
    init_from: Callable[[Any], str] = lambda config: ""
    max_scales: Callable[[Any], Optional[int]] = lambda config: None  # largest N it asks for
    needs_teacher: bool = False  # teacher(config) must name a run
    families: tuple[str, ...] = ("image", "decoder")
    time_inputs: int = 1
    check: Callable[[Any], None] = lambda config: None  # raises ValueError naming a bad field

    @property
    def keeps_target(self) -> bool:
        """Whether TrainState holds an EMA target network for it (it has a target_decay)."""
        return self.target_decay is not None


def curriculum_updates(config) -> int:
    """K, the curricula's length in optimizer updates: config.curriculum_steps (micro-steps) or,
    when that is 0, total_steps."""
    steps = config.curriculum_steps or config.total_steps
    return max(int(steps) // config.optim.grad_accum_steps, 1)


def _huber(block) -> Optional[float]:
    c = block.huber_c
    return None if c is None or c < 0 else float(c)


def _grid_kwargs(family: Family, config) -> dict:
    if family.grid_fn is not None:
        return {"grid_fn": family.grid_fn}
    return {"sigma_max": float(config.sampling.sigma_max)}


def _family_model(family: Family, config) -> Model:
    return Model(family.init_params, family.consistency_fn, family.sample)


def _bind(fn, params, cond, dropout_key):
    """``(y, t) -> fn(params, y, t, cond, dropout_key)``: a family's consistency or denoiser
    function as the plain callable the losses take (student, target or teacher)."""
    return lambda y, t: fn(params, y, t, cond, dropout_key)


# --------------------------------------------------------------------------------------------
# Discrete-time CMs and the EDM teacher


def _ict_loss(family, config):
    kw = _grid_kwargs(family, config)

    def loss_fn(params, state, x, cond, frozen, loss_key, dropout_key, k):
        student = _bind(family.consistency_fn, params, cond, dropout_key)
        target = _bind(family.consistency_fn, jax.lax.stop_gradient(params), cond, dropout_key)
        return C.ict_loss(student, target, x, loss_key, ICT.num_scales(config, k),
                          max_scales=config.ict.s1 + 1, p_mean=config.ict.p_mean, p_std=config.ict.p_std,
                          c=_huber(config.ict), **kw)
    return loss_fn


def _ct_loss(family, config):
    kw = _grid_kwargs(family, config)

    def loss_fn(params, state, x, cond, frozen, loss_key, dropout_key, k):
        student = _bind(family.consistency_fn, params, cond, dropout_key)
        target = _bind(family.consistency_fn, state.target_params, cond, dropout_key)
        return C.ct_loss(student, target, x, loss_key, CT.num_scales(config, k), metric=config.ct.metric,
                         c=_huber(config.ct), **kw)
    return loss_fn


def _cd_loss(family, config):
    kw = _grid_kwargs(family, config)

    def loss_fn(params, state, x, cond, frozen, loss_key, dropout_key, k):
        student = _bind(family.consistency_fn, params, cond, dropout_key)
        target = _bind(family.consistency_fn, state.target_params, cond, dropout_key)
        teacher = _bind(family.denoiser_fn, frozen["teacher"], cond, None)
        return C.cd_loss(student, target, teacher, x, loss_key, jnp.int32(config.cd.num_scales),
                         metric=config.cd.metric, c=_huber(config.cd), **kw)
    return loss_fn


def _edm_loss(family, config):
    def loss_fn(params, state, x, cond, frozen, loss_key, dropout_key, k):
        return C.edm_denoising_loss(_bind(family.denoiser_fn, params, cond, dropout_key), x, loss_key,
                                    p_mean=config.edm.p_mean, p_std=config.edm.p_std,
                                    sigma_sampler=family.edm_sigma_sampler)
    return loss_fn


ICT = Algorithm(
    "ict", _ict_loss, _family_model,
    num_scales=lambda config, k: C.ict_num_scales(k, curriculum_updates(config), config.ict.s0, config.ict.s1),
    max_scales=lambda config: config.ict.s1 + 1)

CT = Algorithm(
    "ct", _ct_loss, _family_model,
    num_scales=lambda config, k: C.ct_num_scales(k, curriculum_updates(config), config.ct.s0, config.ct.s1),
    target_decay=lambda config, k: C.ct_ema_decay(k, curriculum_updates(config), config.ct.mu0,
                                                  config.ct.s0, config.ct.s1),
    max_scales=lambda config: config.ct.s1 + 1)

CD = Algorithm(
    "cd", _cd_loss, _family_model,
    target_decay=lambda config, k: jnp.float32(config.cd.target_ema),
    teacher=lambda config: config.cd.teacher, needs_teacher=True,
    init_from=lambda config: config.cd.teacher if config.cd.init_from_teacher else "",
    max_scales=lambda config: config.cd.num_scales)

EDM = Algorithm("edm", _edm_loss, _family_model)


# --------------------------------------------------------------------------------------------
# sCT / sCD: TrigFlow. Params are {"net": the UNet's, "logvar": the adaptive weight w_phi(t)}.

LOGVAR_FEATURES = 64


def logvar_init(key) -> dict:
    """w_phi(t) = positional_features(1000 t) . w + b, started at 0 (a linear layer on sinusoidal
    features of t, as sCM Sec. 4.3 puts one on the network's time embedding)."""
    del key
    return {"w": jnp.zeros((LOGVAR_FEATURES,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def logvar_apply(p, t) -> jax.Array:
    return positional_features(1000.0 * t, LOGVAR_FEATURES) @ p["w"] + p["b"]


def unet_time(t: jax.Array) -> jax.Array:
    """The image UNet's c_noise that makes its positional embedding see the time ``t`` itself: it embeds
    ``POSITIONAL_SCALE * c_noise`` (1000 x, the DDPM/EDM convention for c_noise = 0.25 ln sigma), so
    ``t / 1000``.  sCM (Sec. 4.1) and MeanFlow condition on t directly: c_noise(t) = t keeps
    d(embedding)/dt O(1) for a stable JVP tangent (with 1000 t the time term of the JVP is ~1000x
    larger and MeanFlow's target explodes at initialisation)."""
    return t / POSITIONAL_SCALE


def _trigflow_net(family, params, dropout_rng):
    apply = family.apply_fn(params["net"], dropout_rng)
    return lambda u, t: apply(u, unet_time(t))


def _scm_model(family, config) -> Model:
    sd = float(config.scm.sigma_data)

    def init_params(key):
        k1, k2 = jax.random.split(key)
        return {"net": family.init_params(k1), "logvar": logvar_init(k2)}

    def consistency_fn(params, y, sigma, cond=None, dropout_rng=None):
        t = continuous.trigflow_time(jnp.asarray(sigma, jnp.float32), sd)
        x_t = jnp.cos(t)[:, None, None, None] * y.astype(jnp.float32)
        return continuous.trigflow_consistency(_trigflow_net(family, params, dropout_rng), x_t, t, sd)

    def sample(params, key, num, num_steps):
        """1 step at sigma_max (t = arctan(sigma_max / sd)), 2 steps add t = scm.mid_t."""
        h, w, c = family.image_shape
        sigmas = [float(config.sampling.sigma_max)]
        if num_steps == 2:
            sigmas.append(sd * math.tan(float(config.scm.mid_t)))
        elif num_steps > 2:
            raise ValueError("sCM samples with 1 or 2 steps")
        fn = lambda y, s: consistency_fn(params, y, s)
        return C.sample_multistep(fn, key, (num, h, w, c), sigmas)

    return Model(init_params, consistency_fn, sample)


def _scm_loss(family, config, distill: bool):
    s = config.scm

    def loss_fn(params, state, x, cond, frozen, loss_key, dropout_key, k):
        sg = jax.lax.stop_gradient(params)

        def teacher_velocity(x_t, t):  # sCD: the EDM teacher's x0 estimate turned into TrigFlow's dx_t/dt
            ct, st = jnp.cos(t)[:, None, None, None], jnp.sin(t)[:, None, None, None]
            d = family.denoiser_fn(frozen["teacher"], x_t / ct, continuous.edm_sigma(t, s.sigma_data))
            return (ct * x_t - d) / st
        return continuous.scm_loss(
            _trigflow_net(family, params, dropout_key), _trigflow_net(family, sg, dropout_key),
            lambda t: logvar_apply(params["logvar"], t), x, loss_key,
            warmup=continuous.tangent_warmup(k, s.tangent_warmup_steps), p_mean=s.p_mean, p_std=s.p_std,
            norm_c=s.tangent_norm_c if s.tangent_norm_c >= 0 else None, sigma_data=s.sigma_data,
            teacher_velocity=teacher_velocity if distill else None)
    return loss_fn


SCT = Algorithm("sct", lambda family, config: _scm_loss(family, config, False), _scm_model, families=("image",))
SCD = Algorithm("scd", lambda family, config: _scm_loss(family, config, True), _scm_model, families=("image",),
                teacher=lambda config: config.cd.teacher, needs_teacher=True)


# --------------------------------------------------------------------------------------------
# ECT (locuslab/ect): trained in EDM's denoiser parameterisation (unshifted c_skip/c_out, the
# family's denoiser_fn, so an 'edm' run's params start it as the same function), sampled with
# c_skip/c_out shifted by ect.sample_sigma_min (0.003, ECMPrecond in eval mode), no clip between
# steps and re-noise x0 + t_next z (training/ct_training_loop.py generator_fn).


def _ect_loss(family, config):
    e = config.ect

    def loss_fn(params, state, x, cond, frozen, loss_key, dropout_key, k):
        student = _bind(family.denoiser_fn, params, cond, dropout_key)
        target = _bind(family.denoiser_fn, jax.lax.stop_gradient(params), cond, dropout_key)
        stage = k // max(int(e.stage_steps), 1)
        loss, metrics = continuous.ect_loss(student, target, x, loss_key, stage, q=e.q, k=e.k, b=e.b, c=e.c,
                                    p_mean=e.p_mean, p_std=e.p_std, weighting=e.weighting)
        return loss, dict(metrics, stage=stage)
    return loss_fn


def _ect_model(family, config) -> Model:
    shift = float(config.ect.sample_sigma_min)
    h, w, c = family.image_shape

    def consistency_fn(params, y, sigma, cond=None, dropout_rng=None):
        return C.consistency_function(family.apply_fn(params, dropout_rng), y, sigma, sigma_min=shift)

    def sample(params, key, num, num_steps):
        """1 step at sigma_max, 2 steps add sampling.mid_sigma (more: the Karras grid); only the
        final image is clipped to [-1, 1]."""
        sigmas = C.sampling_sigmas(num_steps, float(config.sampling.sigma_max), shift,
                                   mid_sigma=float(config.sampling.mid_sigma))
        fn = lambda y, s: consistency_fn(params, y, s)
        x0 = C.sample_multistep(fn, key, (num, h, w, c), sigmas, sigma_min=0.0, clip_denoised=False)
        return jnp.clip(x0, -1.0, 1.0)

    return Model(family.init_params, consistency_fn, sample)


def _ect_check(config) -> None:
    if config.ect.weighting not in continuous.ECT_WEIGHTINGS:
        raise ValueError(f"ect.weighting={config.ect.weighting!r}: expected one of {continuous.ECT_WEIGHTINGS}")


ECT = Algorithm("ect", _ect_loss, _ect_model, families=("image",), init_from=lambda config: config.ect.init,
                check=_ect_check)


# --------------------------------------------------------------------------------------------
# MeanFlow: u(z, r, t) = F(z, (t, t - r)) on the image UNet with two time inputs.


def _average_velocity(family, params, dropout_rng):
    apply = family.apply_fn(params, dropout_rng)
    return lambda z, r, t: apply(z, unet_time(jnp.stack([t, t - r], axis=-1)))


def _meanflow_model(family, config) -> Model:
    def consistency_fn(params, y, sigma, cond=None, dropout_rng=None):
        """EDM y = x + sigma e is z_t / (1 - t) with t = sigma / (1 + sigma); jump to t = 0."""
        sigma = jnp.asarray(sigma, jnp.float32)
        t = sigma / (1.0 + sigma)
        z = y.astype(jnp.float32) * (1.0 - t)[:, None, None, None]
        u = _average_velocity(family, params, dropout_rng)(z, jnp.zeros_like(t), t)
        return z - t[:, None, None, None] * u.astype(jnp.float32)

    def sample(params, key, num, num_steps):
        """num_steps equal jumps from t = 1 to 0 (1: x = e - u(e, 0, 1)); clipped to [-1, 1]."""
        h, w, c = family.image_shape
        noise = jax.random.normal(key, (num, h, w, c), jnp.float32)
        times = [1.0 - i / num_steps for i in range(num_steps)] + [0.0]
        return jnp.clip(continuous.meanflow_sample(_average_velocity(family, params, None), noise, times), -1.0, 1.0)

    return Model(family.init_params, consistency_fn, sample)


def _meanflow_loss(family, config):
    m = config.meanflow

    def loss_fn(params, state, x, cond, frozen, loss_key, dropout_key, k):
        sg = jax.lax.stop_gradient(params)
        return continuous.meanflow_loss(_average_velocity(family, params, dropout_key),
                                        _average_velocity(family, sg, dropout_key), x, loss_key,
                                        p_mean=m.p_mean, p_std=m.p_std, equal_fraction=m.equal_fraction,
                                        weight_p=m.weight_p, weight_c=m.weight_c)
    return loss_fn


MEANFLOW = Algorithm("meanflow", _meanflow_loss, _meanflow_model, families=("image",), time_inputs=2)


ALGORITHMS = {a.name: a for a in (ICT, CT, CD, EDM, SCT, SCD, ECT, MEANFLOW)}


def get(name: str) -> Algorithm:
    """The entry for ``config.algorithm``; a clear error for an unknown name."""
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm={name!r}: expected one of {tuple(ALGORITHMS)}")
    return ALGORITHMS[name]


def validate(config, family: Optional[Family] = None) -> None:
    """Fail early, naming the field, when the algorithm cannot run with this family/config."""
    algo = get(config.algorithm)
    if config.family not in algo.families:
        raise ValueError(f"algorithm={algo.name!r} supports family {' or '.join(algo.families)}, "
                         f"not {config.family!r}")
    if config.family == "image" and config.model.time_inputs != algo.time_inputs:
        raise ValueError(f"algorithm={algo.name!r} needs model.time_inputs={algo.time_inputs} "
                         f"(got {config.model.time_inputs})")
    algo.check(config)
    if algo.needs_teacher and not algo.teacher(config):
        raise ValueError(f"algorithm {algo.name!r} needs cd.teacher: the workdir of an 'edm' run "
                         "(or a cmjax decoder checkpoint for the decoder family)")
    if family is not None and family.max_scales is not None:
        cap = family.max_scales - 1
        n = algo.max_scales(config)
        if n is not None and n - 1 > cap:
            raise ValueError(f"the decoder grid (spacing {config.model.spacing}, t_max {config.model.t_max}) "
                             f"has {cap} intervals; the curriculum asks for {n - 1} (set ict.s1 / ct.s1 / "
                             f"cd.num_scales accordingly)")
