"""The Flax SD VAE against diffusers' AutoencoderKL: encoder, GAN decoder, every checkpoint naming."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cmjax.models import vae as vae_lib
from cmjax.weights import checkpoint
from cmjax.weights.mapping import ConversionError, torch_to_flax
from cmjax.weights.sd_vae import detect_vae_format, load_pytorch_vae
from tests.torch_peers import nchw, nhwc, perturb_, save_vae, tiny_consistency_vae
from tests.vae_peers import (
    ATOL,
    TINY_CONFIG,
    assert_close,
    assert_same_params,
    images,
    state_of,
    tiny_autoencoder,
    to_ldm,
    write_safetensors,
)

moments = jax.jit(vae_lib.encoder_moments, static_argnames=("config", "dtype"))


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """(torch AutoencoderKL, its saved diffusers folder, the cmjax VAE converted from that folder)."""
    vae = tiny_autoencoder()
    folder = tmp_path_factory.mktemp("kl") / "tiny"
    vae.save_pretrained(str(folder), safe_serialization=True)
    return vae, folder, load_pytorch_vae(folder)


# ----------------------------------------------------------------------------------------------
# Architecture and parity


def test_full_size_param_counts():
    """SD 1.x sizes (CompVis/stable-diffusion v1-inference.yaml), counted by diffusers: encoder + quant_conv 34,163,664,
    decoder + post_quant_conv 49,490,199, all 83,653,863."""
    enc, dec = vae_lib.split_params(vae_lib.abstract_params(vae_lib.VAEConfig()))
    count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
    assert (count(enc), count(dec)) == (34_163_664, 49_490_199)


def test_converted_config(peer):
    _, _, vae = peer
    assert vae.config == TINY_CONFIG
    assert vae.parts == ("encoder", "decoder")
    assert vae.config.downsample_factor == 8
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in jax.tree.leaves(vae.params))


def test_encoder_mean_and_logvar_parity(peer):
    torch_vae, _, vae = peer
    x = images(0)
    with torch.no_grad():
        dist = torch_vae.encode(nchw(x)).latent_dist
    mean = vae_lib.encode(vae, x)
    assert mean.shape == (2, 3, 4, 4) and mean.dtype == jnp.float32
    err = assert_close(mean, nhwc(dist.mean))
    got_mean, got_logvar = moments(vae.params, jnp.asarray(x), config=vae.config)
    assert_close(got_logvar, nhwc(dist.logvar))
    assert_close(got_mean, mean)  # another jitted program: same math, XLA may fuse differently
    assert err < ATOL


def test_encoder_sample_parity_with_shared_noise(peer):
    """latent_dist.sample(generator) draws torch.randn(mean.shape, generator): give cmjax that draw."""
    torch_vae, _, vae = peer
    x = images(1)
    with torch.no_grad():
        ref = torch_vae.encode(nchw(x)).latent_dist.sample(generator=torch.Generator().manual_seed(5))
    eps = nhwc(torch.randn((2, 4, 3, 4), generator=torch.Generator().manual_seed(5)))
    got = vae_lib.encode(vae, x, noise=eps)
    assert_close(got, nhwc(ref))
    # with a key the noise is normal(key) in the latents' shape; same key, same sample
    a = vae_lib.encode(vae, x, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(vae_lib.encode(vae, x, key=jax.random.key(3))))
    np.testing.assert_array_equal(
        np.asarray(a), np.asarray(vae_lib.encode(vae, x, noise=jax.random.normal(jax.random.key(3), (2, 3, 4, 4)))))
    assert np.abs(np.asarray(a) - np.asarray(vae_lib.encode(vae, x))).max() > 1e-3  # really sampled
    np.testing.assert_array_equal(np.asarray(vae_lib.encode(vae, x, sample=True)),
                                  np.asarray(vae_lib.encode(vae, x, key=jax.random.key(0))))


def test_logvar_is_clamped(peer):
    """Shift the logvar channels' quant_conv bias far out of [-30, 20] in both models: the samples'
    std saturates at exp(10) and exp(-15) exactly as in diffusers."""
    import copy

    torch_vae, _, vae = peer
    shift = np.array([0, 0, 0, 0, 80, -80, 0, 0], np.float32)
    torch_vae = copy.deepcopy(torch_vae)
    with torch.no_grad():
        torch_vae.quant_conv.bias += torch.from_numpy(shift)
    params = dict(vae.params, quant_conv={**vae.params["quant_conv"], "bias": vae.params["quant_conv"]["bias"] + shift})
    shifted = vae_lib.VAE(vae.config, params)
    x = images(2)
    with torch.no_grad():
        dist = torch_vae.encode(nchw(x)).latent_dist
    eps = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    _, logvar = moments(params, jnp.asarray(x), config=vae.config)
    assert float(logvar[..., 0].min()) == 20.0 and float(logvar[..., 1].max()) == -30.0
    ref = nhwc(dist.mean + dist.std * nchw(eps))
    assert_close(vae_lib.encode(shifted, x, noise=eps), ref)  # |ref| ~ 2e4 * |eps|: relative bound


def test_gan_decoder_parity(peer):
    torch_vae, _, vae = peer
    z = (np.random.default_rng(3).normal(size=(2, 3, 4, 4)) * 3).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(torch_vae.decode(nchw(z)).sample)
    got = vae_lib.decode_gan(vae, z)
    assert got.shape == (2, 24, 32, 3) and got.dtype == jnp.float32
    assert_close(got, ref)


def test_round_trip_through_both_halves(peer):
    """encode -> decode_gan equals diffusers' AutoencoderKL.forward (posterior mean, no sampling)."""
    torch_vae, _, vae = peer
    x = images(4)
    with torch.no_grad():
        ref = nhwc(torch_vae(nchw(x)).sample)
    assert_close(vae_lib.decode_gan(vae, vae_lib.encode(vae, x)), ref)


