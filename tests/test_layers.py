"""Shared layers against their torch counterparts; the convolution lowerings and how one is chosen."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cmjax.models.conv_lowering import (CACHE_VERSION, CONV, EVALS_PER_PREPARE, LOWERINGS, OVERRIDE_ENV, ConvShape,
                                        applicable, candidates, choose_lowering, cpu_model, machine_key, measure,
                                        pick, time_calls, upsampled_conv)
from cmjax.models.layers import (Conv, GroupNorm, ResnetBlock, avg_pool_2x2, upsample_nearest,
                                 with_prepared_kernels)
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
    got = Conv(40, kernel, lowering=lowering).apply({"params": params}, jnp.asarray(x))
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
def test_upsampling_resnet_block_matches_diffusers(lowering, tmp_path, monkeypatch):
    """The decoder's up-resnet (diffusers ResnetBlock2D(up=True)) with its conv1 computed each way,
    the way chosen as a measured choice is: read from the lowering cache at trace time."""
    from diffusers.models.resnet import ResnetBlock2D

    from cmjax.weights.mapping import torch_to_flax

    torch.manual_seed(0)
    ref = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16, groups=8, eps=1e-5, up=True,
                        time_embedding_norm="scale_shift").eval()
    x = np.random.default_rng(2).normal(size=(2, 3, 5, 32)).astype(np.float32)
    temb = np.random.default_rng(3).normal(size=(2, 16)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(ref(nchw(x), torch.from_numpy(temb)))
    block = ResnetBlock(32, num_groups=8, resample="up")
    shapes = jax.eval_shape(block.init, jax.random.key(0), jnp.asarray(x), jnp.asarray(temb))["params"]
    params = torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, shapes)

    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    monkeypatch.setenv("CMJAX_CACHE", str(tmp_path))
    conv1 = ConvShape(2, 3, 5, 32, 32, 3, "float32", upsample=True)
    conv2 = ConvShape(2, 6, 10, 32, 32, 3, "float32")
    cache = {shape.key(): {"choice": choice, "seconds": {name: 1.0 for name in candidates(shape)},
                           "version": CACHE_VERSION}
             for shape, choice in ((conv1, lowering), (conv2, "xla"))}
    (tmp_path / "conv_lowering.json").write_text(json.dumps({machine_key(): cache}))
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
    assert json.loads((tmp_path / "conv_lowering.json").read_text()) == {machine_key(): cache}  # nothing measured


def test_conv_override_picks_lowering_in_hlo(monkeypatch, tmp_path):
    """The env override reaches the traced program: XLA's convolution op only under "xla"."""
    monkeypatch.setenv("CMJAX_CACHE", str(tmp_path))
    x = jnp.ones((1, 4, 6, 8))
    params = Conv(8, lowering="xla").init(jax.random.key(0), x)
    for name in LOWERINGS:
        monkeypatch.setenv(OVERRIDE_ENV, name)
        hlo = jax.jit(Conv(8).apply).lower(params, x).as_text()
        assert ("convolution" in hlo) == (name == "xla"), name
    monkeypatch.delenv(OVERRIDE_ENV)
    Conv(8).init(jax.random.key(0), x)  # init needs shapes only: it must not measure
    assert not (tmp_path / "conv_lowering.json").exists()  # forced or init: nothing measured, nothing cached
    monkeypatch.setenv(OVERRIDE_ENV, "fastest")
    with pytest.raises(ValueError, match="CMJAX_CONV_LOWERING='fastest'"):
        Conv(8).apply(params, x)


SHAPE = ConvShape(2, 4, 6, 64, 32, 3, "float32")


def fake_measure(seconds):
    calls = []

    def measure_fn(shape):
        calls.append(shape)
        return dict(seconds)
    return measure_fn, calls


