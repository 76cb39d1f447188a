"""Tests for consistency-model training (cmjax.training, train.py, configs/).

What they pin:
  * one real step of every algorithm (ict, ct, cd, edm) x family (image, decoder): finite loss,
    params move, the eval EMA and the CT/CD target EMA follow their formulas exactly;
  * the loop end to end on mock TFDS data: an 'edm' teacher run, then CD from its checkpoint;
  * learning on real data: a tiny image iCT on the 8x8 digits (loss falls; samples move closer to
    the data set by mean nearest-neighbour distance) and a tiny decoder fine-tune (PSNR rises);
  * SIGKILL + rerun resumes with the losses of an uninterrupted run; SIGTERM saves and exits 0;
  * 8 simulated devices (data parallel and FSDP) give the 1-device loss;
  * a NaN loss stops the run with the last good checkpoint intact.

Compiles dominate on CPU, so the module turns on JAX's persistent compilation cache (in a temp
dir) and the runs that must match share one program.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import consistency as C
from cmjax import data, parallel
from cmjax.decoding import schedule
from cmjax.training import (
    NonFiniteLossError,
    algorithms,
    families,
    input_pipeline,
    optim,
    reporting,
    run_checkpoints,
    train_and_evaluate,
    validate_config,
)
from cmjax.training import state as state_lib
from cmjax.training import step as step_lib
from configs import (
    cifar10_ect,
    cifar10_ict,
    cifar10_meanflow,
    cifar10_sct,
    decoder_finetune,
    decoder_tiny,
    default,
    digits_ect,
    digits_meanflow,
    digits_sct,
    digits_tiny,
)
from tests.random_decoder import random_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(extra=None):
    """A subprocess's environment: this checkout, CPU, the session's compilation cache (conftest)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT, **(extra or {}))


def _read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------
# Configs


def micro_config(family: str, algorithm: str):
    """The smallest models that still exercise every code path (one level, 8 channels)."""
    if family == "image":
        c = digits_tiny.get_config()
        c.model.base_channels, c.model.channel_mult, c.model.num_groups = 8, (1,), 4
        c.model.embedding, c.model.embedding_size, c.model.dropout = "fourier", 16, 0.2
        c.batch_size = 8
    else:
        c = decoder_tiny.get_config()
        c.model.unet.block_out_channels, c.model.unet.norm_num_groups = (8,), 4
        c.data.image_size = 8  # 1x1 latents
        c.batch_size = 4
    c.algorithm = algorithm
    c.total_steps = 10
    c.sample_every = 0
    return c


# Tiny digits iCT used by the learning, resume and reference runs: one shared program.
# N is held at 21 (s0 = s1) so that the loss is comparable across the run.
LEARNING_OVERRIDES = {"ict.s0": 20, "ict.s1": 20, "batch_size": 32, "total_steps": 150,
                      "curriculum_steps": 150, "log_every": 1, "sample_every": 0}


def learning_config():
    c = digits_tiny.get_config()
    for key, value in LEARNING_OVERRIDES.items():
        node = c
        *path, leaf = key.split(".")
        for name in path:
            node = node[name]
        node[leaf] = value
    return c


