"""decode.py's decode path at full size (random weights): throughput, memory, MFU; and tiling error.

    python benchmarks/bench_decode.py                                # CPU: batch 2 of 4x6 latents, fp32
    python benchmarks/bench_decode.py --latent 64x64 --batch 8 --dtype bf16 --torch   # GPU: 512x512
    python benchmarks/bench_decode.py tiling --model tiny --latent 32x32 --tile 24 --overlap 12
    python benchmarks/bench_decode.py tiling --model full --latent 16x16 --tile 12 --overlap 4
    python benchmarks/bench_decode.py memory --latent 256x256 --tile 64   # compile only: 2048x2048 px

``throughput`` times the jitted, sharded batch step that decode.py runs (per-image noise made inside,
batch split over all devices): images/s, compile time, XLA's memory analysis of the program, the
process's peak RSS (CPU) or the device's peak bytes in use (GPU). MFU counts 67.3 TFLOP per 2-step
512x512 decode (counted from the UNet's convolutions), scaled by pixels and steps, against the dense bf16 peak of the device
(``--peak-tflops`` to override). ``--torch`` also times diffusers' ConsistencyDecoderVAE (fp16 on
GPU, fp32 on CPU) with the same random weights and batch, and prints the time ratio.

``tiling`` decodes the same latents and noise untiled and tiled (cmjax.decoding.tiling) and prints the PSNR
between them, the max abs difference, time and memory of each. ``memory`` only compiles both
programs and prints XLA's memory analysis (nothing runs, so it works for sizes that do not fit).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decoder import PeakRSS  # noqa: E402

from cmjax import parallel  # noqa: E402
from cmjax.batch_decode import program  # noqa: E402
from cmjax.batch_decode.options import DecodeOptions  # noqa: E402
from cmjax.decoding import tiling  # noqa: E402
from cmjax.decoding.decoder import decode_latents  # noqa: E402
from cmjax.evaluation import metrics  # noqa: E402
from cmjax.images import to_uint8  # noqa: E402
from cmjax.models.decoder_config import Decoder, DecoderConfig  # noqa: E402
from cmjax.models.layers import compute_dtype  # noqa: E402
from tests.random_decoder import TINY  # noqa: E402
from tests.random_decoder import random_decoder as numpy_random_decoder

TFLOP_2STEP_512 = 67.3  # a 2-step 512x512 decode of the released model: 2 x 33.6 TFLOP of UNet convs
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5 lite": 197.0,
                    "TPU v5p": 459.0, "TPU v4": 275.0, "TPU v6": 918.0}


def random_decoder(model: str, param_dtype=jnp.float32) -> Decoder:
    """Random weights drawn in NumPy (Flax's init would trace and compile the whole network)."""
    dec = numpy_random_decoder(0, TINY if model == "tiny" else DecoderConfig())
    return Decoder(dec.config, jax.tree.map(lambda x: jnp.asarray(x, param_dtype), dec.params))


def memory_line(compiled) -> str:
    m = compiled.memory_analysis()
    if m is None:
        return "XLA memory analysis: n/a"
    gib = 2.0 ** 30
    return (f"XLA memory analysis: arguments {m.argument_size_in_bytes / gib:.3f} GiB, outputs "
            f"{m.output_size_in_bytes / gib:.3f} GiB, temporaries {m.temp_size_in_bytes / gib:.3f} GiB")


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in kind.lower()), None)


