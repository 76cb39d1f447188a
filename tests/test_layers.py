"""Shared layers against their torch counterparts; the convolution lowerings and the plan that picks one.

(Measuring and caching the plan: tests/test_tuning.py.)"""
import ast
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cmjax.models
from cmjax.models.conv_lowering import CONV, LOWERINGS, XLA, ConvShape, LoweringPlan, applicable, candidates, upsampled_conv
from cmjax.models.layers import Conv, GroupNorm, ResnetBlock, avg_pool_2x2, conv_shapes, upsample_nearest, with_prepared_kernels
from tests.torch_peers import nchw, nhwc


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_conv_matches_torch(kernel, lowering):
    rng = np.random.default_rng(kernel)
    x = rng.normal(size=(2, 6, 10, 24)).astype(np.float32)
    ref = torch.nn.Conv2d(24, 40, kernel, padding=kernel // 2)
    with torch.no_grad():
        want = nhwc(ref(nchw(x)))
    params = {"kernel": ref.weight.detach().numpy().transpose(2, 3, 1, 0), "bias": ref.bias.detach().numpy()}
    got = Conv(40, kernel, lowering=LoweringPlan(default=lowering)).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("kernel", [3, 5])
def test_conv_lowerings_agree(kernel):
    """Every lowering gives XLA's convolution to 1e-5, on a non-square image wider than the kernel."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(2, 5, 9, 16)).astype(np.float32))
    fan_in = kernel * kernel * 16  # unit-scale outputs, so 1e-5 is a few fp32 ulps, not a loose bound
    kernel_ = jnp.asarray((rng.normal(size=(kernel, kernel, 16, 12)) / np.sqrt(fan_in)).astype(np.float32))
    want = np.asarray(CONV["xla"](x, kernel_))
    names = applicable(ConvShape(2, 5, 9, 16, 12, kernel, "float32"))
    assert ("winograd" in names) == (kernel == 3)
    for name in names:
        np.testing.assert_allclose(np.asarray(CONV[name](x, kernel_)), want, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 5), (8, 7)])
def test_winograd_is_exact_arithmetic_and_as_accurate_as_a_direct_conv(size):
    """F(2x2, 3x3) is the same sum in exact arithmetic (float64: 1e-13) on odd, even and 1-pixel
    images; in float32 its error against a float64 reference is within 2x a direct conv's."""
    rng = np.random.default_rng(sum(size))
    x = rng.normal(size=(2, *size, 24))
    kernel = rng.normal(size=(3, 3, 24, 8)) / np.sqrt(9 * 24)
    with jax.enable_x64(True):
        want = np.asarray(CONV["xla"](jnp.asarray(x), jnp.asarray(kernel)))
        np.testing.assert_allclose(np.asarray(CONV["winograd"](jnp.asarray(x), jnp.asarray(kernel))), want,
                                   atol=1e-13, rtol=0)
    x32, k32 = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
    direct = np.abs(np.asarray(CONV["xla"](x32, k32), np.float64) - want).max()
    winograd = np.abs(np.asarray(CONV["winograd"](x32, k32), np.float64) - want).max()
    assert winograd <= 2 * direct + 1e-7, (winograd, direct)
    with pytest.raises(ValueError, match="3x3"):
        CONV["winograd"](x32, jnp.ones((5, 5, 24, 8)))


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (4, 6)])
def test_upsampled_conv_is_the_conv_of_the_upsampled_image(size):
    """conv3x3(upsample2x(x)) computed at the low resolution, with each lowering of its 2x2 phase
    kernel: float64 to 1e-13, float32 to 1e-5 at unit scale (its summed kernel taps round once more)."""
    rng = np.random.default_rng(sum(size))
    x = rng.normal(size=(2, *size, 16))
    kernel = rng.normal(size=(3, 3, 16, 12)) / np.sqrt(9 * 16)
    names = [name for name in candidates(ConvShape(2, *size, 16, 12, 3, "float32", upsample=True))
             if name.startswith("subpixel+")]
    assert names == ["subpixel+xla", "subpixel+im2col", "subpixel+im2row"]
    with jax.enable_x64(True):
        want = np.asarray(CONV["xla"](upsample_nearest(jnp.asarray(x)), jnp.asarray(kernel)))
        for name in LOWERINGS[:3]:
            got = upsampled_conv(jnp.asarray(x), jnp.asarray(kernel), CONV[name])
            np.testing.assert_allclose(np.asarray(got), want, atol=1e-13, rtol=0, err_msg=name)
    for name in LOWERINGS[:3]:
        got = upsampled_conv(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), CONV[name])
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("lowering", ["xla", "winograd", "subpixel+xla", "subpixel+im2col"])
def test_upsampling_resnet_block_matches_diffusers(lowering):
    """The decoder's up-resnet (diffusers ResnetBlock2D(up=True)) with its conv1 computed each way a
    plan entry can name (conv2 is not named: XLA's convolution); the kernel prepared ahead is the one read."""
    from diffusers.models.resnet import ResnetBlock2D

    from cmjax.weights.mapping import torch_to_flax

    torch.manual_seed(0)
    ref = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16, groups=8, eps=1e-5, up=True,
                        time_embedding_norm="scale_shift").eval()
    x = np.random.default_rng(2).normal(size=(2, 3, 5, 32)).astype(np.float32)
    temb = np.random.default_rng(3).normal(size=(2, 16)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(ref(nchw(x), torch.from_numpy(temb)))
    conv1 = ConvShape(2, 3, 5, 32, 32, 3, "float32", upsample=True)
    block = ResnetBlock(32, num_groups=8, resample="up", lowering=LoweringPlan({conv1.key(): lowering}))
    shapes = jax.eval_shape(block.init, jax.random.key(0), jnp.asarray(x), jnp.asarray(temb))["params"]
    params = torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, shapes)

    assert conv_shapes(block.apply, {"params": params}, x, temb) == (conv1, ConvShape(2, 6, 10, 32, 32, 3, "float32"))
    hlo = jax.jit(block.apply).lower({"params": params}, jnp.asarray(x), jnp.asarray(temb)).as_text()
    assert hlo.count("convolution(") == 1 + lowering.endswith("xla")  # conv2, and conv1 if it is XLA's
    got = block.apply({"params": params}, jnp.asarray(x), jnp.asarray(temb))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)

    # The kernel prepared ahead (once per decode) is the one conv1 reads: with it, the raw kernel is unused.
    def apply(p):
        return block.apply({"params": p}, jnp.asarray(x), jnp.asarray(temb))
    prepared = jax.jit(lambda p: with_prepared_kernels(p, apply))(params)
    form = candidates(conv1)[lowering].form
    assert form == {"xla": "", "winograd": "winograd"}.get(lowering, "subpixel")
    assert set(prepared["conv1"]) == {"kernel", "bias"} | ({f"kernel:{form}"} if form else set())
    assert set(prepared["conv2"]) == {"kernel", "bias"}  # XLA's conv prepares nothing
    if form:
        prepared["conv1"]["kernel"] = jnp.full_like(params["conv1"]["kernel"], jnp.nan)
        np.testing.assert_allclose(np.asarray(jax.jit(apply)(prepared)), want, atol=1e-5, rtol=0)


