"""Size cmjax's compiled programs for TPU slices without the hardware: memory, FLOPs, collectives.

    pip install -e ".[tpu]"     # libtpu (or: pip install --target DIR libtpu==<jax[tpu]'s pin>;
                                #          PYTHONPATH=DIR)
    python benchmarks/plan_tpu.py decode --topology v5e:2x2 --size 1024 --dtype bf16
    python benchmarks/plan_tpu.py decode --topology v5p:2x2x1 --size 512 --micro-batch search
    python benchmarks/plan_tpu.py decode --topology v5e:2x2 --size 4096 --tile 64
    python benchmarks/plan_tpu.py train --topology v5p:2x2x2 --config decoder_newspace --fsdp 1

For a named slice (``v5e:2x2``, ``v5p:2x2x1``, ``v5p:2x2x2`` = 8 chips on 2 hosts, ``v4:2x2x1``,
``v6e:2x2``) libtpu describes its devices (``jax.experimental.topologies.get_topology_desc``) on a
machine without TPUs; the program is lowered for a ``Mesh`` over them with ``ShapeDtypeStruct``
arguments (params from ``jax.eval_shape`` of their init: no weights, nothing allocated) and
compiled by the TPU compiler. The row printed is, per device (one chip, except v4, where libtpu
describes each of a chip's two TensorCores as a device):

* memory: XLA's buffer assignment (``memory_analysis``): arguments, temporaries, outputs, and
  peak = arguments + outputs + temporaries - donated aliases, against the chip's HBM;
* FLOPs per image (decode) or per example (train), from ``cost_analysis``. XLA counts a while
  loop's body once, so the decode's loops (``lax.map`` over micro-batches, the ``lax.scan`` over
  steps, the scan over tiles) are multiplied back by their trip counts; the train step has none;
* the collectives in the optimised HLO (kind x count);
* time per image/example at ``--mfu`` of the chip's dense bf16 peak (FLOPs / (mfu x peak)).

The programs are cmjax's own: ``decode`` compiles what decode.py runs
(``cmjax.batch_decode.program.make_decode_fn`` + ``compile_program``, tiled with ``--tile``);
``train`` compiles ``cmjax.training.loop.jit_train_step`` on the state layout of ``train_state_layout``.
The decoder configs' SD VAE encoder is described by its config alone (``--vae sd1|sd3``: SD 1.x for
decoder_finetune, the 16-channel SD3 space for decoder_newspace), written to a temporary
``cmjax.json`` so that ``make_family`` reads it as it would a converted checkpoint.

Convolutions: CMJAX_CONV_LOWERING is set to ``xla`` here (a CPU process would otherwise time CPU
lowerings and pick one for a TPU program). The compile runs on the host CPU: minutes for the
full-size decoder.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["CMJAX_CONV_LOWERING"] = "xla"  # XLA's convolution: the TPU's conv units, never a CPU choice
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several planning processes may share libtpu
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no TPU here: skip libtpu's device init (it only warns)

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmjax import parallel
from cmjax.batch_decode import program
from cmjax.batch_decode.options import DTYPES, DecodeOptions
from cmjax.decoding import schedule, tiling
from cmjax.models import vae as vae_lib
from cmjax.models.decoder_config import DecoderConfig, abstract_params
from cmjax.models.decoder_unet import UNetConfig
from cmjax.training import algorithms, families, loop, optim
from cmjax.training import state as state_lib
from cmjax.weights import checkpoint

GIB = 2 ** 30
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator: HBM per chip (GiB) and dense bf16 peak per chip (TFLOP/s); TPUs: Google's
    published figures (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e); H100: NVIDIA's (SXM)."""

    hbm_gib: float
    bf16_tflops: float


CHIPS = {"v4": Chip(32, 275), "v5e": Chip(16, 197), "v5p": Chip(95, 459), "v6e": Chip(32, 918),
         "h100": Chip(84929347584 / 2 ** 30, 989)}  # H100 SXM: the memory CUDA reports; 989 dense bf16
