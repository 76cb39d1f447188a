"""The Stable Diffusion VAEs (diffusers ``AutoencoderKL``, LDM ``first_stage_model``), NHWC:
SD 1.x/2.x and SDXL (4 latent channels, quant convs) and SD3/FLUX (16 latent channels, no quant convs).

    images (B, H, W, 3) in [-1, 1]
      -> Encoder: conv_in -> [per level: layers_per_block resnets, then a stride-2 conv with
         asymmetric (0, 1) padding except on the last level] -> mid (resnet, self-attention, resnet)
         -> GroupNorm -> SiLU -> conv_out (2 * latent channels) -> quant_conv (1x1, if use_quant_conv)
      -> moments (B, H/8, W/8, 2C): mean = first C channels, logvar = last C clamped to [-30, 20]
    latents (B, h, w, C) raw (the diffusion model sees ``(z - shift_factor) * scaling_factor``)
      -> GANDecoder: post_quant_conv (1x1, if use_post_quant_conv) -> conv_in -> mid -> [per level, deepest first:
         layers_per_block + 1 resnets, then nearest x2 + conv except on the last level]
         -> GroupNorm -> SiLU -> conv_out
      -> images (B, 8h, 8w, 3), roughly in [-1, 1] (not clamped)

The latent spaces differ only in C, the quant convs and the two constants (diffusers configs of
``stabilityai/sdxl-vae``, ``stabilityai/stable-diffusion-3-medium-diffusers`` ``vae/`` and
``black-forest-labs/FLUX.1-dev`` ``vae/``; ``diffusers/pipelines/stable_diffusion_3/
pipeline_stable_diffusion_3.py`` and ``pipelines/flux/pipeline_flux.py`` apply them):

    SD 1.x/2.x  C=4   quant convs   scaling 0.18215  shift 0
    SDXL        C=4   quant convs   scaling 0.13025  shift 0
    SD3         C=16  none          scaling 1.5305   shift 0.0609
    FLUX.1      C=16  none          scaling 0.3611   shift 0.1159

All GroupNorms use eps 1e-6 (diffusers hard-codes it for the VAE); the resnets take no timestep.

Params form one flat dict whose top-level names are diffusers module paths, so that
``cmjax.weights.mapping.torch_to_flax`` maps an ``AutoencoderKL`` state dict onto it directly:
``encoder.down_blocks.0.resnets.1.conv1.weight`` -> params["encoder.down_blocks.0.resnets.1"]
["conv1"]["kernel"]; the parameters diffusers keeps directly on the encoder (``encoder.conv_in``,
``encoder.conv_norm_out``, ``encoder.conv_out``) live under params["encoder"]; the attention's
output projection ``...attentions.0.to_out.0`` under params["...attentions.0.to_out"]["0"].
A VAE may hold only the encoder half (the SD encoder bundled with a ``ConsistencyDecoderVAE``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmjax.models.layers import GroupNorm, ResnetBlock, conv, dense, spatial_attention

Dtype = Any

NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
ENCODER, DECODER = "encoder", "decoder"
PARTS = (ENCODER, DECODER)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an ``AutoencoderKL``. The defaults are SD 1.x's (34.2M + 49.5M params)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 4
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "scaling_factor", float(self.scaling_factor))
        object.__setattr__(self, "shift_factor", float(self.shift_factor))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"channel width {c} is not a multiple of norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError("layers_per_block and latent_channels must be positive")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each axis (one halving per level but the last): 8 for SD."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown VAEConfig fields {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Layers only the VAE uses


class Downsample(nn.Module):
    """diffusers ``Downsample2D(padding=0)``: zero-pad one row/column at the bottom/right, then a
    3x3 stride-2 conv. (B, H, W, C) -> (B, H/2, W/2, C) for even H and W.

    Params: ``conv`` (kernel HWIO, bias).
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(self.features, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), name="conv",
                       dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
    """diffusers ``Upsample2D(use_conv=True)``: nearest x2, then a 3x3 conv. (B, H, W, C) -> (B, 2H, 2W, C).

    Params: ``conv`` (kernel HWIO, bias).
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(self.features, 3, "conv", self.dtype, self.param_dtype, upsample=True)(x)


class AttentionOutput(nn.Module):
    """The output projection of an attention block: one Linear named ``0`` (diffusers'
    ``to_out = ModuleList([Linear, Dropout])``). (..., C) -> (..., features)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(self.features, "0", self.dtype, self.param_dtype)(x)


