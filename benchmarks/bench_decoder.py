"""cmjax vs diffusers: the full-size consistency decoder (621M params), 2-step decode, one run.

Both sides get the same random weights (a diffusers ConsistencyDecoderVAE, converted in memory)
and the same noise; the script prints steady-state seconds per decode for each, their ratio,
cmjax's compile time, the peak memory, the max abs difference of the images, and the FLOP rate of
each side next to a 2048^3 matmul's (how close both are to what this CPU can do).

    python benchmarks/bench_decoder.py      # batch 2 of 4x6 latents (32x48 px), batch 1 of 16x16 (128x128 px)
    python benchmarks/bench_decoder.py --cases 64x64:4 --dtype bf16   # on a GPU

cmjax and diffusers calls are interleaved (medians of ``--repeats``); the CPU model, AVX-512,
XLA flags, GLIBC_TUNABLES, the conv lowering mode and the load average are printed with every
result, with each side's page faults per call. cmjax runs with the lowering plan tuned for this CPU
(``cmjax.tuning.tune`` on the case's conv shapes: measured on the first run on a machine, reported
with its time and cached; read from the cache afterwards), or the one ``--lowering`` forces.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.torch_peers: the diffusers reference

from cmjax import tuning  # noqa: E402  (after the path: runs from a checkout)
from cmjax.models.conv_lowering import LOWERINGS  # noqa: E402


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


def machine_line() -> str:
    """CPU model (with or without AVX-512), XLA flags, threads and load: printed with every result."""
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"[{tuning.cpu_model()}; {os.cpu_count()} cores; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; "
            f"lowering={os.environ.get(tuning.OVERRIDE_ENV, 'tuned')}; load {load}]")


def _hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Compiled HLO instruction name -> (result shape, op_name metadata)."""
    ops = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]+)\"", hlo_text, re.M):
        ops[m.group(1)] = (m.group(2).split("{")[0], m.group(3))
    return ops


def _where(op_name: str) -> str:
    """'down_blocks.1 conv1' from a flax op_name path (level and the layer inside the block)."""
    level = re.search(r"(down_blocks\.\d|up_blocks\.\d|mid_block|conv_in|conv_norm_out|conv_out|time_\w+)", op_name)
    layer = re.search(r"/(norm\d|conv\d|conv_shortcut|time_emb_proj)/", op_name)
    return " ".join(g.group(1) for g in (level, layer) if g) or op_name.split("/")[-1]


def profile_cmjax(run, lowered, top: int) -> None:
    """XLA's own trace of one decode: time per compiled instruction, then per level/layer."""
    import collections
    import glob
    import tempfile

    ops = _hlo_ops(lowered.compile().as_text())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            run()
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    per_op = collections.Counter()
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for e in line.events:
                if e.name in ops:
                    per_op[e.name] += e.duration_ns / 1e9
    total = sum(per_op.values())
    print(f"XLA profile: {total:.2f} s in {len(per_op)} instructions (summed over threads)")
    for name, t in per_op.most_common(top):
        shape, op_name = ops[name]
        print(f"  {t:7.3f} s {100 * t / total:5.1f}%  {name:28s} {shape:28s} {_where(op_name)}  "
              f"[{op_name.split('/')[-1]}]")
    groups = collections.Counter()
    for name, t in per_op.items():
        shape, op_name = ops[name]
        kind = op_name.split("/")[-1]
        groups[f"{_where(op_name).split()[0]} {'conv/dot' if kind in ('conv_general_dilated', 'dot_general') else kind}"] += t
    print("  by level and op kind:")
    for key, t in groups.most_common(top):
        print(f"  {t:7.3f} s {100 * t / total:5.1f}%  {key}")


