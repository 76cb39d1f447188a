"""Tensor descriptions read from a PyTorch pickle, their geometry checks, and the arrays built from them.

    unpickler -> TensorRef(storage=StorageRef(record, dtype, numel, base), offset, shape, stride, dtype)
              -> tensor_problem (at unpickling: refused views never reach the reader)
    container -> Materializer(read).build([(name, TensorRef), ...])
              -> each storage record read once (``read(record, nbytes)``), byte-swapped if big-endian,
                 geometry checked again against the bytes actually read -> {name: np.ndarray}

A view may not reach outside its storage (``as_strided`` would read foreign memory) nor hold more
elements than its storage (a stride 0 would let a kilobyte describe gigabytes), and all arrays
returned together may take at most ``MAX_EXPANSION`` times the bytes of the storages they view.
"""

from __future__ import annotations

import collections
import math
import reprlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cmjax.weights.errors import CheckpointError

# All arrays returned together may take at most this many times the bytes of the storages they
# view: views of one storage sum to at most one storage, tied weights repeat a tensor.
MAX_EXPANSION = 4

# Bounded repr for messages: a pickle can build objects whose full repr would never end.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60
short_repr = _REPR.repr


@dataclass(frozen=True, slots=True)
class StorageRef:
    """A storage named by the pickle: bytes in ``record``, ``numel`` elements of ``dtype``.

    ``base`` is an element offset into the record (only legacy storage views use it).
    """

    record: str
    dtype: np.dtype
    numel: int
    base: int = 0


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor to build later: elements of ``dtype`` viewed from ``storage`` with strides."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype


def tensor_problem(storage: StorageRef, offset: Any, shape: Any, stride: Any, dtype: np.dtype) -> str | None:
    """Why a pickled tensor description cannot be a :class:`TensorRef` of ``storage``, or None.

    ``offset``/``shape``/``stride`` come straight from the pickle (any type); they count elements
    of ``dtype``, which may differ from the storage's (untyped byte storages).
    """
    if not (isinstance(shape, tuple) and isinstance(stride, tuple)
            and len(shape) == len(stride)
            and all(isinstance(v, int) and v >= 0 for v in shape + stride)
            and isinstance(offset, int) and offset >= 0):
        return (f"malformed tensor geometry offset={short_repr(offset)} "
                f"size={short_repr(shape)} stride={short_repr(stride)}")
    nbytes = storage.numel * storage.dtype.itemsize
    if nbytes % dtype.itemsize:
        return f"storage of {nbytes} bytes viewed as {dtype}"
    return geometry_problem(TensorRef(storage, offset, shape, stride, dtype), nbytes // dtype.itemsize)


def geometry_problem(ref: TensorRef, available: int) -> str | None:
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


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return the row-major element strides of ``shape`` (torch's ``contiguous()`` layout)."""
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _swap_bytes(buf: np.ndarray, dtype: np.dtype) -> None:
    """Byte-swap ``buf`` in place, element by element (complex: each component)."""
    size = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    if size > 1:
        buf.view(np.dtype(f"u{size}")).byteswap(inplace=True)


def _declared_sizes(path: str, refs: list[tuple[str, TensorRef]]) -> dict[str, int]:
    """Return the bytes each record must hold (the largest storage the pickle declares on it),
    after checking, before anything is read, what the arrays will take against what they view."""
    declared: dict[str, int] = {}
    for _, ref in refs:
        st = ref.storage
        end = (st.base + st.numel) * st.dtype.itemsize
        declared[st.record] = max(declared.get(st.record, 0), end)
    wanted = sum(math.prod(ref.shape) * ref.dtype.itemsize for _, ref in refs)
    if wanted > MAX_EXPANSION * sum(declared.values()) + (1 << 20):
        raise CheckpointError(f"{path}: its tensors would take {wanted} bytes, more than "
                              f"{MAX_EXPANSION}x the {sum(declared.values())} bytes of their "
                              "storages (views repeated under many names)")
    return declared


def _is_whole(ref: TensorRef, typed: np.ndarray) -> bool:
    """True if the tensor is exactly its whole storage, in row-major order."""
    return (ref.storage.base == 0 and ref.offset == 0 and math.prod(ref.shape) == typed.size
            and ref.stride == contiguous_strides(ref.shape))


class Materializer:
    """Builds numpy arrays from :class:`TensorRef`s, reading each storage record once.

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

    def build(self, refs: list[tuple[str, TensorRef]]) -> dict[str, np.ndarray]:
        """Return ``{name: array}``; storages are dropped as soon as their last tensor is built."""
        declared = _declared_sizes(self._path, refs)
        remaining = collections.Counter(ref.storage.record for _, ref in refs)
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
            if record not in handed_out and _is_whole(ref, typed):
                handed_out.add(record)
                out[name] = typed.reshape(ref.shape)
            else:
                out[name] = self._copy(name, ref, typed)
            remaining[record] -= 1
            if not remaining[record]:
                del cache[record]
        return out

    def _typed(self, name: str, ref: TensorRef, buf: np.ndarray) -> np.ndarray:
        """Return the tensor's storage as a 1-D array of the tensor's dtype (a view of buf)."""
        st = ref.storage
        start = st.base * st.dtype.itemsize
        stop = start + st.numel * st.dtype.itemsize
        if stop > buf.size:
            raise CheckpointError(f"{self._path}: storage {st.record} has {buf.size} bytes but "
                                  f"tensor {name!r} needs {stop}")
        return buf[start:stop].view(ref.dtype)

    def _copy(self, name: str, ref: TensorRef, typed: np.ndarray) -> np.ndarray:
        """Return a C-contiguous copy of the (possibly strided, offset) tensor view."""
        # Checked again here, at the copy, against the buffer actually read.
        problem = geometry_problem(ref, typed.size)
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