class SelfAttention(nn.Module):
    """Single-head spatial self-attention with a residual connection (the VAE mid-block's diffusers
    ``Attention`` with ``group_norm``, ``residual_connection=True``, ``rescale_output_factor=1``).

    out = x + to_out(softmax(q k^T / sqrt(C)) v), with q, k, v = to_q/to_k/to_v(group_norm(x))
    over the H*W positions. Logits and softmax are float32 (diffusers' ``upcast_softmax``).
    x: (B, H, W, C) -> (B, H, W, C).

    Params: ``group_norm``, ``to_q``, ``to_k``, ``to_v`` (Linear, kernel (C, C)). ``to_out`` is an
    ``AttentionOutput`` created by the caller, so that its params sit at ``<this name>.to_out``
    beside this module, where diffusers' name ``<path>.to_out.0.weight`` maps them.
    """

    to_out: nn.Module
    num_groups: int = 32
    epsilon: float = NORM_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        normed = GroupNorm(self.num_groups, self.epsilon, name="group_norm", **kw)(x).reshape(b, h * w, c)
        q, k, v = (dense(c, name, **kw)(normed) for name in ("to_q", "to_k", "to_v"))
        attended = spatial_attention(q, k, v)
        return x.astype(self.dtype) + self.to_out(attended).reshape(b, h, w, c)


class _Ends(nn.Module):
    """The params diffusers keeps directly on ``encoder``/``decoder``: ``conv_in`` (used first),
    ``conv_norm_out`` and ``conv_out`` (used last). One module so they share the name ``encoder``."""

    in_features: int
    out_features: int
    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.conv_in = conv(self.in_features, 3, "conv_in", **kw)
        self.conv_norm_out = GroupNorm(self.num_groups, NORM_EPS, name="conv_norm_out", **kw)
        self.conv_out = conv(self.out_features, 3, "conv_out", **kw)

    def first(self, x: jax.Array) -> jax.Array:
        return self.conv_in(x)

    def last(self, h: jax.Array) -> jax.Array:
        return self.conv_out(nn.silu(self.conv_norm_out(h)))


def _mid_block(h: jax.Array, prefix: str, channels: int, groups: int, kw: dict) -> jax.Array:
    """resnet -> self-attention -> resnet at the deepest level (diffusers ``UNetMidBlock2D``)."""
    block = dict(num_groups=groups, epsilon=NORM_EPS, **kw)
    h = ResnetBlock(channels, name=f"{prefix}.mid_block.resnets.0", **block)(h)
    to_out = AttentionOutput(channels, name=f"{prefix}.mid_block.attentions.0.to_out", **kw)
    h = SelfAttention(to_out, groups, NORM_EPS, name=f"{prefix}.mid_block.attentions.0", **kw)(h)
    return ResnetBlock(channels, name=f"{prefix}.mid_block.resnets.1", **block)(h)


# --------------------------------------------------------------------------------------------
# The two halves


class Encoder(nn.Module):
    """images (B, H, W, in_channels) in [-1, 1] -> moments (B, H/f, W/f, 2 * latent_channels),
    f = ``config.downsample_factor``; quant_conv included. Channels: mean first, then logvar
    (unclamped). H and W must be multiples of f."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(num_groups=cfg.norm_num_groups, epsilon=NORM_EPS, **kw)
        channels = cfg.block_out_channels
        ends = _Ends(channels[0], 2 * cfg.latent_channels, cfg.norm_num_groups, name=ENCODER, **kw)
        h = ends.first(images.astype(self.dtype))
        for i, ch in enumerate(channels):
            for j in range(cfg.layers_per_block):
                h = ResnetBlock(ch, name=f"encoder.down_blocks.{i}.resnets.{j}", **block)(h)
            if i < len(channels) - 1:
                h = Downsample(ch, name=f"encoder.down_blocks.{i}.downsamplers.0", **kw)(h)
        h = _mid_block(h, ENCODER, channels[-1], cfg.norm_num_groups, kw)
        h = ends.last(h)
        return conv(2 * cfg.latent_channels, 1, "quant_conv", **kw)(h) if cfg.use_quant_conv else h


class GANDecoder(nn.Module):
    """The SD VAE's own (GAN-trained) decoder: raw latents (B, h, w, latent_channels) ->
    images (B, f*h, f*w, out_channels), roughly in [-1, 1] and not clamped; post_quant_conv included."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(num_groups=cfg.norm_num_groups, epsilon=NORM_EPS, **kw)
        channels = cfg.block_out_channels
        z = latents.astype(self.dtype)
        if cfg.use_post_quant_conv:
            z = conv(cfg.latent_channels, 1, "post_quant_conv", **kw)(z)
        ends = _Ends(channels[-1], cfg.out_channels, cfg.norm_num_groups, name=DECODER, **kw)
        h = ends.first(z)
        h = _mid_block(h, DECODER, channels[-1], cfg.norm_num_groups, kw)
        for i, ch in enumerate(reversed(channels)):
            for j in range(cfg.layers_per_block + 1):
                h = ResnetBlock(ch, name=f"decoder.up_blocks.{i}.resnets.{j}", **block)(h)
            if i < len(channels) - 1:
                h = Upsample(ch, name=f"decoder.up_blocks.{i}.upsamplers.0", **kw)(h)
        return ends.last(h)


