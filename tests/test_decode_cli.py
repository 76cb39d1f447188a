"""decode.py and cmjax.batch_decode: inputs, layouts, sharding, multi-host, failures, resuming, images.

Every run uses a tiny random-weight decoder. Runs on several devices or processes are subprocesses
(XLA's device count is fixed at start-up); they share a persistent compilation cache, so a program
compiled by one run is reused by the next.
"""
from __future__ import annotations

import dataclasses
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import cmjax
from cmjax.batch_decode import inputs, program
from cmjax.batch_decode import run as batch_run
from cmjax.batch_decode.options import DecodeOptions
from cmjax.images import to_uint8
from cmjax.models.decoder_config import DecoderConfig
from cmjax.models.decoder_unet import UNetConfig
from tests.decode_runs import REPO, cli_args, run_main
from tests.random_decoder import random_decoder, random_params


def decode_cli(ckpt, out, *args, env, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    e = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run(cli_args(ckpt, out, *args), env=e, capture_output=True, text=True, timeout=timeout)


MICRO = DecoderConfig(unet=UNetConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4))


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temporary files included) by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_latents(folder: Path) -> dict[str, np.ndarray]:
    """5 latents of one shape (2x3) in 3 files and 3 layouts; returns NHWC latents by item identity."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 3, 4)).astype(np.float32)
    b = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)
    c = rng.normal(size=(1, 2, 3, 4)).astype(np.float32)
    np.save(folder / "a.npy", a.transpose(2, 0, 1))  # CHW
    np.save(folder / "b.npy", b)  # NHWC batch
    np.savez(folder / "c.npz", x=c.transpose(0, 3, 1, 2))  # NCHW batch of 1
    return {"a.npy": a, "b.npy:0": b[0], "b.npy:1": b[1], "b.npy:2": b[2], "c.npz:x:0": c[0]}


EXPECTED = {"a.png", "b_000.png", "b_001.png", "b_002.png", "c_x_000.png"}


def with_npy(names):
    return set(names) | {n[:-4] + ".npy" for n in names}


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("in") / "latents"
    return folder, write_latents(folder)


@pytest.fixture(scope="module")
def single_device_run(ckpt, env, latents, tmp_path_factory):
    """The reference: 1 device, global batch 2 (5 inputs: batches of 2, 2, 1 + padding)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    res = decode_cli(ckpt, out, "--batch-size", 2, "--save-npy", latents[0], env=env)
    assert res.returncode == 0, res.stderr
    return out, res


# ------------------------------------------------------------------------------------------------
# Inputs: layouts, names, identities (no model)


def test_layout_detection():
    assert inputs.detect_layout((4, 2, 3)) is True  # CHW
    assert inputs.detect_layout((2, 3, 4)) is False  # HWC
    assert inputs.detect_layout((7, 4, 2, 3)) is True  # NCHW
    assert inputs.detect_layout((7, 2, 3, 4)) is False  # NHWC
    assert inputs.detect_layout((4, 4, 2, 3)) is True  # N=4 does not confuse a 4-D batch
    with pytest.raises(inputs.InputError, match=r"ambiguous.*--layout"):
        inputs.detect_layout((4, 4, 4))
    with pytest.raises(inputs.InputError, match="ambiguous"):
        inputs.detect_layout((2, 4, 3, 4))
    assert inputs.detect_layout((4, 4, 4), "nhwc") is False
    assert inputs.detect_layout((2, 4, 3, 4), "nchw") is True
    with pytest.raises(inputs.InputError, match="--layout nchw puts 2 channels where 4"):
        inputs.detect_layout((2, 3, 4), "nchw")
    with pytest.raises(inputs.InputError, match="no axis of 4 latent channels"):
        inputs.detect_layout((2, 3, 5))
    with pytest.raises(inputs.InputError, match="3-D.*not 2-D"):
        inputs.detect_layout((2, 4))
    with pytest.raises(inputs.InputError, match="not 5-D"):
        inputs.detect_layout((1, 1, 4, 2, 3))


