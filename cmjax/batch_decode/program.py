"""The compiled program of a batch decode: per-item noise, the sharded decode, its memory estimate.

    (params, rows (B, h, w, C) latents or (B, H, W, 3) images, key_data (B, 2) uint32)
      -> jit(shard_map): params replicated, rows split over the mesh's data axis
         -> each device: lax.map over its rows, ``micro_batch`` at a time
            -> [images: SD VAE encoder -> latents]
            -> decoder.decode_latents (tiled with ``tile``), step i's noise made on the device as
               normal(fold_in(k, i)), k from (seed, key_data): one step's noise alive at a time
      -> images (B, 8h, 8w, 3) float32 [, with images: the SD GAN decoder's and the inputs]

``compile_program`` compiles it for one shape ahead of time, so that the run can say it is
compiling and refuse a shape whose memory estimate (XLA's own buffer sizes for the program) does
not fit in the free memory of a device.
"""
from __future__ import annotations

import functools
import hashlib
import os
import resource
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cmjax import parallel
from cmjax.batch_decode.options import DecodeOptions
from cmjax.decoding import tiling
from cmjax.decoding.decoder import decode_latents
from cmjax.models import vae as vae_lib
from cmjax.models.conv_lowering import XLA, ConvShape, LoweringPlan
from cmjax.models.decoder_config import DecoderConfig, abstract_params
from cmjax.models.layers import compute_dtype, conv_shapes


def identity_key_data(identity: str | bytes) -> np.ndarray:
    """(2,) uint32: the first 8 bytes of sha256(identity), stable across runs, hosts and Pythons.

    A str is hashed as UTF-8, keeping undecodable file-name bytes (surrogate escapes) as they are.
    """
    if isinstance(identity, str):
        identity = identity.encode("utf-8", "surrogateescape")
    return np.frombuffer(hashlib.sha256(identity).digest()[:8], ">u4").astype(np.uint32)


def item_noise(seed: int, key_data: jax.Array, step, shape: tuple[int, int]) -> jax.Array:
    """Step ``step``'s noise (B, H, W, 3) float32 for (B, 2) uint32 identity hashes; vmapped over
    items, so it is made where each item lives and does not depend on the batch it is in."""
    base = jax.random.key(seed)

    def one(d):
        k = jax.random.fold_in(jax.random.fold_in(base, d[0]), d[1])
        return jax.random.normal(jax.random.fold_in(k, step), (*shape, 3), jnp.float32)

    return jax.vmap(one)(key_data)


def noise_for(seed: int, identity: str | bytes, steps: int, shape: tuple[int, int]) -> np.ndarray:
    """The noise (steps, 1, H, W, 3) that a run with ``seed`` uses for the item named ``identity``."""
    key_data = jnp.asarray(identity_key_data(identity)[None])
    return np.stack([np.asarray(item_noise(seed, key_data, i, shape)) for i in range(steps)])


def _decode_rows(params, latents, key_data, *, config: DecoderConfig, seed: int, timesteps: tuple[int, ...],
                 clip_denoised: bool, dtype, tile: int | None, overlap: int | None, lowering: LoweringPlan = XLA):
    """latents (B, h, w, C), key_data (B, 2) -> images (B, 8h, 8w, 3) float32."""
    f = config.upsample_factor
    shape = (latents.shape[1] * f, latents.shape[2] * f)
    noise = functools.partial(item_noise, seed, key_data, shape=shape)
    kw = dict(config=config, timesteps=timesteps, clip_denoised=clip_denoised, dtype=dtype, lowering=lowering)
    if tile is not None and tile < max(latents.shape[1:3]):
        return tiling.decode_latents_tiled(params, latents, noise, tile=tile, overlap=overlap, **kw)
    return decode_latents(params, latents, noise, **kw)


