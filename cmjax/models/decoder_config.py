"""The consistency decoder as a model: its config, every config field's bounds, the Decoder record.

    DecoderConfig   the UNet's architecture (``decoder_unet.UNetConfig``) and the latent space it
                    decodes: channels, scaling/shift, per-channel mean/std, upsampling factor,
                    sigma_data; stored as cmjax.json beside checkpoints (``to_dict``/``from_dict``)
    Field, UNET_FIELDS, DECODER_FIELDS, check_fields
                    what each field may hold, checked before anything is built from a config
    Decoder         config + params: what ``cmjax.load_decoder`` returns and ``cmjax.decode`` runs
    make_network, init_params, abstract_params
                    the Flax network of a config, its random params, their shapes

The defaults are OpenAI's released SD 1.x decoder. The decode path that runs a Decoder is
:mod:`cmjax.decoding.decoder`; checkpoints are read and written by :mod:`cmjax.weights`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cmjax.models.conv_lowering import XLA, LoweringPlan
from cmjax.models.decoder_unet import ConsistencyUNet, UNetConfig
from cmjax.noise_levels import SIGMA_DATA

# Per-channel statistics of SD 1.x latents (after the 0.18215 scaling) that OpenAI normalises with.
LATENT_MEAN = (0.38862467, 0.02253063, 0.07381133, -0.0171294)
LATENT_STD = (0.9654121, 1.0440036, 0.76147926, 0.77022034)
SCALING_FACTOR = 0.18215
IMAGE_CHANNELS = 3


class ConfigError(ValueError):
    """A decoder config with a field of the wrong type or out of bounds; the message names it."""


@dataclasses.dataclass(frozen=True)
class Field:
    """What one config field may hold: checked before anything is built from a config.

    ``kind``: "int", "float", "ints" or "floats" (a list/tuple of those); ``low``/``high``:
    inclusive bounds on each value; ``length``: (min, max) items for the list kinds;
    ``optional``: None is allowed; ``required``: must be present in a stored config (fields
    added after version 1 of the checkpoint format are not, and take the dataclass default).
    """

    kind: str
    low: float
    high: float
    length: tuple[int, int] = (1, 1)
    optional: bool = False
    required: bool = True

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None."""
        if value is None:
            return None if self.optional else "is missing (null)"
        many = self.kind in ("ints", "floats")
        if many:
            if not isinstance(value, (list, tuple, np.ndarray)):
                return f"must be a list, got {type(value).__name__}"
            if not self.length[0] <= len(value) <= self.length[1]:
                return f"must have {self.length[0]} to {self.length[1]} items, got {len(value)}"
        for v in (value if many else (value,)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer) if self.kind.startswith("int")
                                                    else (int, float, np.integer, np.floating)):
                want = "an integer" if self.kind.startswith("int") else "a number"
                return f"must be {want}, got {type(v).__name__} {str(v)[:40]!r}"
            if not (self.low <= v <= self.high):  # False for NaN too
                return f"must lie in [{self.low:g}, {self.high:g}], got {v}"
        return None


# Bounds on every field, checked before anything is built (an absurd config would otherwise run
# for minutes inside eval_shape or allocate without end). Wide enough for any model in reach of
# this code; a new config field is one new line here (``required=False`` if stored checkpoints
# predate it).
UNET_FIELDS: dict[str, Field] = {
    "in_channels": Field("int", 1, 1024),
    "out_channels": Field("int", 1, 1024),
    "block_out_channels": Field("ints", 1, 16384, length=(1, 8)),
    "layers_per_block": Field("int", 1, 16),
    "norm_num_groups": Field("int", 1, 1024),
    "norm_eps": Field("float", 1e-12, 1.0),
    "num_train_timesteps": Field("int", 2, 100_000),
    "time_embed_dim": Field("int", 1, 65536, optional=True),
}
DECODER_FIELDS: dict[str, Field] = {
    "latent_channels": Field("int", 1, 1021),
    "upsample_factor": Field("int", 1, 64),
    "scaling_factor": Field("float", 1e-6, 1e6),
    "latent_mean": Field("floats", -1e6, 1e6, length=(1, 1021)),
    "latent_std": Field("floats", 1e-12, 1e6, length=(1, 1021)),
    "sigma_data": Field("float", 1e-6, 1e6),
    "shift_factor": Field("float", -1e6, 1e6, required=False),  # added after version 1
}


