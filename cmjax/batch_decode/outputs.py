"""Outputs of a batch decode: atomic writes below --output.

    a finished batch -> write_batch: this host's rows, each item's files (DecodeOptions.output_paths:
         <stem>.png [, <stem>.npy with --save-npy, <stem>_compare.png with --compare])
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
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from cmjax import parallel
from cmjax.batch_decode.inputs import Item, reason
from cmjax.batch_decode.options import DecodeOptions
from cmjax.evaluation import metrics
from cmjax.files import TMP_MARK, atomic_write, temp_pid
from cmjax.images import image_grid, to_uint8

COMPARE_LABELS = ("input", "SD GAN decoder", "consistency decoder")


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


def write_batch(items: Sequence[Item | None], ok: Sequence[bool], out: Any, options: DecodeOptions,
                psnr: dict[str, list[float]], fail: Callable[[str], None]) -> int:
    """Fetch this host's rows of a finished batch (``out``: the program's result) and write the
    ``ok`` ones; --compare PSNRs are appended to ``psnr``. Returns how many items were written."""
    if isinstance(out, tuple):  # --images: (consistency, gan, inputs)
        images, extra = parallel.local_rows(out[0]), [parallel.local_rows(o) for o in out[1:]]
    else:
        images, extra = parallel.local_rows(out), None
    written = 0
    for r, (item, good) in enumerate(zip(items, ok)):
        if not good:
            continue
        try:
            paths = options.output_paths(item)
            if options.save_npy:
                write_npy(paths[1], images[r])
            if options.compare and extra is not None:
                _write_compare(item, paths[-1], extra[1][r], extra[0][r], images[r], psnr)
            write_png(paths[0], to_uint8(images[r]))  # last: its presence marks the item finished
            written += 1
        except Exception as e:  # noqa: BLE001
            fail(f"{item.name}: cannot write output: {reason(e)}")
    return written


def _write_compare(item: Item, path: Path, original, gan, consistency, psnr: dict[str, list[float]]) -> None:
    """input | SD GAN decoder | consistency decoder, labelled, with PSNRs against the input below."""
    psnr_gan = metrics.mean_psnr(gan, original)  # clipped to [-1, 1], as the PNG is
    psnr_cd = metrics.mean_psnr(consistency, original)
    psnr.setdefault("gan", []).append(psnr_gan)
    psnr.setdefault("consistency", []).append(psnr_cd)
    tqdm.write(f"{item.name}: PSNR SD GAN decoder {psnr_gan:.2f} dB, consistency decoder {psnr_cd:.2f} dB")
    strip = image_grid([np.stack([original, gan, consistency])], column_labels=COMPARE_LABELS,
                       cell_labels=[["", f"PSNR {psnr_gan:.2f} dB", f"PSNR {psnr_cd:.2f} dB"]])
    write_png(path, strip)
