"""Tiled decoding: large images in bounded memory, with overlapping latent tiles blended by ramps.

The UNet's activations grow with the pixel count (a 2048x2048 decode of the released model needs
tens of GB), so a large latent is cut into overlapping tiles of ``tile x tile`` latents that are
decoded one after another inside one jitted program (a ``lax.scan`` over tile offsets: only one
tile's activations are alive at a time). Tiling is a denoise function, ``tiled_denoise``, that
``decoder.decode_latents`` (the one sampler loop) calls in place of the whole-image ``denoise``;
each sampling step works on the full image:

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps          (full image, full-image noise field)
    x0  = sum_tiles w_tile * denoise(x_t[tile], z[tile], t)   (weights sum to 1 everywhere)
    x0  = clip(x0, -1, 1)

so every tile sees its own slice of the same noise, and neighbouring tiles agree on x_t where they
overlap; only the UNet's view of context is cut at tile borders. Blend weights are separable
linear ramps spanning exactly each overlap (ramp up in one tile + ramp down in its neighbour = 1),
and are 1 on the image border, so a tile covering the whole image reproduces the untiled decode.

Shapes: latents (B, h, w, C) raw SD latents NHWC; noise (steps, B, 8h, 8w, 3); images out
(B, 8h, 8w, 3) float32 in [-1, 1] (when clipped). Tile sizes and overlaps are in latent units.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmjax.decoding import schedule
from cmjax.decoding.decoder import decode_latents, denoise
from cmjax.models.conv_lowering import XLA, LoweringPlan
from cmjax.models.decoder_config import DecoderConfig


def default_overlap(tile: int) -> int:
    """A quarter of the tile (at least 1 latent when the tile is larger than 1)."""
    return max(tile // 4, 1) if tile > 1 else 0


def tile_starts(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Offsets of tiles of length ``min(tile, size)`` covering [0, size), neighbours overlapping by >= overlap.

    The fewest tiles whose stride is at most ``tile - overlap``, spread evenly from 0 to
    ``size - tile``: every tile has the same length (one compiled shape) and the overlaps are
    (within one latent) equal.
    """
    if size < 1 or tile < 1:
        raise ValueError(f"size and tile must be >= 1, got size={size}, tile={tile}")
    if tile >= size:
        return (0,)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    n = -(-(size - overlap) // (tile - overlap))
    return tuple(round(k * (size - tile) / (n - 1)) for k in range(n))


def ramp_weights(starts: Sequence[int], tile: int, size: int, scale: int = 1) -> np.ndarray:
    """Per-tile 1-D blend weights, (len(starts), tile * scale) float32, summing to 1 at every position.

    ``starts``/``tile``/``size`` in latent units, weights at ``scale`` (the pixel upsampling factor)
    per latent. Each tile ramps linearly, (k + 1/2) / n at k pixels from its cut edge, over the n
    pixels it shares with its neighbour on that side, and is flat elsewhere (image borders are not
    cuts); the ramps are then divided by their sum over tiles, so that they add up to exactly 1
    also where more than two tiles meet. Neighbouring ramps over the same overlap already add up to 1.
    """
    tile = min(tile, size)
    length = tile * scale
    ramps = np.ones((len(starts), length), np.float64)
    for i in range(len(starts) - 1):
        n = (starts[i] + tile - starts[i + 1]) * scale
        if n <= 0:
            raise ValueError(f"tiles at {starts[i]} and {starts[i + 1]} (length {tile}) leave a gap")
        up = (np.arange(n) + 0.5) / n
        ramps[i + 1, :n] = np.minimum(ramps[i + 1, :n], up)
        ramps[i, length - n:] = np.minimum(ramps[i, length - n:], up[::-1])
    total = np.zeros(size * scale)
    for start, ramp in zip(starts, ramps):
        total[start * scale:start * scale + length] += ramp
    if not np.all(total > 0):
        raise ValueError(f"tiles {tuple(starts)} of length {tile} do not cover [0, {size})")
    return np.stack([ramp / total[s * scale:s * scale + length] for s, ramp in zip(starts, ramps)]).astype(np.float32)


def tile_grid(h: int, w: int, tile: int, overlap: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row and column tile offsets (latent units) for an h x w latent."""
    return tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)


def tiled_denoise(params: Any, x_t: jax.Array, z_up: jax.Array, t, config: DecoderConfig, dtype=jnp.float32,
                  lowering: LoweringPlan = XLA, *, tile: int, overlap: int) -> jax.Array:
    """``decoder.denoise`` computed over overlapping tiles of ``tile x tile`` latents and blended.

    x_t (B, H, W, 3), z_up (B, H, W, C) normalised upsampled latents, H = 8h. Returns x0 (B, H, W, 3):
    the sum over tiles of ramp weight * denoise(tile). The tiles are a ``lax.scan``, so one tile's
    UNet activations are alive at a time. Pass it to ``decoder.decode_latents`` as ``denoise_fn``
    (with ``tile`` and ``overlap`` bound) to get a tiled decode from the one sampler loop.
    """
    b, hp, wp, _ = x_t.shape
    f = config.upsample_factor
    h, w = hp // f, wp // f
    rows, cols = tile_grid(h, w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    wy = jnp.asarray(ramp_weights(rows, tile, h, f))
    wx = jnp.asarray(ramp_weights(cols, tile, w, f))
    # One entry per tile: (row offset, col offset, row index, col index), offsets in latents.
    grid = jnp.asarray(np.array([(y, x, i, j) for i, y in enumerate(rows) for j, x in enumerate(cols)], np.int32))

    def body(acc, g):
        start = (0, g[0] * f, g[1] * f, 0)
        x_tile = jax.lax.dynamic_slice(x_t, start, (b, th * f, tw * f, x_t.shape[-1]))
        z_tile = jax.lax.dynamic_slice(z_up, start, (b, th * f, tw * f, z_up.shape[-1]))
        out = denoise(params, x_tile, z_tile, t, config, dtype, lowering)
        weight = (wy[g[2]][:, None] * wx[g[3]][None, :])[None, :, :, None]
        blended = jax.lax.dynamic_slice(acc, start, out.shape) + weight * out
        return jax.lax.dynamic_update_slice(acc, blended, start), None

    acc, _ = jax.lax.scan(body, jnp.zeros_like(x_t), grid)
    return acc


def decode_latents_tiled(params: Any, latents: jax.Array, noise, *, config: DecoderConfig,
                         tile: int, overlap: int, timesteps: Sequence[int] = schedule.DEFAULT_TIMESTEPS,
                         clip_denoised: bool = True, dtype=jnp.float32, lowering: LoweringPlan = XLA) -> jax.Array:
    """``decode_latents`` computed over overlapping latent tiles; pure and jittable (all args but arrays static).

    latents: (B, h, w, C) raw SD latents; noise: (len(timesteps), B, 8h, 8w, 3) — the full-image
    noise field, each tile reads its own slice — or a function step -> (B, 8h, 8w, 3), as
    ``decode_latents`` takes. Returns (B, 8h, 8w, 3) float32. When one tile covers the latent
    (``tile >= max(h, w)``) this is exactly ``decode_latents``.

    Each tile's GroupNorms see only the tile; whole-image statistics (estimated from a first pass
    over the tiles) were tried and made the result worse, so none are shared.
    """
    rows, cols = tile_grid(latents.shape[1], latents.shape[2], tile, overlap)
    tiled = None if len(rows) == len(cols) == 1 else functools.partial(tiled_denoise, tile=tile, overlap=overlap)
    return decode_latents(params, latents, noise, config=config, timesteps=timesteps, clip_denoised=clip_denoised,
                          dtype=dtype, denoise_fn=tiled, lowering=lowering)

