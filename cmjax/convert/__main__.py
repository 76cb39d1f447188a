"""python -m cmjax.convert SRC DST: PyTorch consistency-decoder weights -> cmjax checkpoint."""
from __future__ import annotations

import argparse
import sys

import jax

from cmjax.convert import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmjax.convert", description=__doc__)
    parser.add_argument("src", help="a diffusers ConsistencyDecoderVAE folder (config.json + "
                        "diffusion_pytorch_model[.fp16].safetensors) or the safetensors file itself")
    parser.add_argument("dst", help="the cmjax checkpoint directory to create")
    parser.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    args = parser.parse_args(argv)
    try:
        decoder = convert(args.src, args.dst, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(x.size for x in jax.tree.leaves(decoder.params))
    print(f"wrote {args.dst}: consistency decoder, {n:,} params, channels {decoder.config.unet.block_out_channels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
