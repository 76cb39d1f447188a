"""Decoding SD latents into images with the consistency decoder.

    schedule.py   the decoder's 1024-step cosine schedule, c_in / c_skip / c_out, the timestep grid
    decoder.py    the decode path: normalise latents -> x8 upsample -> the one sampler loop
                  (lax.scan over the steps, taking a denoise function) -> images in [-1, 1];
                  ``decode`` is the checked public entry, ``decode_latents`` the pure function
    tiling.py     a tiled denoise function for large images (overlapping latent tiles, blended)

What a decoder is (its config, the Decoder record) is :mod:`cmjax.models.decoder_config`; what
decode.py runs over files on every host is :mod:`cmjax.batch_decode`.
"""
