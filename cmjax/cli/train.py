"""cmjax-train / train.py: train a consistency model (or its EDM teacher) with cmjax.training.

    python train.py --config configs/digits_tiny.py --workdir runs/digits [--config.a.b=VALUE ...]

A config file is a Python file whose ``get_config()`` returns an ml_collections ConfigDict (see
configs/default.py for every field). ``--config.a.b=VALUE`` (or ``--config.a.b VALUE``) overrides
one field; the value is parsed to the field's type (``True``/``false`` for booleans, a Python
literal such as ``(1,2)`` for tuples) and a field the config does not have is refused. Running the
same command again resumes from the latest checkpoint in --workdir.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
from pathlib import Path
from typing import Sequence

import ml_collections

from cmjax import cache
from cmjax.cli import HelpFormatter
from cmjax.training import NonFiniteLossError, train_and_evaluate
from cmjax.training.checkpointing import CheckpointRestoreError, CheckpointSaveError

_PREFIX = "--config."
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class UsageError(ValueError):
    """A bad command line: the message is printed as ``train.py: error: ...`` (exit status 2)."""

def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """``get_config()`` of a Python config file.

    The folder above the file's package is put on ``sys.path`` first (as Python does for a
    script's folder), so ``configs/digits_tiny.py`` can ``from configs import default`` when run
    from anywhere.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    root = path.resolve().parent
    while (root / "__init__.py").is_file():
        root = root.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location(f"_cmjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(f"--config {path}: the file defines no get_config()")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(f"--config {path}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def parse_value(text: str, kind: type, field: str):
    """``text`` as a value of type ``kind`` (the field's type), or UsageError naming the field."""
    try:
        if kind is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError("expected true or false")
        if kind is str:
            return text
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        value = ast.literal_eval(text)
        if kind in (tuple, list):
            value = kind(value) if isinstance(value, (tuple, list)) else kind((value,))
        return value
    except (ValueError, SyntaxError) as e:
        raise UsageError(f"--config.{field}={text}: not a valid {kind.__name__} ({e})") from None


def apply_override(config: ml_collections.ConfigDict, field: str, text: str) -> None:
    """Set ``config.<field>`` (dotted path) from the command-line string ``text``."""
    node, parts = config, field.split(".")
    for i, key in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            where = ".".join(parts[:i]) or "the config"
            known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
            raise UsageError(f"--config.{field}: unknown field {key!r} in {where} (fields: {known})")
        if i < len(parts) - 1:
            node = node[key]
    key = parts[-1]
    if isinstance(node[key], ml_collections.ConfigDict):
        raise UsageError(f"--config.{field} is a group of fields; set one of them "
                         f"({', '.join(sorted(node[key].keys()))})")
    value = parse_value(text, node.get_type(key), field)
    try:
        node[key] = value
    except TypeError as e:
        raise UsageError(f"--config.{field}={text}: {e}") from None


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate ``--config.a.b=VALUE`` / ``--config.a.b VALUE`` from the other arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(_PREFIX):
            field, eq, value = arg[len(_PREFIX):].partition("=")
            if not eq:
                if i + 1 == len(argv):
                    raise UsageError(f"{arg}: missing value (use {arg}=VALUE)")
                i, value = i + 1, argv[i + 1]
            overrides.append((field, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def configs_dir() -> Path | None:
    """The ``configs/`` folder: the working directory's, else the one beside the cmjax package."""
    for candidate in (Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"):
        if (candidate / "default.py").is_file():
            return candidate
    return None


def describe_config(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """``  --config.a.b=DEFAULT`` lines, one per field, in the config's own order."""
    lines = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            lines += describe_config(value, f"{prefix}{key}.")
        else:
            lines.append(f"  --config.{prefix}{key}={value!r}")
    return lines


def help_epilog(config_path: str | None) -> str:
    """The configs in configs/ and every config field with its default (or with the values of
    ``config_path`` when one is given)."""
    folder = configs_dir()
    lines = []
    if folder is not None:
        names = sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py")
        lines += [f"configs in {folder}:", "  " + "  ".join(names), ""]
    source = config_path or (folder / "default.py" if folder is not None else None)
    if source is None:
        return "\n".join(lines + ["(no configs/ folder found: pass --config FILE --help to list its fields)"])
    try:
        config = load_config_file(source)
    except Exception as e:  # --help should still print; say why the fields are missing
        return "\n".join(lines + [f"(cannot list the fields of {source}: {e})"])
    lines.append(f"config fields and their values in {source} (override any with --config.FIELD=VALUE):")
    return "\n".join(lines + describe_config(config))


def _parser(epilog: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, epilog=epilog,
                                formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE",
                   help="Python config file with get_config() (e.g. configs/digits_tiny.py); no default")
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="run folder: checkpoints/, samples/, metrics.jsonl, tensorboard/ (created; "
                        "resumed if it holds a checkpoint); no default")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """(args, config with the overrides applied); exits with status 2 on a bad command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_overrides(argv)
    except UsageError as e:
        _parser().error(str(e))
    if "-h" in rest or "--help" in rest:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        _parser(help_epilog(pre.parse_known_args(rest)[0].config)).print_help()
        sys.exit(0)
    parser = _parser()
    args = parser.parse_args(rest)
    try:
        config = load_config_file(args.config)
        for field, value in overrides:
            apply_override(config, field, value)
    except UsageError as e:
        parser.error(str(e))
    config.lock()
    return args, config


def main(argv: Sequence[str] | None = None) -> int:
    args, config = parse_args(argv)
    cache.enable_compile_cache()
    from absl import logging as absl_logging


    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    try:
        train_and_evaluate(config, args.workdir)
    except NonFiniteLossError as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 3
    except (CheckpointSaveError, CheckpointRestoreError) as err:
        print(f"training stopped: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Exit now: after a failed save, orbax's background threads and asyncio futures print
        # hundreds of lines of tracebacks at interpreter shutdown.
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
