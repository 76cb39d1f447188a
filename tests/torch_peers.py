"""Builders of tiny random-weight PyTorch (diffusers) models: the parity peers of cmjax's tests.

Every parameter is perturbed (GroupNorm scales and biases included, the embedding table too), so
that a swapped or transposed mapping cannot hide behind default initial values.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

TINY_DECODER = dict(
    decoder_block_out_channels=(16, 32, 32, 48),
    decoder_layers_per_block=2,
    decoder_norm_num_groups=8,
    decoder_num_train_timesteps=1024,
    # The encoder's level count sets diffusers' latent upsampling (2 ** (levels - 1) = 8).
    encoder_block_out_channels=(8, 8, 8, 8),
    encoder_layers_per_block=1,
    encoder_norm_num_groups=4,
)


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Add N(0, scale) noise to every parameter (in place); returns the module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return module


def tiny_consistency_vae(seed: int = 0, **overrides):
    """A tiny diffusers ConsistencyDecoderVAE with every parameter perturbed, in eval mode."""
    from diffusers import ConsistencyDecoderVAE

    torch.manual_seed(seed)
    vae = ConsistencyDecoderVAE(**{**TINY_DECODER, **overrides})
    return perturb_(vae, seed).eval()


def save_vae(vae, folder: Path, fp16: bool = False) -> Path:
    """save_pretrained into ``folder`` (safetensors); returns the folder."""
    vae.save_pretrained(str(folder), safe_serialization=True, variant="fp16" if fp16 else None)
    return folder


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def reference_decode(vae, latents_nhwc: np.ndarray, noise_nhwc: list[np.ndarray], timesteps=(1008, 512),
                     clip_denoised: bool = True, dtype=torch.float32) -> np.ndarray:
    """The decode loop written with diffusers' UNet and scheduler, noise given explicitly.

    clip_denoised=False is exactly ``ConsistencyDecoderVAE.decode``; True adds OpenAI's clamp after
    every step. ``dtype=torch.float64`` evaluates a float64 copy (the "truth" fp32 results are
    judged against). Returns NHWC float32 (float64 for float64).
    """
    if dtype != torch.float32:
        vae = copy.deepcopy(vae).to(dtype)
    sched = vae.decoder_scheduler
    z = nchw(latents_nhwc).to(dtype)
    nchw_ = lambda x: nchw(x).to(dtype)  # noqa: E731
    with torch.no_grad():
        z = (z * vae.config.scaling_factor - vae.means) / vae.stds
        z = torch.nn.functional.interpolate(z, mode="nearest", scale_factor=8)
        x0 = torch.zeros(z.shape[0], 3, z.shape[2], z.shape[3], dtype=dtype)
        for t, eps in zip(timesteps, noise_nhwc):
            x_t = sched.sqrt_alphas_cumprod[t] * x0 + sched.sqrt_one_minus_alphas_cumprod[t] * nchw_(eps)
            out = vae.decoder_unet(torch.cat([sched.c_in[t] * x_t, z], dim=1), torch.tensor(t)).sample[:, :3]
            x0 = sched.c_out[t] * out + sched.c_skip[t] * x_t
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
    return nhwc(x0)
