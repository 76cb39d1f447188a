"""The error for a checkpoint file or directory that cannot be read, and the one guarded JSON
parser for the JSON inside untrusted files (cmjax.json, config.json, safetensors headers).

:class:`CheckpointError` is what the PyTorch reader (torch_pickle.py and its torch_* modules) and
the cmjax checkpoint directories (checkpoint.py) raise, so a caller of either catches one thing;
the message always names the path and the problem. The other errors of weights/ say something
else and are defined where they belong: ``ConversionError`` (mapping.py, raised by every
converter: weights or names that do not fit the model, malformed safetensors headers and
diffusers configs), ``ExportError`` (export.py: a checkpoint that cannot take the requested diffusers
form), ``DownloadError`` (hub.py, an OSError: a download failed or did not verify) and
``InceptionWeightsError`` (inception.py, a FileNotFoundError: the FID weights are not there).
"""
from __future__ import annotations

import json
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read; the message names the path and the problem."""


class _DuplicateKey(Exception):  # not a ValueError: parse_json's handler below must not take it for bad syntax
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_json(text: str | bytes, where: str, error: type[Exception] = CheckpointError) -> Any:
    """``json.loads(text)``, or ``error("WHERE: invalid JSON (...)")`` in one line: bad syntax, bad
    UTF-8, an integer too long to convert, nesting deep enough to exhaust the recursion limit, or a
    key given twice in one object (json.loads would keep the last silently; a reader that keeps the
    first, like some safetensors and config readers, would see another file)."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise error(f"{where}: invalid JSON (key {str(e.args[0])[:80]!r} appears twice in one object)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int over 4300 digits
        raise error(f"{where}: invalid JSON ({e})") from e
    except RecursionError:
        raise error(f"{where}: invalid JSON (nested too deeply)") from None
