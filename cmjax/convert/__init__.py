"""Weight conversion: PyTorch checkpoints -> cmjax checkpoints (``python -m cmjax.convert SRC DST``).

The flow, for every source format: read tensors as NumPy (never through torch) -> map names and
layouts onto the model's own abstract params, checking every key and shape
(``mapping.torch_to_flax``) -> write an orbax checkpoint atomically (``cmjax.checkpoint``).
"""
from __future__ import annotations

import os
from pathlib import Path

from cmjax.checkpoint import save_decoder
from cmjax.convert.diffusers import load_diffusers_decoder
from cmjax.convert.mapping import ConversionError
from cmjax.decoder import Decoder


def load_pytorch_decoder(src: str | os.PathLike) -> Decoder:
    """Read a PyTorch decoder checkpoint of any supported format into a Decoder (NumPy params)."""
    return load_diffusers_decoder(src)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Decoder:
    """Convert ``src`` into the cmjax checkpoint directory ``dst``; nothing is left at dst on failure."""
    decoder = load_pytorch_decoder(src)
    save_decoder(decoder, dst, source=str(Path(src).absolute()), overwrite=overwrite)
    return decoder


__all__ = ["ConversionError", "convert", "load_pytorch_decoder"]