def test_configs_load_and_cifar10_matches_the_paper():
    c = cifar10_ict.get_config()
    assert (c.algorithm, c.batch_size, c.optim.name, c.optim.lr) == ("ict", 1024, "radam", 1e-4)
    assert (c.model.dropout, c.total_steps, c.ema_decay) == (0.3, 400_000, 0.99993)
    assert (c.ict.s0, c.ict.s1, c.ict.p_mean, c.ict.p_std) == (10, 1280, -1.1, 2.0)
    f = decoder_finetune.get_config()
    assert f.family == "decoder" and f.model.unet.block_out_channels == (320, 640, 1024, 1024)
    for cfg in (default.get_config(), digits_tiny.get_config(), decoder_tiny.get_config(), f, c):
        json.dumps(run_checkpoints.config_json(cfg))  # checkpointable
    s = cifar10_sct.get_config()
    assert (s.algorithm, s.scm.p_mean, s.scm.p_std, s.scm.tangent_norm_c, s.scm.mid_t) == ("sct", -1.0, 1.4, 0.1, 1.1)
    e = cifar10_ect.get_config()  # locuslab/ect main: run_ecm.sh, ct_train.py defaults, ECMLoss, ECMPrecond
    assert (e.algorithm, e.batch_size, e.optim.name, e.optim.lr, e.model.dropout) == ("ect", 128, "radam", 1e-4, 0.2)
    assert (e.ect.q, e.ect.k, e.ect.b, e.ect.c, e.ect.stage_steps, e.total_steps) == (2.0, 8.0, 1.0, 0.0, 25_000, 200_000)
    assert (e.ect.weighting, e.ect.sample_sigma_min, e.sampling.mid_sigma) == ("inverse_dt", 0.003, 0.821)
    m = cifar10_meanflow.get_config()
    assert (m.algorithm, m.model.time_inputs) == ("meanflow", 2)
    for cfg in (s, e, m, digits_sct.get_config(), digits_ect.get_config(), digits_meanflow.get_config()):
        validate_config(cfg)


def test_validate_config_names_the_problem():
    c = digits_meanflow.get_config()
    c.model.time_inputs = 1
    with pytest.raises(ValueError, match="time_inputs=2"):
        validate_config(c)
    c = decoder_tiny.get_config()
    c.algorithm = "sct"
    with pytest.raises(ValueError, match="supports family image"):
        validate_config(c)
    c = digits_tiny.get_config()
    c.algorithm = "scd"
    with pytest.raises(ValueError, match="cd.teacher"):
        validate_config(c)
    c.algorithm = "nope"
    with pytest.raises(ValueError, match="expected one of"):
        validate_config(c)
    c = digits_ect.get_config()
    c.ect.weighting = "snr"
    with pytest.raises(ValueError, match="ect.weighting='snr'"):
        validate_config(c)


# --------------------------------------------------------------------------------------------
# Decoder parameterisation: the discrete VP grid seen as EDM sigmas.