def test_bf16_compute(peer):
    _, _, vae = peer
    x = images(0)
    z32 = np.asarray(vae_lib.encode(vae, x))
    z16 = np.asarray(vae_lib.encode(vae, x, dtype=jnp.bfloat16))
    y32 = np.asarray(vae_lib.decode_gan(vae, z32))
    y16 = np.asarray(vae_lib.decode_gan(vae, z32, dtype=jnp.bfloat16))
    assert z16.dtype == y16.dtype == np.float32
    for lo, hi in ((z16, z32), (y16, y32)):
        err = np.abs(lo - hi) / np.abs(hi).max()
        # bf16 keeps 8 mantissa bits (0.4%); through ~20 random layers the error stays a few percent
        # of the output's scale at worst and well under 1% on average.
        assert 0 < err.max() < 0.05 and err.mean() < 0.01, (err.max(), err.mean())


# ----------------------------------------------------------------------------------------------
# Checkpoint namings


@pytest.mark.parametrize("container", ["ckpt_full_model", "safetensors_vae_only", "safetensors_vae_prefix"])
@pytest.mark.parametrize("attention", ["old", "new"])
def test_ldm_checkpoints(peer, tmp_path, container, attention):
    torch_vae, _, vae = peer
    ldm = to_ldm(state_of(torch_vae), levels=4, attention=attention)
    assert "decoder.up.0.block.2.conv2.weight" in ldm and "encoder.down.0.block.1.conv1.weight" in ldm
    if attention == "old":
        assert ldm["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1) and "decoder.mid.attn_1.norm.bias" in ldm
    else:
        assert ldm["encoder.mid.attn_1.to_out.0.weight"].shape == (32, 32)
    if container == "ckpt_full_model":
        state = {f"first_stage_model.{k}": torch.from_numpy(v) for k, v in ldm.items()}
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3, 4, 3, 3)  # rest of SD: ignored
        state["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(7)
        path = tmp_path / "sd.ckpt"
        torch.save({"state_dict": state, "global_step": 10}, path)
    elif container == "safetensors_vae_only":
        # a VAE training checkpoint also holds its loss (discriminator, LPIPS): dropped
        state = {**ldm, "loss.discriminator.main.0.weight": np.zeros((4, 3, 4, 4), np.float32)}
        path = write_safetensors(tmp_path / "vae.safetensors", state)
    else:
        state = {f"vae.{k}": v for k, v in ldm.items()}
        path = write_safetensors(tmp_path / "model.safetensors", state)
    assert detect_vae_format(state) == "ldm"
    got = load_pytorch_vae(path, config=TINY_CONFIG)
    assert got.parts == ("encoder", "decoder")
    assert_same_params(got.params, vae.params)  # and vae.params match diffusers (parity tests above)


def test_old_diffusers_attention_names(peer, tmp_path):
    """Older diffusers files: query/key/value/proj_attn instead of to_q/to_k/to_v/to_out.0."""
    torch_vae, folder, vae = peer
    old = {re.sub(r"\.to_q\.", ".query.", re.sub(r"\.to_k\.", ".key.", re.sub(r"\.to_v\.", ".value.",
           k.replace(".to_out.0.", ".proj_attn.")))): v for k, v in state_of(torch_vae).items()}
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", old)
    assert detect_vae_format(old) == "diffusers"
    assert_same_params(load_pytorch_vae(tmp_path).params, vae.params)
    # the file itself (the config.json beside it is used)
    assert_same_params(load_pytorch_vae(tmp_path / "diffusion_pytorch_model.safetensors").params, vae.params)
    # a folder of the pre-safetensors era: diffusion_pytorch_model.bin, a torch.save'd state dict
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in old.items()}, tmp_path / "diffusion_pytorch_model.bin")
    assert_same_params(load_pytorch_vae(tmp_path).params, vae.params)


