"""Read PyTorch checkpoint files into numpy arrays, without torch and without running pickled code.

Supported inputs:

* TorchScript archives written by ``torch.jit.save`` (OpenAI's ``decoder.pt`` is one): a zip with
  ``<root>/data.pkl``, the tensor storages under ``<root>/data/<key>``, ``<root>/code/``,
  ``<root>/constants.pkl`` ...
* zip files written by ``torch.save`` (PyTorch >= 1.6) holding a state dict or any nesting of
  dicts / lists of tensors (``{"state_dict": {...}}``, Lightning ``.ckpt`` files, ...).
* the legacy, non-zip ``torch.save`` format (``_use_new_zipfile_serialization=False``).

A pickle can name any importable callable and have the unpickler call it, so loading an untrusted
``.pt`` file with plain ``pickle`` runs arbitrary code. :class:`_RestrictedUnpickler` resolves only
a fixed allowlist of globals, each to a harmless stand-in defined here (never to the real torch
object), and raises :class:`CheckpointError` naming any other global. Tensors are not built while
unpickling: the stand-ins record (storage, offset, shape, strides, dtype) and the bytes are read
from the archive afterwards, only for the tensors that are returned, each storage once.

A hostile file must not cost more than its size either. The unpickler refuses opcodes that would
modify an object it already checked (see :class:`_RestrictedUnpickler`); every tensor view is
checked against its storage when it is unpickled and again when its bytes are copied, and may
not hold more elements than its storage (stride 0 would let a kilobyte describe gigabytes); zip
records are read only up to the size the pickle declares; shared containers are walked once.
The limits (``_MAX_*`` below) are far above what real checkpoints use.

How a TorchScript ``data.pkl`` looks (found with ``pickletools.dis`` on archives written by
torch 2.x): every module is ``GLOBAL '__torch__.<qualified.path> <Class>'``, ``EMPTY_TUPLE``,
``NEWOBJ``, then a dict of its attributes and ``BUILD``. The dict holds parameters and buffers
(``_rebuild_tensor_v2`` calls on ``BINPERSID ('storage', <torch.FloatStorage>, '<key>', 'cpu',
numel)``), child modules (nested objects; ``ModuleDict``/``ModuleList`` children appear under
their keys / indices, exactly as in ``state_dict()``), and plain attributes (``training``, ints,
lists built with ``torch.jit._pickle.build_intlist`` ...). Traced modules have class names like
``__torch__.___torch_mangle_0``; tensors captured as constants live in ``constants.pkl``
(storages under ``<root>/constants/<key>``) and are named ``CONSTANTS.c<i>`` in the code.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import re
import reprlib
import stat
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import numpy as np

from cmjax.weights.errors import CheckpointError

__all__ = ["CheckpointError", "check_regular_file", "load_torch_file"]

# Bytes copied per read when streaming a storage out of the zip: keeps the transient extra
# memory small while the whole storage lands in a single preallocated buffer.
_CHUNK = 16 << 20

# Limits that keep a hostile file from costing memory or time out of proportion to its size.
# Real checkpoints stay far below them: a state dict nests one level, a TorchScript module two
# levels per submodule, and SD-sized checkpoints hold a few thousand tensors.
_MAX_TENSORS = 100_000
_MAX_DEPTH = 100
_MAX_PICKLE_BYTES = 1 << 30  # data.pkl / constants.pkl
# A deflated record may inflate to at most this many times its compressed size (torch never
# compresses records; a higher ratio is a zip bomb).
_MAX_INFLATE_RATIO = 64
# All arrays returned together may take at most this many times the bytes of the storages they
# view: views of one storage sum to at most one storage, tied weights repeat a tensor.
_MAX_EXPANSION = 4

# Legacy torch.save files start with a pickled int (this magic number), then a protocol version.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little")
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"


# --------------------------------------------------------------------------------------------
# dtypes


def _np_dtypes() -> dict[str, np.dtype]:
    """Return a map from torch dtype names to numpy dtypes (ml_dtypes for bf16 / fp8)."""
    table = {
        "float32": np.float32,
        "float64": np.float64,
        "float16": np.float16,
        "int64": np.int64,
        "int32": np.int32,
        "int16": np.int16,
        "int8": np.int8,
        "uint8": np.uint8,
        "uint16": np.uint16,
        "uint32": np.uint32,
        "uint64": np.uint64,
        "bool": np.bool_,
        "complex64": np.complex64,
        "complex128": np.complex128,
    }
    try:
        import ml_dtypes  # installed with jax; only needed for bf16 / fp8 tensors

        for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                     "float8_e5m2fnuz"):
            table[name] = getattr(ml_dtypes, name)
    except ImportError:  # pragma: no cover - ml_dtypes ships with jax
        pass
    return {k: np.dtype(v) for k, v in table.items()}


_DTYPES = _np_dtypes()

# Legacy typed-storage classes, as pickled by torch.save / torch.jit.save, and their element type.
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


# --------------------------------------------------------------------------------------------
# Stand-ins that the restricted unpickler hands out instead of torch objects


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.; ``dtype`` is None where the name is unknown."""

    name: str
    dtype: np.dtype | None