def test_plan_picks_lowering_in_hlo():
    """The plan reaches the traced program: XLA's convolution op only where the plan says "xla", by
    its default or by the entry for this conv's shape; an entry for another shape changes nothing."""
    x = jnp.ones((1, 4, 6, 8))
    params = Conv(8).init(jax.random.key(0), x)
    key = ConvShape(1, 4, 6, 8, 8, 3, "float32").key()
    for name in LOWERINGS:
        for plan in (LoweringPlan(default=name), LoweringPlan({key: name}), LoweringPlan({key: name, "other": "xla"})):
            hlo = jax.jit(Conv(8, lowering=plan).apply).lower(params, x).as_text()
            assert ("convolution" in hlo) == (name == "xla"), (name, plan)
    other = LoweringPlan({ConvShape(1, 4, 6, 8, 16, 3, "float32").key(): "im2col"})
    assert "convolution" in jax.jit(Conv(8, lowering=other).apply).lower(params, x).as_text()
    assert "convolution" in jax.jit(Conv(8).apply).lower(params, x).as_text()  # the default: XLA


def test_plan_is_a_static_printable_value():
    """Hashable and equal by content (a jit static argument: same plan, same compiled program),
    printed one conv a line, checked on construction; names that cannot run a shape fall back."""
    shape = ConvShape(2, 4, 6, 64, 32, 3, "float32")
    up = dataclasses.replace(shape, upsample=True)
    plan = LoweringPlan({up.key(): "subpixel+im2row", shape.key(): "winograd"})
    assert plan == LoweringPlan(((shape.key(), "winograd"), (up.key(), "subpixel+im2row")))
    assert hash(plan) == hash(LoweringPlan(dict(plan.choices))) and plan != XLA and plan.prepares
    assert str(plan).splitlines() == ["conv lowering plan: xla unless named (2 named)",
                                      f"  {shape.key():40s} winograd", f"  {up.key():40s} subpixel+im2row"]
    assert (plan.name(shape), plan.name(up)) == ("winograd", "subpixel+im2row")
    assert plan.name(dataclasses.replace(shape, height=8)) == "xla"  # not named: the default
    assert not XLA.prepares and not LoweringPlan(default="im2col").prepares
    forced = LoweringPlan(default="winograd")
    assert forced.name(shape) == "winograd"
    assert forced.name(dataclasses.replace(shape, dtype="bfloat16")) == "xla"  # Winograd: 3x3 float32 only
    assert forced.name(dataclasses.replace(shape, kernel=5)) == "xla"
    assert LoweringPlan(default="im2col").name(up) == "im2col"  # a default runs on the upsampled input
    assert LoweringPlan({shape.key(): "subpixel+xla"}).name(shape) == "xla"  # no subpixel for a plain conv
    with pytest.raises(ValueError, match="'fastest'"):
        LoweringPlan({shape.key(): "fastest"})
    with pytest.raises(ValueError, match="default"):
        LoweringPlan(default="subpixel+xla")


def test_models_do_no_file_io_timing_or_environment():
    """models/ is Flax modules and math: no module of it imports what reads files, the environment
    or the clock (the lowering's measurement and cache are in cmjax.tuning), nor opens a file."""
    banned = {"os", "time", "json", "tempfile", "pathlib", "platform", "io", "shutil", "cmjax.cache", "cmjax.tuning"}
    for path in Path(cmjax.models.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & banned, (path.name, imported & banned)
        calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert "open" not in calls, path.name


def test_group_norm_matches_torch():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 5, 7, 32)) * 3 + 10).astype(np.float32)  # large mean: two-pass variance
    ref = torch.nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
        want = nhwc(ref(nchw(x)))
    params = {"scale": ref.weight.detach().numpy(), "bias": ref.bias.detach().numpy()}
    got = GroupNorm(8, 1e-6).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_resampling_matches_torch():
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(avg_pool_2x2(jnp.asarray(x))),
                               nhwc(torch.nn.functional.avg_pool2d(nchw(x), 2, 2)), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(upsample_nearest(jnp.asarray(x), 2)),
                                  nhwc(torch.nn.functional.interpolate(nchw(x), scale_factor=2, mode="nearest")))
