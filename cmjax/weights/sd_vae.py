"""SD VAE weights (diffusers ``AutoencoderKL``, LDM ``first_stage_model``, the encoder bundled with a
``ConsistencyDecoderVAE``) -> ``cmjax.models.vae.VAE``: SD 1.x/2.x, SDXL, SD3 and FLUX.1 VAEs (the last two
have 16 latent channels and no quant_conv/post_quant_conv; FLUX's ``ae.safetensors`` uses the LDM
names without a prefix, SD3's single file the ``first_stage_model.`` prefix).

Every source is first renamed to diffusers ``AutoencoderKL`` names (torch layouts kept), then mapped
onto the model's own abstract params by ``mapping.torch_to_flax``, which checks the exact key set
and every shape. Accepted sources:

* a diffusers ``AutoencoderKL`` folder (config.json + diffusion_pytorch_model[.fp16].safetensors,
  or the older diffusion_pytorch_model[.fp16].bin) or its weights file; older diffusers files name
  the attention ``query/key/value/proj_attn``;
* a diffusers ``ConsistencyDecoderVAE`` folder or file: only its ``encoder.*`` and ``quant_conv.*``
  are read, giving an encoder-only VAE (no GAN decoder);
* original LDM / CompVis checkpoints, ``.ckpt``/``.pt``/``.pth``/``.bin`` (read without torch and
  without running pickled code) or ``.safetensors``: a whole SD model (the VAE is under
  ``first_stage_model.`` or ``vae.``; everything else is ignored) or a VAE-only file. LDM names:
  ``encoder.down.{i}.block.{j}.*``, ``encoder.down.{i}.downsample.conv``, ``*.mid.block_1/2``,
  ``*.mid.attn_1.{norm,q,k,v,proj_out}`` (1x1 convs; diffusers-style ``to_q``... and
  ``query``... names are accepted too), ``nin_shortcut``, ``norm_out``, ``decoder.up.{i}.*``
  (numbered from the full-resolution level: diffusers' ``up_blocks.{L-1-i}``), ``quant_conv``,
  ``post_quant_conv``. Training-only ``loss.*`` tensors (discriminator, LPIPS) are dropped.

Attention projections stored as 1x1 convs, (O, I, 1, 1) or (O, I, 1), become linears (O, I)
before the usual (out, in) -> (in, out) transpose.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cmjax.models.vae import DECODER, ENCODER, VAE, VAEConfig, abstract_params
from cmjax.weights.diffusers import WEIGHT_FILES, find_weights, read_config_json, read_safetensors
from cmjax.weights.mapping import ConversionError, torch_to_flax
from cmjax.weights.torch_pickle import CheckpointError, load_torch_file

DIFFUSERS, LDM, CONSISTENCY = "diffusers", "ldm", "consistency-decoder"
LDM_PREFIXES = ("first_stage_model.", "vae.")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
BIN_WEIGHT_FILES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_TRAINING_ONLY = ("loss.",)

_LDM_KEY = re.compile(r"(encoder|decoder)\.(down|up)\.\d+\.(block|downsample|upsample)\.|"
                      r"(encoder|decoder)\.(mid\.(block_\d|attn_\d)|norm_out)\.")
_DIFFUSERS_KEY = re.compile(r"(encoder\.(down_blocks|mid_block|conv_norm_out)|"
                            r"decoder\.(up_blocks|mid_block|conv_norm_out))\.")
_ATTN_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0", "norm": "group_norm",
               "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0",
               "to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out.0", "group_norm": "group_norm"}
_ATTN_LINEAR = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def detect_vae_format(tensors: Mapping[str, Any]) -> str:
    """Which naming a VAE state dict uses, from its keys alone.

    Returns ``"consistency-decoder"`` (a ``ConsistencyDecoderVAE``: ``decoder_unet.*`` beside the SD
    ``encoder.*``), ``"ldm"`` (original names, with or without a ``first_stage_model.``/``vae.``
    prefix, as in a whole SD checkpoint) or ``"diffusers"`` (``AutoencoderKL`` names).
    Raises ConversionError if the keys look like no SD VAE.
    """
    keys = list(tensors)
    if any(k.startswith("decoder_unet.") for k in keys):
        if not any(k.startswith("encoder.") for k in keys):
            raise ConversionError("a consistency decoder without the bundled SD encoder: no VAE in it")
        return CONSISTENCY
    for prefix in LDM_PREFIXES:
        inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        if any(_LDM_KEY.match(k) for k in inner):
            return LDM
        if any(_DIFFUSERS_KEY.match(k) for k in inner):
            return DIFFUSERS
    if any(_LDM_KEY.match(k) for k in keys):
        return LDM
    if any(_DIFFUSERS_KEY.match(k) for k in keys):
        return DIFFUSERS
    raise ConversionError(f"not an SD VAE state dict (no encoder/decoder keys in diffusers or LDM naming; "
                          f"saw e.g. {sorted(keys)[:5]})")


def _strip_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The VAE's tensors of a whole SD checkpoint (prefix removed); a VAE-only dict unchanged."""
    for prefix in LDM_PREFIXES:
        inner = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if any(_LDM_KEY.match(k) or _DIFFUSERS_KEY.match(k) for k in inner):
            return inner
    return dict(tensors)