def test_decoder_grid_is_the_vp_schedule_in_edm_coordinates():
    fam = families.make_family(micro_config("decoder", "ict"))
    grid = fam.grid
    tables = schedule.decoder_schedule()
    # sigma_t = sqrt(1/abar - 1) = sqrt(1 - abar) / sqrt(abar): the VP state is sqrt(abar) * (x0 + sigma z).
    np.testing.assert_allclose(grid.sigmas * tables.sqrt_alphas_cumprod, tables.sqrt_one_minus_alphas_cumprod,
                               rtol=1e-5)
    assert grid.num_allowed == 64
    for n in (2, 11, 64):
        ts = np.asarray(grid.timestep_at(jnp.arange(n), n))
        assert ts[0] == 0 and ts[-1] == 1008 and np.all(np.diff(ts) > 0) and np.all(ts % 16 == 0)
        sig = np.asarray(grid.sigma_at(jnp.arange(n), n))
        np.testing.assert_array_equal(np.asarray(grid.timestep_of(sig)), ts)  # exact inverse
    # The consistency function in EDM coordinates is cmjax.decoding.decoder.denoise on the VP state.
    from cmjax.decoding.decoder import denoise
    params = random_params(jax.eval_shape(fam.init_params, jax.random.key(0)))  # no init compile
    x0 = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
    z = jax.random.normal(jax.random.key(2), x0.shape)
    cond = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    t = jnp.array([512, 16])
    sig = jnp.asarray(grid.sigmas)[t]
    x_t = (tables.sqrt_alphas_cumprod[np.asarray(t)][:, None, None, None] * x0
           + tables.sqrt_one_minus_alphas_cumprod[np.asarray(t)][:, None, None, None] * z)
    got, want = jax.jit(lambda p: (fam.consistency_fn(p, x0 + sig[:, None, None, None] * z, sig, cond),
                                   denoise(p, x_t, cond, t, fam.config)))(params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_fsdp_spec_shards_the_largest_divisible_axis():
    assert state_lib.fsdp_spec((3, 3, 64, 128), 8, 1) == jax.sharding.PartitionSpec(None, None, None, "data")
    assert state_lib.fsdp_spec((1024, 320), 8, 1) == jax.sharding.PartitionSpec("data", None)
    assert state_lib.fsdp_spec((3, 5), 8, 1) == jax.sharding.PartitionSpec()
    assert state_lib.fsdp_spec((4096,), 8, 10_000) == jax.sharding.PartitionSpec()  # too small
    assert state_lib.fsdp_spec((4096,), 1, 1) == jax.sharding.PartitionSpec()


# --------------------------------------------------------------------------------------------
# One real step of every algorithm x family.


def _frozen_for(config, fam):
    frozen = {}
    if config.family == "decoder":
        mesh = parallel.make_mesh(jax.devices()[:1])
        frozen["encoder"], _ = run_checkpoints.load_encoder(config, fam, mesh)
    if config.algorithm == "cd":
        frozen["teacher"] = random_params(jax.eval_shape(fam.init_params, jax.random.key(99)), 99)
    return frozen


# The quick tier runs one step of each family (iCT on images, CT on the decoder: the train loop, both
# data paths and the encoder); every other algorithm x family is slow (each loss is pinned by
# tests/test_consistency.py and tests/test_reference_values.py in the quick tier too).
@pytest.mark.parametrize("algorithm, family", [
    ("ict", "image"), ("ct", "decoder"),
    *(pytest.param(a, f, marks=pytest.mark.slow) for a, f in [("cd", "decoder"), ("edm", "image"), ("ict", "decoder"),
                                                              ("ct", "image"), ("cd", "image"), ("edm", "decoder")])])
def test_one_train_step(family, algorithm, tmp_path):
    """One step on in-memory digits. image/edm also accumulates 2 micro-batches (optax.MultiSteps):
    its first micro-step must leave params and EMA untouched, the second update both.
    decoder/edm encodes its latents on the fly with a (tiny, random) SD VAE checkpoint, decoder/ct
    reads precomputed pairs from an .npz, the others use the fixed patch encoder."""
    config = micro_config(family, algorithm)
    accumulate = (family, algorithm) == ("image", "edm")
    if accumulate:
        config.optim.grad_accum_steps = 2
    if (family, algorithm) == ("decoder", "edm"):
        from cmjax.models import vae as vae_lib
        from cmjax.weights.checkpoint import save_vae

        vcfg = vae_lib.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
        params = jax.jit(lambda k: vae_lib.init_params(vcfg, k, parts=("encoder",)))(jax.random.key(5))
        save_vae(vae_lib.VAE(vcfg, params), tmp_path / "vae")
        config.data.latents, config.data.vae_checkpoint = "vae", str(tmp_path / "vae")
    if (family, algorithm) == ("decoder", "ct"):  # precomputed image/latent pairs from an .npz
        images = np.repeat(data.digits_images(8)[:32], 3, axis=-1)
        latents = np.random.default_rng(0).normal(0, 5, (32, 1, 1, 4)).astype(np.float32)
        np.savez(tmp_path / "pairs.npz", images=images, latents=latents)
        config.data.source, config.data.path, config.data.latents = "npz", str(tmp_path / "pairs.npz"), "file"
    fam = families.make_family(config)
    tx, sched = optim.make_optimizer(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state, _ = state_lib.create_train_state(fam.init_params, tx, config, mesh,
                                            keeps_target=algorithms.get(algorithm).keeps_target)
    p0 = jax.device_get(state.params)
    assert (state.target_params is None) == (algorithm in ("ict", "edm"))
    loader = iter(input_pipeline.make_loader(config))
    batch = next(loader)
    assert batch["image"].shape == (config.batch_size, *fam.image_shape)
    assert ("latent" in batch) == (family == "decoder" and config.data.latents == "file")
    step = jax.jit(step_lib.make_train_step(fam, config, tx, sched))
    frozen = _frozen_for(config, fam)
    new, metrics = step(state, batch, frozen)
    if accumulate:  # first micro-batch: gradients accumulated, nothing applied
        for tree in jax.device_get((new.params, new.ema_params)):
            for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(tree)):
                np.testing.assert_array_equal(a, b)
        new, metrics = step(new, next(loader), frozen)
    m = jax.device_get(metrics)
    assert np.isfinite(m["loss"]) and m["loss"] > 0 and m["grad_norm"] > 0
    assert int(new.step) == (2 if accumulate else 1)
    if algorithm != "edm":
        assert int(m["num_scales"]) >= 2
    p1 = jax.device_get(new.params)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1))]
    assert sum(moved) > 0.9 * len(moved)
    d = config.ema_decay
    for e, a, b in zip(jax.tree.leaves(jax.device_get(new.ema_params)), jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(e, d * a + (1 - d) * b, rtol=1e-6, atol=1e-7)
    if algorithm in ("ct", "cd"):
        mu = float(m["target_ema"]) if algorithm == "ct" else config.cd.target_ema
        if algorithm == "ct":
            assert mu == pytest.approx(C.ct_ema_decay(0, config.total_steps, config.ct.mu0, config.ct.s0, config.ct.s1))
        for tgt, a, b in zip(jax.tree.leaves(jax.device_get(new.target_params)), jax.tree.leaves(p0),
                             jax.tree.leaves(p1)):
            np.testing.assert_allclose(tgt, mu * a + (1 - mu) * b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# The loop end to end on mock TFDS: an EDM teacher, then CD from its checkpoint.


@pytest.mark.slow
def test_loop_on_mock_tfds_edm_teacher_then_cd(tmp_path):
    import tensorflow_datasets as tfds

    teacher_dir, cd_dir = str(tmp_path / "edm"), str(tmp_path / "cd")
    with tfds.testing.mock_data(num_examples=16):
        c = micro_config("image", "edm")
        c.data.source, c.data.name, c.data.split = "tfds", "mnist", "train"
        c.total_steps, c.log_every, c.checkpoint_every, c.sample_every = 2, 1, 1, 2
        c.num_eval_images = 4
        teacher = train_and_evaluate(c, teacher_dir)

        c2 = micro_config("image", "cd")
        c2.data.source, c2.data.name = "tfds", "mnist"
        c2.cd.teacher = teacher_dir
        c2.total_steps, c2.log_every = 1, 1
        student = train_and_evaluate(c2, cd_dir)

    assert sorted(os.listdir(os.path.join(teacher_dir, "checkpoints"))) == ["1", "2"]
    losses = [r for r in _read_metrics(teacher_dir) if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2] and all(np.isfinite(r["loss"]) for r in losses)
    for s in (1, 2):
        png = os.path.join(teacher_dir, "samples", f"00000002_{s}step.png")
        assert os.path.getsize(png) > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(teacher_dir, "tensorboard")))
    saved = json.load(open(os.path.join(teacher_dir, "checkpoints", "2", "config", "metadata")))
    assert saved["algorithm"] == "edm"
    # CD read the teacher's EMA params and (cd.init_from_teacher) started the student from them.
    fam = families.make_family(c2)
    abstract = jax.eval_shape(fam.init_params, jax.random.key(0))
    mesh = parallel.make_mesh(jax.devices()[:1])
    restored = run_checkpoints.restore_params(teacher_dir, abstract, state_lib.tree_shardings(abstract, mesh, False))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(teacher.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    d = c2.ema_decay  # student EMA after one step: d * teacher + (1 - d) * params_1
    for e, t, p in zip(jax.tree.leaves(student.ema_params), jax.tree.leaves(teacher.ema_params),
                       jax.tree.leaves(student.params)):
        np.testing.assert_allclose(np.asarray(e), d * np.asarray(t) + (1 - d) * np.asarray(p), rtol=1e-5, atol=1e-6)
    assert int(student.step) == 1


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    c = micro_config("image", "ict")
    c.optim.name, c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip = "adam", 1e30, 0, 0.0
    c.total_steps, c.checkpoint_every, c.log_every = 6, 1, 1
    workdir = str(tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train_and_evaluate(c, workdir)
    good = [r for r in _read_metrics(workdir) if "loss" in r]
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps and steps[-1] == good[-1]["step"] < 6  # nothing saved after the bad step
    fam = families.make_family(c)
    abstract = jax.eval_shape(fam.init_params, jax.random.key(0))
    mesh = parallel.make_mesh(jax.devices()[:1])
    params = run_checkpoints.restore_params(workdir, abstract, state_lib.tree_shardings(abstract, mesh, False), "params")
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def _ckpt_steps(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_newest_good_step(tmp_path, capfd):
    c = micro_config("image", "ict")
    c.total_steps, c.checkpoint_every, c.log_every, c.keep_checkpoints = 3, 1, 1, 2
    workdir = str(tmp_path / "run")
    train_and_evaluate(c, workdir)
    assert _ckpt_steps(workdir) == [2, 3]
    # Cut every data file of step 3's state in half (a crash mid-copy, a bad disk).
    state_dir = os.path.join(workdir, "checkpoints", "3", "state")
    cut = 0
    for root, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 1024:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                cut += 1
    assert cut
    capfd.readouterr()
    c.total_steps = 5
    train_and_evaluate(c, workdir)
    out, err = capfd.readouterr()
    assert f"resumed from {workdir}/checkpoints/2" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any("checkpoints/3 cannot be read" in line for line in warnings), err[-2000:]
    # The bad step is kept aside, not deleted; the good one it fell back to was not pruned early.
    assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", "3", "state"))
    assert _ckpt_steps(workdir) == [4, 5]
    resumed = [r["step"] for r in _read_metrics(workdir) if "loss" in r]
    assert resumed[-3:] == [3, 4, 5]


class _FailingManager:
    """Stands in for an orbax CheckpointManager whose steps all fail to read / whose save failed."""

    directory = "/runs/x/checkpoints"

    def all_steps(self):
        return [4, 8]

    def restore(self, step, args):
        raise ValueError(f"NOT_FOUND: Error reading step {step}\n  (200 more lines of TensorStore detail)")

    def check_for_errors(self):
        raise OSError(28, "No space left on device")

    wait_until_finished = check_for_errors


def test_checkpoint_failures_are_one_line_errors(capsys):
    m = _FailingManager()
    with pytest.raises(run_checkpoints.CheckpointRestoreError) as e:
        empty = types.SimpleNamespace(to_dict=dict)
        run_checkpoints.restore_latest(m, empty, empty, None)
    assert "no checkpoint in /runs/x/checkpoints can be read (steps 8, 4" in str(e.value)
    assert "\n" not in str(e.value) and "NOT_FOUND: Error reading step 8" in str(e.value)
    err = capsys.readouterr().err
    assert "checkpoint /runs/x/checkpoints/8 cannot be read" in err and "/4 cannot be read" in err
    for check in (run_checkpoints.check_saves, run_checkpoints.finish):
        with pytest.raises(run_checkpoints.CheckpointSaveError, match="No space left on device") as e:
            check(m)
        assert "\n" not in str(e.value) and "previous checkpoints are intact" in str(e.value)


@pytest.mark.slow
def test_failed_async_save_stops_train_py_with_one_message(tmp_path):
    """A full disk, simulated with RLIMIT_FSIZE (writes past 20 KB fail with EFBIG, as ENOSPC): one
    line, the last, and none of the tracebacks orbax and tensorstore's callbacks print on the way
    (about 1,900 lines of them before cli.train.quiet_failed_saves)."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "train.py", "--config", "configs/digits_tiny.py", "--workdir", workdir,
           "--config.total_steps=6", "--config.checkpoint_every=2", "--config.sample_every=0",
           "--config.model.base_channels=8", "--config.model.channel_mult=(1,)", "--config.model.num_groups=4",
           "--config.batch_size=8"]
    # Its own compilation cache: entries written under the size limit are cut short, and other
    # tests reading them from the session's cache would warn and compile again.
    env = _env({"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")})
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600, preexec_fn=limit_file_size)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("training stopped: a checkpoint save to ") and "File too large" in last, last
    assert "Traceback" not in proc.stderr and "ERROR:absl" not in proc.stderr, proc.stderr[-3000:]
    assert _ckpt_steps(workdir) == []  # no half-written step passes for a checkpoint


# --------------------------------------------------------------------------------------------
# Learning on real data.


@pytest.mark.learning
def test_digits_image_cm_learns(tmp_path):
    """iCT on the 8x8 digits, 150 steps of batch 32. Metric: mean over 256 samples (EMA params) of
    the L2 distance to the nearest of the 1797 digits (pixels in [-1, 1]); it must fall below 0.8x
    its value at init for 1-step and 2-step samples (measured: 6.13 -> 3.75 and 6.36 -> 4.19, i.e.
    0.61x and 0.66x), and the mean loss of the last 30 steps must be >= 10% below that of the first
    30 (measured: about 18%)."""
    c = learning_config()
    workdir = str(tmp_path / "digits")
    state = train_and_evaluate(c, workdir)
    losses = np.array([r["loss"] for r in _read_metrics(workdir) if "loss" in r])
    assert len(losses) == 150
    assert losses[-30:].mean() < 0.9 * losses[:30].mean()
    fam = families.make_family(c)
    init = jax.jit(fam.init_params)(jax.random.key(c.seed, impl=c.prng_impl))
    dataset = data.digits_images(8).astype(np.float32) / 127.5 - 1.0
    for steps in (1, 2):
        sample = jax.jit(lambda p, k: fam.sample(p, k, 256, steps))
        before = reporting.nearest_neighbour_distance(np.asarray(sample(init, jax.random.key(7))), dataset)
        after = reporting.nearest_neighbour_distance(np.asarray(sample(state.ema_params, jax.random.key(7))), dataset)
        assert after < 0.8 * before, (steps, before, after)


JVP_LEARNING = {"sct": digits_sct, "ect": digits_ect, "meanflow": digits_meanflow}


@pytest.mark.learning
@pytest.mark.parametrize("algorithm", sorted(JVP_LEARNING))
def test_digits_few_step_algorithms_learn(algorithm, tmp_path):
    """sCT, ECT and MeanFlow on the 8x8 digits, 150 steps of batch 32 from scratch (ECT: stages of
    50 updates, as configs/digits_ect.py; with 20, i.e. 7 stages, from scratch it reached only
    0.84x). The run is reloaded as `python -m cmjax.eval` / `cmjax.edit` do
    (cmjax.training.trained.load_image_cm) and sampled with the algorithm's own 1- and 2-step
    sampler: the mean nearest-neighbour distance of 256 samples to the digits (pixels in [-1, 1])
    must fall below 0.8x that of the untrained model's samples (measured in the README table)."""
    from cmjax.training.algorithms import get
    from cmjax.training.trained import load_image_cm

    c = JVP_LEARNING[algorithm].get_config()
    c.total_steps, c.curriculum_steps, c.batch_size, c.log_every, c.sample_every = 150, 150, 32, 10, 0
    workdir = str(tmp_path / algorithm)
    train_and_evaluate(c, workdir)
    losses = np.array([r["loss"] for r in _read_metrics(workdir) if "loss" in r])
    assert len(losses) == 15 and np.all(np.isfinite(losses))
    trained = load_image_cm(workdir)
    assert trained.config.algorithm == algorithm and trained.step == 150
    model = get(algorithm).model(families.make_family(c), c)
    init = jax.jit(model.init_params)(jax.random.key(c.seed, impl=c.prng_impl))
    dataset = data.digits_images(8).astype(np.float32) / 127.5 - 1.0
    for steps in (1, 2):
        sample = jax.jit(lambda p, k: model.sample(p, k, 256, steps))
        before = reporting.nearest_neighbour_distance(np.asarray(sample(init, jax.random.key(7))), dataset)
        after = reporting.nearest_neighbour_distance(np.asarray(sample(trained.params, jax.random.key(7))), dataset)
        assert after < 0.8 * before, (algorithm, steps, before, after)
    # The editing tools use the same model through its one-jump consistency function.
    y = jnp.asarray(dataset[:4])
    x0 = jax.jit(lambda p: model.consistency_fn(p, y, jnp.full((4,), 0.002)))(trained.params)
    np.testing.assert_allclose(np.asarray(x0), np.asarray(y), atol=0.05)  # f(x, ~0) ~ x


@pytest.mark.learning
def test_decoder_finetune_psnr_rises(tmp_path):
    """Fine-tune a tiny decoder checkpoint (cmjax.save_decoder of a random init) with iCT on 16x16
    digits for 120 steps. The SD VAE (cmjax.models.vae) is not used here: latents come from a fixed random
    linear 8x8-patch encoder (data.latents='patch'). The 1-step and 2-step reconstruction PSNR of a
    fixed eval batch (16 images) must rise by > 2 dB (measured: 7.44 -> 10.21 dB 1-step, 7.19 ->
    10.52 dB 2-step); the exported EMA decoder loads with cmjax.load_decoder."""
    from cmjax.models.decoder_config import Decoder
    from cmjax.weights.checkpoint import read_decoder, save_decoder

    c = decoder_tiny.get_config()
    c.ict.s0, c.ict.s1 = 10, 10
    c.total_steps, c.log_every = 120, 40
    c.sample_every, c.sample_at_start = 120, True
    fam = families.make_family(c)
    init_dir = str(tmp_path / "init_decoder")
    save_decoder(Decoder(fam.config, fam.init_params(jax.random.key(3))), init_dir)
    c.model.init_checkpoint = init_dir
    workdir = str(tmp_path / "dec")
    state = train_and_evaluate(c, workdir)
    evals = [r for r in _read_metrics(workdir) if "psnr_1step" in r]
    assert [r["step"] for r in evals] == [0, 120]
    for s in ("psnr_1step", "psnr_2step"):
        assert evals[1][s] > evals[0][s] + 2.0, evals
    exported = read_decoder(os.path.join(workdir, "decoder_ema"))
    for a, b in zip(jax.tree.leaves(exported.params), jax.tree.leaves(state.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.path.isfile(os.path.join(workdir, "samples", "00000120_recon.png"))


# --------------------------------------------------------------------------------------------
# Resumption: SIGKILL, rerun the same command; SIGTERM saves and exits cleanly.


def _wait_for_step(proc, workdir, step, skip_lines=0, timeout=240):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if os.path.exists(path):
            lines = open(path).read().splitlines()[skip_lines:]
            steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} in {timeout} s")


@pytest.mark.cli
def test_sigkill_then_rerun_resumes_exactly(tmp_path):
    # Reference: an uninterrupted run (same program; total_steps only bounds the loop).
    ref_config = learning_config()
    ref_config.total_steps, ref_config.checkpoint_every = 16, 1000
    ref_dir = str(tmp_path / "ref")
    train_and_evaluate(ref_config, ref_dir)
    ref = {r["step"]: r["loss"] for r in _read_metrics(ref_dir)}

    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "train.py", "--config", "configs/digits_tiny.py", "--workdir", workdir,
           *(f"--config.{k}={v}" for k, v in LEARNING_OVERRIDES.items()), "--config.checkpoint_every=4"]
    env = _env()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, workdir, 9)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()]
    assert all(r["loss"] == ref[r["step"]] for r in first if r["step"] in ref)  # subprocess == in-process
    ckpts = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert ckpts and ckpts[-1] >= 4
    n_kept = sum(r["step"] <= ckpts[-1] for r in first)
    assert n_kept < len(first)  # the killed run logged steps past its last checkpoint

    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, workdir, 14, skip_lines=n_kept)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from {workdir}/checkpoints/{ckpts[-1]}" in out
    assert f"dropped {len(first) - n_kept} metrics.jsonl lines past step {ckpts[-1]}" in out
    records = _read_metrics(workdir)
    # The killed run's records past the checkpoint were dropped: every step once, in order.
    assert [r["step"] for r in records] == list(range(1, records[-1]["step"] + 1))
    resumed = records[n_kept:]
    steps = [r["step"] for r in resumed]
    assert steps[0] == ckpts[-1] + 1
    for r in resumed:
        if r["step"] in ref:
            assert r["loss"] == ref[r["step"]], (r["step"], r["loss"], ref[r["step"]])
    assert len([r for r in resumed if r["step"] in ref]) >= 5
    # SIGTERM: the step it stopped at was saved before exiting.
    final = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())[-1]
    assert final == steps[-1] and "SIGTERM" in out


