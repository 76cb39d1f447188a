"""Batch decoding of latent files (or images) into PNGs on every device of every host: decode.py's library.

    INPUT... (files, folders, globs)
      -> discover: sources [(path, rel)] sorted by rel ('/'-separated path below the argument)
      -> scan (headers only): one Item per latent (a .npy / .npz member / .safetensors tensor,
         3-D or one row of a 4-D batch; NCHW or NHWC) or per image file; bad files -> failures
      -> plan: drop finished outputs (--skip-existing), group by shape, cut each group into
         global batches of G rows (G = --batch-size rounded up to a multiple of devices x
         --micro-batch; the last batch padded, padding rows thrown away)
      -> per batch: each host reads only its own rows -> one data-sharded jax.Array
         -> one jitted program per shape (shard_map: each device loops over its own rows,
            --micro-batch at a time): per-image noise from (seed, item identity), made on the
            device -> decode (tiled with --tile) -> images
         -> each host writes its rows: PNG (and .npy), temp file + os.replace
      -> summary from process 0 (counts, failures, images/s); exit status 1 if anything failed

Reproducibility: an item's noise is ``normal(fold_in(k, step))`` with
``k = fold_in(fold_in(key(seed), a), b)``, (a, b) the first 8 bytes of sha256(identity), identity
"rel[:key][:index]". It depends on nothing else, and each device decodes a fixed number of images
at a time (--micro-batch, default 1), so the same seed gives the same image, bit for bit, whatever
the batch size, device count, host count or the other inputs of the run.

Multi-host: every host lists and scans all inputs (headers only; inputs must be visible to every
host) and so computes the same plan (checked), then reads and writes only its own rows.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import io
import os
import re
import socket
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmjax import parallel, schedule, tiling
from cmjax.decoder import DecoderConfig, decode_latents

LATENT_SUFFIXES = (".npy", ".npz", ".safetensors")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
_TMP_MARK = ".tmp-"


class InputError(ValueError):
    """An input that cannot be decoded; the message says why (the caller names the file)."""


# ------------------------------------------------------------------------------------------------
# Options and results


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """What decode.py's flags set. ``batch_size`` is global (all devices of all hosts)."""

    output: Path
    timesteps: tuple[int, ...] = schedule.DEFAULT_TIMESTEPS
    batch_size: int = 8
    seed: int = 0
    dtype: str = "fp32"
    clip_denoised: bool = True
    layout: str | None = None  # None: detect by the 4-channel axis; "nchw" / "nhwc" to force
    save_npy: bool = False
    skip_existing: bool = False
    tile: int | None = None  # latent tile size; None: untiled
    tile_overlap: int | None = None  # latents; None: tiling.default_overlap(tile)
    micro_batch: int = 1  # images each device decodes at once; outputs depend on it (and nothing else)
    images: bool = False  # inputs are images: encode with the SD VAE first
    compare: bool = False  # also write input | SD GAN decoder | consistency decoder
    progress: bool = True


@dataclasses.dataclass
class Summary:
    """Counts over all hosts (``failures`` are this host's messages)."""

    decoded: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    programs: int = 0  # distinct compiled decode programs (one per input shape)
    failures: list[str] = dataclasses.field(default_factory=list)
    psnr: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # --compare, this host's

    @property
    def images_per_second(self) -> float:
        return self.decoded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"decoded {self.decoded} images ({self.skipped} skipped, {self.failed} failed) in "
                f"{self.seconds:.1f} s: {self.images_per_second:.2f} images/s, {self.programs} compiled "
                f"program{'s' if self.programs != 1 else ''}")


# ------------------------------------------------------------------------------------------------
# Inputs: discovery, scanning (headers), reading


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
    def name(self) -> str:
        """How messages name it: the file, plus [key] and [index]."""
        return str(self.source.path) + "".join(f"[{p}]" for p in (self.key, self.index) if p is not None)

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


