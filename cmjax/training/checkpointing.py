"""Run checkpoints (orbax CheckpointManager, async, keep-N) and frozen params (teacher, encoder).

    WORKDIR/checkpoints/STEP/state/    TrainState as a dict: step, params, opt_state, ema_params,
                                       [target_params], rng  (orbax StandardSave, sharded arrays)
    WORKDIR/checkpoints/STEP/data/     grain iterator state, JSON, one file per process
    WORKDIR/checkpoints/STEP/config/   the run's ConfigDict as JSON

orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous step as the latest one.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import grain
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cmjax.training.state import TrainState, abstract_with_shardings, tree_shardings

STATE, DATA, CONFIG = "state", "data", "config"


def config_json(config) -> dict:
    return json.loads(config.to_json())


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, iterator, config) -> None:
    """Save state, iterator position and config at ``step`` (returns once the save is started)."""
    manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state.to_dict()),
        DATA: grain.checkpoint.CheckpointSave(iterator),
        CONFIG: ocp.args.JsonSave(config_json(config)),
    }), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState, shardings: TrainState,
            iterator) -> TrainState:
    """The state at ``step``, laid out by ``shardings``; ``iterator`` is repositioned in place."""
    target = abstract_with_shardings(abstract_state.to_dict(), shardings.to_dict())
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(target),
        DATA: grain.checkpoint.CheckpointRestore(iterator),
    }))
    return TrainState.from_dict(restored[STATE])


def restore_params(workdir: str, abstract_params, shardings, which: str = "ema_params",
                   step: Optional[int] = None):
    """One params tree (``ema_params`` or ``params``) from a run's checkpoint (latest by default).

    Reads only that subtree (orbax partial restore), so the run that wrote it may have used any
    optimizer. ``abstract_params``: ShapeDtypeStructs of the expected params.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={STATE: ocp.PyTreeCheckpointHandler()}) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        target = {which: abstract_with_shardings(abstract_params, shardings)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        out = mngr.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)}))
    return out[STATE][which]


def load_run_params(path: str, init_params_fn, mesh: Mesh, config):
    """The EMA params of the run in workdir ``path`` (latest checkpoint), laid out for this run
    (``init_params_fn`` gives their structure): a starting point such as ECT's ``ect.init``."""
    abstract = jax.eval_shape(init_params_fn, jax.random.key(0))
    shardings = tree_shardings(abstract, mesh, config.fsdp, config.fsdp_min_size)
    return restore_params(path, abstract, shardings, "ema_params")


def load_teacher(path: str, config, family, mesh: Mesh, fsdp: bool):
    """Teacher params (CD, sCD) from ``path``: a training run's workdir (an 'edm' run, EMA params
    unless cd.teacher_ema is off) or, for the decoder family, a cmjax decoder checkpoint directory
    (``cmjax.json`` inside)."""
    abstract = jax.eval_shape(family.init_params, jax.random.key(0))
    shardings = tree_shardings(abstract, mesh, fsdp, config.fsdp_min_size)
    if os.path.isfile(os.path.join(path, "cmjax.json")):
        from cmjax.checkpoint import load_decoder
        params = load_decoder(path).params
        return jax.device_put(params, shardings), shardings
    which = "ema_params" if config.cd.teacher_ema else "params"
    return restore_params(path, abstract, shardings, which), shardings


def load_encoder(config, family, mesh: Mesh):
    """(params, shardings) of the decoder family's frozen latent encoder: the fixed patch matrix
    (data.latents='patch') or SD VAE params (data.latents='vae'); (None, None) for 'file'."""
    from cmjax.training.families import patch_encoder_matrix

    rep = NamedSharding(mesh, P())
    kind = config.data.latents
    if kind == "patch":
        w = patch_encoder_matrix(config.data.patch_seed)
        return jax.device_put(w, rep), rep
    if kind == "vae":  # a cmjax SD VAE checkpoint (python -m cmjax.convert); the encoder half is used
        from cmjax.checkpoint import load_vae

        params = load_vae(config.data.vae_checkpoint, sharding=rep).params
        return params, jax.tree.map(lambda _: rep, params)
    return None, None
