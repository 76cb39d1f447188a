"""What a batch decode is asked to do: ``DecodeOptions``, whose fields are decode.py's flags.

Each field that is a flag carries it (``flag``): its default, its help and what argparse needs;
``cmjax.cli.decode`` makes its parser from these fields and builds a DecodeOptions from the
parsed values, and the program (program.py), the run (run.py) and the writer (outputs.py) read
the fields as they are. A new decode flag is one field here and the code that reads it.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from cmjax.decoding import schedule, tiling
from cmjax.models.conv_lowering import XLA, LoweringPlan

DTYPES = ("bf16", "fp32")  # what --dtype offers; layers.compute_dtype maps the name
LAYOUTS = ("nchw", "nhwc")
SEED_RANGE = (-2 ** 63, 2 ** 63)  # what jax.random.key takes


def flag(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A DecodeOptions field that decode.py offers as ``--NAME`` (underscores as dashes; another
    name with ``flag="--..."``): ``help`` and ``argparse_kwargs`` go to ``add_argument``."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """decode.py's flags, checked. ``batch_size`` is global (all devices of all hosts);
    ``timesteps`` come from --steps / --timesteps, on the grid of the model decoding."""

    output: Path | None = flag(None, "folder for the PNGs, created if missing (required)", required=True, type=Path)
    timesteps: tuple[int, ...] = schedule.DEFAULT_TIMESTEPS
    batch_size: int = flag(8, "global batch, rounded up to a multiple of devices x --micro-batch (never more "
                              "than the largest group of same-size inputs needs)", type=int)
    micro_batch: int = flag(1, "images each device decodes at once: more can be faster on small images; "
                               "pixels depend on this, never on --batch-size or the device/host count", type=int)
    seed: int = flag(0, "noise seed; same seed + same input = same image", type=int)
    dtype: str = flag("fp32", "compute dtype", choices=sorted(DTYPES))
    clip_denoised: bool = flag(True, "clamp to [-1, 1] after every step (OpenAI; --no-clip: diffusers) "
                                     "(default --clip)", flag="--clip", action=argparse.BooleanOptionalAction)
    layout: str | None = flag(None, "force the latent layout (default: detected by the 4-channel axis)",
                              choices=LAYOUTS)
    save_npy: bool = flag(False, "also write the float image (H, W, 3) in [-1, 1] as .npy (default off)",
                          action="store_true")
    skip_existing: bool = flag(False, "skip inputs whose outputs exist, to resume a run (default off)",
                               action="store_true")
    tile: int | None = flag(None, "decode in overlapping tiles of this many latents, for large images "
                                  "(default: untiled)", type=int)
    tile_overlap: int | None = flag(None, "tile overlap in latents (default tile // 4)", type=int)
    images: bool = flag(False, "inputs are images: encode with the SD VAE, then decode (default off: latents)",
                        action="store_true")
    compare: bool = flag(False, "with --images: also write input | SD GAN decoder | consistency decoder, "
                                "labelled, and PSNRs (default off)", action="store_true")
    progress: bool = flag(True, "no progress bar (default: a bar on stderr)", flag="--no-progress",
                          action="store_false")
    tune: bool = flag(False, "first measure which conv lowering is fastest for this run's shapes on this CPU "
                             "(30-170 s once for the full-size decoder, cached; later runs use it without the "
                             "flag) (default off: the cached measurements, XLA's convolution for the rest)",
                      action="store_true")
    lowering: LoweringPlan = XLA  # how each conv is computed (cmjax.tuning.default_plan; not a flag)

    def __post_init__(self):
        if self.output is not None:
            object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "timesteps", tuple(self.timesteps))
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """What is wrong with these options, in decode.py's flags, or None."""
        if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            return f"--seed must lie in [-2**63, 2**63), got {self.seed}"
        for name in ("batch_size", "micro_batch", "tile"):
            value = getattr(self, name)
            if value is not None and value < 1:
                return f"--{name.replace('_', '-')} must be >= 1, got {value}"
        if self.tile_overlap is not None and (self.tile is None or not 0 <= self.tile_overlap < self.tile):
            return "--tile-overlap needs --tile and must lie in [0, tile)"
        if self.compare and not self.images:
            return "--compare needs --images"
        if self.dtype not in DTYPES or self.layout not in (None, *LAYOUTS):
            return f"--dtype must be one of {DTYPES} and --layout one of {LAYOUTS}"
        return None

    @property
    def overlap(self) -> int | None:
        """Tile overlap in latents (None: untiled)."""
        if self.tile is None:
            return None
        return tiling.default_overlap(self.tile) if self.tile_overlap is None else self.tile_overlap

    def output_paths(self, item) -> list[Path]:
        """Every file written for ``item`` (an inputs.Item) below ``output``: <stem>.png [, <stem>.npy
        with --save-npy, <stem>_compare.png with --compare]; it is finished when all exist."""
        base = self.output / item.stem
        paths = [base.with_name(base.name + ".png")]
        if self.save_npy:
            paths.append(base.with_name(base.name + ".npy"))
        if self.compare:
            paths.append(base.with_name(base.name + "_compare.png"))
        return paths


def flag_fields() -> list[dataclasses.Field]:
    """The DecodeOptions fields that are flags, in the order --help lists them."""
    return [f for f in dataclasses.fields(DecodeOptions) if f.metadata]