def discover(inputs: Sequence[str], suffixes: Sequence[str]) -> tuple[list[Source], list[str]]:
    """Files, folders (recursively) and globs -> sources sorted by ``rel``, and error messages.

    A file reached twice (by two arguments) is kept once; an argument that matches nothing is an error.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    found, errors = [], []
    for arg in inputs:
        if glob.has_magic(arg):
            base = _glob_base(arg)
            matches = sorted(glob.glob(arg, recursive=True))
            files = [(Path(m), Path(m)) for m in matches if os.path.isfile(m) and m.lower().endswith(suffixes)]
            for m in matches:
                if os.path.isdir(m):
                    files += [(f, Path(m)) for f in _walk(Path(m), suffixes)]
            if not files:
                errors.append(f"{arg}: matches no {'/'.join(suffixes)} files")
            found += [Source(f, _rel(f, Path(base))) for f, _ in files]
        elif os.path.isdir(arg):
            files = _walk(Path(arg), suffixes)
            if not files:
                errors.append(f"{arg}: folder holds no {'/'.join(suffixes)} files")
            found += [Source(f, _rel(f, Path(arg))) for f in files]
        elif os.path.isfile(arg):
            if arg.lower().endswith(suffixes):
                found.append(Source(Path(arg), Path(arg).name))
            else:
                errors.append(f"{arg}: not a {'/'.join(suffixes)} file")
        else:
            errors.append(f"{arg}: no such file or folder")
    seen, sources = set(), []
    for s in sorted(found, key=lambda s: (s.rel, str(s.path))):
        real = os.path.realpath(s.path)
        if real not in seen:
            seen.add(real)
            sources.append(s)
    return sources, errors


def _glob_base(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = []
    for p in parts:
        if glob.has_magic(p):
            break
        fixed.append(p)
    return str(Path(*fixed)) if fixed else "."


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath, f) for f in filenames if f.lower().endswith(suffixes) and not f.startswith(".")]
    return out


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
    """(key, shape, dtype name) of each array in a latent file, reading headers only."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise InputError("not a .npy file (no NumPy header)")
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        return [(None, arr.shape, arr.dtype.name)]
    if suffix == ".npz":
        out = []
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    fmt = np.lib.format
                    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                    shape, _, dtype = read(f)
                out.append((name[:-4], shape, np.dtype(dtype).name))
        if not out:
            raise InputError("no arrays in this .npz file")
        return out
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            out = [(k, tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()]
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
        return [], [f"{source.path}: cannot read: {_reason(e)}"]
    items, errors = [], []
    for key, shape, dtype in headers:
        where = f"{source.path}" + (f"[{key}]" if key is not None else "")
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
    from PIL import Image

    try:
        with Image.open(source.path) as img:
            w, h = img.size
    except Exception as e:  # noqa: BLE001
        return [], [f"{source.path}: cannot read image: {_reason(e)}"]
    if h < factor or w < factor:
        return [], [f"{source.path}: image {w}x{h} is smaller than {factor}x{factor}"]
    return [Item(source, (h - h % factor, w - w % factor))], []


def _reason(e: BaseException) -> str:
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
        from cmjax.data import _to_rgb
        from PIL import Image

        with Image.open(item.source.path) as img:
            img.load()
            rgb = np.asarray(_to_rgb(img), np.uint8)
        h, w = item.shape
        top, left = (rgb.shape[0] - h) // 2, (rgb.shape[1] - w) // 2
        return rgb[top:top + h, left:left + w].astype(np.float32) / 127.5 - 1.0


def _read_safetensors(path: Path, key: str, index: int | None) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        if f.get_slice(key).get_dtype() != "BF16":
            sl = f.get_slice(key)
            return sl[index] if index is not None else sl[:]
    with safe_open(str(path), framework="flax") as f:  # NumPy has no bfloat16; JAX does
        arr = f.get_tensor(key)
        return np.asarray((arr[index] if index is not None else arr).astype(jnp.float32))


# ------------------------------------------------------------------------------------------------
# Noise and the jitted decode


def identity_key_data(identity: str) -> np.ndarray:
    """(2,) uint32: the first 8 bytes of sha256(identity), stable across runs, hosts and Pythons."""
    return np.frombuffer(hashlib.sha256(identity.encode("utf-8")).digest()[:8], ">u4").astype(np.uint32)


def item_noise(seed: int, key_data: jax.Array, steps: int, shape: tuple[int, int]) -> jax.Array:
    """Per-item noise (steps, B, H, W, 3) float32 from (B, 2) uint32 identity hashes; vmapped over
    items, so it is made where each item lives and does not depend on the batch it is in."""
    base = jax.random.key(seed)

    def one(d):
        k = jax.random.fold_in(jax.random.fold_in(base, d[0]), d[1])
        return jnp.stack([jax.random.normal(jax.random.fold_in(k, i), (*shape, 3), jnp.float32) for i in range(steps)])

    return jnp.moveaxis(jax.vmap(one)(key_data), 1, 0)


def noise_for(seed: int, identity: str, steps: int, shape: tuple[int, int]) -> np.ndarray:
    """The noise (steps, 1, H, W, 3) that a run with ``seed`` uses for the item named ``identity``."""
    return np.asarray(item_noise(seed, jnp.asarray(identity_key_data(identity)[None]), steps, shape))


def _decode_batch(params, latents, key_data, *, config: DecoderConfig, seed: int, timesteps: tuple[int, ...],
                  clip_denoised: bool, dtype, tile: int | None, overlap: int | None):
    """latents (B, h, w, C), key_data (B, 2) -> images (B, 8h, 8w, 3) float32."""
    f = config.upsample_factor
    noise = item_noise(seed, key_data, len(timesteps), (latents.shape[1] * f, latents.shape[2] * f))
    kw = dict(config=config, timesteps=timesteps, clip_denoised=clip_denoised, dtype=dtype)
    if tile is not None and tile < max(latents.shape[1:3]):
        return tiling.decode_latents_tiled(params, latents, noise, tile=tile, overlap=overlap, **kw)
    return decode_latents(params, latents, noise, **kw)


def _in_micro_batches(fn: Callable, micro_batch: int) -> Callable:
    """fn(params, x (m, ...), key_data (m, 2)) -> fn over (n, ...) rows, ``micro_batch`` rows at a time.

    XLA's kernels round differently for different batch sizes (~1e-6 after a decode), so each
    device runs one fixed-size program per micro-batch, in a loop: an image's pixels then depend on
    ``micro_batch`` alone, never on the global batch size or the number of devices or hosts.
    """
    def rows(params, x, key_data):
        n = x.shape[0]
        chunks = (x.reshape(n // micro_batch, micro_batch, *x.shape[1:]),
                  key_data.reshape(n // micro_batch, micro_batch, *key_data.shape[1:]))
        out = jax.lax.map(lambda c: fn(params, *c), chunks)
        return jax.tree.map(lambda o: o.reshape(n, *o.shape[2:]), out)

    return rows


def _sharded(rows_fn: Callable, mesh) -> Callable:
    """jit(shard_map(rows_fn)): params replicated, rows split over the data axis, each device
    working on its own rows (noise included) with no communication."""
    from jax.sharding import PartitionSpec as P

    data = P(parallel.DATA_AXIS)
    return jax.jit(jax.shard_map(rows_fn, mesh=mesh, in_specs=(P(), data, data), out_specs=data))


def make_decode_fn(config: DecoderConfig, options: DecodeOptions, mesh) -> Callable:
    """The jitted (params, latents (B, h, w, C), key_data (B, 2)) -> images (B, 8h, 8w, 3), batch
    sharded over ``mesh``'s data axis; B a multiple of devices x ``options.micro_batch``."""
    fn = functools.partial(_decode_batch, config=config, seed=options.seed, timesteps=tuple(options.timesteps),
                           clip_denoised=options.clip_denoised, dtype=DTYPES[options.dtype], tile=options.tile,
                           overlap=_overlap(options))
    return _sharded(_in_micro_batches(fn, options.micro_batch), mesh)


def _overlap(options: DecodeOptions) -> int | None:
    if options.tile is None:
        return None
    return tiling.default_overlap(options.tile) if options.tile_overlap is None else options.tile_overlap


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 = clip(round((x + 1) * 127.5), 0, 255)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Outputs


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
    from PIL import Image

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


def output_paths(item: Item, options: DecodeOptions) -> list[Path]:
    """Every file written for ``item``; it is finished when all exist."""
    base = options.output / item.stem
    paths = [base.with_name(base.name + ".png")]
    if options.save_npy:
        paths.append(base.with_name(base.name + ".npy"))
    if options.compare:
        paths.append(base.with_name(base.name + "_compare.png"))
    return paths


# ------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class _Batch:
    items: list[Item | None]  # this host's rows (None: padding)
    shape: tuple[int, int]
    count: int  # real items in the whole global batch


def plan_batches(items: Sequence[Item], global_batch: int, rows: np.ndarray) -> list[_Batch]:
    """Group by shape, cut each group into global batches (the last padded); keep this host's ``rows``."""
    groups: dict[tuple[int, int], list[Item]] = {}
    for item in items:
        groups.setdefault(item.shape, []).append(item)
    batches = []
    for shape in sorted(groups):
        group = groups[shape]
        for start in range(0, len(group), global_batch):
            chunk = group[start:start + global_batch]
            chunk = chunk + [None] * (global_batch - len(chunk))
            batches.append(_Batch([chunk[r] for r in rows], shape, len(group[start:start + global_batch])))
    return batches


def _host_sum(values: Sequence[int]) -> np.ndarray:
    """Sum small per-host integer vectors over all processes."""
    values = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), -1).sum(0)


def _check_same_plan(items: Sequence[Item]) -> None:
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = hashlib.sha256("\n".join(f"{i.identity}|{i.shape}" for i in items).encode()).digest()[:8]
    all_digests = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.uint32)))
    if not (all_digests == all_digests.reshape(jax.process_count(), -1)[0]).all():
        raise RuntimeError("the hosts see different inputs: every host must see the same files")