def _ldm_levels(keys) -> int:
    levels = {int(m.group(2)) for k in keys if (m := re.match(r"(encoder\.down|decoder\.up)\.(\d+)\.", k))}
    return max(levels) + 1 if levels else 0


def ldm_to_diffusers_name(key: str, num_levels: int) -> str:
    """The diffusers ``AutoencoderKL`` name of an LDM VAE parameter (prefix already stripped).

    ``num_levels`` (4 for SD) fixes the reversal of the decoder's up path:
    ``decoder.up.{i}`` -> ``decoder.up_blocks.{num_levels-1-i}``. Names that are not LDM VAE names
    come back unchanged (the key-set check then reports them as unexpected).
    """
    m = re.fullmatch(r"(encoder|decoder)\.(.+)\.(weight|bias)", key)
    if m is None:
        return key
    half, body, param = m.groups()
    out = None
    if body in ("conv_in", "conv_out"):
        out = body
    elif body == "norm_out":
        out = "conv_norm_out"
    elif r := re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)", body):
        direction, level, j, part = r.groups()
        i = int(level) if direction == "down" else num_levels - 1 - int(level)
        part = "conv_shortcut" if part == "nin_shortcut" else part
        out = f"{direction}_blocks.{i}.resnets.{j}.{part}"
    elif r := re.fullmatch(r"down\.(\d+)\.downsample\.conv", body):
        out = f"down_blocks.{r.group(1)}.downsamplers.0.conv"
    elif r := re.fullmatch(r"up\.(\d+)\.upsample\.conv", body):
        out = f"up_blocks.{num_levels - 1 - int(r.group(1))}.upsamplers.0.conv"
    elif r := re.fullmatch(r"mid\.block_([12])\.(norm1|conv1|norm2|conv2|nin_shortcut)", body):
        part = "conv_shortcut" if r.group(2) == "nin_shortcut" else r.group(2)
        out = f"mid_block.resnets.{int(r.group(1)) - 1}.{part}"
    elif (r := re.fullmatch(r"mid\.attn_1\.(.+)", body)) and r.group(1) in _ATTN_NAMES:
        out = f"mid_block.attentions.0.{_ATTN_NAMES[r.group(1)]}"
    return key if out is None else f"{half}.{out}.{param}"


def _diffusers_attention_name(key: str) -> str:
    """Older diffusers files: ``...attentions.0.{query,key,value,proj_attn}`` -> ``to_q`` ... ``to_out.0``."""
    m = re.fullmatch(r"(.+\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", key)
    return f"{m.group(1)}.{_ATTN_NAMES[m.group(2)]}.{m.group(3)}" if m else key


