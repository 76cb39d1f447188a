"""The checkpoint formats: a directory with the params (orbax) and the config (JSON).

    DIR/cmjax.json   {"format": "cmjax-decoder", "version": 1, "config": {...}, "source": "...",
                      "params_sha256": "..."}
    DIR/params/      orbax StandardCheckpointer tree of float arrays (Flax param names, HWIO kernels)

``params_sha256`` is a digest of the params (names, dtypes, shapes, bytes) taken when the checkpoint
is written and checked when it is loaded, so flipped bytes in a data file are refused instead of
decoding to wrong pixels (``verify=False`` skips it; checkpoints written before it have none).
A checkpoint that passed the check (or that cmjax just wrote) is noted in the cache
(``cmjax.cache``: ``verified/``) with each data file's size, modification and change times and
inode; a later read of the same files, none of them touched since (any write or ``touch``, even
one that puts the old modification time back, changes the change time), by the same cmjax, skips
the hashing (seconds for the 2.5 GB decoder). What that cannot see is a byte changed without the
file system knowing (a failing disk); ``CMJAX_REHASH=1`` hashes every time.

The SD VAE uses the same layout with format "cmjax-vae" and one more field, "parts": the halves
present (["encoder", "decoder"], or ["encoder"] for the encoder bundled with a consistency decoder).

Writes go to a temporary sibling directory that is renamed onto DIR only when complete, so a failed
or interrupted save never leaves a half-written checkpoint behind. An existing DIR is replaced only
when asked (``overwrite``) and only when it is what cmjax wrote (a checkpoint: cmjax.json and
params/, nothing else), never an input of the command, a folder holding one, or a symbolic link.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cmjax import cache, parallel
from cmjax.files import atomic_write, read_small
from cmjax.models import vae as vae_lib
from cmjax.models.decoder_config import Decoder, DecoderConfig, abstract_params
from cmjax.weights.errors import CheckpointError, parse_json

FORMAT = "cmjax-decoder"
VAE_FORMAT = "cmjax-vae"
VERSION = 1
CONFIG_FILE = "cmjax.json"
PARAMS_DIR = "params"


class DestinationExists(FileExistsError):
    """DST exists and ``overwrite`` was not asked for: a usage error (the CLIs exit 2)."""


class OverwriteRefused(FileExistsError):
    """DST exists and may not be replaced even with ``overwrite``; the message names it and says why
    (one line; the CLIs exit 1)."""


@dataclasses.dataclass(frozen=True)
class Written:
    """A kind of folder cmjax writes, as ``--overwrite`` recognises one it may replace: ``marker``
    (a JSON object whose "format" is one of ``formats``; any object when empty) and nothing at the
    top level but ``entries``."""

    what: str
    marker: str
    formats: tuple[str, ...]
    entries: frozenset[str]


CHECKPOINT = Written("a cmjax checkpoint", CONFIG_FILE, (FORMAT, VAE_FORMAT), frozenset({CONFIG_FILE, PARAMS_DIR}))
_MAX_MARKER = 1 << 20


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _why_not_ours(dst: Path, kind: Written) -> str | None:
    """Why the existing folder ``dst`` is not one ``kind`` describes, or None if it is (or is empty)."""
    names = sorted(os.listdir(dst))
    if not names:
        return None
    other = [n for n in names if n not in kind.entries]
    if other:
        return (f"it holds files cmjax did not write ({', '.join(repr(n) for n in other[:3])}"
                f"{', ...' if len(other) > 3 else ''})")
    marker = dst / kind.marker
    st = os.lstat(marker) if os.path.lexists(marker) else None
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MARKER:
        return f"it is not {kind.what} (no {kind.marker})"
    try:
        meta = parse_json(marker.read_bytes(), str(marker))
    except (CheckpointError, OSError):
        meta = None
    if not isinstance(meta, dict) or (kind.formats and meta.get("format") not in kind.formats):
        return f"it is not {kind.what} ({kind.marker} does not say so)"
    return None


def check_destination(dst: str | os.PathLike, *, overwrite: bool, kind: Written = CHECKPOINT,
                      protect: Sequence[str | os.PathLike] = ()) -> None:
    """Raise DestinationExists or OverwriteRefused (one line naming ``dst``) unless ``dst`` may be
    written. Every writer checks this before reading or downloading anything.

    A missing ``dst`` may; an existing one only with ``overwrite``, and then only a folder that
    is ``kind`` (or empty), that is none of the inputs ``protect``, holds none and lies inside
    none. A symbolic link never is: cmjax does not write through links.
    """
    dst = Path(dst)
    if os.path.islink(dst):
        raise OverwriteRefused(f"{dst}: is a symbolic link; not written through (name a folder, not a link)")
    if not os.path.lexists(dst):
        return
    if not overwrite:
        raise DestinationExists(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    real = os.path.realpath(dst)
    for src in protect:
        src_real = os.path.realpath(src)
        if src_real == real:
            raise OverwriteRefused(f"{dst}: not replaced: it is the input {src} itself")
        if _inside(src_real, real):
            raise OverwriteRefused(f"{dst}: not replaced: it holds the input {src}")
        if _inside(real, src_real):
            raise OverwriteRefused(f"{dst}: not replaced: it lies inside the input {src}")
    if not dst.is_dir():
        raise OverwriteRefused(f"{dst}: not replaced: a file, not {kind.what} (--overwrite replaces only "
                               "a folder cmjax wrote)")
    why = _why_not_ours(dst, kind)
    if why is not None:
        raise OverwriteRefused(f"{dst}: not replaced: {why}; --overwrite replaces only {kind.what}")


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False, *, kind: Written = CHECKPOINT,
                     protect: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory next to ``dst``; rename it to ``dst`` if the block succeeds.

    ``dst`` is checked by :func:`check_destination` before and again just before the rename; an
    old ``dst`` is moved aside, the new one renamed in, and only then the old one deleted. On any
    exception the temporary directory is removed and ``dst`` is untouched.
    """
    dst = Path(dst).absolute()
    check_destination(dst, overwrite=overwrite, kind=kind, protect=protect)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name[:40]}.tmp-", dir=dst.parent))
    try:
        yield tmp
        check_destination(dst, overwrite=overwrite, kind=kind, protect=protect)
        if not os.path.lexists(dst):
            os.replace(tmp, dst)
            return
        old = tempfile.mkdtemp(prefix=f".{dst.name[:40]}.old-", dir=dst.parent)
        os.replace(dst, old)  # a folder renamed onto an empty one: atomic, links inside untouched
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        _remove_tree(tmp)
        raise


