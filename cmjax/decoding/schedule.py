"""The consistency decoder's noise schedule and preconditioning (openai/consistencydecoder's
``consistencydecoder/__init__.py``; diffusers ``schedulers/scheduling_consistency_decoder.py``).

1024 train timesteps with the cosine alpha-bar of guided-diffusion; the distilled model was
trained on a grid of 64 slots of 16 (t = 16, 32, ..., 1008). All tables are float32 NumPy arrays
indexed by the integer timestep, computed in the same order of float32 operations as the PyTorch
reference so that they agree bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from cmjax.noise_levels import SIGMA_DATA  # EDM's data standard deviation, as the image models use it

NUM_TRAIN_TIMESTEPS = 1024
NUM_DISTILLED_STEPS = 64
DEFAULT_TIMESTEPS = (1008, 512)


def cosine_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS, max_beta: float = 0.999) -> np.ndarray:
    """beta_i = min(1 - abar((i+1)/N) / abar(i/N), max_beta), abar(t) = cos^2((t+0.008)/1.008 * pi/2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return np.asarray(betas, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class DecoderSchedule:
    """Per-timestep float32 tables, each of shape (num_timesteps,)."""

    alphas_cumprod: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    c_skip: np.ndarray
    c_out: np.ndarray
    c_in: np.ndarray


@functools.lru_cache(maxsize=None)
def decoder_schedule(num_timesteps: int = NUM_TRAIN_TIMESTEPS, sigma_data: float = SIGMA_DATA) -> DecoderSchedule:
    """The per-timestep tables: sigma = sqrt(1/abar - 1) and the EDM-style c_skip/c_out/c_in
    (Karras et al. 2022, Table 1, with sigma_data 0.5), as OpenAI's decoder computes them."""
    # float32 alphas, product accumulated in float64 and rounded once: what torch.cumprod does on
    # CPU. A float32 running product drifts by ~5e-7 relative, which near t=0 (where sigma has
    # cancellation) moves c_out by 1e-4 relative.
    alphas = np.float32(1.0) - cosine_betas(num_timesteps)
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    sigmas = np.sqrt(np.float32(1.0) / alphas_cumprod - np.float32(1.0))
    sqrt_recip = np.sqrt(np.float32(1.0) / alphas_cumprod)
    sd2 = np.float32(sigma_data) ** 2
    tables = DecoderSchedule(
        alphas_cumprod=alphas_cumprod,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(np.float32(1.0) - alphas_cumprod),
        c_skip=sqrt_recip * sd2 / (sigmas ** 2 + sd2),
        c_out=sigmas * np.float32(sigma_data) / (sigmas ** 2 + sd2) ** np.float32(0.5),
        c_in=sqrt_recip / (sigmas ** 2 + sd2) ** np.float32(0.5),
    )
    for table in dataclasses.astuple(tables):
        table.setflags(write=False)
    return tables


def grid_timesteps(num_timesteps: int = NUM_TRAIN_TIMESTEPS, num_distilled: int = NUM_DISTILLED_STEPS) -> tuple[int, ...]:
    """The distilled grid: (16, 32, ..., 1008) for the released model."""
    space = num_timesteps // num_distilled
    return tuple(range(space, num_timesteps, space))


def round_to_grid(t: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS, num_distilled: int = NUM_DISTILLED_STEPS) -> int:
    """OpenAI's rounding of any timestep onto the grid: (t // 16 + 1) * 16, 1024 -> 1008, 0 -> 16."""
    space = num_timesteps // num_distilled
    rounded = (int(t) // space + 1) * space
    if rounded == num_timesteps:
        rounded -= space
    return max(rounded, space)


def timesteps_from_fractions(fractions: Sequence[float], num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """OpenAI's ``schedule`` argument: fraction s -> grid(int((N - 1) * s)). [1.0, 0.5] -> (1008, 512)."""
    for s in fractions:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"schedule fractions must lie in [0, 1], got {s}")
    return tuple(round_to_grid(int((num_timesteps - 1) * s), num_timesteps) for s in fractions)


def timesteps_for_steps(num_steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """Evenly spaced fractions 1, 1 - 1/n, ...: 1 step -> (1008,), 2 -> (1008, 512), 3 -> (1008, 688, 352)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return timesteps_from_fractions([1.0 - i / num_steps for i in range(num_steps)], num_timesteps)


def check_timesteps(timesteps: Sequence[int], num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """Validate a schedule: non-empty, every t on the distilled grid. Returns it as a tuple of ints."""
    timesteps = tuple(int(t) for t in timesteps)
    grid = set(grid_timesteps(num_timesteps))
    if not timesteps:
        raise ValueError("timesteps must not be empty")
    off_grid = [t for t in timesteps if t not in grid]
    if off_grid:
        raise ValueError(f"timesteps {off_grid} are not on the distilled grid (multiples of "
                         f"{num_timesteps // NUM_DISTILLED_STEPS} in [{min(grid)}, {max(grid)}])")
    return timesteps