def test_fp16_folder(peer, tmp_path):
    torch_vae, _, vae = peer
    import copy

    half = copy.deepcopy(torch_vae).half()
    half.save_pretrained(str(tmp_path / "h"), safe_serialization=True, variant="fp16")
    got = load_pytorch_vae(tmp_path / "h")
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(got.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-3), got.params, vae.params)
    kept = load_pytorch_vae(tmp_path / "h", dtype=None)
    assert all(x.dtype == np.float16 for x in jax.tree.leaves(kept.params))


def test_config_inferred_from_shapes(tmp_path):
    """A lone LDM file of a 32-group model: every size is read off the tensor shapes."""
    torch_vae = tiny_autoencoder(seed=1, block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32,
                                 latent_channels=4)
    path = write_safetensors(tmp_path / "vae.safetensors", to_ldm(state_of(torch_vae), levels=4))
    vae = load_pytorch_vae(path)
    assert vae.config == vae_lib.VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
    z = np.random.default_rng(0).normal(size=(1, 2, 2, 4)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(torch_vae.decode(nchw(z)).sample)
    assert_close(vae_lib.decode_gan(vae, z), ref)


def test_group_count_cannot_be_inferred(peer, tmp_path):
    torch_vae, _, _ = peer
    path = write_safetensors(tmp_path / "vae.safetensors", to_ldm(state_of(torch_vae), levels=4))
    with pytest.raises(ConversionError, match="vae.safetensors: cannot infer the GroupNorm group count"):
        load_pytorch_vae(path)


def test_consistency_decoder_bundled_encoder(tmp_path):
    """A ConsistencyDecoderVAE folder gives an encoder-only VAE (its SD encoder and quant_conv)."""
    cd_vae = tiny_consistency_vae(seed=2)
    folder = save_vae(cd_vae, tmp_path / "cd")
    vae = load_pytorch_vae(folder)
    assert vae.parts == ("encoder",)
    assert vae.config == vae_lib.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    assert all(vae_lib.part_of(name) == "encoder" for name in vae.params)
    x = images(5, (1, 16, 16, 3))
    with torch.no_grad():
        ref = nhwc(cd_vae.encode(nchw(x)).latent_dist.mean)
    assert_close(vae_lib.encode(vae, x), ref)
    with pytest.raises(ValueError, match="no GAN decoder: it is encoder-only"):
        vae_lib.decode_gan(vae, np.zeros((1, 2, 2, 4), np.float32))
    from safetensors.numpy import load_file

    assert detect_vae_format(load_file(str(folder / "diffusion_pytorch_model.safetensors"))) == "consistency-decoder"


def test_detect_vae_format_rejects_other_files():
    with pytest.raises(ConversionError, match="not an SD VAE"):
        detect_vae_format({"conv_in.weight": np.zeros(1), "down_blocks.0.resnets.0.conv1.weight": np.zeros(1)})
    with pytest.raises(ConversionError, match="without the bundled SD encoder"):
        detect_vae_format({"decoder_unet.conv_in.weight": np.zeros(1)})


@pytest.mark.parametrize("naming", ["diffusers", "ldm"])
@pytest.mark.parametrize("problem", ["missing_key", "extra_key", "wrong_shape"])
def test_bad_weights(peer, tmp_path, naming, problem):
    torch_vae, _, _ = peer
    state = state_of(torch_vae)
    if naming == "ldm":
        state = to_ldm(state, levels=4)
        key, extra = "decoder.up.1.block.0.norm2.weight", "decoder.up.1.block.0.extra.weight"
    else:
        key, extra = "decoder.up_blocks.2.resnets.0.norm2.weight", "decoder.up_blocks.2.resnets.0.extra.weight"
    if problem == "missing_key":
        del state[key]
    elif problem == "extra_key":
        state[extra] = np.zeros(3, np.float32)
    else:
        state[key] = np.zeros(7, np.float32)
    path = write_safetensors(tmp_path / "bad.safetensors", state)
    with pytest.raises(ConversionError) as info:
        load_pytorch_vae(path, config=TINY_CONFIG)
    message = str(info.value)
    expected = {"missing_key": "missing (1)", "extra_key": "unexpected (1)", "wrong_shape": "wrong shape (1)"}[problem]
    assert "bad.safetensors" in message and expected in message
    # named in the diffusers form the converter maps to (decoder.up.1 is up_blocks.2 of 4); a key the
    # converter cannot rename is shown as it is in the file
    shown = extra if problem == "extra_key" else "decoder.up_blocks.2.resnets.0.norm2.weight"
    assert shown in message


def test_unreadable_sources(tmp_path):
    with pytest.raises(ConversionError, match="nope: no such file or folder"):
        load_pytorch_vae(tmp_path / "nope")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="junk.ckpt: not a PyTorch checkpoint"):
        load_pytorch_vae(junk)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"")
    with pytest.raises(ConversionError, match="weights.npz: unknown file type"):
        load_pytorch_vae(other)
    bad_cfg = tmp_path / "folder"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text(json.dumps({"act_fn": "gelu"}))
    write_safetensors(bad_cfg / "diffusion_pytorch_model.safetensors",
                      {"encoder.conv_in.weight": np.zeros((8, 3, 3, 3)),
                       "encoder.mid_block.resnets.0.conv1.weight": np.zeros(1)})
    with pytest.raises(ConversionError, match="config.json: config act_fn='gelu' is not supported"):
        load_pytorch_vae(bad_cfg)


