"""The commands against hostile or careless users (issue 24): what they write and what they take.

``--overwrite`` replaces only a folder cmjax wrote, never an input, a folder holding one, a folder
with other files or a symbolic link; temporary files are created exclusively, never through a
planted link; train.py refuses out-of-bounds config values and a --workdir that is a file before
anything is built.

Every refusal: exit status 1 (2 for usage), one ``error:`` line naming the file or field and why,
no traceback, and every file that was there before still there, byte for byte. The model is the
micro UNet of test_hostile.py (a diffusers UNet2DModel folder written here without torch).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmjax import files
from cmjax.batch_decode import outputs
from cmjax.cli.convert import main as convert_main
from cmjax.cli.export import main as export_main
from tests import hostile_files as hf
from tests.test_hostile import MICRO_JSON, REPO, micro_state


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def snapshot(root: Path) -> dict[str, object]:
    """Every entry below ``root``: file bytes, link targets, folders (for byte-for-byte checks)."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes()
    return out


def unet_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(MICRO_JSON))
    (path / "diffusion_pytorch_model.safetensors").write_bytes(hf.safetensors_bytes(micro_state()))
    return path


def assert_refused(capsys, status: int, root: Path, before: dict, *words: str) -> str:
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], err
    assert snapshot(root) == before, "files changed"
    return lines[0]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/ckpts/model (a UNet2DModel folder) beside root/ckpts/notes.txt; root/ckpt (a cmjax
    checkpoint of it); root/export (an export of that)."""
    root = tmp_path_factory.mktemp("writes")
    unet_folder(root / "ckpts" / "model")
    (root / "ckpts" / "notes.txt").write_text("mine\n")
    assert convert_main([str(root / "ckpts" / "model"), str(root / "ckpt"), "-q"]) == 0
    assert export_main([str(root / "ckpt"), str(root / "export")]) == 0
    return root


def test_convert_overwrite_replaces_only_a_cmjax_checkpoint(tree, tmp_path, capsys):
    src = tree / "ckpts" / "model"
    before = snapshot(tree)
    # DST is SRC; DST holds SRC (and a file of the user's)
    assert_refused(capsys, convert_main([str(src), str(src), "--overwrite", "-q"]), tree, before,
                   f"{src}: not replaced", "is the input")
    assert_refused(capsys, convert_main([str(src), str(tree / "ckpts"), "--overwrite", "-q"]), tree, before,
                   f"{tree / 'ckpts'}: not replaced", "holds the input")
    # a cmjax checkpoint inside SRC
    convert_main([str(src), str(src / "inner"), "-q"])
    capsys.readouterr()
    before = snapshot(tree)
    assert_refused(capsys, convert_main([str(src), str(src / "inner"), "--overwrite", "-q"]), tree, before,
                   "lies inside the input")
    for p in sorted((src / "inner").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (src / "inner").rmdir()
    before = snapshot(tree)
    # a folder of someone else's files; a single file; a link to a checkpoint; a checkpoint with an extra file
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("a")
    (tmp_path / "file").write_text("f")
    os.symlink(tree / "ckpt", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    cases = [(other, "holds files cmjax did not write ('a.txt')"), (tmp_path / "file", "a file, not a cmjax"),
             (tmp_path / "link", "symbolic link"), (tmp_path / "dangling", "symbolic link")]
    for dst, why in cases:
        mine = snapshot(tmp_path)
        assert_refused(capsys, convert_main([str(src), str(dst), "--overwrite", "-q"]), tree, before,
                       f"{dst}: ", why)
        assert snapshot(tmp_path) == mine
    # without --overwrite a link is refused too (not replaced, not written through)
    assert_refused(capsys, convert_main([str(src), str(tmp_path / "dangling"), "-q"]), tree, before, "symbolic link")
    assert not (tmp_path / "nowhere").exists()


def test_convert_overwrite_replaces_its_own_checkpoint(tree, tmp_path, capsys):
    src = tree / "ckpts" / "model"
    assert convert_main([str(src), str(tmp_path / "c"), "-q"]) == 0
    (tmp_path / "c" / "cmjax.json").write_text((tmp_path / "c" / "cmjax.json").read_text().replace("(8, 8)", "x"))
    assert convert_main([str(src), str(tmp_path / "c"), "--overwrite", "-q"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary or moved-aside folder left
    assert sorted(os.listdir(tmp_path / "c")) == ["cmjax.json", "params"]
    (tmp_path / "c" / "README").write_text("notes")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert_refused(capsys, convert_main([str(src), str(tmp_path / "c"), "--overwrite", "-q"]), tmp_path, before,
                   "holds files cmjax did not write ('README')")
    # a folder with only a cmjax.json that is not one (no format field)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cmjax.json").write_text("{}")
    before = snapshot(tmp_path)
    assert_refused(capsys, convert_main([str(src), str(tmp_path / "d"), "--overwrite", "-q"]), tmp_path, before,
                   "not a cmjax checkpoint")


def test_names_with_newlines_are_one_line(tree, tmp_path, capsys):
    """A newline or terminal escape in a file name cannot split an error in two (or recolour the terminal)."""
    odd = tmp_path / "new\nline\x1b[31m"
    unet_folder(odd)
    (odd / "config.json").write_text("{")
    for main, extra in ((convert_main, ["-q"]), (export_main, [])):
        status = main([str(odd), str(tmp_path / "dst"), *extra])
        err = capsys.readouterr().err
        assert status == 1 and err.count("\n") == 1 and "\x1b" not in err, err
        assert str(tmp_path / "new\\nline\\x1b[31m") in err, err
    assert not (tmp_path / "dst").exists()


def test_export_overwrite_replaces_only_its_own_export(tree, tmp_path, capsys):
    ckpt, src = tree / "ckpt", tree / "ckpts" / "model"
    before = snapshot(tree)
    assert_refused(capsys, export_main([str(ckpt), str(ckpt), "--overwrite"]), tree, before, "is the input")
    assert_refused(capsys, export_main([str(ckpt), str(tree), "--overwrite"]), tree, before, "holds the input")
    # a cmjax checkpoint and a diffusers folder written by someone else are not exports
    assert_refused(capsys, export_main([str(ckpt), str(tree / "ckpt"), "--overwrite"]), tree, before)
    assert_refused(capsys, export_main([str(ckpt), str(src), "--overwrite"]), tree, before,
                   f"{src}: not replaced", "not a diffusers folder exported by cmjax")
    # the encoder source is an input too
    assert_refused(capsys, export_main([str(ckpt), str(tree / "export"), "--encoder-from", str(tree / "export"),
                                        "--overwrite"]), tree, before, "is the input")
    os.symlink(tree / "export", tmp_path / "link")
    assert_refused(capsys, export_main([str(ckpt), str(tmp_path / "link"), "--overwrite"]), tree, before,
                   "symbolic link")
    # its own export is replaced
    assert export_main([str(ckpt), str(tmp_path / "e")]) == 0
    assert sorted(os.listdir(tmp_path / "e")) == ["cmjax-export.json", "config.json",
                                                  "diffusion_pytorch_model.safetensors"]
    assert export_main([str(ckpt), str(tmp_path / "e"), "--overwrite", "--dtype", "float16"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["e", "link"]


def test_temporary_files_are_exclusive_and_never_followed(tmp_path):
    """A link planted at an output's name, or at the name its temporary would have had, redirects
    nothing: the temporary has an unpredictable name, is created with O_EXCL (an existing name is
    never opened), and the rename replaces a link at the output name instead of following it."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep")
    os.symlink(outside / "victim", out / "a.png")
    for guess in (f".a.png.tmp-{socket.gethostname()}-{os.getpid()}", f".a.png{files.TMP_MARK}"):
        os.symlink(outside / "victim", out / guess)
    before = snapshot(outside)
    image = np.zeros((4, 5, 3), np.uint8)
    outputs.write_png(out / "a.png", image)
    outputs.write_npy(out / "a.npy", np.zeros((2, 2), np.float32))
    assert snapshot(outside) == before
    assert not (out / "a.png").is_symlink() and (out / "a.png").read_bytes().startswith(b"\x89PNG")
    assert np.load(out / "a.npy").shape == (2, 2)
    assert oct((out / "a.png").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600
    assert sorted(os.listdir(out)) == sorted(["a.png", "a.npy", f".a.png.tmp-{socket.gethostname()}-{os.getpid()}",
                                              f".a.png{files.TMP_MARK}"])
    names = {files.create_temp(out / "b.png")[1].name for _ in range(3)}
    assert len(names) == 3 and all(files.temp_pid(n) == os.getpid() for n in names)
    # a write that fails leaves nothing behind, and the old file untouched
    with pytest.raises(ZeroDivisionError):
        files.atomic_write(out / "a.npy", lambda f: 1 / 0)
    assert np.load(out / "a.npy").shape == (2, 2) and len(os.listdir(out)) == 4 + 3


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / f".x.png{files.TMP_MARK}{host}-{dead}-abc123"
    stale.write_bytes(b"partial")
    alive = tmp_path / f".y.png{files.TMP_MARK}{host}-{os.getpid()}-abc123"
    alive.write_bytes(b"being written")
    other_host = tmp_path / f".z.png{files.TMP_MARK}otherhost-{dead}-abc123"
    other_host.write_bytes(b"theirs")
    (tmp_path / f".d{files.TMP_MARK}{host}-{dead}-abc123").mkdir()  # a folder under such a name: not ours
    (tmp_path / "victim").write_bytes(b"keep")
    os.symlink(tmp_path / "victim", tmp_path / f".l{files.TMP_MARK}{host}-{dead}-abc123")
    assert outputs.remove_stale_temps(tmp_path) == 1  # regular files only: not the folder, not the link
    assert not stale.exists() and alive.exists() and other_host.exists()
    assert (tmp_path / "victim").read_bytes() == b"keep"
    assert (tmp_path / f".l{files.TMP_MARK}{host}-{dead}-abc123").is_symlink()


def test_output_names_too_long_are_found_before_writing(tmp_path):
    limits = outputs.name_limits(tmp_path)
    assert limits[0] >= 14
    ok = tmp_path / ("x" * limits[0])
    assert outputs.name_problem(ok, tmp_path, limits) is None
    why = outputs.name_problem(tmp_path / "d" / ("x" * (limits[0] + 1)), tmp_path, limits)
    assert why == f"the output name is {limits[0] + 1} bytes, and this file system takes at most {limits[0]}"
    # bytes, not characters: 'é' is two
    assert outputs.name_problem(tmp_path / ("é" * (limits[0] // 2 + 1)), tmp_path, limits) is not None


# --------------------------------------------------------------------------------------------
# train.py: config values and --workdir, checked before anything is built


@pytest.mark.parametrize("override, message", [
    ("--config.batch_size=-1", "--config.batch_size=-1: must be >= 1"),
    ("--config.batch_size=0", "--config.batch_size=0: must be >= 1"),
    ("--config.log_every=0", "--config.log_every=0: must be >= 1"),
    ("--config.checkpoint_every=-5", "--config.checkpoint_every=-5: must be >= 1"),
    ("--config.sample_every=-1", "--config.sample_every=-1: must be >= 0"),
    ("--config.optim.warmup_steps=-1", "--config.optim.warmup_steps=-1: must be >= 0"),
    ("--config.optim.lr=nan", "--config.optim.lr=nan: must be a finite number"),
    ("--config.optim.lr=inf", "--config.optim.lr=inf: must be a finite number"),
    ("--config.optim.lr=-0.001", "--config.optim.lr=-0.001: must be > 0"),
    ("--config.ema_decay=1.5", "--config.ema_decay=1.5: must be in [0, 1]"),
    ("--config.ict.p_std=-inf", "--config.ict.p_std=-inf: must be a finite number"),
    ("--config.total_steps=0", "--config.total_steps=0: must be >= 1"),
    ("--config.compute_dtype=fp64", "--config.compute_dtype='fp64': must be one of float32, fp32, bfloat16"),
    ("--config.optim.name=sgd", "--config.optim.name='sgd': must be one of radam, adamw, adam"),
])
def test_train_config_bounds_are_checked_first(override, message, tmp_path, capsys):
    from cmjax.cli import train as train_cli

    with pytest.raises(SystemExit) as e:
        train_cli.parse_args(["--config", str(REPO / "configs" / "digits_tiny.py"), "--workdir",
                              str(tmp_path / "w"), override])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"train.py: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()


def test_train_workdir_that_is_a_file_and_every_shipped_config(tmp_path):
    """A subprocess, as a user runs it: one line, exit 2, the file untouched; and every config in
    configs/ is within the bounds."""
    from cmjax.cli import train as train_cli

    (tmp_path / "file").write_bytes(b"mine")
    for workdir, what in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "lies below the file")):
        res = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "digits_tiny.py"),
                              "--workdir", str(workdir)], capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr == f"train.py: error: --workdir {workdir}: {what}" + (
            f" {tmp_path / 'file'}" if "below" in what else "") + ", not a folder\n", res.stderr
    assert (tmp_path / "file").read_bytes() == b"mine"
    # a value only the library can judge: its message, one line, exit 1
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "digits_tiny.py"),
                          "--workdir", str(tmp_path / "w"), "--config.prng_impl=nope"], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("train.py: error: ") and "nope" in res.stderr and res.stderr.count("\n") == 1
    for path in sorted((REPO / "configs").glob("*.py")):
        if path.name != "__init__.py":
            train_cli.check_bounds(train_cli.load_config_file(path))