def test_scan_names_and_layouts(tmp_path):
    from safetensors.numpy import save_file

    truth = write_latents(tmp_path / "in")
    (tmp_path / "in" / "sub").mkdir()
    save_file({"z/0": np.zeros((4, 5, 6), np.float32), "batch": np.zeros((2, 5, 6, 4), np.float32)},
              str(tmp_path / "in" / "sub" / "d.safetensors"))
    np.lib.format.open_memmap(tmp_path / "in" / "big.npy", "w+", np.float16, (1001, 1, 2, 4)).flush()
    sources, errors = inputs.discover([str(tmp_path / "in")], inputs.LATENT_SUFFIXES)
    assert errors == []
    assert [s.rel for s in sources] == ["a.npy", "b.npy", "big.npy", "c.npz", "sub/d.safetensors"]
    items = [i for s in sources for i in inputs.scan_latents(s, None, 4)[0]]
    by_id = {i.identity: i for i in items}
    assert set(truth) <= set(by_id)
    assert by_id["a.npy"].stem == "a" and by_id["a.npy"].channels_first and by_id["a.npy"].shape == (2, 3)
    assert by_id["b.npy:2"].stem == "b_002" and not by_id["b.npy:2"].channels_first
    assert by_id["c.npz:x:0"].stem == "c_x_000" and by_id["c.npz:x:0"].channels_first
    assert by_id["sub/d.safetensors:z/0"].stem == "sub/d_z_0" and by_id["sub/d.safetensors:z/0"].shape == (5, 6)
    assert by_id["sub/d.safetensors:batch:1"].stem == "sub/d_batch_001"
    assert by_id["big.npy:1000"].stem == "big_1000" and by_id["big.npy:7"].stem == "big_0007"
    reader = inputs.Reader()
    for identity, latent in truth.items():  # every layout is read back as the NHWC latent
        np.testing.assert_array_equal(reader.latent(by_id[identity]), latent)
    # a glob and a file name give the same names (and so the same noise) as the folder
    sources, _ = inputs.discover([str(tmp_path / "in" / "*.np?"), str(tmp_path / "in" / "b.npy")], inputs.LATENT_SUFFIXES)
    assert [s.rel for s in sources] == ["a.npy", "b.npy", "big.npy", "c.npz"]
    _, errors = inputs.discover([str(tmp_path / "nothing"), str(tmp_path / "in" / "*.png")], inputs.LATENT_SUFFIXES)
    assert len(errors) == 2 and "no such file" in errors[0] and "matches no" in errors[1]
    # plain file names first (as decode.py a.npy b.npy), and a missing one between two files
    sources, errors = inputs.discover([str(tmp_path / "in" / "a.npy"), str(tmp_path / "in" / "b.npy")],
                                      inputs.LATENT_SUFFIXES)
    assert [s.rel for s in sources] == ["a.npy", "b.npy"] and errors == []
    sources, errors = inputs.discover([str(tmp_path / "in" / "a.npy"), str(tmp_path / "gone.npy"),
                                       str(tmp_path / "in" / "b.npy")], inputs.LATENT_SUFFIXES)
    assert [s.rel for s in sources] == ["a.npy", "b.npy"] and len(errors) == 1 and "gone.npy" in errors[0], errors


def test_noise_identity_is_stable():
    """sha256-based, so the same on every run, host and Python (``hash()`` is salted per process)."""
    np.testing.assert_array_equal(program.identity_key_data("a.npy"), [0x521DA39C, 0x0DFF0259])
    assert not np.array_equal(program.identity_key_data("b.npy:0"), program.identity_key_data("b.npy:1"))
    n1 = program.noise_for(3, "x.npy", 2, (8, 16))
    assert n1.shape == (2, 1, 8, 16, 3)
    np.testing.assert_array_equal(n1, program.noise_for(3, "x.npy", 2, (8, 16)))
    assert not np.allclose(n1, program.noise_for(4, "x.npy", 2, (8, 16)))  # the seed matters
    assert abs(n1.std() - 1) < 0.2 and not np.allclose(n1[0], n1[1])  # fresh noise per step


