"""cmjax.decoding.tiling: tile layout, blend weights, and tiled decodes against untiled ones (tiny random model)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax.decoding import tiling
from cmjax.decoding.decoder import decode_latents
from cmjax.evaluation import metrics
from tests.random_decoder import TINY, random_decoder


@pytest.fixture(scope="module")
def params():
    return random_decoder(0).params


@pytest.mark.parametrize("size,tile,overlap", [(16, 8, 4), (17, 8, 4), (32, 24, 12), (9, 8, 2), (100, 24, 8),
                                               (20, 6, 5), (13, 4, 0)])
def test_tiles_cover_with_overlap(size, tile, overlap):
    starts = tiling.tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == size - tile
    assert list(starts) == sorted(set(starts))
    gaps = np.diff(starts)
    assert (tile - gaps >= overlap).all()  # every neighbour pair overlaps by at least `overlap`
    assert gaps.max() - gaps.min() <= 1  # evenly spread
    assert len(starts) == 1 or len(tiling.tile_starts(size, tile, overlap)) <= -(-(size - overlap) // (tile - overlap))


def test_tile_starts_edge_cases():
    assert tiling.tile_starts(5, 8, 2) == (0,)  # one tile, shrunk to the image
    assert tiling.tile_starts(8, 8, 2) == (0,)
    with pytest.raises(ValueError, match="overlap"):
        tiling.tile_starts(16, 8, 8)
    with pytest.raises(ValueError, match=">= 1"):
        tiling.tile_starts(16, 0, 0)


@pytest.mark.parametrize("size,tile,overlap", [(16, 8, 4), (17, 8, 4), (32, 24, 12), (20, 6, 5), (13, 4, 0), (5, 8, 2)])
def test_ramps_sum_to_one(size, tile, overlap):
    scale = 8
    starts = tiling.tile_starts(size, tile, overlap)
    w = tiling.ramp_weights(starts, tile, size, scale)
    length = min(tile, size) * scale
    assert w.shape == (len(starts), length) and (w > 0).all() and (w <= 1 + 1e-6).all()
    total = np.zeros(size * scale)
    for s, r in zip(starts, w):
        total[s * scale:s * scale + length] += r
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert w[0, 0] == 1 and w[-1, -1] == 1  # image borders are not blended
    n = (starts[0] + tile - starts[1]) * scale if len(starts) > 1 else 0
    if n and 2 * n <= length:  # only pairs overlap: a linear ramp up from the cut edge
        np.testing.assert_allclose(w[1, :n], (np.arange(n) + 0.5) / n, atol=1e-6)
    # 2-D weights are products of the 1-D ones, so they sum to 1 as well
    grid = np.zeros((size * scale, size * scale))
    for sy, ry in zip(starts, w):
        for sx, rx in zip(starts, w):
            grid[sy * scale:sy * scale + length, sx * scale:sx * scale + length] += ry[:, None] * rx[None, :]
    np.testing.assert_allclose(grid, 1.0, atol=1e-6)


def test_one_tile_is_the_untiled_decode(params):
    """A tile covering the whole latent: the very same program as decode_latents."""
    latents, noise = jnp.zeros((1, 2, 3, 4)), jnp.zeros((2, 1, 16, 24, 3))
    tiled = jax.make_jaxpr(functools.partial(tiling.decode_latents_tiled, config=TINY, tile=4, overlap=1))
    untiled = jax.make_jaxpr(functools.partial(decode_latents, config=TINY))
    assert str(tiled(params, latents, noise)) == str(untiled(params, latents, noise))


@pytest.mark.slow  # two 256x256 compiles; the quick tier decodes tiled in test_batch_decode_uses_tiles
def test_tiled_decode_matches_untiled(params):
    """32x32 latents (256x256 px) in 2x2 tiles of 24 latents overlapping by 16, 2 steps.

    Each tile sees its slice of the same full-image noise and the ramps hide the seams: 45.6 dB
    measured (the full-size model, 24x24 latents in 2x2 tiles of 16: 51 dB). XLA's temporaries
    shrink by >= 1.5x here (2.4x measured: one 192x192 tile at a time instead of 256x256). Noise shifted by one
    pixel, as independent per-tile noise would be, gives a far worse match."""
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.normal(size=(1, 32, 32, 4)).astype(np.float32))
    noise = jnp.asarray(rng.normal(size=(2, 1, 256, 256, 3)).astype(np.float32))
    compiled = {}
    for name, fn in [("tiled", functools.partial(tiling.decode_latents_tiled, tile=24, overlap=12)),
                     ("untiled", decode_latents)]:
        compiled[name] = jax.jit(functools.partial(fn, config=TINY)).lower(params, latents, noise).compile()
    tiled = np.asarray(compiled["tiled"](params, latents, noise))
    untiled = np.asarray(compiled["untiled"](params, latents, noise))
    assert tiled.shape == untiled.shape == (1, 256, 256, 3)
    psnr = metrics.mean_psnr(tiled, untiled, clip=False)
    assert 40.0 <= psnr < 80, psnr  # close, and really tiled (the cut context changes pixels a little)
    temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
    assert temp["tiled"] * 1.5 <= temp["untiled"], temp
    shifted = np.asarray(compiled["tiled"](params, latents, jnp.roll(noise, 1, axis=3)))
    assert metrics.mean_psnr(shifted, untiled, clip=False) < psnr - 15


def test_batch_decode_uses_tiles(params):
    """decode.py's --tile: the sharded batch step decodes tiled, with the item's own noise field."""
    from cmjax import parallel
    from cmjax.batch_decode import program
    from cmjax.batch_decode.options import DecodeOptions

    mesh = parallel.make_mesh(jax.devices()[:1])
    step = program.make_decode_fn(TINY, mesh, DecodeOptions(timesteps=(1008,), tile=4, tile_overlap=2))
    latents = np.random.default_rng(2).normal(size=(1, 6, 5, 4)).astype(np.float32)
    got = np.asarray(step(params, latents, program.identity_key_data("t.npy")[None]))
    noise = jnp.asarray(program.noise_for(0, "t.npy", 1, (48, 40)))
    want = np.asarray(jax.jit(functools.partial(tiling.decode_latents_tiled, config=TINY, tile=4, overlap=2,
                                                timesteps=(1008,)))(params, latents, noise))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
