"""The two containers of PyTorch checkpoints: zip archives and the legacy ``torch.save`` stream.

* zip (``torch.save`` >= 1.6 and ``torch.jit.save``): ``<root>/data.pkl``, the tensor storages
  under ``<root>/data/<key>``, optionally ``<root>/byteorder``, and for TorchScript
  ``<root>/code/`` and ``<root>/constants.pkl`` (storages under ``<root>/constants/<key>``).
* legacy (``_use_new_zipfile_serialization=False``): pickles of the magic number, the protocol
  version, sys_info, the object and the storage key list, then each storage as a little-endian
  int64 element count followed by its raw bytes.

Each reader runs :class:`~cmjax.weights.torch_unpickler.RestrictedUnpickler` on the pickles and
hands a ``read(record, nbytes)`` to :class:`~cmjax.weights.torch_tensors.Materializer`. Zip
records are read only up to the size the pickle declares, after the central directory's sizes
were checked against the file (``MAX_INFLATE_RATIO``); legacy storages only within the file.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from typing import Any, BinaryIO, Callable

import numpy as np

from cmjax.weights.errors import CheckpointError
from cmjax.weights.torch_tensors import Materializer, TensorRef
from cmjax.weights.torch_unpickler import RestrictedUnpickler, flatten, select, unpickle

# How the files start. A zip archive (an empty one has only its end record); a legacy file with
# a pickle (protocol 2) of a 10-byte int, LEGACY_MAGIC, then one of the protocol version.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
LEGACY_HEAD = b"\x80\x02\x8a\x0a"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
LEGACY_PREFIX = LEGACY_HEAD + LEGACY_MAGIC.to_bytes(10, "little")

# Bytes copied per read when streaming a storage out of the zip: keeps the transient extra
# memory small while the whole storage lands in a single preallocated buffer.
_CHUNK = 16 << 20
MAX_PICKLE_BYTES = 1 << 30  # data.pkl / constants.pkl
# A deflated record may inflate to at most this many times its compressed size (torch never
# compresses records; a higher ratio is a zip bomb).
MAX_INFLATE_RATIO = 64

_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError,
               NotImplementedError, RuntimeError, OverflowError)


# --------------------------------------------------------------------------------------------
# Zip archives (torch.save >= 1.6 and torch.jit.save)


def _find_root(zf: zipfile.ZipFile, path: str) -> str:
    """Return the archive's record prefix (``"<root>/"``) holding ``data.pkl``."""
    names = zf.namelist()
    roots = [n[: -len("data.pkl")] for n in names
             if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if not roots:
        raise CheckpointError(f"{path}: zip archive has no data.pkl; not a PyTorch checkpoint")
    if len(roots) > 1:
        raise CheckpointError(f"{path}: zip archive has several data.pkl records: {roots}")
    return roots[0]


def _check_record_size(info: zipfile.ZipInfo, path: str, size: int | None, limit: int | None) -> None:
    """Refuse a record whose directory size differs from the declared ``size``, exceeds ``limit``,
    the whole file (stored) or ``MAX_INFLATE_RATIO`` times its compressed size (deflated)."""
    name = info.filename
    if size is not None and info.file_size != size:
        relation = "more" if info.file_size > size else "fewer"
        raise CheckpointError(f"{path}: record {name!r} holds {info.file_size} bytes, {relation} "
                              f"than the {size} its tensors declare")
    if limit is not None and info.file_size > limit:
        raise CheckpointError(f"{path}: record {name!r} holds {info.file_size} bytes, more than "
                              f"the {limit} accepted")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size > os.path.getsize(path):
            raise CheckpointError(f"{path}: record {name!r} claims {info.file_size} bytes, more "
                                  "than the whole file")
    elif info.file_size > max(MAX_INFLATE_RATIO * info.compress_size, 1 << 20):
        raise CheckpointError(f"{path}: record {name!r} inflates from {info.compress_size} to "
                              f"{info.file_size} bytes (a zip bomb?)")


def _read_record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, size: int | None = None,
                 limit: int | None = None) -> np.ndarray:
    """Return a zip record's bytes as a fresh writable uint8 array, reading no more than declared.

    ``size``: the size the pickle declares for it (refused if the archive says otherwise);
    ``limit``: the most bytes accepted when nothing declares a size. The central directory's
    sizes are checked against the file before allocating (:func:`_check_record_size`);
    zipfile never inflates past the directory's size and checks the CRC at the end.
    """
    _check_record_size(info, path, size, limit)
    buf = np.empty(info.file_size, np.uint8)
    mv = memoryview(buf)
    pos = 0
    # Stream into one preallocated buffer: the record's bytes are held in memory once.
    with zf.open(info) as fh:
        while pos < info.file_size:
            chunk = fh.read(min(_CHUNK, info.file_size - pos))
            if not chunk:
                raise CheckpointError(f"{path}: record {info.filename!r} is truncated")
            mv[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        fh.read(1)  # at the end: lets zipfile compare the CRC
    return buf


def _zip_reader(zf: zipfile.ZipFile, path: str) -> Callable[[str, int], np.ndarray]:
    """Return ``read(record, nbytes)`` for :class:`Materializer`."""

    def read(record: str, nbytes: int) -> np.ndarray:
        try:
            info = zf.getinfo(record)
        except KeyError:
            raise CheckpointError(f"{path}: missing storage record {record!r}") from None
        return _read_record(zf, info, path, size=nbytes)

    return read


def _unpickle_record(zf: zipfile.ZipFile, member: str, path: str, storage_prefix: str) -> Any:
    """Unpickle the zip record ``member`` (at most ``MAX_PICKLE_BYTES``) with the restricted unpickler."""
    raw = _read_record(zf, zf.getinfo(member), path, limit=MAX_PICKLE_BYTES).tobytes()
    up = RestrictedUnpickler(io.BytesIO(raw), path=path, member=member, storage_prefix=storage_prefix)
    return unpickle(up, path, member)


def _is_big_endian(zf: zipfile.ZipFile, root: str, path: str) -> bool:
    """The archive's ``byteorder`` record ("little" when there is none)."""
    if root + "byteorder" not in zf.namelist():
        return False
    raw = _read_record(zf, zf.getinfo(root + "byteorder"), path, limit=16)
    order = raw.tobytes().decode("ascii", "replace").strip()
    if order not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byte order {order!r}")
    return order == "big"


def _constant_tensors(zf: zipfile.ZipFile, root: str, path: str,
                      taken: set[str]) -> list[tuple[str, TensorRef]]:
    """The tensors of a TorchScript ``constants.pkl`` as ``CONSTANTS.c<i>`` (none if absent)."""
    member = root + "constants.pkl"
    if member not in zf.namelist():
        return []
    consts = _unpickle_record(zf, member, path, root + "constants/")
    if not isinstance(consts, tuple):
        return []
    refs = []
    for i, c in enumerate(consts):
        if isinstance(c, TensorRef):
            name = f"CONSTANTS.c{i}"
            if name in taken:
                raise CheckpointError(f"{path}: duplicate tensor name {name!r}")
            refs.append((name, c))
    return refs


def load_zip(path: str, key: str | None, include_constants: bool) -> dict[str, np.ndarray]:
    """The tensors of a zip checkpoint (see :func:`cmjax.weights.torch_pickle.load_torch_file`)."""
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e})") from e
    with zf:
        try:
            root = _find_root(zf, path)
            big_endian = _is_big_endian(zf, root, path)
            obj = _unpickle_record(zf, root + "data.pkl", path, root + "data/")
            refs = flatten(select(obj, key, path), path)
            if include_constants:
                refs += _constant_tensors(zf, root, path, {n for n, _ in refs})
            return Materializer(path, _zip_reader(zf, path), big_endian).build(refs)
        except CheckpointError:
            raise
        except _ZIP_ERRORS as e:
            # CRC mismatches, bad local headers, a file cut inside a record, an unsupported
            # compression method or encryption (NotImplementedError, RuntimeError) ...
            raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e})") from e


