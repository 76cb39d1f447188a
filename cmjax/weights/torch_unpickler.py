"""The restricted unpickler for PyTorch checkpoint pickles, and the walk from what it returns to names.

A pickle can name any importable callable and have the unpickler call it, so loading an untrusted
``.pt`` file with plain ``pickle`` runs arbitrary code. :class:`RestrictedUnpickler` resolves only
the globals of :data:`cmjax.weights.torch_globals.ALLOWED_GLOBALS`, each to a harmless stand-in
(never to the real torch object), and raises :class:`CheckpointError` naming any other global.
Tensors are not built while unpickling: the stand-ins return checked
:class:`~cmjax.weights.torch_tensors.TensorRef` descriptions, and :func:`flatten` names them the
way ``state_dict()`` does.

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
import pickle
import re
from typing import Any, BinaryIO, Callable

import numpy as np

from cmjax.weights.errors import CheckpointError
from cmjax.weights.torch_globals import ALLOWED_GLOBALS, StorageType, plain_key
from cmjax.weights.torch_tensors import StorageRef, TensorRef, short_repr, tensor_problem

# Limits that keep a hostile file from costing memory or time out of proportion to its size.
# Real checkpoints stay far below them: a state dict nests one level, a TorchScript module two
# levels per submodule, and SD-sized checkpoints hold a few thousand tensors.
MAX_TENSORS = 100_000
MAX_DEPTH = 100


class ScriptObject:
    """A TorchScript object (module or class instance) reduced to its pickled attribute state.

    Subclassed per ``__torch__`` type name so error messages and ``repr`` can name the type;
    nothing of the original class (methods, ``__setstate__`` code) is ever run.
    """

    torch_type = "__torch__"
    state: Any = None  # set once, by the pickle's BUILD (see _load_build)

    def __repr__(self) -> str:
        return f"<TorchScript {self.torch_type}>"


def _kind(obj: Any) -> str:
    """What an object is, for messages (the stand-ins by what they stand for)."""
    if isinstance(obj, TensorRef):
        return "tensor"
    if isinstance(obj, StorageRef):
        return "storage"
    if isinstance(obj, ScriptObject):
        return f"TorchScript object {obj.torch_type} (already built)"
    return type(obj).__name__


# --------------------------------------------------------------------------------------------
# Opcodes that modify an object already built, checked.
#
# The C unpickler would let BUILD write into the stand-ins' attributes after they were validated
# and let SETITEM hash arbitrarily deep keys. Here BUILD is accepted only on a TorchScript object
# (once) or a dict (its attributes, e.g. ``_metadata``, are dropped); SETITEM(S)/DICT only on
# dicts with plain keys (strings, numbers, flat tuples); APPEND(S) only on lists; sets only of
# plain elements. Each handler replaces pickle._Unpickler's for its opcode (``up`` is the unpickler).


def _checked_items(up: RestrictedUnpickler, items: list, what: str) -> list:
    for key in items:
        if not plain_key(key):
            raise up.fail(f"{what} of type {type(key).__name__} (only strings, numbers and "
                          "flat tuples of them are accepted)")
    return items


def _target(up: RestrictedUnpickler, kind: type, opcode: str) -> Any:
    obj = up.stack[-1]
    if not isinstance(obj, kind):
        raise up.fail(f"{opcode} applied to a {_kind(obj)}, not a {kind.__name__}")
    return obj


def _load_build(up: RestrictedUnpickler) -> None:
    state = up.stack.pop()
    obj = up.stack[-1]
    if isinstance(obj, ScriptObject) and obj.state is None:
        obj.state = state  # BUILD hands over the attribute dict (or any __getstate__ value)
    elif type(obj) in (dict, collections.OrderedDict):
        pass  # state_dict()'s _metadata attribute: not needed, dropped
    else:
        raise up.fail(f"BUILD applied to a {_kind(obj)} (only TorchScript objects "
                      "and dicts take pickled state)")


def _load_setitem(up: RestrictedUnpickler) -> None:
    value, key = up.stack.pop(), up.stack.pop()
    _target(up, dict, "SETITEM")[_checked_items(up, [key], "dict key")[0]] = value


def _load_setitems(up: RestrictedUnpickler) -> None:
    items = up.pop_mark()
    keys = _checked_items(up, items[::2], "dict key")
    _target(up, dict, "SETITEMS").update(zip(keys, items[1::2]))


def _load_dict(up: RestrictedUnpickler) -> None:
    items = up.pop_mark()
    up.append(dict(zip(_checked_items(up, items[::2], "dict key"), items[1::2])))


def _load_append(up: RestrictedUnpickler) -> None:
    value = up.stack.pop()
    _target(up, list, "APPEND").append(value)


def _load_appends(up: RestrictedUnpickler) -> None:
    items = up.pop_mark()
    _target(up, list, "APPENDS").extend(items)


def _load_additems(up: RestrictedUnpickler) -> None:
    items = _checked_items(up, up.pop_mark(), "set element")
    _target(up, set, "ADDITEMS").update(items)


def _load_frozenset(up: RestrictedUnpickler) -> None:
    up.append(frozenset(_checked_items(up, up.pop_mark(), "set element")))


_CHECKED_OPCODES: dict[int, Callable[[RestrictedUnpickler], None]] = {
    pickle.BUILD[0]: _load_build,
    pickle.SETITEM[0]: _load_setitem,
    pickle.SETITEMS[0]: _load_setitems,
    pickle.DICT[0]: _load_dict,
    pickle.APPEND[0]: _load_append,
    pickle.APPENDS[0]: _load_appends,
    pickle.ADDITEMS[0]: _load_additems,
    pickle.FROZENSET[0]: _load_frozenset,
}


# --------------------------------------------------------------------------------------------
# The unpickler


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol-2 pickles spell some Python 3 names the Python 2 way ('__builtin__.eval'):
    normalised as pickle's own find_class does, so the allowlist and errors see one name."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that only rebuilds tensor descriptions; any other global is refused.

    ``storage_prefix``: the zip directory of the storages this pickle references (``"<root>/data/"``
    or ``"<root>/constants/"``); ``legacy=True``: storages are named by their root key. The
    pure-Python unpickler (``pickle._Unpickler``), so that the opcodes that mutate an object
    already built can be checked (``_CHECKED_OPCODES``); the pickles are small (the tensor bytes
    live in separate records), so the slower VM costs milliseconds.
    """

    dispatch = {**pickle._Unpickler.dispatch, **_CHECKED_OPCODES}

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

    def fail(self, problem: str) -> CheckpointError:
        """The error to raise for ``problem``, naming the file and the pickle inside it."""
        return CheckpointError(f"{self._path}: {problem} (in {self._member})")

    def find_class(self, module: str, name: str) -> Any:
        """Return a harmless stand-in for an allowlisted global; raise for anything else."""
        module, name = _python3_name(module, name)
        if module == "__torch__" or module.startswith("__torch__."):
            return self._script_type(f"{module}.{name}", name)
        factory = ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise self.fail(f"forbidden global '{module}.{name}': only tensor-rebuilding globals are "
                            f"allowed, refusing to run code from the checkpoint")
        return factory(self)

    def _script_type(self, qual: str, name: str) -> type:
        """A TorchScript class: an inert container of the pickled attributes, one per name."""
        # The qualified name must look like an identifier path (it only ever names a type here).
        if not re.fullmatch(r"[A-Za-z_][\w.]*", qual):
            raise self.fail(f"malformed TorchScript type name {qual!r}")
        if qual not in self._script_types:
            self._script_types[qual] = type(name, (ScriptObject,), {"torch_type": qual})
        return self._script_types[qual]

    def persistent_load(self, pid: Any) -> StorageRef:
        """Return the :class:`StorageRef` for a ``('storage', type, key, location, numel[, view])``
        persistent id, after checking its shape."""
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise self.fail(f"unsupported persistent id {short_repr(pid)}")
        if len(pid) != (6 if self._legacy else 5):
            raise self.fail(f"malformed storage id {short_repr(pid)}")
        stype, key, numel = pid[1], pid[2], pid[4]
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(stype, StorageType):
            raise self.fail(f"storage id {short_repr(pid)} does not name a storage type")
        if stype.dtype is None:
            raise self.fail(f"unsupported storage type torch.{stype.name}")
        if not isinstance(key, str) or not re.fullmatch(r"[\w.-]+", key):
            raise self.fail(f"malformed storage key {short_repr(key)}")
        if not isinstance(numel, int) or numel < 0:
            raise self.fail(f"malformed storage size {short_repr(numel)}")
        if not self._legacy:
            return StorageRef(self._prefix + key, stype.dtype, numel)
        return self._legacy_storage(key, stype.dtype, numel, pid[5])

    def _legacy_storage(self, key: str, dtype: np.dtype, numel: int, view: Any) -> StorageRef:
        """Legacy ids carry an optional view of their root storage: (view_key, element offset, count)."""
        self.legacy_dtypes.setdefault(key, dtype)
        if view is None:
            return StorageRef(key, dtype, numel)
        if (not isinstance(view, tuple) or len(view) != 3
                or not all(isinstance(v, int) and v >= 0 for v in view[1:])):
            raise self.fail(f"malformed storage view {short_repr(view)}")
        return StorageRef(key, dtype, view[2], base=view[1])

    def rebuild(self, storage: Any, offset: Any, shape: Any, stride: Any,
                dtype: np.dtype | None = None) -> TensorRef:
        """Validate a tensor description; return it as a :class:`TensorRef`."""
        if not isinstance(storage, StorageRef):
            raise self.fail(f"tensor rebuilt from a non-storage {type(storage).__name__}")
        dtype = storage.dtype if dtype is None else np.dtype(dtype)
        problem = tensor_problem(storage, offset, shape, stride, dtype)
        if problem:
            raise self.fail(problem)
        return TensorRef(storage, offset, shape, stride, dtype)


