"""Batch decoding of latent files (or images) into PNGs on every device of every host: decode.py's library.

    options.DecodeOptions: decode.py's flags (each field is one), read as they are by the steps below
    INPUT... (files, folders, globs)
      -> inputs.discover: sources [(path, rel)] sorted by rel ('/'-separated path below the argument)
      -> inputs.scan_latents / scan_image (headers only): one Item per latent (a .npy / .npz member /
         .safetensors tensor, 3-D or one row of a 4-D batch; NCHW or NHWC) or per image file;
         bad files -> failures
      -> run.plan_batches: drop finished outputs (--skip-existing), group by shape, cut each group
         into global batches of G rows (G = --batch-size rounded up to a multiple of devices x
         --micro-batch; the last batch padded, padding rows thrown away)
      -> per shape: program.compile_program once ("compiling ... (once per input shape)"), its
         memory estimate checked against the free memory (refused with a hint to use --tile)
      -> per batch: each host reads only its own rows -> one data-sharded jax.Array
         -> the program (shard_map: each device loops over its own rows, --micro-batch at a time):
            per-image noise from (seed, item identity), made on the device one step at a time
            -> decode (tiled with --tile) -> images
         -> outputs.write_batch: each host writes its rows, PNG (and .npy), temp file + os.replace
      -> run: summary from process 0 (counts, failures, images/s); exit status 1 if anything failed

Reproducibility: an item's noise is ``normal(fold_in(k, step))`` with
``k = fold_in(fold_in(key(seed), a), b)``, (a, b) the first 8 bytes of sha256(identity), identity
"rel[:key][:index]" (the file name's own bytes). It depends on nothing else, and each device decodes
a fixed number of images at a time (--micro-batch, default 1), so the same seed gives the same
image, bit for bit, whatever the batch size, device count, host count or the other inputs of the run.

Multi-host: every host lists and scans all inputs (headers only; inputs must be visible to every
host) and so computes the same plan (checked), then reads and writes only its own rows.
"""
