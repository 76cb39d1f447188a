"""A UNet for small unconditional images (CIFAR-10, 8x8 digits), for EDM-parameterised CMs, NHWC.

    F(x_scaled, c_noise): x_scaled (B, H, W, C) = c_in(t) * x_t, c_noise (B,) = 0.25 * ln(t)
      -> noise embedding: Fourier features of ln(t) with a *small* scale (iCT uses 0.02: the
         NCSN++ default of 16 makes the network jump between neighbouring noise levels, which a
         consistency model must map to the same output), or sinusoidal positional features of
         1000 * c_noise -> Dense -> SiLU -> Dense  => temb (B, 4 * base)
      -> conv_in -> [per level: num_res_blocks resnets (+ self-attention at attn_resolutions),
         then a downsampling resnet except on the last level] -> mid (resnet, attention, resnet)
         -> [per level, deepest first: num_res_blocks + 1 resnets on concat([h, skip]), then an
         upsampling resnet except on the first level] -> GroupNorm -> SiLU -> conv_out
      -> F (B, H, W, out_channels)

Built from ``cmjax.models.layers`` (the ResnetBlock shared with the decoder; dropout inside it, active
when ``train=True`` with a ``"dropout"`` RNG). H and W must be multiples of ``2^(levels-1)``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmjax.models.layers import GroupNorm, conv, dense, resnet_block, spatial_attention

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ImageUNetConfig:
    """Architecture; the defaults are a small CIFAR-10-sized model (about 50M parameters)."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # spatial sizes (H) that get self-attention
    dropout: float = 0.0
    num_groups: int = 32
    embedding: str = "fourier"  # "fourier" (of ln t) or "positional" (of 1000 * c_noise)
    fourier_scale: float = 0.02
    embedding_size: int = 128  # Fourier / positional features before the MLP
    time_inputs: int = 1  # 2 for MeanFlow's u(z, r, t): c_noise (B, 2), each column embedded

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.embedding not in ("fourier", "positional"):
            raise ValueError(f"embedding must be 'fourier' or 'positional', got {self.embedding!r}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.num_groups:
                raise ValueError(f"width {self.base_channels * m} is not a multiple of num_groups={self.num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class FourierFeatures(nn.Module):
    """x (B,) -> [sin(2 pi W x), cos(2 pi W x)] (B, size), W ~ N(0, scale^2) fixed at init.

    W is stored as a param (so it is checkpointed) but never trained (stop_gradient).
    """

    size: int
    scale: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("W", nn.initializers.normal(self.scale), (self.size // 2,), jnp.float32)
        proj = 2 * math.pi * x.astype(jnp.float32)[:, None] * jax.lax.stop_gradient(w)[None, :]
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


# The positional embedding's argument is POSITIONAL_SCALE * c_noise (DDPM/EDM: 1000 * 0.25 ln t).
POSITIONAL_SCALE = 1000.0


def positional_features(x: jax.Array, size: int, max_period: float = 10000.0) -> jax.Array:
    """Transformer sinusoidal features of a real-valued x (B,) -> (B, size), float32 (float64 for float64 x)."""
    half = size // 2
    dt = jnp.result_type(x.dtype, jnp.float32)
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=dt) / half)
    args = x.astype(dt)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class AttentionBlock(nn.Module):
    """Single-head self-attention over H*W positions with a pre-GroupNorm and a residual, NHWC."""

    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = GroupNorm(self.num_groups, name="norm", **kw)(x).reshape(b, h * w, c)
        q, k, v = jnp.split(dense(3 * c, "qkv", **kw)(y), 3, axis=-1)
        y = spatial_attention(q, k, v)
        y = nn.Dense(c, name="proj_out", kernel_init=nn.initializers.zeros, **kw)(y)
        return x + y.reshape(b, h, w, c)


class ImageUNet(nn.Module):
    """F(x_scaled (B,H,W,in_channels), c_noise (B,)) -> (B,H,W,out_channels) in ``dtype``.
    ``remat``: each residual block recomputes its activations in the backward pass (training memory)."""

    config: ImageUNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, c_noise: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(num_groups=cfg.num_groups, time_scale_shift=True, dropout=cfg.dropout, **kw)
        levels = len(cfg.channel_mult)
        if x.shape[1] % cfg.downsample_factor or x.shape[2] % cfg.downsample_factor:
            raise ValueError(f"image size {x.shape[1:3]} is not a multiple of {cfg.downsample_factor}")

        c_noise = jnp.asarray(c_noise, jnp.float32)
        if c_noise.ndim <= 1:  # one time input: a scalar or (B,)
            c_noise = jnp.broadcast_to(c_noise, (x.shape[0],))[:, None]
        if c_noise.shape != (x.shape[0], cfg.time_inputs):
            raise ValueError(f"c_noise has shape {c_noise.shape}, expected ({x.shape[0]}, {cfg.time_inputs})")
        cols = []  # one feature block per time input, concatenated before the MLP
        for i in range(cfg.time_inputs):
            if cfg.embedding == "fourier":
                name = "fourier" if i == 0 else f"fourier_{i}"
                cols.append(FourierFeatures(cfg.embedding_size, cfg.fourier_scale, name=name)(4.0 * c_noise[:, i]))
            else:
                cols.append(positional_features(POSITIONAL_SCALE * c_noise[:, i], cfg.embedding_size))
        feats = jnp.concatenate(cols, axis=-1)
        temb_dim = 4 * cfg.base_channels
        temb = dense(temb_dim, "temb_1", **kw)(feats.astype(self.dtype))
        temb = dense(temb_dim, "temb_2", **kw)(nn.silu(temb))

        block_cls = resnet_block(self.remat)

        def res(h, ch, name, resample=None):
            return block_cls(ch, resample=resample, name=name, **block)(h, temb, not train)

        def maybe_attn(h, name):
            if h.shape[1] in cfg.attn_resolutions:
                h = AttentionBlock(cfg.num_groups, name=name, **kw)(h)
            return h

        h = conv(cfg.base_channels, 3, "conv_in", **kw)(x.astype(self.dtype))
        skips = [h]
        for i, mult in enumerate(cfg.channel_mult):
            for j in range(cfg.num_res_blocks):
                h = maybe_attn(res(h, cfg.base_channels * mult, f"down_{i}_res_{j}"), f"down_{i}_attn_{j}")
                skips.append(h)
            if i < levels - 1:
                h = res(h, cfg.base_channels * mult, f"down_{i}_downsample", "down")
                skips.append(h)

        ch_mid = cfg.base_channels * cfg.channel_mult[-1]
        h = res(h, ch_mid, "mid_res_0")
        h = maybe_attn(h, "mid_attn")
        h = res(h, ch_mid, "mid_res_1")

        for i in reversed(range(levels)):
            ch = cfg.base_channels * cfg.channel_mult[i]
            for j in range(cfg.num_res_blocks + 1):
                h = res(jnp.concatenate([h, skips.pop()], axis=-1), ch, f"up_{i}_res_{j}")
                h = maybe_attn(h, f"up_{i}_attn_{j}")
            if i > 0:
                h = res(h, ch, f"up_{i}_upsample", "up")

        h = nn.silu(GroupNorm(cfg.num_groups, name="norm_out", **kw)(h))
        return conv(cfg.out_channels, 3, "conv_out", **kw)(h)
