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
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn, Sequence

import ml_collections

from cmjax import cache
from cmjax.cli import HelpFormatter
from cmjax.files import printable
from cmjax.models.layers import DTYPES
from cmjax.training import NonFiniteLossError, train_and_evaluate
from cmjax.training.algorithms import ALGORITHMS
from cmjax.training.run_checkpoints import CheckpointRestoreError, CheckpointSaveError

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


def _at_least(n):
    return (lambda v: v >= n), f">= {n}"


def _above(n):
    return (lambda v: v > n), f"> {n}"


def _fraction(closed: bool):
    return ((lambda v: 0 <= v <= 1), "in [0, 1]") if closed else ((lambda v: 0 <= v < 1), "in [0, 1)")


# The bounds of the numeric fields (configs/default.py), checked on the command line before anything is
# built or compiled; besides these, every float must be finite and every other *_every / *_steps field >= 0.
BOUNDS = {
    "total_steps": _at_least(1), "curriculum_steps": _at_least(0), "batch_size": _at_least(1),
    "data.image_size": _at_least(1), "data.channels": _at_least(1), "data.worker_count": _at_least(0),
    "model.base_channels": _at_least(1), "model.num_res_blocks": _at_least(1), "model.num_groups": _at_least(1),
    "model.dropout": _fraction(False), "model.embedding_size": _at_least(1), "model.time_inputs": _at_least(1),
    "model.unet.layers_per_block": _at_least(1), "model.unet.norm_num_groups": _at_least(1),
    "model.spacing": _at_least(1), "model.t_max": _at_least(1),
    "optim.lr": _above(0), "optim.b1": _fraction(False), "optim.b2": _fraction(False), "optim.eps": _at_least(0),
    "optim.weight_decay": _at_least(0), "optim.grad_clip": _at_least(0), "optim.grad_accum_steps": _at_least(1),
    "ema_decay": _fraction(True), "ict.s0": _at_least(1), "ict.s1": _at_least(1), "ict.p_std": _above(0),
    "ct.s0": _at_least(1), "ct.s1": _at_least(1), "ct.mu0": _fraction(False), "cd.num_scales": _at_least(2),
    "cd.target_ema": _fraction(True), "edm.p_std": _above(0), "scm.sigma_data": _above(0), "scm.p_std": _above(0),
    "scm.mid_t": _above(0), "ect.p_std": _above(0), "ect.q": _above(0), "ect.c": _at_least(0),
    "ect.stage_steps": _at_least(1), "meanflow.p_std": _above(0), "meanflow.equal_fraction": _fraction(True),
    "meanflow.weight_c": _at_least(0), "sampling.sigma_max": _above(0), "sampling.mid_sigma": _above(0),
    "sampling.decoder_mid_t": _at_least(0), "fsdp_min_size": _at_least(0), "num_processes": _at_least(0),
    "log_every": _at_least(1), "checkpoint_every": _at_least(1), "keep_checkpoints": _at_least(1),
    "num_eval_images": _at_least(1), "fid_num_samples": _at_least(1), "fid_max_ref_images": _at_least(0),
}


# The named choices of the string fields; the library names them again where it uses them.
CHOICES = {
    "family": ("image", "decoder"), "algorithm": tuple(ALGORITHMS), "compute_dtype": tuple(DTYPES),
    "data.source": ("digits", "tfds", "folder", "npz"), "data.latents": ("file", "vae", "patch"),
    "model.embedding": ("fourier", "positional"), "optim.name": ("radam", "adamw", "adam"),
    "optim.schedule": ("constant", "cosine"), "ct.metric": ("l2", "l1", "pseudo_huber"),
    "cd.metric": ("l2", "l1", "pseudo_huber"),
}


def _fields(config: ml_collections.ConfigDict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_bounds(config: ml_collections.ConfigDict) -> None:
    """UsageError naming the first field whose value is out of its bounds (``BOUNDS``), not finite,
    (an unlisted ``*_every`` / ``*_steps`` field) negative, or not one of its ``CHOICES``."""
    for field, value in _fields(config):
        if field in CHOICES and value not in CHOICES[field]:
            raise UsageError(f"--config.{field}={value!r}: must be one of {', '.join(CHOICES[field])}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--config.{field}={value}: must be a finite number")
        ok, what = BOUNDS.get(field) or (_at_least(0) if field.endswith(("_every", "_steps")) else (None, ""))
        if ok is not None and not ok(value):
            raise UsageError(f"--config.{field}={value}: must be {what}")


def check_workdir(workdir: str) -> None:
    """UsageError unless ``workdir`` is a folder or can be made one (not a file, not below one)."""
    path = Path(workdir).expanduser()
    probe = path
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if os.path.lexists(probe) and not probe.is_dir():
        what = "is a file" if probe == path else f"lies below the file {probe}"
        raise UsageError(f"--workdir {workdir}: {what}, not a folder")


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
        check_bounds(config)
        check_workdir(args.workdir)
    except UsageError as e:  # one line, as every cmjax command prints an error
        print(f"{parser.prog}: error: {printable(str(e))}", file=sys.stderr)
        sys.exit(2)
    config.lock()
    return args, config


def main(argv: Sequence[str] | None = None) -> int:
    args, config = parse_args(argv)
    cache.enable_compile_cache()
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    quiet_failed_saves()
    try:
        train_and_evaluate(config, args.workdir)
    except NonFiniteLossError as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as err:  # a setting or input the library refused, named in the message
        print(f"train.py: error: {printable(str(err))}", file=sys.stderr)
        return 1
    except (CheckpointSaveError, CheckpointRestoreError) as err:
        stop_now(f"training stopped: {err}")
    return 0


def quiet_failed_saves() -> None:
    """A save that fails (a full disk) is reported as one line (``stop_now``), not as the thousands
    of traceback lines orbax and its I/O threads print on the way: orbax's ERROR records (each with
    a traceback of the error the message names) are dropped, and so are the "Event loop is closed"
    errors that tensorstore's callbacks raise into the event loop orbax has closed (Python reports
    them as unraisable: ``sys.unraisablehook``)."""
    import logging

    import orbax.checkpoint

    orbax_dir = os.path.dirname(orbax.checkpoint.__file__)
    logging.getLogger("absl").addFilter(
        lambda record: not (record.levelno >= logging.ERROR and record.pathname.startswith(orbax_dir)))
    unraisable = sys.unraisablehook

    def unraisablehook(args):
        if args.exc_type is RuntimeError and str(args.exc_value) == "Event loop is closed":
            return
        unraisable(args)

    sys.unraisablehook = unraisablehook


def stop_now(message: str) -> NoReturn:
    """``message`` as stderr's last line, then exit 1 at once. After a failed save orbax's background
    threads print tracebacks (and its asyncio futures hundreds of lines at interpreter shutdown):
    from here on they print nowhere, one already being printed gets a moment to finish (a CI run
    once showed its last line glued to the front of the message), and the message is one write of
    its own line."""
    sys.stdout.flush()
    real = sys.stderr
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the process ends below
    threading.excepthook = lambda args: None
    time.sleep(0.2)
    real.flush()
    os.write(real.fileno(), f"\n{message}\n".encode(errors="replace"))
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
