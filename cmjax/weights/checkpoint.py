"""The checkpoint formats: a directory with the params (orbax) and the config (JSON).

    DIR/cmjax.json   {"format": "cmjax-decoder", "version": 1, "config": {...}, "source": "...",
                      "params_sha256": "..."}
    DIR/params/      orbax StandardCheckpointer tree of float arrays (Flax param names, HWIO kernels)

``params_sha256`` is a digest of the params (names, dtypes, shapes, bytes) taken when the checkpoint
is written and checked when it is loaded, so flipped bytes in a data file are refused instead of
decoding to wrong pixels (``verify=False`` skips it; checkpoints written before it have none).

The SD VAE uses the same layout with format "cmjax-vae" and one more field, "parts": the halves
present (["encoder", "decoder"], or ["encoder"] for the encoder bundled with a consistency decoder).

Writes go to a temporary sibling directory that is renamed onto DIR only when complete, so a failed
or interrupted save never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cmjax.models import vae as vae_lib
from cmjax.models.decoder_config import Decoder, DecoderConfig, abstract_params
from cmjax.weights.errors import CheckpointError, parse_json

FORMAT = "cmjax-decoder"
VAE_FORMAT = "cmjax-vae"
VERSION = 1
CONFIG_FILE = "cmjax.json"
PARAMS_DIR = "params"


def check_destination(dst: str | os.PathLike, overwrite: bool) -> None:
    """FileExistsError if ``dst`` exists and ``overwrite`` is not set: every writer checks this
    before reading or downloading anything (the CLIs exit 2 on it: a usage error)."""
    if Path(dst).exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``dst``; rename it to ``dst`` if the block succeeds.

    On any exception the temporary directory is removed and ``dst`` is untouched.
    """
    dst = Path(dst).absolute()
    check_destination(dst, overwrite)
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


def _params_checkpointer() -> ocp.Checkpointer:
    """A synchronous orbax checkpointer for a params tree of host (NumPy) or jax arrays.

    Two departures from StandardCheckpointer's defaults, both for converting multi-GB weights:
    NumPy arrays are written in place (orbax otherwise deep-copies every host array first, in
    case an async save races with a mutation; this save is synchronous), and chunks are not
    compressed (zstd saves ~10% on float weights but makes tensorstore hold a second copy of
    everything: saving the 2.5 GB decoder took 19 s and +1.9 GB with it, 2.8 s and +0.1 GB
    without). The layout is orbax's usual one and StandardCheckpointer restores it as before.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))


DIGEST_KEY = "params_sha256"


def params_digest(params: Any) -> str | None:
    """SHA-256 over every leaf's path, shape and values as float32 bytes, in path order.

    float32 because a checkpoint stored in fp16/bf16 (``--keep-dtype``) is restored as float32:
    the upcast is exact, so both sides hash the same bytes. None when a leaf is not fully
    addressable from this process (a multi-host array): the digest needs every byte on one host.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if any(isinstance(v, jax.Array) and not v.is_fully_addressable for _, v in leaves):
        return None
    h = hashlib.sha256()
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(leaf)
        if jnp.issubdtype(a.dtype, jnp.floating):
            a = a.astype(np.float32, copy=False)
        a = np.ascontiguousarray(a)
        h.update(f"{jax.tree_util.keystr(path)} {a.shape}\n".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def _save(meta: dict, params: Any, dst: str | os.PathLike, overwrite: bool) -> Path:
    digest = params_digest(params)
    if digest is not None:
        meta = {**meta, DIGEST_KEY: digest}
    with atomic_directory(dst, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        with _params_checkpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
    return Path(dst)


def _read_meta(path: str | os.PathLike, fmt: str, what: str) -> dict:
    """The checked cmjax.json of a checkpoint directory of format ``fmt``."""
    meta_path = Path(path) / CONFIG_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a cmjax {what} checkpoint (no {CONFIG_FILE}); "
                              "convert PyTorch weights first with `python -m cmjax.convert SRC DST`")
    meta = parse_json(meta_path.read_bytes(), str(meta_path))
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != fmt:
        raise CheckpointError(f"{meta_path}: field format is {str(meta.get('format'))[:60]!r}, not {fmt!r}")
    version = meta.get("version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{meta_path}: field version must be a positive integer, got {str(version)[:40]!r}")
    if version > VERSION:
        raise CheckpointError(f"{meta_path}: version {version} is newer than this cmjax reads ({VERSION})")
    digest = meta.get(DIGEST_KEY)
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise CheckpointError(f"{meta_path}: field {DIGEST_KEY} is not a SHA-256 hex digest")
    if "config" not in meta:
        raise CheckpointError(f"{meta_path}: field config is missing")
    return meta


def _restore(path: Path, target: Any, sharding: Any, meta: dict, verify: bool) -> Any:
    """Restore the params laid out like ``target``; check them against the recorded digest."""
    if sharding is not None:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), target)
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing (the checkpoint has no params)")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(params_dir, target)
        except Exception as e:  # orbax/TensorStore raise many types for missing or cut data files
            text = str(e).strip()
            first = text.splitlines()[0][:300] if text else type(e).__name__
            raise CheckpointError(f"{params_dir}: cannot read the params: missing, truncated or not "
                                  f"matching the recorded config ({type(e).__name__}: {first})") from e
    expected = meta.get(DIGEST_KEY)
    if verify and expected is not None:
        got = params_digest(params)
        if got is not None and got != expected:
            raise CheckpointError(f"{params_dir}: params do not match the digest recorded in {CONFIG_FILE} "
                                  "(data files modified or corrupted); load with verify=False to skip the check")
    return params