def run(decoder, inputs: Sequence[str], options: DecodeOptions, *, mesh=None, vae=None,
        log: Callable[[str], None] | None = None) -> Summary:
    """Decode every input into ``options.output``; returns the Summary (counts over all hosts).

    ``decoder``: a cmjax Decoder (params anywhere; they are replicated over ``mesh``). ``vae``: the
    SD VAE, needed for ``options.images``. ``mesh``: default a 1-D mesh over all devices.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    mesh = parallel.make_mesh() if mesh is None else mesh
    lead = jax.process_index() == 0
    local_fail = []

    def fail(msg: str) -> None:
        local_fail.append(msg)
        (log or (lambda m: tqdm.write(m, file=sys.stderr)))(f"error: {msg}")

    if options.images and vae is None:
        raise ValueError("--images needs the SD VAE (--vae)")
    config = decoder.config
    suffixes = IMAGE_SUFFIXES if options.images else LATENT_SUFFIXES
    sources, errors = discover(inputs, suffixes)
    items, scan_errors = [], list(errors)
    for src in sources:
        found, errs = (scan_image(src, config.upsample_factor) if options.images
                       else scan_latents(src, options.layout, config.latent_channels))
        items += found
        scan_errors += errs
    items, clash_errors = _drop_clashes(items, options, {os.path.realpath(s.path) for s in sources})
    scan_errors += clash_errors
    if lead:  # every host saw the same scan errors: report (and count) them once
        for msg in scan_errors:
            fail(msg)
    if options.skip_existing:
        done = np.array([all(p.exists() for p in output_paths(i, options)) for i in items], np.int32)
        done = _host_sum(done) > 0  # finished on any host (hosts may not share a filesystem)
        skipped = int(done.sum())
        items = [i for i, d in zip(items, done) if not d]
    else:
        skipped = 0
    remove_stale_temps(options.output)
    _check_same_plan(items)

    unit = mesh.size * options.micro_batch
    global_batch = -(-max(options.batch_size, 1) // unit) * unit
    rows = parallel.process_rows(mesh, global_batch)
    batches = plan_batches(items, global_batch, rows)
    params = _replicated(decoder.params, mesh)
    if options.images:
        params = {"decoder": params, "vae": _replicated(vae.params, mesh)}
        step = make_images_fn(decoder, vae, options, mesh)
    else:
        step = make_decode_fn(config, options, mesh)
    reader = Reader()
    summary = Summary(skipped=skipped)
    bar = tqdm(total=len(items), unit="img", disable=not (lead and options.progress), file=sys.stderr,
               dynamic_ncols=True)
    decoded = 0
    pending = None
    for batch in batches:
        arrays, ok = _read_batch(batch, reader, options, config, fail)
        key_data = np.stack([identity_key_data(i.identity) if i is not None else np.zeros(2, np.uint32)
                             for i in batch.items])
        out = step(params, parallel.global_batch(arrays, mesh), parallel.global_batch(key_data, mesh))
        if pending is not None:
            decoded += _finish(*pending, options, summary, fail)
            bar.update(pending[0].count)
        pending = (batch, ok, out)
    if pending is not None:
        decoded += _finish(*pending, options, summary, fail)
        bar.update(pending[0].count)
    bar.close()

    summary.programs = step._cache_size() if hasattr(step, "_cache_size") else 0
    n_decoded, n_failed = _host_sum([decoded, len(local_fail)])
    summary.decoded, summary.failed = int(n_decoded), int(n_failed)
    summary.failures = local_fail
    summary.seconds = time.perf_counter() - start
    return summary


def _replicated(tree: Any, mesh) -> Any:
    """Params replicated over ``mesh``; no copy when they already are (e.g. loaded that way)."""
    target = parallel.replicated(mesh)
    leaves = jax.tree.leaves(tree)
    if all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim) for x in leaves):
        return tree
    return parallel.put_replicated(tree, mesh)


def _drop_clashes(items: list[Item], options: DecodeOptions, input_paths: set[str]) -> tuple[list[Item], list[str]]:
    """Items whose output names are taken (by an earlier item, or by an input file) become errors."""
    owner: dict[str, Item] = {}
    kept, errors = [], []
    for item in items:
        paths = output_paths(item, options)
        clash = next((owner[str(p)] for p in paths if str(p) in owner), None)
        if clash is not None:
            errors.append(f"{item.name}: output {paths[0]} is also the output of {clash.name}; rename one")
        elif any(os.path.realpath(p) in input_paths for p in paths):
            errors.append(f"{item.name}: output {paths[0]} would overwrite an input; choose another --output")
        else:
            owner.update({str(p): item for p in paths})
            kept.append(item)
    return kept, errors


def _read_batch(batch: _Batch, reader: Reader, options: DecodeOptions, config: DecoderConfig,
                fail: Callable[[str], None]) -> tuple[np.ndarray, list[bool]]:
    """This host's rows as one array (zeros for padding and unreadable rows) and which rows are good."""
    h, w = batch.shape
    shape = (h, w, 3) if options.images else (h, w, config.latent_channels)
    arrays = np.zeros((len(batch.items), *shape), np.float32)
    ok = []
    for r, item in enumerate(batch.items):
        if item is None:
            ok.append(False)
            continue
        try:
            arrays[r] = reader.image(item) if options.images else reader.latent(item)
            ok.append(True)
        except Exception as e:  # noqa: BLE001 - one bad input must not stop the others
            fail(f"{item.name}: {_reason(e)}")
            ok.append(False)
    return arrays, ok