@dataclass(frozen=True, slots=True)
class _DType:
    """Stand-in for a ``torch.<dtype>`` global (used by ``_rebuild_tensor_v3``)."""

    name: str
    dtype: np.dtype | None


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """A storage named by the pickle: bytes in ``record``, ``numel`` elements of ``dtype``.

    ``base`` is an element offset into the record (only legacy storage views use it).
    """

    record: str
    dtype: np.dtype
    numel: int
    base: int = 0


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor to build later: elements of ``dtype`` viewed from ``storage`` with strides."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype


class _ScriptObject:
    """A TorchScript object (module or class instance) reduced to its pickled attribute state.

    Subclassed per ``__torch__`` type name so error messages and ``repr`` can name the type;
    nothing of the original class (methods, ``__setstate__`` code) is ever run.
    """

    torch_type = "__torch__"
    state: Any = None  # set once, by the pickle's BUILD (see _RestrictedUnpickler._load_build)

    def __repr__(self) -> str:
        return f"<TorchScript {self.torch_type}>"


class _TypeMarker:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


# --------------------------------------------------------------------------------------------
# The restricted unpickler


# Types a dict key or set element may have: hashing them costs time proportional to their size.
# (A tuple of tuples shared by reference hashes in time exponential in its depth.)
_PLAIN = (str, bytes, int, float, bool, type(None))
# Bounded repr for messages: a pickle can build objects whose full repr would never end.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60
_short = _REPR.repr


def _kind(obj: Any) -> str:
    """What an object is, for messages (the stand-ins by what they stand for)."""
    if isinstance(obj, _TensorRef):
        return "tensor"
    if isinstance(obj, _StorageRef):
        return "storage"
    if isinstance(obj, _ScriptObject):
        return f"TorchScript object {obj.torch_type} (already built)"
    return type(obj).__name__


