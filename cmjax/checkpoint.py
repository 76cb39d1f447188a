"""The decoder checkpoint format: a directory with the params (orbax) and the config (JSON).

    DIR/cmjax.json   {"format": "cmjax-decoder", "version": 1, "config": {...}, "source": "..."}
    DIR/params/      orbax StandardCheckpointer tree of float arrays (Flax param names, HWIO kernels)

Writes go to a temporary sibling directory that is renamed onto DIR only when complete, so a failed
or interrupted save never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from cmjax.decoder import Decoder, DecoderConfig, abstract_params

FORMAT = "cmjax-decoder"
VERSION = 1
CONFIG_FILE = "cmjax.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read; the message names the path and the problem."""


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``dst``; rename it to ``dst`` if the block succeeds.

    On any exception the temporary directory is removed and ``dst`` is untouched.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_decoder(decoder: Decoder, dst: str | os.PathLike, *, source: str = "", overwrite: bool = False) -> Path:
    """Write ``decoder`` to the checkpoint directory ``dst`` atomically. Returns the path."""
    meta = {"format": FORMAT, "version": VERSION, "config": decoder.config.to_dict(), "source": source}
    with atomic_directory(dst, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, decoder.params)
            ckptr.wait_until_finished()
    return Path(dst)


def read_config(path: str | os.PathLike) -> DecoderConfig:
    """The DecoderConfig recorded in checkpoint directory ``path``."""
    meta_path = Path(path) / CONFIG_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a cmjax decoder checkpoint (no {CONFIG_FILE}); "
                              "convert PyTorch weights first with `python -m cmjax.convert SRC DST`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: invalid JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{meta_path}: version {meta['version']} is newer than this cmjax reads ({VERSION})")
    return DecoderConfig.from_dict(meta["config"])


def load_decoder(path: str | os.PathLike, *, sharding: Any = None) -> Decoder:
    """Load a decoder (config + params) from a checkpoint directory written by ``save_decoder``.

    ``sharding``: an optional ``jax.sharding.Sharding`` for every param (e.g. replicated over a
    mesh); by default params land on the default device.
    """
    path = Path(path).absolute()
    config = read_config(path)
    target = abstract_params(config)
    if sharding is not None:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), target)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(path / PARAMS_DIR, target)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise CheckpointError(f"{path}: params do not match the recorded config ({e})") from e
    return Decoder(config, params)


def params_to_numpy(params: Any) -> Any:
    """Host copies of a params tree (e.g. before export)."""
    return jax.tree.map(np.asarray, params)
