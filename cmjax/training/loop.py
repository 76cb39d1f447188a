"""The training loop: ``train_and_evaluate(config, workdir)``.

    mesh (all devices, axis "data") -> family (model + parameterisation) -> optimizer
    -> state created sharded (jit with out_shardings), or restored from WORKDIR's latest checkpoint
    -> for each step: host batch -> global batch -> jitted step (state donated)
         every step      : metrics of the previous step fetched; NaN/inf stops the run
         log_every       : mean metrics, steps/s, examples/s -> stdout, metrics.jsonl, TensorBoard
         sample_every    : 1- and 2-step sample grids (EMA params); decoder: reconstruction PSNR
         checkpoint_every: async orbax save (state, iterator, config); SIGTERM: save and return

A run is resumed by running the same command again: the latest complete checkpoint is restored
(params, EMA, optimizer, step, RNG and the data iterator), so the steps that follow are the ones
an uninterrupted run would have taken.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cmjax import data as data_lib
from cmjax import parallel
from cmjax.evaluation import fid as fid_lib
from cmjax.evaluation import metrics as eval_metrics
from cmjax.training import algorithms, input_pipeline, reporting, resume, run_checkpoints
from cmjax.training.algorithms import Model
from cmjax.training.families import Family, make_family
from cmjax.training.optim import make_optimizer
from cmjax.training.state import TrainState, create_train_state, prng_impl, train_state_layout
from cmjax.training.step import make_train_step

_LAST_VALUE = ("num_scales", "lr", "target_ema")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the run stopped before checkpointing that state."""


def run_step(step_fn, config, *args):
    """``step_fn(*args)``; a step that does not fit a device's memory (XLA's RESOURCE_EXHAUSTED, from
    the TPU compiler or at run time) becomes a ValueError saying what shrinks it."""
    try:
        return step_fn(*args)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        per_device = config.batch_size // jax.device_count()
        hints = ([] if config.remat else ["--config.remat=True"]) + ([] if config.fsdp else ["--config.fsdp=True"])
        hints.append("a smaller --config.batch_size (with --config.optim.grad_accum_steps for the same update)")
        first = str(e).strip().splitlines()[0] if str(e).strip() else "RESOURCE_EXHAUSTED"
        raise ValueError(f"the train step at {per_device} examples per device does not fit a device's memory "
                         f"({first}); try {', '.join(hints)}") from None

def validate_config(config, family: Optional[Family] = None) -> None:
    """Fail early, with a message naming the field, on settings that cannot work."""
    if config.family not in ("image", "decoder"):
        raise ValueError(f"family={config.family!r}: expected 'image' or 'decoder'")
    algorithms.validate(config, family)
    if config.optim.grad_accum_steps < 1:
        raise ValueError("optim.grad_accum_steps must be >= 1")
    if config.batch_size % jax.device_count():
        raise ValueError(f"batch_size={config.batch_size} is not divisible by {jax.device_count()} devices")


class _StopFlag:
    """Set by SIGTERM (preemption); the loop then saves and returns cleanly."""
    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, metrics: dict, manager) -> None:
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
        manager.wait_until_finished()
        latest = manager.latest_step()
        kept = (f"the last good checkpoint (step {latest}) in {manager.directory} is intact" if latest is not None
                else f"no checkpoint had been saved yet in {manager.directory}, so a rerun starts afresh")
        raise NonFiniteLossError(
            f"non-finite metrics at step {step}: {bad}. Stopping without saving this state; {kept}. "
            "Lower optim.lr, raise optim.warmup_steps or set optim.grad_clip, then rerun"
            f"{' to resume' if latest is not None else ''}.")


