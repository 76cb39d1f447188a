"""Outputs of a batch decode: atomic writes below --output.

    a finished batch -> write_batch: this host's rows, each item's files (DecodeOptions.output_paths:
         <stem>.png [, <stem>.npy with --save-npy, <stem>_compare.png with --compare])
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
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from cmjax import data, parallel
from cmjax.batch_decode.inputs import Item, reason
from cmjax.batch_decode.options import DecodeOptions
from cmjax.evaluation import metrics

_TMP_MARK = ".tmp-"
COMPARE_LABELS = ("input", "SD GAN decoder", "consistency decoder")


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
            write_png(paths[0], data.to_uint8(images[r]))  # last: its presence marks the item finished
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
    strip = data.image_grid([np.stack([original, gan, consistency])], column_labels=COMPARE_LABELS,
                            cell_labels=[["", f"PSNR {psnr_gan:.2f} dB", f"PSNR {psnr_cd:.2f} dB"]])
    write_png(path, strip)
