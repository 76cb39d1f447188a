"""Decoding: latents -> images with a consistency decoder.

    batch/   decode.py's library: many input files on every device of every host
             (inputs -> program -> outputs, driven by run)

The sampler itself (``cmjax.decoder``, ``cmjax.schedule``, ``cmjax.tiling``) is used from its
current modules.
"""