def _plain_key(key: Any) -> bool:
    return type(key) in _PLAIN or (type(key) is tuple and all(type(k) in _PLAIN for k in key))


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that only rebuilds tensor descriptions; any other global is refused.

    ``storage_prefix`` is the zip directory holding the storages referenced by this pickle
    (``"<root>/data/"``, or ``"<root>/constants/"`` for TorchScript constants); the legacy format
    sets ``legacy=True`` and names storages by their root key.

    It is the pure-Python unpickler (``pickle._Unpickler``, the reference implementation of the
    pickle VM) so that the opcodes that mutate an object already built can be checked: the C
    unpickler would let ``BUILD`` write into the stand-ins' attributes after they were validated
    and let ``SETITEM`` hash arbitrarily deep keys. Here ``BUILD`` is accepted only on a
    TorchScript object (once) or a dict (its attributes, e.g. ``_metadata``, are dropped);
    ``SETITEM(S)``/``DICT`` only on dicts with plain keys (strings, numbers, flat tuples);
    ``APPEND(S)`` only on lists; sets only of plain elements. The pickles involved are small (the
    tensor bytes live in separate records), so the slower VM costs milliseconds.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, *, path: str, member: str, storage_prefix: str = "",
                 legacy: bool = False) -> None:
        super().__init__(file)
        self._path = path
        self._member = member
        self._prefix = storage_prefix
        self._legacy = legacy
        self._script_types: dict[str, type] = {}
        # legacy format: element type of each root storage key, needed to find its bytes later
        self.legacy_dtypes: dict[str, np.dtype] = {}

    # -- errors ----------------------------------------------------------------------------
    def _fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self._path}: {problem} (in {self._member})")

    # -- opcodes that mutate existing objects -------------------------------------------------
    def _checked_items(self, items: list, what: str) -> list:
        for key in items:
            if not _plain_key(key):
                raise self._fail(f"{what} of type {type(key).__name__} (only strings, numbers and "
                                 "flat tuples of them are accepted)")
        return items

    def _target(self, kind: type, opcode: str) -> Any:
        obj = self.stack[-1]
        if not isinstance(obj, kind):
            raise self._fail(f"{opcode} applied to a {_kind(obj)}, not a {kind.__name__}")
        return obj

    def _load_build(self) -> None:
        state = self.stack.pop()
        obj = self.stack[-1]
        if isinstance(obj, _ScriptObject) and obj.state is None:
            obj.state = state  # BUILD hands over the attribute dict (or any __getstate__ value)
        elif type(obj) in (dict, collections.OrderedDict):
            pass  # state_dict()'s _metadata attribute: not needed, dropped
        else:
            raise self._fail(f"BUILD applied to a {_kind(obj)} (only TorchScript objects "
                             "and dicts take pickled state)")

    def _load_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self._target(dict, "SETITEM")[self._checked_items([key], "dict key")[0]] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        keys = self._checked_items(items[::2], "dict key")
        self._target(dict, "SETITEMS").update(zip(keys, items[1::2]))

    def _load_dict(self) -> None:
        items = self.pop_mark()
        self.append(dict(zip(self._checked_items(items[::2], "dict key"), items[1::2])))

    def _load_append(self) -> None:
        value = self.stack.pop()
        self._target(list, "APPEND").append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        self._target(list, "APPENDS").extend(items)

    def _load_additems(self) -> None:
        items = self._checked_items(self.pop_mark(), "set element")
        self._target(set, "ADDITEMS").update(items)

    def _load_frozenset(self) -> None:
        self.append(frozenset(self._checked_items(self.pop_mark(), "set element")))

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.FROZENSET[0]] = _load_frozenset

    # -- globals ---------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        """Return a harmless stand-in for an allowlisted global; raise for anything else."""
        # Protocol-2 pickles spell some Python 3 names the Python 2 way ('__builtin__.eval');
        # normalise as pickle's own find_class does, so the allowlist and errors see one name.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module == "__torch__" or module.startswith("__torch__."):
            # TorchScript classes: an inert container of the pickled attributes. The qualified
            # name must look like an identifier path (it only ever names a type here).
            qual = f"{module}.{name}"
            if not re.fullmatch(r"[A-Za-z_][\w.]*", qual):
                raise self._fail(f"malformed TorchScript type name {qual!r}")
            cls = self._script_types.get(qual)
            if cls is None:
                cls = type(name, (_ScriptObject,), {"torch_type": qual})
                self._script_types[qual] = cls
            return cls
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise self._fail(
                f"forbidden global '{module}.{name}': only tensor-rebuilding globals are "
                f"allowed, refusing to run code from the checkpoint"
            )
        return factory(self)

    # -- storages --------------------------------------------------------------------------
    def persistent_load(self, pid: Any) -> _StorageRef:
        """Return the :class:`_StorageRef` for a ``('storage', type, key, location, numel[, view])``
        persistent id, after checking its shape."""
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise self._fail(f"unsupported persistent id {_short(pid)}")
        n = 6 if self._legacy else 5
        if len(pid) != n:
            raise self._fail(f"malformed storage id {_short(pid)}")
        stype, key, numel = pid[1], pid[2], pid[4]
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(stype, _StorageType):
            raise self._fail(f"storage id {_short(pid)} does not name a storage type")
        if stype.dtype is None:
            raise self._fail(f"unsupported storage type torch.{stype.name}")
        if not isinstance(key, str) or not re.fullmatch(r"[\w.-]+", key):
            raise self._fail(f"malformed storage key {_short(key)}")
        if not isinstance(numel, int) or numel < 0:
            raise self._fail(f"malformed storage size {_short(numel)}")
        if not self._legacy:
            return _StorageRef(self._prefix + key, stype.dtype, numel)
        # Legacy ids carry an optional view (view_key, element offset, element count).
        self.legacy_dtypes.setdefault(key, stype.dtype)
        view = pid[5]
        if view is None:
            return _StorageRef(key, stype.dtype, numel)
        if (not isinstance(view, tuple) or len(view) != 3
                or not all(isinstance(v, int) and v >= 0 for v in view[1:])):
            raise self._fail(f"malformed storage view {_short(view)}")
        return _StorageRef(key, stype.dtype, view[2], base=view[1])

    # -- tensors ---------------------------------------------------------------------------
    def rebuild(self, storage: Any, offset: Any, shape: Any, stride: Any,
                dtype: np.dtype | None = None) -> _TensorRef:
        """Validate a tensor description; return it as a :class:`_TensorRef`."""
        if not isinstance(storage, _StorageRef):
            raise self._fail(f"tensor rebuilt from a non-storage {type(storage).__name__}")
        if not (isinstance(shape, tuple) and isinstance(stride, tuple)
                and len(shape) == len(stride)
                and all(isinstance(v, int) and v >= 0 for v in shape + stride)
                and isinstance(offset, int) and offset >= 0):
            raise self._fail(f"malformed tensor geometry offset={_short(offset)} "
                             f"size={_short(shape)} stride={_short(stride)}")
        dtype = storage.dtype if dtype is None else dtype
        # Offsets/strides count elements of the tensor's dtype; the storage may be untyped bytes.
        nbytes = storage.numel * storage.dtype.itemsize
        if nbytes % dtype.itemsize:
            raise self._fail(f"storage of {nbytes} bytes viewed as {dtype}")
        ref = _TensorRef(storage, offset, shape, stride, np.dtype(dtype))
        problem = _geometry_problem(ref, nbytes // dtype.itemsize)
        if problem:
            raise self._fail(problem)
        return ref


def _geometry_problem(ref: _TensorRef, available: int) -> str | None:
    """Why ``ref`` cannot be read from a storage of ``available`` elements, or None if it can.

    Refused: views reaching outside the storage (``as_strided`` would read foreign memory) and
    views with more elements than the storage (a stride 0 or overlapping strides, which would
    let a tiny file expand into gigabytes; saved weights never need them). Python ints: no
    overflow whatever the sizes.
    """
    numel = math.prod(ref.shape)
    if numel == 0:
        return None
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if last >= available:
        return (f"tensor of size {ref.shape} stride {ref.stride} offset {ref.offset} exceeds its "
                f"storage of {available} elements")
    if numel > available:
        return (f"tensor of size {ref.shape} stride {ref.stride} has {numel} elements but its "
                f"storage only {available} (broadcast or overlapping strides are not accepted)")
    return None


def _rebuild_v2(up: _RestrictedUnpickler) -> Callable[..., _TensorRef]:
    # _rebuild_tensor(storage, offset, size, stride) and
    # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
    def f(storage, offset, size, stride, *_ignored):
        return up.rebuild(storage, offset, size, stride)

    return f


def _rebuild_v3(up: _RestrictedUnpickler) -> Callable[..., _TensorRef]:
    # _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata]):
    # the storage is untyped bytes and the element type comes as a torch.<dtype> global.
    def f(storage, offset, size, stride, requires_grad=None, hooks=None, dtype=None, *_ignored):
        if not isinstance(dtype, _DType) or dtype.dtype is None:
            name = dtype.name if isinstance(dtype, _DType) else _short(dtype)
            raise up._fail(f"unsupported tensor dtype {name}")
        return up.rebuild(storage, offset, size, stride, dtype.dtype)

    return f


def _rebuild_parameter(up: _RestrictedUnpickler) -> Callable[..., _TensorRef]:
    # _rebuild_parameter(data, requires_grad, hooks) and _rebuild_parameter_with_state(..., state)
    def f(data, *_ignored):
        if not isinstance(data, _TensorRef):
            raise up._fail("parameter rebuilt from a non-tensor")
        return data

    return f


def _rebuild_from_type_v2(up: _RestrictedUnpickler) -> Callable[..., Any]:
    # _rebuild_from_type_v2(func, new_type, args, state): a tensor (sub)class with Python state.
    # func was itself resolved through find_class, so it is one of our stand-ins.
    def f(func, new_type, args, state=None):
        if not isinstance(new_type, _TypeMarker) or not callable(func) or not isinstance(args,
                                                                                      tuple):
            raise up._fail("unsupported tensor subclass in _rebuild_from_type_v2")
        return func(*args)

    return f


def _storage_type(name: str) -> Callable[[_RestrictedUnpickler], _StorageType]:
    dt = _DTYPES.get(_STORAGE_DTYPES[name]) if name in _STORAGE_DTYPES else np.dtype(np.uint8)
    return lambda up: _StorageType(name, dt)


def _dtype_marker(name: str) -> Callable[[_RestrictedUnpickler], _DType]:
    return lambda up: _DType(name, _DTYPES.get(name))


def _identity_list(up: _RestrictedUnpickler) -> Callable[[Any], Any]:
    return lambda data: data  # torch.jit._pickle.build_*list only tag a list with its type


def _restore_type_tag(up: _RestrictedUnpickler) -> Callable[..., Any]:
    return lambda value, type_str=None: value


def _device(up: _RestrictedUnpickler) -> Callable[..., str]:
    # torch.device("cuda", 0) -> "cuda:0"; only ever kept as an inert string.
    def f(kind, index=None):
        if not isinstance(kind, str) or not (index is None or type(index) is int):
            raise up._fail("malformed torch.device")
        return kind if index is None else f"{kind}:{index}"

    return f


def _codecs_encode(up: _RestrictedUnpickler) -> Callable[..., bytes]:
    # Protocol-2 pickles store bytes as _codecs.encode(text, "latin1"); allow exactly that.
    def f(text, encoding="latin1", *rest):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or rest:
            raise up._fail("_codecs.encode used for something other than bytes")
        return text.encode("latin1")

    return f


def _complex(up: _RestrictedUnpickler) -> Callable[..., complex]:
    def f(real=0.0, imag=0.0):
        if not all(isinstance(v, (int, float)) for v in (real, imag)):
            raise up._fail("builtins.complex called with non-numbers")
        return complex(real, imag)

    return f


def _ordered_dict(up: _RestrictedUnpickler) -> Callable[..., collections.OrderedDict]:
    # OrderedDict pickles as OrderedDict() + SETITEMS; items passed as an argument get the
    # same key check as SETITEMS.
    def f(items=()):
        if not isinstance(items, (list, tuple)) or not all(
                isinstance(kv, tuple) and len(kv) == 2 and _plain_key(kv[0]) for kv in items):
            raise up._fail("OrderedDict built from something other than (plain key, value) pairs")
        return collections.OrderedDict(items)

    return f


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[_RestrictedUnpickler], Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): lambda up: _TypeMarker("torch.Tensor"),
    ("torch._tensor", "Tensor"): lambda up: _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): lambda up: _TypeMarker("torch.nn.Parameter"),
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch", "Size"): lambda up: tuple,
    ("torch", "device"): _device,
    ("torch.storage", "UntypedStorage"): _storage_type("UntypedStorage"),
    ("torch", "UntypedStorage"): _storage_type("UntypedStorage"),
    ("torch.jit._pickle", "build_intlist"): _identity_list,
    ("torch.jit._pickle", "build_doublelist"): _identity_list,
    ("torch.jit._pickle", "build_boollist"): _identity_list,
    ("torch.jit._pickle", "build_tensorlist"): _identity_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("builtins", "complex"): _complex,
    ("_codecs", "encode"): _codecs_encode,
}
_ALLOWED_GLOBALS.update({("torch", n): _storage_type(n) for n in _STORAGE_DTYPES})
_ALLOWED_GLOBALS.update({("torch", n): _dtype_marker(n) for n in _DTYPES})


