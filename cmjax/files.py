"""Files as cmjax writes, reads and names them: written whole or not at all and never through a link,
sizes read from headers checked against the bytes behind them, names printed unambiguously.

    atomic_write(path, write): a temporary sibling ``.<name>.tmp-<host>-<pid>-<random>``, created
    exclusively (O_EXCL | O_NOFOLLOW, an unpredictable name: ``tempfile.mkstemp``), written by
    ``write(f)``, renamed onto ``path`` (a rename replaces a link at ``path``, never follows it)

A symlink planted at a temporary name cannot redirect the write (the name is not known in advance,
and an existing name is never opened); a killed run leaves only temporaries, which ``temp_pid``
recognises as its own (host and pid in the name) for the next run to remove.

    array_headers(path): (key, shape, dtype) of each array in a .npy / .npz, from the headers, each
    checked against the bytes that back it (a header declaring 1e9 rows over 96 bytes is refused
    before np.load allocates them)
    printable(text): a file name (or a message holding one) on one line: newlines, tabs, terminal
    escapes and the bytes of a non-UTF-8 name escaped as in a Python literal (``\\n``, ``\\xff``)
    read_small(path): the bytes of a small regular file (a JSON of settings), or ValueError for a
    FIFO / device (opening it could block or never end) or a file over the bound (never read)
"""
from __future__ import annotations

import math
import os
import re
import socket
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

TMP_MARK = ".tmp-"
MAX_SMALL_FILE = 16 << 20  # cmjax.json, config.json, a latent-stats JSON: kilobytes
_NAME_PART = 40  # characters of the target's name kept in its temporary's (the rest is ours: < 100)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would have given; mkstemp's files are 0600


def create_temp(path: Path, mark: str = TMP_MARK) -> tuple[int, Path]:
    """(fd, path) of a new empty file beside ``path``, created exclusively, without following links."""
    prefix = f".{path.name[:_NAME_PART]}{mark}{socket.gethostname()}-{os.getpid()}-"
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    return fd, Path(name)


def temp_pid(name: str, mark: str = TMP_MARK, host: str | None = None) -> int | None:
    """The pid that made the temporary file ``name`` on ``host`` (default this one), or None."""
    host = socket.gethostname() if host is None else host
    m = re.fullmatch(rf"\..*{re.escape(mark + host)}-(\d+)-[^-]+", name, re.DOTALL)
    return int(m.group(1)) if m else None


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through an exclusive temporary sibling renamed onto it (see the module docstring).

    The folder is created if missing. On any error the temporary is removed and ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def _escape(c: str) -> str:
    if "\udc80" <= c <= "\udcff":  # a byte that is not UTF-8, kept by os.fsdecode as a surrogate
        return f"\\x{ord(c) - 0xDC00:02x}"
    return c.encode("unicode_escape").decode("ascii")


def printable(text: str, *, quote: bool = False) -> str:
    """``text`` with every character that is not printable escaped (see the module docstring);
    ``quote``: put text that needed escaping in quotes, so a name that holds a backslash of its
    own is told apart from one that holds an escaped character."""
    if text.isprintable():
        return text
    if not quote:
        return "".join(c if c.isprintable() else _escape(c) for c in text)
    return "'" + "".join(_escape(c) if not c.isprintable() else "\\\\" if c == "\\" else c for c in text) + "'"


_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand a byte into more than ~1032 (zlib's own bound)


def _npy_header(f, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header bytes) of the .npy stream ``f``; ValueError for a malformed header."""
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f, max_header_size=1 << 16)
    except (ValueError, TypeError, SyntaxError) as e:
        raise ValueError(f"{where}not a valid .npy header ({e})") from None
    return tuple(shape), np.dtype(dtype), f.tell()


def _check_backed(shape: tuple[int, ...], dtype: np.dtype, available: int, where: str) -> None:
    need = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if need > available:
        raise ValueError(f"{where}the header declares shape {shape} {dtype.name} ({need:,} bytes) and only "
                         f"{max(available, 0):,} bytes of data follow (truncated, or a header that lies)")


def _npz_headers(path: Path) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    out = []
    archive_size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            where = f"member {info.filename!r}: "
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(f"{where}compression method {info.compress_type} (.npz members are stored "
                                 "or deflated)")
            ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_MAX_RATIO
            if info.header_offset + info.compress_size > archive_size or info.file_size > info.compress_size * ratio:
                raise ValueError(f"{where}the zip directory declares {info.file_size:,} bytes in "
                                 f"{info.compress_size:,} compressed bytes of a {archive_size:,}-byte file")
            with zf.open(info) as f:
                shape, dtype, header = _npy_header(f, where)
            _check_backed(shape, dtype, info.file_size - header, where)
            out.append((info.filename[:-4], shape, dtype))
    if not out:
        raise ValueError("no arrays in this .npz file")
    return out


def array_headers(path: str | os.PathLike) -> list[tuple[str | None, tuple[int, ...], np.dtype]]:
    """(key, shape, dtype) of each array of a .npy (key None) or .npz file, from its headers alone;
    ValueError (the message does not repeat the path) for a malformed file or a declared size that
    the bytes do not back. OSError when the file cannot be opened."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            if magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # as np.load tells them apart
                return _npz_headers(path)
            if magic != b"\x93NUMPY":
                raise ValueError("neither a .npy file (no NumPy header) nor an .npz (zip) archive")
            f.seek(0)
            shape, dtype, header = _npy_header(f, "")
            _check_backed(shape, dtype, os.fstat(f.fileno()).st_size - header, "")
        return [(None, shape, dtype)]
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"not a readable .npz archive ({e})") from None


def read_small(path: str | os.PathLike, limit: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes; ValueError naming it
    otherwise (checked before reading: a FIFO is never opened, a huge file never read)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if st.st_size > limit:
        raise ValueError(f"{path}: {st.st_size} bytes, more than such a file holds ({limit} at most)")
    with open(path, "rb") as f:
        return f.read(limit + 1)
