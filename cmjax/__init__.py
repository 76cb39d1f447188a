"""cmjax: OpenAI's consistency decoder and consistency-model training in JAX/Flax.

    decoder = cmjax.load_decoder("ckpt/")            # a checkpoint from `python -m cmjax.convert`
    images = cmjax.decode(decoder, latents, key=jax.random.key(0))   # (B,h,w,4) -> (B,8h,8w,3) in [-1,1]
"""
from cmjax.checkpoint import load_decoder, save_decoder
from cmjax.decoder import Decoder, DecoderConfig, decode, decode_latents
from cmjax.unet import ConsistencyUNet, UNetConfig

__all__ = ["ConsistencyUNet", "Decoder", "DecoderConfig", "UNetConfig", "decode", "decode_latents",
           "load_decoder", "save_decoder"]