# --------------------------------------------------------------------------------------------
# Flattening the unpickled tree into state_dict-style names


def _flatten(obj: Any, path: str) -> list[tuple[str, _TensorRef]]:
    """Return ``(dotted name, tensor)`` pairs for every tensor reachable from ``obj``.

    TorchScript objects and dicts contribute their keys, lists/tuples their indices; anything
    that is not a tensor (flags, ints, strings, devices) is skipped, as ``state_dict()`` does.
    Each container is visited once, under the first name that reaches it: a pickle may share
    objects (a list holding the previous list twice, 40 deep, is 2**40 paths in 1 KB) and
    walking them as a tree would never end. A tensor reached twice (tied weights) gets both names.
    Raises CheckpointError on duplicate names, more than ``_MAX_TENSORS`` tensors or nesting
    deeper than ``_MAX_DEPTH``.
    """
    out: dict[str, _TensorRef] = {}
    seen: set[int] = set()  # ids of the containers visited (all alive: they are part of obj)

    def visit(node: Any, prefix: str, depth: int) -> None:
        if isinstance(node, _TensorRef):
            if prefix in out:
                raise CheckpointError(f"{path}: duplicate tensor name {prefix!r} after flattening")
            if len(out) >= _MAX_TENSORS:
                raise CheckpointError(f"{path}: more than {_MAX_TENSORS} tensors")
            out[prefix] = node
            return
        if isinstance(node, _ScriptObject):
            node = node.state
            if isinstance(node, (_TensorRef, _ScriptObject)):
                node = (node,)
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        else:
            return
        if id(node) in seen:
            return
        if depth >= _MAX_DEPTH:
            raise CheckpointError(f"{path}: objects nested more than {_MAX_DEPTH} levels deep")
        seen.add(id(node))
        for k, v in items:
            visit(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)

    visit(obj, "", 0)
    return list(out.items())


