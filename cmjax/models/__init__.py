"""Flax modules and nothing else: no file I/O, no downloads. Each is a pure function of a params pytree.

    conv_lowering.py the conv lowerings (XLA's, im2col, im2row, Winograd, subpixel), pure jnp, and the
                     LoweringPlan (conv shape -> lowering) a network is given (measured by cmjax.tuning)
    layers.py        GroupNorm (fp32 statistics), conv (lowered as its plan says), dense,
                     ResnetBlock (scale-shift time conditioning, down/up resampling), attention
       |
       +-> decoder_unet.py  ConsistencyUNet: the consistency decoder's network (diffusers UNet2DModel names)
             +-> decoder_config.py  DecoderConfig (every field's bounds) and the Decoder record (config + params)
       +-> image_unet.py  ImageUNet: small unconditional image consistency models
       +-> vae.py         the SD VAE: encoder (images -> latent moments) and GAN decoder
    inception.py     the FID InceptionV3 (TF graph of 2015-12-05), pool-3 features

Weights come from :mod:`cmjax.weights`; the networks are driven by :mod:`cmjax.decoding` and
:mod:`cmjax.training`.
"""
