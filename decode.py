"""Decode SD latents (or images, via the SD VAE) into PNGs with the consistency decoder.

    python decode.py --checkpoint openai --output out latents/            # .npy/.npz/.safetensors
    python decode.py --checkpoint openai --images --output out examples/    # photos, via the SD encoder
    python decode.py --checkpoint openai --images --compare --vae sd-vae/ --output out examples/

Runs on every local device (and every host of a multi-host run); see cmjax/batch_decode.py.
"""
from __future__ import annotations

import argparse
import sys

from cmjax import batch_decode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="latent files (.npy, .npz, .safetensors; 3-D or 4-D batches), folders or globs")
    p.add_argument("--checkpoint", required=True, help="cmjax decoder checkpoint folder, or a name such as 'openai'")
    p.add_argument("--output", required=True, help="folder for the PNGs (created)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="number of sampling steps (default 2: timesteps 1008,512)")
    steps.add_argument("--timesteps", help="explicit timesteps on the grid 16..1008, e.g. 1008,512")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (rounded up to a multiple of the devices)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="images each device decodes at once (default 1): more can be faster on small images; "
                        "pixels depend on this, never on --batch-size or the device/host count")
    p.add_argument("--seed", type=int, default=0, help="noise seed; same seed + same input = same image")
    p.add_argument("--dtype", choices=sorted(batch_decode.DTYPES), default="fp32", help="compute dtype")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                   help="clamp to [-1, 1] after every step (OpenAI; --no-clip: diffusers)")
    p.add_argument("--layout", choices=["nchw", "nhwc"],
                   help="force the latent layout (default: detected by the 4-channel axis)")
    p.add_argument("--save-npy", action="store_true", help="also write the float image (H, W, 3) in [-1, 1] as .npy")
    p.add_argument("--skip-existing", action="store_true", help="skip inputs whose outputs exist (resume a run)")
    p.add_argument("--tile", type=int, help="decode in overlapping tiles of this many latents (large images)")
    p.add_argument("--tile-overlap", type=int, help="tile overlap in latents (default tile // 4)")
    p.add_argument("--images", action="store_true", help="inputs are images: encode with the SD VAE, then decode")
    p.add_argument("--compare", action="store_true",
                   help="with --images: also write input | SD GAN decoder | consistency decoder, and PSNRs")
    p.add_argument("--vae", help="SD VAE for --images: a cmjax VAE checkpoint or PyTorch weights (diffusers "
                   "AutoencoderKL folder, LDM checkpoint); default: the SD encoder bundled with "
                   f"{batch_decode.DEFAULT_VAE} on the Hub (no GAN decoder: --compare needs --vae)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port (default: auto-detect)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(batch_decode.main(parse_args()))
