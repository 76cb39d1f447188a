"""Where cmjax keeps what it makes once and reuses: ``$CMJAX_CACHE``, else ``~/.cache/cmjax``;
:func:`slug` makes the entries' file names.

    downloads/<sha256>/decoder.pt    verified OpenAI downloads (cmjax.weights.hub)
    checkpoints/<name>/              PyTorch weights converted on first use (cmjax.weights.hub)
    inception/                       the FID Inception weights (cmjax.weights.inception)
    fid_stats/                       reference FID statistics (cmjax.evaluation.fid)
    conv_lowering.json               measured convolution lowerings (cmjax.tuning)
    xla/                             compiled programs: JAX's persistent compilation cache
                                     (``enable_compile_cache``; off with CMJAX_COMPILE_CACHE=0)
    xla/cmjax-traced/                decode.py's traced programs (``jax.export``), so that a second
                                     run skips the trace (cmjax.batch_decode.program)
    verified/                        checkpoints whose params matched their digest, with their files'
                                     sizes and times, so that unchanged files are not hashed again
                                     (cmjax.weights.checkpoint)

Like any JAX compilation cache, ``xla/`` is trusted: whoever can write there can make cmjax run
their code, so it lives with the user's own files. It is not size-limited (a full-size decode
program is a few MB per input shape); delete it, or part of it, at any time.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from pathlib import Path

import jax

CACHE_ENV = "CMJAX_CACHE"
COMPILE_CACHE_ENV = "CMJAX_COMPILE_CACHE"  # "0": compile every program anew (no persistent cache)
COMPILE_CACHE_NAME = "xla"
# Programs that compile faster than this are not worth a file (JAX's default is 1 s; the decode
# program takes 5-50 s, its kernel preparation 1-3 s).
MIN_COMPILE_SECONDS = 0.5


def cache_dir() -> Path:
    """The cache root: $CMJAX_CACHE, else ~/.cache/cmjax."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cmjax").expanduser()


@functools.cache
def source_digest() -> str:
    """SHA-256 of cmjax's own source (every .py file of the package, with its path): what a kept
    result made by this code (a traced program, a checked checkpoint's shapes) is valid for."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(f"{path.relative_to(root)}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def slug(text: str, *, sep: str = "_", max_len: int | None = None, fallback: str = "entry") -> str:
    """``text`` made a safe cache file name: every run of characters other than ASCII letters,
    digits, ``.``, ``_`` and ``-`` becomes ``sep``, ``sep``'s characters are stripped from both
    ends, the rest cut to ``max_len`` characters; ``fallback`` if nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", sep, text).strip(sep)[:max_len] or fallback
def enable_compile_cache() -> str | None:
    """Turn on JAX's persistent compilation cache under ``cache_dir()/xla``, so that a second run of a
    command loads its compiled programs instead of compiling them again; every cmjax command calls
    this first. Returns the directory in use, or None when off.

    A directory already chosen for JAX (``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) is kept;
    ``CMJAX_COMPILE_CACHE=0`` leaves the cache off, and so does a directory that cannot be made
    (one warning line on stderr). Call before the first compilation.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if os.environ.get(COMPILE_CACHE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    path = str(cache_dir() / COMPILE_CACHE_NAME)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"warning: compiling without a cache: cannot make {path} ({e.strerror or e})", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
