"""decode.py / cmjax-decode: the flags of batch decoding and main.

    flags -> DecodeOptions (checked; its fields are the flags: cmjax.batch_decode.options) ->
    cmjax.load_decoder / load_vae (any name or path, resolved once by cmjax.weights.hub) ->
    cmjax.batch_decode.run.run -> summary, exit status
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

import jax
import numpy as np

from cmjax import cache, parallel, tuning
from cmjax.batch_decode import inputs, outputs
from cmjax.batch_decode.options import DecodeOptions, flag_fields
from cmjax.batch_decode.run import run
from cmjax.cli import HelpFormatter, print_error, timesteps_from_flags
from cmjax.decoding import schedule
from cmjax.weights import hub
from cmjax.weights.errors import CheckpointError

DESCRIPTION = """Decode SD latents (or images, via the SD VAE) into PNGs with the consistency decoder.

    decode.py --checkpoint openai --output out latents/            # .npy/.npz/.safetensors
    decode.py --checkpoint openai --images --output out examples/    # photos, via the SD encoder
    decode.py --checkpoint openai --images --compare --vae sd-vae/ --output out examples/

Runs on every local device (and every host of a multi-host run).
"""
DEFAULT_VAE = hub.HUB_REPO  # the Hub repo bundles the SD encoder (not the GAN decoder)


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
    default = ",".join(map(str, schedule.DEFAULT_TIMESTEPS))
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int,
                       help=f"number of sampling steps (default {len(schedule.DEFAULT_TIMESTEPS)}: timesteps "
                            f"{default} for the released model)")
    steps.add_argument("--timesteps",
                       help="explicit timesteps on the model's distilled grid (16..1008 for the released "
                            f"model), e.g. {default} (default: from --steps)")
    for field in flag_fields():  # DecodeOptions' fields: their flags, defaults and help
        kw = dict(field.metadata)
        name = kw.pop("flag", "--" + field.name.replace("_", "-"))
        p.add_argument(name, dest=field.name, default=field.default, **kw)
    p.add_argument("--vae", help="SD VAE for --images: a cmjax VAE checkpoint or PyTorch weights (diffusers "
                   "AutoencoderKL folder, LDM checkpoint) (default: the SD encoder bundled with "
                   f"{DEFAULT_VAE} on the Hub; it has no GAN decoder, so --compare needs --vae)")
    p.add_argument("--coordinator",
                   help="multi-host: coordinator address host:port (default: auto-detected in a cluster)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes (default: auto-detected)")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index (default: auto-detected)")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace, num_train_timesteps: int = schedule.NUM_TRAIN_TIMESTEPS
                      ) -> DecodeOptions:
    """DecodeOptions from decode.py's flags, timesteps on the grid of a model with
    ``num_train_timesteps``; raises ValueError on bad values or combinations."""
    timesteps = timesteps_from_flags(args.timesteps, args.steps, num_train_timesteps)
    return DecodeOptions(timesteps=timesteps, **{f.name: getattr(args, f.name) for f in flag_fields()})


def main(argv: Sequence[str] | None = None) -> int:
    """decode.py: set up (multi-host, mesh, checkpoints), run, print the summary. Returns the exit status:
    0 when every input was decoded, 1 when any failed, 2 on a usage or checkpoint error."""
    args = parse_args(argv)
    cache.enable_compile_cache()
    try:
        options = options_from_args(args)
    except ValueError as e:
        print_error(e)
        return 2
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    mesh = parallel.make_mesh()
    lead = jax.process_index() == 0
    try:
        rep = parallel.replicated(mesh)
        # The params are read (and their digest checked) in the background while the program compiles; a
        # checkpoint converted on first use is decoded from memory.
        decoder = hub.start_loading_decoder(args.checkpoint, sharding=rep, progress=options.progress, report=_report)
        num_train_timesteps = decoder.config.unet.num_train_timesteps
        try:
            timesteps = timesteps_from_flags(args.timesteps, args.steps, num_train_timesteps)
            options = dataclasses.replace(options, timesteps=timesteps)
        except ValueError as e:
            raise ValueError(f"{args.checkpoint}: {e} (this model has {num_train_timesteps} training "
                             "timesteps)") from None
        vae = None
        if options.images:
            if options.compare and not args.vae:
                raise ValueError("--compare needs --vae: an SD VAE with its GAN decoder (a cmjax VAE checkpoint, "
                                 "a diffusers AutoencoderKL folder or an LDM checkpoint)")
            vae = hub.load_vae(args.vae or DEFAULT_VAE, sharding=rep, progress=options.progress, report=_report)
            if options.compare and "decoder" not in vae.parts:
                raise ValueError(f"--compare needs the SD GAN decoder, and {args.vae} holds only the encoder")
            if vae.config.latent_channels != decoder.config.latent_channels:
                raise ValueError(f"--vae {args.vae or DEFAULT_VAE}: its encoder makes {vae.config.latent_channels}-channel "
                                 f"latents, and the decoder {args.checkpoint} reads {decoder.config.latent_channels}")
        lowering, why = tuning.default_plan()
        options = dataclasses.replace(options, lowering=lowering)
        problem = outputs.check_writable(options.output)
        if problem is not None:
            raise ValueError(f"--output {inputs.display(options.output)}: cannot write there: {problem}")
    except (ValueError, OSError, ImportError) as e:
        print_error(e)
        return 2
    if lead:
        print(f"{jax.device_count()} device(s) on {jax.process_count()} host(s); timesteps "
              f"{options.timesteps}; {options.dtype}", file=sys.stderr)
        if not options.tune:
            print(why, file=sys.stderr)
    try:
        summary = run(decoder, args.inputs, options, mesh=mesh, vae=vae)
    except CheckpointError as e:  # the params, read in the background, were unreadable or modified
        print_error(e)
        return 2
    if lead:
        if summary.psnr:
            means = {k: float(np.mean(v)) for k, v in summary.psnr.items()}
            print(f"mean PSNR over this host's images: SD GAN decoder {means['gan']:.2f} dB, "
                  f"consistency decoder {means['consistency']:.2f} dB")
        print(summary.line())
    return 1 if summary.failed else 0
