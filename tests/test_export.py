"""python -m cmjax.export: cmjax decoder checkpoints back to diffusers folders that diffusers loads."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cmjax  # noqa: E402
from cmjax.weights.checkpoint import save_decoder  # noqa: E402
from cmjax.weights.from_pytorch import convert  # noqa: E402
from cmjax.weights.to_diffusers import ExportError, export_decoder  # noqa: E402
from tests import openai_peer  # noqa: E402
from tests.torch_peers import nchw, nhwc, reference_decode, save_vae, tiny_consistency_vae  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny perturbed diffusers ConsistencyDecoderVAE, its folder, and its cmjax conversion."""
    d = tmp_path_factory.mktemp("export")
    vae = tiny_consistency_vae(seed=0)
    folder = save_vae(vae, d / "diffusers")
    convert(folder, d / "ckpt")
    return vae, folder, d / "ckpt"


def assert_params_identical(a, b):
    assert a.config == b.config
    assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def test_consistency_vae_export_loads_in_diffusers_and_decodes_identically(converted, tmp_path):
    from diffusers import ConsistencyDecoderVAE

    vae, folder, ckpt = converted
    export_decoder(ckpt, tmp_path / "out", encoder_from=folder)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cmjax-export.json", "config.json",
                                                                    "diffusion_pytorch_model.safetensors"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["_class_name"] == "ConsistencyDecoderVAE"
    loaded = ConsistencyDecoderVAE.from_pretrained(str(tmp_path / "out")).eval()
    # every tensor (encoder, quant_conv and UNet) is the original's, bit for bit
    want, got = vae.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    dec = cmjax.load_decoder(ckpt)
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
    noise = [rng.normal(size=(2, 16, 24, 3)).astype(np.float32) for _ in range(2)]
    np.testing.assert_allclose(np.asarray(cmjax.decode(dec, latents, noise=noise, clip_denoised=False)),
                               reference_decode(loaded, latents, noise, clip_denoised=False), atol=ATOL, rtol=0)
    # and diffusers' own decode() (its noise, its unclamped loop)
    with torch.no_grad():
        ref = nhwc(loaded.decode(nchw(latents), generator=torch.Generator().manual_seed(3)).sample)
    g = torch.Generator().manual_seed(3)
    noise = [nhwc(torch.randn((2, 3, 16, 24), generator=g)) for _ in range(2)]
    np.testing.assert_allclose(np.asarray(cmjax.decode(dec, latents, noise=noise, clip_denoised=False)), ref,
                               atol=ATOL, rtol=0)


