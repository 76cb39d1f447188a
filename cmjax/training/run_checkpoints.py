"""Run checkpoints (orbax CheckpointManager, async, keep-N) and frozen params (teacher, encoder).

    WORKDIR/checkpoints/STEP/state/    TrainState as a dict: step, params, opt_state, ema_params,
                                       [target_params], rng  (orbax StandardSave, sharded arrays)
    WORKDIR/checkpoints/STEP/data/     grain iterator state, JSON, one file per process
    WORKDIR/checkpoints/STEP/config/   the run's ConfigDict as JSON

orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous step as the latest one.

Failures are reported in one line and never cost a good checkpoint: a step that cannot be read
back (corrupt or truncated files) is moved to WORKDIR/checkpoints_unreadable/STEP with a warning
and the run resumes from the newest step that reads (``restore_latest``); an asynchronous save
that failed (disk full) stops the run at the next step with ``CheckpointSaveError``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Optional

import grain
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cmjax.training.families import patch_encoder_matrix
from cmjax.training.state import TrainState, abstract_with_shardings, tree_shardings
from cmjax.weights import hub

STATE, DATA, CONFIG = "state", "data", "config"
UNREADABLE = "checkpoints_unreadable"


class CheckpointSaveError(RuntimeError):
    """Saving a run checkpoint failed (e.g. disk full); the message says where and why."""

class CheckpointRestoreError(RuntimeError):
    """No checkpoint of the run can be read back."""

def _one_line(e: BaseException) -> str:
    """The exception's type and first line, shortened in the middle (the OS error is at the end)."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    return f"{type(e).__name__}: {line if len(line) <= 400 else line[:150] + ' ... ' + line[-200:]}"


def config_json(config) -> dict:
    return json.loads(config.to_json())


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options, item_handlers=handlers)


class _ReadOnlyNotices(logging.Filter):
    """orbax warns three times for every read-only manager, once claiming the directory "is read
    only" (it only means the manager will not write); nothing there for a user to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("CheckpointManagerOptions.read_only=True")
                    or message.startswith("Given directory is read only"))


def read_only_manager(directory: str, item_handlers) -> ocp.CheckpointManager:
    """A CheckpointManager over ``directory`` that never writes (without orbax's notices about it)."""
    notices = _ReadOnlyNotices()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(notices)
    try:
        return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                     item_handlers=item_handlers)
    finally:
        absl_logger.removeFilter(notices)


@contextlib.contextmanager
def _save_errors(manager: ocp.CheckpointManager, what: str, seen: str = ""):
    """Any exception inside becomes one line, CheckpointSaveError("``what`` to DIR failed (...)")."""
    try:
        yield
    except Exception as e:
        raise CheckpointSaveError(f"{what} to {manager.directory} failed ({seen}{_one_line(e)}); "
                                  "the previous checkpoints are intact") from e


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, iterator, config) -> None:
    """Save state, iterator position and config at ``step`` (returns once the save is started).

    Raises CheckpointSaveError if this save, or an earlier asynchronous one, failed.
    """
    check_saves(manager)
    with _save_errors(manager, "a checkpoint save", f"seen when starting step {step}'s: "):
        manager.save(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state.to_dict()),
            DATA: grain.checkpoint.CheckpointSave(iterator),
            CONFIG: ocp.args.JsonSave(config_json(config)),
        }), force=True)


def check_saves(manager: ocp.CheckpointManager) -> None:
    """Raise CheckpointSaveError if an asynchronous save has failed (cheap: call every step)."""
    with _save_errors(manager, "an asynchronous checkpoint save"):
        manager.check_for_errors()


def finish(manager: ocp.CheckpointManager) -> None:
    """Wait for pending saves; CheckpointSaveError (one line) if one failed."""
    with _save_errors(manager, "a checkpoint save"):
        manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState, shardings: TrainState,
            iterator) -> TrainState:
    """The state at ``step``, laid out by ``shardings``; ``iterator`` is repositioned in place."""
    target = abstract_with_shardings(abstract_state.to_dict(), shardings.to_dict())
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(target),
        DATA: grain.checkpoint.CheckpointRestore(iterator),
    }))
    return TrainState.from_dict(restored[STATE])


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState, shardings: TrainState,
                   iterator) -> tuple[TrainState, int]:
    """The newest step that can be read back, and its number; ``iterator`` repositioned in place.

    A step that fails to read (corrupt, truncated or missing files) is reported on stderr and
    moved to WORKDIR/checkpoints_unreadable/STEP (never deleted: it may still be of use), so that
    the run continues from the step before it and later saves and keep-N pruning ignore it.
    Raises CheckpointRestoreError if no step reads (nothing is moved then).
    """
    directory = os.fspath(manager.directory)
    bad: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = restore(manager, step, abstract_state, shardings, iterator)
        except Exception as e:  # orbax, TensorStore and grain raise many types
            print(f"warning: checkpoint {directory}/{step} cannot be read ({_one_line(e)}); "
                  "trying the step before it", file=sys.stderr, flush=True)
            bad.append((step, _one_line(e)))
            continue
        if bad:
            _set_aside(manager, [b for b, _ in bad])
        return state, step
    raise CheckpointRestoreError(
        f"no checkpoint in {directory} can be read (steps {', '.join(str(b) for b, _ in bad)}; newest: "
        f"{bad[0][1] if bad else 'none'}); move them away to start the run over")


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move unreadable steps out of the manager's directory (one process does it)."""
    directory = os.fspath(manager.directory)
    aside = os.path.join(os.path.dirname(directory), UNREADABLE)
    if jax.process_count() > 1:
        raise CheckpointRestoreError(f"checkpoint step(s) {steps} in {directory} cannot be read; move them to "
                                     f"{aside} and rerun (not done automatically with several processes)")
    os.makedirs(aside, exist_ok=True)
    for step in steps:
        target = os.path.join(aside, str(step))
        n = 1
        while os.path.exists(target):  # an earlier unreadable copy of the same step
            target, n = os.path.join(aside, f"{step}.{n}"), n + 1
        os.replace(os.path.join(directory, str(step)), target)
        print(f"warning: moved unreadable checkpoint {directory}/{step} to {target}", file=sys.stderr, flush=True)
    manager.reload()


def restore_params(workdir: str, abstract_params, shardings, which: str = "ema_params",
                   step: Optional[int] = None):
    """One params tree (``ema_params`` or ``params``) from a run's checkpoint (latest by default).

    Reads only that subtree (orbax partial restore), so the run that wrote it may have used any
    optimizer. ``abstract_params``: ShapeDtypeStructs of the expected params.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    with read_only_manager(directory, {STATE: ocp.PyTreeCheckpointHandler()}) as mngr:
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
        params = hub.load_decoder(path).params
        return jax.device_put(params, shardings), shardings
    which = "ema_params" if config.cd.teacher_ema else "params"
    return restore_params(path, abstract, shardings, which), shardings


def load_encoder(config, family, mesh: Mesh):
    """(params, shardings) of the decoder family's frozen latent encoder: the fixed patch matrix
    (data.latents='patch') or SD VAE params (data.latents='vae'); (None, None) for 'file'."""

    rep = NamedSharding(mesh, P())
    kind = config.data.latents
    if kind == "patch":
        w = patch_encoder_matrix(config.data.patch_seed)
        return jax.device_put(w, rep), rep
    if kind == "vae":  # an SD VAE named as --vae is anywhere (cmjax.weights.hub); the encoder half is used
        params = hub.load_vae(config.data.vae_checkpoint, sharding=rep).params
        return params, jax.tree.map(lambda _: rep, params)
    return None, None
