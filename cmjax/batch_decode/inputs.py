"""Inputs of a batch decode: discovery (files, folders, globs), header scans and reading.

    INPUT... -> discover -> [Source(path, rel)] sorted by rel
             -> scan_latents (.npy / .npz / .safetensors headers) or scan_image (image size)
             -> [Item]: one per latent (3-D, or one row of a 4-D batch) or image file
             -> Reader.latent / Reader.image: (h, w, C) latents or (H, W, 3) pixels in [-1, 1]

Nothing here reads more than a header before the run asks for an item's rows; every failure is an
``InputError`` (or a message) that names the file.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import glob
import os
import re
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image
from safetensors import safe_open

from cmjax.files import array_headers, printable
from cmjax.images import from_uint8, to_rgb, upright, upright_size
from cmjax.weights.diffusers import read_safetensors_header
from cmjax.weights.mapping import ConversionError

LATENT_SUFFIXES = (".npy", ".npz", ".safetensors")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class InputError(ValueError):
    """An input that cannot be decoded; the message says why (the caller names the file)."""



@dataclasses.dataclass(frozen=True)
class Source:
    """An input file. ``rel``: its '/'-separated path below the argument that found it (a folder, a
    glob's fixed prefix) or its bare name when named directly; it names outputs and seeds noise."""

    path: Path
    rel: str


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to make: a latent (an array, or one row of a 4-D one) or an image file.

    ``shape``: (h, w) latents, or (H, W) pixels of an image (cropped to the upsampling factor).
    """

    source: Source
    shape: tuple[int, int]
    key: str | None = None  # .npz member / .safetensors tensor name
    index: int | None = None  # row of a 4-D array
    channels_first: bool = False
    index_width: int = 3

    @property
    def identity(self) -> str:
        parts = [self.source.rel] + ([self.key] if self.key is not None else [])
        return ":".join(parts + ([str(self.index)] if self.index is not None else []))

    @property
    def identity_bytes(self) -> bytes:
        """``identity`` as bytes: UTF-8, and a file name's own bytes where they are not UTF-8
        (``os.fsdecode`` keeps those as surrogate escapes, which UTF-8 alone cannot encode)."""
        return self.identity.encode("utf-8", "surrogateescape")

    @property
    def name(self) -> str:
        """How messages name it: the file, plus [key] and [index]."""
        return display(self.source.path) + "".join(f"[{p}]" for p in (self.key, self.index) if p is not None)

    @property
    def stem(self) -> str:
        """Output path below the output folder, without extension: foo, foo_003, foo_key_003."""
        stem = self.source.rel.rsplit(".", 1)[0] if "." in Path(self.source.rel).name else self.source.rel
        if self.key is not None:
            stem += "_" + _safe_name(self.key)
        if self.index is not None:
            stem += f"_{self.index:0{self.index_width}d}"
        return stem


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def display(path: Path | str) -> str:
    """A path as messages print it: as it is, or quoted with newlines, control characters and bytes
    that are not UTF-8 escaped (``'a\\nb.npy'``, ``'bad\\xff.npy'``) so it reads as one name."""
    return printable(str(path), quote=True)


def discover(inputs: Sequence[str], suffixes: Sequence[str]) -> tuple[list[Source], list[str]]:
    """Files, folders (recursively) and globs -> sources sorted by ``rel``, and error messages.

    A file reached twice (by two arguments) is kept once; an argument that matches nothing is an error.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    found, errors = [], []
    for arg in inputs:
        if glob.has_magic(arg):
            base = _glob_base(arg)
            files, special = _glob_files(arg, base, suffixes)
            if not files and not special:
                errors.append(f"{display(arg)}: matches no {'/'.join(suffixes)} files")
            found += [Source(f, _rel(f, Path(base))) for f in files]
        elif os.path.isdir(arg):
            files, special = _walk(Path(arg), suffixes)
            if not files and not special:
                errors.append(f"{display(arg)}: folder holds no {'/'.join(suffixes)} files")
            found += [Source(f, _rel(f, Path(arg))) for f in files]
        elif os.path.isfile(arg):
            special = []
            if arg.lower().endswith(suffixes):
                found.append(Source(Path(arg), Path(arg).name))
            else:
                errors.append(f"{display(arg)}: not a {'/'.join(suffixes)} file")
        else:
            special = [Path(arg)]
        errors += [_not_a_file(p) for p in special]
    seen, sources = set(), []
    for s in sorted(found, key=lambda s: (s.rel, str(s.path))):
        real = os.path.realpath(s.path)
        if real not in seen:
            seen.add(real)
            sources.append(s)
    return sources, list(dict.fromkeys(errors))  # a file named twice is reported once


def _not_a_file(path: Path) -> str:
    """Why ``path``, found or named as an input, is not read: a FIFO or device would block or never
    end, a dangling link has nothing behind it."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"{display(path)}: a symbolic link to nothing ({display(os.readlink(path))}); skipped"
    if os.path.exists(path):
        return f"{display(path)}: not a regular file or folder (a FIFO, device or socket); skipped"
    return f"{display(path)}: no such file or folder"


def _glob_base(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = []
    for p in parts:
        if glob.has_magic(p):
            break
        fixed.append(p)
    return str(Path(*fixed)) if fixed else "."


def _glob_files(pattern: str, base: str, suffixes: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """Files matched by a glob, and the files below the folders it matches; and the matched names
    with those suffixes that are not regular files (FIFOs, devices, dangling links).

    ``glob.glob``'s ``**`` follows links to folders without remembering them, so two links to an
    ancestor (``l1 -> .``, ``l2 -> .``) make it run for ever; a pattern with ``**`` is therefore
    matched against the files of one ``_walk`` of its fixed prefix instead."""
    if "**" not in Path(pattern).parts:
        matches = sorted(glob.glob(pattern))
        files = [Path(m) for m in matches if os.path.isfile(m) and m.lower().endswith(suffixes)]
        special = [Path(m) for m in matches if not os.path.isfile(m) and not os.path.isdir(m)
                   and m.lower().endswith(suffixes)]
        for m in matches:
            if os.path.isdir(m):
                below, odd = _walk(Path(m), suffixes)
                files, special = files + below, special + odd
        return files, special
    pattern_parts = list(Path(pattern).parts[len(Path(base).parts) if base != "." else 0:])
    files, special = [], []
    walked, odd = _walk(Path(base), suffixes)
    regular = set(walked)
    for f in walked + odd:
        parts = _rel(f, Path(base)).split("/")
        # the file itself, or a folder above it, matches (glob then lists the folder's files)
        if any(_parts_match(parts[:n], pattern_parts) for n in range(1, len(parts) + 1)):
            (files if f in regular else special).append(f)
    return files, special


def _parts_match(path: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether path components match glob components: ``**`` any number of them, others by fnmatch."""
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_parts_match(path[k:], pattern[1:]) for k in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and _parts_match(path[1:], pattern[1:])


def _walk(root: Path, suffixes: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """Files below ``root`` with these suffixes, following links to folders but entering each real
    folder once (a link to an ancestor, ``l1 -> .``, would otherwise loop until memory runs out);
    and the names with these suffixes that are not regular files (FIFOs, devices, dangling
    links: never opened, reported). Hidden names (temporaries) are left out."""
    out, special, visited = [], [], {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in dirnames:
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in visited:
                visited.add(real)
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if f.lower().endswith(suffixes) and not f.startswith("."):
                (out if os.path.isfile(os.path.join(dirpath, f)) else special).append(Path(dirpath, f))
    return out, special


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def detect_layout(shape: Sequence[int], layout: str | None = None, channels: int = 4) -> bool:
    """True if a 3-D (C, h, w) / 4-D (N, C, h, w) array is channels-first, False if channels-last.

    Detected by which axis has ``channels`` entries, or forced by ``layout`` ("nchw"/"nhwc");
    raises InputError for another rank, no such axis, or both (ambiguous, e.g. (4, 4, 4)).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4):
        raise InputError(f"shape {shape}: a latent is 3-D (C,h,w or h,w,C) or a 4-D batch, not {len(shape)}-D")
    first, last = shape[-3], shape[-1]
    if layout is not None:
        if layout not in ("nchw", "nhwc"):
            raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")
        axis = first if layout == "nchw" else last
        if axis != channels:
            raise InputError(f"shape {shape}: --layout {layout} puts {axis} channels where {channels} are needed")
        return layout == "nchw"
    if first == channels and last == channels:
        raise InputError(f"shape {shape}: ambiguous layout, both NCHW and NHWC have {channels} channels; "
                         "pass --layout nchw or --layout nhwc")
    if first == channels:
        return True
    if last == channels:
        return False
    raise InputError(f"shape {shape}: no axis of {channels} latent channels (expected NCHW or NHWC)")


def _array_headers(path: Path) -> list[tuple[str | None, tuple[int, ...], str]]:
    """(key, shape, dtype name) of each array in a latent file, reading headers only; every shape is
    checked against the bytes that back it (InputError otherwise)."""
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        try:
            headers = array_headers(path)
        except ValueError as e:
            raise InputError(str(e)) from None
        if (headers[0][0] is None) != (suffix == ".npy"):
            raise InputError(f"a {'.npz archive' if suffix == '.npy' else '.npy file'} named {suffix}")
        return [(key, shape, dtype.name) for key, shape, dtype in headers]
    if suffix == ".safetensors":
        try:  # the checks convert makes: duplicate names, offsets and sizes against the file
            header, _ = read_safetensors_header(path)
        except ConversionError as e:
            raise InputError(str(e).removeprefix(f"{path}: ")) from None
        out = [(k, shape, dtype.name) for k, (dtype, shape, _, _) in header.items()]
        if not out:
            raise InputError("no tensors in this .safetensors file")
        return out
    raise InputError(f"unsupported file type {suffix!r}")


_FLOAT_DTYPES = {"float16", "float32", "float64", "bfloat16", "F16", "F32", "F64", "BF16"}


def scan_latents(source: Source, layout: str | None, channels: int) -> tuple[list[Item], list[str]]:
    """The items of one latent file (headers only) and messages for the arrays that cannot be decoded."""
    try:
        headers = _array_headers(source.path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
        return [], [f"{display(source.path)}: cannot read: {reason(e)}"]
    items, errors = [], []
    for key, shape, dtype in headers:
        where = display(source.path) + (f"[{key}]" if key is not None else "")
        try:
            if dtype not in _FLOAT_DTYPES:
                raise InputError(f"dtype {dtype}: latents must be floating point")
            channels_first = detect_layout(shape, layout, channels)
            if 0 in shape:
                raise InputError(f"shape {tuple(shape)}: empty")
        except InputError as e:
            errors.append(f"{where}: {e}")
            continue
        hw = tuple(shape[-2:]) if channels_first else tuple(shape[-3:-1])
        if len(shape) == 3:
            items.append(Item(source, hw, key, None, channels_first))
        else:
            width = max(3, len(str(shape[0] - 1)))
            items += [Item(source, hw, key, i, channels_first, width) for i in range(shape[0])]
    return items, errors


def scan_image(source: Source, factor: int) -> tuple[list[Item], list[str]]:
    """An image file's item: its size (H, W) cropped down to multiples of ``factor`` (header only)."""
    try:
        with Image.open(source.path) as img:
            w, h = upright_size(img)
    except Exception as e:  # noqa: BLE001
        return [], [f"{display(source.path)}: cannot read image: {reason(e)}"]
    if h < factor or w < factor:
        return [], [f"{display(source.path)}: image {w}x{h} is smaller than {factor}x{factor}"]
    return [Item(source, (h - h % factor, w - w % factor))], []


def reason(e: BaseException) -> str:
    """An exception as one line for a message: InputErrors as they are, others with their type."""
    return f"{type(e).__name__}: {e}" if not isinstance(e, InputError) else str(e)



class Reader:
    """Reads items' arrays; caches whole .npz members (a batch in one is read once, not per row)."""

    def __init__(self):
        self._npz = functools.lru_cache(maxsize=2)(self._load_npz_member)

    @staticmethod
    def _load_npz_member(path: Path, key: str) -> np.ndarray:
        with np.load(path, allow_pickle=False) as z:
            return z[key]

    def latent(self, item: Item) -> np.ndarray:
        """(h, w, C) float32 NHWC; raises InputError on NaN/inf or unreadable data."""
        path, suffix = item.source.path, item.source.path.suffix.lower()
        row = item.index if item.index is not None else Ellipsis
        if suffix == ".npy":
            arr = np.asarray(np.load(path, mmap_mode="r", allow_pickle=False)[row])
        elif suffix == ".npz":
            arr = self._npz(path, item.key)[row]
        else:
            arr = _read_safetensors(path, item.key, item.index)
        arr = np.asarray(arr, np.float32)
        if item.channels_first:
            arr = np.transpose(arr, (1, 2, 0))
        if arr.shape[:2] != item.shape:
            raise InputError(f"shape changed while reading: {arr.shape}")
        if not np.isfinite(arr).all():
            raise InputError(f"contains NaN or inf ({int((~np.isfinite(arr)).sum())} values)")
        return arr

    @staticmethod
    def image(item: Item) -> np.ndarray:
        """(H, W, 3) float32 in [-1, 1], center-cropped to ``item.shape``."""
        with Image.open(item.source.path) as img:
            img.load()
            rgb = np.asarray(to_rgb(upright(img)), np.uint8)
        h, w = item.shape
        top, left = (rgb.shape[0] - h) // 2, (rgb.shape[1] - w) // 2
        return from_uint8(rgb[top:top + h, left:left + w])


def _read_safetensors(path: Path, key: str, index: int | None) -> np.ndarray:
    with safe_open(str(path), framework="numpy") as f:
        if f.get_slice(key).get_dtype() != "BF16":
            sl = f.get_slice(key)
            return sl[index] if index is not None else sl[:]
    with safe_open(str(path), framework="flax") as f:  # NumPy has no bfloat16; JAX does
        arr = f.get_tensor(key)
        return np.asarray((arr[index] if index is not None else arr).astype(jnp.float32))