def vae_state(tensors: Mapping[str, np.ndarray], source: str) -> tuple[dict[str, np.ndarray], str]:
    """(the VAE's tensors under diffusers ``AutoencoderKL`` names, the detected format).

    Only names and the 1x1-conv attention layout change; values keep their torch layout and dtype.
    """
    try:
        fmt = detect_vae_format(tensors)
    except ConversionError as e:
        raise ConversionError(f"{source}: {e}") from None
    if fmt == CONSISTENCY:
        state = {k: v for k, v in tensors.items() if k.startswith(("encoder.", "quant_conv."))}
        stray = [k for k in tensors if k not in state and not k.startswith("decoder_unet.")]
        if stray:
            raise ConversionError(f"{source}: unexpected keys outside decoder_unet/encoder/quant_conv: "
                                  f"{sorted(stray)[:10]}")
        renamed = {k: (k, v) for k, v in state.items()}
    else:
        state = {k: v for k, v in _strip_prefix(tensors).items() if not k.startswith(_TRAINING_ONLY)}
        if fmt == LDM:
            levels = _ldm_levels(state)
            renamed = {k: (ldm_to_diffusers_name(k, levels), v) for k, v in state.items()}
        else:
            renamed = {k: (_diffusers_attention_name(k), v) for k, v in state.items()}
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for key, (new, value) in renamed.items():
        if new in out:
            raise ConversionError(f"{source}: {origin[new]!r} and {key!r} are the same parameter ({new})")
        value = np.asarray(value)
        if _ATTN_LINEAR.search(new) and value.ndim > 2 and all(s == 1 for s in value.shape[2:]):
            value = value.reshape(value.shape[:2])  # 1x1 conv (O, I, 1, 1) -> linear (O, I)
        out[new], origin[new] = value, key
    return out, fmt


def config_from_diffusers(cfg: Mapping[str, Any]) -> VAEConfig:
    """VAEConfig from an ``AutoencoderKL`` or ``ConsistencyDecoderVAE`` config.json dict.

    Raises ConversionError on settings this port does not implement (other block types or
    activations, no mid-block attention). SD3/FLUX configs set ``use_quant_conv`` and
    ``use_post_quant_conv`` false and give a ``shift_factor``."""
    if "encoder_block_out_channels" in cfg:  # ConsistencyDecoderVAE: the SD encoder's settings
        p = "encoder_"
        wanted = {"encoder_act_fn": "silu", "encoder_double_z": True}
        latent = cfg.get("encoder_out_channels", cfg.get("latent_channels", 4))
        out_channels = 3
    else:
        p = ""
        wanted = {"act_fn": "silu", "mid_block_add_attention": True}
        latent = cfg.get("latent_channels", 4)
        out_channels = cfg.get("out_channels", 3)
    for key, value in wanted.items():
        if key in cfg and cfg[key] != value:
            raise ConversionError(f"config {key}={cfg[key]!r} is not supported (the SD VAE uses {value!r})")
    for key, block in ((f"{p}down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if key in cfg and any(t != block for t in cfg[key]):
            raise ConversionError(f"config {key}={cfg[key]!r} is not supported (only {block})")
    defaults = VAEConfig()
    try:
        return VAEConfig(
            in_channels=cfg.get(f"{p}in_channels", defaults.in_channels),
            out_channels=out_channels,
            block_out_channels=tuple(cfg.get(f"{p}block_out_channels", defaults.block_out_channels)),
            layers_per_block=cfg.get(f"{p}layers_per_block", defaults.layers_per_block),
            norm_num_groups=cfg.get(f"{p}norm_num_groups", defaults.norm_num_groups),
            latent_channels=latent,
            scaling_factor=cfg.get("scaling_factor", defaults.scaling_factor),
            shift_factor=cfg.get("shift_factor") or 0.0,  # SDXL's config has "shift_factor": null
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        )
    except (TypeError, ValueError) as e:
        raise ConversionError(f"invalid VAE config: {e}") from e


def infer_config(state: Mapping[str, np.ndarray], source: str) -> VAEConfig:
    """VAEConfig from the shapes of a diffusers-named state. The quant convs are present or not
    (SD3/FLUX have none); the latent channel count comes from them, else from the encoder's
    conv_out / the decoder's conv_in. GroupNorm groups cannot be seen in shapes: 32 (SD's) is
    assumed; nor can the scaling and shift: SD 1.x's 0.18215 and 0 (``load_pytorch_vae`` takes
    others)."""
    def shape(key):
        return tuple(state[key].shape) if key in state else None

    def levels(pattern):
        return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})

    enc_levels = levels(r"encoder\.down_blocks\.(\d+)\.resnets\.")
    dec_levels = levels(r"decoder\.up_blocks\.(\d+)\.resnets\.")
    try:
        if enc_levels:
            channels = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in enc_levels)
            layers = len({k.split(".")[4] for k in state if k.startswith("encoder.down_blocks.0.resnets.")})
        else:
            channels = tuple(shape(f"decoder.up_blocks.{i}.resnets.0.conv1.weight")[0] for i in reversed(dec_levels))
            layers = len({k.split(".")[4] for k in state if k.startswith("decoder.up_blocks.0.resnets.")}) - 1
        in_channels = shape("encoder.conv_in.weight")[1] if enc_levels else 3
        out_channels = shape("decoder.conv_out.weight")[0] if dec_levels else 3
        if "quant_conv.weight" in state:
            latent = shape("quant_conv.weight")[0] // 2
        elif "post_quant_conv.weight" in state:
            latent = shape("post_quant_conv.weight")[0]
        else:  # SD3 / FLUX: no quant convs
            latent = shape("encoder.conv_out.weight")[0] // 2 if enc_levels else shape("decoder.conv_in.weight")[1]
        quant = {"use_quant_conv": "quant_conv.weight" in state or not enc_levels,
                 "use_post_quant_conv": "post_quant_conv.weight" in state or not dec_levels}
    except (TypeError, IndexError) as e:
        raise ConversionError(f"{source}: cannot infer the VAE architecture from the tensor shapes "
                              f"(conv_in/resnets/quant_conv missing or malformed: {e})") from None
    if any(c % 32 for c in channels):
        raise ConversionError(f"{source}: cannot infer the GroupNorm group count for channels {channels} (not "
                              "multiples of 32, SD's groups); put the model's config.json beside the file or "
                              "pass config=")
    return VAEConfig(in_channels=in_channels, out_channels=out_channels, block_out_channels=channels,
                     layers_per_block=layers, latent_channels=latent, **quant)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        try:
            return load_torch_file(path)
        except CheckpointError as e:
            raise ConversionError(str(e)) from e
    raise ConversionError(f"{path}: unknown file type (expected .safetensors or one of {', '.join(TORCH_SUFFIXES)})")


