"""Training throughput: steps/s and examples/s of the train step (compile excluded), and MFU.

    python benchmarks/bench_train.py                         # the tiny CPU configs
    python benchmarks/bench_train.py --configs decoder_finetune --image-size 256 --batch 8
                                                             # the full decoder fine-tune (GPU)

For each config the script builds the real state and jitted step (cmjax.training), runs
``--warmup`` steps (the first compiles), then times ``--steps`` steps on a fixed batch resident on
the device, so input-pipeline time is excluded. MFU = FLOPs per step / step time / peak, with
FLOPs from XLA's cost analysis of the compiled step (for CT/iCT about 4 network forwards per image:
the student's forward and backward plus the target's forward; REFERENCE 4 gives 8.41 TFLOP per
forward at 256x256 for the full decoder) and the peak from --peak-tflops (default: 989 TFLOP/s,
bf16 dense, on H100/H200; none on CPU, where no MFU is printed).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmjax import parallel  # noqa: E402
from cmjax.data import to_global_batch  # noqa: E402
from cmjax.training import families, optim, step as step_lib  # noqa: E402
from cmjax.training import state as state_lib  # noqa: E402


def random_batch(config, fam) -> dict:
    """A host batch of the right shapes (uniform images; latents come from the patch encoder or
    are random raw SD-scale latents for data.latents='vae'/'file')."""
    rng = np.random.default_rng(0)
    h, w, c = fam.image_shape
    batch = {"image": rng.uniform(-1, 1, (config.batch_size, h, w, c)).astype(np.float32)}
    if fam.name == "decoder" and config.data.latents != "patch":
        batch["latent"] = (rng.standard_normal((config.batch_size, h // 8, w // 8, 4)) * 5).astype(np.float32)
    return batch


def frozen_for(config, fam, mesh) -> dict:
    frozen = {}
    if fam.name == "decoder" and config.data.latents == "patch":
        frozen["encoder"] = jax.device_put(families.patch_encoder_matrix(0), parallel.replicated(mesh))
    if config.algorithm == "cd":
        frozen["teacher"] = jax.jit(fam.init_params, out_shardings=parallel.replicated(mesh))(jax.random.key(1))
    return frozen


def bench(config, warmup: int, steps: int, peak_tflops: float | None) -> dict:
    mesh = parallel.make_mesh()
    fam = families.make_family(config)
    tx, sched = optim.make_optimizer(config)
    state, shardings = state_lib.create_train_state(fam.init_params, tx, config, mesh)
    batch = to_global_batch(random_batch(config, fam), parallel.data_sharding(mesh))
    frozen = frozen_for(config, fam, mesh)
    step = jax.jit(step_lib.make_train_step(fam, config, tx, sched), donate_argnums=(0,),
                   out_shardings=(shardings, parallel.replicated(mesh)))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - t0
    flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is backend-dependent
        pass
    for _ in range(warmup):
        state, metrics = compiled(state, batch, frozen)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, frozen)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / steps
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    out = {"config": config.get("name", ""), "family": fam.name, "algorithm": config.algorithm,
           "image": list(fam.image_shape), "batch": config.batch_size, "params": n_params,
           "compute_dtype": config.compute_dtype, "devices": jax.device_count(),
           "device": jax.devices()[0].device_kind, "compile_s": round(compile_s, 2),
           "step_s": round(dt, 4), "steps_per_sec": round(1 / dt, 3),
           "examples_per_sec": round(config.batch_size / dt, 1),
           "loss": float(metrics["loss"])}
    if flops:
        out["xla_flops_per_step"] = flops
        if peak_tflops:
            out["mfu"] = round(flops / dt / (peak_tflops * 1e12 * jax.device_count()), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="digits_tiny,decoder_tiny", help="comma-separated names in configs/")
    p.add_argument("--algorithm", default=None, help="override config.algorithm")
    p.add_argument("--batch", type=int, default=None, help="override config.batch_size (global)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU (default 989 on H100/H200, else none)")
    args = p.parse_args()
    peak = args.peak_tflops
    kind = jax.devices()[0].device_kind
    if peak is None and any(k in kind for k in ("H100", "H200")):
        peak = 989.0
    for name in args.configs.split(","):
        config = importlib.import_module(f"configs.{name}").get_config()
        config.name = name
        if args.algorithm:
            config.algorithm = args.algorithm
        if args.batch:
            config.batch_size = args.batch
        if args.image_size:
            config.data.image_size = args.image_size
        if args.dtype:
            config.compute_dtype = args.dtype
        if name == "decoder_finetune":  # benchmark without files: random init, patch latents
            config.model.init_checkpoint, config.data.latents = "", "patch"
        print(json.dumps(bench(config, args.warmup, args.steps, peak)), flush=True)


if __name__ == "__main__":
    main()
