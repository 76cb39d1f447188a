"""PyTorch state-dict names and layouts -> Flax params, checked against the model's own params.

cmjax modules are named after their diffusers counterparts: the last two segments of a torch key
are the leaf module and the parameter, everything before is the name of one Flax module:

    down_blocks.0.resnets.1.conv1.weight  ->  down_blocks.0.resnets.1 / conv1 / kernel
    time_embedding.linear_1.bias          ->  time_embedding / linear_1 / bias
    conv_in.weight                        ->  conv_in / kernel

A torch ``weight`` becomes whatever the Flax leaf module holds (``kernel`` for convs and linears,
``scale`` for norms, ``embedding`` for embeddings); layouts: conv OIHW -> HWIO, linear (out, in)
-> (in, out).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


class ConversionError(ValueError):
    """Weights that do not fit the model; the message lists every difference."""


def flax_path(torch_key: str) -> tuple[str, ...]:
    """``a.0.b.1.leaf.param`` -> (``a.0.b.1``, ``leaf``, ``param``) (torch param name kept)."""
    parts = torch_key.split(".")
    if len(parts) < 2:
        raise ConversionError(f"unexpected parameter name {torch_key!r}")
    prefix = ".".join(parts[:-2])
    return ((prefix,) if prefix else ()) + tuple(parts[-2:])


def _to_flax_layout(name: str, value: np.ndarray) -> np.ndarray:
    if name == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    if name == "kernel" and value.ndim == 2:
        return value.T  # (out, in) -> (in, out)
    return value


def _to_torch_layout(name: str, value: np.ndarray) -> np.ndarray:
    if name == "kernel" and value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
    if name == "kernel" and value.ndim == 2:
        return value.T
    return value


def _leaf_name(module: Mapping[str, Any], torch_name: str) -> str | None:
    """The Flax param in ``module`` that a torch param name corresponds to."""
    if torch_name == "bias":
        return "bias" if "bias" in module else None
    if torch_name == "weight":
        found = [n for n in ("kernel", "scale", "embedding") if n in module]
        return found[0] if len(found) == 1 else None
    return None


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any] | None:
    node: Any = tree
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node if isinstance(node, Mapping) else None


def torch_to_flax(state: Mapping[str, np.ndarray], abstract: Any, *, dtype: Any = np.float32,
                  source: str = "weights") -> dict:
    """Map a torch state dict onto the structure of ``abstract`` (a params tree of ShapeDtypeStructs).

    Requires exact key-set equality and identical shapes; any difference raises ConversionError
    listing the missing, unexpected and mismatched keys. Values are cast to ``dtype`` (None keeps
    the source dtype). Non-float weights (int, bool) and non-finite values (in any float dtype,
    bfloat16 and fp8 included) are refused by name.
    """
    flat_abstract = {tuple(k.key for k in path): leaf
                     for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    out: dict[tuple[str, ...], np.ndarray] = {}
    seen: set[tuple[str, ...]] = set()
    unexpected, mismatched, nonfinite, wrong_type = [], [], [], []
    for key, value in state.items():
        *module_path, torch_name = flax_path(key)
        module = _lookup(abstract, tuple(module_path))
        leaf = _leaf_name(module, torch_name) if module is not None else None
        target = flat_abstract.get((*module_path, leaf)) if leaf else None
        if target is None:
            unexpected.append(key)
            continue
        seen.add((*module_path, leaf))
        value = _to_flax_layout(leaf, np.asarray(value))
        if value.shape != tuple(target.shape):
            mismatched.append(f"{key}: got {tuple(value.shape)} (Flax layout), model needs {tuple(target.shape)}")
            continue
        if not jnp.issubdtype(value.dtype, jnp.floating):  # jnp's knows bfloat16 and fp8
            wrong_type.append(f"{key}: {value.dtype}")
            continue
        if not np.isfinite(value).all():
            nonfinite.append(key)
        out[(*module_path, leaf)] = value if dtype is None else value.astype(dtype, copy=False)
    missing = [torch_key_for(p) for p in flat_abstract if p not in seen]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched),
                         ("NaN/inf values", nonfinite), ("not floating point", wrong_type)):
        if items:
            shown = "\n    ".join(sorted(items)[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"  {title} ({len(items)}):\n    {shown}")
    if problems:
        raise ConversionError(f"{source}: weights do not match the model:\n" + "\n".join(problems))
    return unflatten(out)


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """{(a, b, c): v} -> {a: {b: {c: v}}}: a params tree from path-keyed leaves."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return tree


def torch_key_for(path: tuple[str, ...]) -> str:
    """The torch name of a Flax param path, e.g. (``down_blocks.0.resnets.1``, ``conv1``, ``kernel``)
    -> ``down_blocks.0.resnets.1.conv1.weight``: the inverse of ``flax_path`` and the leaf renaming."""
    *module, leaf = path
    return ".".join([*module, "bias" if leaf == "bias" else "weight"])


def flax_to_torch(params: Any) -> dict[str, np.ndarray]:
    """Inverse of ``torch_to_flax``: Flax params -> torch-named, torch-layout numpy arrays."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in path)
        out[torch_key_for(keys)] = np.ascontiguousarray(_to_torch_layout(keys[-1], np.asarray(leaf)))
    return out
