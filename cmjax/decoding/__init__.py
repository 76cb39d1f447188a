"""Decoding: latents -> images with a consistency decoder.

    batch/   decode.py's library: many input files on every device of every host
             (inputs -> program -> outputs, driven by run)

The sampler itself (``cmjax.decoding.decoder``, ``cmjax.decoding.schedule``, ``cmjax.decoding.tiling``) is used from its
current modules.
"""
