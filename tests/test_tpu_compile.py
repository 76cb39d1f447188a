"""cmjax's programs compiled for TPU slices (v5e:2x2; v5p:2x4x1 and v5p:2x2x2 of two hosts each)
without a TPU: benchmarks/plan_tpu.py.

The compiling tests need libtpu (``pip install -e ".[tpu]"``) and are skipped without it; each
compiles with the TPU compiler on the host CPU: the three took 5.8 minutes of CPU (48 minutes of
wall time on a 2-core machine shared with other jobs), hence ``slow``.

The per-device memory XLA assigns is checked against figures derived from the shapes: the params
(replicated for decoding, split four ways under FSDP), the UNet's skip activations that must all be
alive when its up path starts, and the train state (params, EMA, Adam's two moments).
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import plan_tpu

from cmjax.batch_decode import program, run
from cmjax.batch_decode.options import DecodeOptions
from cmjax.decoding.decoder import denoise
from cmjax.decoding.schedule import DEFAULT_TIMESTEPS
from cmjax.models.decoder_config import DecoderConfig, abstract_params
from cmjax.models.decoder_unet import UNetConfig
from cmjax.training import algorithms, families, optim
from cmjax.training import state as state_lib

# Channels of 128 and more: TPU buffers are tiled (8, 128), so narrower tensors would be padded by
# up to 8x and the derived sizes would say little; at these widths padding stays within a few %.
UNET = UNetConfig(block_out_channels=(128, 256), layers_per_block=1, norm_num_groups=32)
SLACK = 1.10  # tiling padding and XLA's small buffers (keys, scalars, constants)


@pytest.fixture(scope="module")
def v5e():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed")
    return plan_tpu.target_named("v5e:2x2")


def nbytes(tree) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def skip_elements(unet: UNetConfig, h: int, w: int) -> int:
    """Elements per image of the UNet's skip activations (cmjax.models.unet): conv_in's output,
    every down resnet's output and every downsampler's, all alive when the up path begins."""
    chans = unet.block_out_channels
    total = h * w * chans[0]
    for i, ch in enumerate(chans):
        total += unet.layers_per_block * ch * (h >> i) * (w >> i)
        if i < len(chans) - 1:
            total += ch * (h >> (i + 1)) * (w >> (i + 1))
    return total


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_decode_program_fits_its_derived_memory_and_communicates_nothing(v5e):
    """decode.py's program at 256x256, fp32, one image per chip: the arguments are the replicated
    params and the latents; the peak holds at least the params and the skip activations, and at
    most the params plus two images' worth of network activations (the decode keeps one step's);
    data parallelism needs no collectives."""
    config = DecoderConfig(unet=UNET)
    compiled, flops, _ = plan_tpu.compile_decode(v5e, config, size=256, dtype="fp32", micro_batch=1)
    mem = plan_tpu.sizes(compiled)
    params = nbytes(abstract_params(config))
    latents = 32 * 32 * config.latent_channels * 4
    assert params + latents <= mem["arguments"] <= SLACK * params + latents + 2 ** 16
    skips = 4 * skip_elements(UNET, 256, 256)
    # Output: the decoded image (256 x 256 x 3 float32, 786 KiB) per device.
    assert mem["outputs"] == pytest.approx(256 * 256 * 3 * 4, rel=0.35)  # 3 channels pad to 4 at most
    assert params + skips <= mem["peak"] <= SLACK * params + 2 * (skips + 256 * 256 * 2 * 128 * 4)
    assert plan_tpu.collectives(compiled.as_text()) == {}
    # FLOPs: XLA counts a loop body once; plan_tpu multiplies the step loop back. The reference is
    # the count of one network evaluation, lowered alone (no loop), times the two steps.
    x_t = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    z_up = jax.ShapeDtypeStruct((1, 256, 256, config.latent_channels), jnp.float32)
    one = jax.jit(denoise, static_argnames=("t", "config", "dtype")).lower(
        abstract_params(config), x_t, z_up, t=1008, config=config).cost_analysis()["flops"]
    assert flops == pytest.approx(len(DEFAULT_TIMESTEPS) * one, rel=0.05)


def tiny_train(fsdp: bool):
    config = plan_tpu.train_config("decoder_tiny", fsdp, None)
    config.model.unet.block_out_channels = UNET.block_out_channels
    config.model.unet.layers_per_block = UNET.layers_per_block
    config.model.unet.norm_num_groups = UNET.norm_num_groups
    return config


def state_bytes_per_device(config, devices: int) -> int:
    """The train state's bytes on one device: leaves split as state.tree_shardings splits them."""
    family = families.make_family(config)
    model = algorithms.get(config.algorithm).model(family, config)
    tx, _ = optim.make_optimizer(config)
    abstract, _ = state_lib.train_state_layout(model.init_params, tx, config, plan_tpu.parallel.make_mesh(),
                                               keeps_target=algorithms.get(config.algorithm).keeps_target)
    total = 0
    for a in jax.tree.leaves(abstract):
        size = math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
        split = config.fsdp and state_lib.fsdp_spec(tuple(a.shape), devices, config.fsdp_min_size) != P()
        total += size // devices if split else size
    return total


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
@pytest.mark.parametrize("fsdp", [True, False])
def test_train_step_memory_and_collectives(v5e, fsdp):
    """decoder_tiny's train step (iCT, Adam) with a 128/256-channel UNet: the arguments are the
    state (params, EMA, Adam's mu and nu: 4x the params; a quarter of each large leaf per device
    under FSDP), the batch share and the patch encoder. FSDP gathers params and reduce-scatters
    their gradients, and moves no activations; data parallelism all-reduces the gradients and
    gathers nothing."""
    config = tiny_train(fsdp)
    params = nbytes(jax.eval_shape(families.make_family(config).init_params, jax.random.key(0)))
    state = state_bytes_per_device(config, 4)
    if fsdp:
        assert state < 2 * params  # 4 copies of the params, most split four ways
    else:
        assert state >= 4 * params
    compiled, _, _ = plan_tpu.compile_train(v5e, config, "decoder_tiny")
    mem = plan_tpu.sizes(compiled)
    batch = config.batch_size // 4 * 16 * 16 * 3 * 4
    assert state + batch <= mem["arguments"] <= SLACK * (state + batch) + 2 ** 16
    assert mem["aliased"] >= state * 0.9  # the state is donated: updated in place
    kinds = plan_tpu.collectives(compiled.as_text())
    if fsdp:
        assert kinds.get("all-gather", 0) >= 1 and kinds.get("reduce-scatter", 0) >= 1, kinds
        # params used whole, gradients back to their shards: no activations moved between layouts
        # (before the step's sharding constraints: 52 all-to-alls, 16 collective-permutes)
        assert "all-to-all" not in kinds and "collective-permute" not in kinds, kinds
    else:
        assert kinds.get("all-reduce", 0) >= 1, kinds
        assert "all-gather" not in kinds and "reduce-scatter" not in kinds, kinds



