"""Shared layers against their torch counterparts; the convolution lowerings and how one is chosen."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cmjax.models.conv_lowering import (CONV, LOWERINGS, OVERRIDE_ENV, ConvShape, choose_lowering, cpu_model,
                                        machine_key, measure, pick, time_calls)
from cmjax.models.layers import Conv, GroupNorm, avg_pool_2x2, upsample_nearest
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
    for name in LOWERINGS:
        np.testing.assert_allclose(np.asarray(CONV[name](x, kernel_)), want, atol=1e-5, rtol=0, err_msg=name)


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
    measure_fn, calls = fake_measure({"xla": 3.0, "im2col": 1.0, "im2row": 2.0})
    assert choose_lowering(SHAPE, path=path, measure_fn=measure_fn) == "im2col"
    assert choose_lowering(SHAPE, path=path, measure_fn=measure_fn) == "im2col"
    assert calls == [SHAPE]
    stored = json.loads(path.read_text())[machine_key()][SHAPE.key()]
    assert stored == {"choice": "im2col", "seconds": {"xla": 3.0, "im2col": 1.0, "im2row": 2.0}}
    # another shape is measured separately and merged into the same file
    other = dataclasses.replace(SHAPE, height=64, width=64)
    slow_im2col, calls2 = fake_measure({"xla": 1.0, "im2col": 2.0, "im2row": 3.0})
    assert choose_lowering(other, path=path, measure_fn=slow_im2col) == "xla"
    assert set(json.loads(path.read_text())[machine_key()]) == {SHAPE.key(), other.key()}
    # an explicit argument wins over the cache and does not measure
    assert choose_lowering(SHAPE, "im2row", path=path, measure_fn=slow_im2col) == "im2row"
    assert calls2 == [other]
    assert [p.name for p in path.parent.iterdir()] == ["conv_lowering.json"]  # no temp files left


def test_multi_host_runs_never_measure(tmp_path, monkeypatch):
    """Two hosts must trace one program: no per-host measurement or cache, XLA's conv unless overridden."""
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    path = tmp_path / "conv_lowering.json"
    measure_fn, calls = fake_measure({"xla": 3.0, "im2col": 1.0, "im2row": 2.0})
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
    measure_fn, calls = fake_measure({"xla": 1.0, "im2col": 0.5, "im2row": 2.0})
    assert choose_lowering(SHAPE, path=path, measure_fn=measure_fn) == "im2col"
    assert calls == [SHAPE]
    assert json.loads(path.read_text())[machine_key()][SHAPE.key()]["choice"] == "im2col"


def test_unwritable_cache_still_chooses(tmp_path, monkeypatch):
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    measure_fn, calls = fake_measure({"xla": 1.0, "im2col": 0.5, "im2row": 2.0})
    assert choose_lowering(SHAPE, path=blocker / "conv_lowering.json", measure_fn=measure_fn) == "im2col"


def test_measure_times_every_lowering_with_the_given_timer():
    ticks = iter(range(1000))
    seconds = measure(ConvShape(1, 3, 4, 4, 4, 3, "float32"), timer=lambda: float(next(ticks)), repeats=2)
    assert seconds == {name: 1.0 for name in LOWERINGS}  # each timed call spans one tick


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