def load_pytorch_vae(src: str | Path, *, dtype: Any = np.float32, config: VAEConfig | None = None,
                     scaling_factor: float | None = None, shift_factor: float | None = None) -> VAE:
    """Read SD VAE weights of any supported format (see the module docstring) into a VAE with NumPy params.

    ``src``: a diffusers folder, or a weights file (.safetensors, .ckpt/.pt/.pth/.bin).
    ``config``: the architecture, if it should not come from a config.json (diffusers sources: in the
    folder or beside the file) or be inferred from the shapes (GroupNorm groups 32 assumed).
    ``dtype``: the params' dtype (fp16/bf16 sources are upcast to float32 by default); None keeps it.
    ``scaling_factor``/``shift_factor``: override the latent constants; a single-file checkpoint
    holds none (SDXL's ``sdxl_vae.safetensors``: 0.13025; SD3's: 1.5305, 0.0609; FLUX's
    ``ae.safetensors``: 0.3611, 0.1159), so without them it gets SD 1.x's 0.18215 and 0.
    A ``ConsistencyDecoderVAE`` source gives an encoder-only VAE. Raises ConversionError naming the
    file on any problem (unknown format, missing/unexpected keys, wrong shapes, NaN/inf values).
    """
    src = Path(src)
    if src.is_dir():
        bins = [src / n for n in BIN_WEIGHT_FILES if (src / n).is_file()]
        weights = bins[0] if bins and not any((src / n).is_file() for n in WEIGHT_FILES) else find_weights(src)
    elif src.is_file():
        weights = src
    else:
        raise ConversionError(f"{src}: no such file or folder")
    state, fmt = vae_state(_read_tensors(weights), str(weights))
    config_path = weights.parent / "config.json"
    if config is None and fmt != LDM and config_path.is_file():
        meta = read_config_json(config_path)  # ConversionError naming the file if it is not JSON
        try:
            config = config_from_diffusers(meta)
        except ConversionError as e:
            raise ConversionError(f"{config_path}: {e}") from e
    if config is None:
        config = infer_config(state, str(weights))
    overrides = {k: v for k, v in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)) if v is not None}
    config = dataclasses.replace(config, **overrides)
    parts = (ENCODER,) if fmt == CONSISTENCY else (ENCODER, DECODER)
    note = " (names shown in diffusers AutoencoderKL form)" if fmt == LDM else ""
    params = torch_to_flax(state, abstract_params(config, parts), dtype=dtype, source=f"{weights}{note}")
    return VAE(config, params)