def check_fields(values: Any, fields: dict[str, Field], where: str = "config", prefix: str = "",
                 complete: bool = False) -> None:
    """Raise ConfigError unless ``values`` is a dict whose keys are all in ``fields`` and whose
    values satisfy them; with ``complete``, required fields must be present too (a stored config).

    The message reads ``"{where}: field {prefix}{name} {problem}"``: ``where`` names the file,
    ``prefix`` the enclosing fields (e.g. ``"config.unet."``).
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: field {prefix.rstrip('.') or 'config'} must be a JSON object, "
                          f"got {type(values).__name__}")
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(prefix + k for k in unknown)[:200]}")
    for name, field in fields.items():
        if name not in values:
            if complete and field.required:
                raise ConfigError(f"{where}: field {prefix}{name} is missing")
            continue
        problem = field.problem(values[name])
        if problem:
            raise ConfigError(f"{where}: field {prefix}{name} {problem}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything needed to rebuild a decoder besides its params; stored beside checkpoints.

    The latent space: ``latent_channels`` raw latents are normalised to
    ``((z - shift_factor) * scaling_factor - latent_mean) / latent_std`` per channel. The defaults
    are OpenAI's SD 1.x decoder's; a decoder for another VAE stores that VAE's scaling/shift and the
    per-channel statistics of its scaled latents (``python -m cmjax.eval latent-stats``). cmjax.json
    files written before ``shift_factor`` existed load with shift 0, i.e. unchanged.
    """

    unet: UNetConfig = UNetConfig()
    latent_channels: int = 4
    upsample_factor: int = 8  # latent -> pixel resolution
    scaling_factor: float = SCALING_FACTOR
    latent_mean: tuple[float, ...] = LATENT_MEAN
    latent_std: tuple[float, ...] = LATENT_STD
    sigma_data: float = SIGMA_DATA
    shift_factor: float = 0.0

    def __post_init__(self):
        unet = self.unet if isinstance(self.unet, dict) else dataclasses.asdict(self.unet)
        check_fields(unet, UNET_FIELDS, "DecoderConfig", "unet.")
        check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unet"},
                     DECODER_FIELDS, "DecoderConfig")
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig(**self.unet))
        object.__setattr__(self, "latent_mean", tuple(float(v) for v in self.latent_mean))
        object.__setattr__(self, "latent_std", tuple(float(v) for v in self.latent_std))
        object.__setattr__(self, "scaling_factor", float(self.scaling_factor))
        object.__setattr__(self, "shift_factor", float(self.shift_factor))
        if self.unet.in_channels != IMAGE_CHANNELS + self.latent_channels:
            raise ValueError(f"UNet in_channels {self.unet.in_channels} != 3 image + {self.latent_channels} latent channels")
        if self.unet.out_channels < IMAGE_CHANNELS:
            raise ValueError(f"UNet out_channels {self.unet.out_channels} < 3")
        if len(self.latent_mean) != self.latent_channels or len(self.latent_std) != self.latent_channels:
            raise ValueError("latent_mean and latent_std need one value per latent channel")
        if not all(s > 0 for s in self.latent_std) or not self.scaling_factor:
            raise ValueError("latent_std must be positive and scaling_factor non-zero")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config", prefix: str = "") -> "DecoderConfig":
        """The config stored by ``to_dict`` (e.g. in cmjax.json); every field is checked first.

        Raises ConfigError naming ``where`` (the file), the field (after ``prefix``) and the
        problem: unknown, missing, wrong type, out of bounds, or fields that do not fit together.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: field {prefix.rstrip('.') or 'config'} must be a JSON object, "
                              f"got {type(d).__name__}")
        check_fields({k: v for k, v in d.items() if k != "unet"}, DECODER_FIELDS, where, prefix, complete=True)
        if "unet" not in d:
            raise ConfigError(f"{where}: field {prefix}unet is missing")
        check_fields(d["unet"], UNET_FIELDS, where, f"{prefix}unet.", complete=True)
        try:
            return cls(**{**d, "unet": UNetConfig(**d["unet"])})
        except ValueError as e:  # consistency between fields (channels vs groups, in_channels ...)
            raise ConfigError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A consistency decoder: its config and its params pytree (``{"params": ...}``-free, plain dict).

    ``prepared`` holds, for the last latent shape, dtype and lowering plan decoded, the params plus the kernels
    their conv lowerings prepare (:func:`cmjax.decoding.decoder.prepared_params`; on CPU, Winograd's
    transformed kernels, up to 16/9 the size of the convs that use them), so that repeated decodes
    of one shape prepare them once; ``release_prepared()`` frees them. Replace params with
    ``dataclasses.replace`` (a new Decoder), never in place.
    """

    config: DecoderConfig
    params: Any
    prepared: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def network(self, dtype=jnp.float32, lowering: LoweringPlan = XLA) -> ConsistencyUNet:
        return make_network(self.config, dtype, lowering=lowering)

    def release_prepared(self) -> None:
        self.prepared.clear()


def make_network(config: DecoderConfig, dtype=jnp.float32, param_dtype=jnp.float32,
                 lowering: LoweringPlan = XLA, remat: bool = False) -> ConsistencyUNet:
    return ConsistencyUNet(config.unet, dtype=dtype, param_dtype=param_dtype, lowering=lowering, remat=remat)


def init_params(config: DecoderConfig, key: jax.Array, param_dtype=jnp.float32) -> Any:
    """Random params (Flax's default init) for ``config``; for training from scratch and tests."""
    net = make_network(config, param_dtype=param_dtype)
    size = 2 * config.unet.downsample_factor
    x = jnp.zeros((1, size, size, config.unet.in_channels))
    return net.init(key, x, jnp.zeros((1,), jnp.int32))["params"]


def abstract_params(config: DecoderConfig, param_dtype=jnp.float32) -> Any:
    """The params' shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), nothing allocated. Traced
    once per config and dtype in a process (about 1 s for the full-size decoder); each call gets a
    tree of its own."""
    return jax.tree.map(lambda a: a, _traced_params(config, jnp.dtype(param_dtype)))


@functools.lru_cache(maxsize=16)
def _traced_params(config: DecoderConfig, param_dtype: jnp.dtype) -> Any:
    return jax.eval_shape(functools.partial(init_params, config, param_dtype=param_dtype), jax.random.key(0))
