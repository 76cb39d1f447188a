"""What a resumed run checks and tidies before it trains on.

    saved_config(manager, step)               the config the checkpoint was written with (a dict)
    curriculum_change(saved, config, step)    a warning when the N(k) curriculum's length K changed
    truncate_metrics(path, step)              drop metrics.jsonl records past the restored step

K, the length of the iCT/CT curricula, is ``config.curriculum_steps`` or, when that is 0,
``total_steps``: raising total_steps on resume stretches the curriculum, so the number of
discretisation steps at the restored step drops (e.g. 161 -> 81), unless curriculum_steps pins K.

A run killed without saving (SIGKILL, power loss) has logged steps past its latest checkpoint;
training resumes from the checkpoint and logs those steps again, so the old records are dropped.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from cmjax.files import atomic_write
from cmjax.training import algorithms
from cmjax.training.algorithms import curriculum_updates
from cmjax.training.reporting import say
from cmjax.training.run_checkpoints import CONFIG


def saved_config(manager: ocp.CheckpointManager, step: int) -> Optional[dict]:
    """The config saved with checkpoint ``step`` (None if that checkpoint holds none)."""
    try:
        return manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
    except (FileNotFoundError, KeyError, ValueError):
        return None


def curriculum_change(saved: Optional[dict], config, step: int) -> Optional[str]:
    """A one-line warning if resuming at ``step`` with ``config`` changes the N(k) curriculum the
    checkpoint was trained with (its length K, hence N at this step); None otherwise."""
    num_scales = algorithms.get(config.algorithm).num_scales  # None: no N(k) curriculum
    if not saved or num_scales is None or saved.get("algorithm") != config.algorithm:
        return None
    old = ml_collections.ConfigDict(saved)
    k_old, k_new = curriculum_updates(old), curriculum_updates(config)
    if k_old == k_new:
        return None
    update = step // config.optim.grad_accum_steps
    n_old, n_new = int(num_scales(old, update)), int(num_scales(config, update))
    pin = old.get("curriculum_steps", 0) or old.total_steps
    return (f"warning: the curriculum length K changed from {k_old} to {k_new} updates "
            f"(curriculum_steps={config.curriculum_steps} follows total_steps when 0): at step {step} "
            f"N(k) is now {n_new} instead of {n_old}. To keep the curriculum the run started with, "
            f"pass --config.curriculum_steps={pin}.")


def truncate_metrics(path: str, step: int) -> int:
    """Rewrite ``path`` (JSONL, one {"step": ...} record a line) without the records past ``step``
    and without an unreadable (half-written) line; returns how many lines were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    dropped = len(lines) - len(keep)
    if dropped:
        atomic_write(path, lambda f: f.write("".join(keep).encode()))
    return dropped


def after_restore(manager: ocp.CheckpointManager, step: int, config, workdir: str) -> None:
    """What resuming at ``step`` prints and tidies: the checkpoint it came from, a warning if the
    curriculum changed, metrics.jsonl cut back to ``step`` (process 0), and whether the run is
    already complete."""
    say(f"resumed from {manager.directory}/{step}")
    warning = curriculum_change(saved_config(manager, step), config, step)
    if warning:
        say(warning)
    if jax.process_index() == 0:
        dropped = truncate_metrics(os.path.join(workdir, "metrics.jsonl"), step)
        if dropped:
            say(f"dropped {dropped} metrics.jsonl lines past step {step} (written after the last checkpoint "
                "by a run that was killed)")
    if step >= config.total_steps:
        say(f"the run is complete: step {step} of total_steps={config.total_steps} is saved; nothing to "
            "train (raise --config.total_steps to continue it)")
