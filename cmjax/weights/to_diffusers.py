"""A cmjax decoder checkpoint -> a diffusers model folder (``python -m cmjax.export CKPT DST``).

What is written depends on whether SD encoder weights are available:

* ``--encoder-from SRC``: a ``ConsistencyDecoderVAE`` folder (config.json +
  diffusion_pytorch_model.safetensors with ``decoder_unet.*``, ``encoder.*``, ``quant_conv.*``),
  loadable with ``diffusers.ConsistencyDecoderVAE.from_pretrained(DST)``. SRC gives the encoder:
  a diffusers ``ConsistencyDecoderVAE`` folder (e.g. the one the decoder was converted from; its
  encoder tensors are copied as they are), a cmjax VAE checkpoint, or any SD VAE source that
  ``cmjax.weights.sd_vae`` reads (diffusers ``AutoencoderKL`` folder, LDM checkpoint).
* without it: the decoder UNet alone as a ``UNet2DModel`` folder, loadable with
  ``diffusers.UNet2DModel.from_pretrained(DST)``.

Why not always a ConsistencyDecoderVAE: a cmjax decoder checkpoint holds only the UNet (converting
a ConsistencyDecoderVAE keeps ``decoder_unet.*`` and drops the bundled SD encoder), and inventing
encoder weights would give a folder whose ``encode()`` silently returns garbage. So the full
folder is written only from real encoder weights, and the UNet otherwise.

Every folder written also holds ``cmjax-export.json`` (what it was exported from; diffusers
ignores it): ``--overwrite`` replaces only a folder that has it and nothing else of its own.

Decode settings that diffusers does not store (it hard-codes the latent statistics and
sigma_data; a UNet2DModel has no latent settings at all) must have their default values for a
ConsistencyDecoderVAE export, and are reported when a UNet2DModel export leaves them out.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from cmjax.models import vae as vae_lib
from cmjax.models.decoder_config import LATENT_MEAN, LATENT_STD, SCALING_FACTOR, DecoderConfig
from cmjax.noise_levels import SIGMA_DATA
from cmjax.weights import hub
from cmjax.weights.checkpoint import CONFIG_FILE, Written, atomic_directory, check_destination, read_vae
from cmjax.weights.diffusers import find_weights, read_config_json, read_safetensors
from cmjax.weights.mapping import flax_to_torch
from cmjax.weights.sd_vae import load_pytorch_vae

WEIGHTS = "diffusion_pytorch_model.safetensors"
# What marks a folder this module wrote (diffusers ignores the file): --overwrite replaces only such a folder.
MARKER, EXPORT_FORMAT = "cmjax-export.json", "cmjax-export"
EXPORT = Written("a diffusers folder exported by cmjax", MARKER, (EXPORT_FORMAT,),
                 frozenset({"config.json", WEIGHTS, MARKER}))
# Written into config.json; the first diffusers release with ConsistencyDecoderVAE.
DIFFUSERS_VERSION = "0.24.0"
DTYPES = {"float32": np.float32, "float16": np.float16}

Report = Callable[[str], None]


class ExportError(ValueError):
    """A checkpoint that cannot be written in the requested diffusers form; the message says why."""

# --------------------------------------------------------------------------------------------
# diffusers configs


def unet2d_config(config: DecoderConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config.json of the decoder UNet."""
    u = config.unet
    levels = len(u.block_out_channels)
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "add_attention": False,
        "block_out_channels": list(u.block_out_channels),
        "center_input_sample": False,
        "down_block_types": ["ResnetDownsampleBlock2D"] * levels,
        "downsample_padding": 1,
        "in_channels": u.in_channels,
        "layers_per_block": u.layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": u.norm_eps,
        "norm_num_groups": u.norm_num_groups,
        "num_train_timesteps": u.num_train_timesteps,
        "out_channels": u.out_channels,
        "resnet_time_scale_shift": "scale_shift",
        "time_embedding_dim": u.time_embed_dim,
        "time_embedding_type": "learned",
        "up_block_types": ["ResnetUpsampleBlock2D"] * levels,
    }


