"""python -m cmjax.convert on OpenAI's formats, format detection, and refusal of bad files.

The OpenAI-format checkpoints are written here by a tiny PyTorch copy of OpenAI's network with its
original parameter names (tests/openai_peer.py): TorchScript (scripted and traced), the extracted
safetensors pair, torch.save pickles. The diffusers peer is a ConsistencyDecoderVAE whose UNet got
the same weights, renamed.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cmjax  # noqa: E402
from cmjax.weights.from_pytorch import ConversionError, convert, detect_source  # noqa: E402
from cmjax.weights.openai import diffusers_to_openai_name, openai_to_diffusers_name  # noqa: E402
from tests import openai_peer  # noqa: E402
from tests.torch_peers import nhwc, reference_decode, save_vae, tiny_consistency_vae  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return openai_peer.make(seed=0)


@pytest.fixture(scope="module")
def peer(model):
    return openai_peer.diffusers_peer(model)


@pytest.fixture(scope="module")
def sources(model, tmp_path_factory):
    """One file (or folder) per OpenAI-side format, all holding ``model``'s weights."""
    d = tmp_path_factory.mktemp("openai")
    out = {"script": openai_peer.save_torchscript(model, d / "decoder.pt")}
    # A plain tensor attribute as the table: scripting keeps it as 'embed_time.table', tracing
    # bakes it into the archive's constants (what the real decoder.pt may do).
    plain = openai_peer.make(seed=0, table="attribute")
    out["script-table-attribute"] = openai_peer.save_torchscript(plain, d / "scripted_attr.pt")
    out["trace-table-constant"] = openai_peer.save_torchscript(plain, d / "traced.pt", mode="trace")
    out["pair"] = openai_peer.save_pair(model, d / "pair")
    out["pair-folder"] = d / "pair"
    state = {k: torch.from_numpy(v) for k, v in openai_peer.openai_state(model).items()}
    torch.save(state, d / "openai_state.pt")
    out["pickle-openai"] = d / "openai_state.pt"
    # Lightning-style nesting with a wrapper prefix, in the legacy (non-zip) torch.save format.
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, d / "lightning.ckpt",
               _use_new_zipfile_serialization=False)
    out["pickle-openai-prefixed-legacy"] = d / "lightning.ckpt"
    torch.save(openai_peer.diffusers_peer(model).decoder_unet.state_dict(), d / "unet.bin")
    out["pickle-diffusers"] = d / "unet.bin"
    return out


def decode_both(dec, peer, seed=0, batch=2, clip=True):
    rng = np.random.default_rng(seed)
    latents = (rng.normal(size=(batch, 2, 3, 4)) * 3).astype(np.float32)
    noise = [rng.normal(size=(batch, 16, 24, 3)).astype(np.float32) for _ in range(2)]
    got = np.asarray(cmjax.decode(dec, latents, noise=noise, clip_denoised=clip))
    return got, reference_decode(peer, latents, noise, clip_denoised=clip)


# ---------------------------------------------------------------------------------------------
# The peers agree with each other (so that the parity checks below mean something)


def test_peer_network_is_openais_and_diffusers(model, peer):
    x, t, feats = openai_peer.example_inputs(batch=2)
    with torch.no_grad():
        ours = model(x, t, feats)
        up = torch.nn.functional.interpolate(feats, scale_factor=8, mode="nearest")
        theirs = peer.decoder_unet(torch.cat([x, up], 1), t).sample
    assert ours.shape == (2, 6, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_name_inverse_covers_every_parameter(peer):
    names = list(peer.decoder_unet.state_dict())
    assert all(openai_to_diffusers_name(diffusers_to_openai_name(n)) == n for n in names)
    assert diffusers_to_openai_name("up_blocks.0.upsamplers.0.norm2.weight") == "blocks.up_3_upsamp.gn_2.g"


# ---------------------------------------------------------------------------------------------
# Every OpenAI-side format converts to the same weights and decodes like diffusers


def test_torchscript_unet_parity(model, sources, tmp_path):
    """The TorchScript archive, run by torch, against the converted cmjax UNet (all 6 channels)."""
    dec = convert(sources["script"], tmp_path / "ckpt")
    ts = torch.jit.load(str(sources["script"]))
    x, _, feats = openai_peer.example_inputs(batch=2, h=2, w=3)
    up = np.repeat(np.repeat(nhwc(feats), 8, axis=1), 8, axis=2)
    net_in = jnp.concatenate([jnp.asarray(nhwc(x)), jnp.asarray(up)], axis=-1)
    apply = jax.jit(lambda p, t: dec.network().apply({"params": p}, net_in, t))
    for t in ([1008, 512], [16, 333]):
        with torch.no_grad():
            ref = nhwc(ts(x, torch.tensor(t), features=feats))
        got = np.asarray(apply(dec.params, jnp.asarray(t)))
        np.testing.assert_allclose(got, ref, atol=ATOL * max(1.0, np.abs(ref).max()), rtol=0, err_msg=f"t={t}")


EXPECTED_FORMAT = {
    "script": "openai-torchscript", "script-table-attribute": "openai-torchscript",
    "trace-table-constant": "openai-torchscript", "pair": "openai-safetensors", "pair-folder": "openai-safetensors",
    "pickle-openai": "torch-pickle", "pickle-openai-prefixed-legacy": "torch-pickle", "pickle-diffusers": "torch-pickle",
}


# One source of each container format runs by default; their variants (another table layout, a
# folder, legacy prefixes) are slow.
VARIANTS = ("script-table-attribute", "trace-table-constant", "pair-folder", "pickle-openai-prefixed-legacy")


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=pytest.mark.slow) if f in VARIANTS else f
                                 for f in EXPECTED_FORMAT])