def _remove_tree(path: Path, quiet: float = 1.0, limit: float = 30.0) -> None:
    """Delete ``path`` even while a writer's thread that failed (orbax's, on a full disk) is still
    creating files in it: rmtree can find a folder that is not empty, and a late write can create
    the folder again after it was gone. Done once it has stayed gone for ``quiet`` seconds (or
    after ``limit`` seconds)."""
    start = gone_since = time.monotonic()
    while time.monotonic() - start < limit:
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= quiet:
            return
        time.sleep(0.05)


def _params_checkpointer() -> ocp.Checkpointer:
    """A synchronous orbax checkpointer for a params tree of host (NumPy) or jax arrays.

    Two departures from StandardCheckpointer's defaults, both for converting multi-GB weights:
    NumPy arrays are written in place (orbax otherwise deep-copies every host array first, in
    case an async save races with a mutation; this save is synchronous), and chunks are not
    compressed (zstd saves ~10% on float weights but makes tensorstore hold a second copy of
    everything: saving the 2.5 GB decoder took 19 s and +1.9 GB with it, 2.8 s and +0.1 GB
    without). The layout is orbax's usual one and StandardCheckpointer restores it as before.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))


DIGEST_KEY = "params_sha256"


def params_digest(params: Any) -> str | None:
    """SHA-256 over every leaf's path, shape and values as float32 bytes, in path order.

    float32 because a checkpoint stored in fp16/bf16 (``--keep-dtype``) is restored as float32:
    the upcast is exact, so both sides hash the same bytes. None when a leaf is not fully
    addressable from this process (a multi-host array): the digest needs every byte on one host.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if any(isinstance(v, jax.Array) and not v.is_fully_addressable for _, v in leaves):
        return None
    h = hashlib.sha256()
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(leaf)
        if jnp.issubdtype(a.dtype, jnp.floating):
            a = a.astype(np.float32, copy=False)
        a = np.ascontiguousarray(a)
        h.update(f"{jax.tree_util.keystr(path)} {a.shape}\n".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def _is_orbax_noise(unraisable) -> bool:
    return isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)