def throughput(args) -> None:
    h, w = (int(v) for v in args.latent.split("x"))
    mesh = parallel.make_mesh()
    platform = jax.devices()[0].platform
    print(f"jax {jax.__version__}: {jax.device_count()} x {jax.devices()[0].device_kind} ({platform})")
    param_dtype = jnp.bfloat16 if args.dtype == "bf16" and platform != "cpu" else jnp.float32
    t = time.perf_counter()
    decoder = random_decoder(args.model, param_dtype)
    print(f"{args.model} decoder, random weights ({param_dtype.__name__} params) in {time.perf_counter() - t:.1f} s")
    options = DecodeOptions(timesteps=(1008, 512)[:args.steps], dtype=args.dtype, tile=args.tile,
                            micro_batch=args.micro_batch)  # tile overlap: the default, tile // 4
    step = program.make_decode_fn(decoder.config, mesh, options)
    unit = mesh.size * args.micro_batch
    batch = -(-args.batch // unit) * unit
    rng = np.random.default_rng(0)
    latents = parallel.global_batch(rng.normal(size=(batch, h, w, 4)).astype(np.float32), mesh)
    ids = np.stack([program.identity_key_data(f"bench:{i}") for i in range(batch)])
    key_data = parallel.global_batch(ids, mesh)
    params = parallel.put_replicated(decoder.params, mesh)
    del decoder

    t = time.perf_counter()
    compiled = step.lower(params, latents, key_data).compile()
    compile_s = time.perf_counter() - t
    print(f"decode: batch {batch} of {h}x{w} latents -> {8 * h}x{8 * w} px, {args.steps} steps, {args.dtype}, "
          f"micro-batch {args.micro_batch}; compile {compile_s:.1f} s")
    print(memory_line(compiled))
    jax.block_until_ready(compiled(params, latents, key_data))  # warm-up
    times = []
    with PeakRSS() as rss:
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(compiled(params, latents, key_data))
            times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    ips = batch / sec
    print(f"steady: {sec:.3f} s per batch (min {min(times):.3f}, {args.repeats} runs): {ips:.3f} images/s")
    peak = device_peak_bytes()
    print(f"peak memory: process RSS {rss.peak / 2**30:.2f} GiB" +
          (f", device peak in use {peak / 2**30:.2f} GiB" if peak is not None else ""))
    tflop_per_image = TFLOP_2STEP_512 * (8 * h * 8 * w) / 512 ** 2 * args.steps / 2
    achieved = ips * tflop_per_image
    roof = peak_tflops(args.peak_tflops)
    mfu = (f", MFU {100 * achieved / (roof * jax.device_count()):.1f}% of {roof:.0f} TFLOP/s bf16 per device"
           if roof else "")
    print(f"work: {tflop_per_image:.3f} TFLOP per image -> {achieved:.2f} TFLOP/s{mfu}")
    if args.torch:
        torch_ratio(args, h, w, batch, sec)


def torch_ratio(args, h: int, w: int, batch: int, cmjax_sec: float) -> None:
    import torch
    from diffusers import ConsistencyDecoderVAE

    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    torch.manual_seed(0)
    vae = ConsistencyDecoderVAE().eval().to(device="cuda" if cuda else "cpu", dtype=dtype)
    z = torch.randn((batch, 4, h, w), dtype=dtype, device=vae.device)

    def run():
        with torch.no_grad():
            vae.decode(z, generator=torch.Generator(vae.device).manual_seed(0))
        if cuda:
            torch.cuda.synchronize()

    run()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    print(f"diffusers {str(dtype).split('.')[-1]}: {sec:.3f} s per batch ({batch / sec:.3f} images/s); "
          f"cmjax/diffusers time ratio {cmjax_sec / sec:.3f}")


def tiling_error(args) -> None:
    h, w = (int(v) for v in args.latent.split("x"))
    decoder = random_decoder(args.model)
    cfg = decoder.config
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.normal(size=(1, h, w, 4)).astype(np.float32))
    noise = jnp.asarray(rng.normal(size=(args.steps, 1, 8 * h, 8 * w, 3)).astype(np.float32))
    timesteps = (1008, 512)[:args.steps]
    overlap = tiling.default_overlap(args.tile) if args.overlap is None else args.overlap
    print(f"{args.model} decoder (random weights): {h}x{w} latents -> {8 * h}x{8 * w} px, {args.steps} steps; "
          f"tiles of {args.tile} latents, overlap {overlap}: rows {tiling.tile_starts(h, args.tile, overlap)}, "
          f"cols {tiling.tile_starts(w, args.tile, overlap)}")
    runs = {}
    for name, fn in [("tiled", functools.partial(tiling.decode_latents_tiled, tile=args.tile, overlap=overlap)),
                     ("untiled", decode_latents)]:
        jitted = jax.jit(functools.partial(fn, config=cfg, timesteps=timesteps))
        compiled = jitted.lower(decoder.params, latents, noise).compile()
        with PeakRSS() as rss:
            t = time.perf_counter()
            runs[name] = np.asarray(compiled(decoder.params, latents, noise))
            sec = time.perf_counter() - t
        peak = device_peak_bytes()
        print(f"{name:8s} {sec:7.2f} s; {memory_line(compiled)}; peak RSS {rss.peak / 2**30:.2f} GiB"
              + (f"; device peak {peak / 2**30:.2f} GiB" if peak is not None else ""))
    ref = runs.pop("untiled")
    for name, out in runs.items():
        diff = np.abs(out - ref)
        print(f"{name} vs untiled: PSNR {metrics.mean_psnr(out, ref, clip=False):.2f} dB (range [-1, 1]); "
              f"max |diff| {diff.max():.4f}, "
              f"mean {diff.mean():.5f}; uint8 PSNR "
              f"{metrics.mean_psnr(to_uint8(out), to_uint8(ref), value_range=(0, 255)):.2f} dB")


