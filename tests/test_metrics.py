"""Tests for reconstruction metrics (cmjax.evaluation.metrics) and `python -m cmjax.eval recon`.

What they pin:
  * PSNR against hand values (20 dB for a 0.1 error in [0, 1]; value ranges; clipping; inf);
  * SSIM against hand values (1 for identical images; the luminance term alone for constant
    images) and against an independent NumPy implementation of Wang et al. (Gaussian 11x11 window,
    sigma 1.5, 'valid' filtering), including the smaller window of 8x8 images;
  * the recon command: a table and JSON whose numbers are the metrics of what the two decoders
    return, and a grid image of input | GAN | consistency rows.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFont

from cmjax.evaluation import metrics


def test_psnr_hand_values():
    a = jnp.zeros((2, 8, 8, 3))
    np.testing.assert_allclose(metrics.psnr(a, a + 0.2), [20.0, 20.0], rtol=1e-5)  # [-1,1]: 0.1 of the range
    np.testing.assert_allclose(metrics.psnr(a, a + 0.02), [40.0, 40.0], rtol=1e-5)
    u = jnp.full((1, 4, 4, 1), 100.0)
    np.testing.assert_allclose(metrics.psnr(u, u + 10.2, value_range=(0, 255)), [-10 * math.log10(0.04 ** 2)],
                               rtol=1e-5)
    # Half the pixels off by 0.5 of the range: mse 0.125 -> 9.03 dB.
    b = a.at[:, :4].set(1.0)
    np.testing.assert_allclose(metrics.psnr(a, b), [-10 * math.log10(0.125)] * 2, rtol=1e-5)
    # Values outside the range are clipped first; identical images give inf.
    np.testing.assert_allclose(metrics.psnr(a, a + 5.0), metrics.psnr(a, a + 1.0), rtol=1e-6)
    assert np.all(np.isinf(metrics.psnr(a, a)))
    assert metrics.psnr(a[0], a[0] + 0.2).shape == ()  # one (H, W, C) image -> a scalar
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(a, a[:1])


def test_ssim_hand_values():
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    np.testing.assert_allclose(metrics.ssim(x, x), [1.0, 1.0], atol=1e-6)
    # Constant images: no variance, so SSIM is the luminance term (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    c1 = 0.01 ** 2
    a, b = jnp.full((1, 16, 16, 1), 0.5), jnp.full((1, 16, 16, 1), 0.25)
    expected = (2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1)
    np.testing.assert_allclose(metrics.ssim(a, b, value_range=(0, 1)), [expected], rtol=1e-5)
    # A contrast-inverted image of zero-mean texture around 0.5: SSIM ~ -1 (exactly (C1-ish) terms aside).
    t = 0.5 + 0.25 * jnp.sign(jax.random.normal(jax.random.key(1), (1, 32, 32, 1)))
    assert float(metrics.ssim(t, 1.0 - t, value_range=(0, 1))[0]) < -0.9


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
    g /= g.sum()
    return np.outer(g, g)


def ssim_numpy(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. (2004) on one (H, W, C) image pair in [0, 1]: 'valid' Gaussian filtering per channel."""
    w = gaussian_window(size, sigma)
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def filt(x):
        h, wd = x.shape
        out = np.empty((h - size + 1, wd - size + 1))
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[i, j] = np.sum(x[i:i + size, j:j + size] * w)
        return out

    maps = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = filt(x), filt(y)
        vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
        maps.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(maps))