# --------------------------------------------------------------------------------------------
# Legacy (non-zip) torch.save files


def _legacy_spans(f: BinaryIO, path: str, keys: list[str], dtypes: dict[str, np.dtype],
                  little: bool) -> dict[str, tuple[int, int]]:
    """``{key: (file offset, nbytes)}`` of each listed storage, each checked to lie within the file."""
    file_size = os.path.getsize(path)
    spans: dict[str, tuple[int, int]] = {}
    for k in keys:
        dtype = dtypes.get(k)
        if dtype is None:
            raise CheckpointError(f"{path}: storage {k!r} is listed but never referenced")
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: file is truncated (storage {k!r} missing)")
        numel = int.from_bytes(head, "little" if little else "big", signed=True)
        nbytes = numel * dtype.itemsize
        start = f.tell()
        if numel < 0 or start + nbytes > file_size:
            raise CheckpointError(f"{path}: file is truncated (storage {k!r})")
        spans[k] = (start, nbytes)
        f.seek(nbytes, io.SEEK_CUR)
    return spans


def _span_reader(f: BinaryIO, path: str, spans: dict[str, tuple[int, int]]) -> Callable[[str, int], np.ndarray]:
    """Return ``read(record, nbytes)`` for :class:`Materializer` over the legacy file's spans."""

    def read(record: str, nbytes: int) -> np.ndarray:
        # The span's size comes from the file and was checked against it; views may declare
        # less than the whole storage (Materializer checks they fit).
        if record not in spans:
            raise CheckpointError(f"{path}: missing storage record {record!r}")
        start, nbytes = spans[record]
        buf = np.empty(nbytes, np.uint8)
        f.seek(start)
        if f.readinto(memoryview(buf)) != nbytes:
            raise CheckpointError(f"{path}: file is truncated (storage {record!r})")
        return buf

    return read


def load_legacy(path: str, key: str | None) -> dict[str, np.ndarray]:
    """The tensors of a pre-1.6 ``torch.save`` file (see the module docstring for its layout)."""
    with open(path, "rb") as f:
        def header(member: str) -> Any:
            return unpickle(RestrictedUnpickler(f, path=path, member=member), path, member)

        if header("magic number") != LEGACY_MAGIC:
            raise CheckpointError(f"{path}: invalid magic number for a legacy torch.save file")
        if header("protocol version") != LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: unsupported legacy torch.save protocol version")
        sys_info = header("sys_info")
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        up = RestrictedUnpickler(f, path=path, member="object pickle", legacy=True)
        obj = unpickle(up, path, "object pickle")
        keys = header("storage key list")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointError(f"{path}: malformed storage key list")
        spans = _legacy_spans(f, path, keys, up.legacy_dtypes, little)
        refs = flatten(select(obj, key, path), path)
        return Materializer(path, _span_reader(f, path, spans), big_endian=not little).build(refs)