def test_every_format_converts_and_decodes_like_diffusers(fmt, sources, peer, tmp_path):
    source = detect_source(sources[fmt])
    assert (source.kind, source.format) == ("decoder", EXPECTED_FORMAT[fmt])
    assert source.names == ("diffusers" if fmt == "pickle-diffusers" else "openai")
    lines: list[str] = []
    dec = convert(sources[fmt], tmp_path / "ckpt", report=lines.append)
    assert lines[0].startswith(f"recognised {sources[fmt]}: decoder")
    if fmt == "trace-table-constant":
        assert any("found as 'CONSTANTS.c" in line for line in lines)
    if fmt == "script-table-attribute":
        assert any("found as 'embed_time.table'" in line for line in lines)
    cfg = dec.config
    assert cfg.unet.block_out_channels == openai_peer.TINY["channels"]
    assert (cfg.unet.layers_per_block, cfg.unet.norm_num_groups, cfg.unet.num_train_timesteps) == (1, 32, 1024)
    assert (cfg.latent_channels, cfg.upsample_factor, cfg.unet.out_channels) == (4, 8, 6)
    # the params on disk are what the diffusers peer holds, bit for bit
    loaded = cmjax.load_decoder(tmp_path / "ckpt")
    want = {k: v.numpy() for k, v in peer.decoder_unet.state_dict().items()}
    from cmjax.weights.mapping import flax_to_torch

    got = flax_to_torch(jax.tree.map(np.asarray, loaded.params))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    out, ref = decode_both(loaded, peer)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


def test_diffusers_folder_with_bin_weights(tmp_path):
    """A diffusers folder saved without safetensors (diffusion_pytorch_model.bin, a torch pickle)."""
    vae = tiny_consistency_vae(seed=1)
    vae.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    save_vae(vae, tmp_path / "st")
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    source = detect_source(tmp_path / "bin")
    assert (source.format, source.names, source.config) == ("torch-pickle", "diffusers", tmp_path / "bin" / "config.json")
    a, b = convert(tmp_path / "bin", tmp_path / "a"), convert(tmp_path / "st", tmp_path / "b")
    assert a.config == b.config and a.config.unet.norm_num_groups == 8  # from config.json, not guessed
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_full_size_architecture_inferred_from_openai_names():
    """The released network's names and shapes (no weights allocated): (320, 640, 1024, 1024), 3 layers."""
    from cmjax.models.decoder_config import DecoderConfig, abstract_params
    from cmjax.weights.diffusers import infer_config
    from cmjax.weights.mapping import torch_key_for
    from cmjax.weights.openai import count_levels, openai_state_to_diffusers

    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(DecoderConfig()))[0]:
        keys = tuple(k.key for k in path)
        s = leaf.shape
        s = (s[3], s[2], s[0], s[1]) if len(s) == 4 else s[::-1] if keys[-1] == "kernel" else s
        shapes[diffusers_to_openai_name(torch_key_for(keys))] = np.empty(s, np.float32)  # lazily paged, no fill
    assert count_levels(shapes) == 4
    cfg = infer_config(openai_state_to_diffusers(shapes))
    assert cfg == DecoderConfig()