# The smallest decoder that exercises every part of the UNet (tests, quick checks).
TINY_UNET = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
VAE_CONFIGS = {"sd1": vae_lib.VAEConfig(),
               "sd3": vae_lib.VAEConfig(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                                        use_quant_conv=False, use_post_quant_conv=False)}


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice described by libtpu: its mesh (1-D, axis "data") and per-device chip figures."""

    name: str
    mesh: Mesh
    hosts: int
    hbm_bytes: float  # per device
    peak_flops: float  # per device, dense bf16


def target_named(name: str) -> Target:
    """``v5e:2x2`` (a TPU slice) or ``h100:2x8`` (hosts x GPUs) -> its devices, no accelerator needed;
    ValueError for an unknown generation."""
    generation, _, shape = name.partition(":")
    if generation not in CHIPS or not shape or not all(d.isdigit() for d in shape.split("x")):
        raise ValueError(f"topology {name!r}: expected <generation>:<shape>, generation one of {', '.join(CHIPS)}")
    dims = [int(d) for d in shape.split("x")]
    if generation == "h100":
        hosts, per_host = dims if len(dims) == 2 else (1, dims[0])
        devices = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                               target_config=H100_TARGET_CONFIG).devices
    else:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    per_chip = len(devices) // math.prod(dims)  # 2 on v4 (each TensorCore a device), else 1
    chip = CHIPS[generation]
    return Target(name, parallel.make_mesh(devices), len({d.process_index for d in devices}),
                  chip.hbm_gib * GIB / per_chip, chip.bf16_tflops * 1e12 / per_chip)


# XLA's GPU target description of an H100 SXM (``TargetConfig``; openxla/xla PR 25919 shows the form):
# what the CUDA plugin compiles for when there is no GPU to ask.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


# ------------------------------------------------------------------------------------------------
# What a compiled program says about itself


def collectives(hlo: str) -> dict[str, int]:
    """{kind: count} of the collective instructions in optimised HLO text (async "-start" halves
    counted once, their "-done" halves not). The TPU compiler writes a reduce-scatter as a fusion
    of an all-reduce and slices, a computation named ``all-reduce-scatter.N``: each counts as one
    reduce-scatter, and the all-reduce inside it is not counted again."""
    counts: dict[str, int] = {}
    op = re.compile(r"[\s)}](" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
    in_reduce_scatter = False
    for line in hlo.splitlines():
        if line and not line[0].isspace():  # a computation's header (or its closing brace)
            in_reduce_scatter = line.lstrip("%").startswith("all-reduce-scatter")
            if in_reduce_scatter:
                counts["reduce-scatter"] = counts.get("reduce-scatter", 0) + 1
            continue
        for kind in op.findall(line):
            if not in_reduce_scatter:
                counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def loop_count(hlo: str) -> int:
    """While loops in optimised HLO text (XLA's cost analysis counts each body once)."""
    return len(re.findall(r"[\s)}]while\(", hlo))


@dataclasses.dataclass(frozen=True)
class Refused:
    """The TPU compiler's answer to a program whose buffers exceed a chip's HBM: it refuses to
    compile it (RESOURCE_EXHAUSTED) and says how much the temporaries need."""

    message: str

    @property
    def temporaries(self) -> float:
        found = re.search(r"temporaries \(([\d.]+)([MGT])\)", self.message)
        return float(found.group(1)) * 2 ** (10 * " KMGT".index(found.group(2))) if found else math.nan


def compile_or_refused(compile_fn: Callable[[], Any]) -> Any:
    """``compile_fn()``, or a ``Refused`` when the compiler says the program does not fit."""
    try:
        return compile_fn()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Refused(str(e).strip().splitlines()[0])


def sizes(compiled: Any) -> dict[str, float]:
    """Per-device bytes of XLA's buffer assignment; peak = arguments + outputs + temporaries - aliases.
    For a refused program only the temporaries are known (the peak is at least those)."""
    if isinstance(compiled, Refused):
        need = compiled.temporaries
        return {"arguments": math.nan, "temporaries": need, "outputs": math.nan, "aliased": 0, "peak": need}
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def flops_of(compiled: Any) -> float:
    """XLA's FLOP count of one device's program; NaN where the backend gives none (a GPU compiled
    without a GPU)."""
    if isinstance(compiled, Refused):
        return math.nan
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", math.nan)) if cost else math.nan


def row(target: Target, what: str, compiled: Any, compile_s: float, flops: float, mfu: float,
        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures of one compiled program; ``flops`` per image/example."""
    mem = sizes(compiled)
    hlo = "" if isinstance(compiled, Refused) else compiled.as_text()
    return {"topology": target.name, "devices": target.mesh.size, "hosts": target.hosts, "program": what,
            **(extra or {}),
            **{f"{k}_gib": round(v / GIB, 3) for k, v in mem.items() if k != "aliased"},
            "hbm_gib": round(target.hbm_bytes / GIB, 1),
            "fits": not isinstance(compiled, Refused) and mem["peak"] <= target.hbm_bytes,
            "gflop_per_item": None if math.isnan(flops) else round(flops / 1e9, 2),
            "ms_per_item": None if math.isnan(flops) else round(1e3 * flops / (mfu * target.peak_flops), 3),
            "mfu": mfu,
            "collectives": collectives(hlo), "while_loops": loop_count(hlo), "compile_s": round(compile_s, 1),
            **({"refused": compiled.message} if isinstance(compiled, Refused) else {})}


# ------------------------------------------------------------------------------------------------
# Programs


def decoder_config(model: str) -> DecoderConfig:
    return DecoderConfig() if model == "full" else DecoderConfig(unet=TINY_UNET)


def compile_decode(target: Target, config: DecoderConfig, *, size: int, dtype: str, micro_batch: int,
                   tile: int | None = None, param_dtype: str = "fp32") -> tuple[Any, float, dict]:
    """decode.py's program for ``size`` x ``size`` images, one micro-batch per device:
    (compiled, FLOPs per image, facts about the run)."""
    latent = size // config.upsample_factor
    overlap = tiling.default_overlap(tile) if tile else None
    options = DecodeOptions(timesteps=schedule.DEFAULT_TIMESTEPS, dtype=dtype, tile=tile, tile_overlap=overlap,
                            micro_batch=micro_batch)  # the conv lowering: XLA's (the plan's default)
    step = program.make_decode_fn(config, target.mesh, options)
    pdtype = jnp.dtype(jnp.bfloat16 if param_dtype == "bf16" else jnp.float32)
    rep = parallel.replicated(target.mesh)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, pdtype, sharding=rep),
                          abstract_params(config))
    rows = (target.mesh.size * micro_batch, latent, latent, config.latent_channels)
    compiled = compile_or_refused(lambda: program.compile_program(step, params, rows, target.mesh)[0])
    tiles = 1
    if tile and tile < latent:
        r, c = tiling.tile_grid(latent, latent, tile, overlap)
        tiles = len(r) * len(c)
    # Loops: lax.map over micro-batches (1 trip here), the scan over steps, the scan over tiles.
    flops = flops_of(compiled) * len(schedule.DEFAULT_TIMESTEPS) * tiles / micro_batch
    facts = {"size": size, "dtype": dtype, "param_dtype": param_dtype, "micro_batch": micro_batch,
             "tile": tile, "tiles": tiles}
    return compiled, flops, facts


def largest_micro_batch(target: Target, config: DecoderConfig, report: Callable[[dict], None],
                        start: int = 1, **kw) -> int:
    """The largest micro-batch per device whose peak fits HBM, searched on memory_analysis:
    doubling from ``start`` until one does not fit, then bisecting; each compile's row is reported."""
    fits, fails = 0, None
    mb = start
    while fails is None or fails - fits > 1:
        compiled, flops, facts, seconds = _decode_row(target, config, mb, **kw)
        report(row(target, "decode", compiled, seconds, flops, kw["mfu"], facts))
        if not isinstance(compiled, Refused) and sizes(compiled)["peak"] <= target.hbm_bytes:
            fits = mb
        else:
            fails = mb
        if fails is None:
            mb *= 2
        else:
            if fits == 0 and fails == 1:
                break
            mb = (fits + fails) // 2
    return fits


def _decode_row(target, config, mb, *, mfu, **kw):
    t0 = time.perf_counter()
    compiled, flops, facts = compile_decode(target, config, micro_batch=mb, **kw)
    return compiled, flops, facts, time.perf_counter() - t0


def vae_checkpoint_dir(root: Path, vae: vae_lib.VAEConfig) -> str:
    """A config-only VAE checkpoint (cmjax.json, no weights): all that ``make_family`` reads."""
    meta = {"format": checkpoint.VAE_FORMAT, "version": checkpoint.VERSION, "config": vae.to_dict(),
            "parts": [vae_lib.ENCODER]}
    (root / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
    return str(root)


def train_config(name: str, fsdp: bool | None, vae_dir: str | None, tiny: bool = False):
    """configs/<name>.py's config with nothing to read from disk but ``vae_dir`` (decoder family)."""
    config = importlib.import_module(f"configs.{name}").get_config()
    if fsdp is not None:
        config.fsdp = fsdp
    if config.family == "decoder":
        config.model.init_checkpoint = ""  # the UNet of config.model.unet (the released model's by default)
        if config.data.latents == "vae":
            config.data.vae_checkpoint = vae_dir
    if tiny:
        config.model.unet.block_out_channels = TINY_UNET.block_out_channels
        config.model.unet.layers_per_block = TINY_UNET.layers_per_block
        config.model.unet.norm_num_groups = TINY_UNET.norm_num_groups
    return config


def compile_train(target: Target, config, name: str = "") -> tuple[Any, float, dict]:
    """The train step of ``config`` for its batch over the slice: (compiled, FLOPs per example, facts)."""
    mesh = target.mesh
    family = families.make_family(config)
    model = algorithms.get(config.algorithm).model(family, config)
    tx, sched = optim.make_optimizer(config)
    keeps_target = algorithms.get(config.algorithm).keeps_target
    abstract, shardings = state_lib.train_state_layout(model.init_params, tx, config, mesh, keeps_target=keeps_target)
    state = state_lib.abstract_with_shardings(abstract, shardings)
    data = parallel.data_sharding(mesh)
    h, w, c = family.image_shape
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, h, w, c), jnp.float32, sharding=data)}
    frozen, frozen_sh = {}, {}
    rep = parallel.replicated(mesh)
    if family.name == "decoder" and config.data.latents == "vae":
        vae_cfg, _ = checkpoint.read_vae_config(config.data.vae_checkpoint)
        enc = vae_lib.abstract_params(vae_cfg, (vae_lib.ENCODER,))
    elif family.name == "decoder" and config.data.latents == "patch":
        enc = jax.eval_shape(lambda: jnp.asarray(families.patch_encoder_matrix(0)))
    if family.name == "decoder" and config.data.latents in ("vae", "patch"):
        frozen["encoder"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), enc)
        frozen_sh["encoder"] = jax.tree.map(lambda _: rep, enc)
    step = loop.jit_train_step(family, config, tx, sched, mesh, shardings, frozen_sh)
    compiled = compile_or_refused(lambda: step.lower(state, batch, frozen).compile())
    facts = {"config": name, "batch": config.batch_size, "fsdp": bool(config.fsdp), "remat": bool(config.remat),
             "dtype": config.compute_dtype, "image": h,
             "params_m": round(sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params)) / 1e6, 1)}
    return compiled, flops_of(compiled) * mesh.size / config.batch_size, facts


