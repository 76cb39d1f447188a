"""The Flax consistency decoder against diffusers: UNet, full decodes, conversion, bad input."""
from __future__ import annotations

import copy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cmjax
from cmjax import tuning
from cmjax.decoding import decoder as decoder_lib
from cmjax.decoding import schedule
from cmjax.models import decoder_config
from cmjax.models.conv_lowering import CONV, XLA, Lowering, LoweringPlan, winograd_kernel, winograd_run
from cmjax.weights.from_pytorch import ConversionError, convert
from tests.torch_peers import nchw, nhwc, reference_decode, save_vae, tiny_consistency_vae

ATOL = 1e-5  # fp32 on CPU: cmjax and PyTorch agree to float32 rounding


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """A tiny perturbed diffusers ConsistencyDecoderVAE, saved and converted with cmjax.convert."""
    vae = tiny_consistency_vae(seed=0)
    folder = save_vae(vae, tmp_path_factory.mktemp("vae") / "tiny")
    ckpt = tmp_path_factory.mktemp("ckpt") / "decoder"
    convert(folder, ckpt)
    return vae, folder, cmjax.load_decoder(ckpt)


def test_schedule_constants_match_reference():
    s = schedule.decoder_schedule()
    expected = {  # OpenAI's tables (decoder.pt's constants): t -> (c_in, c_skip, c_out, sqrt(1 - abar))
        1008: (1.000196, 0.005709, 0.499967, 0.999739),
        512: (1.259124, 0.278100, 0.448572, 0.712515),
        16: (1.996070, 0.995419, 0.036178, 0.036248),
    }
    for t, values in expected.items():
        got = (s.c_in[t], s.c_skip[t], s.c_out[t], s.sqrt_one_minus_alphas_cumprod[t])
        # These t=16 values come from a float32 running product; torch (which we match bit
        # for bit, see the next test) accumulates cumprod in float64. Near t=0 sigma^2 = 1/abar - 1
        # cancels, so the two differ there by 4e-6 (the float64 truth, 0.0361755, lies between).
        np.testing.assert_allclose(got, values, atol=1.5e-6 if t > 16 else 5e-6, err_msg=f"t={t}")


