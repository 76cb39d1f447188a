"""The command lines, one module each, all argparse: flags and ``main(argv) -> exit status``.

    decode   decode.py, cmjax-decode        latents or images -> PNGs (cmjax.batch_decode)
    train    train.py, cmjax-train          configs/*.py -> a training run (cmjax.training)
    convert  python -m cmjax.convert        PyTorch weights -> a cmjax checkpoint (cmjax.weights)
    export   python -m cmjax.export         a cmjax decoder -> a diffusers folder (cmjax.weights.to_diffusers)
    eval     python -m cmjax.eval           FID, statistics, sigma search, reconstruction (cmjax.evaluation)
    edit     python -m cmjax.edit           zero-shot editing grids (cmjax.editing)

Shared conventions: where a command writes is ``--output`` (``--out``, eval's and edit's earlier
spelling, still works: argparse takes any unique prefix of an option); a usage error exits with
status 2 in every command: argparse's own, and arguments that cannot run as given (such as an
existing DST without ``--overwrite``).

``HelpFormatter`` is the one ``--help`` style of every cmjax command: descriptions keep their line
breaks, reStructuredText markup from docstrings is shown as plain text, and every option whose
default is not None or False ends with ``(default: X)`` unless its text already gives it.
``print_error`` is how every command prints an error: ``error: MESSAGE`` on stderr, one line.
"""
from __future__ import annotations

import argparse
import re
import sys

from cmjax.decoding import schedule
from cmjax.files import printable

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :mod:`cmjax.editing` -> cmjax.editing
_LITERAL = re.compile(r"``([^`]+)``")       # ``--steps`` -> --steps


def plain_text(text: str) -> str:
    """Docstring text without Sphinx roles and double-backquoted literals."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def timesteps_from_flags(timesteps: str | None, steps: int | None = None,
                         num_train_timesteps: int = schedule.NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """The decoder's timesteps from ``--timesteps`` ("1008,512": each on the distilled grid of a
    model with ``num_train_timesteps``) or else ``--steps`` (evenly spaced; by default as many as
    ``schedule.DEFAULT_TIMESTEPS``, which they are for the released model). ValueError naming the flag."""
    if timesteps is not None:
        try:
            values = [int(t) for t in timesteps.split(",")] if timesteps.strip() else []
        except ValueError:
            raise ValueError(f"--timesteps must be comma-separated integers, got {timesteps!r}") from None
        if not values:
            example = ",".join(map(str, schedule.DEFAULT_TIMESTEPS))
            raise ValueError(f"--timesteps is empty: give at least one timestep, e.g. {example}")
        return schedule.check_timesteps(values, num_train_timesteps)
    steps = len(schedule.DEFAULT_TIMESTEPS) if steps is None else steps
    return schedule.timesteps_for_steps(steps, num_train_timesteps)


def error_status(e: Exception) -> int:
    """Print ``error: E`` (one line, :func:`print_error`) and return the exit status of a command
    that writes DST: 2 for the usage error of an existing DST without --overwrite, 1 for anything
    else (an --overwrite that is refused included)."""
    from cmjax.weights.checkpoint import DestinationExists

    print_error(e)
    return 2 if isinstance(e, DestinationExists) else 1


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _fill_text(self, text, width, indent):
        return super()._fill_text(plain_text(text), width, indent)

    def _get_help_string(self, action):
        text = plain_text(action.help or "")
        default = action.default
        if (action.option_strings and default is not None and default is not False
                and default != argparse.SUPPRESS and "default" not in text):
            text += " (default: %(default)s)"
        return text


_CONTINUATION = "\n  "  # reports that list several problems indent them on lines of their own


def print_error(error: BaseException | str) -> None:
    """``error: MESSAGE`` on stderr with unprintable characters escaped (``cmjax.files.printable``):
    a file name holding a newline or a terminal escape cannot split one error into two lines or
    recolour the terminal. Indented continuation lines of a multi-problem report are kept."""
    parts = str(error).split(_CONTINUATION)
    print("error: " + _CONTINUATION.join(printable(p) for p in parts), file=sys.stderr, flush=True)
