"""Random-weight cmjax models (the tiny test configs by default), drawn without tracing the model."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

import cmjax
from cmjax.models.decoder_config import DecoderConfig, abstract_params
from cmjax.models.decoder_unet import UNetConfig

TINY = DecoderConfig(unet=UNetConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8))


def random_params(abstract: Any, seed: int = 0) -> Any:
    """NumPy params shaped like ``abstract`` (a ``jax.eval_shape`` of an init), drawn like Flax's
    defaults: kernels N(0, 1/fan_in), embeddings N(0, 1), unit norm scales, zero biases.
    (Flax's own ``init`` traces and compiles a forward pass: 20 s of CPU for the tiny decoder.)"""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        if name == "embedding":
            return rng.standard_normal(shape).astype(np.float32)
        return (np.ones if name == "scale" else np.zeros)(shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def random_decoder(seed: int = 0, config: DecoderConfig = TINY) -> cmjax.Decoder:
    return cmjax.Decoder(config, random_params(abstract_params(config), seed))