def _select(obj: Any, key: str | None, path: str) -> Any:
    """Return the sub-object of a loaded checkpoint to flatten.

    ``key`` is a dotted path into dicts / TorchScript attributes. Without one, a plain dict with
    a dict under ``"state_dict"`` (Lightning, many training scripts) is narrowed to that entry.
    """
    if key is None:
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            return obj["state_dict"]
        return obj
    node = obj
    for part in key.split("."):
        if isinstance(node, _ScriptObject):
            node = node.state
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise CheckpointError(f"{path}: no entry {key!r} in the checkpoint")
    return node


# --------------------------------------------------------------------------------------------
# Reading storages and building arrays


def _swap_bytes(buf: np.ndarray, dtype: np.dtype) -> None:
    """Byte-swap ``buf`` in place, element by element (complex: each component)."""
    size = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    if size > 1:
        buf.view(np.dtype(f"u{size}")).byteswap(inplace=True)


class _Materializer:
    """Builds numpy arrays from :class:`_TensorRef`s, reading each storage record once.

    ``read(record, nbytes)`` returns a fresh writable uint8 buffer with the record's bytes, where
    ``nbytes`` is the size the pickle declares for it (the reader refuses a record of another
    size instead of reading whatever the archive holds). A tensor
    covering its whole storage contiguously is returned as a view of that buffer (no copy); any
    other tensor, or a second tensor on an already returned buffer, is copied, so that no two
    returned arrays share memory.
    """

    def __init__(self, path: str, read: Callable[[str, int], np.ndarray], big_endian: bool) -> None:
        self._path = path
        self._read = read
        self._big_endian = big_endian

    def build(self, refs: list[tuple[str, _TensorRef]]) -> dict[str, np.ndarray]:
        """Return ``{name: array}``; storages are dropped as soon as their last tensor is built."""
        remaining = collections.Counter(ref.storage.record for _, ref in refs)
        declared: dict[str, int] = {}
        for _, ref in refs:
            st = ref.storage
            end = (st.base + st.numel) * st.dtype.itemsize
            declared[st.record] = max(declared.get(st.record, 0), end)
        # Checked before anything is read: what the arrays will take, against what they view.
        wanted = sum(math.prod(ref.shape) * ref.dtype.itemsize for _, ref in refs)
        if wanted > _MAX_EXPANSION * sum(declared.values()) + (1 << 20):
            raise CheckpointError(f"{self._path}: its tensors would take {wanted} bytes, more than "
                                  f"{_MAX_EXPANSION}x the {sum(declared.values())} bytes of their "
                                  "storages (views repeated under many names)")
        cache: dict[str, np.ndarray] = {}
        handed_out: set[str] = set()  # records whose buffer already backs a returned array
        out: dict[str, np.ndarray] = {}
        for name, ref in refs:
            record = ref.storage.record
            buf = cache.get(record)
            if buf is None:
                buf = self._read(record, declared[record])
                if self._big_endian:
                    _swap_bytes(buf, ref.dtype)
                cache[record] = buf
            typed = self._typed(name, ref, buf)
            if record not in handed_out and self._is_whole(ref, typed):
                handed_out.add(record)
                out[name] = typed.reshape(ref.shape)
            else:
                out[name] = self._copy(name, ref, typed)
            remaining[record] -= 1
            if not remaining[record]:
                del cache[record]
        return out

    def _typed(self, name: str, ref: _TensorRef, buf: np.ndarray) -> np.ndarray:
        """Return the tensor's storage as a 1-D array of the tensor's dtype (a view of buf)."""
        st = ref.storage
        start = st.base * st.dtype.itemsize
        stop = start + st.numel * st.dtype.itemsize
        if stop > buf.size:
            raise CheckpointError(f"{self._path}: storage {st.record} has {buf.size} bytes but "
                                  f"tensor {name!r} needs {stop}")
        return buf[start:stop].view(ref.dtype)

    @staticmethod
    def _is_whole(ref: _TensorRef, typed: np.ndarray) -> bool:
        """True if the tensor is exactly its whole storage, in row-major order."""
        return (ref.storage.base == 0 and ref.offset == 0 and math.prod(ref.shape) == typed.size
                and ref.stride == _contiguous_strides(ref.shape))

    def _copy(self, name: str, ref: _TensorRef, typed: np.ndarray) -> np.ndarray:
        """Return a C-contiguous copy of the (possibly strided, offset) tensor view."""
        # Checked again here, at the copy, against the buffer actually read.
        problem = _geometry_problem(ref, typed.size)
        if problem:
            raise CheckpointError(f"{self._path}: tensor {name!r}: {problem}")
        try:
            if 0 in ref.shape:
                return np.zeros(ref.shape, ref.dtype)
            view = np.lib.stride_tricks.as_strided(
                typed[ref.offset:], shape=ref.shape,
                strides=tuple(s * ref.dtype.itemsize for s in ref.stride), writeable=False)
            return view.copy(order="C")
        except (ValueError, MemoryError, OverflowError) as e:
            # e.g. an absurd broadcast shape (stride 0) that cannot be materialised
            raise CheckpointError(f"{self._path}: cannot build tensor {name!r} of size "
                                  f"{ref.shape}: {e}") from e


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return the row-major element strides of ``shape`` (torch's ``contiguous()`` layout)."""
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


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


def _read_record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, size: int | None = None,
                 limit: int | None = None) -> np.ndarray:
    """Return a zip record's bytes as a fresh writable uint8 array, reading no more than declared.

    ``size``: the size the pickle declares for it (refused if the archive says otherwise);
    ``limit``: the most bytes accepted when nothing declares a size. The central directory's
    sizes are checked against the file (a stored record cannot be larger than the archive, a
    deflated one cannot inflate more than ``_MAX_INFLATE_RATIO`` times) before allocating;
    zipfile never inflates past the directory's size and checks the CRC at the end.
    """
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
    elif info.file_size > max(_MAX_INFLATE_RATIO * info.compress_size, 1 << 20):
        raise CheckpointError(f"{path}: record {name!r} inflates from {info.compress_size} to "
                              f"{info.file_size} bytes (a zip bomb?)")
    buf = np.empty(info.file_size, np.uint8)
    mv = memoryview(buf)
    pos = 0
    # Stream into one preallocated buffer: the record's bytes are held in memory once.
    with zf.open(info) as fh:
        while pos < info.file_size:
            chunk = fh.read(min(_CHUNK, info.file_size - pos))
            if not chunk:
                raise CheckpointError(f"{path}: record {name!r} is truncated")
            mv[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        fh.read(1)  # at the end: lets zipfile compare the CRC
    return buf


def _zip_reader(zf: zipfile.ZipFile, path: str) -> Callable[[str, int], np.ndarray]:
    """Return ``read(record, nbytes)`` for :class:`_Materializer`."""

    def read(record: str, nbytes: int) -> np.ndarray:
        try:
            info = zf.getinfo(record)
        except KeyError:
            raise CheckpointError(f"{path}: missing storage record {record!r}") from None
        return _read_record(zf, info, path, size=nbytes)

    return read


def _unpickle(up: _RestrictedUnpickler, path: str, member: str) -> Any:
    """Run a restricted unpickler, turning every failure into a CheckpointError."""
    try:
        return up.load()
    except CheckpointError:
        raise
    except Exception as e:  # corrupt pickles raise a zoo of types; report them uniformly
        raise CheckpointError(f"{path}: cannot unpickle {member}: {type(e).__name__}: {e}") from e


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError,
               NotImplementedError, RuntimeError, OverflowError)


