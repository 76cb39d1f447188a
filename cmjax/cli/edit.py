"""Zero-shot editing with a trained image CM; writes before/after PNG grids.

    python -m cmjax.edit TASK --checkpoint WORKDIR [--images SRC] [--output DIR] [options]

TASK (see :mod:`cmjax.editing`):
    inpaint      regenerate a region: --mask center|left|right|top|bottom|random, or --mask-file PNG
                 (white = generate); grid columns: input | known pixels | result
    colorize     keep the luma, generate colour (3-channel models); input | gray | result
    superres     keep every --patch x --patch mean; input | low-res (nearest) | result
    denoise      add noise of --sigma to the input, then one step; input | noisy | result
    interpolate  one-step samples along the slerp between two noises (--alphas points; no --images)
    stroke       SDEdit-like: --images are stroke paintings, noised to --sigma-start, then --steps
                 steps down; strokes | result

WORKDIR is a train.py run of the image family (EMA params of the latest checkpoint, or
--ckpt-step). --images: an image folder, tfds:NAME[:SPLIT] or 'digits' (resized and center-cropped
to the model's size, converted to its channels). The iterative tasks run --steps noise levels of
the Karras grid from sigma_max (or --sigmas).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmjax import cache, editing
from cmjax import consistency as C
from cmjax.cli import HelpFormatter, print_error
from cmjax.evaluation import sources
from cmjax.images import from_uint8, save_image_grid, upright
from cmjax.training.trained import ImageCM, load_image_cm

TASKS = ("inpaint", "colorize", "superres", "denoise", "interpolate", "stroke")
MASKS = ("center", "left", "right", "top", "bottom", "random")


def make_mask(kind: str, size: int, num: int, seed: int = 0) -> np.ndarray:
    """A (num, size, size, 1) float32 0/1 mask, 1 = generate: a centred half-size square, one half
    of the image, or (``random``) a random rectangle per image covering 1/4 to 1/2 of each side."""
    m = np.zeros((num, size, size, 1), np.float32)
    h = size // 2
    if kind == "center":
        m[:, size // 4: size // 4 + h, size // 4: size // 4 + h] = 1
    elif kind == "left":
        m[:, :, :h] = 1
    elif kind == "right":
        m[:, :, h:] = 1
    elif kind == "top":
        m[:, :h] = 1
    elif kind == "bottom":
        m[:, h:] = 1
    elif kind == "random":
        rng = np.random.default_rng(seed)
        for i in range(num):
            hh, ww = rng.integers(max(size // 4, 1), max(size // 2, 1) + 1, size=2)
            y, x = rng.integers(0, size - hh + 1), rng.integers(0, size - ww + 1)
            m[i, y:y + hh, x:x + ww] = 1
    else:
        raise ValueError(f"unknown mask {kind!r} (choose from {', '.join(MASKS)})")
    return m


def read_mask(path: str, size: int) -> np.ndarray:
    """A mask image (white = generate) -> (1, size, size, 1) float32 0/1 (nearest resize)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            g = np.asarray(upright(im).convert("L").resize((size, size), Image.NEAREST), np.float32)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what PIL raises for bad files
        raise ValueError(f"cannot read mask file {path!r}: {e}") from e
    return (g >= 128).astype(np.float32)[None, :, :, None]


def load_images(spec: str, model: ImageCM, num: int, data_dir: Optional[str] = None) -> np.ndarray:
    """``num`` images of ``spec`` as float32 (num, H, W, C) in [-1, 1] at the model's size and channels."""
    h, w, c = model.image_shape
    if h != w:
        raise ValueError(f"the model's images are {h}x{w}; editing inputs are center-cropped squares")
    source = sources.open_source(spec, data_dir=data_dir)
    batches = list(sources.source_batches(source, resolution=h, max_images=num, batch_size=num))
    u8 = np.concatenate(batches)
    x = from_uint8(u8)
    if c == 1 and x.shape[-1] == 3:
        x = (x @ np.asarray(editing.LUMA, np.float32))[..., None] / np.float32(sum(editing.LUMA))
    elif c == 3 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if len(x) < num:
        print(f"note: {spec} has only {len(x)} images", file=sys.stderr)
    return x


