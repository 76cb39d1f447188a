"""decode.py against hostile inputs and flags (issue 9's decode side): each is refused cleanly.

A clean refusal: exit status 1 (an input) or 2 (a flag or checkpoint), one ``error:`` line naming
the file or flag and the problem, no traceback, no partial output, and every other input decoded.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cmjax
from cmjax.decoding.batch import inputs, program
from cmjax.cli import decode as decode_cmd
from tests.random_decoder import TINY, random_decoder
from tests.decode_runs import cli_args, run_main

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
    """Reading a FIFO blocks for ever and /dev/zero never ends: both are refused by name, unread."""
    (tmp_path / "in").mkdir()
    os.mkfifo(tmp_path / "in" / "pipe.npy")
    np.save(tmp_path / "in" / "ok.npy", np.zeros((2, 3, 4), np.float32))
    sources, errors = inputs.discover([str(tmp_path / "in"), str(tmp_path / "in" / "pipe.npy"), "/dev/zero"],
                                      inputs.LATENT_SUFFIXES)
    assert [s.rel for s in sources] == ["ok.npy"]
    assert errors == [f"{tmp_path / 'in' / 'pipe.npy'}: not a regular file or folder",
                      "/dev/zero: not a regular file or folder"]


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
    args = argparse.Namespace(timesteps=None, steps=None)
    assert decode_cmd.timesteps_from_args(args, 64) == (63, 32)
    assert decode_cmd.timesteps_from_args(args) == (1008, 512)