def _finish(batch: _Batch, ok: list[bool], out: Any, options: DecodeOptions, summary: Summary,
            fail: Callable[[str], None]) -> int:
    """Fetch this host's rows of a finished batch and write them; returns how many were written."""
    if isinstance(out, tuple):  # --images: (consistency, gan, inputs)
        images, extra = parallel.local_rows(out[0]), [parallel.local_rows(o) for o in out[1:]]
    else:
        images, extra = parallel.local_rows(out), None
    written = 0
    for r, (item, good) in enumerate(zip(batch.items, ok)):
        if not good:
            continue
        try:
            paths = output_paths(item, options)
            if options.save_npy:
                write_npy(paths[1], images[r])
            if options.compare and extra is not None:
                _write_compare(item, paths[-1], extra[1][r], extra[0][r], images[r], summary)
            write_png(paths[0], to_uint8(images[r]))  # last: its presence marks the item finished
            written += 1
        except Exception as e:  # noqa: BLE001
            fail(f"{item.name}: cannot write output: {_reason(e)}")
    return written


def _write_compare(item: Item, path: Path, original, gan, consistency, summary: Summary) -> None:
    """input | SD GAN decoder | consistency decoder, side by side; PSNRs against the input printed."""
    psnr_gan = tiling.psnr(np.clip(gan, -1, 1), original)
    psnr_cd = tiling.psnr(np.clip(consistency, -1, 1), original)
    summary.psnr.setdefault("gan", []).append(psnr_gan)
    summary.psnr.setdefault("consistency", []).append(psnr_cd)
    from tqdm import tqdm

    tqdm.write(f"{item.name}: PSNR SD GAN decoder {psnr_gan:.2f} dB, consistency decoder {psnr_cd:.2f} dB")
    write_png(path, np.concatenate([to_uint8(original), to_uint8(gan), to_uint8(consistency)], axis=1))