def run_task(task: str, model: ImageCM, images: Optional[np.ndarray], args) -> tuple[list[np.ndarray], str]:
    """Run one editing task; returns the grid rows (one per example) and a caption of the columns."""
    key = jax.random.key(args.seed)

    def run(fn, *xs):  # fn(f, *xs), jitted with the params as an argument (not baked-in constants)
        return jax.jit(lambda p, *a: fn(model.consistency_fn(p), *a))(model.params, *xs)

    sigmas = C.sampling_sigmas(args.steps, model.sigma_max) if not args.sigmas else \
        [float(s) for s in args.sigmas.split(",")]
    h, w, c = model.image_shape
    if task == "interpolate":
        k0, k1 = jax.random.split(key)
        shape = (args.num, h, w, c)
        alphas = np.linspace(0.0, 1.0, args.alphas)
        out = run(lambda f, a, b: editing.interpolate(f, a, b, alphas, model.sigma_max),
                  jax.random.normal(k0, shape), jax.random.normal(k1, shape))
        return list(np.asarray(out)), " | ".join(f"alpha {a:.2f}" for a in alphas)  # slerp between two noises
    y = jnp.asarray(images)
    if task == "inpaint":
        mask = read_mask(args.mask_file, h) if args.mask_file else make_mask(args.mask, h, len(y), args.seed)
        out = run(lambda f, y, m: editing.inpaint(f, key, y, m, sigmas), y, mask)
        shown = np.where(mask > 0, 0.0, np.asarray(y))
        cols, caption = [y, shown, out], "input | known pixels (gray = generated) | inpainted"
    elif task == "colorize":
        if c != 3:
            raise ValueError("colorize needs a 3-channel model (this one has 1 channel)")
        out = run(lambda f, y: editing.colorize(f, key, y, sigmas), y)
        gray = jnp.repeat(editing.luma(y)[..., None], 3, axis=-1)
        cols, caption = [y, gray, out], "input | luma (kept) | colorized"
    elif task == "superres":
        if h % args.patch:
            raise ValueError(f"--patch {args.patch} does not divide the image size {h}")
        low = editing.patch_means(y, args.patch)
        out = run(lambda f, lo: editing.super_resolve(f, key, lo, args.patch, sigmas), low)
        cols, caption = [y, editing.upsample_patches(low, args.patch), out], \
            f"input | {h // args.patch}x{w // args.patch} input (nearest) | super-resolved"
    elif task == "denoise":
        noisy = y + args.sigma * jax.random.normal(key, y.shape)
        out = run(lambda f, x: editing.denoise(f, x, args.sigma), noisy)
        cols, caption = [y, noisy, out], f"input | noisy (sigma {args.sigma}) | denoised (1 step)"
    elif task == "stroke":
        sig = C.sampling_sigmas(args.steps, args.sigma_start) if not args.sigmas else sigmas
        out = run(lambda f, s: editing.stroke_edit(f, key, s, sig), y)
        cols, caption = [y, out], f"strokes | result (from sigma {sig[0]:.3g}, {len(sig)} steps)"
    else:
        raise ValueError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    cols = [np.asarray(v, np.float32) for v in cols]
    return [np.stack([col[i] for col in cols]) for i in range(len(y))], caption


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m cmjax.edit``."""
    p = argparse.ArgumentParser(prog="python -m cmjax.edit", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("task", choices=TASKS, help="the edit (see above)")
    p.add_argument("--checkpoint", required=True, help="train.py workdir of an image CM")
    p.add_argument("--ckpt-step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--params", choices=["ema_params", "params"], default="ema_params", help="which params of the run")
    p.add_argument("--images", help="inputs: image folder, tfds:NAME[:SPLIT] or 'digits' (not for interpolate)")
    p.add_argument("--data-dir", help="TFDS data_dir")
    p.add_argument("--num", type=int, default=8, help="number of examples (rows of the grid)")
    p.add_argument("--steps", type=int, default=10, help="noise levels of the iterative tasks (default 10; "
                   "eval fid samples with 1 and decode.py with 2)")
    p.add_argument("--sigmas", help="explicit decreasing noise levels, e.g. 80,10,2,0.5")
    p.add_argument("--mask", choices=MASKS, default="center", help="inpaint: which region to generate")
    p.add_argument("--mask-file", help="inpaint: mask image, white = generate (overrides --mask)")
    p.add_argument("--patch", type=int, default=2, help="superres: patch size p (low-res = H/p)")
    p.add_argument("--sigma", type=float, default=0.5, help="denoise: noise level added to the inputs")
    p.add_argument("--sigma-start", type=float, default=5.0, help="stroke: noise level the strokes start from")
    p.add_argument("--alphas", type=int, default=8, help="interpolate: points from alpha=0 to 1")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--upscale", type=int, help="nearest-neighbour upscaling of the grid (default: to >= 64 px)")
    p.add_argument("--output", default="edits", help="output folder; the grid is OUTPUT/TASK.png")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cache.enable_compile_cache()
    try:
        if args.task != "interpolate" and not args.images:
            raise ValueError(f"{args.task} needs --images")
        model = load_image_cm(args.checkpoint, args.ckpt_step, args.params)
        images = load_images(args.images, model, args.num, args.data_dir) if args.task != "interpolate" else None
        rows, caption = run_task(args.task, model, images, args)
        upscale = args.upscale or max(1, 64 // model.image_shape[0])
        path = save_image_grid(os.path.join(args.output, f"{args.task}.png"), rows, upscale=upscale,
                               column_labels=caption.split(" | "))
    except (ValueError, FileNotFoundError, OSError) as e:
        print_error(e)
        return 2
    print(f"{args.task}: {len(rows)} rows ({caption}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
