"""Rename OpenAI consistency-decoder parameters (``decoder.pt``) to diffusers ``UNet2DModel`` names.

OpenAI's network ships as a TorchScript archive whose modules use short names (``embed_image``,
``blocks.down_0_conv_0.gn_1.g`` ...); diffusers' ``UNet2DModel`` (and the ``decoder_unet.*`` part
of ``ConsistencyDecoderVAE``) uses ``conv_in``, ``down_blocks.0.resnets.0.norm1.weight`` ...
The correspondence below was recovered by diffusers' ``scripts/convert_consistency_decoder.py``:

* ``down_{i}_conv_{j}`` -> ``down_blocks.{i}.resnets.{j}``; ``down_{i}_downsamp`` ->
  ``down_blocks.{i}.downsamplers.0``; ``mid_{k}`` -> ``mid_block.resnets.{k}``.
* The up path is numbered the other way round: OpenAI's ``up_{i}`` works at the resolution of
  ``down_{i}`` (``up_0`` is the last, full-resolution level) while diffusers' ``up_blocks.0`` is
  the first, coarsest one, so ``up_{i}`` -> ``up_blocks.{L-1-i}`` with ``L`` levels.
* Inside a residual block ``gn_1, f_1, f_t, gn_2, f_2, f_s`` are ``norm1, conv1, time_emb_proj,
  norm2, conv2, conv_shortcut``; parameters ``.w``/``.b`` are ``.weight``/``.bias`` and a
  GroupNorm's scale ``.g`` is ``.weight``.

Renaming (``openai_state_to_diffusers``) changes only names; values and their torch layouts pass
through untouched. ``decoder_from_openai_state`` then finds the timestep table (which some copies
keep apart or as a TorchScript constant), infers the architecture from the shapes and maps the
tensors onto cmjax's params; ``load_openai_decoder`` does all of it for a file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from cmjax.models.decoder_config import Decoder
from cmjax.weights.diffusers import decoder_from_diffusers_state, read_safetensors
from cmjax.weights.mapping import ConversionError
from cmjax.weights.torch_pickle import load_torch_file

__all__ = ["openai_to_diffusers_name", "openai_state_to_diffusers", "diffusers_to_openai_name", "looks_like_openai",
           "count_levels", "find_timestep_table", "decoder_from_openai_state", "load_openai_decoder",
           "PAIR_WEIGHTS", "PAIR_EMBEDDING"]

# The two files of the "extracted" copy of decoder.pt (OpenAI names, the table kept apart).
PAIR_WEIGHTS = "consistency_decoder.safetensors"
PAIR_EMBEDDING = "embedding.safetensors"
TABLE = "embed_time.emb.weight"

# Names outside the block stack, by module path (the parameter suffix is mapped separately).
_TOP_MODULES = {
    "embed_image.f": ("conv_in", "conv"),
    "embed_time.emb": ("time_proj", "embedding"),
    "embed_time.f_1": ("time_embedding.linear_1", "conv"),
    "embed_time.f_2": ("time_embedding.linear_2", "conv"),
    "output.gn": ("conv_norm_out", "norm"),
    "output.f": ("conv_out", "conv"),
}

# Sub-modules of a residual block: diffusers name and parameter kind.
_BLOCK_PARTS = {
    "gn_1": ("norm1", "norm"),
    "f_1": ("conv1", "conv"),
    "f_t": ("time_emb_proj", "conv"),
    "gn_2": ("norm2", "norm"),
    "f_2": ("conv2", "conv"),
    "f_s": ("conv_shortcut", "conv"),
}

# Parameter suffixes per kind. TorchScript files use w/b (conv, linear) and g/b (GroupNorm);
# weight/bias are accepted too, as in state dicts re-saved from an nn.Module port.
_PARAMS = {
    "conv": {"w": "weight", "b": "bias", "weight": "weight", "bias": "bias"},
    "norm": {"g": "weight", "b": "bias", "weight": "weight", "bias": "bias"},
    "embedding": {"weight": "weight", "w": "weight"},
}

_BLOCK_RE = re.compile(
    r"blocks\.(?:(?P<dir>down|up)_(?P<level>\d+)_(?:conv_(?P<j>\d+)|(?P<samp>downsamp|upsamp))"
    r"|mid_(?P<mid>\d+))\.(?P<part>\w+)\.(?P<param>\w+)"
)


def _param(name: str, kind: str, suffix: str) -> str:
    try:
        return _PARAMS[kind][suffix]
    except KeyError:
        raise ValueError(f"unknown OpenAI consistency-decoder parameter {name!r}") from None


def openai_to_diffusers_name(name: str, num_levels: int = 4) -> str:
    """Return the diffusers ``UNet2DModel`` name of an OpenAI ``decoder.pt`` parameter.

    ``num_levels`` is the number of resolution levels (4 for the released decoder); it fixes the
    reversal of the up path, ``blocks.up_{i}_*`` -> ``up_blocks.{num_levels-1-i}.*``.
    Raises ValueError naming ``name`` if it is not a consistency-decoder parameter name.
    """
    unknown = ValueError(f"unknown OpenAI consistency-decoder parameter {name!r}")
    module, _, suffix = name.rpartition(".")
    if module in _TOP_MODULES:
        target, kind = _TOP_MODULES[module]
        return f"{target}.{_param(name, kind, suffix)}"
    m = _BLOCK_RE.fullmatch(name)
    if m is None or m["part"] not in _BLOCK_PARTS:
        raise unknown
    part, kind = _BLOCK_PARTS[m["part"]]
    param = _param(name, kind, m["param"])
    if m["mid"] is not None:
        return f"mid_block.resnets.{int(m['mid'])}.{part}.{param}"
    level = int(m["level"])
    if level >= num_levels:
        raise ValueError(f"OpenAI parameter {name!r} has level {level}, but num_levels is "
                         f"{num_levels}")
    if m["dir"] == "down":
        if m["samp"] == "upsamp":
            raise unknown
        block = f"down_blocks.{level}"
        sub = "downsamplers.0" if m["samp"] else f"resnets.{int(m['j'])}"
    else:
        if m["samp"] == "downsamp":
            raise unknown
        block = f"up_blocks.{num_levels - 1 - level}"
        sub = "upsamplers.0" if m["samp"] else f"resnets.{int(m['j'])}"
    return f"{block}.{sub}.{part}.{param}"


def openai_state_to_diffusers(state: Mapping[str, Any], num_levels: int = 4,
                              embedding: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return ``state`` with every key renamed by :func:`openai_to_diffusers_name`.

    ``embedding`` is the separate ``embedding.safetensors`` dict (key ``weight``, the 1024x320
    timestep table) that some extracted copies of the decoder keep apart; it becomes
    ``time_proj.weight`` when ``state`` has no ``embed_time.emb`` entry. Giving the table twice
    is refused. Values are passed through unchanged; a missing key is left missing (the
    converter's key-set check reports it).

    Raises ValueError on an unknown name, two names mapping to the same key, or a bad
    ``embedding`` dict.
    """
    out: dict[str, Any] = {}
    for k, v in state.items():
        new = openai_to_diffusers_name(k, num_levels)
        if new in out:
            raise ValueError(f"two OpenAI parameters map to {new!r} (second one: {k!r})")
        out[new] = v
    if embedding is not None:
        if set(embedding) != {"weight"}:
            raise ValueError(f"embedding dict must hold exactly the key 'weight', got "
                             f"{sorted(embedding)}")
        if "time_proj.weight" in out:
            raise ValueError("timestep embedding given twice: embed_time.emb.weight is in the "
                             "state and a separate embedding dict was passed")
        out["time_proj.weight"] = embedding["weight"]
    return out