def profile_torch(run, top: int) -> None:
    """torch.profiler of one diffusers decode: self CPU time per op and input shape."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    print("torch profile, by op:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    print("torch profile, by op and input shape:")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=top))


def run_case(decoder, vae, h: int, w: int, batch: int, args, device: str) -> None:
    import torch

    import cmjax
    from cmjax.decoding.decoder import decode_conv_shapes
    from tests.torch_peers import reference_decode

    print(f"\ndecode: batch {batch} of {h}x{w} latents -> {8 * h}x{8 * w} px, 2 steps, cmjax {args.dtype}, "
          f"torch {args.torch_dtype}")
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(batch, h, w, 4)).astype(np.float32)
    noise = [rng.normal(size=(batch, 8 * h, 8 * w, 3)).astype(np.float32) for _ in range(2)]
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32

    start = time.perf_counter()
    shapes = decode_conv_shapes(decoder.config, latents.shape, dtype)
    plan = tuning.tune(shapes, report=print)
    named = sum(plan.name(shape) != "xla" for shape in shapes)
    print(f"lowering plan: {named} of {len(shapes)} conv shapes not XLA's convolution, made in "
          f"{time.perf_counter() - start:.1f} s (cache {tuning.cache_path()})")

    def run_cmjax():
        return jax.block_until_ready(cmjax.decode(decoder, latents, noise=noise, dtype=dtype, lowering=plan))

    with PeakRSS() as mem_compile:
        start = time.perf_counter()
        ours = np.asarray(run_cmjax())
        compile_s = time.perf_counter() - start
    print(f"cmjax first call (compile + run) {compile_s:.2f} s; peak RSS {mem_compile.peak / 2**30:.2f} GiB")

    run_torch = None
    if not args.no_torch:
        tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.torch_dtype]

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

    # Interleaved, so that a burst of load on a shared machine hits both sides alike.
    # Page faults are counted too: fresh pages for large temporaries cost both sides, unequally
    # (glibc maps big blocks anew on every call unless GLIBC_TUNABLES=glibc.malloc.hugetlb=1).
    t_cmjax, t_torch, f_cmjax, f_torch = [], [], [], []
    with PeakRSS() as mem:
        for _ in range(args.repeats):
            t_cmjax += timed(run_cmjax, 1, f_cmjax)
            if run_torch is not None:
                t_torch += timed(run_torch, 1, f_torch)
    print(f"cmjax:     steady {statistics.median(t_cmjax):.3f} s (min {min(t_cmjax):.3f}, "
          f"all {' '.join(f'{t:.2f}' for t in t_cmjax)}); {statistics.median(f_cmjax):.0f} page faults per call")
    if run_torch is None:
        print(machine_line())
        return
    print(f"diffusers: steady {statistics.median(t_torch):.3f} s (min {min(t_torch):.3f}, "
          f"all {' '.join(f'{t:.2f}' for t in t_torch)}); {statistics.median(f_torch):.0f} page faults per call; "
          f"peak RSS of both {mem.peak / 2**30:.2f} GiB")
    ratio = statistics.median(t_cmjax) / statistics.median(t_torch)
    pairs = sorted(a / b for a, b in zip(t_cmjax, t_torch))
    print(f"ratio cmjax/diffusers: {ratio:.3f} (median of medians; per interleaved pair "
          f"{pairs[0]:.2f}-{pairs[-1]:.2f})")
    if device == "cpu" and args.torch_dtype == "fp32":
        print(f"max |cmjax - diffusers| over the images: {np.abs(ours - theirs).max():.2e}")
    flops = decode_flops(decoder, h, w, batch, dtype)
    ceiling = "; ceiling, a 2048^3 fp32 matmul: XLA %.0f, torch %.0f GFLOP/s" % matmul_peak() if device == "cpu" else ""
    print(f"{flops / 1e9:.0f} GFLOP per decode: cmjax {flops / statistics.median(t_cmjax) / 1e9:.0f} GFLOP/s "
          f"(best {flops / min(t_cmjax) / 1e9:.0f}), diffusers {flops / statistics.median(t_torch) / 1e9:.0f} "
          f"(best {flops / min(t_torch) / 1e9:.0f}){ceiling}")
    print(machine_line())
    if args.profile:
        from cmjax.decoding.decoder import _decode_jit, prepared_params

        params = prepared_params(decoder, latents.shape, dtype, plan)  # what cmjax.decode runs with
        lowered = _decode_jit.lower(params, jnp.asarray(latents), jnp.stack(noise), config=decoder.config,
                                    timesteps=cmjax.decoding.schedule.DEFAULT_TIMESTEPS, clip_denoised=True,
                                    dtype=dtype, lowering=plan)
        profile_cmjax(run_cmjax, lowered, args.profile)
        profile_torch(run_torch, args.profile)


def timed(fn, repeats: int, faults: list | None = None) -> list[float]:
    """Seconds per call; appends each call's minor page faults to ``faults`` when given."""
    times = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if faults is not None:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return times


