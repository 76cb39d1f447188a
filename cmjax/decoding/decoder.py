"""The decode path: SD latents -> images with the consistency decoder, top to bottom.

    z (B, h, w, C) raw VAE latents (C = 4 for OpenAI's SD 1.x decoder; 16 for SD3/FLUX decoders)
      -> normalize_latents: ((z - shift) * scaling - mean_c) / std_c  (SD 1.x: shift 0, scaling 0.18215)
      -> upsample_nearest: nearest x8 -> z_up (B, 8h, 8w, C)
      -> for t in timesteps (default 1008, 512):
             x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps          (x0 = 0 at the start)
             x0  = c_out[t] * F(concat[c_in[t] * x_t, z_up], t)[..., :3] + c_skip[t] * x_t
             x0  = clip(x0, -1, 1)                                      (OpenAI; not diffusers)
      -> images (B, 8h, 8w, 3) float32 in [-1, 1]

``decode_latents`` is the pure function (params in, images out) that ``jax.jit`` compiles as one
program for the whole multi-step decode; ``decode`` is the checked public entry point. What a
decoder is (``DecoderConfig``, the ``Decoder`` record) lives with its network in
:mod:`cmjax.models.decoder_config`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmjax import tuning
from cmjax.decoding import schedule
from cmjax.models.conv_lowering import XLA, ConvShape, LoweringPlan
from cmjax.models.decoder_config import IMAGE_CHANNELS, Decoder, DecoderConfig, abstract_params, make_network
from cmjax.models.layers import add_leaves, conv_shapes, prepared_kernels, upsample_nearest, with_prepared_kernels

# (params, x_t (B, H, W, 3), z_up (B, H, W, C), t, config, dtype, lowering) -> x0 (B, H, W, 3); see ``denoise``.
DenoiseFn = Callable[..., jax.Array]


def prepared_params(decoder: Decoder, latents_shape: Sequence[int], dtype=jnp.float32,
                    lowering: LoweringPlan = XLA) -> Any:
    """``decoder.params`` with the kernels ``lowering`` prepares for a decode of ``latents_shape``
    latents, made once and kept in ``decoder.prepared`` (one shape at a time)."""
    if not lowering.prepares:
        return decoder.params
    key = (tuple(latents_shape), jnp.dtype(dtype).name, lowering)
    if key not in decoder.prepared:
        decoder.prepared.clear()  # one shape's prepared kernels at a time
        leaves = _prepared_kernels_jit(decoder.params, config=decoder.config, latents_shape=key[0], dtype=dtype,
                                       lowering=lowering)
        decoder.prepared[key] = add_leaves(decoder.params, leaves)
    return decoder.prepared[key]


def normalize_latents(latents: jax.Array, config: DecoderConfig) -> jax.Array:
    """((z - shift_factor) * scaling_factor - mean_c) / std_c over the last (channel) axis; float32."""
    mean = jnp.asarray(config.latent_mean, jnp.float32)
    std = jnp.asarray(config.latent_std, jnp.float32)
    return ((latents.astype(jnp.float32) - config.shift_factor) * config.scaling_factor - mean) / std


def denoise(params: Any, x_t: jax.Array, z_up: jax.Array, t: int, config: DecoderConfig,
            dtype=jnp.float32, lowering: LoweringPlan = XLA, remat: bool = False) -> jax.Array:
    """The consistency function x0_hat = c_out[t] * F(concat[c_in[t] x_t, z_up], t)[..., :3] + c_skip[t] x_t.

    x_t: (B, H, W, 3) float32, z_up: (B, H, W, latent_channels) normalised latents; t a grid timestep
    (Python int or traced int scalar/(B,) array). ``lowering``: the network's conv lowering plan;
    ``remat``: its residual blocks recompute their activations when differentiated (training).
    Returns float32 (B, H, W, 3), not clipped.
    """
    tables = schedule.decoder_schedule(config.unet.num_train_timesteps, config.sigma_data)
    c_in, c_out, c_skip = (jnp.asarray(a)[t] for a in (tables.c_in, tables.c_out, tables.c_skip))
    c_in, c_out, c_skip = (_per_example(c, x_t) for c in (c_in, c_out, c_skip))
    net_in = jnp.concatenate([c_in * x_t, z_up], axis=-1)
    t_batch = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x_t.shape[0],))
    out = make_network(config, dtype, lowering=lowering, remat=remat).apply({"params": params}, net_in, t_batch)
    return c_out * out[..., :IMAGE_CHANNELS].astype(jnp.float32) + c_skip * x_t


def _per_example(c: jax.Array, x: jax.Array) -> jax.Array:
    """Broadcast a scalar or (B,) coefficient against an NHWC array."""
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


def decode_latents(params: Any, latents: jax.Array, noise: jax.Array | Callable[[jax.Array], jax.Array], *,
                   config: DecoderConfig, timesteps: Sequence[int] = schedule.DEFAULT_TIMESTEPS,
                   clip_denoised: bool = True, dtype=jnp.float32, denoise_fn: DenoiseFn | None = None,
                   lowering: LoweringPlan = XLA) -> jax.Array:
    """Pure multi-step decode; jit it with ``config``, ``timesteps``, ``clip_denoised``, ``dtype``,
    ``lowering`` static.

    latents: (B, h, w, latent_channels) raw SD latents. noise: (len(timesteps), B, 8h, 8w, 3), one
    standard normal draw per step, or a function step index (traced int32) -> (B, 8h, 8w, 3) that
    makes each step's draw inside the loop (then one step's noise is alive at a time). Returns
    (B, 8h, 8w, 3) float32 in [-1, 1] (when clipped). clip_denoised=True clamps x0 after every step
    (OpenAI); False only at the end (diffusers output before post-processing is unclamped, so this
    returns it unclamped too).

    ``denoise_fn(params, x_t, z_up, t, config, dtype, lowering) -> x0`` is the consistency function
    the loop calls, by default ``denoise`` on the whole image; ``lowering`` (a ``LoweringPlan``, from
    ``cmjax.tuning``; default XLA's convolution) says how each conv is computed;
    ``cmjax.decoding.tiling.tiled_denoise`` computes it over overlapping tiles. This loop is the one sampler of the decoder.
    """
    denoise_fn = denoise if denoise_fn is None else denoise_fn
    tables = schedule.decoder_schedule(config.unet.num_train_timesteps, config.sigma_data)
    sqrt_abar, sqrt_one_minus_abar = jnp.asarray(tables.sqrt_alphas_cumprod), jnp.asarray(tables.sqrt_one_minus_alphas_cumprod)
    z_up = upsample_nearest(normalize_latents(latents, config), config.upsample_factor)
    noise_at = noise if callable(noise) else (lambda i: noise[i])

    def step(x0, t_and_index):
        t, i = t_and_index
        x_t = sqrt_abar[t] * x0 + sqrt_one_minus_abar[t] * noise_at(i)
        x0 = denoise_fn(params, x_t, z_up, t, config, dtype, lowering)
        return (jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0), None

    # A scan, not a Python loop: one UNet in the compiled program whatever the number of steps.
    # (x0 from zeros_like(z_up) rather than zeros: inside shard_map it carries the same varying axes.)
    x0 = jnp.zeros_like(z_up[..., :1]) + jnp.zeros(IMAGE_CHANNELS, jnp.float32)
    # Kernels that a conv's lowering rewrites (Winograd, subpixel) are rewritten once, here, not per step.
    params = with_prepared_kernels(params, lambda p: denoise_fn(p, x0, z_up, timesteps[0], config, dtype, lowering))
    x0, _ = jax.lax.scan(step, x0,
                         (jnp.asarray(timesteps, jnp.int32), jnp.arange(len(timesteps), dtype=jnp.int32)))
    return x0


_decode_jit = jax.jit(decode_latents, static_argnames=("config", "timesteps", "clip_denoised", "dtype", "lowering"))


@functools.partial(jax.jit, static_argnames=("config", "latents_shape", "dtype", "lowering"))
def _prepared_kernels_jit(params: Any, *, config: DecoderConfig, latents_shape: tuple[int, ...], dtype,
                          lowering: LoweringPlan) -> dict:
    """The kernels ``decode_latents`` prepares for (B, h, w, C) latents (``prepared_kernels``), alone."""
    shape = noise_shape(latents_shape, config)
    x_t, z_up = jnp.zeros(shape), jnp.zeros(shape[:3] + (latents_shape[-1],))
    return prepared_kernels(params, lambda p: denoise(p, x_t, z_up, schedule.DEFAULT_TIMESTEPS[0], config, dtype,
                                                      lowering))


def decode_conv_shapes(config: DecoderConfig, latents_shape: Sequence[int], dtype=jnp.float32) -> tuple[ConvShape, ...]:
    """The conv shapes of a ``decode`` of (B, h, w, C) latents: what ``cmjax.tuning.tune`` measures
    to make its plan. An abstract trace: nothing is allocated, whatever the size."""
    shape = noise_shape(latents_shape, config)
    x_t = jax.ShapeDtypeStruct(shape, jnp.float32)
    z_up = jax.ShapeDtypeStruct(shape[:3] + (latents_shape[-1],), jnp.float32)
    return conv_shapes(lambda p, x, z: denoise(p, x, z, schedule.DEFAULT_TIMESTEPS[0], config, dtype),
                       abstract_params(config), x_t, z_up)


def noise_shape(latents_shape: Sequence[int], config: DecoderConfig) -> tuple[int, int, int, int]:
    b, h, w, _ = latents_shape
    return (b, h * config.upsample_factor, w * config.upsample_factor, IMAGE_CHANNELS)


def decode(decoder: Decoder, latents, *, key: jax.Array | None = None, noise: Sequence[Any] | None = None,
           timesteps: Sequence[int] = schedule.DEFAULT_TIMESTEPS, clip_denoised: bool = True,
           dtype=jnp.float32, lowering: LoweringPlan | None = None) -> jax.Array:
    """Decode raw (unscaled) VAE latents into images.

    latents: (B, h, w, config.latent_channels) NHWC (4 for OpenAI's SD 1.x decoder), what
    ``AutoencoderKL.decode`` takes (before any scaling or shift), transposed to channels-last.
    Exactly one of ``key`` (a PRNG key; noise for step i is ``normal(fold_in(key, i))``) or
    ``noise`` (one (B, 8h, 8w, 3) array per step) may be given; with neither, key 0 is used.
    ``timesteps`` must lie on the distilled grid (16, 32, ..., 1008).
    ``dtype`` is the network's compute dtype (e.g. ``jnp.bfloat16``); params keep their own.
    ``lowering``: how each conv is computed (a ``LoweringPlan``); None: ``cmjax.tuning.default_plan()``,
    the plan cached for this CPU (``cmjax.tuning.tune`` measures one), XLA's convolution for any
    conv it does not name and off CPU. Nothing is measured here.

    Returns (B, 8h, 8w, 3) float32 in [-1, 1].
    """
    cfg = decoder.config
    timesteps = schedule.check_timesteps(timesteps, cfg.unet.num_train_timesteps)
    latents = _check_latents(latents, cfg)
    shape = noise_shape(latents.shape, cfg)
    if noise is not None and key is not None:
        raise ValueError("give either key or noise, not both")
    if noise is None:
        key = jax.random.key(0) if key is None else key
        noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
                           for i in range(len(timesteps))])
    else:
        noise = _check_noise(noise, shape, len(timesteps))
    lowering = tuning.default_plan()[0] if lowering is None else lowering
    return _decode_jit(prepared_params(decoder, latents.shape, dtype, lowering), latents, noise, config=cfg,
                       timesteps=timesteps, clip_denoised=clip_denoised, dtype=dtype, lowering=lowering)


def _check_latents(latents, config: DecoderConfig) -> jax.Array:
    if not hasattr(latents, "shape"):
        latents = np.asarray(latents)
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, h, w, {config.latent_channels}) NHWC, got shape {tuple(latents.shape)}")
    if latents.shape[-1] != config.latent_channels:
        c = config.latent_channels
        if latents.shape[1] == c:
            hint = " (NCHW? transpose to NHWC)"
        else:
            hint = (f": this decoder reads the {c}-channel latents of the VAE it was trained for "
                    f"(4: SD 1.x/2.x/SDXL, 16: SD3/FLUX); decode these with a decoder for their VAE")
        raise ValueError(f"latents must have {c} channels in the last axis, got shape {tuple(latents.shape)}{hint}")
    if min(latents.shape) == 0:
        raise ValueError(f"latents must not be empty, got shape {tuple(latents.shape)}")
    if not jnp.issubdtype(latents.dtype, jnp.floating):
        raise ValueError(f"latents must be floating point, got {latents.dtype}")
    if not bool(jnp.isfinite(latents).all()):
        raise ValueError("latents contain NaN or inf")
    return jnp.asarray(latents, jnp.float32)


def _check_noise(noise: Sequence[Any], shape: tuple[int, ...], steps: int) -> jax.Array:
    if len(noise) != steps:
        raise ValueError(f"noise needs one array per step: {steps} steps, got {len(noise)} arrays")
    if hasattr(noise, "ndim"):
        stacked = jnp.asarray(noise, jnp.float32)
    else:
        stacked = jnp.stack([jnp.asarray(n, jnp.float32) for n in noise])
    if stacked.shape != (steps, *shape):
        raise ValueError(f"each noise array must have shape {shape}, got {tuple(stacked.shape[1:])}")
    return stacked