# --------------------------------------------------------------------------------------------
# Whole checkpoints: OpenAI-named tensors -> Decoder

# A name is OpenAI's if one of these module paths appears in it (possibly behind a prefix such as
# "model." when the UNet was saved inside a wrapper).
_OPENAI_NAME_RE = re.compile(
    r"(?P<prefix>(?:[\w]+\.)*?)(?:embed_image\.f|embed_time\.(?:emb|f_1|f_2)|output\.(?:gn|f)"
    r"|blocks\.(?:(?:down|up)_\d+_(?:conv_\d+|downsamp|upsamp)|mid_\d+)\.\w+)\.\w+")
_LEVEL_RE = re.compile(r"blocks\.down_(\d+)_")


def looks_like_openai(names: Iterable[str]) -> bool:
    """True if the tensor names are OpenAI consistency-decoder names (``embed_image.f.w``,
    ``blocks.down_0_conv_0.gn_1.g`` ...), possibly behind a common prefix."""
    return any((m := _OPENAI_NAME_RE.fullmatch(n)) and ("blocks." in n[len(m["prefix"]):][:7]
                                                       or "embed_image.f." in n) for n in names)


def _common_prefix(names: Iterable[str]) -> str:
    """The prefix in front of the OpenAI names ("" for bare names); the shortest one seen."""
    found = {m["prefix"] for n in names if (m := _OPENAI_NAME_RE.fullmatch(n))}
    return min(found, key=len) if found else ""