def consistency_vae_config(config: DecoderConfig, encoder: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ConsistencyDecoderVAE`` config.json: the decoder UNet's settings plus ``encoder``'s
    (``encoder_*`` keys, ``latent_channels``, ``sample_size``)."""
    u = config.unet
    levels = len(u.block_out_channels)
    return {
        "_class_name": "ConsistencyDecoderVAE",
        "_diffusers_version": DIFFUSERS_VERSION,
        **encoder,
        "scaling_factor": config.scaling_factor,
        "latent_channels": config.latent_channels,
        "decoder_add_attention": False,
        "decoder_block_out_channels": list(u.block_out_channels),
        "decoder_down_block_types": ["ResnetDownsampleBlock2D"] * levels,
        "decoder_downsample_padding": 1,
        "decoder_in_channels": u.in_channels,
        "decoder_layers_per_block": u.layers_per_block,
        "decoder_norm_eps": u.norm_eps,
        "decoder_norm_num_groups": u.norm_num_groups,
        "decoder_num_train_timesteps": u.num_train_timesteps,
        "decoder_out_channels": u.out_channels,
        "decoder_resnet_time_scale_shift": "scale_shift",
        "decoder_time_embedding_type": "learned",
        "decoder_up_block_types": ["ResnetUpsampleBlock2D"] * levels,
    }


def _unstored_settings(config: DecoderConfig) -> list[str]:
    """Decode settings with non-default values, which no diffusers config records."""
    out = []
    if tuple(config.latent_mean) != LATENT_MEAN:
        out.append(f"latent_mean {config.latent_mean}")
    if tuple(config.latent_std) != LATENT_STD:
        out.append(f"latent_std {config.latent_std}")
    if config.sigma_data != SIGMA_DATA:
        out.append(f"sigma_data {config.sigma_data}")
    return out


# --------------------------------------------------------------------------------------------
# Encoder weights


def _encoder_fields(block_out_channels, layers_per_block, norm_num_groups, in_channels, latent_channels,
                    sample_size: int = 32) -> dict[str, Any]:
    return {
        "encoder_act_fn": "silu",
        "encoder_block_out_channels": list(block_out_channels),
        "encoder_double_z": True,
        "encoder_down_block_types": ["DownEncoderBlock2D"] * len(block_out_channels),
        "encoder_in_channels": in_channels,
        "encoder_layers_per_block": layers_per_block,
        "encoder_norm_num_groups": norm_num_groups,
        "encoder_out_channels": latent_channels,
        "sample_size": sample_size,
    }


def _consistency_vae_encoder(src: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], int] | None:
    """Encoder tensors, config fields and latent channels of a diffusers ConsistencyDecoderVAE
    folder (or its weights file with config.json beside it); None if ``src`` is not one."""

    folder = src if src.is_dir() else src.parent
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    cfg = read_config_json(config_path)
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "ConsistencyDecoderVAE":
        return None
    weights = find_weights(folder) if src.is_dir() else src
    tensors = read_safetensors(weights)
    encoder = {k: v for k, v in tensors.items() if k.startswith(("encoder.", "quant_conv."))}
    if not encoder:
        raise ExportError(f"{weights}: a ConsistencyDecoderVAE file without encoder.* / quant_conv.* tensors")
    fields = {k: v for k, v in cfg.items() if k.startswith("encoder_")}
    fields["sample_size"] = cfg.get("sample_size", 32)
    return encoder, fields, int(cfg.get("latent_channels", 4))


def read_encoder(src: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any], int, float | None]:
    """SD encoder weights for a ConsistencyDecoderVAE, from ``src``.

    Returns (tensors named ``encoder.*``/``quant_conv.*`` in torch layout, the ``encoder_*`` config
    fields, latent channels, the source's scaling factor or None). ``src``: a diffusers
    ConsistencyDecoderVAE folder/file (copied as is), a cmjax VAE checkpoint, or any SD VAE source
    ``cmjax.weights.sd_vae.load_pytorch_vae`` reads.
    """
    src = Path(src)
    if not src.exists():
        raise ExportError(f"{src}: no such file or folder (--encoder-from)")
    direct = _consistency_vae_encoder(src)
    if direct is not None:
        return (*direct, None)
    is_cmjax = src.is_dir() and (src / CONFIG_FILE).is_file()
    vae = read_vae(src) if is_cmjax else load_pytorch_vae(src, dtype=None)
    encoder_params, _ = vae_lib.split_params(vae.params)
    if not encoder_params:
        raise ExportError(f"{src}: this VAE has no encoder (parts: {list(vae.parts)})")
    tensors = flax_to_torch(encoder_params)
    c = vae.config
    fields = _encoder_fields(c.block_out_channels, c.layers_per_block, c.norm_num_groups, c.in_channels,
                             c.latent_channels)
    return tensors, fields, c.latent_channels, c.scaling_factor


# --------------------------------------------------------------------------------------------
# Export


def _write(dst: Path, config: dict, tensors: Mapping[str, np.ndarray], overwrite: bool, protect: tuple,
           ckpt: str | os.PathLike) -> None:
    from safetensors.numpy import save_file

    with atomic_directory(dst, overwrite, kind=EXPORT, protect=protect) as tmp:
        try:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_file(dict(tensors), str(tmp / WEIGHTS), metadata={"format": "pt"})
            marker = {"format": EXPORT_FORMAT, "version": 1, "source": str(Path(ckpt).absolute())}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        except Exception as e:  # a full disk: OSError, or safetensors' own error type
            text = (getattr(e, "strerror", None) or str(e)).strip().splitlines()
            raise ExportError(f"{dst}: cannot write the export, nothing was written "
                              f"({text[0][:300] if text else type(e).__name__})") from e


def export_decoder(ckpt: str | os.PathLike, dst: str | os.PathLike, *, encoder_from: str | os.PathLike | None = None,
                   dtype: str = "float32", overwrite: bool = False, report: Report | None = None) -> Path:
    """Write the decoder checkpoint ``ckpt`` as a diffusers folder ``dst`` (see the module docstring).

    ``dtype``: "float32" or "float16", of every tensor written. Nothing is left at ``dst`` on failure.
    ``overwrite``: replace an existing ``dst`` that this function wrote (it holds ``cmjax-export.json``
    and nothing else of its own), never ``ckpt``/``encoder_from`` or a folder holding them.
    Returns ``dst``.
    """
    say = report or (lambda _m: None)
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dst = Path(dst)
    protect = (ckpt,) if encoder_from is None else (ckpt, encoder_from)  # --overwrite never replaces an input
    check_destination(dst, overwrite=overwrite, kind=EXPORT, protect=protect)
    if not (Path(ckpt) / CONFIG_FILE).is_file():
        raise ExportError(f"{ckpt}: not a cmjax decoder checkpoint (no {CONFIG_FILE}); convert PyTorch weights "
                          "with `python -m cmjax.convert SRC DST` first")
    decoder = hub.load_decoder(ckpt)
    cfg = decoder.config
    cast = DTYPES[dtype]
    unet = {k: v.astype(cast, copy=False) for k, v in flax_to_torch(decoder.params).items()}
    del decoder
    if encoder_from is None:
        unstored = _unstored_settings(cfg)
        if cfg.upsample_factor != 8 or cfg.scaling_factor != SCALING_FACTOR:
            unstored.append(f"upsample_factor {cfg.upsample_factor}, scaling_factor {cfg.scaling_factor}")
        if unstored:
            say("note: a UNet2DModel folder does not record these decode settings: " + "; ".join(unstored))
        _write(dst, unet2d_config(cfg), unet, overwrite, protect, ckpt)
        say(f"wrote {dst}: UNet2DModel (decoder UNet only; pass --encoder-from for a ConsistencyDecoderVAE)")
        return dst

    unstored = _unstored_settings(cfg)
    if unstored:
        raise ExportError(f"{ckpt}: diffusers' ConsistencyDecoderVAE hard-codes the decode settings, these differ: "
                          f"{'; '.join(unstored)}; export without --encoder-from (a UNet2DModel) instead")
    if cfg.unet.time_embed_dim not in (None, 4 * cfg.unet.block_out_channels[0]):
        raise ExportError(f"{ckpt}: time_embed_dim {cfg.unet.time_embed_dim} cannot be expressed in a "
                          "ConsistencyDecoderVAE config; export without --encoder-from (a UNet2DModel) instead")
    encoder, fields, latent, scaling = read_encoder(encoder_from)
    levels = len(fields["encoder_block_out_channels"])
    if 2 ** (levels - 1) != cfg.upsample_factor:
        raise ExportError(f"{encoder_from}: its encoder downsamples by {2 ** (levels - 1)} ({levels} levels), the "
                          f"decoder upsamples latents by {cfg.upsample_factor}")
    if latent != cfg.latent_channels:
        raise ExportError(f"{encoder_from}: its encoder makes {latent}-channel latents, the decoder takes "
                          f"{cfg.latent_channels}")
    if scaling is not None and scaling != cfg.scaling_factor:
        say(f"note: the encoder source's scaling_factor {scaling} differs from the decoder's "
            f"{cfg.scaling_factor}; the decoder's is written")
    tensors = {f"decoder_unet.{k}": v for k, v in unet.items()}
    tensors.update({k: np.ascontiguousarray(v).astype(cast, copy=False) for k, v in encoder.items()})
    _write(dst, consistency_vae_config(cfg, fields), tensors, overwrite, protect, ckpt)
    say(f"wrote {dst}: ConsistencyDecoderVAE (decoder from {ckpt}, encoder from {encoder_from})")
    return dst
