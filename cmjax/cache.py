"""Where cmjax keeps what it makes once and reuses: ``$CMJAX_CACHE``, else ``~/.cache/cmjax``.

    downloads/<sha256>/decoder.pt    verified OpenAI downloads (cmjax.weights.hub)
    checkpoints/<name>/              PyTorch weights converted on first use (cmjax.weights.hub)
    inception/                       the FID Inception weights (cmjax.weights.inception)
    fid_stats/                       reference FID statistics (cmjax.evaluation.fid)
    conv_lowering.json               measured convolution lowerings (cmjax.tuning)
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "CMJAX_CACHE"


def cache_dir() -> Path:
    """The cache root: $CMJAX_CACHE, else ~/.cache/cmjax."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cmjax").expanduser()
