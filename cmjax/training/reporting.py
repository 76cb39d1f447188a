"""What a run reports: metrics to stdout, a JSONL file and TensorBoard; PNG grids; PSNR.

    WORKDIR/metrics.jsonl          one JSON object per logged step {"step": k, "loss": ..., ...}
    WORKDIR/tensorboard/           TensorBoard event files (tensorboardX, if installed)
    WORKDIR/samples/STEP_*.png     sample / reconstruction grids

On an interactive terminal a progress bar (steps, steps/s, ETA, loss) runs under the log lines;
its rate starts after the first step, which compiles the train step.

Only process 0 writes.  TensorBoard needs the optional ``tensorboardX`` package (no TensorFlow);
without it the run logs to stdout and JSONL only and says so once.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from cmjax.images import save_image_grid


def say(message: str) -> None:
    """Print a line on stdout (process 0 only) above the progress bar, if one is running."""
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


class Progress:
    """The run's progress bar on stderr (process 0, interactive terminals only): steps, steps/s,
    ETA and the last loss. ``start`` it after the compiling first step, so the rate and the ETA
    count training only; print with :func:`say` meanwhile."""

    def __init__(self, total: int):
        self.total = int(total)
        self._bar = None

    def start(self, step: int) -> None:
        if jax.process_index() == 0 and self._bar is None:
            self._bar = tqdm(total=self.total, initial=int(step), unit="step", desc="train", file=sys.stderr,
                             disable=None, dynamic_ncols=True, smoothing=0.05)

    def update(self, step: int, loss: float | None = None) -> None:
        if self._bar is None:
            return
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        self._bar.update(int(step) - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def run_outputs(workdir: str, step: int, total: int, samples: bool, tensorboard: bool,
                exported: str | None) -> str:
    """The closing line of a run: how far it got and where its outputs are."""
    parts = [f"checkpoints in {os.path.join(workdir, 'checkpoints')}",
             f"metrics in {os.path.join(workdir, 'metrics.jsonl')}"]
    if tensorboard and os.path.isdir(os.path.join(workdir, "tensorboard")):
        parts[-1] += f" and {os.path.join(workdir, 'tensorboard')}"
    if samples:
        parts.append(f"samples in {os.path.join(workdir, 'samples')}")
    if exported:
        parts.append(f"exported decoder in {exported} (decode.py --checkpoint {exported})")
    state = "finished" if step >= total else "stopped at"
    return f"{state} step {step}/{total}: " + "; ".join(parts)


class MetricWriter:
    """Writes scalar metrics to stdout, ``metrics.jsonl`` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.primary = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.primary:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:
                print("tensorboardX is not installed: logging to stdout and metrics.jsonl only",
                      file=sys.stderr)

    def write(self, step: int, metrics: Mapping[str, float], echo: bool = True) -> None:
        if not self.primary:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))
            self._tb.flush()
        if echo:
            say(format_metrics(step, metrics))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def format_metrics(step: int, metrics: Mapping[str, float]) -> str:
    order = ["loss", "grad_norm", "lr", "num_scales", "steps_per_sec", "examples_per_sec"]
    keys = [k for k in order if k in metrics] + sorted(k for k in metrics if k not in order)
    parts = []
    for k in keys:
        v = float(metrics[k])
        parts.append(f"{k} {int(v)}" if k == "num_scales" else f"{k} {v:.5g}")
    return f"step {step:7d} | " + " | ".join(parts)


def save_grid(path: str, images: np.ndarray, ncols: int | None = None, upscale: int = 1) -> None:
    """Write a batch (B, H, W, C) in [-1, 1] as a PNG grid of ``ncols`` columns (default: about
    square), nearest-neighbour upscaled by ``upscale`` for tiny images."""
    images = np.asarray(images)
    ncols = ncols or int(math.ceil(math.sqrt(len(images))))
    rows = [images[i:i + ncols] for i in range(0, len(images), ncols)]
    save_image_grid(path, rows, pad=1, upscale=upscale)


def nearest_neighbour_distance(samples: np.ndarray, data: np.ndarray) -> float:
    """Mean over samples of the L2 distance (over all pixels) to the nearest data image."""
    s = np.asarray(samples, np.float64).reshape(len(samples), -1)
    d = np.asarray(data, np.float64).reshape(len(data), -1)
    d2 = (s ** 2).sum(1)[:, None] - 2 * s @ d.T + (d ** 2).sum(1)[None, :]
    return float(np.mean(np.sqrt(np.maximum(d2.min(axis=1), 0.0))))
