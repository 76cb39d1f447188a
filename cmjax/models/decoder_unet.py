"""The consistency decoder's UNet (OpenAI "ConvUNetVAE", diffusers ``UNet2DModel``), NHWC.

Topology (openai/consistencydecoder's ConvUNetVAE; diffusers ``UNet2DModel`` with
``down_block_types=("ResnetDownsampleBlock2D",)*4``), for ``block_out_channels = (c0, c1, c2, c3)``:
  conv_in -> [per level: layers_per_block resnets, then a down-resnet except on the last level]
  -> mid (2 resnets) -> [per level, deepest first: layers_per_block + 1 resnets on
  concat([h, skip]), then an up-resnet except on the last] -> GroupNorm -> SiLU -> conv_out.
No attention. The timestep is an integer index into a learned embedding table.

Each block's module name is its diffusers path, dots included, so a diffusers key
``down_blocks.0.resnets.1.conv1.weight`` is the param path
``("down_blocks.0.resnets.1", "conv1", "kernel")`` (see :mod:`cmjax.weights.mapping`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmjax.models.conv_lowering import XLA, LoweringPlan
from cmjax.models.layers import GroupNorm, conv, dense, resnet_block

Dtype = Any


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of the decoder UNet. The defaults are OpenAI's released model (621M params)."""

    in_channels: int = 7
    out_channels: int = 6
    block_out_channels: tuple[int, ...] = (320, 640, 1024, 1024)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    num_train_timesteps: int = 1024
    time_embed_dim: int | None = None  # default 4 * block_out_channels[0]

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"channel width {c} is not a multiple of norm_num_groups={self.norm_num_groups}")

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """Spatial sizes must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.block_out_channels) - 1)


class ConsistencyUNet(nn.Module):
    """F(x, t): x (B, H, W, in_channels), t int (B,) in [0, num_train_timesteps) -> (B, H, W, out_channels).

    H and W must be multiples of ``config.downsample_factor``. ``lowering``: how each conv is
    computed (``cmjax.models.conv_lowering.LoweringPlan``; default XLA's convolution). ``remat``:
    each residual block recomputes its activations in the backward pass (training memory).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lowering: LoweringPlan = XLA
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        cfg = self.config
        block_cls = resnet_block(self.remat)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, time_scale_shift=True,
                     lowering=self.lowering, **kw)
        levels = len(cfg.block_out_channels)

        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
        temb = nn.Embed(cfg.num_train_timesteps, cfg.block_out_channels[0], name="time_proj",
                        dtype=jnp.float32, param_dtype=self.param_dtype)(t)
        temb = TimestepEmbedding(cfg.temb_dim, name="time_embedding", **kw)(temb)

        h = conv(cfg.block_out_channels[0], 3, "conv_in", lowering=self.lowering, **kw)(x.astype(self.dtype))
        skips = [h]
        for i, ch in enumerate(cfg.block_out_channels):
            for j in range(cfg.layers_per_block):
                h = block_cls(ch, name=f"down_blocks.{i}.resnets.{j}", **block)(h, temb, True)
                skips.append(h)
            if i < levels - 1:
                h = block_cls(ch, resample="down", name=f"down_blocks.{i}.downsamplers.0", **block)(h, temb, True)
                skips.append(h)

        for k in range(2):
            h = block_cls(cfg.block_out_channels[-1], name=f"mid_block.resnets.{k}", **block)(h, temb, True)

        for i, ch in enumerate(reversed(cfg.block_out_channels)):
            for j in range(cfg.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = block_cls(ch, name=f"up_blocks.{i}.resnets.{j}", **block)(h, temb, True)
            if i < levels - 1:
                h = block_cls(ch, resample="up", name=f"up_blocks.{i}.upsamplers.0", **block)(h, temb, True)

        h = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h)
        h = conv(cfg.out_channels, 3, "conv_out", lowering=self.lowering, **kw)(nn.silu(h))
        return h


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers ``TimestepEmbedding``)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.features, "linear_1", **kw)(x.astype(self.dtype))
        return dense(self.features, "linear_2", **kw)(nn.silu(x))
