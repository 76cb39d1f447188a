"""diffusers ``ConsistencyDecoderVAE`` folders and safetensors files -> cmjax decoder.

A folder holds ``config.json`` and ``diffusion_pytorch_model[.fp16].safetensors`` whose keys are
``decoder_unet.*`` (the UNet), ``encoder.*`` and ``quant_conv.*`` (the bundled SD encoder, used by
the VAE converter). A bare ``UNet2DModel`` file (keys without prefix) is accepted too. Reading uses
safetensors' NumPy interface: no torch.
"""
from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cmjax.files import read_small
from cmjax.models.decoder_config import DECODER_FIELDS, UNET_FIELDS, Decoder, DecoderConfig, Field, abstract_params
from cmjax.models.decoder_unet import UNetConfig
from cmjax.weights.errors import parse_json
from cmjax.weights.mapping import ConversionError, torch_to_flax

UNET_PREFIX = "decoder_unet."
VAE_PREFIXES = ("encoder.", "quant_conv.")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def find_weights(folder: Path) -> Path:
    """The safetensors file of a diffusers model folder (fp32 preferred over fp16)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ConversionError(f"{folder}: no {' or '.join(WEIGHT_FILES)} in this folder")


# safetensors dtype codes -> NumPy (bf16 and fp8 from ml_dtypes, which ships with jax).
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
              "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}
_MAX_HEADER = 100 << 20  # as the safetensors library


def _np_dtype(code: str) -> np.dtype | None:
    name = _ST_DTYPES.get(code)
    if name is None:
        return None
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], int]:
    """The tensors a safetensors file declares: ``{name: (dtype, shape, begin, end)}`` (byte offsets
    into the data section) and where that section starts. Checks what the safetensors library
    checks: a sane header size, valid JSON without duplicate names, known dtypes, sizes that match
    the shapes, and data sections that tile the rest of the file exactly.
    """
    path = Path(path)
    bad = f"{path}: not a readable safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(_MAX_HEADER, size - 8):
                raise ConversionError(f"{bad} (header size {n} does not fit a {size}-byte file)")
            raw = f.read(n)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except OSError as e:
        raise ConversionError(f"{bad} ({e})") from e

    header = parse_json(raw, f"{bad} (header)", ConversionError)  # refuses a tensor name given twice
    if not isinstance(header, dict):
        raise ConversionError(f"{bad} (header is not a JSON object)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise ConversionError(f"{bad} (malformed entry for {name!r}: {e})") from None
        dtype = _np_dtype(code) if isinstance(code, str) else None
        if dtype is None:
            raise ConversionError(f"{bad} (tensor {name!r} has unsupported dtype {str(code)[:40]!r})")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in (begin, end)):
            raise ConversionError(f"{bad} (malformed shape or offsets for {name!r})")
        if end - begin != math.prod(shape) * dtype.itemsize:  # Python ints: no overflow
            raise ConversionError(f"{bad} (tensor {name!r}: {end - begin} bytes for shape {list(shape)} {code})")
        out[name] = (dtype, shape, begin, end)
    position = 0
    for name, (_, _, begin, end) in sorted(out.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != position:
            raise ConversionError(f"{bad} (data of {name!r} starts at {begin}, expected {position})")
        position = end
    if 8 + n + position != size:
        raise ConversionError(f"{bad} (the tensors cover {position} bytes, the file holds {size - 8 - n}: "
                              "truncated or padded)")
    return out, 8 + n


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays (bf16 as ml_dtypes.bfloat16).

    Reads each tensor straight into its own array (no memory map: a mapped file would sit in the
    process's memory beside the copies, doubling the peak for multi-GB checkpoints), several at a
    time (``_READERS`` threads: the 2.5 GB decoder took 3.8 s read one tensor after another from a
    file not in the page cache, 2.0 s this way).
    """
    path = Path(path)
    header, start = read_safetensors_header(path)

    def read(fd: int, name: str, dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int) -> np.ndarray:
        buf = np.empty(end - begin, np.uint8)
        view, done = memoryview(buf), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], start + begin + done)
            if n == 0:
                raise ConversionError(f"{path}: not a readable safetensors file (truncated in {name!r})")
            done += n
        return buf.view(dtype).reshape(shape)

    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(_READERS, thread_name_prefix="cmjax-safetensors") as pool:
                arrays = [pool.submit(read, fd, name, *entry) for name, entry in header.items()]
                return {name: a.result() for name, a in zip(header, arrays)}
        finally:
            os.close(fd)
    except OSError as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e


_READERS = 4


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


def read_config_json(path: Path) -> Any:
    """The content of a config.json; ConversionError naming the file if it is not JSON."""
    try:
        text = read_small(path)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return parse_json(text, str(path), ConversionError)


