"""decode.py / cmjax-decode: the flags of batch decoding, their validation, and main.

    flags -> DecodeOptions (checked) -> cmjax.load_decoder / load_vae (any name or path, resolved
    once by cmjax.weights.hub) -> cmjax.decoding.batch.run.run -> summary, exit status
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from cmjax import cache, parallel
from cmjax.cli import HelpFormatter
from cmjax.decoding import schedule
from cmjax.decoding.batch import inputs, outputs, program
from cmjax.decoding.batch.run import DecodeOptions, run
from cmjax.weights import hub

DESCRIPTION = """Decode SD latents (or images, via the SD VAE) into PNGs with the consistency decoder.

    decode.py --checkpoint openai --output out latents/            # .npy/.npz/.safetensors
    decode.py --checkpoint openai --images --output out examples/    # photos, via the SD encoder
    decode.py --checkpoint openai --images --compare --vae sd-vae/ --output out examples/

Runs on every local device (and every host of a multi-host run).
"""
DEFAULT_VAE = hub.HUB_REPO  # the Hub repo bundles the SD encoder (not the GAN decoder)
DEFAULT_STEPS = 2  # 1008, 512 for the released model
SEED_RANGE = (-2 ** 63, 2 ** 63)  # what jax.random.key takes


def _report(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """decode.py's (and cmjax-decode's) command line. Every option's help states its default."""
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="latent files (.npy, .npz, .safetensors; 3-D or 4-D batches, NCHW or NHWC), folders "
                        "(searched recursively) or globs; with --images: image files "
                        f"({', '.join(inputs.IMAGE_SUFFIXES)}), folders or globs")
    p.add_argument("--checkpoint", required=True,
                   help="cmjax decoder checkpoint folder, a PyTorch checkpoint, or a name such as 'openai' (required)")
    p.add_argument("--output", required=True, help="folder for the PNGs, created if missing (required)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int,
                       help=f"number of sampling steps (default {DEFAULT_STEPS}: timesteps 1008,512 for the "
                            "released model)")
    steps.add_argument("--timesteps",
                       help="explicit timesteps on the model's distilled grid (16..1008 for the released "
                            "model), e.g. 1008,512 (default: from --steps)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="global batch, rounded up to a multiple of the devices (default 8)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="images each device decodes at once (default 1): more can be faster on small images; "
                        "pixels depend on this, never on --batch-size or the device/host count")
    p.add_argument("--seed", type=int, default=0, help="noise seed; same seed + same input = same image (default 0)")
    p.add_argument("--dtype", choices=sorted(program.DTYPES), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                   help="clamp to [-1, 1] after every step (OpenAI; --no-clip: diffusers) (default --clip)")
    p.add_argument("--layout", choices=["nchw", "nhwc"],
                   help="force the latent layout (default: detected by the 4-channel axis)")
    p.add_argument("--save-npy", action="store_true",
                   help="also write the float image (H, W, 3) in [-1, 1] as .npy (default off)")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip inputs whose outputs exist, to resume a run (default off)")
    p.add_argument("--tile", type=int,
                   help="decode in overlapping tiles of this many latents, for large images (default: untiled)")
    p.add_argument("--tile-overlap", type=int, help="tile overlap in latents (default tile // 4)")
    p.add_argument("--images", action="store_true",
                   help="inputs are images: encode with the SD VAE, then decode (default off: latents)")
    p.add_argument("--compare", action="store_true",
                   help="with --images: also write input | SD GAN decoder | consistency decoder, labelled, "
                        "and PSNRs (default off)")
    p.add_argument("--vae", help="SD VAE for --images: a cmjax VAE checkpoint or PyTorch weights (diffusers "
                   "AutoencoderKL folder, LDM checkpoint) (default: the SD encoder bundled with "
                   f"{DEFAULT_VAE} on the Hub; it has no GAN decoder, so --compare needs --vae)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr)")
    p.add_argument("--coordinator",
                   help="multi-host: coordinator address host:port (default: auto-detected in a cluster)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes (default: auto-detected)")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index (default: auto-detected)")
    return p.parse_args(argv)