def _drop_unretrieved_tasks(record: logging.LogRecord) -> bool:
    """asyncio logs "Task exception was never retrieved" (with the task's traceback) when a failed
    orbax writer task is garbage-collected, often after the save has returned or at exit."""
    return "exception was never retrieved" not in record.getMessage()


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Keep orbax's failure noise off stderr while saving: its absl ERROR logs (each with a writer
    thread's traceback), the "Event loop is closed" errors its writer threads raise into
    callbacks after a failed write (~100 tracebacks for one full disk) and asyncio's logs of its
    failed writer tasks. The exception the save raises says what went wrong. After a failure the
    filters stay installed: that noise keeps arriving after the save has returned."""
    absl, tasks = logging.getLogger("absl"), logging.getLogger("asyncio")
    level, hook = absl.level, sys.unraisablehook
    absl.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda u: None if _is_orbax_noise(u) else hook(u)
    tasks.addFilter(_drop_unretrieved_tasks)
    failed = True
    try:
        yield
        failed = False
    finally:
        absl.setLevel(level)
        if not failed:
            sys.unraisablehook = hook
            tasks.removeFilter(_drop_unretrieved_tasks)


# ------------------------------------------------------------------------------------------------
# Checked before: the digest is not taken again for files nobody has touched since

VERIFIED_DIR = "verified"  # under cmjax.cache.cache_dir(): one small JSON file per checkpoint
REHASH_ENV = "CMJAX_REHASH"  # "1": hash the params on every read
_MAX_SEEN_FILES = 10_000  # a params folder with more entries is hashed every time, not recorded


@dataclasses.dataclass(frozen=True)
class _Seen:
    """A checkpoint's files as they were before its params were read: the SHA-256 of its cmjax.json
    (the config and the expected digest) and, for every entry under params/, (name, type, size,
    modification and change times in ns, device, inode), with the cmjax source that checks them.
    ``checked()``: these very files were checked (digest and shapes) before; ``remember()``: they
    now have been (a note in the cache; nothing when it cannot be written)."""

    stamp: Path
    record: dict

    @classmethod
    def now(cls, path: Path) -> "_Seen | None":
        """None when the files cannot be listed, are too many, or CMJAX_REHASH=1."""
        if os.environ.get(REHASH_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            return None
        try:
            entries = []
            for i, p in enumerate(sorted((path / PARAMS_DIR).rglob("*"))):
                if i >= _MAX_SEEN_FILES:
                    return None
                st = p.lstat()
                entries.append([str(p.relative_to(path)), stat.S_IFMT(st.st_mode), st.st_size,
                                st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino])
            meta = hashlib.sha256(read_small(path / CONFIG_FILE)).hexdigest()
        except (OSError, ValueError):
            return None
        record = {"checkpoint": str(path), "cmjax": cache.source_digest(), "meta": meta, "files": entries}
        name = hashlib.sha256(str(path).encode(errors="surrogateescape")).hexdigest()[:32]
        return cls(cache.cache_dir() / VERIFIED_DIR / f"{name}.json", record)

    def checked(self) -> bool:
        try:
            return json.loads(read_small(self.stamp)) == self.record
        except (OSError, ValueError):
            return False

    def remember(self) -> None:
        data = json.dumps(self.record).encode()
        with contextlib.suppress(OSError):
            atomic_write(self.stamp, lambda f: f.write(data))


def _shapes(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [(jax.tree_util.keystr(k), tuple(v.shape)) for k, v in jax.tree_util.tree_leaves_with_path(tree)]


def _save(meta: dict, params: Any, dst: str | os.PathLike, overwrite: bool, protect: Sequence,
          remember: bool = True) -> Path:
    """Write the checkpoint; ``remember``: note it as checked (``_Seen``): its params are what its
    config makes (a decoder's are compared with the config's shapes first; a VAE is read with its
    config's shapes as the target, which checks them on every read)."""
    check_destination(dst, overwrite=overwrite, protect=protect)  # before hashing gigabytes
    with ThreadPoolExecutor(1, thread_name_prefix="cmjax-digest") as pool:
        digest = pool.submit(params_digest, params)  # hashed while orbax writes (both release the GIL)
        with atomic_directory(dst, overwrite, protect=protect) as tmp:
            try:
                with quiet_orbax(), _params_checkpointer() as ckptr:
                    ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
            except Exception as e:  # orbax/TensorStore raise ValueError, OSError, ... for a full disk
                # TensorStore's text names temporary files; what the user needs is its tail ("No space left ...")
                reason = _first_line(e, tail='": ')
                raise CheckpointError(f"{dst}: cannot write the checkpoint, nothing was written ({reason})") from e
            if digest.result() is not None:
                meta = {**meta, DIGEST_KEY: digest.result()}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if remember and DIGEST_KEY in meta and (seen := _Seen.now(Path(dst).absolute())) is not None:
        seen.remember()  # written from these very params: the next read need not hash them
    return Path(dst)


def _first_line(e: BaseException, tail: str | None = None) -> str:
    """An exception as one short line (with ``tail``: only what follows its last occurrence)."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    return line.rsplit(tail, 1)[-1][:400] if tail else f"{type(e).__name__}: {line[:400]}"


def _read_meta(path: str | os.PathLike, fmt: str, what: str) -> dict:
    """The checked cmjax.json of a checkpoint directory of format ``fmt``."""
    meta_path = Path(path) / CONFIG_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a cmjax {what} checkpoint (no {CONFIG_FILE}); "
                              "convert PyTorch weights first with `python -m cmjax.convert SRC DST`")
    try:
        text = read_small(meta_path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    meta = parse_json(text, str(meta_path))
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != fmt:
        raise CheckpointError(f"{meta_path}: field format is {str(meta.get('format'))[:60]!r}, not {fmt!r}")
    version = meta.get("version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{meta_path}: field version must be a positive integer, got {str(version)[:40]!r}")
    if version > VERSION:
        raise CheckpointError(f"{meta_path}: version {version} is newer than this cmjax reads ({VERSION})")
    digest = meta.get(DIGEST_KEY)
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise CheckpointError(f"{meta_path}: field {DIGEST_KEY} is not a SHA-256 hex digest")
    if "config" not in meta:
        raise CheckpointError(f"{meta_path}: field config is missing")
    return meta


def _restore(path: Path, target: Any, sharding: Any, meta: dict, verify: bool) -> Any:
    """Restore the params laid out like ``target``; check them against the recorded digest."""
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing (the checkpoint has no params)")
    verify = verify and DIGEST_KEY in meta  # nothing recorded: nothing to check, nothing to remember
    seen = _Seen.now(path) if verify else None  # before reading: what was read is at most this new
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(params_dir, parallel.shapes_with(target, sharding))
        except Exception as e:  # orbax/TensorStore raise many types for missing or cut data files
            raise CheckpointError(f"{params_dir}: cannot read the params: missing, truncated or not "
                                  f"matching the recorded config ({_first_line(e)})") from e
    if verify and not (seen is not None and seen.checked()):
        _check_digest(params_dir, params, meta.get(DIGEST_KEY), seen)
    return params


def _check_digest(params_dir: Path, params: Any, expected: str | None, seen: _Seen | None) -> None:
    """Hash ``params`` and compare with ``expected`` (nothing to compare: None); ``seen``, when
    given, is remembered as checked once they match."""
    got = params_digest(params) if expected is not None else None
    if got is not None and got != expected:
        raise CheckpointError(f"{params_dir}: params do not match the digest recorded in {CONFIG_FILE} "
                              "(data files modified or corrupted); load with verify=False to skip the check")
    if got is not None and seen is not None:
        seen.remember()


class Loading:
    """A decoder checkpoint being read in a background thread, so that a program can be loaded or
    compiled meanwhile (from ``config`` and ``abstract()``: the params' shapes and dtypes).

    The read starts at once, laid out as orbax's own metadata says (no trace of the network
    needed); the params are checked against the config's shapes and the recorded digest after
    it, while the caller decodes. ``decoder()`` waits for the params (raising what
    :func:`read_decoder` would for unreadable data); ``check()`` waits for the checks (hashing
    2.5 GB takes seconds): call it before writing anything computed from the params.
    ``Loading.done(decoder)``: one already in memory.
    """

    def __init__(self, config: DecoderConfig, params: Future, checked: Future, abstract: Any = None):
        self.config = config
        self._params, self._checked, self._decoder = params, checked, None
        self._abstract, self._lock = abstract, threading.Lock()
        self._put: Callable[[], Any] | None = None  # converted(): puts the in-memory params on the devices

    @classmethod
    def start(cls, path: str | os.PathLike, *, sharding: Any = None, verify: bool = True) -> "Loading":
        path = Path(path).absolute()
        meta = _read_meta(path, FORMAT, "decoder")
        config = read_config(path)
        pool = ThreadPoolExecutor(1, thread_name_prefix="cmjax-read")  # one thread: these run in order
        seen = pool.submit(lambda: _Seen.now(path) if verify and DIGEST_KEY in meta else None)  # before reading
        params = pool.submit(lambda: _restore(path, _stored_layout(path / PARAMS_DIR), sharding, meta, False))
        loading = cls(config, params, Future())
        expected = meta.get(DIGEST_KEY) if verify else None
        loading._checked = pool.submit(loading._check, path / PARAMS_DIR, expected, seen)
        pool.shutdown(wait=False)
        return loading

    @classmethod
    def done(cls, decoder: Decoder) -> "Loading":
        params, checked = Future(), Future()
        params.set_result(decoder.params)
        checked.set_result(None)
        loading = cls(decoder.config, params, checked, jax.tree.map(_shape_of, decoder.params))
        loading._decoder = decoder
        return loading

    @classmethod
    def converted(cls, decoder: Decoder, *, sharding: Any = None) -> "Loading":
        """A decoder just converted, its params (NumPy) still in memory: put on the devices (with
        ``sharding``) by ``decoder()``, which drops the NumPy copy."""
        held = [decoder.params]

        def put() -> Any:
            return jax.device_put(held.pop(), sharding)

        params, checked = Future(), Future()
        checked.set_result(None)
        loading = cls(decoder.config, params, checked, jax.tree.map(_shape_of, decoder.params))
        loading._put = put
        return loading

    def abstract(self) -> Any:
        """The params' shapes and dtypes as the config says (``jax.ShapeDtypeStruct`` leaves; made once)."""
        with self._lock:
            if self._abstract is None:
                self._abstract = abstract_params(self.config)
            return self._abstract

    def decoder(self) -> Decoder:
        if self._decoder is None:
            self._decoder = Decoder(self.config, self._params.result() if self._put is None else self._put())
        return self._decoder

    def check(self) -> None:
        self._checked.result()

    def _check(self, params_dir: Path, expected: str | None, seen: Future) -> None:
        params, seen = self._params.result(), seen.result()
        if seen is not None and seen.checked():  # these files passed both checks before
            return
        want, got = _shapes(self.abstract()), _shapes(params)
        if want != got:
            diff = sorted(set(want) ^ set(got))[:3]
            raise CheckpointError(f"{params_dir}: the params do not match the recorded config ({len(got)} arrays "
                                  f"where the config makes {len(want)}; differing: {diff})")
        _check_digest(params_dir, params, expected, seen)


def _stored_layout(params_dir: Path) -> Any:
    """The params' tree, shapes and dtypes as orbax recorded them (floats as float32, as the params are
    read); CheckpointError when there is no readable metadata."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(params_dir)
    except Exception as e:  # noqa: BLE001 - missing or damaged metadata files
        raise CheckpointError(f"{params_dir}: cannot read the params' metadata ({_first_line(e)})") from e
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)  # orbax's TreeMetadata wraps the plain nested dicts
    layout = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, jnp.float32 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype), stored)
    _check_declared_size(params_dir, layout)
    return layout


def _check_declared_size(params_dir: Path, layout: Any) -> None:
    """Refuse metadata that declares far more params than the data files hold (nothing allocated):
    read as declared, a forged shape would make the restore allocate it before the config check.
    The bound, 4x the files' bytes + 64 MiB, leaves room for float16 stored and float32 read, and
    for compression."""
    declared = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(layout))
    held = sum(p.stat().st_size for p in params_dir.rglob("*") if p.is_file() and not p.is_symlink())
    if declared > 4 * held + (64 << 20):
        raise CheckpointError(f"{params_dir}: the metadata declares {declared / 2 ** 30:.1f} GiB of params, "
                              f"the data files hold {held / 2 ** 30:.2f} GiB: not reading it")


def _shape_of(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def save_decoder(decoder: Decoder, dst: str | os.PathLike, *, source: str = "", overwrite: bool = False,
                 protect: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``decoder`` to the checkpoint directory ``dst`` atomically. Returns the path.

    ``overwrite``: replace an existing ``dst`` that is a cmjax checkpoint, never one of the inputs
    ``protect`` or a folder holding one (see :func:`check_destination`)."""
    meta = {"format": FORMAT, "version": VERSION, "config": decoder.config.to_dict(), "source": source}
    fits = _shapes(decoder.params) == _shapes(abstract_params(decoder.config))
    return _save(meta, decoder.params, dst, overwrite, protect, remember=fits)


def read_config(path: str | os.PathLike) -> DecoderConfig:
    """The DecoderConfig recorded in checkpoint directory ``path`` (every field checked)."""
    meta = _read_meta(path, FORMAT, "decoder")
    try:
        return DecoderConfig.from_dict(meta["config"], where=str(Path(path) / CONFIG_FILE), prefix="config.")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_decoder(path: str | os.PathLike, *, sharding: Any = None, verify: bool = True) -> Decoder:
    """Read a decoder (config + params) from a checkpoint directory written by ``save_decoder``.

    Only directories: names and PyTorch files are resolved by :func:`cmjax.weights.hub.load_decoder`
    (``cmjax.load_decoder``), which calls this.
    ``sharding``: an optional ``jax.sharding.Sharding`` for every param (e.g. replicated over a
    mesh); by default params land on the default device.
    ``verify``: check the params against the digest recorded when the checkpoint was written
    (hashes every byte once, a few seconds for the 2.5 GB decoder); False skips it.
    """
    path = Path(path).absolute()
    meta = _read_meta(path, FORMAT, "decoder")
    config = read_config(path)
    return Decoder(config, _restore(path, abstract_params(config), sharding, meta, verify))


def save_vae(vae: vae_lib.VAE, dst: str | os.PathLike, *, source: str = "", overwrite: bool = False,
             protect: Sequence[str | os.PathLike] = ()) -> Path:
    """Write an SD VAE (whole or encoder-only) to the checkpoint directory ``dst`` atomically
    (``overwrite`` and ``protect`` as in save_decoder)."""
    meta = {"format": VAE_FORMAT, "version": VERSION, "config": vae.config.to_dict(), "parts": list(vae.parts),
            "source": source}
    return _save(meta, vae.params, dst, overwrite, protect)


def read_vae_config(path: str | os.PathLike) -> tuple[vae_lib.VAEConfig, tuple[str, ...]]:
    """(VAEConfig, the halves present) recorded in VAE checkpoint directory ``path``."""
    meta = _read_meta(path, VAE_FORMAT, "VAE")
    parts = tuple(meta.get("parts", vae_lib.PARTS))
    if not parts or any(p not in vae_lib.PARTS for p in parts):
        raise CheckpointError(f"{path}: bad parts {parts!r} (expected a subset of {vae_lib.PARTS})")
    try:
        return vae_lib.VAEConfig.from_dict(meta["config"]), parts
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad VAE config ({e})") from e


def read_vae(path: str | os.PathLike, *, sharding: Any = None, verify: bool = True) -> vae_lib.VAE:
    """Read an SD VAE (SD 1.x/2.x, SDXL, SD3, FLUX) from a checkpoint directory written by
    ``save_vae``; ``sharding`` and ``verify`` as in read_decoder. PyTorch VAEs and names are
    resolved by :func:`cmjax.weights.hub.load_vae` (``cmjax.load_vae``), which calls this."""
    path = Path(path).absolute()
    config, parts = read_vae_config(path)
    meta = _read_meta(path, VAE_FORMAT, "VAE")
    return vae_lib.VAE(config, _restore(path, vae_lib.abstract_params(config, parts), sharding, meta, verify))
