"""Weight conversion: PyTorch checkpoints -> cmjax checkpoints (``python -m cmjax.convert SRC DST``).

The flow, for every source format: recognise what SRC is (``detect_source``) -> read its tensors
as NumPy, never through torch and never running pickled code -> rename them to diffusers names
(OpenAI's are renamed by ``openai.openai_state_to_diffusers``) -> map names and layouts onto the
model's own abstract params, checking every key and shape (``mapping.torch_to_flax``) -> write an
orbax checkpoint atomically (``cmjax.weights.checkpoint``): on any error nothing is left at DST.

Sources of a consistency decoder (``kind="decoder"``):

============================  ==============================================================
``diffusers``                 a ``ConsistencyDecoderVAE`` or ``UNet2DModel`` folder (config.json +
                              diffusion_pytorch_model[.fp16].safetensors, or ``.bin``), or its
                              weights file
``openai-torchscript``        OpenAI's ``decoder.pt`` (a TorchScript archive)
``openai-safetensors``        the extracted ``consistency_decoder.safetensors`` (+
                              ``embedding.safetensors`` beside it), or their folder
``torch-pickle``              a ``torch.save`` file with OpenAI or diffusers names
``torchscript``               another TorchScript archive with diffusers names
============================  ==============================================================

SD VAE sources (``kind="vae"``: diffusers ``AutoencoderKL``, LDM checkpoints) go to
``cmjax.weights.sd_vae.load_pytorch_vae``.
"""
from __future__ import annotations

import dataclasses
import os
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from cmjax.models.decoder_config import Decoder
from cmjax.weights import diffusers as diffusers_fmt
from cmjax.weights.checkpoint import check_destination, save_decoder, save_vae
from cmjax.weights.mapping import ConversionError
from cmjax.weights.openai import PAIR_EMBEDDING, PAIR_WEIGHTS, decoder_from_openai_state, load_openai_decoder, looks_like_openai
from cmjax.weights.sd_vae import detect_vae_format, load_pytorch_vae
from cmjax.weights.torch_pickle import LEGACY_HEAD, ZIP_MAGIC, CheckpointError, check_regular_file, load_torch_file

KINDS = ("decoder", "vae")
DIFFUSERS, OPENAI_TORCHSCRIPT, OPENAI_SAFETENSORS, TORCH_PICKLE, TORCHSCRIPT = (
    "diffusers", "openai-torchscript", "openai-safetensors", "torch-pickle", "torchscript")
_DECODER_CLASSES = ("ConsistencyDecoderVAE", "UNet2DModel")
_VAE_CLASSES = ("AutoencoderKL",)
_BIN_WEIGHTS = "diffusion_pytorch_model.bin"
_CONFIG_JSON, _DECODER_PT = "config.json", "decoder.pt"
# What makes a folder a PyTorch checkpoint, in the order _detect_folder tries them: a diffusers
# config.json (+ weights), OpenAI's extracted pair, OpenAI's decoder.pt.
FOLDER_MARKERS = (_CONFIG_JSON, PAIR_WEIGHTS, _DECODER_PT)

Report = Callable[[str], None]


@dataclasses.dataclass
class Source:
    """What a conversion source is.

    ``kind``: "decoder" or "vae". ``format``: one of the module's format names. ``names``: the
    naming scheme of its tensors ("openai", "diffusers", an SD VAE scheme). ``weights``: the file
    holding the tensors; ``config``: a diffusers config.json to use (None: infer from shapes).
    ``tensors``: already-read tensors (pickles must be read whole to see their names).
    """

    path: Path
    kind: str
    format: str
    names: str
    weights: Path
    config: Path | None = None
    dtypes: tuple[str, ...] = ()
    detail: str = ""
    tensors: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def describe(self) -> str:
        what = {
            DIFFUSERS: "diffusers safetensors",
            OPENAI_TORCHSCRIPT: "OpenAI TorchScript archive (decoder.pt)",
            OPENAI_SAFETENSORS: f"OpenAI extracted safetensors ({PAIR_WEIGHTS} + {PAIR_EMBEDDING})",
            TORCH_PICKLE: "torch.save pickle",
            TORCHSCRIPT: "TorchScript archive",
        }.get(self.format, self.format)
        names = {"openai": "OpenAI names", "diffusers": "diffusers names"}.get(self.names, f"{self.names} names")
        if self.format == DIFFUSERS and self.detail:  # the folder says more than the file type
            what = f"diffusers {self.detail}"
        elif self.detail:
            what = f"{what} ({self.detail})"
        parts = [f"{what}, {names}"]
        if self.dtypes:
            parts.append("/".join(self.dtypes))
        return f"{self.kind}: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Recognising a source