def config_from_diffusers(cfg: Mapping[str, Any], where: str = "config.json") -> DecoderConfig:
    """DecoderConfig from a ``ConsistencyDecoderVAE`` config.json (or a ``UNet2DModel`` one).

    Every value is checked against ``cmjax.models.decoder_config``'s field bounds before anything is built;
    ConversionError names ``where`` (the file), the diffusers field and the problem.
    """
    if not isinstance(cfg, dict):
        raise ConversionError(f"{where}: must hold a JSON object, got {type(cfg).__name__}")
    if "decoder_block_out_channels" in cfg:  # ConsistencyDecoderVAE
        p = "decoder_"
        unsupported = {"decoder_add_attention": False, "decoder_resnet_time_scale_shift": "scale_shift",
                       "decoder_time_embedding_type": "learned"}
        encoder_key = "encoder_block_out_channels" if "encoder_block_out_channels" in cfg else "block_out_channels"
        encoder_levels = cfg.get(encoder_key, (0,) * 4)
        problem = Field("ints", 0, 1 << 20, length=(1, 7)).problem(encoder_levels)
        if problem:
            raise ConversionError(f"{where}: field {encoder_key} {problem}")
        upsample = 2 ** (len(encoder_levels) - 1)
    else:  # UNet2DModel
        p = ""
        unsupported = {"add_attention": False, "resnet_time_scale_shift": "scale_shift",
                       "time_embedding_type": "learned"}
        upsample = 8
    for key, wanted in unsupported.items():
        if key in cfg and cfg[key] != wanted:
            raise ConversionError(f"{where}: {key}={str(cfg[key])[:60]!r} is not supported (the consistency "
                                  f"decoder uses {wanted!r})")
    # cmjax field -> (diffusers field, default)
    unet_fields = {"in_channels": (f"{p}in_channels", 7), "out_channels": (f"{p}out_channels", 6),
                   "block_out_channels": (f"{p}block_out_channels", (320, 640, 1024, 1024)),
                   "layers_per_block": (f"{p}layers_per_block", 3), "norm_num_groups": (f"{p}norm_num_groups", 32),
                   "norm_eps": (f"{p}norm_eps", 1e-5), "num_train_timesteps": (f"{p}num_train_timesteps", 1024)}
    if not p:
        unet_fields["time_embed_dim"] = ("time_embedding_dim", None)
    unet = {}
    for name, (key, default) in unet_fields.items():
        unet[name] = cfg.get(key, default)
        problem = UNET_FIELDS[name].problem(unet[name])
        if problem:
            raise ConversionError(f"{where}: field {key} {problem}")
    decoder = {"latent_channels": cfg.get("latent_channels", unet["in_channels"] - 3),
               "scaling_factor": cfg.get("scaling_factor", 0.18215)}
    for name, value in decoder.items():
        problem = DECODER_FIELDS[name].problem(value)
        if problem:
            raise ConversionError(f"{where}: field {name} {problem}")
    try:
        return DecoderConfig(unet=UNetConfig(**unet), upsample_factor=upsample, **decoder)
    except ValueError as e:  # fields that do not fit together (channels vs groups, in_channels ...)
        raise ConversionError(f"{where}: {e}") from None


def infer_config(state: Mapping[str, np.ndarray]) -> DecoderConfig:
    """DecoderConfig from tensor shapes alone (GroupNorm groups cannot be seen: 32 is assumed)."""
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    needed = ["conv_in.weight", "conv_out.weight", "time_proj.weight", "time_embedding.linear_1.weight",
              *(f"down_blocks.{i}.resnets.0.conv1.weight" for i in levels)]
    missing = [k for k in needed if k not in state]
    if not levels or missing:
        raise ConversionError("cannot infer the architecture from the tensor shapes: "
                              f"{', '.join(missing) if missing else 'no down_blocks.*'} missing")
    channels = tuple(int(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels)
    layers = len({k.split(".")[3] for k in state if k.startswith("down_blocks.0.resnets.")})
    if any(c % 32 for c in channels):
        raise ConversionError(f"cannot infer the GroupNorm group count for channels {channels} (not multiples "
                              "of 32, the released model's groups); put the model's config.json beside the file")
    temb = int(state["time_embedding.linear_1.weight"].shape[0])
    unet = UNetConfig(in_channels=int(state["conv_in.weight"].shape[1]),
                      out_channels=int(state["conv_out.weight"].shape[0]),
                      block_out_channels=channels, layers_per_block=layers,
                      num_train_timesteps=int(state["time_proj.weight"].shape[0]),
                      time_embed_dim=None if temb == 4 * channels[0] else temb)
    return DecoderConfig(unet=unet, latent_channels=unet.in_channels - 3)


def decoder_from_diffusers_state(tensors: Mapping[str, np.ndarray], *, source: str,
                                 config_path: Path | None = None, dtype: Any = np.float32) -> Decoder:
    """A Decoder from diffusers-named tensors (``decoder_unet.*`` or bare ``UNet2DModel`` names).

    The architecture comes from ``config_path`` (a config.json) when given, else from the shapes.
    """
    state = unet_state(tensors, source)
    if config_path is not None:
        config = config_from_diffusers(read_config_json(config_path), where=str(config_path))
    else:
        try:
            config = infer_config(state)
        except ValueError as e:  # ConversionError, or inferred values out of bounds (ConfigError)
            raise ConversionError(f"{source}: {e}") from None
    params = torch_to_flax(state, abstract_params(config), dtype=dtype, source=source)
    return Decoder(config, params)
