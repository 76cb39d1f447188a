"""The two model families, each as a small bundle of pure functions over params.

The losses in ``cmjax.consistency`` live in **EDM coordinates**: a clean image ``x`` in [-1, 1],
a noise level ``sigma`` and ``y = x + sigma * z``.  A family says how its network turns
``(y, sigma)`` into ``x0_hat`` for the discrete-time algorithms (``consistency_fn``, the CM
parameterisation; ``denoiser_fn``, EDM's) and which noise levels exist.  The image family also hands
out its raw network (``apply_fn``): the algorithms with a parameterisation of their own build it there
(:mod:`cmjax.training.algorithms`: sCT/sCD's TrigFlow, MeanFlow's average velocity, ECT's sampling
shift), so for those the family owns the network, not the parameterisation.

* ``image``: an unconditional CM with the EDM/CM parameterisation (CM paper, appendix C), sigma in
  [0.002, 80], the Karras grid, network :class:`cmjax.models.image_unet.ImageUNet`.

* ``decoder``: the latent-conditioned consistency decoder in its own parameterisation
  (openai/consistencydecoder): 1024 discrete timesteps of a cosine VP schedule,
  ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and ``x0_hat = cmjax.decoding.decoder.denoise(...)``.

  How CT / iCT are adapted to this discrete-time VP parameterisation:
    - ``x_t / sqrt(abar_t) = x0 + sigma_t eps`` with ``sigma_t = sqrt(1/abar_t - 1)``, so a VP
      state *is* an EDM state ``y`` scaled by ``sqrt(abar_t)``, and the decoder's
      ``c_in/c_skip/c_out`` are exactly EDM's denoiser scalings of ``y`` at ``sigma_t``.  A CT
      pair (t_{n+1}, t_n) with a shared eps is therefore the EDM pair
      ``(x0 + sigma_{n+1} z, x0 + sigma_n z)`` with the same z, and every loss of
      ``cmjax.consistency`` applies unchanged once it is given the grid of sigmas.
    - The grid is discrete: the allowed timesteps are ``0, spacing, 2*spacing, ..., t_max``
      (M of them; spacing 16 and t_max 1008 is the released model's 64-slot grid plus t = 0 as
      the boundary).  With N scales, ``t_i = spacing * round(i (M-1)/(N-1))``, i = 0..N-1,
      strictly increasing for N <= M, so curricula are capped at ``s1 <= M - 1``.
    - iCT's lognormal pair distribution, its weight ``1/(sigma_{n+1} - sigma_n)`` and the
      pseudo-Huber distance use these sigmas; the network receives the integer timestep
      (recovered from sigma by an exact table lookup).
    - The boundary is t = 0 (sigma_0 = 0.0064): there ``c_skip`` is 1 - 2e-4 and ``c_out`` 0.0064,
      so ``f(x, t_0) = x`` holds to that accuracy rather than exactly (the decoder's scalings
      have no sigma_min shift).
    - 'edm' (teacher) training draws EDM's lognormal sigma and rounds it (in log space) to the
      nearest allowed timestep.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cmjax import consistency as C
from cmjax.decoding import schedule
from cmjax.decoding.decoder import decode_latents, denoise, normalize_latents
from cmjax.files import read_small
from cmjax.models import decoder_config
from cmjax.models.decoder_config import Decoder, DecoderConfig
from cmjax.models.decoder_unet import UNetConfig
from cmjax.models.image_unet import ImageUNet, ImageUNetConfig
from cmjax.models.layers import compute_dtype, upsample_nearest
from cmjax.models.vae import encode_latents
from cmjax.weights import hub
from cmjax.weights.checkpoint import read_config, read_vae_config, save_decoder
from cmjax.weights.errors import parse_json


@dataclasses.dataclass(frozen=True)
class Family:
    """What the trainer needs to know about a model; every callable is pure and jittable.

    Attributes:
      name: "image" or "decoder".
      image_shape: (H, W, C) of training images.
      init_params: key -> params (fp32).
      consistency_fn: (params, y (B,H,W,C), sigma (B,), cond, dropout_rng|None) -> x0_hat float32.
        ``dropout_rng=None`` means deterministic (evaluation, teachers).
      denoiser_fn: same signature, the EDM denoiser D(y, sigma) (the 'edm' objective, CD teacher).
      grid_fn: (i, N) -> sigma_i of the increasing N-point training grid, or None for Karras.
      max_scales: largest N the grid supports (None: unbounded).
      edm_sigma_sampler: (key, B) -> sigma (B,) for the 'edm' objective, or None (lognormal).
      prepare: (batch, frozen) -> (x (B,H,W,C) in [-1,1], cond or None).
      sample: (params, key, cond_or_batch_size, num_steps) -> images float32 in [-1, 1].
      config: the family's own model config (ImageUNetConfig or DecoderConfig).
      grid: decoder only, its DecoderGrid.
      latents_of: decoder only, (batch, frozen) -> raw latents (B, h, w, latent_channels).
      apply_fn: image only, (params, dropout_rng|None) -> the raw network
        ``(x_scaled (B,H,W,C), c_noise (B,) or (B, time_inputs)) -> F``, for algorithms with
        their own parameterisation (sCM, MeanFlow; :mod:`cmjax.training.algorithms`).
      init_checkpoint_params: () -> params to fine-tune from (a converted checkpoint), or None.
      export_checkpoint: (params, path) -> None: the params as a checkpoint other tools read.

    The trainer asks a family what it can do (``conditional``, the two hooks), never its name.
    """

    name: str
    image_shape: tuple[int, int, int]
    init_params: Callable
    consistency_fn: Callable
    denoiser_fn: Callable
    grid_fn: Optional[Callable]
    max_scales: Optional[int]
    edm_sigma_sampler: Optional[Callable]
    prepare: Callable
    sample: Callable
    config: Any
    grid: Any = None
    latents_of: Optional[Callable] = None
    apply_fn: Optional[Callable] = None
    init_checkpoint_params: Optional[Callable] = None
    export_checkpoint: Optional[Callable] = None

    @property
    def conditional(self) -> bool:
        """Whether samples are conditioned on a batch's latents (the decoder) rather than drawn
        unconditionally (image CMs: sample grids and FID)."""
        return self.latents_of is not None


def make_family(config) -> Family:
    """The Family named by ``config.family`` ("image" or "decoder")."""
    if config.family == "image":
        return image_family(config)
    if config.family == "decoder":
        return decoder_family(config)
    raise ValueError(f"unknown family {config.family!r} (expected 'image' or 'decoder')")


# --------------------------------------------------------------------------------------------
# (b) Unconditional image CMs, EDM parameterisation.


def image_model_config(config) -> ImageUNetConfig:
    m = config.model
    return ImageUNetConfig(
        in_channels=config.data.channels, out_channels=config.data.channels,
        base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout, num_groups=m.num_groups, embedding=m.embedding,
        fourier_scale=m.fourier_scale, embedding_size=m.embedding_size, time_inputs=m.time_inputs)


def image_family(config, network=None) -> Family:
    """The image family of ``config``; ``network``, a Flax module called as
    ``(x_scaled, c_noise, train=...)``, replaces the ImageUNet (tests pin the objectives with a tiny one)."""
    mcfg = image_model_config(config)
    dtype = compute_dtype(config.compute_dtype)
    size, channels = config.data.image_size, config.data.channels
    net = ImageUNet(mcfg, dtype=dtype, remat=bool(config.remat)) if network is None else network
    init_net = ImageUNet(mcfg) if network is None else network
    smp = config.sampling
    sigma_min, sigma_max = C.SIGMA_MIN, float(smp.sigma_max)

    def init_params(key):
        x = jnp.zeros((1, size, size, channels), jnp.float32)
        return init_net.init(key, x, jnp.zeros((1, mcfg.time_inputs), jnp.float32))["params"]

    def apply_fn(params, dropout_rng):
        if dropout_rng is None:
            return lambda xs, cn: net.apply({"params": params}, xs, cn, train=False)
        return lambda xs, cn: net.apply({"params": params}, xs, cn, train=True,
                                        rngs={"dropout": dropout_rng})

    def consistency_fn(params, y, sigma, cond=None, dropout_rng=None):
        return C.consistency_function(apply_fn(params, dropout_rng), y, sigma, sigma_min=sigma_min)

    def denoiser_fn(params, y, sigma, cond=None, dropout_rng=None):
        return C.edm_denoiser(apply_fn(params, dropout_rng), y, sigma)

    def prepare(batch, frozen):
        return batch["image"], None

    def sample(params, key, num: int, num_steps: int):
        """num images (num, H, W, C) float32 in [-1, 1]; 1 step at sigma_max, 2 steps add mid_sigma."""
        sigmas = C.sampling_sigmas(num_steps, sigma_max, sigma_min, mid_sigma=float(smp.mid_sigma))
        fn = lambda y, t: consistency_fn(params, y, t)
        return C.sample_multistep(fn, key, (num, size, size, channels), sigmas, sigma_min)

    return Family(name="image", image_shape=(size, size, channels), init_params=init_params,
                  consistency_fn=consistency_fn, denoiser_fn=denoiser_fn, grid_fn=None, max_scales=None,
                  edm_sigma_sampler=None, prepare=prepare, sample=sample, config=mcfg, apply_fn=apply_fn)


# --------------------------------------------------------------------------------------------
# (a) The latent-conditioned consistency decoder, discrete VP parameterisation.


def decoder_model_config(config) -> DecoderConfig:
    """The DecoderConfig: from the fine-tune checkpoint if one is named (moved to the latent space of
    ``data.vae_checkpoint`` when ``model.retarget_latents``), else from config.model."""
    if config.model.init_checkpoint:
        base = read_config(hub.resolve_checkpoint(config.model.init_checkpoint))
    else:
        u = config.model.unet
        base = DecoderConfig(unet=UNetConfig(block_out_channels=tuple(u.block_out_channels),
                                             layers_per_block=u.layers_per_block,
                                             norm_num_groups=u.norm_num_groups))
    return newspace_decoder_config(config, base) if config.model.retarget_latents else base


# --------------------------------------------------------------------------------------------
# A decoder for another VAE's latent space (SDXL, SD3, FLUX), initialised from the SD 1.x decoder.


def retarget_decoder_config(base: DecoderConfig, vae_config, latent_mean=None, latent_std=None) -> DecoderConfig:
    """``base`` (e.g. OpenAI's SD 1.x decoder) moved to the latent space of the VAE ``vae_config``:
    its latent channel count, scaling and shift, and the per-channel statistics of its scaled latents
    (``python -m cmjax.eval latent-stats``; without them mean 0 and std 1, i.e. the VAE's own scaling,
    which its authors chose to give roughly unit variance). The UNet is unchanged except conv_in's
    input width, 3 + latent channels."""
    c = vae_config.latent_channels
    mean = tuple(latent_mean) if latent_mean is not None else (0.0,) * c
    std = tuple(latent_std) if latent_std is not None else (1.0,) * c
    unet = dataclasses.replace(base.unet, in_channels=base.unet.in_channels - base.latent_channels + c)
    return dataclasses.replace(base, unet=unet, latent_channels=c, scaling_factor=vae_config.scaling_factor,
                               shift_factor=vae_config.shift_factor, latent_mean=mean, latent_std=std)


def retarget_decoder_params(params: Any, base: DecoderConfig, new: DecoderConfig) -> Any:
    """``base``'s params for ``new`` (from ``retarget_decoder_config``): every weight copied except the
    latent part of ``conv_in``'s kernel (HWIO; input channels = [3 image, C latent]), which is zero.

    Why zeros, not a least-squares map from the new latents to SD 1.x latents: the start is then
    exactly the SD 1.x decoder fed its mean latent (normalised latents 0), a finite, well-behaved
    denoiser that fine-tuning only has to teach to read the new channels; the loss gradient of the
    zero weights is the correlation of the new latents with the output error, so they move from the
    first step. A linear 16 -> 4 map would need SD 1.x latents of the same images (a second VAE at
    initialisation), cannot carry the 12 extra channels' detail, and SD3/FLUX latents need not be a
    linear function of SD 1.x ones; at best it would shorten the first phase of fine-tuning
    (not measured here).
    """
    if base.unet.in_channels - base.latent_channels != new.unet.in_channels - new.latent_channels:
        raise ValueError("the two decoders must have the same number of image input channels")
    kernel = np.asarray(params["conv_in"]["kernel"])
    image = kernel.shape[2] - base.latent_channels
    latent = np.zeros(kernel.shape[:2] + (new.latent_channels, kernel.shape[3]), kernel.dtype)
    out = dict(params)
    out["conv_in"] = {**params["conv_in"], "kernel": np.concatenate([kernel[:, :, :image], latent], axis=2)}
    return out


def newspace_decoder_config(config, base: DecoderConfig) -> DecoderConfig:
    """``retarget_decoder_config`` for ``data.vae_checkpoint`` and the statistics in ``model.latent_stats``
    (a JSON written by ``python -m cmjax.eval latent-stats`` with that VAE; empty: mean 0, std 1)."""
    vae_config, _ = read_vae_config(hub.resolve_checkpoint(config.data.vae_checkpoint, kind="vae"))
    mean = std = None
    if config.model.latent_stats:
        mean, std = read_latent_stats(config.model.latent_stats, vae_config, config.data.vae_checkpoint)
    return retarget_decoder_config(base, vae_config, mean, std)


def read_latent_stats(path: str, vae_config, vae_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per latent channel from a ``python -m cmjax.eval latent-stats`` JSON measured
    with the VAE ``vae_config``; ValueError naming ``path`` for anything else (not a regular file,
    too large, bad JSON, other fields, another VAE's space, non-finite values, std <= 0)."""
    def bad(problem: str) -> ValueError:
        return ValueError(f"{path}: not a latent-stats JSON ({problem})")

    try:
        text = read_small(path)
    except OSError as e:
        raise bad(f"cannot read it: {e.strerror or e}") from None
    except ValueError as e:
        raise bad(str(e).removeprefix(f"{path}: ")) from None
    stats = parse_json(text, path, error=ValueError)
    keys = ("latent_mean", "latent_std", "latent_channels", "scaling_factor", "shift_factor")
    if not isinstance(stats, dict) or any(k not in stats for k in keys):
        raise bad(f"needs the fields {', '.join(keys)}")
    measured = tuple(stats[k] for k in keys[2:])
    wanted = (vae_config.latent_channels, vae_config.scaling_factor, vae_config.shift_factor)
    if measured != wanted:
        raise ValueError(f"{path}: measured with (channels, scaling, shift) = {measured}, but "
                         f"{vae_name} has {wanted}; rerun latent-stats with this VAE")
    out = []
    for name in keys[:2]:
        values = stats[name]
        if (not isinstance(values, list) or len(values) != wanted[0]
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
            raise bad(f"{name} must be {wanted[0]} finite numbers")
        out.append(tuple(float(v) for v in values))
    if min(out[1]) <= 0:
        raise bad("latent_std must be positive")
    return out[0], out[1]


def decoder_init_params(config, dcfg: DecoderConfig) -> Any:
    """The fine-tuning start of the decoder family: ``model.init_checkpoint``'s params, moved to
    ``dcfg``'s latent space by ``retarget_decoder_params`` when ``model.retarget_latents`` (also for
    a 4-channel space such as SDXL's: its channels are not SD 1.x's); None without an init checkpoint."""
    if not config.model.init_checkpoint:
        return None
    init = hub.load_decoder(config.model.init_checkpoint)
    if not config.model.retarget_latents:
        return init.params
    return retarget_decoder_params(jax.device_get(init.params), init.config, dcfg)


@dataclasses.dataclass(frozen=True)
class DecoderGrid:
    """Discrete timesteps 0, spacing, ..., t_max and their EDM sigmas (float32 tables)."""
    sigmas: np.ndarray          # (num_train_timesteps,) sqrt(1/abar - 1), strictly increasing
    sqrt_abar: np.ndarray       # (num_train_timesteps,)
    spacing: int
    t_max: int

    @property
    def num_allowed(self) -> int:
        return self.t_max // self.spacing + 1

    def timestep_at(self, i, num_scales):
        """t_i = spacing * round(i (M-1)/(N-1)) in exact integer arithmetic (traced OK)."""
        i = jnp.asarray(i, jnp.int32)
        n1 = jnp.asarray(num_scales, jnp.int32) - 1
        m1 = self.num_allowed - 1
        j = (2 * i * m1 + n1) // (2 * n1)
        return self.spacing * jnp.clip(j, 0, m1)

    def sigma_at(self, i, num_scales):
        return jnp.asarray(self.sigmas)[self.timestep_at(i, num_scales)]

    def timestep_of(self, sigma):
        """Inverse of the table: the timestep whose sigma is ``sigma`` (exact for table values;
        other values round up to the next level). int32, same shape as sigma."""
        t = jnp.searchsorted(jnp.asarray(self.sigmas), jnp.asarray(sigma, jnp.float32), side="left")
        return jnp.clip(t, 0, len(self.sigmas) - 1).astype(jnp.int32)


def decoder_grid(dcfg: DecoderConfig, spacing: int, t_max: int) -> DecoderGrid:
    n = dcfg.unet.num_train_timesteps
    tables = schedule.decoder_schedule(n, dcfg.sigma_data)
    ac = tables.alphas_cumprod
    # In float64: float32's 1/abar - 1 cancels near t = 0 (7e-4 relative error at t = 0).
    sigmas = np.sqrt(1.0 / ac.astype(np.float64) - 1.0).astype(np.float32)
    if not np.all(np.diff(sigmas) > 0):
        raise ValueError("decoder sigmas are not strictly increasing")
    if t_max % spacing or not 0 < t_max < n:
        raise ValueError(f"t_max={t_max} must be a multiple of spacing={spacing} in (0, {n})")
    return DecoderGrid(sigmas, np.asarray(tables.sqrt_alphas_cumprod), int(spacing), int(t_max))


def patch_encoder_matrix(seed: int, channels: int = 3, patch: int = 8, latent_channels: int = 4) -> np.ndarray:
    """A fixed random linear 8x8-patch 'encoder' (patch*patch*channels, latent_channels) float32.

    A stand-in for the SD VAE encoder in tests and demos: raw latent = patch @ W, scaled so that
    the decoder's normalised latents ``z * 0.18215`` have roughly unit variance.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((patch * patch * channels, latent_channels)) / math.sqrt(patch * patch * channels)
    return (w / 0.18215 * 1.7).astype(np.float32)


def patch_encode(w: jax.Array, images: jax.Array, patch: int = 8) -> jax.Array:
    """images (B, H, W, C) -> raw latents (B, H/patch, W/patch, latent_channels) float32."""
    b, h, wd, c = images.shape
    p = images.astype(jnp.float32).reshape(b, h // patch, patch, wd // patch, patch, c)
    p = p.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // patch, wd // patch, patch * patch * c)
    return p @ w


def decoder_family(config) -> Family:
    dcfg = decoder_model_config(config)
    dtype = compute_dtype(config.compute_dtype)
    size = config.data.image_size
    grid = decoder_grid(dcfg, config.model.spacing, config.model.t_max)
    sqrt_abar = jnp.asarray(grid.sqrt_abar)
    allowed = np.arange(0, grid.t_max + 1, grid.spacing)
    log_sig_allowed = np.log(grid.sigmas[allowed]).astype(np.float32)
    latents_kind = config.data.latents
    vae_cfg = None
    if latents_kind == "vae":  # the SD VAE encoder on the fly; its config from its checkpoint
        vae_cfg, parts = read_vae_config(hub.resolve_checkpoint(config.data.vae_checkpoint, kind="vae"))
        if "encoder" not in parts or vae_cfg.downsample_factor != dcfg.upsample_factor:
            raise ValueError(f"{config.data.vae_checkpoint}: needs an encoder with downsample factor "
                             f"{dcfg.upsample_factor} (has parts {parts}, factor {vae_cfg.downsample_factor})")
        if vae_cfg.latent_channels != dcfg.latent_channels:
            raise ValueError(f"{config.data.vae_checkpoint}: {vae_cfg.latent_channels}-channel latents, but the "
                             f"decoder reads {dcfg.latent_channels}; to train a decoder for this VAE from this "
                             "one use configs/decoder_newspace.py (model.retarget_latents=True)")

    def init_params(key):
        return decoder_config.init_params(dcfg, key)

    def consistency_fn(params, y, sigma, cond, dropout_rng=None):
        # The decoder UNet has no dropout; dropout_rng is accepted for a uniform signature.
        t = grid.timestep_of(sigma)
        x_vp = sqrt_abar[t][:, None, None, None] * y.astype(jnp.float32)
        return denoise(params, x_vp, cond, t, dcfg, dtype, remat=bool(config.remat))

    def edm_sigma_sampler(key, b):
        s = config.edm.p_mean + config.edm.p_std * jax.random.normal(key, (b,), jnp.float32)
        j = jnp.argmin(jnp.abs(jnp.asarray(log_sig_allowed)[None, :] - s[:, None]), axis=1)
        return jnp.asarray(grid.sigmas)[jnp.asarray(allowed)[j]]

    def latents_of(batch, frozen):
        if "latent" in batch:
            return batch["latent"].astype(jnp.float32)
        if latents_kind == "patch":
            return patch_encode(frozen["encoder"], batch["image"])
        if latents_kind == "vae":
            return encode_latents(frozen["encoder"], batch["image"], config=vae_cfg, dtype=dtype)
        raise ValueError(f"batch has no 'latent' and data.latents={latents_kind!r}")

    def prepare(batch, frozen):
        latents = latents_of(batch, frozen)
        cond = upsample_nearest(normalize_latents(latents, dcfg), dcfg.upsample_factor)
        return batch["image"].astype(jnp.float32), cond

    def sample(params, key, latents, num_steps: int):
        """Decode raw latents (B, h, w, 4) -> (B, 8h, 8w, 3) in [-1, 1] (OpenAI semantics)."""
        timesteps = decoder_timesteps(config, grid, num_steps)
        b, h, w, _ = latents.shape
        shape = (len(timesteps), b, h * dcfg.upsample_factor, w * dcfg.upsample_factor, 3)
        noise = jax.random.normal(key, shape, jnp.float32)
        return decode_latents(params, latents, noise, config=dcfg, timesteps=timesteps, dtype=dtype)

    return Family(name="decoder", image_shape=(size, size, 3), init_params=init_params,
                  consistency_fn=consistency_fn, denoiser_fn=consistency_fn, grid_fn=grid.sigma_at,
                  max_scales=grid.num_allowed, edm_sigma_sampler=edm_sigma_sampler, prepare=prepare,
                  sample=sample, config=dcfg, grid=grid, latents_of=latents_of,
                  init_checkpoint_params=lambda: decoder_init_params(config, dcfg),
                  export_checkpoint=lambda params, path: save_decoder(
                      Decoder(dcfg, params), path, source="cmjax training run", overwrite=True))


def decoder_timesteps(config, grid: DecoderGrid, num_steps: int) -> tuple[int, ...]:
    """1 step: (t_max,); 2 steps: (t_max, sampling.decoder_mid_t); n steps: evenly spaced."""
    if num_steps == 1:
        return (grid.t_max,)
    if num_steps == 2:
        return (grid.t_max, int(config.sampling.decoder_mid_t))
    ts = np.linspace(grid.t_max, 0, num_steps + 1)[:-1]
    return tuple(int(round(t / grid.spacing)) * grid.spacing for t in ts)
