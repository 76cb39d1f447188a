"""Running decode.py from the tests: as a subprocess (``cli_args``, with conftest's ``env``) or in
this process (``run_main``). The tiny checkpoint and the subprocess environment are conftest's
fixtures ``ckpt`` and ``env``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cmjax.cli import decode as decode_cmd

REPO = Path(__file__).resolve().parent.parent


def cli_args(ckpt: Path, out: Path, *args) -> list[str]:
    """The command line of a decode.py subprocess (no progress bar)."""
    return [sys.executable, str(REPO / "decode.py"), "--checkpoint", str(ckpt), "--output", str(out),
            "--no-progress", *map(str, args)]


def run_main(capsys, *argv) -> tuple[int, str]:
    """decode.py's main in this process: (exit status, stderr)."""
    status = decode_cmd.main([*map(str, argv), "--no-progress"])
    return status, capsys.readouterr().err