def make_images_fn(decoder, vae, options: DecodeOptions, mesh) -> Callable:
    """Jitted ({"decoder", "vae"} params, images (B, H, W, 3) in [-1, 1], key_data) -> (consistency,
    gan, images), each (B, H, W, 3) float32: the images are encoded (posterior mean) by the SD VAE
    encoder, decoded by the consistency decoder and, with --compare, by the VAE's GAN decoder."""
    from cmjax import vae as vae_lib

    dtype = DTYPES[options.dtype]
    decode_fn = functools.partial(_decode_batch, config=decoder.config, seed=options.seed,
                                  timesteps=tuple(options.timesteps), clip_denoised=options.clip_denoised,
                                  dtype=dtype, tile=options.tile, overlap=_overlap(options))

    def encode_decode(params, images, key_data):
        latents = vae_lib.encode_latents(params["vae"], images, config=vae.config, dtype=dtype)
        consistency = decode_fn(params["decoder"], latents, key_data)
        gan = (vae_lib.decode_latents_gan(params["vae"], latents, config=vae.config, dtype=dtype)
               if options.compare else jnp.zeros_like(images))
        return consistency, gan, images

    return _sharded(_in_micro_batches(encode_decode, options.micro_batch), mesh)


# ------------------------------------------------------------------------------------------------
# decode.py