def count_levels(names: Iterable[str]) -> int:
    """Number of resolution levels: one more than the highest ``blocks.down_{i}_`` index."""
    levels = {int(m.group(1)) for n in names if (m := _LEVEL_RE.match(n))}
    if not levels:
        raise ValueError("no blocks.down_{i}_* tensors: cannot count the UNet's levels")
    return max(levels) + 1


def find_timestep_table(candidates: Mapping[str, np.ndarray], width: int, timesteps: int = 1024
                        ) -> tuple[str, np.ndarray] | list[str]:
    """Pick the timestep table among tensors that are not named ``embed_time.emb.weight``.

    ``candidates``: tensors with unknown names and TorchScript constants; ``width``: the table's
    row size (the UNet's first channel width, seen in ``embed_time.f_1``). A candidate is a 2-D
    floating (rows, width) tensor; with several, the one with ``timesteps`` rows wins if unique.
    Returns ``(name, table)``, or the list of the names considered when none or several fit.
    """
    fits = {k: v for k, v in candidates.items()
            if getattr(v, "ndim", 0) == 2 and v.shape[1] == width and v.shape[0] > 1
            and np.issubdtype(v.dtype, np.floating)}
    if len(fits) > 1:
        fits = {k: v for k, v in fits.items() if v.shape[0] == timesteps} or fits
    if len(fits) == 1:
        return next(iter(fits.items()))
    return sorted(fits)


def _describe(tensors: Mapping[str, Any], limit: int = 8) -> str:
    items = [f"{k} {tuple(getattr(v, 'shape', ()))}" for k, v in list(tensors.items())[:limit]]
    more = f", ... ({len(tensors) - limit} more)" if len(tensors) > limit else ""
    return ", ".join(items) + more


def decoder_from_openai_state(state: Mapping[str, np.ndarray], *, source: str, dtype: Any = np.float32,
                              constants: Mapping[str, np.ndarray] | None = None,
                              embedding: Mapping[str, np.ndarray] | None = None,
                              report: Callable[[str], None] | None = None) -> Decoder:
    """Build a Decoder from tensors with OpenAI names (``decoder.pt``'s, or the extracted pair's).

    ``constants``: TorchScript constants (``CONSTANTS.c<i>``), searched for the timestep table when
    ``embed_time.emb.weight`` is absent (a traced module keeps a non-parameter table there);
    tensors of ``state`` with unknown names are searched too, the rest refused. ``embedding``: the
    separate ``embedding.safetensors`` dict (key ``weight``). The architecture is read off the
    shapes (GroupNorm groups are not recorded: 32, the released model's, is assumed).
    ``dtype``: params' dtype (None keeps the source's). Raises ConversionError naming ``source``.
    """
    say = report or (lambda _msg: None)
    prefix = _common_prefix(state)
    if prefix:
        say(f"stripping the prefix {prefix!r} from the tensor names")
    try:
        levels = count_levels(k[len(prefix):] for k in state if k.startswith(prefix))
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
    known: dict[str, np.ndarray] = {}
    unknown: dict[str, np.ndarray] = {}
    for key, value in state.items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        try:
            openai_to_diffusers_name(name, levels)
        except ValueError:
            unknown[key] = value
            continue
        if name in known:
            raise ConversionError(f"{source}: duplicate tensor {name!r} (with and without the prefix {prefix!r})")
        known[name] = value

    table_from = None
    if TABLE not in known and embedding is None:
        f_1 = known.get("embed_time.f_1.w", known.get("embed_time.f_1.weight"))
        conv_in = known.get("embed_image.f.w", known.get("embed_image.f.weight"))
        width = f_1.shape[1] if f_1 is not None else conv_in.shape[0] if conv_in is not None else None
        pool = {**unknown, **(constants or {})}
        found = find_timestep_table(pool, width) if width is not None else []
        if isinstance(found, list):
            what = (f"several tensors could be it: {found}" if found else
                    "embed_time.f_1 is missing too, so it cannot be looked for" if width is None else
                    f"no (timesteps, {width}) tensor among the other tensors or the TorchScript constants")
            raise ConversionError(
                f"{source}: the timestep embedding table {TABLE!r} is missing and {what}. If you have the "
                f"extracted copy, put {PAIR_EMBEDDING} (key 'weight') beside {PAIR_WEIGHTS}")
        table_from, table = found
        unknown.pop(table_from, None)
        embedding = {"weight": table}
        say(f"timestep table {TABLE!r} found as {table_from!r} {tuple(table.shape)}")
    if unknown:
        raise ConversionError(f"{source}: {len(unknown)} tensors are not part of OpenAI's consistency decoder: "
                              f"{_describe(unknown)}")
    try:
        renamed = openai_state_to_diffusers(known, levels, embedding=embedding)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
    needed = ["conv_in.weight", "conv_out.weight", "time_proj.weight", "time_embedding.linear_1.weight",
              *(f"down_blocks.{i}.resnets.0.conv1.weight" for i in range(levels))]
    missing = [diffusers_to_openai_name(k, levels) for k in needed if k not in renamed]
    if missing:
        raise ConversionError(f"{source}: cannot infer the architecture from the tensor shapes: "
                              f"{', '.join(missing)} missing")
    return decoder_from_diffusers_state(renamed, source=source, dtype=dtype)