def _sniff(path: Path) -> str:
    """'safetensors', 'zip', 'pickle', 'empty' or 'unknown' from the leading bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(LEGACY_HEAD):
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"
    return "unknown"


def _safetensors_names(path: Path) -> tuple[list[str], tuple[str, ...]]:
    """Tensor names and dtypes of a safetensors file, from its header (nothing else is read)."""
    header, _ = diffusers_fmt.read_safetensors_header(path)
    return list(header), tuple(sorted({str(dtype) for dtype, *_ in header.values()}))


def _dtypes(tensors: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """The dtypes of the named tensors (TorchScript constants left out)."""
    return tuple(sorted({str(v.dtype) for k, v in tensors.items() if not k.startswith("CONSTANTS.c")}))


def _naming(names: list[str]) -> tuple[str, str]:
    """(kind, naming scheme) from tensor names; raises ConversionError if nothing fits."""
    if looks_like_openai(names):
        return "decoder", "openai"
    if any(k.startswith(diffusers_fmt.UNET_PREFIX) for k in names) or (
            "conv_in.weight" in names and any(k.startswith("down_blocks.") for k in names)):
        return "decoder", "diffusers"
    try:
        return "vae", f"SD VAE ({detect_vae_format(dict.fromkeys(names))})"
    except ConversionError:
        pass
    raise ConversionError(f"no consistency-decoder or SD VAE tensor names (saw {len(names)} tensors, e.g. "
                          f"{sorted(names)[:6]})")


def is_pytorch_folder(folder: Path) -> bool:
    """True if ``folder`` holds one of FOLDER_MARKERS (then it is converted, or refused, as one)."""
    return any((folder / name).exists() for name in FOLDER_MARKERS)


def _detect_folder(folder: Path) -> Source:
    config = folder / _CONFIG_JSON
    if config.is_file():
        meta = diffusers_fmt.read_config_json(config)
        if not isinstance(meta, dict):
            raise ConversionError(f"{config}: must hold a JSON object, got {type(meta).__name__}")
        cls = meta.get("_class_name", "")
        cls = cls if isinstance(cls, str) else ""
        if any((folder / n).is_file() for n in diffusers_fmt.WEIGHT_FILES):
            weights = diffusers_fmt.find_weights(folder)
        elif (folder / _BIN_WEIGHTS).is_file():
            weights = folder / _BIN_WEIGHTS
        else:
            raise ConversionError(f"{folder}: has config.json ({cls or 'no _class_name'}) but no "
                                  f"{' or '.join(diffusers_fmt.WEIGHT_FILES)} or {_BIN_WEIGHTS}")
        src = _detect_file(weights)
        src.path, src.config = folder, config
        if cls in _VAE_CLASSES:
            src.kind = "vae"
        src.detail = f"{cls or 'model'} folder ({weights.name})"
        return src
    for name in FOLDER_MARKERS[1:]:  # OpenAI's files
        if (folder / name).is_file():
            src = _detect_file(folder / name)
            src.path = folder
            return src
    seen = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    raise ConversionError(
        f"{folder}: not a recognised checkpoint folder: no {' or '.join(diffusers_fmt.WEIGHT_FILES)} "
        f"(diffusers, with {_CONFIG_JSON}), no {PAIR_WEIGHTS} (OpenAI, extracted), no {_DECODER_PT} "
        f"(OpenAI); "
        f"it holds {seen[:12] if seen else 'nothing'}{' ...' if len(seen) > 12 else ''}")


def _detect_file(path: Path) -> Source:
    kind = "safetensors" if path.suffix == ".safetensors" else _sniff(path)
    if kind == "empty":
        raise ConversionError(f"{path}: file is empty")
    if kind == "safetensors":
        names, dtypes = _safetensors_names(path)
        try:
            what, naming = _naming(names)
        except ConversionError as e:
            raise ConversionError(f"{path}: safetensors file, but {e}") from None
        fmt = OPENAI_SAFETENSORS if naming == "openai" else DIFFUSERS
        config = path.parent / "config.json"
        return Source(path, what, fmt, naming, path, config if naming == "diffusers" and config.is_file() else None,
                      dtypes)
    if kind in ("zip", "pickle"):
        torchscript = False
        if kind == "zip":
            try:
                with zipfile.ZipFile(path) as z:
                    torchscript = any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise ConversionError(f"{path}: truncated or corrupt zip archive ({e})") from e
        try:
            tensors = load_torch_file(path, include_constants=torchscript)
        except CheckpointError as e:
            raise ConversionError(str(e)) from e
        constants = [k for k in tensors if k.startswith("CONSTANTS.c")]
        try:
            what, naming = _naming([k for k in tensors if k not in constants])
        except ConversionError as e:
            container = "TorchScript archive" if torchscript else "torch.save pickle"
            raise ConversionError(f"{path}: {container}, but {e}") from None
        fmt = (OPENAI_TORCHSCRIPT if naming == "openai" else TORCHSCRIPT) if torchscript else TORCH_PICKLE
        config = path.parent / "config.json"
        return Source(path, what, fmt, naming, path, config if naming == "diffusers" and config.is_file() else None,
                      _dtypes(tensors), tensors=tensors)
    with open(path, "rb") as f:
        head = f.read(8)
    raise ConversionError(f"{path}: unrecognised file type (leading bytes {head.hex()}); expected safetensors, a "
                          "TorchScript/torch.save zip archive or a legacy torch.save pickle")


def detect_source(src: str | os.PathLike) -> Source:
    """Recognise a conversion source (see the module docstring); ConversionError if nothing fits.

    Folders and safetensors files are recognised from their headers; pickles and TorchScript
    archives are read whole (with the restricted unpickler) because only their tensor names tell
    what they hold, and the tensors are kept in ``Source.tensors`` for the conversion.
    """
    path = Path(src)
    if path.is_dir():
        return _detect_folder(path)
    if path.is_file():
        return _detect_file(path)
    if not os.path.lexists(path):
        raise ConversionError(f"{path}: no such file or folder")
    try:  # a FIFO, a device such as /dev/zero, a dangling symlink: say which, never open it
        check_regular_file(path)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    raise ConversionError(f"{path}: not a regular file")


# --------------------------------------------------------------------------------------------
# Reading and converting


def _timed(report: Report | None, what: str):
    start = time.perf_counter()

    def done(detail: str = "") -> None:
        if report:
            report(f"{what}{detail} ({time.perf_counter() - start:.1f} s)")

    return done


def decoder_from_source(source: Source, *, dtype: Any = np.float32, report: Report | None = None) -> Decoder:
    """Read a recognised decoder source into a Decoder with NumPy params (``dtype``; None keeps)."""
    done = _timed(report, f"read and checked {source.weights.name}")
    if source.names == "openai":
        if source.tensors is None:
            decoder = load_openai_decoder(source.weights, dtype=dtype, report=report)
        else:
            tensors = dict(source.tensors)
            constants = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("CONSTANTS.c")]}
            decoder = decoder_from_openai_state(tensors, source=str(source.weights), dtype=dtype,
                                                constants=constants, report=report)
    elif source.names == "diffusers":
        tensors = source.tensors if source.tensors is not None else diffusers_fmt.read_safetensors(source.weights)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("CONSTANTS.c")}
        decoder = diffusers_fmt.decoder_from_diffusers_state(tensors, source=str(source.weights),
                                                             config_path=source.config, dtype=dtype)
    else:
        raise ConversionError(f"{source.path}: holds {source.names} tensors, not a consistency decoder")
    done()
    return decoder


def load_pytorch_decoder(src: str | os.PathLike, *, dtype: Any = np.float32,
                         report: Report | None = None) -> Decoder:
    """Read a PyTorch decoder checkpoint of any supported format into a Decoder (NumPy params)."""
    source = detect_source(src)
    if report:
        report(f"recognised {src}: {source.describe()}")
    if source.kind != "decoder":
        raise ConversionError(f"{src}: this is an SD VAE ({source.names}), not a consistency decoder; "
                              "convert it with --kind vae")
    return decoder_from_source(source, dtype=dtype, report=report)


def _make_contiguous(tree: dict) -> None:
    """Replace every leaf of a nested params dict by a C-contiguous array, in place, one at a time.

    Conv kernels come out of the mapping as transposed views of the file's buffers; orbax would
    copy every one of them at once while writing. Copying them here one by one, with nothing else
    holding the file's buffers, frees each buffer as its copy is made, so the whole conversion
    holds about one copy of the weights (plus one tensor) instead of two. The copy is XLA's
    (``jax.device_put`` to the CPU, read back without a copy): NumPy's copy of these strided
    (O, I, kh, kw) -> (kh, kw, I, O) views took 11 s for the 2.5 GB decoder, XLA's 2.3 s.
    """
    cpu = jax.devices("cpu")[0]
    for key, value in tree.items():
        if isinstance(value, dict):
            _make_contiguous(value)
        elif not value.flags.c_contiguous:
            tree[key] = np.asarray(jax.device_put(value, cpu))
            del value


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, kind: str | None = None, keep_dtype: bool = False,
            overwrite: bool = False, report: Report | None = None):
    """Convert ``src`` into the cmjax checkpoint directory ``dst``; nothing is left at dst on failure.

    ``kind``: "decoder" or "vae" to override what the source is recognised as (a
    ``ConsistencyDecoderVAE`` is a decoder by default; ``kind="vae"`` takes its SD encoder).
    ``overwrite``: replace an existing ``dst`` that is a cmjax checkpoint (never ``src``, a folder
    holding it or a symbolic link: ``checkpoint.check_destination``).
    ``keep_dtype``: store fp16/bf16 params as they are (default: upcast to float32; a checkpoint
    stored in fp16 still loads as float32). ``report``: called with one line per step.
    Returns the Decoder (or, for ``kind="vae"``, the VAE) that was written.
    """
    if kind not in (None, *KINDS):
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    protect = (src,)  # --overwrite never replaces the source (or a folder holding it)
    check_destination(dst, overwrite=overwrite, protect=protect)  # before reading gigabytes
    dtype = None if keep_dtype else np.float32
    source = detect_source(src)
    if report:
        report(f"recognised {src}: {source.describe()}")
        if kind and kind != source.kind:
            report(f"converting it as {kind} (--kind {kind})")
        lower = [d for d in source.dtypes if d in ("float16", "bfloat16")]
        if lower:
            report(f"{'/'.join(lower)} weights kept as they are (--keep-dtype)" if keep_dtype else
                   f"{'/'.join(lower)} weights upcast to float32 (--keep-dtype keeps them)")
    origin = str(Path(src).absolute())
    if (kind or source.kind) == "vae":
        source.tensors = None  # the VAE converter reads the file itself
        done = _timed(report, "read and checked the SD VAE")
        model = load_pytorch_vae(source.path, dtype=dtype)
        done()
        save = save_vae
    else:
        model = decoder_from_source(source, dtype=dtype, report=report)
        source.tensors = None
        _make_contiguous(model.params)
        save = save_decoder
    done = _timed(report, "saved the checkpoint")
    save(model, dst, source=origin, overwrite=overwrite, protect=protect)
    done()
    return model


__all__ = ["ConversionError", "KINDS", "Source", "convert", "decoder_from_source", "detect_source",
           "load_pytorch_decoder"]