DEFAULT_VAE = "openai/consistency-decoder"  # the Hub repo bundles the SD encoder (not the GAN decoder)


def _lead_first(fetch: Callable[[bool], Any]) -> Any:
    """``fetch(lead)`` on process 0 first, then on the others (which then find its download or
    conversion in the cache instead of racing it); the plain call on a single host."""
    lead = jax.process_index() == 0
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if lead:
            fetch(True)
        multihost_utils.sync_global_devices("cmjax checkpoint fetch")
    return fetch(lead)


def _report(lead: bool):
    return (lambda m: print(m, file=sys.stderr)) if lead else None


def load_decoder_checkpoint(name_or_path: str, mesh=None):
    """A cmjax Decoder from a checkpoint folder, a PyTorch checkpoint or a name ("openai"), via
    ``cmjax.convert.download.resolve_checkpoint`` (download + conversion on first use)."""
    from cmjax.checkpoint import load_decoder

    try:
        from cmjax.convert.download import resolve_checkpoint
    except ImportError:  # no downloader in this cmjax: a checkpoint folder only
        def resolve_checkpoint(path, **_):
            return Path(path)
    path = _lead_first(lambda lead: resolve_checkpoint(name_or_path, progress=lead, report=_report(lead)))
    return load_decoder(path, sharding=parallel.replicated(mesh) if mesh is not None else None)


