"""Training throughput: steps/s and examples/s of the train step (compile excluded), and MFU.

    python benchmarks/bench_train.py                         # the tiny CPU configs
    python benchmarks/bench_train.py --configs decoder_finetune --image-size 256 --batch 8
                                                             # the full decoder fine-tune (GPU)
    python benchmarks/bench_train.py --configs cifar10_ict,cifar10_sct,cifar10_meanflow --batch 8 \
        --dtype float32 --steps 5 --jvp-cost               # iCT vs the JVP objectives (CPU)

For each config the script builds the real state and jitted step (cmjax.training), runs
``--warmup`` steps (the first compiles), then times ``--steps`` steps on a fixed batch resident on
the device, so input-pipeline time is excluded. MFU = FLOPs per step / step time / peak, with
FLOPs from XLA's cost analysis of the compiled step (for CT/iCT about 4 network forwards per image:
the student's forward and backward plus the target's forward; the UNet's convolutions count 8.41 TFLOP per
forward at 256x256 for the full decoder) and the peak from --peak-tflops (default: 989 TFLOP/s,
bf16 dense, on H100/H200; none on CPU, where no MFU is printed). ``step_peak_mib`` is XLA's
buffer assignment for the compiled step (arguments + outputs + temporaries - donated aliases).
``--jvp-cost`` adds the time of one forward+backward of the raw network and of its ``jax.jvp``
(what sCT/MeanFlow add to a step).
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
from cmjax.training import algorithms, families, optim  # noqa: E402
from cmjax.training import state as state_lib  # noqa: E402
from cmjax.training import step as step_lib


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
    if algorithms.get(config.algorithm).needs_teacher:
        frozen["teacher"] = jax.jit(fam.init_params, out_shardings=parallel.replicated(mesh))(jax.random.key(1))
    return frozen


def bench(config, warmup: int, steps: int, peak_tflops: float | None) -> dict:
    mesh = parallel.make_mesh()
    fam = families.make_family(config)
    model = algorithms.get(config.algorithm).model(fam, config)
    tx, sched = optim.make_optimizer(config)
    state, shardings = state_lib.create_train_state(model.init_params, tx, config, mesh,
                                                       keeps_target=algorithms.get(config.algorithm).keeps_target)
    batch = to_global_batch(random_batch(config, fam), parallel.data_sharding(mesh))
    frozen = frozen_for(config, fam, mesh)
    step = jax.jit(step_lib.make_train_step(fam, config, tx, sched), donate_argnums=(0,),
                   out_shardings=(shardings, parallel.replicated(mesh)))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - t0
    flops, peak_bytes = None, None
    try:  # XLA's buffer assignment: arguments + outputs + temporaries - aliased (donated) bytes
        mem = compiled.memory_analysis()
        peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                      - mem.alias_size_in_bytes)
    except Exception:  # backend-dependent
        pass
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
    if peak_bytes:
        out["step_peak_mib"] = round(peak_bytes / 2 ** 20, 1)
    if flops:
        out["xla_flops_per_step"] = flops
        if peak_tflops:
            out["mfu"] = round(flops / dt / (peak_tflops * 1e12 * jax.device_count()), 4)
    return out


def jvp_cost(config, warmup: int, steps: int) -> dict:
    """Seconds of (a) value_and_grad of mean(F^2) (one forward + backward of the raw network) and
    (b) jax.jvp of the network in x and time (forward + tangent, what sCM/MeanFlow add per step),
    on a fixed batch of the config's image family; image family only."""
    fam = families.make_family(config)
    params = jax.jit(fam.init_params)(jax.random.key(0))
    h, w, c = fam.image_shape
    b = config.batch_size
    x = jax.random.normal(jax.random.key(1), (b, h, w, c))
    tcols = jax.random.uniform(jax.random.key(2), (b, config.model.time_inputs)) if config.model.time_inputs > 1 \
        else jax.random.uniform(jax.random.key(2), (b,))
    net = lambda p, xx, tt: fam.apply_fn(p, None)(xx, tt).astype(np.float32)
    fwd_bwd = jax.jit(jax.value_and_grad(lambda p: (net(p, x, tcols) ** 2).mean()))
    jvp = jax.jit(lambda p: jax.jvp(lambda xx, tt: net(p, xx, tt), (x, tcols), (x, jax.numpy.ones_like(tcols))))
    fwd = jax.jit(lambda p: net(p, x, tcols))
    out = {}
    for name, fn in (("forward_s", fwd), ("forward_backward_s", fwd_bwd), ("jvp_s", jvp)):
        for _ in range(warmup):
            jax.block_until_ready(fn(params))
        t0 = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(fn(params))
        out[name] = round((time.perf_counter() - t0) / steps, 4)
    out["jvp_over_forward_backward"] = round(out["jvp_s"] / out["forward_backward_s"], 3)
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
    p.add_argument("--jvp-cost", action="store_true",
                   help="also time a plain forward/backward of the network against its jax.jvp")
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
        result = bench(config, args.warmup, args.steps, peak)
        if args.jvp_cost and config.family == "image":
            result.update(jvp_cost(config, args.warmup, args.steps))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