def test_to_uint8_rounds():
    x = np.array([-1.5, -1.0, -0.999, 0.0, 0.0039, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 0, 128, 128, 255, 255])  # 127.5 rounds to even, 128


# ------------------------------------------------------------------------------------------------
# Sharding and multi-host: same seed, same input -> same image


@pytest.mark.cli
def test_sharded_matches_single_device(ckpt, env, latents, single_device_run, tmp_path):
    """4 devices, global batch 3 -> 4 (5 inputs: one full batch, one with 3 padding rows) = 1 device, batch 2.

    Each device decodes one image at a time (--micro-batch 1), so the pixels are the same bit for bit."""
    ref_out, ref = single_device_run
    out = tmp_path / "out"
    res = decode_cli(ckpt, out, "--batch-size", 3, "--save-npy", latents[0], env=env, devices=4)
    assert res.returncode == 0, res.stderr
    assert "4 device(s) on 1 host(s)" in res.stderr
    for r in (res, ref):
        assert "decoded 5 images (0 skipped, 0 failed)" in r.stdout and "1 compiled program" in r.stdout, r.stdout
    got, want = outputs(out), outputs(ref_out)
    assert set(got) == set(want) == with_npy(EXPECTED)
    for name in want:  # bit for bit: the float images and the PNGs
        assert got[name] == want[name], f"{name} differs"
    # The documented noise recipe: decoding one input with noise_for(seed, identity) gives its image.
    dec = cmjax.load_decoder(ckpt)
    for identity, stem in [("a.npy", "a"), ("b.npy:1", "b_001")]:
        noise = program.noise_for(0, identity, 2, (16, 24))
        image = np.asarray(cmjax.decode(dec, latents[1][identity][None], noise=noise))[0]
        np.testing.assert_allclose(np.load(ref_out / f"{stem}.npy"), image, atol=1e-5, rtol=0)