# ------------------------------------------------------------------------------------------------
# Command line


def format_row(r: dict[str, Any]) -> str:
    """One markdown table row (columns of ``HEADER``)."""
    what = r["program"] + (f" {r['size']}px {r['dtype']} mb {r['micro_batch']}" if "size" in r else "")
    if r.get("tile"):
        what += f" tile {r['tile']} ({r['tiles']} tiles)"
    if "config" in r:
        what += f" {r['config']} b{r['batch']} {r['dtype']} fsdp={'on' if r['fsdp'] else 'off'}"
        what += " remat" if r.get("remat") else ""
    coll = ", ".join(f"{k} x{v}" for k, v in r["collectives"].items()) or "none"
    if "refused" in r:
        coll = "n/a: the compiler refused it (RESOURCE_EXHAUSTED)"
    g = {k: _maybe(None if math.isnan(r[f"{k}_gib"]) else r[f"{k}_gib"], "{:.2f}")
         for k in ("arguments", "temporaries", "outputs", "peak")}
    return (f"| {r['topology']} ({r['devices']} dev, {r['hosts']} host{'s' if r['hosts'] > 1 else ''}) | {what} | "
            f"{g['arguments']} | {g['temporaries']} | {g['outputs']} | "
            f"{'>= ' if 'refused' in r else ''}{g['peak']} / {r['hbm_gib']:g} {'fits' if r['fits'] else 'DOES NOT FIT'} | "
            f"{_maybe(r['gflop_per_item'], '{:,.0f}')} | {_maybe(r['ms_per_item'], '{:.1f}')} | {coll} | "
            f"{r['compile_s']:.0f} |")