def save_decoder(decoder: Decoder, dst: str | os.PathLike, *, source: str = "", overwrite: bool = False) -> Path:
    """Write ``decoder`` to the checkpoint directory ``dst`` atomically. Returns the path."""
    meta = {"format": FORMAT, "version": VERSION, "config": decoder.config.to_dict(), "source": source}
    return _save(meta, decoder.params, dst, overwrite)


def read_config(path: str | os.PathLike) -> DecoderConfig:
    """The DecoderConfig recorded in checkpoint directory ``path`` (every field checked)."""
    meta = _read_meta(path, FORMAT, "decoder")
    try:
        return DecoderConfig.from_dict(meta["config"], where=str(Path(path) / CONFIG_FILE), prefix="config.")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_decoder(path: str | os.PathLike, *, sharding: Any = None, verify: bool = True) -> Decoder:
    """Read a decoder (config + params) from a checkpoint directory written by ``save_decoder``.

    Only directories: names and PyTorch files are resolved by :func:`cmjax.weights.hub.load_decoder`
    (``cmjax.load_decoder``), which calls this.
    ``sharding``: an optional ``jax.sharding.Sharding`` for every param (e.g. replicated over a
    mesh); by default params land on the default device.
    ``verify``: check the params against the digest recorded when the checkpoint was written
    (hashes every byte once, a few seconds for the 2.5 GB decoder); False skips it.
    """
    path = Path(path).absolute()
    meta = _read_meta(path, FORMAT, "decoder")
    config = read_config(path)
    return Decoder(config, _restore(path, abstract_params(config), sharding, meta, verify))


def save_vae(vae: vae_lib.VAE, dst: str | os.PathLike, *, source: str = "", overwrite: bool = False) -> Path:
    """Write an SD VAE (whole or encoder-only) to the checkpoint directory ``dst`` atomically."""
    meta = {"format": VAE_FORMAT, "version": VERSION, "config": vae.config.to_dict(), "parts": list(vae.parts),
            "source": source}
    return _save(meta, vae.params, dst, overwrite)


def read_vae_config(path: str | os.PathLike) -> tuple[vae_lib.VAEConfig, tuple[str, ...]]:
    """(VAEConfig, the halves present) recorded in VAE checkpoint directory ``path``."""
    meta = _read_meta(path, VAE_FORMAT, "VAE")
    parts = tuple(meta.get("parts", vae_lib.PARTS))
    if not parts or any(p not in vae_lib.PARTS for p in parts):
        raise CheckpointError(f"{path}: bad parts {parts!r} (expected a subset of {vae_lib.PARTS})")
    try:
        return vae_lib.VAEConfig.from_dict(meta["config"]), parts
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad VAE config ({e})") from e


def read_vae(path: str | os.PathLike, *, sharding: Any = None, verify: bool = True) -> vae_lib.VAE:
    """Read an SD VAE (SD 1.x/2.x, SDXL, SD3, FLUX) from a checkpoint directory written by
    ``save_vae``; ``sharding`` and ``verify`` as in read_decoder. PyTorch VAEs and names are
    resolved by :func:`cmjax.weights.hub.load_vae` (``cmjax.load_vae``), which calls this."""
    path = Path(path).absolute()
    config, parts = read_vae_config(path)
    meta = _read_meta(path, VAE_FORMAT, "VAE")
    return vae_lib.VAE(config, _restore(path, vae_lib.abstract_params(config, parts), sharding, meta, verify))