def _in_micro_batches(fn: Callable, micro_batch: int) -> Callable:
    """fn(params, x (m, ...), key_data (m, 2)) -> fn over (n, ...) rows, ``micro_batch`` rows at a time.

    XLA's kernels round differently for different batch sizes (~1e-6 after a decode), so each
    device runs one fixed-size program per micro-batch, in a loop: an image's pixels then depend on
    ``micro_batch`` alone, never on the global batch size or the number of devices or hosts.
    """
    def rows(params, x, key_data):
        n = x.shape[0]
        chunks = (x.reshape(n // micro_batch, micro_batch, *x.shape[1:]),
                  key_data.reshape(n // micro_batch, micro_batch, *key_data.shape[1:]))
        out = jax.lax.map(lambda c: fn(params, *c), chunks)
        return jax.tree.map(lambda o: o.reshape(n, *o.shape[2:]), out)

    return rows


def _sharded(rows_fn: Callable, mesh) -> Callable:
    """jit(shard_map(rows_fn)): params replicated, rows split over the data axis, each device
    working on its own rows (noise included) with no communication."""
    data = P(parallel.DATA_AXIS)
    return jax.jit(jax.shard_map(rows_fn, mesh=mesh, in_specs=(P(), data, data), out_specs=data))


def _rows_decoder(config: DecoderConfig, options: DecodeOptions, lowering: LoweringPlan | None = None) -> Callable:
    """(params, latents (m, h, w, C), key_data (m, 2)) -> images, as ``options`` ask (seed,
    timesteps, clip, dtype, tiles, conv lowering plan; ``lowering`` overrides the plan)."""
    return functools.partial(_decode_rows, config=config, seed=options.seed, timesteps=options.timesteps,
                             clip_denoised=options.clip_denoised, dtype=compute_dtype(options.dtype),
                             tile=options.tile, overlap=options.overlap,
                             lowering=options.lowering if lowering is None else lowering)


def make_decode_fn(config: DecoderConfig, mesh, options: DecodeOptions) -> Callable:
    """The jitted (params, latents (B, h, w, C), key_data (B, 2)) -> images (B, 8h, 8w, 3), batch
    sharded over ``mesh``'s data axis; B a multiple of devices x ``options.micro_batch``."""
    return _sharded(_in_micro_batches(_rows_decoder(config, options), options.micro_batch), mesh)


def program_conv_shapes(config: DecoderConfig, latent_hw: tuple[int, int], options: DecodeOptions
                        ) -> tuple[ConvShape, ...]:
    """The conv shapes each device's decode runs for h x w latents (``options.micro_batch`` at a time,
    tiled as asked): what ``cmjax.tuning.tune`` measures. An abstract trace: nothing is allocated,
    whatever the size."""
    fn = _rows_decoder(config, options, lowering=XLA)
    latents = jax.ShapeDtypeStruct((options.micro_batch, *latent_hw, config.latent_channels), jnp.float32)
    return conv_shapes(fn, abstract_params(config), latents,
                       jax.ShapeDtypeStruct((options.micro_batch, 2), jnp.uint32))


def make_images_fn(decoder, vae, mesh, options: DecodeOptions) -> Callable:
    """Jitted ({"decoder", "vae"} params, images (B, H, W, 3) in [-1, 1], key_data) -> (consistency,
    gan, images), each (B, H, W, 3) float32: the images are encoded (posterior mean) by the SD VAE
    encoder, decoded by the consistency decoder and, with ``options.compare``, by the VAE's GAN decoder."""
    compute = compute_dtype(options.dtype)
    decode_fn = _rows_decoder(decoder.config, options)

    def encode_decode(params, images, key_data):
        latents = vae_lib.encode_latents(params["vae"], images, config=vae.config, dtype=compute)
        consistency = decode_fn(params["decoder"], latents, key_data)
        gan = (vae_lib.decode_latents_gan(params["vae"], latents, config=vae.config, dtype=compute)
               if options.compare else jnp.zeros_like(images))
        return consistency, gan, images

    return _sharded(_in_micro_batches(encode_decode, options.micro_batch), mesh)


# ------------------------------------------------------------------------------------------------
# Compiling ahead of time, and the memory a program needs


_cache_hits = [0]  # programs JAX loaded from its persistent compilation cache in this process


def _count_cache_hits(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _cache_hits[0] += 1


jax.monitoring.register_event_listener(_count_cache_hits)


def compile_program(step: Callable, params: Any, rows_shape: tuple[int, ...], mesh) -> tuple[Any, bool]:
    """``step`` compiled for global rows of ``rows_shape`` (float32, split over the data axis) and
    (rows, 2) uint32 keys; nothing is allocated. Returns (the program, called like ``step``; whether
    it was loaded from the persistent compilation cache rather than compiled)."""
    data = parallel.data_sharding(mesh)
    rows = jax.ShapeDtypeStruct(rows_shape, jnp.float32, sharding=data)
    keys = jax.ShapeDtypeStruct((rows_shape[0], 2), jnp.uint32, sharding=data)
    hits = _cache_hits[0]
    compiled = step.lower(params, rows, keys).compile()
    return compiled, _cache_hits[0] > hits


def bytes_needed(compiled: Any, params: Any) -> int | None:
    """Per-device bytes that running ``compiled`` adds to what is resident (its params): arguments,
    outputs and XLA's temporaries, from XLA's memory analysis; None where the backend gives none."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    param_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(params))  # replicated: a whole copy per device
    total = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    return max(int(total) - param_bytes, 0)


def bytes_free(mesh) -> int | None:
    """Free memory of the smallest of this host's devices in ``mesh``; None when unknown.

    Accelerators report their limit and use; CPU devices share the host's available memory (and
    the address-space limit, when one is set)."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    stats = [d.memory_stats() for d in local]
    if all(s and "bytes_limit" in s for s in stats):
        return min(int(s["bytes_limit"]) - int(s.get("bytes_in_use", 0)) for s in stats)
    free = _host_available()
    return None if free is None else free // max(len(local), 1)


def _host_available() -> int | None:
    """MemAvailable of /proc/meminfo, capped by RLIMIT_AS (minus what this process maps); None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        free = int(info["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open(f"/proc/{os.getpid()}/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            mapped = 0
        free = min(free, soft - mapped)
    return free