def unpickle(up: RestrictedUnpickler, path: str, member: str) -> Any:
    """Run a restricted unpickler, turning every failure into a CheckpointError."""
    try:
        return up.load()
    except CheckpointError:
        raise
    except Exception as e:  # corrupt pickles raise a zoo of types; report them uniformly
        raise CheckpointError(f"{path}: cannot unpickle {member}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------
# Flattening the unpickled tree into state_dict-style names


def flatten(obj: Any, path: str) -> list[tuple[str, TensorRef]]:
    """Return ``(dotted name, tensor)`` pairs for every tensor reachable from ``obj``.

    TorchScript objects and dicts contribute their keys, lists/tuples their indices; anything
    that is not a tensor (flags, ints, strings, devices) is skipped, as ``state_dict()`` does.
    Each container is visited once, under the first name that reaches it: a pickle may share
    objects (a list holding the previous list twice, 40 deep, is 2**40 paths in 1 KB) and
    walking them as a tree would never end. A tensor reached twice (tied weights) gets both names.
    Raises CheckpointError on duplicate names, more than ``MAX_TENSORS`` tensors or nesting
    deeper than ``MAX_DEPTH``.
    """
    out: dict[str, TensorRef] = {}
    seen: set[int] = set()  # ids of the containers visited (all alive: they are part of obj)

    def visit(node: Any, prefix: str, depth: int) -> None:
        if isinstance(node, TensorRef):
            if prefix in out:
                raise CheckpointError(f"{path}: duplicate tensor name {prefix!r} after flattening")
            if len(out) >= MAX_TENSORS:
                raise CheckpointError(f"{path}: more than {MAX_TENSORS} tensors")
            out[prefix] = node
            return
        if isinstance(node, ScriptObject):
            node = node.state
            if isinstance(node, (TensorRef, ScriptObject)):
                node = (node,)
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        else:
            return
        if id(node) in seen:
            return
        if depth >= MAX_DEPTH:
            raise CheckpointError(f"{path}: objects nested more than {MAX_DEPTH} levels deep")
        seen.add(id(node))
        for k, v in items:
            visit(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)

    visit(obj, "", 0)
    return list(out.items())


def select(obj: Any, key: str | None, path: str) -> Any:
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
        if isinstance(node, ScriptObject):
            node = node.state
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise CheckpointError(f"{path}: no entry {key!r} in the checkpoint")
    return node