@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_fsdp_over_two_hosts_gathers_and_reduce_scatters_and_a_3d_slice_all_reduces():
    """The FSDP step over a slice of two hosts (v5p:2x4x1: 8 chips, a 2-D torus) communicates as on
    one host: params gathered, gradients reduce-scattered, no activations moved; its state is split
    eight ways. On a 3-D slice (v5p:2x2x2, also two hosts; every v5p slice of 8 chips or more is
    3-D) the TPU compiler (libtpu 0.0.42.1) writes every reduce-scatter as an all-reduce and a
    slice, even an explicit ``lax.psum_scatter`` over all chips: the compiler's lowering, not the
    step's sharding, which is why benchmarks/TPU.md's 2-host v5p:2x2x2 row has no reduce-scatter."""
    flat = plan_tpu.target_named("v5p:2x4x1")
    cube = plan_tpu.target_named("v5p:2x2x2")
    assert flat.hosts == cube.hosts == 2 and flat.mesh.size == cube.mesh.size == 8

    config = tiny_train(True)
    compiled, _, _ = plan_tpu.compile_train(flat, config, "decoder_tiny")
    kinds = plan_tpu.collectives(compiled.as_text())
    assert kinds.get("all-gather", 0) >= 1 and kinds.get("reduce-scatter", 0) >= 1, kinds
    assert "all-to-all" not in kinds and "collective-permute" not in kinds, kinds
    state = state_bytes_per_device(config, 8)
    batch = config.batch_size // 8 * 16 * 16 * 3 * 4
    mem = plan_tpu.sizes(compiled)
    assert state + batch <= mem["arguments"] <= SLACK * (state + batch) + 2 ** 16

    def psum_scatter_kinds(target):
        mesh = target.mesh
        axis = mesh.axis_names[0]
        f = jax.jit(jax.shard_map(lambda x: jax.lax.psum_scatter(x, axis, scatter_dimension=0, tiled=True),
                                  mesh=mesh, in_specs=P(axis), out_specs=P(axis)))
        x = jax.ShapeDtypeStruct((mesh.size * 1024, 1024), jnp.float32,
                                 sharding=jax.sharding.NamedSharding(mesh, P(axis)))
        return plan_tpu.collectives(f.lower(x).compile().as_text())

    assert psum_scatter_kinds(flat) == {"reduce-scatter": 1}
    assert psum_scatter_kinds(cube) == {"all-reduce": 1}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_remat_shrinks_the_backward_pass_on_tpu(v5e):
    """The gradient of the 128/256-channel UNet at 128x128, bf16, one image per chip, with and
    without config.remat: remat keeps each residual block's input (at least the skip activations,
    in bf16) instead of its norms and activations; the TPU compiler assigned 236 MiB of
    temporaries without it and 92 MiB with it (2026-12-03)."""
    config = DecoderConfig(unet=UNET)
    rep, data = plan_tpu.parallel.replicated(v5e.mesh), plan_tpu.parallel.data_sharding(v5e.mesh)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract_params(config))
    x = jax.ShapeDtypeStruct((4, 128, 128, 3), jnp.float32, sharding=data)
    z = jax.ShapeDtypeStruct((4, 128, 128, config.latent_channels), jnp.float32, sharding=data)

    def temporaries(remat: bool) -> int:
        grad = jax.jit(jax.grad(lambda p, x, z: jnp.sum(denoise(p, x, z, 500, config, jnp.bfloat16, remat=remat) ** 2)))
        return grad.lower(params, x, z).compile().memory_analysis().temp_size_in_bytes

    plain, remat = temporaries(False), temporaries(True)
    assert 2 * skip_elements(UNET, 128, 128) <= remat < 0.5 * plain