@pytest.mark.cli
def test_two_processes_match_one(ckpt, env, latents, single_device_run, tmp_path):
    ref_out, _ = single_device_run
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen(cli_args(ckpt, out, "--batch-size", 3, "--save-npy", "--coordinator",
                                       f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i, latents[0]),
                              env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
    assert "2 device(s) on 2 host(s)" in results[0][1]
    assert "decoded 5 images (0 skipped, 0 failed)" in results[0][0]  # the summary counts both hosts
    assert "decoded" not in results[1][0]  # and only process 0 prints it
    got, want = outputs(out), outputs(ref_out)
    assert set(got) == set(want)
    for name in want:  # bit for bit: the float images and the PNGs
        assert got[name] == want[name], f"{name} differs"


# ------------------------------------------------------------------------------------------------
# Robustness: bad inputs, interruption


@pytest.mark.cli
def test_bad_inputs_are_named_and_the_rest_decoded(ckpt, env, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    np.save(folder / "good.npy", rng.normal(size=(2, 3, 4)).astype(np.float32))
    np.save(folder / "nchw.npy", rng.normal(size=(1, 4, 2, 3)).astype(np.float32))
    batch = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)
    batch[1, 0, 0, 0] = np.inf
    np.save(folder / "batch_with_inf.npy", batch)
    nan = rng.normal(size=(2, 3, 4)).astype(np.float32)
    nan[1, 1, 1] = np.nan
    np.save(folder / "has_nan.npy", nan)
    (folder / "garbage.npy").write_bytes(b"this is not numpy")
    np.save(folder / "five_channels.npy", np.zeros((2, 3, 5), np.float32))
    np.save(folder / "ambiguous.npy", np.zeros((4, 4, 4), np.float32))
    np.save(folder / "integers.npy", np.zeros((2, 3, 4), np.int32))
    np.save(folder / "flat.npy", np.zeros((24,), np.float32))
    np.savez(folder / "truncated.npz", x=np.zeros((2, 3, 4), np.float32))
    data = (folder / "truncated.npz").read_bytes()
    (folder / "truncated.npz").write_bytes(data[:len(data) // 2])
    (folder / "empty.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    res = decode_cli(ckpt, out, "--steps", 1, "--batch-size", 1, folder, env=env)
    assert res.returncode == 1, res.stderr
    bad = ["batch_with_inf.npy[1]", "has_nan.npy", "garbage.npy", "five_channels.npy", "ambiguous.npy",
           "integers.npy", "flat.npy", "truncated.npz", "empty.safetensors"]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    for name in bad:
        assert any(name in line for line in errors), (name, res.stderr)
    assert len(errors) == len(bad), res.stderr
    assert "NaN or inf" in res.stderr and "ambiguous" in res.stderr and "no axis of 4" in res.stderr
    assert "decoded 4 images (0 skipped, 9 failed)" in res.stdout, res.stdout
    assert set(outputs(out)) == {"good.png", "nchw_000.png", "batch_with_inf_000.png", "batch_with_inf_002.png"}
    for name in outputs(out):
        with Image.open(out / name) as img:
            img.verify()


def test_usage_errors(ckpt, tmp_path, capsys):
    base = ["--checkpoint", ckpt, "--output", tmp_path / "o", tmp_path]
    assert run_main(capsys, *base, "--compare")[1].endswith("error: --compare needs --images\n")
    status, err = run_main(capsys, *base, "--timesteps", "1008,500")
    assert status == 2 and "not on the distilled grid" in err
    status, err = run_main(capsys, *base, "--tile-overlap", "2")
    assert status == 2 and "--tile-overlap needs --tile" in err
    status, err = run_main(capsys, "--checkpoint", tmp_path / "no_ckpt", "--output", tmp_path / "o", tmp_path)
    assert status == 2 and "no_ckpt" in err
    status, err = run_main(capsys, *base, "--images", "--compare")
    assert status == 2 and "--compare needs --vae" in err
    status, err = run_main(capsys, *base, "--images", "--vae", tmp_path / "no_vae")
    assert status == 2 and "no_vae" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.cli
def test_interrupted_run_resumes(ckpt, env, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    np.save(folder / "many.npy", np.random.default_rng(2).normal(size=(100, 2, 3, 4)).astype(np.float32))
    out = tmp_path / "out"
    e = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(cli_args(ckpt, out, "--steps", 1, "--batch-size", 1, folder), env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(out.glob("*.png"))) < 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("*.png"))
    assert 3 <= len(done) < 100, "the run was not interrupted midway"
    for name in done:  # whatever exists under a final name is a whole PNG
        with Image.open(out / name) as img:
            img.load()
            assert img.size == (24, 16)
    res = decode_cli(ckpt, out, "--steps", 1, "--batch-size", 1, "--skip-existing", folder, env=env)
    assert res.returncode == 0, res.stderr
    assert f"decoded {100 - len(done)} images ({len(done)} skipped, 0 failed)" in res.stdout, res.stdout
    clean = tmp_path / "clean"
    res = decode_cli(ckpt, clean, "--steps", 1, "--batch-size", 1, folder, env=env)
    assert res.returncode == 0, res.stderr
    resumed, want = outputs(out), outputs(clean)
    assert set(resumed) == set(want) == {f"many_{i:03d}.png" for i in range(100)}  # no temporary files left
    assert resumed == want


# ------------------------------------------------------------------------------------------------
# In-process API: programs per shape, output name clashes


def test_run_compiles_once_per_shape(ckpt, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    np.save(folder / "x.npy", rng.normal(size=(3, 1, 2, 4)).astype(np.float32))
    np.save(folder / "y.npy", rng.normal(size=(2, 4, 1, 1)).astype(np.float32))  # NCHW 1x1
    np.save(folder / "z.npy", rng.normal(size=(1, 2, 4)).astype(np.float32))
    zipfile.ZipFile(folder / "z.npz", "w").close()  # an empty archive
    options = DecodeOptions(output=tmp_path / "out", timesteps=(1008,), batch_size=2, progress=False)
    messages = []
    summary = batch_run.run(cmjax.load_decoder(ckpt), [str(folder)], options, log=messages.append)
    assert (summary.decoded, summary.failed, summary.programs) == (6, 1, 2)
    assert messages == [f"error: {folder / 'z.npz'}: cannot read: no arrays in this .npz file"]
    err = capsys.readouterr().err.splitlines()
    compiling = [line for line in err if line.startswith("compiling")]
    assert compiling == ["compiling the decoder for 1x1 latents (once per input shape)",
                         "compiling the decoder for 1x2 latents (once per input shape)"]
    for line in compiling:  # each followed by how long it took (compiled, or loaded from the session's cache)
        assert re.fullmatch(r"  (compiled|loaded from the compile cache) in \d+\.\d s.*", err[err.index(line) + 1])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "x_000.png", "x_001.png", "x_002.png", "y_000.png", "y_001.png", "z.png"]
    with Image.open(tmp_path / "out" / "y_000.png") as img:
        assert img.size == (8, 8)


def test_a_shape_that_does_not_fit_is_decoded_in_tiles(tmp_path, monkeypatch, capsys):
    """Without --tile, a shape whose untiled program needs more than a device's free memory is
    decoded in tiles of 64 latents instead, pixel for pixel as with --tile 64, and stderr says so.
    With --tile given, a shape that does not fit is refused (a failed input) with a smaller tile
    as the hint. The free memory is set between the two programs' measured needs."""
    decoder = random_decoder(0, MICRO)
    folder = tmp_path / "in"
    folder.mkdir()
    np.save(folder / "big.npy", np.random.default_rng(5).normal(size=(72, 80, 4)).astype(np.float32))
    needs = []
    real_needed = program.bytes_needed
    monkeypatch.setattr(program, "bytes_needed", lambda *a: needs.append(real_needed(*a)) or needs[-1])

    def decode(out: str, **kw) -> batch_run.Summary:
        options = DecodeOptions(output=tmp_path / out, timesteps=(1008,), progress=False, **kw)
        return batch_run.run(decoder, [str(folder)], options)

    assert decode("tiled", tile=64).decoded == 1 and decode("untiled").decoded == 1
    tiled_need, untiled_need = needs
    assert tiled_need < untiled_need
    monkeypatch.setattr(program, "bytes_free", lambda mesh: (tiled_need + untiled_need) // 2)
    capsys.readouterr()
    summary = decode("auto")
    assert (summary.decoded, summary.failed, summary.programs) == (1, 0, 1)
    err = capsys.readouterr().err
    assert "untiled, 72x80 latents needs about" in err and "decoding them in tiles of 64 latents instead" in err
    png = {name: (tmp_path / name / "big.png").read_bytes() for name in ("tiled", "untiled", "auto")}
    assert png["auto"] == png["tiled"] != png["untiled"]

    monkeypatch.setattr(program, "bytes_free", lambda mesh: tiled_need // 2)
    summary = decode("refused", tile=64)
    assert (summary.decoded, summary.failed) == (0, 1)
    assert "a smaller --tile than 64" in summary.failures[0] and not (tmp_path / "refused" / "big.png").exists()


@pytest.mark.slow  # Winograd forced: a long compile
def test_run_prepares_kernels_once_per_shape(tmp_path, monkeypatch):
    """With a plan of Winograd's lowering, the kernel transforms are made once per input shape for
    the whole run (decoding.decoder.prepared_params), not inside the compiled program, which runs
    once per batch and loops over micro-batches: three batches of one shape, each conv's kernel
    transformed once."""
    from cmjax.models.conv_lowering import CONV, Lowering, LoweringPlan, winograd_kernel, winograd_run

    calls, compiling = [], []

    def counting_prepare(kernel):
        calls.append(bool(compiling))  # True: prepared while the decode program was traced
        return winograd_kernel(kernel)

    def compile_program(*args):
        compiling.append(True)
        return real_compile(*args)

    real_compile = program.compile_program
    monkeypatch.setattr(program, "compile_program", compile_program)
    monkeypatch.setitem(CONV, "winograd", Lowering(winograd_run, counting_prepare, "winograd"))
    decoder = random_decoder(0, MICRO)
    convs = sum(1 for path, x in jax.tree_util.tree_leaves_with_path(decoder.params)
                if path[-1].key == "kernel" and x.ndim == 4 and x.shape[:2] == (3, 3))
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for name in "abc":  # a shape no other test decodes in this process (jit caches key on shapes, not lowerings)
        np.save(folder / f"{name}.npy", rng.normal(size=(3, 5, 4)).astype(np.float32))
    options = DecodeOptions(output=tmp_path / "out", timesteps=(1008, 512), batch_size=1, progress=False,
                            lowering=LoweringPlan(default="winograd"))
    summary = batch_run.run(decoder, [str(folder)], options)
    assert (summary.decoded, summary.failed, summary.programs) == (3, 0, 1)
    # every 3x3 conv prepared (abstractly, then for real) before the program, none while it compiled
    assert compiling == [True] and len(calls) >= convs > 4 and not any(calls)
    assert not decoder.prepared  # released at the end of the run


# ------------------------------------------------------------------------------------------------
# --images / --compare with a tiny SD VAE


@pytest.fixture(scope="module")
def vae_ckpts(tmp_path_factory) -> Path:
    from cmjax.models import vae as vae_lib
    from cmjax.weights import checkpoint

    cfg = vae_lib.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    full = vae_lib.VAE(cfg, random_params(vae_lib.abstract_params(cfg), seed=1))
    root = tmp_path_factory.mktemp("vae")
    checkpoint.save_vae(full, root / "full")
    checkpoint.save_vae(vae_lib.VAE(cfg, vae_lib.split_params(full.params)[0]), root / "encoder_only")
    cfg16 = dataclasses.replace(cfg, latent_channels=16)  # a FLUX-style latent space
    checkpoint.save_vae(vae_lib.VAE(cfg16, random_params(vae_lib.abstract_params(cfg16), seed=2)), root / "sixteen")
    return root


def test_images_with_a_vae_of_another_latent_space(ckpt, vae_ckpts, tmp_path, capsys):
    """A 16-channel VAE with a 4-channel decoder: one line naming both, before any image is read."""
    status, err = run_main(capsys, "--checkpoint", ckpt, "--output", tmp_path / "o", "--images",
                           "--vae", vae_ckpts / "sixteen", tmp_path)
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: --vae "), err
    assert "sixteen" in err and "16-channel latents" in err and "reads 4" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.cli
def test_images_compare(ckpt, vae_ckpts, env, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(4)
    cat = rng.integers(0, 256, (16, 24, 3), np.uint8)
    Image.fromarray(cat).save(folder / "cat.png")
    Image.fromarray(rng.integers(0, 256, (16, 24), np.uint8), "L").save(folder / "gray.png")  # grayscale
    dog = rng.integers(0, 256, (18, 27, 3), np.uint8)  # center-cropped to 16x24 (multiples of 8)
    Image.fromarray(dog).save(folder / "sub" / "dog.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    res = decode_cli(ckpt, out, "--images", "--compare", "--vae", vae_ckpts / "full", "--steps", 1, folder, env=env)
    assert res.returncode == 1, res.stderr  # broken.jpg
    assert "broken.jpg: cannot read image" in res.stderr
    assert "decoded 3 images (0 skipped, 1 failed)" in res.stdout and "1 compiled program" in res.stdout, res.stdout
    assert set(outputs(out)) == {"cat.png", "cat_compare.png", "gray.png", "gray_compare.png", "sub/dog.png",
                                 "sub/dog_compare.png"}
    psnr_lines = [line for line in res.stdout.splitlines() if "PSNR SD GAN decoder" in line]
    assert len(psnr_lines) == 3 and all("consistency decoder" in line and "dB" in line for line in psnr_lines)
    assert "mean PSNR" in res.stdout
    with Image.open(out / "sub" / "dog.png") as img:
        assert img.size == (24, 16)
    with Image.open(out / "cat_compare.png") as img:
        strip = np.asarray(img)
    # input | GAN | consistency, left to right, pixels unchanged, each under its label
    x_input, y = find_panel(strip, cat)
    x_cd, y_cd = find_panel(strip, np.asarray(Image.open(out / "cat.png")))
    assert y == y_cd > 0 and x_input < strip.shape[1] // 3 < 2 * strip.shape[1] // 3 <= x_cd
    dark = strip.min(axis=2) < 128  # black text on white, outside the panels
    assert dark[:y].any(axis=0)[x_input:x_input + 24].any() and dark[:y].any(axis=0)[x_cd:x_cd + 24].any()
    below = dark[y + 16:].any(axis=0)  # a PSNR under the two decoders, nothing under the input
    assert below[x_cd:x_cd + 24].any() and not below[x_input:x_input + 24].any()
    with Image.open(out / "sub" / "dog_compare.png") as img:
        assert find_panel(np.asarray(img), dog[1:17, 1:25]) == (x_input, y)  # center crop


def find_panel(strip: np.ndarray, panel: np.ndarray) -> tuple[int, int]:
    """(x, y) of the one place where ``panel`` appears unchanged in ``strip``."""
    h, w = panel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(strip, (h, w, 3))[:, :, 0]
    ys, xs = np.nonzero((windows == panel).all(axis=(2, 3, 4)))
    assert len(xs) == 1, f"panel found {len(xs)} times"
    return int(xs[0]), int(ys[0])


@pytest.mark.cli
def test_help(env):
    """decode.py --help exits 0; INPUT mentions images under --images; every option states its
    default (or that it is required)."""
    res = subprocess.run([sys.executable, str(REPO / "decode.py"), "--help"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "with --images: image files (.png, .jpg" in " ".join(res.stdout.split())
    options = res.stdout[res.stdout.index("options:"):]
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", options)[1:]]  # an entry starts "  -"
    flags = {e.split()[0].rstrip(",") for e in entries}
    assert {"--checkpoint", "--steps", "--tile", "--vae", "--process-id", "--compare", "--clip", "--tune"} <= flags, flags
    assert len(entries) == 23, entries
    for entry in entries[1:]:  # all but -h
        assert "default" in entry or "(required)" in entry, entry


@pytest.mark.cli
def test_second_run_loads_the_compiled_program(ckpt, env, tmp_path):
    """With no compilation cache chosen for JAX, decode.py keeps its compiled programs under
    $CMJAX_CACHE/xla: the second run loads the decode program instead of compiling it, and says so;
    CMJAX_COMPILE_CACHE=0 writes nothing there."""
    folder = tmp_path / "in"
    folder.mkdir()
    np.save(folder / "a.npy", np.random.default_rng(8).normal(size=(2, 3, 4)).astype(np.float32))
    e = {k: v for k, v in env.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    e.update(CMJAX_CACHE=str(tmp_path / "cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    runs = [subprocess.run(cli_args(ckpt, tmp_path / f"out{i}", folder), env=e, capture_output=True, text=True,
                           timeout=300) for i in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr
    assert re.search(r"\n  compiled in \d+\.\d s \(kept in the compile cache .*xla for the next run\)\n",
                     runs[0].stderr), runs[0].stderr
    assert re.search(r"\n  loaded from the compile cache in \d+\.\d s\n", runs[1].stderr), runs[1].stderr
    assert any((tmp_path / "cache" / "xla").iterdir())
    assert (tmp_path / "out0" / "a.png").read_bytes() == (tmp_path / "out1" / "a.png").read_bytes()
    off = subprocess.run(cli_args(ckpt, tmp_path / "out2", folder), env=dict(e, CMJAX_COMPILE_CACHE="0",
                         CMJAX_CACHE=str(tmp_path / "cache2")), capture_output=True, text=True, timeout=300)
    assert off.returncode == 0 and "\n  compiled in" in off.stderr and "compile cache" not in off.stderr, off.stderr
    assert not (tmp_path / "cache2" / "xla").exists()
