"""The error every weights reader raises for a file or directory it cannot read, and the one
guarded JSON parser for the JSON inside untrusted files (cmjax.json, config.json, safetensors headers).

One class for the TorchScript/pickle reader, safetensors and cmjax checkpoint directories, so a
caller catches one thing; the message always names the path and the problem.
"""
from __future__ import annotations

import json
from typing import Any, Callable


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read; the message names the path and the problem."""


def parse_json(text: str | bytes, where: str, error: type[Exception] = CheckpointError, *,
               object_pairs_hook: Callable | None = None) -> Any:
    """``json.loads(text)``, or ``error("WHERE: invalid JSON (...)")`` in one line: bad syntax, bad
    UTF-8, an integer too long to convert, or nesting deep enough to exhaust the recursion limit."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int over 4300 digits
        raise error(f"{where}: invalid JSON ({e})") from e
    except RecursionError:
        raise error(f"{where}: invalid JSON (nested too deeply)") from None