def make_evaluator(config, family: Family, model: Model, mesh, frozen, eval_host_batch):
    """Returns ``evaluate(params, step, workdir) -> metrics``: sample grids (+ decoder PSNR)."""
    rep = parallel.replicated(mesh)
    num = int(config.num_eval_images)
    if not family.conditional:
        fns = {s: jax.jit(lambda p, k, s=s: model.sample(p, k, num, s), out_shardings=rep)
               for s in (1, 2)}
        inputs = None
    else:
        batch = jax.device_put({k: jnp.asarray(v) for k, v in eval_host_batch.items()}, rep)
        latents = jax.jit(family.latents_of, out_shardings=rep)(batch, frozen)
        inputs = np.asarray(batch["image"])
        fns = {s: jax.jit(lambda p, k, s=s: model.sample(p, k, latents, s), out_shardings=rep)
               for s in (1, 2)}
    upscale = max(1, 64 // family.image_shape[0])
    fid_cb = None
    if not family.conditional and config.fid_every > 0:

        ref = fid_lib.reference_statistics(config.fid_reference, resolution=family.image_shape[0],
                                           max_images=config.fid_max_ref_images or None,
                                           data_dir=config.data.data_dir or None, progress=False)
        fid_cb = fid_lib.fid_callback(lambda p, k, n: model.sample(p, k, n, 1), ref,
                                      num_samples=int(config.fid_num_samples),
                                      batch_size=min(250, int(config.fid_num_samples)), name="fid_1step")

    def evaluate(params, step: int, workdir: str) -> dict:
        metrics, rows = {}, []
        if fid_cb is not None and step % config.fid_every == 0:
            metrics.update(fid_cb(params, step))
        for s, fn in fns.items():
            out = np.asarray(fn(params, jax.random.key(config.seed + 17, impl=prng_impl(config))))
            if inputs is not None:
                metrics[f"psnr_{s}step"] = eval_metrics.mean_psnr(out, inputs, clip=False)
                rows.append(out)
            elif jax.process_index() == 0:
                reporting.save_grid(os.path.join(workdir, "samples", f"{step:08d}_{s}step.png"), out,
                                    upscale=upscale)
        if inputs is not None and jax.process_index() == 0:
            grid = np.concatenate([inputs] + rows, axis=0)  # rows: inputs, 1-step, 2-step
            reporting.save_grid(os.path.join(workdir, "samples", f"{step:08d}_recon.png"), grid,
                                ncols=len(inputs), upscale=upscale)
        return metrics

    return evaluate


def _load_init_params(config, family: Family, model: Model, mesh, frozen) -> Any:
    """Fine-tuning starting points: a converted decoder checkpoint (moved to a new latent space if
    asked), or the EMA params of the run the algorithm starts from (CD: its teacher; ECT: ect.init)."""
    if family.init_checkpoint_params is not None:
        params = family.init_checkpoint_params()
        if params is not None:
            return params
    path = algorithms.get(config.algorithm).init_from(config)
    if not path:
        return None
    if "teacher" in frozen and path == algorithms.get(config.algorithm).teacher(config):
        return frozen["teacher"]
    return run_checkpoints.load_run_params(path, model.init_params, mesh, config)


def _frozen_inputs(config, family: Family, algo, mesh) -> tuple[dict, dict]:
    """(frozen, their shardings): the teacher's params (CD, sCD) and the decoder's latent encoder."""
    frozen, frozen_sh = {}, {}
    if algo.needs_teacher:
        frozen["teacher"], frozen_sh["teacher"] = run_checkpoints.load_teacher(algo.teacher(config), config, family,
                                                                             mesh, config.fsdp)
    if family.conditional:
        enc, enc_sh = run_checkpoints.load_encoder(config, family, mesh)
        if enc is not None:
            frozen["encoder"], frozen_sh["encoder"] = enc, enc_sh
    return frozen, frozen_sh


def _start_state(config, workdir, family, algo, model, tx, mesh, frozen, manager, iterator):
    """(state, shardings): created sharded (from a fine-tuning start if any), or restored from the
    latest checkpoint straight into its layout (nothing is initialised then)."""
    if manager.latest_step() is None:
        init_params = _load_init_params(config, family, model, mesh, frozen)
        return create_train_state(model.init_params, tx, config, mesh, init_params, keeps_target=algo.keeps_target)
    abstract, shardings = train_state_layout(model.init_params, tx, config, mesh, keeps_target=algo.keeps_target)
    state, latest = run_checkpoints.restore_latest(manager, abstract, shardings, iterator)
    resume.after_restore(manager, latest, config, workdir)
    return state, shardings


class _Meter:
    """The metrics of the steps since the last log (fetched one step late, so the device keeps
    working), and the training speed: timed from the end of the first (compiling) step, with
    evaluation and saving left out."""

    def __init__(self, total: int, batch_size: int, manager):
        self.window, self.t_start, self.n_timed, self.t_compile = [], None, 0, None
        self.progress, self.batch_size, self.manager = reporting.Progress(total), batch_size, manager

    def collect(self, item) -> None:
        s, m = item
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        _check_finite(s, m, self.manager)
        self.window.append(m)
        self.progress.update(s, m.get("loss"))

    def before_step(self) -> None:
        if self.t_start is None:
            reporting.say("compiling the train step (once per input shape) ...")
            self.t_compile = time.perf_counter()

    def after_step(self, step: int, metrics) -> None:
        if self.t_start is not None:
            self.n_timed += 1
            return
        jax.block_until_ready(metrics)
        self.t_start, self.n_timed = time.perf_counter(), 0
        reporting.say(f"compiled and ran the first step in {self.t_start - self.t_compile:.1f} s")
        self.progress.start(step)

    def flush(self, state) -> dict:
        """Means over the window (schedules: N, lr, target EMA at the logged step) and speed."""
        w = self.window
        mean = {k: (w[-1][k] if k in _LAST_VALUE else float(np.mean([m[k] for m in w]))) for k in w[-1]}
        if self.n_timed:
            jax.block_until_ready(state.step)
            dt = time.perf_counter() - self.t_start
            mean["steps_per_sec"] = self.n_timed / dt
            mean["examples_per_sec"] = self.n_timed * self.batch_size / dt
            self.t_start, self.n_timed = time.perf_counter(), 0
        self.window = []
        return mean

    @contextlib.contextmanager
    def paused(self):
        t_pause = time.perf_counter()
        yield
        if self.t_start is not None:
            self.t_start += time.perf_counter() - t_pause


def _write_if_any(writer, step: int, metrics: Optional[dict]) -> None:
    if metrics:
        writer.write(step, metrics)


def _export(config, family: Family, state, workdir: str, step: int, first_step: int) -> Optional[str]:
    """The decoder family's EMA params as a cmjax decoder checkpoint (WORKDIR/decoder_ema) at the end."""
    total = int(config.total_steps)
    if family.export_checkpoint is None or not config.export_decoder or step < total or jax.process_count() != 1:
        return None
    exported = os.path.join(workdir, "decoder_ema")  # what decode.py / cmjax.load_decoder read
    if step > first_step or not os.path.isdir(exported):  # a complete run rerun: already exported
        family.export_checkpoint(jax.device_get(state.ema_params), exported)
    return exported


def jit_train_step(family: Family, config, tx, schedule, mesh, shardings, frozen_shardings):
    """The jitted train step as the loop runs it: state in ``shardings`` (donated), batch split over
    the mesh's data axis, metrics replicated (also what benchmarks/plan_tpu.py compiles for TPUs)."""
    step = make_train_step(family, config, tx, schedule, param_shardings=shardings.params if config.fsdp else None)
    return jax.jit(step,
                   in_shardings=(shardings, parallel.data_sharding(mesh), frozen_shardings),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))