def _pickle_bytes(zf: zipfile.ZipFile, member: str, path: str) -> bytes:
    return _read_record(zf, zf.getinfo(member), path, limit=_MAX_PICKLE_BYTES).tobytes()


def _load_zip(path: str, key: str | None, include_constants: bool) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e})") from e
    with zf:
        try:
            root = _find_root(zf, path)
            big_endian = False
            if root + "byteorder" in zf.namelist():
                raw = _read_record(zf, zf.getinfo(root + "byteorder"), path, limit=16)
                order = raw.tobytes().decode("ascii", "replace").strip()
                if order not in ("little", "big"):
                    raise CheckpointError(f"{path}: unknown byte order {order!r}")
                big_endian = order == "big"
            member = root + "data.pkl"
            up = _RestrictedUnpickler(io.BytesIO(_pickle_bytes(zf, member, path)), path=path,
                                      member=member, storage_prefix=root + "data/")
            obj = _unpickle(up, path, member)
            refs = _flatten(_select(obj, key, path), path)
            if include_constants and root + "constants.pkl" in zf.namelist():
                cmember = root + "constants.pkl"
                cup = _RestrictedUnpickler(io.BytesIO(_pickle_bytes(zf, cmember, path)), path=path,
                                           member=cmember, storage_prefix=root + "constants/")
                consts = _unpickle(cup, path, cmember)
                if isinstance(consts, tuple):
                    names = {n for n, _ in refs}
                    for i, c in enumerate(consts):
                        if isinstance(c, _TensorRef):
                            name = f"CONSTANTS.c{i}"
                            if name in names:
                                raise CheckpointError(f"{path}: duplicate tensor name {name!r}")
                            refs.append((name, c))
            return _Materializer(path, _zip_reader(zf, path), big_endian).build(refs)
        except CheckpointError:
            raise
        except _ZIP_ERRORS as e:
            # CRC mismatches, bad local headers, a file cut inside a record, an unsupported
            # compression method or encryption (NotImplementedError, RuntimeError) ...
            raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e})") from e


