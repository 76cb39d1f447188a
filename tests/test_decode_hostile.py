"""decode.py against hostile inputs and flags (issue 9's decode side): each is refused cleanly.

A clean refusal: exit status 1 (an input) or 2 (a flag or checkpoint), one ``error:`` line naming
the file or flag and the problem, no traceback, no partial output, and every other input decoded.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import os
import re
import socket
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cmjax
from cmjax.batch_decode import inputs, program
from cmjax.cli import timesteps_from_flags
from tests import hostile_files as hf
from tests.decode_runs import cli_args, run_main
from tests.random_decoder import TINY, random_decoder

ADDRESS_SPACE_KIB = 6 * 2 ** 20  # 6 GiB: the hostile run stays far below what its huge input asks for


def with_memory_limit(command: list[str]) -> list[str]:
    """``command`` under an address-space limit (ulimit -v; no fork hook inside this JAX process)."""
    return ["bash", "-c", f'ulimit -v {ADDRESS_SPACE_KIB} && exec "$@"', "bash", *command]


@pytest.mark.cli
def test_hostile_inputs_are_refused_and_the_rest_decoded(ckpt, env, tmp_path):
    """One run, four hostile inputs beside a good one:
    - a non-UTF-8 file name (decoded, its noise keyed by the name's bytes),
    - a symlink loop in the folder (walked once, no hang),
    - a (4, 4096, 4096) latent whose decode needs ~1 TB (refused before anything is allocated,
      naming the file and --tile),
    - a glob whose '..' would put an output outside --output (refused, nothing written there)."""
    folder = tmp_path / "in"
    (folder / "d1").mkdir(parents=True)
    rng = np.random.default_rng(7)
    np.save(folder / "good.npy", rng.normal(size=(2, 3, 4)).astype(np.float32))
    bad_name = os.fsdecode(b"bad\xff.npy")
    np.save(folder / bad_name, rng.normal(size=(2, 3, 4)).astype(np.float32))
    os.symlink(".", folder / "loop")
    np.lib.format.open_memmap(folder / "huge.npy", "w+", np.float32, (4, 4096, 4096)).flush()  # sparse zeros
    np.save(tmp_path / "x.npy", rng.normal(size=(2, 3, 4)).astype(np.float32))
    out = tmp_path / "out"
    escaping = str(folder / "d*" / ".." / ".." / "x.npy")
    e = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    res = subprocess.run(with_memory_limit(cli_args(ckpt, out, "--steps", 1, folder, escaping)), env=e,
                         capture_output=True, timeout=600)
    stderr, stdout = res.stderr.decode(errors="replace"), res.stdout.decode()
    assert res.returncode == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, stderr
    huge = next(line for line in errors if "huge.npy" in line)
    assert "GiB" in huge and "--tile" in huge, huge
    outside = next(line for line in errors if "x.npy" in line)
    assert "outside --output" in outside, outside
    assert "decoded 2 images (0 skipped, 2 failed)" in stdout, stdout
    assert set(os.listdir(out)) == {"good.png", os.fsdecode(b"bad\xff.png")}
    assert not (tmp_path / "x.png").exists()
    # the non-UTF-8 name's noise comes from its bytes, so it differs from the good file's image
    assert (out / "good.png").read_bytes() != (out / os.fsdecode(b"bad\xff.png")).read_bytes()


def test_identity_uses_the_file_name_bytes():
    name = os.fsdecode(b"bad\xff.npy")
    assert name.encode("utf-8", "surrogateescape") == b"bad\xff.npy"
    np.testing.assert_array_equal(program.identity_key_data(name), program.identity_key_data(b"bad\xff.npy"))
    assert not np.array_equal(program.identity_key_data(name), program.identity_key_data("bad\ufffd.npy"))
    np.testing.assert_array_equal(program.identity_key_data("a.npy"), program.identity_key_data(b"a.npy"))


def test_symlink_loops_are_walked_once(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    np.save(tmp_path / "a" / "b" / "z.npy", np.zeros((2, 3, 4), np.float32))
    os.symlink("..", tmp_path / "a" / "b" / "up")  # b/up -> a: a loop through the parent
    os.symlink(".", tmp_path / "a" / "self")
    sources, errors = inputs.discover([str(tmp_path / "a")], inputs.LATENT_SUFFIXES)
    assert errors == [] and [s.rel for s in sources] == ["b/z.npy"]
    # glob.glob's '**' would follow both links for ever (two loops: 2**40 paths)
    sources, errors = inputs.discover([str(tmp_path / "a" / "**" / "*.npy")], inputs.LATENT_SUFFIXES)
    assert errors == [] and [s.rel for s in sources] == ["b/z.npy"]


def test_fifos_and_devices_are_not_read(tmp_path):
    """Reading a FIFO blocks for ever and /dev/zero never ends: both are refused by name, unread,
    whether named directly, found in a folder or matched by a glob (one line each, reported once)."""
    (tmp_path / "in").mkdir()
    os.mkfifo(tmp_path / "in" / "pipe.npy")
    os.symlink("/dev/zero", tmp_path / "in" / "zero.npy")
    os.symlink(tmp_path / "gone.npy", tmp_path / "in" / "dangling.npy")
    np.save(tmp_path / "in" / "ok.npy", np.zeros((2, 3, 4), np.float32))
    special = "not a regular file or folder (a FIFO, device or socket); skipped"
    want = [f"{tmp_path / 'in' / 'dangling.npy'}: a symbolic link to nothing ({tmp_path / 'gone.npy'}); skipped",
            f"{tmp_path / 'in' / 'pipe.npy'}: {special}", f"{tmp_path / 'in' / 'zero.npy'}: {special}"]
    sources, errors = inputs.discover([str(tmp_path / "in"), str(tmp_path / "in" / "pipe.npy"), "/dev/zero"],
                                      inputs.LATENT_SUFFIXES)
    assert [s.rel for s in sources] == ["ok.npy"]
    assert sorted(errors) == sorted(want + [f"/dev/zero: {special}"])
    for pattern in ("*.npy", "**/*.npy"):
        sources, errors = inputs.discover([str(tmp_path / "in" / pattern)], inputs.LATENT_SUFFIXES)
        assert [s.rel for s in sources] == ["ok.npy"] and sorted(errors) == want, pattern
    # a folder holding only such names reports them (not "holds no files")
    (tmp_path / "in" / "ok.npy").unlink()
    assert sorted(inputs.discover([str(tmp_path / "in")], inputs.LATENT_SUFFIXES)[1]) == want


def test_recursive_globs_match_like_glob(tmp_path):
    """Without links, '**' patterns find what glob.glob finds."""
    for rel in ["x.npy", "s/y.npy", "s/t/z.npy", "s/t/w.npz", "u/v.npy"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / rel, np.zeros((2, 3, 4), np.float32))
    for pattern in ["**/*.npy", "s/**/*.npy", "**/t/*.np?", "s/**", "*/y.npy"]:
        sources, _ = inputs.discover([str(tmp_path / pattern)], inputs.LATENT_SUFFIXES)
        want = {p for p in glob.glob(str(tmp_path / pattern), recursive=True) if os.path.isfile(p)}
        want |= {str(f) for p in glob.glob(str(tmp_path / pattern), recursive=True) if os.path.isdir(p)
                 for f in Path(p).rglob("*.np[yz]")}
        assert {str(s.path) for s in sources} == want, pattern


@pytest.mark.parametrize("flags, message", [
    (["--seed", str(2 ** 70)], "--seed must lie in [-2**63, 2**63), got 1180591620717411303424"),
    (["--timesteps", ""], "--timesteps is empty"),
    (["--timesteps", "1008,,512"], "--timesteps must be comma-separated integers, got '1008,,512'"),
])
def test_bad_flags_are_refused(flags, message, tmp_path, capsys):
    status, err = run_main(capsys, "--checkpoint", tmp_path / "none", "--output", tmp_path / "o", tmp_path, *flags)
    assert status == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_unwritable_output_is_refused_before_decoding(ckpt, tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
    (tmp_path / "file").write_bytes(b"")
    status, err = run_main(capsys, "--checkpoint", ckpt, "--output", tmp_path / "file" / "o", tmp_path / "a.npy")
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --output {tmp_path / 'file' / 'o'}: cannot write there: {tmp_path / 'file'} is not a folder")


def test_timesteps_are_checked_against_the_model(tmp_path, capsys):
    """A model trained with 64 timesteps: 1008 is refused (not decoded to black); the default
    schedule is its own 2-step one."""
    config = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, num_train_timesteps=64))
    cmjax.save_decoder(random_decoder(0, config), tmp_path / "t64")
    status, err = run_main(capsys, "--checkpoint", tmp_path / "t64", "--output", tmp_path / "o", tmp_path,
                           "--timesteps", "1008,512")
    assert status == 2 and "t64: timesteps [1008, 512] are not on the distilled grid" in err
    assert "64 training timesteps" in err and not (tmp_path / "o").exists()
    assert timesteps_from_flags(None, None, 64) == (63, 32)
    assert timesteps_from_flags(None) == (1008, 512)


def _npy_header_only(shape, data: bytes) -> bytes:
    """A .npy whose header declares ``shape`` float32 over ``data`` (a header that lies)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def test_second_round_inputs_in_default_settings(ckpt, env, tmp_path):
    """Issue 24, one decode.py run in the default settings (the conv lowering measured, not forced):
    - a symlink planted at an output name (and at the old predictable temporary name) pointing
      outside --output: replaced by the PNG, the file outside untouched;
    - an .npz member and an .npy whose headers declare 1e9 rows over 96 bytes: refused by name at
      once, nothing allocated (the run is under a 6 GiB address-space limit);
    - a safetensors header naming one tensor twice: refused;
    - a FIFO and a symlink to /dev/zero in the folder: one line each, skipped;
    - an output name longer than the file system takes: refused before anything is compiled; a
      250-byte input name: decoded;
    - file names with a newline: printed on one line, escaped and quoted."""
    rng = np.random.default_rng(3)
    latent = rng.normal(size=(2, 3, 4)).astype(np.float32)
    folder, out, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
    for d in (folder, out, outside):
        d.mkdir()
    np.save(folder / "good.npy", latent)
    long_name = "x" * 246 + ".npy"
    np.save(folder / long_name, latent)
    np.savez(folder / ("y" * 240 + ".npz"), **{"k" * 20: latent[None]})  # output y..y_k..k_000.png: 269 bytes
    np.save(folder / "new\nline.npy", latent)
    (folder / "bad\nname.npy").write_bytes(b"not numpy")
    with zipfile.ZipFile(folder / "bomb.npz", "w") as z:
        z.writestr("x.npy", _npy_header_only((10 ** 9, 4, 8, 8), bytes(96)))
    (folder / "lie.npy").write_bytes(_npy_header_only((10 ** 9, 4, 8, 8), bytes(96)))
    entry = '{"dtype":"F32","shape":[2,3,4],"data_offsets":[0,96]}'
    header = ('{"a":' + entry + ',"a":' + entry + "}").encode()
    (folder / "dup.safetensors").write_bytes(hf.safetensors_raw(header, latent.tobytes()))
    os.mkfifo(folder / "pipe.npy")
    os.symlink("/dev/zero", folder / "zero.npy")
    (outside / "victim").write_bytes(b"keep me")
    os.symlink(outside / "victim", out / "good.png")
    os.symlink(outside / "victim", out / f".good.png.tmp-{socket.gethostname()}-12345")
    e = {k: v for k, v in env.items() if k != "CMJAX_CONV_LOWERING"}
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    res = subprocess.run(with_memory_limit(cli_args(ckpt, out, "--steps", 1, folder)), env=e, capture_output=True,
                         timeout=900)
    stderr, stdout = res.stderr.decode(errors="replace"), res.stdout.decode()
    assert res.returncode == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    expected = {"bomb.npz": "declares shape (1000000000, 4, 8, 8)", "lie.npy": "declares shape (1000000000, 4, 8, 8)",
                "dup.safetensors": "'a' appears twice", "pipe.npy": "not a regular file",
                "zero.npy": "not a regular file", "y" * 240 + ".npz": "the output name is 269 bytes",
                "'" + str(folder / "bad\\nname.npy") + "'": "no NumPy header"}
    assert len(errors) == len(expected), stderr
    for name, why in expected.items():
        line = next((line for line in errors if name in line), None)
        assert line is not None and why in line, (name, stderr)
    compile_at = stderr.index("compiling the decoder")
    assert stderr.index("the output name is 269 bytes") < compile_at  # refused before any work
    assert "decoded 3 images (0 skipped, 7 failed)" in stdout, stdout
    assert sorted(os.listdir(out)) == sorted([f".good.png.tmp-{socket.gethostname()}-12345", "good.png",
                                              "x" * 246 + ".png", "new\nline.png"])
    assert not (out / "good.png").is_symlink() and (out / "good.png").read_bytes().startswith(b"\x89PNG")
    assert (outside / "victim").read_bytes() == b"keep me" and os.listdir(outside) == ["victim"]


def test_exif_orientation_is_applied_wherever_images_are_read(tmp_path):
    """A JPEG stored 48x32 with EXIF orientation 6 (a phone's portrait photo) is 32x48 in every
    viewer: decode.py --images, image folders (training, FID) and edit masks read it that way."""
    from PIL import Image

    from cmjax import data, images
    from cmjax.cli import edit as edit_cmd

    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:, :8] = 255  # a white band on the stored image's left edge: the top once turned upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "portrait.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "portrait.jpg") as img:
        assert img.size == (48, 32)
        want = np.asarray(images.upright(img))
    assert want.shape == (48, 32, 3) and want[:8].mean() > 200 and want[-8:].mean() < 50
    sources, _ = inputs.discover([str(tmp_path)], inputs.IMAGE_SUFFIXES)
    items, errors = inputs.scan_image(sources[0], 8)
    assert errors == [] and items[0].shape == (48, 32)
    pixels = inputs.Reader.image(items[0])
    np.testing.assert_array_equal(images.to_uint8(pixels), want)
    np.testing.assert_array_equal(data.ImageFolderSource(str(tmp_path))[0]["image"], want)
    mask = edit_cmd.read_mask(str(tmp_path / "portrait.jpg"), 48)
    assert mask[0, :8].mean() == 1 and mask[0, -8:].mean() == 0  # the band on top, as shown