# --------------------------------------------------------------------------------------------
# 8 simulated devices.


@pytest.mark.cli
def test_eight_devices_give_the_one_device_loss():
    code = textwrap.dedent("""
        import json
        import jax, numpy as np
        from cmjax import parallel
        from cmjax.data import to_global_batch
        from cmjax.training import families, input_pipeline, optim, state as state_lib, step as step_lib
        from tests.test_train import micro_config

        assert jax.device_count() == 8
        out = {}
        for family, algorithm in (("image", "ict"),):  # dropout on: its masks must not depend on the layout
            c = micro_config(family, algorithm)
            c.batch_size = 8
            fam = families.make_family(c)
            tx, sched = optim.make_optimizer(c)
            host_batch = next(iter(input_pipeline.make_loader(c)))
            frozen = {}
            losses = {}
            for name, devices, fsdp in (("1", jax.devices()[:1], False), ("8", jax.devices(), False),
                                        ("8fsdp", jax.devices(), True)):
                c.fsdp, c.fsdp_min_size = fsdp, 64
                mesh = parallel.make_mesh(devices)
                state, sh = state_lib.create_train_state(fam.init_params, tx, c, mesh, keeps_target=False)  # ict
                batch = to_global_batch(host_batch, parallel.data_sharding(mesh))
                fn = jax.jit(step_lib.make_train_step(fam, c, tx, sched, param_shardings=sh.params if fsdp else None),
                             out_shardings=(sh, parallel.replicated(mesh)), donate_argnums=(0,))
                s1, m1 = fn(state, batch, jax.device_put(frozen, parallel.replicated(mesh)))
                s2, m2 = fn(s1, batch, jax.device_put(frozen, parallel.replicated(mesh)))
                n_sharded = sum(len(x.sharding.spec) > 0 and any(a is not None for a in x.sharding.spec)
                                for x in jax.tree.leaves(s2.params))
                losses[name] = [float(m1["loss"]), float(m2["loss"]), n_sharded]
            out[family] = losses
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=400,
                          env=_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for family, losses in out.items():
        one = losses["1"]
        for name in ("8", "8fsdp"):
            np.testing.assert_allclose(losses[name][:2], one[:2], rtol=2e-5, err_msg=f"{family} {name}")
        assert losses["1"][2] == 0 and losses["8"][2] == 0 and losses["8fsdp"][2] > 0


def test_a_step_that_does_not_fit_memory_says_what_shrinks_it():
    """XLA's RESOURCE_EXHAUSTED (the TPU compiler's refusal, or an allocation failing at run time)
    becomes one ValueError naming the examples per device and the settings that shrink the step;
    train.py prints it as one line. Other runtime errors pass through unchanged."""
    from cmjax.training.loop import run_step

    refusal = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(20.42G) exceeds available HBM (15.75G).\nmore detail")

    def fails(message):
        def step(*args):
            raise jax.errors.JaxRuntimeError(message)
        return step

    config = digits_tiny.get_config()
    config.batch_size = 8 * jax.device_count()
    with pytest.raises(ValueError) as err:
        run_step(fails(refusal), config, "state", "batch", "frozen")
    said = str(err.value)
    assert "\n" not in said and "at 8 examples per device" in said and "(20.42G)" in said
    assert "--config.remat=True" in said and "--config.fsdp=True" in said and "--config.batch_size" in said
    config.remat, config.fsdp = True, True
    with pytest.raises(ValueError) as err:
        run_step(fails(refusal), config)
    assert "remat" not in str(err.value) and "fsdp" not in str(err.value)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        run_step(fails("INTERNAL: something else"), config)
    assert run_step(lambda a, b: a + b, config, 1, 2) == 3