@pytest.mark.parametrize("size", [16, 8])
def test_ssim_matches_an_independent_implementation(size):
    rng = np.random.default_rng(size)
    a = rng.uniform(0, 1, (2, size, size, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    window = 11 if size >= 11 else 7  # the largest odd window that fits 8x8
    ours = np.asarray(metrics.ssim(a, b, value_range=(0, 1)))
    ref = [ssim_numpy(a[i], b[i], window) for i in range(2)]
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert 0.3 < ref[0] < 0.99


def test_quantize():
    x = jnp.asarray([-1.0, -0.999, 0.0, 0.3, 1.0, 1.5])
    q = np.asarray(metrics.quantize(x))
    np.testing.assert_allclose((q + 1) * 127.5, np.round(np.clip((np.asarray(x) + 1) * 127.5, 0, 255)), atol=1e-4)


# --------------------------------------------------------------------------------------------
# The recon command with tiny random decoders


def random_params(abstract, seed: int):
    """Random weights shaped like ``abstract`` (compiling the models' init costs more than the test)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from cmjax.models import decoder_config
    from cmjax.models import vae as vae_lib
    from cmjax.models.decoder_unet import UNetConfig
    from cmjax.weights import checkpoint

    root = tmp_path_factory.mktemp("recon")
    dcfg = decoder_config.DecoderConfig(unet=UNetConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                                        norm_num_groups=4))
    dec = decoder_config.Decoder(dcfg, random_params(decoder_config.abstract_params(dcfg), 0))
    vcfg = vae_lib.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    vae = vae_lib.VAE(vcfg, random_params(vae_lib.abstract_params(vcfg), 1))
    checkpoint.save_decoder(dec, root / "decoder")
    checkpoint.save_vae(vae, root / "vae")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # one batch of 2: every program compiles once, shared with the checks below
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return root, dec, vae


def test_recon_cli_table_json_and_grid(tiny_checkpoints, tmp_path, capsys):
    from cmjax.cli.eval import main
    from cmjax.decoding import decoder as decoder_lib
    from cmjax.evaluation.metrics import reconstruction_metrics
    from cmjax.models import vae as vae_lib

    root, dec, vae = tiny_checkpoints
    out = tmp_path / "out"
    rc = main(["recon", "--images", str(root / "images"), "--decoder", str(root / "decoder"), "--vae",
               str(root / "vae"), "--size", "16", "--batch-size", "2", "--grid-images", "2", "--timesteps", "1008",
               "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "| decoder | PSNR (dB) | SSIM | images |" in text and "SD VAE GAN decoder" in text
    result = json.loads((out / "recon_metrics.json").read_text())
    assert [len(result["per_image"][k]["psnr"]) for k in ("gan", "consistency")] == [2, 2]
    # The reported numbers are the metrics of what the decoders return for the center crops.
    from cmjax.data import CenterCrop, ImageFolderSource

    src = ImageFolderSource(root / "images")
    x = np.stack([CenterCrop(16).map(src[i])["image"] for i in range(2)]).astype(np.float32) / 127.5 - 1
    latents = vae_lib.encode(vae, x)
    gan = reconstruction_metrics(x, jnp.clip(vae_lib.decode_gan(vae, latents), -1, 1))
    np.testing.assert_allclose(result["per_image"]["gan"]["psnr"], gan["psnr"], rtol=1e-5)
    np.testing.assert_allclose(result["per_image"]["gan"]["ssim"], gan["ssim"], rtol=1e-5, atol=1e-6)
    cons = decoder_lib.decode(dec, latents, key=jax.random.fold_in(jax.random.key(0), 0), timesteps=(1008,))
    np.testing.assert_allclose(result["per_image"]["consistency"]["psnr"],
                               reconstruction_metrics(x, cons)["psnr"], rtol=1e-5)
    np.testing.assert_allclose(result["summary"]["gan"]["psnr"], np.mean(result["per_image"]["gan"]["psnr"]))
    # Grid: 2 rows x (input | GAN | consistency), 16 px cells upscaled 4x, 2 px gaps, a line of column
    # labels above and the PSNRs under each row (text_h px of PIL's default font each).
    text_h = ImageFont.load_default().getbbox("Ag")[3]
    grid = np.asarray(Image.open(out / "recon_grid.png"))
    top = 2 + text_h + 2
    assert grid.shape[0] == top + 2 * (64 + text_h + 2 + 2) and grid.shape[1] > 3 * (64 + 2) + 2
    np.testing.assert_array_equal(grid[top:top + 64:4, 2:66:4], np.round((x[0] + 1) * 127.5).astype(np.uint8))
    assert (grid[:top] < 128).any()  # the column labels
    assert "PSNR under each" in text
    assert (grid[top + 64:top + 64 + text_h + 2] < 128).any()  # the first row's PSNRs


def test_recon_cli_errors_name_the_file(tiny_checkpoints, tmp_path, capsys):
    from cmjax.cli.eval import main

    root, _, _ = tiny_checkpoints
    assert main(["recon", "--images", str(root / "images"), "--decoder", str(tmp_path / "missing"),
                 "--vae", str(root / "vae"), "--out", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["recon", "--images", str(root / "images"), "--decoder", str(root / "decoder"),
                 "--vae", str(root / "vae"), "--size", "12", "--out", str(tmp_path)]) == 2
    assert "multiple of" in capsys.readouterr().err
