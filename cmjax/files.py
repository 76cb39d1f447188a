"""Files as cmjax writes and names them: whole or not at all, never through a link, printed unambiguously.

    atomic_write(path, write): a temporary sibling ``.<name>.tmp-<host>-<pid>-<random>``, created
    exclusively (O_EXCL | O_NOFOLLOW, an unpredictable name: ``tempfile.mkstemp``), written by
    ``write(f)``, renamed onto ``path`` (a rename replaces a link at ``path``, never follows it)

A symlink planted at a temporary name cannot redirect the write (the name is not known in advance,
and an existing name is never opened); a killed run leaves only temporaries, which ``temp_pid``
recognises as its own (host and pid in the name) for the next run to remove.

    printable(text): a file name (or a message holding one) on one line: newlines, tabs, terminal
    escapes and the bytes of a non-UTF-8 name escaped as in a Python literal (``\\n``, ``\\xff``)
"""
from __future__ import annotations

import os
import re
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

TMP_MARK = ".tmp-"
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
