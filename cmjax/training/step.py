"""The train step: a pure ``(state, batch, frozen) -> (state, metrics)``, one per algorithm.

``frozen`` holds what is used but never trained and never checkpointed with the run: the CD
teacher's params and the decoder family's latent encoder (SD VAE params or the fixed patch
matrix); it may be an empty dict.  ``batch`` is {"image": (B,H,W,C) in [-1,1], "latent"?}.

Per step: key = fold_in(rng, step); (loss_key, dropout_key) = split(key).  Student and target
(and the teacher's Heun step) see the same noise and the **same dropout key**.

    ict : ict_loss, target = stopgrad(params), N(k) = ict_num_scales (doubling), lognormal pairs,
          pseudo-Huber, lambda = 1/(sigma_{n+1} - sigma_n)
    ct  : ct_loss, target = EMA target params with mu(k) = ct_ema_decay(k), N(k) = ct_num_scales
    cd  : cd_loss, one Heun step of the frozen EDM teacher, EMA target with fixed cd.target_ema
    edm : edm_denoising_loss (trains a teacher for cd)

Then optax update (fp32), eval EMA ``ema = d * ema + (1 - d) * params`` (only on steps where
MultiSteps applied an update), and the target EMA for ct/cd.  Loss math is float32 throughout.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cmjax import consistency as C
from cmjax.training.families import Family
from cmjax.training.state import TrainState, prng_impl

ALGORITHMS = ("ict", "ct", "cd", "edm")


def _ema(ema, new, decay, apply):
    """decay * ema + (1 - decay) * new where ``apply`` (a traced bool), else ema; fp32."""
    def one(e, p):
        upd = decay * e + (1.0 - decay) * p.astype(jnp.float32)
        return jnp.where(apply, upd, e)
    return jax.tree.map(one, ema, new)


def curriculum_updates(config) -> int:
    """K, the curricula's length in optimizer updates: config.curriculum_steps (micro-steps) or,
    when that is 0, total_steps."""
    steps = config.get("curriculum_steps", 0) or config.total_steps
    return max(int(steps) // config.optim.grad_accum_steps, 1)


def num_scales(config, k):
    """N(k) for the algorithm (traced int32 scalar); None for edm."""
    a = config.algorithm
    K = curriculum_updates(config)
    if a == "ict":
        return C.ict_num_scales(k, K, config.ict.s0, config.ict.s1)
    if a == "ct":
        return C.ct_num_scales(k, K, config.ct.s0, config.ct.s1)
    if a == "cd":
        return jnp.int32(config.cd.num_scales)
    return None


def make_loss_fn(family: Family, config) -> Callable:
    """(params, state, x, cond, frozen, loss_key, dropout_key, k) -> (loss, metrics)."""
    a = config.algorithm
    if a not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {a!r} (expected one of {ALGORITHMS})")
    grid_kw = {} if family.grid_fn is None else {"grid_fn": family.grid_fn}
    karras_kw = {} if family.grid_fn is not None else {"sigma_max": float(config.sampling.sigma_max)}

    def huber(name):
        c = config[name].get("huber_c", -1.0)
        return None if c is None or c < 0 else float(c)

    def loss_fn(params, state, x, cond, frozen, loss_key, dropout_key, k):
        student = lambda y, t: family.consistency_fn(params, y, t, cond, dropout_key)
        n = num_scales(config, k)
        if a == "ict":
            sg = jax.lax.stop_gradient(params)
            target = lambda y, t: family.consistency_fn(sg, y, t, cond, dropout_key)
            return C.ict_loss(student, target, x, loss_key, n, max_scales=config.ict.s1 + 1,
                              p_mean=config.ict.p_mean, p_std=config.ict.p_std, c=huber("ict"),
                              **grid_kw, **karras_kw)
        if a == "ct":
            target = lambda y, t: family.consistency_fn(state.target_params, y, t, cond, dropout_key)
            return C.ct_loss(student, target, x, loss_key, n, metric=config.ct.metric,
                             c=huber("ct"), **grid_kw, **karras_kw)
        if a == "cd":
            target = lambda y, t: family.consistency_fn(state.target_params, y, t, cond, dropout_key)
            teacher = lambda y, s: family.denoiser_fn(frozen["teacher"], y, s, cond, None)
            return C.cd_loss(student, target, teacher, x, loss_key, n, metric=config.cd.metric,
                             c=huber("cd"), **grid_kw, **karras_kw)
        denoiser = lambda y, s: family.denoiser_fn(params, y, s, cond, dropout_key)
        return C.edm_denoising_loss(denoiser, x, loss_key, p_mean=config.edm.p_mean,
                                    p_std=config.edm.p_std, sigma_sampler=family.edm_sigma_sampler)

    return loss_fn


def make_train_step(family: Family, config, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict]]:
    """The pure train step for ``config.algorithm``; jit it with the state donated."""
    loss_fn = make_loss_fn(family, config)
    accum = int(config.optim.grad_accum_steps)
    ema_decay = float(config.ema_decay)
    impl = prng_impl(config)

    def train_step(state: TrainState, batch, frozen):
        k = state.step // accum
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=impl), state.step)
        loss_key, dropout_key = jax.random.split(key)
        x, cond = family.prepare(batch, frozen)

        def objective(params):
            return loss_fn(params, state, x, cond, frozen, loss_key, dropout_key, k)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        updated = tx.has_updated(opt_state) if isinstance(tx, optax.MultiSteps) else jnp.bool_(True)
        ema_params = _ema(state.ema_params, params, ema_decay, updated)
        target_params = state.target_params
        if config.algorithm == "ct":
            mu = C.ct_ema_decay(k, curriculum_updates(config), config.ct.mu0,
                                config.ct.s0, config.ct.s1)
            target_params = _ema(target_params, params, mu, updated)
            metrics = dict(metrics, target_ema=mu)
        elif config.algorithm == "cd":
            target_params = _ema(target_params, params, float(config.cd.target_ema), updated)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_params, target_params=target_params)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(k))
        metrics = {k_: jnp.asarray(v, jnp.float32) for k_, v in metrics.items()}
        return new_state, metrics

    return train_step
