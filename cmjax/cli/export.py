"""``python -m cmjax.export CKPT DST`` / cmjax-export: the flags of :mod:`cmjax.weights.to_diffusers`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cmjax import cache
from cmjax.cli import HelpFormatter, error_status
from cmjax.files import read_small
from cmjax.weights import checkpoint, to_diffusers
from cmjax.weights.mapping import ConversionError


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m cmjax.export``."""
    parser = argparse.ArgumentParser(prog="python -m cmjax.export", description=to_diffusers.__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("ckpt", metavar="CKPT", help="a cmjax decoder checkpoint directory")
    parser.add_argument("dst", metavar="DST", help="the diffusers folder to create")
    parser.add_argument("--encoder-from", metavar="SRC", help="SD encoder weights: a diffusers "
                        "ConsistencyDecoderVAE folder, a cmjax VAE checkpoint or an SD VAE checkpoint; "
                        "without it only the UNet is written (a UNet2DModel folder)")
    parser.add_argument("--dtype", choices=sorted(to_diffusers.DTYPES), default="float32", help="dtype of the written "
                        "weights (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it is a folder cmjax exported "
                        "(never CKPT, a folder holding it, a folder with other files or a symbolic link)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cache.enable_compile_cache()

    def report(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        to_diffusers.export_decoder(args.ckpt, args.dst, encoder_from=args.encoder_from, dtype=args.dtype,
                                    overwrite=args.overwrite, report=report)
    except (ConversionError, ValueError, OSError) as e:
        return error_status(e)
    if args.encoder_from is None:
        _hint_encoder(Path(args.ckpt))
    return 0


def _hint_encoder(ckpt: Path) -> None:
    """If the checkpoint was converted from a ConsistencyDecoderVAE folder still on disk, say so."""
    try:
        source = Path(json.loads(read_small(ckpt / checkpoint.CONFIG_FILE)).get("source", ""))
        folder = source if source.is_dir() else source.parent
        cfg = json.loads(read_small(folder / "config.json"))
    except (OSError, ValueError, TypeError):
        return
    if cfg.get("_class_name") == "ConsistencyDecoderVAE":
        print(f"hint: {folder} has the SD encoder: --encoder-from {folder} writes a full ConsistencyDecoderVAE",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
