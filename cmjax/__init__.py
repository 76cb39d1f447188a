"""cmjax: OpenAI's consistency decoder and consistency-model training in JAX/Flax.

    decoder = cmjax.load_decoder("ckpt/")            # a checkpoint from `python -m cmjax.convert`
    images = cmjax.decode(decoder, latents, key=jax.random.key(0))   # (B,h,w,4) -> (B,8h,8w,3) in [-1,1]

    vae = cmjax.load_vae("sd3-vae/")                 # a cmjax VAE checkpoint, a diffusers AutoencoderKL, ...
    latents = cmjax.encode_images(vae, images)       # raw posterior mean (B,H/8,W/8,C), C = 4 or 16
    gan = cmjax.decode_gan(vae, latents)             # the VAE's own decoder
"""
# ruff: noqa: E402  (the imports below come after xla_cpu.apply())
from cmjax import xla_cpu

xla_cpu.apply()  # before JAX starts a backend: XLA:CPU convolutions without YNNPACK (see cmjax/xla_cpu.py)

from cmjax.decoding.decoder import decode, decode_latents
from cmjax.models.decoder_config import Decoder, DecoderConfig
from cmjax.models.decoder_unet import ConsistencyUNet, UNetConfig
from cmjax.models.vae import decode_gan
from cmjax.models.vae import encode as encode_images
from cmjax.weights.checkpoint import save_decoder
from cmjax.weights.hub import load_decoder, load_vae

__all__ = ["ConsistencyUNet", "Decoder", "DecoderConfig", "UNetConfig", "decode", "decode_gan", "decode_latents",
           "encode_images", "load_decoder", "load_vae", "save_decoder"]
