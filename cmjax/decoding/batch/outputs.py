"""Outputs of a batch decode: names below --output, atomic writes.

    Item -> output_paths: <output>/<stem>.png [, <stem>.npy with --save-npy, <stem>_compare.png]
         -> write_png / write_npy: cmjax.files.atomic_write, a temporary sibling created
            exclusively under an unpredictable name and renamed onto the name, so a name that
            exists holds a whole file and a planted link is never written through (a killed run
            leaves only temporaries, which remove_stale_temps deletes on the next run)

The PNG is written last: its presence marks the item finished (--skip-existing).
"""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from cmjax.files import TMP_MARK, atomic_write, temp_pid


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
    """Whether ``path`` lies below ``folder`` once '..' and links to folders are resolved (a glob
    such as ``d*/../../x.npy`` names its outputs with '..' in them). A link at ``path`` itself does
    not count: the write replaces it, never follows it."""
    real, root = os.path.join(os.path.realpath(path.parent), path.name), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root and real != root


def _existing_ancestor(folder: Path) -> Path:
    probe = Path(os.path.abspath(folder))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def name_limits(folder: Path) -> tuple[int, int]:
    """(longest file name, longest path) in bytes that the file system under ``folder`` takes."""
    probe = _existing_ancestor(folder)
    limits = []
    for key, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            limits.append(os.pathconf(probe, key) if probe.is_dir() else default)
        except (OSError, ValueError):
            limits.append(default)
    return limits[0], limits[1]


def name_problem(path: Path, output: Path, limits: tuple[int, int]) -> str | None:
    """Why ``path`` (below ``output``) cannot be created under ``limits`` (name_limits), or None."""
    name_max, path_max = limits
    full = os.fsencode(os.path.abspath(path))
    if len(full) >= path_max:
        return f"the output path is {len(full)} bytes, and this file system takes at most {path_max - 1}"
    for part in Path(os.path.relpath(path, output)).parts:
        n = len(os.fsencode(part))
        if n > name_max:
            return f"the output name is {n} bytes, and this file system takes at most {name_max}"
    return None


def check_writable(folder: Path) -> str | None:
    """Why files cannot be written below ``folder`` (created later if missing), or None if they can.

    Looks at the folder, or the nearest ancestor that exists, without creating anything."""
    probe = _existing_ancestor(folder)
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def write_png(path: Path, image_uint8: np.ndarray) -> None:
    atomic_write(path, lambda f: Image.fromarray(image_uint8).save(f, format="PNG"))


def write_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, np.asarray(array, np.float32)))


def remove_stale_temps(root: Path) -> int:
    """Delete temporary files that a killed run of this host left under ``root``; returns how many.

    Only regular files whose name says a process of this host made them, and that process is gone."""
    removed = 0
    if not root.is_dir():
        return 0
    for tmp in root.rglob(f".*{TMP_MARK}{socket.gethostname()}-*"):
        pid = temp_pid(tmp.name)
        try:
            if pid is not None and not _alive(pid) and stat.S_ISREG(os.lstat(tmp).st_mode):
                tmp.unlink()
                removed += 1
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