def test_fp16_pair_upcast_by_default_and_kept_on_request(model, tmp_path):
    src = openai_peer.save_pair(model, tmp_path / "half", dtype=np.float16)
    lines: list[str] = []
    up = convert(src, tmp_path / "up", report=lines.append)
    assert any("float16 weights upcast to float32" in line for line in lines)
    assert {x.dtype for x in jax.tree.leaves(up.params)} == {np.dtype(np.float32)}
    kept = convert(src, tmp_path / "kept", keep_dtype=True)
    assert {x.dtype for x in jax.tree.leaves(kept.params)} == {np.dtype(np.float16)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.astype(np.float32), b), kept.params, up.params)
    # the fp16 checkpoint is half the size on disk and loads (as float32) to the same values
    loaded = cmjax.load_decoder(tmp_path / "kept")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded.params, up.params)


# ---------------------------------------------------------------------------------------------
# Refusals: each a clear error naming the file, nothing written at DST


def assert_refused(src, tmp_path, *patterns, kind=None):
    dst = tmp_path / "out" / "dst"
    with pytest.raises((ConversionError, ValueError)) as e:
        convert(src, dst, kind=kind)
    msg = str(e.value)
    for p in patterns:
        assert p in msg, msg
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # no temp dirs left
    return msg


class RunsCode:
    """Unpickling this runs ``os.system`` (a real payload: plain pickle.loads would run it)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_code_running_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"embed_image.f.w": RunsCode(f"touch {marker}")}, protocol=2)
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as z:  # laid out as torch.save writes it
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    msg = assert_refused(evil, tmp_path, str(evil), "forbidden global", "system")
    assert "refusing to run code" in msg
    assert not marker.exists()
    from cmjax.cli.convert import main

    assert main([str(evil), str(tmp_path / "cli_dst")]) == 1
    assert not marker.exists() and not (tmp_path / "cli_dst").exists()


def test_broken_files_are_refused(sources, tmp_path):
    data = sources["script"].read_bytes()
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(data[: len(data) // 2])
    assert_refused(cut, tmp_path, str(cut), "truncated or corrupt zip")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_refused(empty, tmp_path, str(empty), "file is empty")
    magic = tmp_path / "wrong_magic.pt"
    magic.write_bytes(b"GIF89a" + bytes(range(200)))
    assert_refused(magic, tmp_path, str(magic), "unrecognised file type", "474946383961")
    text = tmp_path / "weights.safetensors"
    text.write_bytes(b"not really")
    assert_refused(text, tmp_path, str(text), "not a readable safetensors file")
    pair = sources["pair"].read_bytes()
    short = tmp_path / "consistency_decoder.safetensors"
    short.write_bytes(pair[:-100])
    assert_refused(short, tmp_path, str(short), "not a readable safetensors file", "truncated")
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}'
    header = ('{"embed_image.f.b":' + entry % (0, 4) + ',"embed_image.f.b":' + entry % (4, 8) + "}").encode()
    dup = tmp_path / "dup.safetensors"
    dup.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    assert_refused(dup, tmp_path, str(dup), "key 'embed_image.f.b' appears twice")


def _pickle(tmp_path, name, state):
    path = tmp_path / name
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_weights_are_refused(model, tmp_path, value):
    state = openai_peer.openai_state(model)
    state["blocks.mid_0.f_2.w"][0, 0, 0, 0] = value
    path = _pickle(tmp_path, "nan.pt", state)
    assert_refused(path, tmp_path, str(path), "NaN/inf values (1)", "mid_block.resnets.0.conv2.weight")


def test_duplicate_and_missing_and_extra_keys_are_refused(model, tmp_path):
    state = openai_peer.openai_state(model)
    dup = _pickle(tmp_path, "dup.pt", {**state, "embed_image.f.weight": state["embed_image.f.w"]})
    assert_refused(dup, tmp_path, str(dup), "two OpenAI parameters map to 'conv_in.weight'")
    missing = dict(state)
    del missing["blocks.up_0_conv_1.gn_2.g"]
    path = _pickle(tmp_path, "missing.pt", missing)
    assert_refused(path, tmp_path, str(path), "missing (1)", "up_blocks.3.resnets.1.norm2.weight")
    shaping = dict(state)
    del shaping["blocks.down_1_conv_0.f_1.w"]  # one the architecture is read from
    path = _pickle(tmp_path, "shaping.pt", shaping)
    assert_refused(path, tmp_path, str(path), "cannot infer the architecture", "blocks.down_1_conv_0.f_1.w missing")
    extra = _pickle(tmp_path, "extra.pt", {**state, "blocks.mid_0.f_2.scale": np.ones(3, np.float32)})
    assert_refused(extra, tmp_path, "not part of OpenAI's consistency decoder", "blocks.mid_0.f_2.scale")


def test_missing_or_ambiguous_timestep_table_is_refused(model, tmp_path):
    weights = openai_peer.save_pair(model, tmp_path / "pair")
    (tmp_path / "pair" / "embedding.safetensors").unlink()
    assert_refused(weights, tmp_path, str(weights), "'embed_time.emb.weight' is missing",
                   "embedding.safetensors")
    state = openai_peer.openai_state(model)
    table = state.pop("embed_time.emb.weight")
    two = _pickle(tmp_path, "two.pt", {**state, "embed_time.a": table, "embed_time.b": table + 1})
    assert_refused(two, tmp_path, "several tensors could be it", "embed_time.a", "embed_time.b")


def test_unrecognised_content_lists_what_was_seen(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"layer.0.weight": np.zeros((2, 2), np.float32), "head.bias": np.zeros(2, np.float32)}, str(path))
    assert_refused(path, tmp_path, str(path), "safetensors file", "saw 2 tensors", "head.bias", "layer.0.weight")
    pt = _pickle(tmp_path, "other.pt", {"fc.weight": np.zeros((2, 2), np.float32)})
    assert_refused(pt, tmp_path, "torch.save pickle", "fc.weight")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    assert_refused(folder, tmp_path, "not a recognised checkpoint folder", "notes.txt", "decoder.pt")


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_recognises_formats_without_importing_torch(sources, tmp_path):
    """One process converts a TorchScript archive, a pickle and a safetensors pair: torch stays out."""
    code = (
        "import sys\n"
        "from cmjax.cli.convert import main\n"
        "for i, src in enumerate(sys.argv[1:]):\n"
        "    assert main([src, f'" + str(tmp_path) + "/out{i}']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('TORCH-FREE')\n")
    srcs = [sources["script"], sources["pickle-openai"], sources["pair"], sources["trace-table-constant"]]
    res = subprocess.run([sys.executable, "-c", code, *map(str, srcs)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "TORCH-FREE" in res.stdout
    assert res.stdout.count("wrote ") == 4 and "consistency decoder, channels (32, 32, 64, 64)" in res.stdout
    for phrase in ("OpenAI TorchScript archive (decoder.pt), OpenAI names", "torch.save pickle, OpenAI names",
                   "OpenAI extracted safetensors (consistency_decoder.safetensors + embedding.safetensors)"):
        assert phrase in res.stderr, res.stderr


def test_cli_help_and_existing_dst(tmp_path, sources, capsys):
    from cmjax.cli.convert import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("openai/consistency-decoder", "--kind", "--keep-dtype", "TorchScript", "embedding.safetensors"):
        assert word in out
    (tmp_path / "dst").mkdir()
    assert main([str(sources["script"]), str(tmp_path / "dst")]) == 2  # a usage error
    assert "already exists" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), str(tmp_path / "dst2")]) == 1
    assert "nope: no such file or folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# --kind and SD VAE sources (the SD VAE converter itself is tested in tests/test_vae.py)


def test_kind_override(tmp_path, sources):
    pytest.importorskip("cmjax.weights.sd_vae")
    vae = tiny_consistency_vae(seed=2)
    folder = save_vae(vae, tmp_path / "cdvae")
    assert detect_source(folder).kind == "decoder"
    # --kind vae takes the SD encoder out of a ConsistencyDecoderVAE
    lines: list[str] = []
    enc = convert(folder, tmp_path / "enc", kind="vae", report=lines.append)
    assert enc.parts == ("encoder",) and "converting it as vae (--kind vae)" in lines
    meta = json.loads((tmp_path / "enc" / "cmjax.json").read_text())
    assert meta["format"] == "cmjax-vae"
    # an OpenAI decoder is no VAE
    assert_refused(sources["pair"], tmp_path, "not an SD VAE", kind="vae")


def test_sd_vae_folder_is_recognised(tmp_path):
    pytest.importorskip("cmjax.weights.sd_vae")
    from diffusers import AutoencoderKL

    from tests.torch_peers import perturb_

    torch.manual_seed(0)
    ae = perturb_(AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2)).eval()
    ae.save_pretrained(str(tmp_path / "ae"))
    source = detect_source(tmp_path / "ae")
    assert source.kind == "vae" and "AutoencoderKL folder" in source.describe()
    vae = convert(tmp_path / "ae", tmp_path / "ckpt")
    assert vae.parts == ("encoder", "decoder")
    with pytest.raises(ConversionError, match="not a consistency decoder"):
        convert(tmp_path / "ae", tmp_path / "ckpt2", kind="decoder")
    assert not (tmp_path / "ckpt2").exists()