# --------------------------------------------------------------------------------------------
# Params


def part_of(name: str) -> str:
    """Which half a top-level param name belongs to: ``encoder`` (encoder*, quant_conv) or ``decoder``."""
    if name == "quant_conv" or name == ENCODER or name.startswith(ENCODER + "."):
        return ENCODER
    if name == "post_quant_conv" or name == DECODER or name.startswith(DECODER + "."):
        return DECODER
    raise ValueError(f"{name!r} is not a VAE param name")


def split_params(params: Any) -> tuple[dict, dict]:
    """(encoder params, decoder params) of a flat VAE params dict; either may be empty."""
    halves: dict[str, dict] = {ENCODER: {}, DECODER: {}}
    for name, value in params.items():
        halves[part_of(name)][name] = value
    return halves[ENCODER], halves[DECODER]


def _module(part: str, config: VAEConfig, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Module:
    return (Encoder if part == ENCODER else GANDecoder)(config, dtype=dtype, param_dtype=param_dtype)


def init_params(config: VAEConfig, key: jax.Array, parts: Sequence[str] = PARTS, param_dtype=jnp.float32) -> dict:
    """Random params (Flax's default init) for the given halves, as one flat dict."""
    params = {}
    f = config.downsample_factor
    for i, part in enumerate(parts):
        if part not in PARTS:
            raise ValueError(f"unknown VAE part {part!r} (expected one of {PARTS})")
        shape = (1, f, f, config.in_channels) if part == ENCODER else (1, 1, 1, config.latent_channels)
        net = _module(part, config, param_dtype=param_dtype)
        params.update(net.init(jax.random.fold_in(key, i), jnp.zeros(shape))["params"])
    return params


def abstract_params(config: VAEConfig, parts: Sequence[str] = PARTS, param_dtype=jnp.float32) -> dict:
    """The params' shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), nothing allocated."""
    return jax.eval_shape(functools.partial(init_params, config, parts=tuple(parts), param_dtype=param_dtype),
                          jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class VAE:
    """An SD VAE: config and a flat params dict (see the module docstring). Either half may be absent
    (``parts``), e.g. the encoder-only VAE bundled with a consistency decoder."""

    config: VAEConfig
    params: Any

    @property
    def parts(self) -> tuple[str, ...]:
        enc, dec = split_params(self.params)
        return tuple(p for p, half in ((ENCODER, enc), (DECODER, dec)) if half)


# --------------------------------------------------------------------------------------------
# Pure functions (jit these) and the checked entry points


def encoder_moments(params: Any, images: jax.Array, *, config: VAEConfig,
                    dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """images (B, H, W, C) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels) float32,
    logvar clamped to [-30, 20] (diffusers' ``DiagonalGaussianDistribution``). ``params``: the
    encoder half (extra decoder entries are ignored)."""
    enc, _ = split_params(params)
    moments = Encoder(config, dtype=dtype).apply({"params": enc}, images).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def encode_latents(params: Any, images: jax.Array, noise: jax.Array | None = None, *, config: VAEConfig,
                   dtype=jnp.float32) -> jax.Array:
    """Raw latents: the posterior mean, or ``mean + exp(logvar / 2) * noise`` when ``noise`` (standard
    normal, shaped like the mean) is given. Returns (B, H/f, W/f, latent_channels) float32."""
    mean, logvar = encoder_moments(params, images, config=config, dtype=dtype)
    return mean if noise is None else mean + jnp.exp(0.5 * logvar) * noise.astype(jnp.float32)


def decode_latents_gan(params: Any, latents: jax.Array, *, config: VAEConfig, dtype=jnp.float32) -> jax.Array:
    """Raw latents (B, h, w, latent_channels) -> images (B, f*h, f*w, out_channels) float32,
    roughly in [-1, 1], unclamped. ``params``: the decoder half (extra encoder entries are ignored)."""
    _, dec = split_params(params)
    return GANDecoder(config, dtype=dtype).apply({"params": dec}, latents).astype(jnp.float32)


def scale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
    """Raw latents -> what the diffusion model sees: ``(z - shift_factor) * scaling_factor``
    (diffusers' SD3/FLUX pipelines; shift 0 for SD 1.x/SDXL). float32."""
    return (jnp.asarray(latents, jnp.float32) - config.shift_factor) * config.scaling_factor


_encode_jit = jax.jit(encode_latents, static_argnames=("config", "dtype"))
_decode_jit = jax.jit(decode_latents_gan, static_argnames=("config", "dtype"))


def encode(vae: VAE, images, *, key: jax.Array | None = None, noise=None, sample: bool | None = None,
           dtype=jnp.float32) -> jax.Array:
    """Encode images into raw (unscaled) latents, what ``AutoencoderKL.decode`` and the consistency
    decoder take; ``scale_latents`` gives what the diffusion model sees. ``cmjax.encode_images``.

    images: (B, H, W, in_channels) NHWC in [-1, 1], H and W multiples of ``config.downsample_factor``
    (8 for SD). Returns (B, H/8, W/8, latent_channels) float32: the posterior mean by default, a
    sample ``mean + std * eps`` when ``key`` (eps = normal(key)) or ``noise`` (eps itself, shaped
    like the latents) is given. ``sample=True`` without either samples with key 0; ``sample=False``
    with either is an error. ``dtype``: the network's compute dtype (e.g. ``jnp.bfloat16``).
    """
    cfg = vae.config
    if ENCODER not in vae.parts:
        raise ValueError("this VAE holds no encoder params")
    images = _check_nhwc(images, cfg.in_channels, "images", multiple=cfg.downsample_factor)
    if key is not None and noise is not None:
        raise ValueError("give either key or noise, not both")
    if sample is None:
        sample = key is not None or noise is not None
    elif not sample and (key is not None or noise is not None):
        raise ValueError("sample=False returns the mean: do not pass key or noise")
    f = cfg.downsample_factor
    shape = (images.shape[0], images.shape[1] // f, images.shape[2] // f, cfg.latent_channels)
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != shape:
            raise ValueError(f"noise must have the latents' shape {shape}, got {tuple(noise.shape)}")
    elif sample:
        noise = jax.random.normal(jax.random.key(0) if key is None else key, shape, jnp.float32)
    else:
        # mean + std * 0 is exactly the mean: one compiled program serves both cases
        noise = jnp.zeros(shape, jnp.float32)
    return _encode_jit(vae.params, images, noise, config=cfg, dtype=dtype)


def decode_gan(vae: VAE, latents, *, dtype=jnp.float32) -> jax.Array:
    """Decode raw (unscaled) latents with the VAE's own GAN decoder (for comparison with the
    consistency decoder). latents: (B, h, w, latent_channels) NHWC. Returns (B, 8h, 8w, out_channels)
    float32, roughly in [-1, 1], not clamped."""
    if DECODER not in vae.parts:
        raise ValueError("this VAE holds no GAN decoder: it is encoder-only (e.g. converted from a "
                         "ConsistencyDecoderVAE, which bundles only the SD encoder); decode its latents "
                         "with the consistency decoder, or convert a full AutoencoderKL / LDM checkpoint")
    latents = _check_nhwc(latents, vae.config.latent_channels, "latents")
    return _decode_jit(vae.params, latents, config=vae.config, dtype=dtype)


def _check_nhwc(x, channels: int, what: str, multiple: int = 1) -> jax.Array:
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{what} must be (B, H, W, {channels}) NHWC, got shape {tuple(x.shape)}")
    if x.shape[-1] != channels:
        hint = " (NCHW? transpose to NHWC)" if x.shape[1] == channels else ""
        raise ValueError(f"{what} must have {channels} channels in the last axis, got shape {tuple(x.shape)}{hint}")
    if min(x.shape) == 0:
        raise ValueError(f"{what} must not be empty, got shape {tuple(x.shape)}")
    if x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(f"{what} height and width must be multiples of {multiple}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{what} must be floating point, got {x.dtype}")
    if not bool(jnp.isfinite(x).all()):
        raise ValueError(f"{what} contain NaN or inf")
    return jnp.asarray(x, jnp.float32)