def load_vae_checkpoint(name_or_path: str, mesh=None):
    """The SD VAE for --images: a cmjax VAE checkpoint folder; PyTorch weights converted in memory (a
    diffusers AutoencoderKL or ConsistencyDecoderVAE folder or file, an LDM checkpoint); or the Hub
    repo "openai/consistency-decoder", whose bundled SD encoder is fetched (encoder only: no --compare)."""
    from cmjax import checkpoint

    if (Path(name_or_path) / checkpoint.CONFIG_FILE).is_file():
        return checkpoint.load_vae(name_or_path, sharding=parallel.replicated(mesh) if mesh is not None else None)
    from cmjax.convert.vae import load_pytorch_vae

    if not Path(name_or_path).exists() and name_or_path == DEFAULT_VAE:
        from cmjax.convert.download import fetch_hub_decoder

        name_or_path = _lead_first(lambda lead: fetch_hub_decoder(DEFAULT_VAE, progress=lead, report=_report(lead)))
    return load_pytorch_vae(name_or_path)


def options_from_args(args) -> DecodeOptions:
    """DecodeOptions from decode.py's argparse namespace; raises ValueError on bad combinations."""
    if args.timesteps:
        timesteps = schedule.check_timesteps(int(t) for t in args.timesteps.split(","))
    elif args.steps is not None:
        timesteps = schedule.timesteps_for_steps(args.steps)
    else:
        timesteps = schedule.DEFAULT_TIMESTEPS
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    if args.tile is not None and args.tile < 1:
        raise ValueError(f"--tile must be >= 1, got {args.tile}")
    if args.tile_overlap is not None and (args.tile is None or not 0 <= args.tile_overlap < args.tile):
        raise ValueError("--tile-overlap needs --tile and must lie in [0, tile)")
    if args.compare and not args.images:
        raise ValueError("--compare needs --images")
    return DecodeOptions(output=Path(args.output), timesteps=tuple(timesteps), batch_size=args.batch_size,
                         seed=args.seed, micro_batch=args.micro_batch, dtype=args.dtype, clip_denoised=args.clip,
                         layout=args.layout,
                         save_npy=args.save_npy, skip_existing=args.skip_existing, tile=args.tile,
                         tile_overlap=args.tile_overlap, images=args.images, compare=args.compare,
                         progress=not args.no_progress)


def main(args) -> int:
    """decode.py: set up (multi-host, mesh, checkpoints), run, print the summary. Returns the exit status:
    0 when every input was decoded, 1 when any failed, 2 on a usage or checkpoint error."""
    try:
        options = options_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    mesh = parallel.make_mesh()
    lead = jax.process_index() == 0
    try:
        decoder = load_decoder_checkpoint(args.checkpoint, mesh)
        vae = None
        if options.images:
            if options.compare and not args.vae:
                raise ValueError("--compare needs --vae: an SD VAE with its GAN decoder (a cmjax VAE checkpoint, "
                                 "a diffusers AutoencoderKL folder or an LDM checkpoint)")
            vae = load_vae_checkpoint(args.vae or DEFAULT_VAE, mesh)
            if options.compare and "decoder" not in vae.parts:
                raise ValueError(f"--compare needs the SD GAN decoder, and {args.vae} holds only the encoder")
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if lead:
        print(f"{jax.device_count()} device(s) on {jax.process_count()} host(s); timesteps "
              f"{options.timesteps}; {options.dtype}", file=sys.stderr)
    summary = run(decoder, args.inputs, options, mesh=mesh, vae=vae)
    if lead:
        if summary.psnr:
            means = {k: float(np.mean(v)) for k, v in summary.psnr.items()}
            print(f"mean PSNR over this host's images: SD GAN decoder {means['gan']:.2f} dB, "
                  f"consistency decoder {means['consistency']:.2f} dB")
        print(summary.line())
    return 1 if summary.failed else 0