HBM_REFUSAL = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(60.81G) exceeds available HBM (15.75G).")


def test_a_program_the_compiler_refuses_is_a_refused_shape_and_a_row(monkeypatch, tmp_path):
    """The TPU compiler itself rejects a program that exceeds HBM (no memory analysis to compare
    first): decode.py refuses that shape with the tiling hint instead of crashing, and the planning
    command turns the refusal into a row that does not fit, with the temporaries it names."""
    def refuse(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(HBM_REFUSAL)

    monkeypatch.setattr(program, "compile_program", refuse)
    said = []
    programs = run._Programs(None, lambda: {}, lambda: {}, None, DecodeOptions(output=tmp_path), 4, said.append)
    compiled, _, why = programs.get((128, 128), 4)
    assert compiled is None
    assert "128x128 latents does not fit in a device's memory" in why and "--tile" in why
    assert "60.81G" in why
    assert programs.get((128, 128), 4) == (None, None, why)  # remembered: not compiled again
    # Without --tile, decode.py tries the shape in tiles of 64 latents (run._tiled_programs) first;
    # when those are refused too, the hint is a smaller tile.
    tiled = run._Programs(None, lambda: {}, lambda: {}, None, DecodeOptions(output=tmp_path, tile=64), 4,
                          said.append)
    programs = run._Programs(None, lambda: {}, lambda: {}, None, DecodeOptions(output=tmp_path), 4, said.append,
                             tiled=lambda shape: tiled)
    compiled, _, why = programs.get((128, 128), 4)
    assert compiled is None and "a smaller --tile than 64" in why and "60.81G" in why
    assert any("decoding them in tiles of 64 latents instead" in m for m in said), said

    refused = plan_tpu.compile_or_refused(refuse)
    assert refused.temporaries == pytest.approx(60.81 * 2 ** 30)
    assert plan_tpu.sizes(refused)["peak"] == refused.temporaries
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        plan_tpu.compile_or_refused(lambda: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("INTERNAL: x")))


class _FakeCompiled:
    """Stands in for a compiled decode whose buffers grow by 5 GiB per image of the micro-batch."""

    def __init__(self, micro_batch: int):
        self.mb = micro_batch

    def memory_analysis(self):
        return type("Stats", (), {"argument_size_in_bytes": 2 ** 30, "temp_size_in_bytes": 5 * 2 ** 30 * self.mb,
                                  "output_size_in_bytes": 0, "alias_size_in_bytes": 0})()

    def cost_analysis(self):
        return {"flops": 1e12 * self.mb}

    def as_text(self):
        return ""


def test_the_micro_batch_search_finds_the_largest_that_fits(monkeypatch):
    """1 GiB of params + 5 GiB per image in 16 GiB: 3 images fit, 4 do not; the search doubles to 4
    then bisects to 3 (compiling 1, 2, 4, 3), and every compile is reported."""
    tried = []

    def fake_row(target, config, mb, *, mfu, **kw):
        tried.append(mb)
        return _FakeCompiled(mb), 1e12, {"micro_batch": mb}, 1.0

    monkeypatch.setattr(plan_tpu, "_decode_row", fake_row)
    target = plan_tpu.Target("fake", plan_tpu.parallel.make_mesh(), 1, 16 * 2 ** 30, 1e14)
    rows = []
    assert plan_tpu.largest_micro_batch(target, DecoderConfig(unet=UNET), rows.append, mfu=0.5) == 3
    assert tried == [1, 2, 4, 3]
    assert [r["fits"] for r in rows] == [True, True, False, True]
