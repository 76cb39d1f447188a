"""Loading a trained run: the config, family, algorithm and params of a train.py workdir.

    model = load_image_cm(WORKDIR)                     # EMA params of the latest checkpoint
    x0 = model.consistency_fn()(y, sigma)              # one jump, EDM coordinates (editing)
    images = model.sample(key, 64, num_steps=2)        # the algorithm's own sampler

Used by ``python -m cmjax.eval`` and ``python -m cmjax.edit``; every algorithm of
:mod:`cmjax.training.algorithms` is sampled with its own sampler (iCT/ECT: the CM multistep
sampler; sCT: TrigFlow times; MeanFlow: average-velocity jumps).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp

from cmjax import consistency as C
from cmjax import parallel
from cmjax.training import algorithms, families, run_checkpoints


@dataclasses.dataclass(frozen=True)
class ImageCM:
    """An image-family few-step model: the run config, its ``Family``, its algorithm's ``Model``
    and params."""

    config: Any
    family: Any
    params: Any
    step: int
    model: algorithms.Model = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the model's images."""
        return tuple(self.family.image_shape)

    @property
    def sigma_max(self) -> float:
        return float(self.config.sampling.sigma_max)

    def consistency_fn(self, params: Any = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
        """``f(x_t (B,H,W,C), t (B,)) -> x0_hat`` (EDM coordinates) with ``params`` (default the
        loaded ones) closed over."""
        p = self.params if params is None else params
        return lambda x, t: self.model.consistency_fn(p, x, t)

    def sample(self, key: jax.Array, num: int, num_steps: int, params: Any = None) -> jax.Array:
        """``(num, H, W, C)`` float32 in [-1, 1] from the algorithm's own sampler."""
        return self.model.sample(self.params if params is None else params, key, num, num_steps)


def read_run_config(workdir: str, step: Optional[int] = None):
    """(ConfigDict, step) saved with a train.py checkpoint (latest by default)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir}: not a train.py workdir (no checkpoints/ folder)")
    with run_checkpoints.read_only_manager(directory, {"config": ocp.JsonCheckpointHandler()}) as mngr:
        step = mngr.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint")
        if step not in mngr.all_steps():
            raise FileNotFoundError(f"{directory}: no checkpoint at step {step} (have {sorted(mngr.all_steps())})")
        cfg = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return ml_collections.ConfigDict(cfg), step


def load_image_cm(workdir: str, step: Optional[int] = None, which: str = "ema_params", mesh=None) -> ImageCM:
    """The image model of a train.py run: config, family, algorithm model and ``which`` params
    (``ema_params`` or ``params``), replicated over ``mesh`` (default: every device)."""
    config, step = read_run_config(workdir, step)
    if config.family != "image":
        raise ValueError(f"{workdir}: family {config.family!r} is not an image CM (the decoder family is "
                         "evaluated with `python -m cmjax.eval recon`)")
    family = families.make_family(config)
    model = algorithms.get(config.algorithm).model(family, config)
    abstract = jax.eval_shape(model.init_params, jax.random.key(0))
    rep = parallel.replicated(mesh if mesh is not None else parallel.make_mesh())
    params = run_checkpoints.restore_params(workdir, abstract, jax.tree.map(lambda _: rep, abstract), which, step)
    return ImageCM(config, family, params, step, model)


def multistep_sigmas(steps: int = 1, sigma_max: float = C.SIGMA_MAX, mid_sigma: Optional[float] = None,
                     sigmas: Optional[Sequence[float]] = None) -> list[float]:
    """The decreasing noise levels of a sampler: ``sigmas`` as given, else ``[sigma_max]`` for one
    step, ``[sigma_max, mid_sigma]`` for two, and the Karras grid (without its last point) beyond."""
    if sigmas is not None:
        return [float(s) for s in sigmas]
    if steps == 2 and mid_sigma is None:
        raise ValueError("two-step sampling needs the intermediate sigma (mid_sigma)")
    return C.sampling_sigmas(steps, sigma_max, mid_sigma=mid_sigma)


def cm_sampler(model: ImageCM, sigmas: Optional[Sequence[float]] = None, mesh=None, *,
               steps: int = 1) -> Callable[[jax.Array, int], jax.Array]:
    """``sample(key, n) -> (n, H, W, C)`` float32 in [-1, 1]: multistep CM sampling at ``sigmas``
    (EDM noise levels, any algorithm's consistency function), or, with ``sigmas=None``, the run's
    algorithm's own ``steps``-step sampler (iCT: sigma_max, mid_sigma; sCT: TrigFlow times;
    MeanFlow: average-velocity jumps).

    Jitted once per ``n``, params passed as an argument (not baked-in constants). When ``n``
    divides over the mesh's devices (default: all), the batch is computed split over them and
    the result gathered (replicated on every device and host); the samples do not depend on the
    device count (JAX's partitionable threefry).
    """

    shape = model.image_shape
    mesh = mesh if mesh is not None else parallel.make_mesh()
    split = parallel.data_sharding(mesh)
    if sigmas is None:
        draw = lambda params, key, n: model.sample(key, n, steps, params)
    else:
        sig = tuple(float(s) for s in sigmas)
        draw = lambda params, key, n: C.sample_multistep(model.consistency_fn(params), key, (n, *shape), sig)

    @functools.partial(jax.jit, static_argnums=2, out_shardings=parallel.replicated(mesh))
    def run(params, key, n):
        x = draw(params, key, n)
        return jax.lax.with_sharding_constraint(x, split) if n % mesh.size == 0 else x

    return lambda key, n: run(model.params, key, int(n))
