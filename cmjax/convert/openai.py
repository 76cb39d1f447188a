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

Only names change here; values (and their torch layouts) pass through untouched.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["openai_to_diffusers_name", "openai_state_to_diffusers"]

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