def test_nonfinite_loss_without_a_checkpoint_says_so():
    """The NaN stop message names the last good checkpoint only when there is one."""
    from cmjax.training import loop

    class Manager:
        directory = "run/checkpoints"

        def __init__(self, latest):
            self.latest = latest

        def wait_until_finished(self):
            pass

        def latest_step(self):
            return self.latest

    with pytest.raises(loop.NonFiniteLossError) as e:
        loop._check_finite(3, {"loss": float("nan")}, Manager(None))
    assert "no checkpoint had been saved yet in run/checkpoints" in str(e.value)
    assert "step None" not in str(e.value) and "intact" not in str(e.value)
    with pytest.raises(loop.NonFiniteLossError) as e:
        loop._check_finite(3, {"loss": float("inf")}, Manager(2))
    assert "the last good checkpoint (step 2) in run/checkpoints is intact" in str(e.value)


_FULL_DISK = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
from cmjax.cli import convert, export
sys.exit((convert if sys.argv[1] == "convert" else export).main(sys.argv[2:]))
"""


def test_writes_onto_a_full_disk_are_one_line(tree, tmp_path):
    """orbax (convert) and safetensors (export) failing to write: one line naming DST and the
    reason, none of orbax's thread tracebacks or absl logs, nothing left behind."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    for command, src in (("convert", tree / "ckpts" / "model"), ("export", tree / "ckpt")):
        dst = tmp_path / command
        quiet = ["-q"] if command == "convert" else []
        res = subprocess.run([sys.executable, "-c", _FULL_DISK, command, str(src), str(dst), *quiet], capture_output=True,
                             text=True, env=env, timeout=300)
        assert res.returncode == 1, res.stderr
        assert res.stderr.startswith(f"error: {dst}: cannot write the {'checkpoint' if command == 'convert' else 'export'}, "
                                     "nothing was written (") and "File too large" in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert os.listdir(tmp_path) == []