def test_choice_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    path = tmp_path / "sub" / "conv_lowering.json"
    measure_fn, calls = fake_measure({"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 9.0})
    assert choose_lowering(SHAPE, path=path, measure_fn=measure_fn) == "im2col"
    assert choose_lowering(SHAPE, path=path, measure_fn=measure_fn) == "im2col"
    assert calls == [SHAPE]
    stored = json.loads(path.read_text())[machine_key()][SHAPE.key()]
    assert stored == {"choice": "im2col", "seconds": {"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 9.0},
                      "version": CACHE_VERSION}
    # another shape is measured separately and merged into the same file
    other = dataclasses.replace(SHAPE, height=64, width=64)
    slow_im2col, calls2 = fake_measure({"xla": 1.0, "im2col": 2.0, "im2row": 3.0, "winograd": 9.0})
    assert choose_lowering(other, path=path, measure_fn=slow_im2col) == "xla"
    assert set(json.loads(path.read_text())[machine_key()]) == {SHAPE.key(), other.key()}
    # an explicit argument wins over the cache and does not measure
    assert choose_lowering(SHAPE, "im2row", path=path, measure_fn=slow_im2col) == "im2row"
    assert calls2 == [other]
    assert [p.name for p in path.parent.iterdir()] == ["conv_lowering.json"]  # no temp files left


@pytest.mark.parametrize("old", [
    {"choice": "im2col", "seconds": {"xla": 3.0, "im2col": 1.0, "im2row": 2.0}, "version": CACHE_VERSION},
    {"choice": "im2col", "seconds": {"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 4.0}}])
def test_old_entries_are_measured_again(tmp_path, monkeypatch, old):
    """An entry written before Winograd existed, or by an older version (Winograd then transformed
    its kernel in every call), is measured once more, with every candidate."""
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    path = tmp_path / "conv_lowering.json"
    path.write_text(json.dumps({machine_key(): {SHAPE.key(): old}}))
    measure_fn, calls = fake_measure({"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 0.5})
    assert choose_lowering(SHAPE, path=path, measure_fn=measure_fn) == "winograd"
    assert choose_lowering(SHAPE, path=path, measure_fn=measure_fn) == "winograd"
    assert calls == [SHAPE]


def test_upsampling_convs_are_measured_with_their_subpixel_variants(tmp_path, monkeypatch):
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    path = tmp_path / "conv_lowering.json"
    up = dataclasses.replace(SHAPE, upsample=True)
    assert up.key() == SHAPE.key() + " up2"  # plain and upsampling convs of one input never share an entry
    ticks = iter(range(1000))
    seconds = measure(dataclasses.replace(up, in_channels=4, out_channels=4), timer=lambda: float(next(ticks)),
                      repeats=1)
    assert set(seconds) == set(LOWERINGS) | {"subpixel+xla", "subpixel+im2col", "subpixel+im2row"}
    measure_fn, calls = fake_measure({**{name: 2.0 for name in candidates(up)}, "subpixel+im2row": 1.0})
    assert choose_lowering(up, path=path, measure_fn=measure_fn) == "subpixel+im2row"
    assert json.loads(path.read_text())[machine_key()][up.key()]["choice"] == "subpixel+im2row"
    # a forced lowering means that lowering on the upsampled image; only an explicit argument picks a variant
    monkeypatch.setenv(OVERRIDE_ENV, "im2col")
    assert choose_lowering(up, path=path) == "im2col"
    assert choose_lowering(up, "subpixel+xla", path=path) == "subpixel+xla"
    with pytest.raises(ValueError, match="subpixel"):
        choose_lowering(SHAPE, "subpixel+xla", path=path)  # not a way to compute a plain conv


def test_forced_winograd_falls_back_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv(OVERRIDE_ENV, "winograd")
    assert choose_lowering(SHAPE) == "winograd"
    assert choose_lowering(dataclasses.replace(SHAPE, dtype="bfloat16")) == "xla"
    assert choose_lowering(dataclasses.replace(SHAPE, kernel=5)) == "xla"


def test_multi_host_runs_never_measure(tmp_path, monkeypatch):
    """Two hosts must trace one program: no per-host measurement or cache, XLA's conv unless overridden."""
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    path = tmp_path / "conv_lowering.json"
    measure_fn, calls = fake_measure({"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 9.0})
    assert choose_lowering(SHAPE, path=path, measure_fn=measure_fn) == "xla"
    assert calls == [] and not path.exists()
    monkeypatch.setenv(OVERRIDE_ENV, "im2col")
    assert choose_lowering(SHAPE, path=path, measure_fn=measure_fn) == "im2col"


def test_xla_kept_unless_clearly_beaten():
    assert pick({"xla": 1.0, "im2col": 0.97, "im2row": 0.99}) == "xla"  # within the margin
    assert pick({"xla": 1.0, "im2col": 0.90, "im2row": 0.99}) == "im2col"
    assert pick({"xla": 1.0, "im2col": 0.90, "im2row": 0.50}) == "im2row"
    assert pick({"xla": 0.5, "im2col": 0.90, "im2row": 0.70}) == "xla"


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"m": 3}', b""])
def test_corrupt_cache_is_remeasured_and_rewritten(tmp_path, monkeypatch, content):
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    path = tmp_path / "conv_lowering.json"
    path.write_bytes(content)
    measure_fn, calls = fake_measure({"xla": 1.0, "im2col": 0.5, "im2row": 2.0, "winograd": 9.0})
    assert choose_lowering(SHAPE, path=path, measure_fn=measure_fn) == "im2col"
    assert calls == [SHAPE]
    assert json.loads(path.read_text())[machine_key()][SHAPE.key()]["choice"] == "im2col"


def test_unwritable_cache_still_chooses(tmp_path, monkeypatch):
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    measure_fn, calls = fake_measure({"xla": 1.0, "im2col": 0.5, "im2row": 2.0, "winograd": 9.0})
    assert choose_lowering(SHAPE, path=blocker / "conv_lowering.json", measure_fn=measure_fn) == "im2col"


def test_measure_times_every_lowering_with_the_given_timer():
    """Each timed call spans one tick: a lowering costs its conv plus its kernel preparation shared
    by EVALS_PER_PREPARE network evaluations (Winograd prepares; XLA's conv, im2col, im2row do not)."""
    ticks = iter(range(1000))
    seconds = measure(ConvShape(1, 3, 4, 4, 4, 3, "float32"), timer=lambda: float(next(ticks)), repeats=2)
    assert seconds == {"xla": 1.0, "im2col": 1.0, "im2row": 1.0, "winograd": 1.0 + 1.0 / EVALS_PER_PREPARE}


def test_timing_drops_a_call_that_cannot_win():
    spans = {"xla": 5.0, "im2col": 1.0, "im2row": 1.5}
    clock, counts = [0.0], {name: 0 for name in spans}

    def call(name):
        counts[name] += 1
        clock[0] += spans[name]

    calls = {name: lambda name=name: call(name) for name in spans}
    assert time_calls(calls, timer=lambda: clock[0], repeats=3) == spans
    assert counts == {"xla": 1, "im2col": 3, "im2row": 3}  # xla > PRUNE x the best after round one


def test_cpu_model_tells_generations_apart(tmp_path):
    """A VM's bare "AMD EPYC" gets family/model/stepping, so two generations never share a cached choice."""
    info = "processor\t: {}\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu {}\n\n"
    zen5, zen2 = tmp_path / "zen5", tmp_path / "zen2"
    zen5.write_text(info.format(0, 26, 2, "avx2 avx512f") + info.format(1, 26, 2, "avx2 avx512f"))
    zen2.write_text(info.format(0, 23, 49, "avx2"))
    assert cpu_model(str(zen5)) == "AMD EPYC (family 26, model 2, stepping 1) +avx512"
    assert cpu_model(str(zen2)) == "AMD EPYC (family 23, model 49, stepping 1)"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n\n")
    assert cpu_model(str(arm)).endswith("(CPU implementer 0x41, CPU part 0xd0c)")
    odd = tmp_path / "odd"
    odd.write_bytes(b"model name\t: Odd \xff CPU\n\n")
    assert cpu_model(str(odd)).startswith("Odd \ufffd CPU")
    assert cpu_model(str(tmp_path / "missing"))  # no /proc: platform's name, never an error


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
