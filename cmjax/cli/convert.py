"""python -m cmjax.convert SRC DST: PyTorch consistency-decoder (or SD VAE) weights -> cmjax checkpoint.

SRC is recognised by its content, and what was recognised is printed:

  openai                       download OpenAI's decoder.pt (SHA-256 verified, cached), convert it
  openai/consistency-decoder   download the diffusers weights from the Hugging Face Hub, convert them
  a folder or file             a diffusers ConsistencyDecoderVAE / UNet2DModel folder or its
                               safetensors; OpenAI's decoder.pt (TorchScript); the extracted
                               consistency_decoder.safetensors (+ embedding.safetensors beside it);
                               a torch.save pickle with OpenAI or diffusers names; an SD VAE
                               (diffusers AutoencoderKL folder, LDM .ckpt/.safetensors)

Pickles are read without torch and without running their code. Nothing is written to DST unless
the whole conversion succeeds.
"""
from __future__ import annotations

import argparse
import sys

import jax

from cmjax import cache
from cmjax.cli import HelpFormatter, error_status
from cmjax.weights.hub import NAMES, convert_checkpoint
from cmjax.weights.mapping import ConversionError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cmjax.convert", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("src", metavar="SRC", help=f"a checkpoint file or folder, or a name: {', '.join(NAMES)}")
    parser.add_argument("dst", metavar="DST", help="the cmjax checkpoint directory to create")
    parser.add_argument("--kind", choices=("decoder", "vae"), help="convert SRC as this instead of what it is "
                        "recognised as (e.g. --kind vae takes the SD encoder out of a ConsistencyDecoderVAE)")
    parser.add_argument("--keep-dtype", action="store_true", help="store fp16/bf16 weights as they are "
                        "(default: upcast to float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it is a cmjax checkpoint (never SRC, a "
                        "folder holding SRC, a folder with other files or a symbolic link)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors and the result")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cache.enable_compile_cache()

    def report(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        model = convert_checkpoint(args.src, args.dst, kind=args.kind, keep_dtype=args.keep_dtype,
                                   overwrite=args.overwrite, progress=not args.quiet, report=report)
    except (ConversionError, ValueError, OSError) as e:
        return error_status(e)
    leaves = jax.tree.leaves(model.params)
    n = sum(x.size for x in leaves)
    dtypes = "/".join(sorted({str(x.dtype) for x in leaves}))
    if hasattr(model.config, "unet"):
        what = f"consistency decoder, channels {model.config.unet.block_out_channels}"
    else:
        what = f"SD VAE ({'+'.join(model.parts)}), channels {model.config.block_out_channels}"
    print(f"wrote {args.dst}: {what}, {n:,} params ({dtypes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