def memory_only(args) -> None:
    h, w = (int(v) for v in args.latent.split("x"))
    cfg = TINY if args.model == "tiny" else DecoderConfig()
    from cmjax.models.decoder_config import abstract_params

    params = abstract_params(cfg, jnp.bfloat16 if args.dtype == "bf16" else jnp.float32)
    latents = jax.ShapeDtypeStruct((1, h, w, 4), jnp.float32)
    noise = jax.ShapeDtypeStruct((args.steps, 1, 8 * h, 8 * w, 3), jnp.float32)
    timesteps = (1008, 512)[:args.steps]
    overlap = tiling.default_overlap(args.tile) if args.overlap is None else args.overlap
    dtype = compute_dtype(args.dtype)
    print(f"{args.model} decoder, {8 * h}x{8 * w} px, {args.dtype}, compile only on {jax.devices()[0].device_kind}")
    for name, fn in [("tiled", functools.partial(tiling.decode_latents_tiled, tile=args.tile, overlap=overlap)),
                     ("untiled", decode_latents)]:
        t = time.perf_counter()
        compiled = jax.jit(functools.partial(fn, config=cfg, timesteps=timesteps, dtype=dtype)).lower(
            params, latents, noise).compile()
        print(f"{name:8s} (compiled in {time.perf_counter() - t:.1f} s) {memory_line(compiled)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="throughput", choices=["throughput", "tiling", "memory"])
    p.add_argument("--model", choices=["full", "tiny"], default="full")
    p.add_argument("--latent", default="4x6", help="latent HxW (pixels are 8x)")
    p.add_argument("--batch", type=int, default=2, help="global batch (throughput)")
    p.add_argument("--micro-batch", type=int, default=1, help="images each device decodes at once (throughput)")
    p.add_argument("--steps", type=int, choices=[1, 2], default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tile", type=int, help="latent tile size (tiling/memory; optional for throughput)")
    p.add_argument("--overlap", type=int, help="tile overlap in latents (default tile // 4)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak per device, for MFU")
    p.add_argument("--torch", action="store_true", help="also time diffusers (throughput)")
    args = p.parse_args()
    if args.mode in ("tiling", "memory") and args.tile is None:
        p.error(f"{args.mode} needs --tile")
    {"throughput": throughput, "tiling": tiling_error, "memory": memory_only}[args.mode](args)


if __name__ == "__main__":
    main()
