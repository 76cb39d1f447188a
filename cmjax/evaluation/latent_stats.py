"""Per-channel statistics of a VAE's scaled latents (``python -m cmjax.eval latent-stats``).

    uint8 images -> from_uint8 -> VAE posterior mean (cmjax.models.vae.encode) -> (z - shift) * scaling
    -> float64 sums over every image and latent position -> per-channel mean and std

A consistency decoder for a new latent space normalises its input with these (see
``cmjax.training.families.newspace_decoder_config``).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from cmjax.images import from_uint8
from cmjax.models import vae as vae_lib


def latent_statistics(vae, batches, dtype=jnp.float32) -> dict[str, Any]:
    """Per-channel mean and std (population, ddof 0) of the **scaled** latents
    ``(z - shift_factor) * scaling_factor`` of the posterior means of ``batches`` (uint8 (b, H, W, C)
    arrays; 1-channel images are repeated to RGB), over every image and latent position.

    These are the ``latent_mean``/``latent_std`` a consistency decoder for this VAE normalises with
    (OpenAI's for SD 1.x: ``cmjax.models.decoder_config.LATENT_MEAN``/``LATENT_STD``). Sums are float64.
    Returns {"latent_mean", "latent_std" (lists), "num_images", "num_positions"}.
    """

    c = vae.config.latent_channels
    total, total_sq = np.zeros(c, np.float64), np.zeros(c, np.float64)
    images = positions = 0
    for u8 in batches:
        if u8.shape[-1] == 1 and vae.config.in_channels == 3:
            u8 = np.repeat(u8, 3, axis=-1)
        x = jnp.asarray(from_uint8(u8))
        z = np.asarray(vae_lib.scale_latents(vae_lib.encode(vae, x, dtype=dtype), vae.config), np.float64)
        z = z.reshape(-1, c)
        total += z.sum(0)
        total_sq += (z * z).sum(0)
        images, positions = images + len(u8), positions + len(z)
    if not positions:
        raise ValueError("no images to measure")
    mean = total / positions
    std = np.sqrt(np.maximum(total_sq / positions - mean * mean, 0.0))
    return {"latent_mean": mean.tolist(), "latent_std": std.tolist(), "num_images": images,
            "num_positions": positions}
