"""Read PyTorch checkpoint files into numpy arrays, without torch and without running pickled code.

Supported inputs:

* TorchScript archives written by ``torch.jit.save`` (OpenAI's ``decoder.pt`` is one): a zip with
  ``<root>/data.pkl``, the tensor storages under ``<root>/data/<key>``, ``<root>/code/``,
  ``<root>/constants.pkl`` ...
* zip files written by ``torch.save`` (PyTorch >= 1.6) holding a state dict or any nesting of
  dicts / lists of tensors (``{"state_dict": {...}}``, Lightning ``.ckpt`` files, ...).
* the legacy, non-zip ``torch.save`` format (``_use_new_zipfile_serialization=False``).

    load_torch_file(path)   the leading bytes choose the container
      -> torch_archives.py    zip archive or legacy stream: pickles, byte order, storage records
           torch_unpickler.py   the restricted unpickler: allowlisted globals only
                                (torch_globals.py), mutating opcodes checked; tensors named as
                                in state_dict()
           torch_tensors.py     tensor descriptions, their geometry checked against their
                                storage; arrays built, each storage read once
      -> {name: np.ndarray}

A hostile file must not cost more than its size either: the unpickler refuses opcodes that would
modify an object it already checked; every tensor view is checked against its storage when it is
unpickled and again when its bytes are copied, and may not hold more elements than its storage
(stride 0 would let a kilobyte describe gigabytes); zip records are read only up to the size the
pickle declares; shared containers are walked once. The limits (``MAX_*`` in those modules) are
far above what real checkpoints use.
"""

from __future__ import annotations

import os
import stat

import numpy as np

from cmjax.weights.errors import CheckpointError
from cmjax.weights.torch_archives import LEGACY_HEAD, LEGACY_PREFIX, ZIP_MAGIC, load_legacy, load_zip

__all__ = ["LEGACY_HEAD", "ZIP_MAGIC", "CheckpointError", "check_regular_file", "load_torch_file"]


# --------------------------------------------------------------------------------------------
# Entry point


def load_torch_file(path: str | os.PathLike, *, key: str | None = None,
                    include_constants: bool = False) -> dict[str, np.ndarray]:
    """Read the tensors of a PyTorch checkpoint without torch and without executing its pickle.

    Args:
        path: a TorchScript archive (``torch.jit.save``), a ``torch.save`` zip file, or a legacy
            ``torch.save`` file.
        key: optional dotted path selecting a sub-object to flatten (e.g. ``"model"`` or
            ``"state_dict"``). Without it, a top-level dict holding a dict under
            ``"state_dict"`` is narrowed to that entry; otherwise everything is flattened.
        include_constants: for traced TorchScript archives, also return the tensors of
            ``constants.pkl`` as ``CONSTANTS.c<i>`` (the names the archive's code uses).

    Returns:
        ``{name: np.ndarray}`` in pickle order, names dotted exactly like ``state_dict()``
        (``blocks.down_0_conv_0.gn_1.g``). For TorchScript archives this is every tensor
        attribute of every module, i.e. parameters, buffers and any plain tensor attributes.
        Arrays are C-contiguous, have the checkpoint's dtype (bfloat16 / fp8 as ml_dtypes
        types) and never share memory with each other. Non-tensor values are skipped.

    Raises:
        CheckpointError: naming the file and the problem (empty, unknown format, truncated or
            corrupt archive, missing data.pkl or storage, forbidden global, duplicate name).
    """
    path = os.fspath(path)
    try:
        check_regular_file(path)
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_PREFIX))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open checkpoint ({e})") from e
    if not head:
        raise CheckpointError(f"{path}: file is empty")
    if head.startswith(ZIP_MAGIC):
        return load_zip(path, key, include_constants)
    if head == LEGACY_PREFIX:
        if include_constants:
            raise CheckpointError(f"{path}: include_constants applies to TorchScript archives only")
        return load_legacy(path, key)
    if _looks_like_tar(path):
        raise CheckpointError(f"{path}: the pre-2018 tar torch.save format is not supported")
    raise CheckpointError(
        f"{path}: not a PyTorch checkpoint (unrecognised leading bytes {head[:8].hex()}; "
        f"expected a zip archive or a legacy torch.save file)")


def check_regular_file(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless ``path`` is a regular file (after symlinks).

    Checked before opening: reading a FIFO blocks forever, and ``/dev/zero`` never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open checkpoint ({e.strerror or e})") from e
    if not stat.S_ISREG(mode):
        what = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise CheckpointError(f"{path}: is {what}, not a regular checkpoint file")


def _looks_like_tar(path: str) -> bool:
    """Return True if ``path`` carries a POSIX tar header (the oldest torch.save format)."""
    with open(path, "rb") as f:
        f.seek(257)
        return f.read(5) == b"ustar"
