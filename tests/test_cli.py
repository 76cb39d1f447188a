"""The command lines: installation as a package, train.py's argparse front end, help texts."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmjax.cli import train as train_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.install
def test_installed_package_runs_outside_the_source_tree(tmp_path):
    """`pip install .` into a fresh venv: cmjax imports from site-packages and the console scripts
    run from a folder that is not the repository (no PYTHONPATH). --system-site-packages lends the
    venv the already installed dependencies, so nothing is downloaded (--no-deps, and the system's
    setuptools via --no-build-isolation)."""
    src = tmp_path / "src"  # a copy: pip's in-tree build writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "cmjax", src / "cmjax", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", str(src)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "elsewhere"
    out.mkdir()
    res = subprocess.run([str(python), "-c", "import cmjax, cmjax.cli.train; print(cmjax.__file__)"],
                         capture_output=True, text=True, cwd=out, env=env)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).is_relative_to(venv), res.stdout
    for script in ("cmjax-decode", "cmjax-convert", "cmjax-export", "cmjax-train", "cmjax-eval", "cmjax-edit"):
        assert (bin_dir / script).is_file(), script
    res = subprocess.run([str(bin_dir / "cmjax-convert"), "--help"], capture_output=True, text=True, cwd=out, env=env)
    assert res.returncode == 0 and "SRC" in res.stdout and "DST" in res.stdout, res.stderr
    # No configs/ here: train's help says so; a config file elsewhere still loads with its imports.
    res = subprocess.run([str(bin_dir / "cmjax-train"), "--help"], capture_output=True, text=True, cwd=out, env=env)
    assert res.returncode == 0 and "no configs/ folder found" in res.stdout, res.stderr
    res = subprocess.run([str(bin_dir / "cmjax-train"), "--config", str(ROOT / "configs" / "digits_tiny.py"),
                          "--help"], capture_output=True, text=True, cwd=out, env=env)
    assert res.returncode == 0 and "--config.total_steps=400\n" in res.stdout, res.stderr


# --------------------------------------------------------------------------------------------
# train.py's command line


def test_train_overrides_are_typed_and_unknown_fields_refused(capsys):
    args, config = train_cli.parse_args([
        "--config", str(ROOT / "configs" / "digits_tiny.py"), "--workdir", "w",
        "--config.total_steps=7", "--config.optim.lr", "0.5", "--config.tensorboard=false",
        "--config.model.channel_mult=(1,2,4)", "--config.data.name=mnist", "--config.process_id=1",
        "--config.ema_decay=1"])
    assert args.workdir == "w"
    assert config.total_steps == 7 and config.optim.lr == 0.5 and config.tensorboard is False
    assert config.model.channel_mult == (1, 2, 4) and config.data.name == "mnist" and config.process_id == 1
    assert isinstance(config.ema_decay, float) and config.ema_decay == 1.0
    assert config.batch_size == 64  # the file's value, untouched
    with pytest.raises(AttributeError):  # locked: the trainer cannot add fields by mistake either
        config.new_field = 1
    cases = {"--config.nope=1": "unknown field 'nope' in the config",
             "--config.ict.s9=1": "unknown field 's9' in ict (fields: huber_c, p_mean, p_std, s0, s1)",
             "--config.seed=abc": "--config.seed=abc: not a valid int",
             "--config.tensorboard=maybe": "not a valid bool",
             "--config.optim=3": "--config.optim is a group of fields",
             "--config.seed": "missing value"}
    for arg, message in cases.items():
        with pytest.raises(SystemExit) as e:
            train_cli.parse_args(["--config", str(ROOT / "configs" / "digits_tiny.py"), "--workdir", "w", arg])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (arg, err)
    with pytest.raises(SystemExit) as e:
        train_cli.parse_args(["--config", "configs/none.py", "--workdir", "w"])
    assert e.value.code == 2 and "configs/none.py: no such file" in capsys.readouterr().err


def test_train_help_lists_configs_and_fields(capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "digits_tiny.py" in out and "cifar10_ict.py" in out
    assert "--config.total_steps=400000" in out and "--config.ict.s1=1280" in out  # configs/default.py
    assert "--config.curriculum_steps=0" in out and "'None'" not in out
    with pytest.raises(SystemExit) as e:  # with a config: that file's values
        train_cli.parse_args(["--config", str(ROOT / "configs" / "digits_tiny.py"), "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--config.total_steps=400\n" in out and "--config.ict.s1=160\n" in out


def test_train_py_help_exits_zero_in_a_fresh_process():
    res = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "--config FILE" in res.stdout and "--config.batch_size=1024" in res.stdout


# --------------------------------------------------------------------------------------------
# Help texts: every option has a line, and its default unless it has none


def _parsers():
    import cmjax.cli.convert as convert_cli
    import cmjax.cli.edit
    import cmjax.cli.eval
    import cmjax.cli.export

    out = {"convert": convert_cli._parser(), "export": cmjax.cli.export.parser(), "edit": cmjax.cli.edit.parser(),
           "train": train_cli._parser()}
    eval_parser = cmjax.cli.eval.parser()
    sub = next(a for a in eval_parser._actions if isinstance(a, argparse._SubParsersAction))
    out.update({f"eval {name}": p for name, p in sub.choices.items()})
    return out


def test_every_option_has_help_with_its_default():
    from cmjax.cli import HelpFormatter

    for name, parser in _parsers().items():
        formatter = HelpFormatter(parser.prog)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._expand_help(action)
            assert action.help and text.strip(), (name, action.dest)
            if action.default is not None and action.default is not False:
                assert "default" in text, (name, action.dest, text)
            if action.default is not None and not isinstance(action.default, bool) and "(default:" in text:
                assert f"(default: {action.default})" in text, (name, action.dest, text)


def test_help_exits_zero_and_says_what_each_command_needs(capsys):
    import cmjax.cli.edit
    import cmjax.cli.eval

    def help_of(main, argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        return " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width

    out = help_of(cmjax.cli.eval.main, ["fid", "--help"])
    assert "--num-samples NUM_SAMPLES samples drawn for each FID (default: 10000)" in out
    assert "--sample-batch-size SAMPLE_BATCH_SIZE samples drawn per call (global) (default: 250)" in out
    assert "--seed SEED sampling seed (default: 0)" in out
    assert "--steps STEPS sampling steps (default 1, unlike decode.py's 2 and edit's 10)" in out
    out = help_of(cmjax.cli.edit.main, ["--help"])
    assert "TASK (see cmjax.editing):" in out and "--steps STEPS noise levels of the iterative tasks (default 10;" in out
    for markup in (":mod:", ":func:", "``"):
        assert markup not in out
        assert markup not in help_of(cmjax.cli.eval.main, ["--help"])


def test_plain_text_strips_sphinx_markup():
    from cmjax.cli import plain_text

    assert plain_text("see :mod:`cmjax.editing` and :func:`~cmjax.evaluation.fid.fid`, ``--steps`` 2") == \
        "see cmjax.editing and cmjax.evaluation.fid.fid, --steps 2"


@pytest.mark.parametrize("name", ["convert", "export", "eval", "edit"])
def test_python_dash_m_modules_run_their_cli_main(name, monkeypatch, capsys):
    """``python -m cmjax.NAME`` is cmjax/cli/NAME.py's main: --help through the module exits 0 with
    that command's usage (run in this process: the subprocess runs are in the cli tier)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [f"cmjax.{name}", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"cmjax.{name}", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
