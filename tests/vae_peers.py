"""Tiny SD VAE peers for the VAE tests: a random-weight diffusers AutoencoderKL, its state dict in
diffusers' and LDM's names, and the comparisons test_vae.py and test_vae_spaces.py share.
"""
from __future__ import annotations

import re

import jax
import numpy as np
import torch

from cmjax.models import vae as vae_lib
from tests.torch_peers import perturb_

ATOL = 1e-5  # fp32: cmjax and PyTorch agree to float32 rounding (relative to the output's scale)
TINY = dict(block_out_channels=(8, 16, 16, 32), layers_per_block=2, norm_num_groups=4, latent_channels=4)
TINY_CONFIG = vae_lib.VAEConfig(**TINY)


def tiny_autoencoder(seed: int = 0, **overrides):
    """A tiny diffusers AutoencoderKL (4 levels: 8x downsampling) with every parameter perturbed."""
    from diffusers import AutoencoderKL

    cfg = {**TINY, **overrides}
    levels = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, **cfg)
    return perturb_(vae, seed).eval()


def state_of(vae) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in vae.state_dict().items()}


def images(seed: int = 0, shape=(2, 24, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def assert_close(got, ref, atol=ATOL):
    """|got - ref| <= atol * max(1, |ref|max): fp32 rounding grows with the output's magnitude."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    np.testing.assert_allclose(got, ref, atol=atol * max(1.0, float(np.abs(ref).max())), rtol=0)
    return float(np.abs(got - ref).max())


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------------------------
# Diffusers' names -> LDM names, written here independently of the converter's LDM -> diffusers map.


def to_ldm(state: dict[str, np.ndarray], levels: int, attention: str = "old") -> dict[str, np.ndarray]:
    """Rename a diffusers AutoencoderKL state dict to the original LDM names.

    attention="old": ``mid.attn_1.{norm,q,k,v,proj_out}`` with 1x1-conv weights (C, C, 1, 1), as in
    CompVis checkpoints; "new": ``mid.attn_1.{group_norm,to_q,to_k,to_v,to_out.0}`` linear (C, C).
    """
    old_attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        k = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.block.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.upsample.", k)
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            if attention == "old":
                head, _, param = k.rpartition(".")
                prefix, _, leaf = head.partition("mid.attn_1.")
                k = f"{prefix}mid.attn_1.{old_attn[leaf]}.{param}"
                if param == "weight" and value.ndim == 2:
                    value = value[:, :, None, None]
        out[k] = value
    return out


def write_safetensors(path, state):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return path