def test_file_names_are_printed_on_one_line():
    """A newline, a terminal escape or a non-UTF-8 byte in a name is escaped and the name quoted."""
    assert inputs.display("in/a.npy") == "in/a.npy"
    assert inputs.display("in/a\nb.npy") == "'in/a\\nb.npy'"
    assert inputs.display("in/\x1b[2Jx.npy") == "'in/\\x1b[2Jx.npy'"
    assert inputs.display(os.fsdecode(b"bad\xff.npy")) == "'bad\\xff.npy'"
    assert inputs.display("back\\slash\n") == "'back\\\\slash\\n'"  # a backslash of its own is doubled


def test_declared_sizes_are_checked_against_the_bytes_everywhere_arrays_are_read(tmp_path):
    """A .npy or .npz member header declaring 1e9 rows over 96 bytes, or a zip directory declaring
    more bytes than its compressed data can hold, is refused from the headers, before np.load would
    allocate: latents for decode.py, FID statistics, training image/latent pairs."""
    from cmjax import files
    from cmjax.evaluation.fid import FIDStats
    from cmjax.training.input_pipeline import NpzPairSource

    lie = _npy_header_only((10 ** 9, 4, 8, 8), bytes(96))
    (tmp_path / "lie.npy").write_bytes(lie)
    for name, extra in (("stats.npz", {"sigma": np.eye(2)}), ("pairs.npz", {"latents": np.zeros((1, 1, 1, 4))})):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr("mu.npy" if name == "stats.npz" else "images.npy", lie)
            for key, value in extra.items():
                buf = io.BytesIO()
                np.save(buf, value)
                z.writestr(f"{key}.npy", buf.getvalue())
    np.savez_compressed(tmp_path / "deflated.npz", x=np.zeros((64, 64), np.float32))
    inflated = hf.set_central_size((tmp_path / "deflated.npz").read_bytes(), "x.npy", 2 ** 31)
    (tmp_path / "ratio.npz").write_bytes(inflated)
    declared = "the header declares shape (1000000000, 4, 8, 8) float32 (1,024,000,000,000 bytes)"
    for name in ("lie.npy", "stats.npz", "pairs.npz"):
        with pytest.raises(ValueError, match=re.escape(declared)):
            files.array_headers(tmp_path / name)
    with pytest.raises(ValueError, match="declares 2,147,483,648 bytes in"):
        files.array_headers(tmp_path / "ratio.npz")
    with pytest.raises(ValueError) as e:
        FIDStats.load(tmp_path / "stats.npz")
    assert str(e.value).startswith(f"{tmp_path / 'stats.npz'}: member 'mu.npy': {declared}")
    with pytest.raises(ValueError) as e:
        NpzPairSource(tmp_path / "pairs.npz")
    assert str(e.value).startswith(f"{tmp_path / 'pairs.npz'}: member 'images.npy': {declared}")
    # honest files read as before
    assert [(k, s, d.name) for k, s, d in files.array_headers(tmp_path / "deflated.npz")] == [("x", (64, 64), "float32")]
    np.save(tmp_path / "ok.npy", np.zeros((2, 3), np.float16))
    assert [(k, s, d.name) for k, s, d in files.array_headers(tmp_path / "ok.npy")] == [(None, (2, 3), "float16")]