# ----------------------------------------------------------------------------------------------
# cmjax checkpoints and bad input


def test_checkpoint_roundtrip(peer, tmp_path):
    _, _, vae = peer
    checkpoint.save_vae(vae, tmp_path / "vae", source="tiny")
    again = checkpoint.read_vae(tmp_path / "vae")
    assert again.config == vae.config and again.parts == ("encoder", "decoder")
    assert_same_params(jax.tree.map(np.asarray, again.params), vae.params)
    assert json.loads((tmp_path / "vae" / "cmjax.json").read_text())["format"] == "cmjax-vae"
    with pytest.raises(FileExistsError):
        checkpoint.save_vae(vae, tmp_path / "vae")
    # encoder-only
    enc, _ = vae_lib.split_params(vae.params)
    checkpoint.save_vae(vae_lib.VAE(vae.config, enc), tmp_path / "enc")
    enc_only = checkpoint.read_vae(tmp_path / "enc")
    assert enc_only.parts == ("encoder",)
    assert_same_params(jax.tree.map(np.asarray, enc_only.params), enc)
    # formats are not confused
    with pytest.raises(ValueError, match="format is 'cmjax-vae', not 'cmjax-decoder'"):
        checkpoint.read_decoder(tmp_path / "vae")
    with pytest.raises(ValueError, match="not a cmjax VAE checkpoint"):
        checkpoint.read_vae(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc", "vae"]  # no temporary directories left


def test_bad_input(peer):
    _, _, vae = peer
    x = images(0)
    with pytest.raises(ValueError, match="NHWC"):
        vae_lib.encode(vae, x[0])
    with pytest.raises(ValueError, match="3 channels.*NCHW"):
        vae_lib.encode(vae, x.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae_lib.encode(vae, x[:, :20])
    with pytest.raises(ValueError, match="either key or noise"):
        vae_lib.encode(vae, x, key=jax.random.key(0), noise=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="sample=False"):
        vae_lib.encode(vae, x, key=jax.random.key(0), sample=False)
    with pytest.raises(ValueError, match="latents' shape"):
        vae_lib.encode(vae, x, noise=np.zeros((2, 4, 3, 4), np.float32))
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        vae_lib.encode(vae, bad)
    with pytest.raises(ValueError, match="4 channels.*NCHW"):
        vae_lib.decode_gan(vae, np.zeros((1, 4, 2, 2), np.float32))
    _, dec = vae_lib.split_params(vae.params)
    with pytest.raises(ValueError, match="no encoder"):
        vae_lib.encode(vae_lib.VAE(vae.config, dec), x)


@pytest.mark.slow
def test_full_size_parity():
    """SD 1.x's architecture (83,653,863 params, 32 groups, 512-wide attention) on a 64x48 image."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    torch_vae = perturb_(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4,
                                       block_out_channels=(128, 256, 512, 512), layers_per_block=2),
                         seed=0, scale=0.02).eval()
    assert sum(p.numel() for p in torch_vae.parameters()) == 83_653_863
    config = vae_lib.VAEConfig()
    vae = vae_lib.VAE(config, torch_to_flax(state_of(torch_vae), vae_lib.abstract_params(config)))
    x = images(0, (1, 64, 48, 3))
    with torch.no_grad():
        mean = nhwc(torch_vae.encode(nchw(x)).latent_dist.mean)
        y = nhwc(torch_vae.decode(nchw(mean)).sample)
    assert_close(vae_lib.encode(vae, x), mean)
    assert_close(vae_lib.decode_gan(vae, mean), y)