def decode_flops(decoder, h: int, w: int, batch: int, dtype) -> float:
    """FLOPs of one decode: XLA's count for one UNet evaluation (the consistency function) times the steps.

    Counted with every conv lowered as XLA's direct convolution (XLA leaves out the products with
    the zero padding): the network's FLOPs, the same for diffusers (both evaluate the same network
    on the same shapes), not the fewer multiplies of the Winograd and subpixel lowerings nor the
    padding products of im2col.
    """
    from cmjax.decoding.decoder import denoise
    from cmjax.decoding.schedule import DEFAULT_TIMESTEPS

    f = decoder.config.upsample_factor
    x_t = jax.ShapeDtypeStruct((batch, f * h, f * w, 3), jnp.float32)
    z_up = jax.ShapeDtypeStruct((batch, f * h, f * w, decoder.config.latent_channels), jnp.float32)
    lowered = jax.jit(denoise, static_argnames=("t", "config", "dtype")).lower(  # default plan: XLA's conv
        decoder.params, x_t, z_up, t=1008, config=decoder.config, dtype=dtype)
    return len(DEFAULT_TIMESTEPS) * lowered.cost_analysis()["flops"]


def matmul_peak(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """GFLOP/s of an n^3 fp32 matmul in XLA and in torch on the CPU (best of ``repeats``): the ceiling."""
    import torch

    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(ja))
    t_xla = min(timed(lambda: jax.block_until_ready(mm(ja)), repeats))
    torch.mm(ta, ta)
    t_torch = min(timed(lambda: torch.mm(ta, ta), repeats))
    return 2 * n**3 / t_xla / 1e9, 2 * n**3 / t_torch / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="4x6:2,16x16:1",
                        help="comma-separated latent HxW:batch (pixels are 8x), e.g. 4x6:2,16x16:1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="cmjax compute dtype")
    parser.add_argument("--torch-dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--lowering", choices=LOWERINGS,
                        help="force cmjax's conv lowering (sets CMJAX_CONV_LOWERING; default: the plan tuned "
                             "for this CPU)")
    parser.add_argument("--no-torch", action="store_true", help="time cmjax only")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile one decode on each side and print the top N costs")
    args = parser.parse_args()
    if args.lowering:
        os.environ[tuning.OVERRIDE_ENV] = args.lowering

    import torch
    from diffusers import ConsistencyDecoderVAE

    import cmjax
    from cmjax.models.decoder_config import abstract_params
    from cmjax.weights.mapping import torch_to_flax

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; torch {torch.__version__} "
          f"on {device}, {torch.get_num_threads()} threads")
    print(machine_line())

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
    if not args.no_torch:
        tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.torch_dtype]
        vae = vae.to(device=device, dtype=tdtype)

    for case in args.cases.split(","):
        size, _, batch = case.partition(":")
        h, w = (int(v) for v in size.split("x"))
        run_case(decoder, vae, h, w, int(batch or 1), args, device)


if __name__ == "__main__":
    main()
