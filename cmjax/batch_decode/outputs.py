"""Outputs of a batch decode: names below --output, atomic writes.

    Item -> output_paths: <output>/<stem>.png [, <stem>.npy with --save-npy, <stem>_compare.png]
         -> write_png / write_npy: a temporary sibling ".<name>.tmp-<host>-<pid>" renamed onto the
            name, so a name that exists holds a whole file (a killed run leaves only temporaries,
            which remove_stale_temps deletes on the next run)

The PNG is written last: its presence marks the item finished (--skip-existing).
"""
from __future__ import annotations

import io
import os
import socket
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

_TMP_MARK = ".tmp-"


def output_paths(item, output: Path, *, save_npy: bool = False, compare: bool = False) -> list[Path]:
    """Every file written for ``item`` (an inputs.Item) below ``output``; it is finished when all exist."""
    base = output / item.stem
    paths = [base.with_name(base.name + ".png")]
    if save_npy:
        paths.append(base.with_name(base.name + ".npy"))
    if compare:
        paths.append(base.with_name(base.name + "_compare.png"))
    return paths


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies below ``folder`` once '..' and links are resolved (a glob such as
    ``d*/../../x.npy`` names its outputs with '..' in them)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root and real != root


def check_writable(folder: Path) -> str | None:
    """Why files cannot be written below ``folder`` (created later if missing), or None if they can.

    Looks at the folder, or the nearest ancestor that exists, without creating anything."""
    probe = Path(os.path.abspath(folder))
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through a temporary sibling renamed onto it: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_png(path: Path, image_uint8: np.ndarray) -> None:
    atomic_write(path, lambda f: Image.fromarray(image_uint8).save(f, format="PNG"))


def write_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, np.asarray(array, np.float32)))


def remove_stale_temps(root: Path) -> int:
    """Delete temporary files that a killed run of this host left under ``root``; returns how many."""
    host, removed = socket.gethostname(), 0
    if not root.is_dir():
        return 0
    for tmp in root.rglob(f".*{_TMP_MARK}{host}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
