"""Where cmjax keeps what it makes once and reuses: ``$CMJAX_CACHE``, else ``~/.cache/cmjax``;
:func:`slug` makes the entries' file names.

    downloads/<sha256>/decoder.pt    verified OpenAI downloads (cmjax.weights.hub)
    checkpoints/<name>/              PyTorch weights converted on first use (cmjax.weights.hub)
    inception/                       the FID Inception weights (cmjax.weights.inception)
    fid_stats/                       reference FID statistics (cmjax.evaluation.fid)
    conv_lowering.json               measured convolution lowerings (cmjax.tuning)
"""
from __future__ import annotations

import os
import re
from pathlib import Path

CACHE_ENV = "CMJAX_CACHE"


def cache_dir() -> Path:
    """The cache root: $CMJAX_CACHE, else ~/.cache/cmjax."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cmjax").expanduser()


def slug(text: str, *, sep: str = "_", max_len: int | None = None, fallback: str = "entry") -> str:
    """``text`` made a safe cache file name: every run of characters other than ASCII letters,
    digits, ``.``, ``_`` and ``-`` becomes ``sep``, ``sep``'s characters are stripped from both
    ends, the rest cut to ``max_len`` characters; ``fallback`` if nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", sep, text).strip(sep)[:max_len] or fallback
