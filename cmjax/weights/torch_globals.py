"""The globals a PyTorch checkpoint pickle may name, each mapped to a harmless stand-in.

:data:`ALLOWED_GLOBALS` maps ``(module, name)`` to a factory that takes the unpickler and returns
what the pickle gets instead of the real object: ``_rebuild_tensor_v2`` & co. become functions
that check a tensor description and return a :class:`~cmjax.weights.torch_tensors.TensorRef`,
``torch.FloatStorage`` & co. a :class:`StorageType` naming the element type, ``torch.float16``
& co. a :class:`DType`. Nothing of torch is imported or called. Every global not in the table is
refused by :class:`cmjax.weights.torch_unpickler.RestrictedUnpickler`.

The factories use the two methods of :class:`Unpickler` of the unpickler they are given.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from cmjax.weights.errors import CheckpointError
from cmjax.weights.torch_tensors import TensorRef, short_repr


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

# Types a dict key or set element may have: hashing them costs time proportional to their size.
# (A tuple of tuples shared by reference hashes in time exponential in its depth.)
_PLAIN = (str, bytes, int, float, bool, type(None))


def plain_key(key: Any) -> bool:
    """True for a string, bytes, number, bool or None, or a flat tuple of them."""
    return type(key) in _PLAIN or (type(key) is tuple and all(type(k) in _PLAIN for k in key))


# --------------------------------------------------------------------------------------------
# Stand-ins


@dataclass(frozen=True, slots=True)
class StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.; ``dtype`` is None where the name is unknown."""

    name: str
    dtype: np.dtype | None


@dataclass(frozen=True, slots=True)
class DType:
    """Stand-in for a ``torch.<dtype>`` global (used by ``_rebuild_tensor_v3``)."""

    name: str
    dtype: np.dtype | None


class TypeMarker:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


# --------------------------------------------------------------------------------------------
# Factories: unpickler -> the callable or value the pickle gets


class Unpickler(Protocol):
    """What the factories use of the unpickler (:class:`cmjax.weights.torch_unpickler.RestrictedUnpickler`)."""

    def fail(self, problem: str) -> CheckpointError:
        """The error to raise: ``problem`` with the file and the pickle named."""

    def rebuild(self, storage: Any, offset: Any, shape: Any, stride: Any,
                dtype: np.dtype | None = None) -> TensorRef:
        """A checked :class:`TensorRef` (``dtype`` None: the storage's)."""


def _rebuild_v2(up: Unpickler) -> Callable[..., TensorRef]:
    # _rebuild_tensor(storage, offset, size, stride) and
    # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
    def f(storage, offset, size, stride, *_ignored):
        return up.rebuild(storage, offset, size, stride)

    return f


def _rebuild_v3(up: Unpickler) -> Callable[..., TensorRef]:
    # _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata]):
    # the storage is untyped bytes and the element type comes as a torch.<dtype> global.
    def f(storage, offset, size, stride, requires_grad=None, hooks=None, dtype=None, *_ignored):
        if not isinstance(dtype, DType) or dtype.dtype is None:
            name = dtype.name if isinstance(dtype, DType) else short_repr(dtype)
            raise up.fail(f"unsupported tensor dtype {name}")
        return up.rebuild(storage, offset, size, stride, dtype.dtype)

    return f


def _rebuild_parameter(up: Unpickler) -> Callable[..., TensorRef]:
    # _rebuild_parameter(data, requires_grad, hooks) and _rebuild_parameter_with_state(..., state)
    def f(data, *_ignored):
        if not isinstance(data, TensorRef):
            raise up.fail("parameter rebuilt from a non-tensor")
        return data

    return f


def _rebuild_from_type_v2(up: Unpickler) -> Callable[..., Any]:
    # _rebuild_from_type_v2(func, new_type, args, state): a tensor (sub)class with Python state.
    # func was itself resolved through find_class, so it is one of our stand-ins.
    def f(func, new_type, args, state=None):
        if not isinstance(new_type, TypeMarker) or not callable(func) or not isinstance(args, tuple):
            raise up.fail("unsupported tensor subclass in _rebuild_from_type_v2")
        return func(*args)

    return f


def _storage_type(name: str) -> Callable[[Unpickler], StorageType]:
    dt = _DTYPES.get(_STORAGE_DTYPES[name]) if name in _STORAGE_DTYPES else np.dtype(np.uint8)
    return lambda up: StorageType(name, dt)


def _dtype_marker(name: str) -> Callable[[Unpickler], DType]:
    return lambda up: DType(name, _DTYPES.get(name))


def _identity_list(up: Unpickler) -> Callable[[Any], Any]:
    return lambda data: data  # torch.jit._pickle.build_*list only tag a list with its type


def _restore_type_tag(up: Unpickler) -> Callable[..., Any]:
    return lambda value, type_str=None: value


def _device(up: Unpickler) -> Callable[..., str]:
    # torch.device("cuda", 0) -> "cuda:0"; only ever kept as an inert string.
    def f(kind, index=None):
        if not isinstance(kind, str) or not (index is None or type(index) is int):
            raise up.fail("malformed torch.device")
        return kind if index is None else f"{kind}:{index}"

    return f


def _codecs_encode(up: Unpickler) -> Callable[..., bytes]:
    # Protocol-2 pickles store bytes as _codecs.encode(text, "latin1"); allow exactly that.
    def f(text, encoding="latin1", *rest):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or rest:
            raise up.fail("_codecs.encode used for something other than bytes")
        return text.encode("latin1")

    return f


def _complex(up: Unpickler) -> Callable[..., complex]:
    def f(real=0.0, imag=0.0):
        if not all(isinstance(v, (int, float)) for v in (real, imag)):
            raise up.fail("builtins.complex called with non-numbers")
        return complex(real, imag)

    return f


def _ordered_dict(up: Unpickler) -> Callable[..., collections.OrderedDict]:
    # OrderedDict pickles as OrderedDict() + SETITEMS; items passed as an argument get the
    # same key check as SETITEMS.
    def f(items=()):
        if not isinstance(items, (list, tuple)) or not all(
                isinstance(kv, tuple) and len(kv) == 2 and plain_key(kv[0]) for kv in items):
            raise up.fail("OrderedDict built from something other than (plain key, value) pairs")
        return collections.OrderedDict(items)

    return f


ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[Unpickler], Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): lambda up: TypeMarker("torch.Tensor"),
    ("torch._tensor", "Tensor"): lambda up: TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): lambda up: TypeMarker("torch.nn.Parameter"),
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
ALLOWED_GLOBALS.update({("torch", n): _storage_type(n) for n in _STORAGE_DTYPES})
ALLOWED_GLOBALS.update({("torch", n): _dtype_marker(n) for n in _DTYPES})