def _maybe(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


HEADER = ("| slice | program | args GiB | temp GiB | out GiB | peak / HBM GiB | GFLOP per item | "
          "ms per item at MFU | collectives | compile s |\n|---|---|---|---|---|---|---|---|---|---|")


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="program", required=True)
    for name in ("decode", "train"):
        s = sub.add_parser(name)
        s.add_argument("--topology", default="v5e:2x2", help="e.g. v5e:2x2, v5p:2x2x1, v5p:2x2x2, v4:2x2x1, v6e:2x2")
        s.add_argument("--mfu", type=float, default=0.5, help="fraction of the bf16 peak for ms per item")
        s.add_argument("--json", action="store_true", help="print the row as JSON too")
    d = sub.choices["decode"]
    d.add_argument("--model", choices=("full", "tiny"), default="full")
    d.add_argument("--size", type=int, default=1024, help="image side in pixels")
    d.add_argument("--dtype", choices=DTYPES, default="bf16")
    d.add_argument("--param-dtype", choices=DTYPES, default="fp32",
                   help="params on the device (decode.py loads fp32)")
    d.add_argument("--micro-batch", default="1", help="images per device at once, or 'search'")
    d.add_argument("--tile", type=int, default=None, help="latent tile (tiled decode)")
    t = sub.choices["train"]
    t.add_argument("--config", default="decoder_newspace", help="a module of configs/")
    t.add_argument("--fsdp", type=int, choices=(0, 1), default=None, help="override config.fsdp")
    t.add_argument("--batch", type=int, default=None, help="override config.batch_size (global, per step)")
    t.add_argument("--remat", type=int, choices=(0, 1), default=None, help="override config.remat")
    t.add_argument("--tiny", action="store_true", help="decoder family: the tiny UNet")
    t.add_argument("--vae", choices=tuple(VAE_CONFIGS), default=None,
                   help="decoder family's SD VAE (default: sd3 for decoder_newspace, else sd1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        target = target_named(args.topology)
    except (ValueError, RuntimeError) as e:
        print(f"plan_tpu: {e}", file=sys.stderr)
        return 2
    print(f"jax {jax.__version__}, {_compiler_version(args.topology)}, {time.strftime('%Y-%m-%d')}; "
          f"ms per item at {args.mfu:g} of the bf16 peak", flush=True)
    print(HEADER, flush=True)

    def report(r):
        print(format_row(r), flush=True)
        if args.json:
            print(json.dumps(r), flush=True)

    if args.program == "decode":
        kw = {"size": args.size, "dtype": args.dtype, "tile": args.tile, "param_dtype": args.param_dtype}
        config = decoder_config(args.model)
        if args.micro_batch == "search":
            best = largest_micro_batch(target, config, report, mfu=args.mfu, **kw)
            print(f"largest micro-batch per device that fits: {best}")
        else:
            compiled, flops, facts, seconds = _decode_row(target, config, int(args.micro_batch), mfu=args.mfu, **kw)
            report(row(target, "decode", compiled, seconds, flops, args.mfu, facts))
        return 0
    vae = args.vae or ("sd3" if args.config == "decoder_newspace" else "sd1")
    with tempfile.TemporaryDirectory() as tmp:
        config = train_config(args.config, None if args.fsdp is None else bool(args.fsdp),
                              vae_checkpoint_dir(Path(tmp), VAE_CONFIGS[vae]), tiny=args.tiny)
        if args.batch:
            config.batch_size = args.batch
        if args.remat is not None:
            config.remat = bool(args.remat)
        t0 = time.perf_counter()
        compiled, flops, facts = compile_train(target, config, args.config)
        seconds = time.perf_counter() - t0
    report(row(target, "train", compiled, seconds, flops, args.mfu, facts))
    return 0


def _compiler_version(topology: str) -> str:
    """The installed compiler plugin's distribution and version (libtpu, or the CUDA PJRT plugin)."""
    from importlib.metadata import PackageNotFoundError, version
    name = "jax-cuda12-pjrt" if topology.startswith("h100") else "libtpu"
    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:  # e.g. a bare libtpu.so named by TPU_LIBRARY_PATH
        return f"{name} (version unknown)"


if __name__ == "__main__":
    sys.exit(main())
