"""The train state, its shardings (data parallel or FSDP), and creating it already sharded.

    TrainState(step, params, opt_state, ema_params, target_params, rng)

* ``params``: fp32, what the optimizer updates (compute may be bf16: layers cast).
* ``ema_params``: fp32 evaluation EMA (iCT: 0.99993), what samples and checkpoints export.
* ``target_params``: the EMA *target* network of the algorithms whose entry keeps one
  (``Algorithm.keeps_target``: original CT, CD); None for the others (stopgrad(params) or none).
* ``rng``: raw uint32 key data (of ``config.prng_impl``); the step's key is ``fold_in(rng, step)``, so a resumed run
  draws exactly the keys an uninterrupted one would.

Sharding: with ``fsdp=False`` everything is replicated (data parallelism; the batch is split over
the mesh's ``data`` axis).  With ``fsdp=True`` every array leaf of at least ``fsdp_min_size``
elements is split along its largest axis divisible by the mesh size (params, EMA, target and the
optimizer moments alike); XLA inserts the all-gathers and reduce-scatters.
"""
from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cmjax.parallel import DATA_AXIS


@flax.struct.dataclass
class TrainState:
    step: jax.Array           # int32 (): micro-batch steps done
    params: Any
    opt_state: Any
    ema_params: Any
    target_params: Any        # None unless the algorithm keeps a target network (ct, cd)
    rng: jax.Array            # uint32 key data of config.prng_impl

    def to_dict(self) -> dict:
        """The state as a plain dict without None fields (what checkpoints hold)."""
        return {k: v for k, v in
                (("step", self.step), ("params", self.params), ("opt_state", self.opt_state),
                 ("ema_params", self.ema_params), ("target_params", self.target_params),
                 ("rng", self.rng)) if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"],
                   ema_params=d["ema_params"], target_params=d.get("target_params"), rng=d["rng"])


def state_from_params(params, tx, keeps_target: bool, seed: int, impl: str = "threefry2x32") -> TrainState:
    """A fresh state around ``params`` (fp32): EMA (and, when ``keeps_target``, the target network)
    start as copies of them."""
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    copy = lambda t: jax.tree.map(lambda p: p + 0, t)  # distinct buffers (donation-safe)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema_params=copy(params), target_params=copy(params) if keeps_target else None,
        rng=jax.random.key_data(jax.random.key(seed, impl=impl)).astype(jnp.uint32))


def fsdp_spec(shape, mesh_size: int, min_size: int) -> P:
    """Shard the largest axis divisible by mesh_size; replicate small or indivisible leaves."""
    if mesh_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    axes = [a for a in np.argsort(shape)[::-1] if shape[a] % mesh_size == 0]
    if not axes:
        return P()
    spec = [None] * len(shape)
    spec[int(axes[0])] = DATA_AXIS
    return P(*spec)


def tree_shardings(abstract_tree, mesh: Mesh, fsdp: bool, min_size: int = 2 ** 14):
    """NamedShardings for every leaf of an abstract pytree (ShapeDtypeStruct leaves)."""
    size = mesh.shape[DATA_AXIS]

    def one(leaf):
        if not fsdp or not hasattr(leaf, "shape"):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), size, min_size))

    return jax.tree.map(one, abstract_tree)


def prng_impl(config) -> str:
    """The PRNG of params init, noise and dropout: threefry2x32 (default; the same numbers under
    any sharding) or rbg (XLA RngBitGenerator: compiles several times faster on CPU)."""
    return config.prng_impl


def _init_fn(init_params_fn, tx, config, params, keeps_target):
    seed, impl = int(config.seed), prng_impl(config)
    if params is None:
        return (lambda key: state_from_params(init_params_fn(key), tx, keeps_target, seed, impl),
                (jax.random.key(seed, impl=impl),))
    return (lambda p: state_from_params(p, tx, keeps_target, seed, impl)), (params,)


def train_state_layout(init_params_fn, tx, config, mesh: Mesh, *, keeps_target: bool
                       ) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings) without allocating anything (jax.eval_shape); ``keeps_target``:
    the algorithm's entry keeps a target network (``Algorithm.keeps_target``)."""
    init, args = _init_fn(init_params_fn, tx, config, None, keeps_target)
    abstract = jax.eval_shape(init, *args)
    return abstract, tree_shardings(abstract, mesh, config.fsdp, config.fsdp_min_size)


def create_train_state(init_params_fn, tx, config, mesh: Mesh, params: Optional[Any] = None, *,
                       keeps_target: bool) -> tuple[TrainState, TrainState]:
    """(state, shardings): the state created directly in its sharded layout.

    ``init_params_fn(key) -> params`` is traced inside ``jax.jit(..., out_shardings=...)``, so
    full-size params are never materialised unsharded.  With ``params`` given (fine-tuning), they
    are the starting point instead and are re-laid out by the same jit.
    """
    init, args = _init_fn(init_params_fn, tx, config, params, keeps_target)
    abstract = jax.eval_shape(init, *args)
    shardings = tree_shardings(abstract, mesh, config.fsdp, config.fsdp_min_size)
    state = jax.jit(init, out_shardings=shardings)(*args)
    return state, shardings


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying shardings: the restore target for orbax."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, shardings)
