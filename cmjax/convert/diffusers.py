"""diffusers ``ConsistencyDecoderVAE`` folders and safetensors files -> cmjax decoder.

A folder holds ``config.json`` and ``diffusion_pytorch_model[.fp16].safetensors`` whose keys are
``decoder_unet.*`` (the UNet), ``encoder.*`` and ``quant_conv.*`` (the bundled SD encoder, used by
the VAE converter). A bare ``UNet2DModel`` file (keys without prefix) is accepted too. Reading uses
safetensors' NumPy interface: no torch.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cmjax.convert.mapping import ConversionError, torch_to_flax
from cmjax.decoder import Decoder, DecoderConfig, abstract_params
from cmjax.unet import UNetConfig

UNET_PREFIX = "decoder_unet."
VAE_PREFIXES = ("encoder.", "quant_conv.")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def find_weights(folder: Path) -> Path:
    """The safetensors file of a diffusers model folder (fp32 preferred over fp16)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ConversionError(f"{folder}: no {' or '.join(WEIGHT_FILES)} in this folder")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays (bf16 as ml_dtypes.bfloat16)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e


def unet_state(tensors: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The UNet's tensors with the ``decoder_unet.`` prefix stripped; other known parts dropped."""
    if any(k.startswith(UNET_PREFIX) for k in tensors):
        stray = [k for k in tensors if not k.startswith((UNET_PREFIX, *VAE_PREFIXES))]
        if stray:
            raise ConversionError(f"{source}: unexpected keys outside decoder_unet/encoder/quant_conv: "
                                  f"{sorted(stray)[:10]}")
        return {k[len(UNET_PREFIX):]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    if "conv_in.weight" in tensors:
        return dict(tensors)
    raise ConversionError(f"{source}: not a consistency decoder (no decoder_unet.* or conv_in.weight keys; "
                          f"saw e.g. {sorted(tensors)[:5]})")


def config_from_diffusers(cfg: Mapping[str, Any]) -> DecoderConfig:
    """DecoderConfig from a ``ConsistencyDecoderVAE`` config.json (or a ``UNet2DModel`` one)."""
    if "decoder_block_out_channels" in cfg:  # ConsistencyDecoderVAE
        p = "decoder_"
        unsupported = {"decoder_add_attention": False, "decoder_resnet_time_scale_shift": "scale_shift",
                       "decoder_time_embedding_type": "learned"}
        encoder_levels = len(cfg.get("encoder_block_out_channels", cfg.get("block_out_channels", (0,) * 4)))
        upsample = 2 ** (encoder_levels - 1)
    else:  # UNet2DModel
        p = ""
        unsupported = {"add_attention": False, "resnet_time_scale_shift": "scale_shift",
                       "time_embedding_type": "learned"}
        upsample = 8
    for key, wanted in unsupported.items():
        if key in cfg and cfg[key] != wanted:
            raise ConversionError(f"config {key}={cfg[key]!r} is not supported (the consistency decoder uses {wanted!r})")
    unet = UNetConfig(
        in_channels=cfg.get(f"{p}in_channels", 7),
        out_channels=cfg.get(f"{p}out_channels", 6),
        block_out_channels=tuple(cfg.get(f"{p}block_out_channels", (320, 640, 1024, 1024))),
        layers_per_block=cfg.get(f"{p}layers_per_block", 3),
        norm_num_groups=cfg.get(f"{p}norm_num_groups", 32),
        norm_eps=cfg.get(f"{p}norm_eps", 1e-5),
        num_train_timesteps=cfg.get(f"{p}num_train_timesteps", 1024),
    )
    return DecoderConfig(unet=unet, latent_channels=cfg.get("latent_channels", unet.in_channels - 3),
                         upsample_factor=upsample, scaling_factor=cfg.get("scaling_factor", 0.18215))


def infer_config(state: Mapping[str, np.ndarray]) -> DecoderConfig:
    """DecoderConfig from tensor shapes alone (GroupNorm groups cannot be seen: 32 is assumed)."""
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    if not levels or "conv_in.weight" not in state or "conv_out.weight" not in state:
        raise ConversionError("cannot infer the architecture: conv_in/conv_out/down_blocks missing")
    channels = tuple(int(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels)
    layers = len({k.split(".")[3] for k in state if k.startswith("down_blocks.0.resnets.")})
    if any(c % 32 for c in channels):
        raise ConversionError(f"cannot infer the GroupNorm group count for channels {channels} (not multiples "
                              "of 32, the released model's groups); put the model's config.json beside the file")
    unet = UNetConfig(in_channels=int(state["conv_in.weight"].shape[1]),
                      out_channels=int(state["conv_out.weight"].shape[0]),
                      block_out_channels=channels, layers_per_block=layers,
                      num_train_timesteps=int(state["time_proj.weight"].shape[0]))
    return DecoderConfig(unet=unet, latent_channels=unet.in_channels - 3)


def load_diffusers_decoder(src: str | Path, *, dtype: Any = np.float32) -> Decoder:
    """Read a diffusers folder or safetensors file into a Decoder with NumPy params.

    ``dtype``: the params' dtype (fp16 sources are upcast to float32 by default); None keeps it.
    """
    src = Path(src)
    if src.is_dir():
        weights = find_weights(src)
        config_path = src / "config.json"
    elif src.is_file():
        weights = src
        config_path = src.parent / "config.json"
    else:
        raise ConversionError(f"{src}: no such file or folder")
    state = unet_state(read_safetensors(weights), str(weights))
    if config_path.is_file():
        try:
            config = config_from_diffusers(json.loads(config_path.read_text()))
        except json.JSONDecodeError as e:
            raise ConversionError(f"{config_path}: invalid JSON ({e})") from e
    else:
        config = infer_config(state)
    params = torch_to_flax(state, abstract_params(config), dtype=dtype, source=str(weights))
    return Decoder(config, params)