def train_and_evaluate(config, workdir: str) -> TrainState:
    """Train (or resume) the run described by ``config`` in ``workdir``; returns the final state."""
    parallel.initialize_distributed(config.coordinator_address or None,
                                    config.num_processes or None, config.process_id)
    workdir = os.path.abspath(workdir)
    mesh = parallel.make_mesh()
    family = make_family(config)
    validate_config(config, family)
    algo = algorithms.get(config.algorithm)
    model = algo.model(family, config)
    tx, schedule = make_optimizer(config)
    frozen, frozen_sh = _frozen_inputs(config, family, algo, mesh)
    source = input_pipeline.make_source(config)
    iterator = iter(input_pipeline.make_loader(config, source))
    manager = run_checkpoints.make_manager(workdir, config.keep_checkpoints, config.async_checkpointing)
    state, shardings = _start_state(config, workdir, family, algo, model, tx, mesh, frozen, manager, iterator)
    data_sh = parallel.data_sharding(mesh)
    step_fn = jit_train_step(family, config, tx, schedule, mesh, shardings, frozen_sh)
    evaluate = None
    if config.sample_every > 0:
        eval_batch = input_pipeline.eval_batch(config, source) if family.conditional else None
        evaluate = make_evaluator(config, family, model, mesh, frozen, eval_batch)
    writer = reporting.MetricWriter(workdir, config.tensorboard)

    step, total = int(jax.device_get(state.step)), int(config.total_steps)
    if evaluate is not None and step == 0 and config.sample_at_start:
        _write_if_any(writer, 0, evaluate(state.ema_params, 0, workdir))
    meter, pending, first_step = _Meter(total, config.batch_size, manager), None, step
    try:
        with _StopFlag() as stop:
            while step < total:
                run_checkpoints.check_saves(manager)  # a failed async save stops the run now
                meter.before_step()
                state, metrics = run_step(step_fn, config, state, data_lib.to_global_batch(next(iterator), data_sh), frozen)
                step += 1
                if pending is not None:
                    meter.collect(pending)
                pending = (step, metrics)
                stopping = stop.requested  # read once: the step that is saved is the one we stop at
                log_now = step % config.log_every == 0 or step == total
                save_now = step % config.checkpoint_every == 0 or step == total or stopping
                sample_now = evaluate is not None and (step % config.sample_every == 0 or step == total)
                if log_now or save_now or sample_now:
                    meter.collect(pending)
                    pending = None
                meter.after_step(step, metrics)
                if log_now and meter.window:
                    writer.write(step, meter.flush(state))
                with meter.paused():
                    if sample_now:
                        _write_if_any(writer, step, evaluate(state.ema_params, step, workdir))
                    if save_now:
                        run_checkpoints.save(manager, step, state, iterator, config)
                if stopping:
                    print(f"SIGTERM: saved step {step} to {manager.directory}; exiting", flush=True)
                    break
    finally:
        meter.progress.close()
        try:
            run_checkpoints.finish(manager)
        finally:
            writer.close()
    exported = _export(config, family, state, workdir, step, first_step)
    manager.close()
    reporting.say(reporting.run_outputs(workdir, step, total, samples=evaluate is not None,
                                        tensorboard=config.tensorboard, exported=exported))
    return state