# --------------------------------------------------------------------------------------------
# Legacy (non-zip) torch.save files


def _load_legacy(path: str, key: str | None) -> dict[str, np.ndarray]:
    """Read the pre-1.6 format: magic, protocol, sys_info and object pickles, storage keys, then
    each storage as a little-endian int64 element count followed by its raw bytes."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        def header(member: str) -> Any:
            return _unpickle(_RestrictedUnpickler(f, path=path, member=member), path, member)

        if header("magic number") != _LEGACY_MAGIC:
            raise CheckpointError(f"{path}: invalid magic number for a legacy torch.save file")
        if header("protocol version") != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: unsupported legacy torch.save protocol version")
        sys_info = header("sys_info")
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        up = _RestrictedUnpickler(f, path=path, member="object pickle", legacy=True)
        obj = _unpickle(up, path, "object pickle")
        keys = header("storage key list")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointError(f"{path}: malformed storage key list")
        spans: dict[str, tuple[int, int]] = {}
        for k in keys:
            dtype = up.legacy_dtypes.get(k)
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

        refs = _flatten(_select(obj, key, path), path)
        return _Materializer(path, read, big_endian=not little).build(refs)


# --------------------------------------------------------------------------------------------
# Entry point


def load_torch_file(path: str | os.PathLike, *, key: str | None = None,
                    include_constants: bool = False) -> dict[str, np.ndarray]:
    """Read the tensors of a PyTorch checkpoint without torch and without executing its pickle.

    Args:
        path: a TorchScript archive (``torch.jit.save``), a ``torch.save`` zip file, or a legacy
            ``torch.save`` file.
        key: optional dotted path selecting a sub-object to flatten (e.g. ``"model"`` or
            ``"state_dict"``). Without it, a top-level dict holding a dict under
            ``"state_dict"`` is narrowed to that entry; otherwise everything is flattened.
        include_constants: for traced TorchScript archives, also return the tensors of
            ``constants.pkl`` as ``CONSTANTS.c<i>`` (the names the archive's code uses).

    Returns:
        ``{name: np.ndarray}`` in pickle order, names dotted exactly like ``state_dict()``
        (``blocks.down_0_conv_0.gn_1.g``). For TorchScript archives this is every tensor
        attribute of every module, i.e. parameters, buffers and any plain tensor attributes.
        Arrays are C-contiguous, have the checkpoint's dtype (bfloat16 / fp8 as ml_dtypes
        types) and never share memory with each other. Non-tensor values are skipped.

    Raises:
        CheckpointError: naming the file and the problem (empty, unknown format, truncated or
            corrupt archive, missing data.pkl or storage, forbidden global, duplicate name).
    """
    path = os.fspath(path)
    try:
        check_regular_file(path)
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_PREFIX))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open checkpoint ({e})") from e
    if not head:
        raise CheckpointError(f"{path}: file is empty")
    if head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP_MAGIC):
        return _load_zip(path, key, include_constants)
    if head == _LEGACY_PREFIX:
        if include_constants:
            raise CheckpointError(f"{path}: include_constants applies to TorchScript archives only")
        return _load_legacy(path, key)
    if _looks_like_tar(path):
        raise CheckpointError(f"{path}: the pre-2018 tar torch.save format is not supported")
    raise CheckpointError(
        f"{path}: not a PyTorch checkpoint (unrecognised leading bytes {head[:8].hex()}; "
        f"expected a zip archive or a legacy torch.save file)")


def check_regular_file(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless ``path`` is a regular file (after symlinks).

    Checked before opening: reading a FIFO blocks forever, and ``/dev/zero`` never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open checkpoint ({e.strerror or e})") from e
    if not stat.S_ISREG(mode):
        what = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise CheckpointError(f"{path}: is {what}, not a regular checkpoint file")


def _looks_like_tar(path: str) -> bool:
    """Return True if ``path`` carries a POSIX tar header (the oldest torch.save format)."""
    with open(path, "rb") as f:
        f.seek(257)
        return f.read(5) == b"ustar"
