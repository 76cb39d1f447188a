"""cmjax vs diffusers: the full-size consistency decoder (621M params), 2-step decode, one run.

Both sides get the same random weights (a diffusers ConsistencyDecoderVAE, converted in memory)
and the same noise; the script prints steady-state seconds per decode for each, their ratio,
cmjax's compile time, the peak memory of each phase and the max abs difference of the images.

    python benchmarks/bench_decoder.py                 # batch 2 of 4x6 latents (32x48 px), CPU
    python benchmarks/bench_decoder.py --latent 64x64 --batch 4 --dtype bf16   # on a GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import psutil


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the max seen (bytes)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", default="4x6", help="latent HxW (pixels are 8x)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="cmjax compute dtype")
    parser.add_argument("--torch-dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--no-torch", action="store_true", help="time cmjax only")
    args = parser.parse_args()

    import torch
    from diffusers import ConsistencyDecoderVAE

    import cmjax
    from cmjax.convert.mapping import torch_to_flax
    from cmjax.decoder import abstract_params

    h, w = (int(v) for v in args.latent.split("x"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; torch {torch.__version__} "
          f"on {device}, {torch.get_num_threads()} threads")
    print(f"decode: batch {args.batch} of {h}x{w} latents -> {8 * h}x{8 * w} px, 2 steps, cmjax {args.dtype}, "
          f"torch {args.torch_dtype}")

    torch.manual_seed(0)
    vae = ConsistencyDecoderVAE().eval()
    state = {k[len("decoder_unet."):]: v.detach().numpy() for k, v in vae.state_dict().items()
             if k.startswith("decoder_unet.")}
    config = cmjax.DecoderConfig()
    params = jax.tree.map(jnp.asarray, torch_to_flax(state, abstract_params(config)))
    del state
    decoder = cmjax.Decoder(config, params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"UNet params: {n_params:,}")

    rng = np.random.default_rng(0)
    latents = rng.normal(size=(args.batch, h, w, 4)).astype(np.float32)
    noise = [rng.normal(size=(args.batch, 8 * h, 8 * w, 3)).astype(np.float32) for _ in range(2)]
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32

    def run_cmjax():
        return jax.block_until_ready(cmjax.decode(decoder, latents, noise=noise, dtype=dtype))

    with PeakRSS() as mem_compile:
        start = time.perf_counter()
        ours = np.asarray(run_cmjax())
        compile_s = time.perf_counter() - start
    with PeakRSS() as mem_cmjax:
        t_cmjax = timed(run_cmjax, args.repeats)
    print(f"cmjax:     first call (compile + run) {compile_s:.2f} s; steady {statistics.median(t_cmjax):.3f} s "
          f"(min {min(t_cmjax):.3f}); peak RSS {mem_cmjax.peak / 2**30:.2f} GiB")

    if args.no_torch:
        return
    from tests.torch_peers import reference_decode

    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.torch_dtype]
    vae = vae.to(device=device, dtype=tdtype)

    def run_torch():
        if device == "cpu" and tdtype == torch.float32:
            return reference_decode(vae, latents, noise)
        with torch.no_grad():  # GPU / half precision: diffusers' own decode, its own noise
            z = torch.from_numpy(latents.transpose(0, 3, 1, 2)).to(device=device, dtype=tdtype)
            out = vae.decode(z, generator=torch.Generator(device).manual_seed(0)).sample
            if device == "cuda":
                torch.cuda.synchronize()
            return out.float().cpu().numpy().transpose(0, 2, 3, 1)

    theirs = run_torch()  # warm-up
    with PeakRSS() as mem_torch:
        t_torch = timed(run_torch, args.repeats)
    print(f"diffusers: steady {statistics.median(t_torch):.3f} s (min {min(t_torch):.3f}); "
          f"peak RSS {mem_torch.peak / 2**30:.2f} GiB")
    ratio = statistics.median(t_cmjax) / statistics.median(t_torch)
    print(f"ratio cmjax/diffusers: {ratio:.3f}  (goal <= 1.0)")
    if device == "cpu" and tdtype == torch.float32:
        print(f"max |cmjax - diffusers| over the images: {np.abs(ours - theirs).max():.2e}")


if __name__ == "__main__":
    main()