def load_openai_decoder(path: str | Path, *, dtype: Any = np.float32,
                        report: Callable[[str], None] | None = None) -> Decoder:
    """Read an OpenAI-named checkpoint file into a Decoder, without torch.

    ``path``: OpenAI's TorchScript ``decoder.pt``, a ``torch.save`` pickle of its state dict, or
    the extracted ``consistency_decoder.safetensors`` (its ``embedding.safetensors`` is taken from
    the same folder when the table is not in the file itself).
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        state = read_safetensors(path)
        embedding = None
        if TABLE not in state and not any(k.endswith("." + TABLE) for k in state):
            beside = path.parent / PAIR_EMBEDDING
            if beside.is_file() and beside != path:
                embedding = read_safetensors(beside)
                if report:
                    report(f"timestep table from {beside}")
        return decoder_from_openai_state(state, source=str(path), dtype=dtype, embedding=embedding,
                                         report=report)
    tensors = load_torch_file(path, include_constants=True)
    constants = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("CONSTANTS.c")]}
    return decoder_from_openai_state(tensors, source=str(path), dtype=dtype, constants=constants,
                                     report=report)


_DIFFUSERS_BLOCK_RE = re.compile(
    r"(?:(?P<dir>down|up)_blocks\.(?P<level>\d+)\.(?:resnets\.(?P<j>\d+)|(?P<samp>downsamplers|upsamplers)\.0)"
    r"|mid_block\.resnets\.(?P<mid>\d+))\.(?P<part>\w+)\.(?P<param>weight|bias)")


def diffusers_to_openai_name(name: str, num_levels: int = 4) -> str:
    """Inverse of :func:`openai_to_diffusers_name` (OpenAI's own ``w``/``b``/``g`` suffixes)."""
    top = {target: (module, kind) for module, (target, kind) in _TOP_MODULES.items()}
    module, _, param = name.rpartition(".")
    if module in top:
        openai_module, kind = top[module]
        suffix = {"conv": {"weight": "w", "bias": "b"}, "norm": {"weight": "g", "bias": "b"},
                  "embedding": {"weight": "weight"}}[kind].get(param)
        if suffix:
            return f"{openai_module}.{suffix}"
        raise ValueError(f"unknown diffusers UNet2DModel parameter {name!r}")
    m = _DIFFUSERS_BLOCK_RE.fullmatch(name)
    parts = {target: (part, kind) for part, (target, kind) in _BLOCK_PARTS.items()}
    if m is None or m["part"] not in parts:
        raise ValueError(f"unknown diffusers UNet2DModel parameter {name!r}")
    part, kind = parts[m["part"]]
    suffix = {"weight": "g" if kind == "norm" else "w", "bias": "b"}[m["param"]]
    if m["mid"] is not None:
        return f"blocks.mid_{int(m['mid'])}.{part}.{suffix}"
    level = int(m["level"])
    if m["dir"] == "down":
        block = f"down_{level}_" + ("downsamp" if m["samp"] else f"conv_{int(m['j'])}")
    else:
        block = f"up_{num_levels - 1 - level}_" + ("upsamp" if m["samp"] else f"conv_{int(m['j'])}")
    if m["samp"] and m["samp"] != ("downsamplers" if m["dir"] == "down" else "upsamplers"):
        raise ValueError(f"unknown diffusers UNet2DModel parameter {name!r}")
    return f"blocks.{block}.{part}.{suffix}"