def test_schedule_tables_match_diffusers():
    from diffusers.schedulers.scheduling_consistency_decoder import ConsistencyDecoderScheduler

    ref, s = ConsistencyDecoderScheduler(), schedule.decoder_schedule()
    for name in ("c_in", "c_skip", "c_out", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        np.testing.assert_allclose(getattr(s, name), getattr(ref, name).numpy(), rtol=1e-6, atol=0, err_msg=name)


def test_timestep_grid():
    assert schedule.timesteps_from_fractions([1.0, 0.5]) == (1008, 512)
    assert schedule.timesteps_for_steps(1) == (1008,)
    assert schedule.timesteps_for_steps(2) == (1008, 512)
    assert schedule.timesteps_for_steps(4) == (1008, 768, 512, 256)
    assert schedule.round_to_grid(0) == 16 and schedule.round_to_grid(1023) == 1008
    assert schedule.round_to_grid(511) == 512 and schedule.round_to_grid(512) == 528
    assert schedule.grid_timesteps()[:2] == (16, 32) and len(schedule.grid_timesteps()) == 63
    with pytest.raises(ValueError, match="not on the distilled grid"):
        schedule.check_timesteps([1008, 500])


def test_full_size_param_count():
    params = decoder_config.abstract_params(cmjax.DecoderConfig())
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 621_277_702


def test_converted_config(peer):
    vae, _, dec = peer
    cfg = dec.config
    assert cfg.unet.block_out_channels == tuple(vae.config.decoder_block_out_channels)
    assert cfg.unet.layers_per_block == vae.config.decoder_layers_per_block
    assert cfg.unet.norm_num_groups == vae.config.decoder_norm_num_groups
    assert cfg.upsample_factor == 8


@pytest.mark.parametrize("t", [1008, 16, pytest.param(512, marks=pytest.mark.slow), pytest.param(333, marks=pytest.mark.slow)])
def test_unet_parity(peer, t):
    """Raw UNet outputs (all 6 channels, up to ~5 in size here) against diffusers in fp32 and fp64.

    At |y| ~ 5, fp32 rounding through the network is ~1e-5 for torch too, so the bound scales with
    the output size, and cmjax must be as close to a float64 evaluation as torch's fp32 is.
    """
    vae, _, dec = peer
    x = np.random.default_rng(t).normal(size=(2, 16, 24, 7)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(vae.decoder_unet(nchw(x), torch.tensor(t)).sample)
        truth = nhwc(copy.deepcopy(vae.decoder_unet).double()(nchw(x).double(), torch.tensor(t)).sample)
    got = np.asarray(jax.jit(dec.network().apply)({"params": dec.params}, jnp.asarray(x), jnp.full((2,), t)))
    assert got.shape == ref.shape == (2, 16, 24, 6)
    np.testing.assert_allclose(got, ref, atol=ATOL * max(1.0, np.abs(ref).max()), rtol=0)
    assert np.abs(got - truth).max() <= 2 * np.abs(ref - truth).max() + 1e-6


# OpenAI's default (2 steps, clipped) runs by default (diffusers' unclipped sampling: test_matches_diffusers_
# decode_with_its_own_noise); the rest are slow.
@pytest.mark.parametrize("timesteps, clip", [
    ((1008, 512), True),
    *(pytest.param(t, c, marks=pytest.mark.slow) for t, c in [((1008, 688, 352), False), ((1008,), True), ((1008,), False),
                                                             ((1008, 512), False), ((1008, 688, 352), True)])])
def test_decode_parity(peer, timesteps, clip):
    vae, _, dec = peer
    rng = np.random.default_rng(len(timesteps))
    latents = (rng.normal(size=(3, 2, 3, 4)) * 5).astype(np.float32)  # non-square, batch 3
    noise = [rng.normal(size=(3, 16, 24, 3)).astype(np.float32) for _ in timesteps]
    ref = reference_decode(vae, latents, noise, timesteps, clip_denoised=clip)
    got = np.asarray(cmjax.decode(dec, latents, noise=noise, timesteps=timesteps, clip_denoised=clip))
    assert got.shape == (3, 16, 24, 3)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    if clip:
        assert got.min() >= -1 and got.max() <= 1
    else:
        assert np.abs(got).max() > 1  # perturbed random weights overshoot: the clamp is really off


@pytest.mark.slow  # Winograd forced: a long compile
def test_decode_prepares_kernels_once_outside_the_step_loop(peer, monkeypatch):
    """Winograd's transformed kernels are made before the loop over steps (``with_prepared_kernels``)
    and every step reads them: no kernel is prepared while the loop body is traced. The decode
    still equals diffusers'."""
    vae, _, dec = peer
    prepared, calls = [], []
    real = decoder_lib.with_prepared_kernels

    def with_prepared_kernels(params, apply_fn):
        params = real(params, apply_fn)
        prepared.append(True)
        return params

    def counting_prepare(kernel):
        calls.append(bool(prepared))  # True: a kernel prepared after with_prepared_kernels returned
        return winograd_kernel(kernel)

    monkeypatch.setattr(decoder_lib, "with_prepared_kernels", with_prepared_kernels)
    monkeypatch.setitem(CONV, "winograd", Lowering(winograd_run, counting_prepare, "winograd"))
    rng = np.random.default_rng(5)
    latents = (rng.normal(size=(2, 3, 2, 4)) * 5).astype(np.float32)
    noise = [rng.normal(size=(2, 24, 16, 3)).astype(np.float32) for _ in range(2)]
    ref = reference_decode(vae, latents, noise, (1008, 512), clip_denoised=True)
    decode = jax.jit(lambda p, z, n: decoder_lib.decode_latents(p, z, n, config=dec.config,
                                                                lowering=LoweringPlan(default="winograd")))
    got = np.asarray(decode(dec.params, jnp.asarray(latents), jnp.stack(noise)))
    assert prepared == [True] and calls and not any(calls)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


@pytest.mark.slow  # Winograd forced: a long compile
def test_decoder_keeps_the_prepared_kernels_of_its_last_shape(peer, monkeypatch):
    """``decode`` prepares a shape's kernels once per Decoder (sharing the raw arrays), keeps one
    shape at a time, and decodes with them to diffusers' image; a plan that prepares nothing adds nothing."""
    vae, _, peer_decoder = peer
    plan = LoweringPlan(default="winograd")
    dec = cmjax.Decoder(peer_decoder.config, peer_decoder.params)
    assert decoder_lib.prepared_params(dec, (2, 3, 2, 4)) is dec.params and not dec.prepared  # XLA: nothing to prepare
    prepared = decoder_lib.prepared_params(dec, (2, 3, 2, 4), lowering=plan)
    assert decoder_lib.prepared_params(dec, (2, 3, 2, 4), lowering=plan) is prepared
    convs = list(_convs(dec.params, prepared))
    assert len(convs) > 10
    for raw, ready in convs:  # every 3x3 conv: its 16 Winograd matrices, next to the same raw kernel
        c, o = raw["kernel"].shape[2:]
        assert ready["kernel"] is raw["kernel"] and "kernel:winograd" not in raw
        assert [u.shape for u in ready["kernel:winograd"]] == [(c, o)] * 16
    rng = np.random.default_rng(6)
    latents = (rng.normal(size=(2, 3, 2, 4)) * 5).astype(np.float32)
    noise = [rng.normal(size=(2, 24, 16, 3)).astype(np.float32) for _ in range(2)]
    ref = reference_decode(vae, latents, noise, (1008, 512), clip_denoised=True)
    np.testing.assert_allclose(np.asarray(cmjax.decode(dec, latents, noise=noise, lowering=plan)), ref,
                               atol=ATOL, rtol=0)
    assert list(dec.prepared) == [((2, 3, 2, 4), "float32", plan)]
    decoder_lib.prepared_params(dec, (1, 2, 2, 4), lowering=plan)
    assert list(dec.prepared) == [((1, 2, 2, 4), "float32", plan)]  # one shape at a time
    dec.release_prepared()
    assert not dec.prepared


def test_default_decode_reads_no_plan_it_was_not_given_and_measures_nothing(peer, tmp_path, monkeypatch):
    """In the default settings (no override, an empty cache) a decode uses XLA's convolution, times
    nothing and writes nothing to $CMJAX_CACHE, and equals diffusers'."""
    vae, _, dec = peer
    monkeypatch.delenv(tuning.OVERRIDE_ENV, raising=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("CMJAX_CACHE", str(cache))
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: pytest.fail("measured on the decode path"))
    monkeypatch.setattr(tuning, "time_calls", lambda *a, **k: pytest.fail("timed on the decode path"))
    rng = np.random.default_rng(8)
    latents = (rng.normal(size=(1, 2, 3, 4)) * 5).astype(np.float32)
    noise = [rng.normal(size=(1, 16, 24, 3)).astype(np.float32) for _ in range(2)]
    assert tuning.default_plan()[0] == XLA
    hlo = decoder_lib._decode_jit.lower(dec.params, jnp.asarray(latents), jnp.stack(noise), config=dec.config,
                                        timesteps=(1008, 512), clip_denoised=True, dtype=jnp.float32,
                                        lowering=tuning.default_plan()[0]).as_text()
    assert hlo.count("convolution(") >= len(decoder_lib.decode_conv_shapes(dec.config, latents.shape)) > 0
    got = np.asarray(cmjax.decode(dec, latents, noise=noise))
    np.testing.assert_allclose(got, reference_decode(vae, latents, noise, (1008, 512)), atol=ATOL, rtol=0)
    assert list(cache.iterdir()) == []


@pytest.mark.slow  # every lowering in one decode; each is checked against torch in test_layers.py
def test_decode_with_a_tuned_plan_matches_diffusers(peer, tmp_path, monkeypatch):
    """A plan made by ``tuning.tune`` (here from timings that make every conv pick another lowering:
    Winograd, im2col, im2row, subpixel) is what a later default decode reads, and decodes to diffusers' image."""
    vae, _, dec = peer
    monkeypatch.delenv(tuning.OVERRIDE_ENV, raising=False)
    monkeypatch.setenv("CMJAX_CACHE", str(tmp_path))
    rng = np.random.default_rng(9)
    latents = (rng.normal(size=(2, 3, 2, 4)) * 5).astype(np.float32)
    noise = [rng.normal(size=(2, 24, 16, 3)).astype(np.float32) for _ in range(2)]
    shapes = decoder_lib.decode_conv_shapes(dec.config, latents.shape)
    wins = ["winograd", "im2col", "im2row"]

    def fake_measure(shape, names):  # the i-th shape's winner: cycling through the lowerings
        best = (f"subpixel+{wins[shapes.index(shape) % 3 - 1]}" if shape.upsample
                else wins[shapes.index(shape) % 3])
        return {name: 0.5 if name == best else 1.0 for name in names}

    plan = tuning.tune(shapes, measure_fn=fake_measure)
    assert {plan.name(s) for s in shapes} >= {"winograd", "im2col", "im2row", "subpixel+im2row"}
    assert all(plan.name(s) != "xla" for s in shapes) and tuning.default_plan()[0] == plan
    print(plan)
    hlo = decoder_lib._decode_jit.lower(dec.params, jnp.asarray(latents), jnp.stack(noise), config=dec.config,
                                        timesteps=(1008, 512), clip_denoised=True, dtype=jnp.float32,
                                        lowering=plan).as_text()
    assert "convolution(" not in hlo  # every conv is the tuned lowering
    ref = reference_decode(vae, latents, noise, (1008, 512), clip_denoised=True)
    np.testing.assert_allclose(np.asarray(cmjax.decode(dec, latents, noise=noise)), ref, atol=ATOL, rtol=0)


def _convs(raw, ready):
    """(raw module dict, prepared module dict) for every module with a 3x3 kernel."""
    if "kernel" in raw and raw["kernel"].ndim == 4 and raw["kernel"].shape[:2] == (3, 3):
        yield raw, ready
    for name, child in raw.items():
        if isinstance(child, dict):
            yield from _convs(child, ready[name])


def test_matches_diffusers_decode_with_its_own_noise(peer):
    """ConsistencyDecoderVAE.decode itself (diffusers semantics): same generator draws, same image."""
    vae, _, dec = peer
    latents = np.random.default_rng(7).normal(size=(2, 3, 2, 4)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(vae.decode(nchw(latents), generator=torch.Generator().manual_seed(3)).sample)
    g = torch.Generator().manual_seed(3)
    noise = [nhwc(torch.randn((2, 3, 24, 16), generator=g)) for _ in range(2)]
    got = cmjax.decode(dec, latents, noise=noise, clip_denoised=False)
    np.testing.assert_allclose(np.asarray(got), ref, atol=ATOL, rtol=0)


def test_key_noise_is_deterministic_and_one_program(peer):
    _, _, dec = peer
    latents = np.random.default_rng(0).normal(size=(2, 2, 2, 4)).astype(np.float32)
    before = decoder_lib._decode_jit._cache_size()
    a = cmjax.decode(dec, latents, key=jax.random.key(1))
    b = cmjax.decode(dec, latents, key=jax.random.key(1))
    c = cmjax.decode(dec, latents, key=jax.random.key(2))
    assert decoder_lib._decode_jit._cache_size() == before + 1  # one compiled program, reused
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    # key noise is exactly normal(fold_in(key, i)) per step
    shape = (2, 16, 16, 3)
    noise = [jax.random.normal(jax.random.fold_in(jax.random.key(1), i), shape) for i in range(2)]
    np.testing.assert_array_equal(np.asarray(cmjax.decode(dec, latents, noise=noise)), np.asarray(a))


@pytest.mark.slow  # the quick tier computes in bf16 in tests/test_vae.py::test_bf16_compute
def test_bf16_compute_close_to_fp32(peer):
    _, _, dec = peer
    rng = np.random.default_rng(5)
    latents = rng.normal(size=(2, 2, 2, 4)).astype(np.float32)
    noise = [rng.normal(size=(2, 16, 16, 3)).astype(np.float32) for _ in range(2)]
    fp32 = np.asarray(cmjax.decode(dec, latents, noise=noise))
    bf16 = np.asarray(cmjax.decode(dec, latents, noise=noise, dtype=jnp.bfloat16))
    assert bf16.dtype == np.float32
    err = np.abs(bf16 - fp32)
    # bf16 has an 8-bit mantissa (~0.4% relative); through a 2-step decode of a random network
    # the images stay within 0.1 of fp32 at worst and 0.02 on average (on a [-1, 1] range).
    assert err.max() < 0.1 and err.mean() < 0.02, (err.max(), err.mean())
    assert err.max() > 0  # bf16 really ran


def test_decode_bad_input(peer):
    _, _, dec = peer
    good = np.zeros((1, 2, 2, 4), np.float32)
    with pytest.raises(ValueError, match="NHWC"):
        cmjax.decode(dec, np.zeros((2, 2, 4), np.float32))
    with pytest.raises(ValueError, match="4 channels.*NCHW"):
        cmjax.decode(dec, np.zeros((1, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="4 channels"):
        cmjax.decode(dec, np.zeros((1, 2, 2, 3), np.float32))
    bad = good.copy()
    bad[0, 1, 1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cmjax.decode(dec, bad)
    with pytest.raises(ValueError, match="one array per step"):
        cmjax.decode(dec, good, noise=[np.zeros((1, 16, 16, 3))])
    with pytest.raises(ValueError, match="shape"):
        cmjax.decode(dec, good, noise=[np.zeros((1, 8, 8, 3))] * 2)
    with pytest.raises(ValueError, match="grid"):
        cmjax.decode(dec, good, timesteps=(1000,))
    with pytest.raises(ValueError, match="either key or noise"):
        cmjax.decode(dec, good, key=jax.random.key(0), noise=[np.zeros((1, 16, 16, 3))] * 2)


def test_checkpoint_roundtrip(peer, tmp_path):
    _, _, dec = peer
    cmjax.save_decoder(dec, tmp_path / "copy")
    again = cmjax.load_decoder(tmp_path / "copy")
    assert again.config == dec.config
    jax.tree.map(np.testing.assert_array_equal, again.params, dec.params)
    with pytest.raises(FileExistsError):
        cmjax.save_decoder(dec, tmp_path / "copy")
    with pytest.raises(ValueError, match="not a cmjax decoder checkpoint"):
        cmjax.load_decoder(tmp_path)


def test_fp16_variant_and_bare_safetensors(peer, tmp_path):
    vae, _, dec = peer
    folder = save_vae(vae.half(), tmp_path / "fp16", fp16=True)
    vae.float()
    assert (folder / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = convert(folder, tmp_path / "ckpt16")
    leaves = jax.tree.leaves(half.params)
    assert all(x.dtype == np.float32 for x in leaves)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-3), half.params, dec.params)
    # the safetensors file alone, with no config.json: GroupNorm groups cannot be seen in shapes
    lone = tmp_path / "lone"
    lone.mkdir()
    (folder / "diffusion_pytorch_model.fp16.safetensors").rename(lone / "unet.safetensors")
    with pytest.raises(ConversionError, match="cannot infer the GroupNorm group count"):
        convert(lone / "unet.safetensors", tmp_path / "ckpt_lone")
    assert not (tmp_path / "ckpt_lone").exists()


def test_architecture_inferred_without_config(tmp_path):
    """A lone safetensors file of a 32-group model: every size is read off the tensor shapes."""
    vae = tiny_consistency_vae(seed=1, decoder_block_out_channels=(32, 64, 64, 96), decoder_layers_per_block=1,
                               decoder_norm_num_groups=32)
    save_vae(vae, tmp_path / "v")
    (tmp_path / "v" / "config.json").unlink()
    dec = convert(tmp_path / "v" / "diffusion_pytorch_model.safetensors", tmp_path / "ckpt")
    assert dec.config.unet.block_out_channels == (32, 64, 64, 96)
    assert dec.config.unet.layers_per_block == 1
    latents = np.random.default_rng(0).normal(size=(1, 2, 2, 4)).astype(np.float32)
    noise = [np.random.default_rng(i).normal(size=(1, 16, 16, 3)).astype(np.float32) for i in range(2)]
    got = np.asarray(cmjax.decode(dec, latents, noise=noise))
    ref = reference_decode(vae, latents, noise)
    truth = reference_decode(vae, latents, noise, dtype=torch.float64)
    # Wider channels (96) give larger raw UNet outputs: here torch's own fp32 decode is 5.7e-6 from
    # a float64 evaluation and cmjax's 1.2e-5 (measured with im2col on the deep levels), so the two fp32
    # implementations may differ by a little more than 1e-5; both must stay near the truth.
    np.testing.assert_allclose(got, ref, atol=2 * ATOL, rtol=0)
    assert np.abs(got - truth).max() <= 3 * np.abs(ref - truth).max() + 1e-6


def _write_state(path, state):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))


@pytest.mark.parametrize("problem", ["missing_key", "extra_key", "wrong_shape", "nan"])
def test_convert_rejects_bad_weights(peer, tmp_path, problem):
    _, folder, _ = peer
    from safetensors.numpy import load_file

    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    key = "decoder_unet.down_blocks.1.resnets.0.norm2.weight"
    if problem == "missing_key":
        del state[key]
    elif problem == "extra_key":
        state["decoder_unet.down_blocks.1.resnets.0.extra.weight"] = np.zeros(3, np.float32)
    elif problem == "wrong_shape":
        state[key] = np.zeros(7, np.float32)
    else:
        state[key] = state[key].copy()
        state[key][0] = np.nan
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    _write_state(bad / "diffusion_pytorch_model.safetensors", state)
    dst = tmp_path / "dst"
    with pytest.raises(ConversionError) as info:
        convert(bad, dst)
    message = str(info.value)
    assert "diffusion_pytorch_model.safetensors" in message
    expected = {"missing_key": "missing (1)", "extra_key": "unexpected (1)", "wrong_shape": "wrong shape (1)",
                "nan": "NaN/inf values (1)"}[problem]
    assert expected in message and "down_blocks.1.resnets.0" in message
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]  # no temp directory left behind


def test_convert_cli_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "cmjax.convert", *map(str, args)], capture_output=True, text=True)

    res = run(tmp_path / "nope", tmp_path / "dst")
    assert res.returncode != 0 and "nope: no such file" in res.stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    res = run(junk, tmp_path / "dst")
    assert res.returncode != 0 and "junk.safetensors: not a readable safetensors file" in res.stderr
    assert not (tmp_path / "dst").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run(empty, tmp_path / "dst")
    assert res.returncode != 0 and "no diffusion_pytorch_model.safetensors" in res.stderr
    assert not (tmp_path / "dst").exists()


def test_convert_cli_success(peer, tmp_path):
    _, folder, dec = peer
    res = subprocess.run([sys.executable, "-m", "cmjax.convert", str(folder), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout
    again = cmjax.load_decoder(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, again.params, dec.params)


@pytest.mark.slow
def test_full_size_parity(tmp_path):
    """The released architecture (621,277,702 UNet params) on a 1x2 latent, random perturbed weights."""
    from diffusers import ConsistencyDecoderVAE

    from tests.torch_peers import perturb_

    torch.manual_seed(0)
    vae = perturb_(ConsistencyDecoderVAE(), seed=0, scale=0.02).eval()
    assert sum(p.numel() for p in vae.decoder_unet.parameters()) == 621_277_702
    save_vae(vae, tmp_path / "full")
    dec = convert(tmp_path / "full", tmp_path / "ckpt")
    dec = cmjax.Decoder(dec.config, jax.tree.map(jnp.asarray, dec.params))
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 1, 2, 4)).astype(np.float32)
    noise = [rng.normal(size=(2, 8, 16, 3)).astype(np.float32) for _ in range(2)]
    ref = reference_decode(vae, latents, noise)
    got = np.asarray(cmjax.decode(dec, latents, noise=noise))
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