def test_unet_export_loads_as_unet2dmodel(converted, tmp_path):
    from diffusers import UNet2DModel

    vae, _, ckpt = converted
    lines = []
    export_decoder(ckpt, tmp_path / "unet", report=lines.append)
    assert "UNet2DModel" in lines[-1]
    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert cfg["_class_name"] == "UNet2DModel" and cfg["norm_num_groups"] == 8
    unet = UNet2DModel.from_pretrained(str(tmp_path / "unet")).eval()
    want = vae.decoder_unet.state_dict()
    assert set(unet.state_dict()) == set(want)
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 7, 16, 16)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(unet(x, torch.tensor(512)).sample, vae.decoder_unet(x, torch.tensor(512)).sample,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("with_encoder", [True, False])
def test_convert_export_convert_is_bit_exact(converted, tmp_path, with_encoder):
    _, folder, ckpt = converted
    export_decoder(ckpt, tmp_path / "out", encoder_from=folder if with_encoder else None)
    convert(tmp_path / "out", tmp_path / "again")
    assert_params_identical(cmjax.load_decoder(tmp_path / "again"), cmjax.load_decoder(ckpt))


def test_openai_torchscript_roundtrip_through_diffusers(tmp_path):
    """decoder.pt -> cmjax -> diffusers UNet2DModel -> cmjax: the same params, and torch's UNet agrees."""
    from diffusers import UNet2DModel

    model = openai_peer.make(seed=4)
    src = openai_peer.save_torchscript(model, tmp_path / "decoder.pt")
    convert(src, tmp_path / "a")
    export_decoder(tmp_path / "a", tmp_path / "unet")
    convert(tmp_path / "unet", tmp_path / "b")
    assert_params_identical(cmjax.load_decoder(tmp_path / "b"), cmjax.load_decoder(tmp_path / "a"))
    unet = UNet2DModel.from_pretrained(str(tmp_path / "unet")).eval()
    x, t, feats = openai_peer.example_inputs()
    with torch.no_grad():
        ref = model(x, t, feats)
        got = unet(torch.cat([x, torch.nn.functional.interpolate(feats, scale_factor=8)], 1), t).sample
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_fp16_export(converted, tmp_path):
    from safetensors.numpy import load_file

    _, folder, ckpt = converted
    export_decoder(ckpt, tmp_path / "half", encoder_from=folder, dtype="float16")
    tensors = load_file(str(tmp_path / "half" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in tensors.values()} == {np.dtype(np.float16)}
    dec = convert(tmp_path / "half", tmp_path / "again")
    ref = cmjax.load_decoder(ckpt)
    for x, y in zip(jax.tree.leaves(dec.params), jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(x, np.asarray(y).astype(np.float16).astype(np.float32))


def test_encoder_from_a_cmjax_vae_checkpoint(converted, tmp_path):
    pytest.importorskip("cmjax.weights.sd_vae")
    from safetensors.numpy import load_file

    _, folder, ckpt = converted
    convert(folder, tmp_path / "encoder", kind="vae")  # the SD encoder alone, as a cmjax VAE checkpoint
    export_decoder(ckpt, tmp_path / "out", encoder_from=tmp_path / "encoder")
    got = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    want = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["encoder_block_out_channels"] == [8, 8, 8, 8] and cfg["encoder_norm_num_groups"] == 4


def test_export_refusals_leave_nothing(converted, tmp_path):
    vae, folder, ckpt = converted
    # an encoder whose latents do not fit the decoder (2 levels: a 2x downsampler, not 8x)
    other = save_vae(tiny_consistency_vae(seed=1, encoder_block_out_channels=(8, 8),
                                          encoder_down_block_types=("DownEncoderBlock2D",) * 2), tmp_path / "two_levels")
    with pytest.raises(ExportError, match="downsamples by 2"):
        export_decoder(ckpt, tmp_path / "out", encoder_from=other)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="no such file"):
        export_decoder(ckpt, tmp_path / "out", encoder_from=tmp_path / "missing")
    # decode settings that diffusers hard-codes
    import dataclasses

    dec = cmjax.load_decoder(ckpt)
    odd = cmjax.Decoder(dataclasses.replace(dec.config, latent_mean=(0.0, 0.0, 0.0, 0.0)), dec.params)
    save_decoder(odd, tmp_path / "odd")
    with pytest.raises(ExportError, match="latent_mean"):
        export_decoder(tmp_path / "odd", tmp_path / "out", encoder_from=folder)
    lines = []
    export_decoder(tmp_path / "odd", tmp_path / "out", report=lines.append)  # a UNet2DModel: reported
    assert any("does not record" in line and "latent_mean" in line for line in lines)
    with pytest.raises(FileExistsError):
        export_decoder(ckpt, tmp_path / "out")
    with pytest.raises(ValueError, match="not a cmjax decoder checkpoint"):
        export_decoder(folder, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd", "out", "two_levels"]


def test_cli(converted, tmp_path, capsys):
    from cmjax.cli.export import main

    _, folder, ckpt = converted
    assert main([str(ckpt), str(tmp_path / "unet")]) == 0
    err = capsys.readouterr().err
    assert "UNet2DModel" in err and f"--encoder-from {folder}" in err  # the hint
    assert main([str(ckpt), str(tmp_path / "unet")]) == 2  # a usage error
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--encoder-from" in out and "ConsistencyDecoderVAE" in out and "UNet2DModel" in out
