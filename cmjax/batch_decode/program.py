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

import dataclasses
import functools
import hashlib
import json
import os
import resource
import stat
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cmjax import cache, parallel
from cmjax.batch_decode.options import DecodeOptions
from cmjax.decoding import tiling
from cmjax.decoding.decoder import decode_latents
from cmjax.files import atomic_write
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


def compile_program(step: Callable, params: Any, rows_shape: tuple[int, ...], mesh,
                    key: str | None = None) -> tuple[Any, bool]:
    """``step`` compiled for global rows of ``rows_shape`` (float32, split over the data axis) and
    (rows, 2) uint32 keys; nothing is allocated. Returns (the program, called like ``step``; whether
    it was loaded from the persistent compilation cache rather than compiled).

    ``params``: the params or their shapes, or a callable giving them (called only when the program
    must be traced). ``key`` (``program_key``): keep the traced program beside JAX's compilation
    cache (``traced_path``), so that the next run with the same key loads it instead of tracing the
    network again (about 2 s of Python for the full-size decoder) before the cache lookup.
    """
    data = parallel.data_sharding(mesh)
    rows = jax.ShapeDtypeStruct(rows_shape, jnp.float32, sharding=data)
    keys = jax.ShapeDtypeStruct((rows_shape[0], 2), jnp.uint32, sharding=data)
    hits = _cache_hits[0]
    path = traced_path(key)
    exported = _read_traced(path) if path is not None else None
    if exported is None:
        params = params() if callable(params) else params
        if path is None:
            return step.lower(params, rows, keys).compile(), _cache_hits[0] > hits
        exported = jax.export.export(step)(params, rows, keys)
        _write_traced(path, exported)
    (params, _, _), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
    params = parallel.shapes_with(params, parallel.replicated(mesh))
    compiled = jax.jit(exported.call).lower(params, rows, keys).compile()
    return compiled, _cache_hits[0] > hits


TRACED_DIR = "cmjax-traced"  # under JAX's compilation cache directory
_MAX_TRACED_BYTES = 1 << 30


def program_key(config: DecoderConfig, options: DecodeOptions, rows_shape: tuple[int, ...], mesh) -> str:
    """A hex digest of everything a decode program is traced from: cmjax's own source (every .py
    file of the package), the jax / jaxlib / flax versions, XLA_FLAGS, the mesh's devices, the
    decoder's config, the options that reach the program and the rows' shape."""
    import flax
    import jaxlib

    program_options = {f.name: repr(getattr(options, f.name)) for f in dataclasses.fields(options)
                       if f.name not in _OPTIONS_OUTSIDE_THE_PROGRAM}
    parts = {"cmjax": cache.source_digest(), "versions": [jax.__version__, jaxlib.__version__, flax.__version__],
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "processes": jax.process_count(),
             "mesh": [list(mesh.axis_names), list(mesh.devices.shape),
                      [(d.platform, d.device_kind, d.id) for d in mesh.devices.flat]],
             "config": config.to_dict(), "options": program_options, "rows": list(rows_shape)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


# Flags that change what is read or written, not the program (a new --output must not miss the cache).
_OPTIONS_OUTSIDE_THE_PROGRAM = frozenset({"output", "batch_size", "layout", "save_npy", "skip_existing",
                                          "progress", "tune"})


def traced_path(key: str | None) -> Path | None:
    """Where the traced program of ``key`` is kept: ``<JAX's compilation cache>/cmjax-traced/<key>.jaxexport``;
    None without a key, without a local compilation cache (CMJAX_COMPILE_CACHE=0) or with several processes."""
    where = jax.config.jax_compilation_cache_dir
    if key is None or not where or not os.path.isdir(where) or jax.process_count() > 1:
        return None
    return Path(where) / TRACED_DIR / f"{key}.jaxexport"


def _read_traced(path: Path) -> Any:
    """The Exported kept at ``path``, or None when there is none or it cannot be read (then it is
    traced and written again)."""
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_TRACED_BYTES:
            return None
        return jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception:  # noqa: BLE001 - missing, cut short, another jax's format: trace it again
        return None


def _write_traced(path: Path, exported: Any) -> None:
    try:
        data = exported.serialize()
        atomic_write(path, lambda f: f.write(data))
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written costs the next run a trace
        print(f"warning: cannot keep the traced program in {path.parent} ({e})", file=sys.stderr)


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