def timesteps_from_args(args, num_train_timesteps: int = schedule.NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """--timesteps or --steps (default 2) as timesteps on the grid of a model with ``num_train_timesteps``."""
    if args.timesteps is not None:
        try:
            values = [int(t) for t in args.timesteps.split(",")] if args.timesteps.strip() else []
        except ValueError:
            raise ValueError(f"--timesteps must be comma-separated integers, got {args.timesteps!r}") from None
        if not values:
            raise ValueError("--timesteps is empty: give at least one timestep, e.g. 1008,512")
        return schedule.check_timesteps(values, num_train_timesteps)
    return schedule.timesteps_for_steps(DEFAULT_STEPS if args.steps is None else args.steps, num_train_timesteps)


def options_from_args(args, num_train_timesteps: int = schedule.NUM_TRAIN_TIMESTEPS) -> DecodeOptions:
    """DecodeOptions from decode.py's flags; raises ValueError on bad values or combinations."""
    timesteps = timesteps_from_args(args, num_train_timesteps)
    if not SEED_RANGE[0] <= args.seed < SEED_RANGE[1]:
        raise ValueError(f"--seed must lie in [-2**63, 2**63), got {args.seed}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    if args.tile is not None and args.tile < 1:
        raise ValueError(f"--tile must be >= 1, got {args.tile}")
    if args.tile_overlap is not None and (args.tile is None or not 0 <= args.tile_overlap < args.tile):
        raise ValueError("--tile-overlap needs --tile and must lie in [0, tile)")
    if args.compare and not args.images:
        raise ValueError("--compare needs --images")
    return DecodeOptions(output=Path(args.output), timesteps=tuple(timesteps), batch_size=args.batch_size,
                         seed=args.seed, micro_batch=args.micro_batch, dtype=args.dtype, clip_denoised=args.clip,
                         layout=args.layout, save_npy=args.save_npy, skip_existing=args.skip_existing,
                         tile=args.tile, tile_overlap=args.tile_overlap, images=args.images, compare=args.compare,
                         progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    """decode.py: set up (multi-host, mesh, checkpoints), run, print the summary. Returns the exit status:
    0 when every input was decoded, 1 when any failed, 2 on a usage or checkpoint error."""
    args = parse_args(argv)
    cache.enable_compile_cache()
    try:
        options = options_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    mesh = parallel.make_mesh()
    lead = jax.process_index() == 0
    try:
        rep = parallel.replicated(mesh)
        decoder = hub.load_decoder(args.checkpoint, sharding=rep, progress=not args.no_progress, report=_report)
        num_train_timesteps = decoder.config.unet.num_train_timesteps
        try:
            options = dataclasses.replace(options, timesteps=timesteps_from_args(args, num_train_timesteps))
        except ValueError as e:
            raise ValueError(f"{args.checkpoint}: {e} (this model has {num_train_timesteps} training "
                             "timesteps)") from None
        vae = None
        if options.images:
            if options.compare and not args.vae:
                raise ValueError("--compare needs --vae: an SD VAE with its GAN decoder (a cmjax VAE checkpoint, "
                                 "a diffusers AutoencoderKL folder or an LDM checkpoint)")
            vae = hub.load_vae(args.vae or DEFAULT_VAE, sharding=rep, progress=not args.no_progress, report=_report)
            if options.compare and "decoder" not in vae.parts:
                raise ValueError(f"--compare needs the SD GAN decoder, and {args.vae} holds only the encoder")
            if vae.config.latent_channels != decoder.config.latent_channels:
                raise ValueError(f"--vae {args.vae or DEFAULT_VAE}: its encoder makes {vae.config.latent_channels}-channel "
                                 f"latents, and the decoder {args.checkpoint} reads {decoder.config.latent_channels}")
        problem = outputs.check_writable(options.output)
        if problem is not None:
            raise ValueError(f"--output {inputs.display(options.output)}: cannot write there: {problem}")
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if lead:
        print(f"{jax.device_count()} device(s) on {jax.process_count()} host(s); timesteps "
              f"{options.timesteps}; {options.dtype}", file=sys.stderr)
    summary = run(decoder, args.inputs, options, mesh=mesh, vae=vae)
    if lead:
        if summary.psnr:
            means = {k: float(np.mean(v)) for k, v in summary.psnr.items()}
            print(f"mean PSNR over this host's images: SD GAN decoder {means['gan']:.2f} dB, "
                  f"consistency decoder {means['consistency']:.2f} dB")
        print(summary.line())
    return 1 if summary.failed else 0
