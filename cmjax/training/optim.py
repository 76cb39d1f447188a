"""Optimizer and learning-rate schedule (optax) from ``config.optim``.

    grads -> [clip_by_global_norm(grad_clip)] -> RAdam | AdamW (lr schedule: linear warmup, then
    constant or cosine) -> [MultiSteps: apply every grad_accum_steps micro-batches]

The schedule is a function of the number of *optimizer updates* k = step // grad_accum_steps.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax


def lr_schedule(config) -> optax.Schedule:
    """k (updates) -> learning rate: linear warmup lr/W, 2 lr/W, ..., lr over W = warmup_steps
    updates, then constant or cosine decay over the remaining updates."""
    o = config.optim
    num_updates = max(config.total_steps // o.grad_accum_steps, 1)
    if o.schedule == "constant":
        main = optax.constant_schedule(o.lr)
    elif o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.lr, max(num_updates - o.warmup_steps, 1))
    else:
        raise ValueError(f"unknown optim.schedule {o.schedule!r} (constant, cosine)")
    if o.warmup_steps <= 0:
        return main
    warmup = int(o.warmup_steps)

    def schedule(k):  # lr * (k + 1) / warmup during warmup: the first update is not wasted
        k = jnp.asarray(k)
        return jnp.minimum(1.0, (k + 1) / warmup) * main(jnp.maximum(k - warmup, 0))

    return schedule


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule). With grad_accum_steps > 1, tx is an ``optax.MultiSteps``."""
    o = config.optim
    schedule = lr_schedule(config)
    if o.name == "radam":
        # Decoupled weight decay as in AdamW (none in iCT: weight_decay 0).
        opt = optax.chain(optax.scale_by_radam(b1=o.b1, b2=o.b2, eps=o.eps),
                          optax.add_decayed_weights(o.weight_decay),
                          optax.scale_by_learning_rate(schedule))
    elif o.name == "adamw":
        opt = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    elif o.name == "adam":
        opt = optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps)
    else:
        raise ValueError(f"unknown optim.name {o.name!r} (radam, adamw, adam)")
    if o.grad_clip and o.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
    if o.grad_accum_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=o.grad_accum_steps)
    return opt, schedule
