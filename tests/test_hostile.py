"""Hostile inputs on the weights side (issue 9): each is built here, byte by byte, and must be
refused cleanly: exit status 1, one line on stderr naming the file and the problem, no
traceback, nothing at DST, bounded memory (the converter runs under RLIMIT_AS = 3 GB) and
bounded time. Valid files must still convert to exactly the original params.

The converter (``python -m cmjax.convert``'s ``main``) runs in ONE subprocess over every case,
so JAX is imported once; ``_DRIVER`` records (exit status, stderr, seconds, and for a success
whether the written params equal the original) per case.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import cmjax
from cmjax import data
from cmjax.models.decoder_config import ConfigError, DecoderConfig, abstract_params
from cmjax.models.decoder_unet import UNetConfig
from cmjax.weights import checkpoint
from cmjax.weights.mapping import flax_to_torch
from tests import hostile_files as hf
from tests.decode_runs import run_main
from tests.random_decoder import random_decoder

REPO = Path(__file__).resolve().parent.parent
MICRO = DecoderConfig(unet=UNetConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4))
MICRO_JSON = {"_class_name": "UNet2DModel", "in_channels": 7, "out_channels": 6, "block_out_channels": [8, 8],
              "layers_per_block": 1, "norm_num_groups": 4}
MEMORY_LIMIT = 3 << 30
CORPUS_SEED, CORPUS_PER_KIND = 0, 12

_DRIVER = r"""
import contextlib, io, json, resource, signal, sys, time, traceback
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import numpy as np, jax
from cmjax.cli.convert import main
from cmjax.weights.checkpoint import read_decoder
cases, original = json.load(open(sys.argv[1])), dict(np.load(sys.argv[2]))

def alarm(*_):
    raise TimeoutError("case took more than 60 s")

signal.signal(signal.SIGALRM, alarm)
results = {{}}
for name, src, dst in cases:
    err, start, same = io.StringIO(), time.perf_counter(), None
    signal.alarm(60)
    try:
        with contextlib.redirect_stderr(err):
            rc = main([src, dst, "-q"])
        if rc == 0:
            got = {{jax.tree_util.keystr(p): np.asarray(v) for p, v in
                   jax.tree_util.tree_flatten_with_path(read_decoder(dst).params)[0]}}
            same = got.keys() == original.keys() and all(np.array_equal(got[k], original[k]) for k in got)
    except BaseException as e:  # what a user would see as a traceback
        rc, same = "uncaught", None
        err.write("".join(traceback.format_exception(e))[-1500:])
    finally:
        signal.alarm(0)
    results[name] = {{"rc": rc, "stderr": err.getvalue(), "seconds": time.perf_counter() - start, "same": same}}
json.dump(results, open(sys.argv[3], "w"))
"""


def micro_state() -> dict[str, np.ndarray]:
    """The micro decoder's random params with diffusers (UNet2DModel) names, torch layout."""
    return flax_to_torch(random_decoder(config=MICRO).params)


def original_params() -> dict[str, np.ndarray]:
    import jax

    params = random_decoder(config=MICRO).params
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


class Cases:
    """Hostile (and valid) sources in one folder with the micro model's config.json beside them."""

    def __init__(self, root: Path):
        self.root = root
        self.src = root / "src"
        self.src.mkdir()
        (self.src / "config.json").write_text(json.dumps(MICRO_JSON))
        self.items: dict[str, Path] = {}

    def file(self, name: str, content: bytes, suffix: str = ".pt") -> Path:
        path = self.src / f"{name}{suffix}"
        path.write_bytes(content)
        self.items[name] = path
        return path

    def folder(self, name: str, config: dict, weights: bytes) -> Path:
        folder = self.root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "diffusion_pytorch_model.bin").write_bytes(weights)
        self.items[name] = folder
        return folder

    def run(self) -> dict:
        cases = [(n, str(p), str(self.root / "dst" / n)) for n, p in self.items.items()]
        (self.root / "cases.json").write_text(json.dumps(cases))
        np.savez(self.root / "original.npz", **original_params())
        out = self.root / "results.json"
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, "-c", _DRIVER.format(limit=MEMORY_LIMIT),
                               str(self.root / "cases.json"), str(self.root / "original.npz"), str(out)],
                              capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(out.read_text())


def _pickle_with_tensor(name: str, tensor_pickle: bytes, state: dict, records_extra: dict | None = None,
                        drop: str | None = None) -> bytes:
    """The micro state dict zip with entry ``name`` replaced by a hand-made tensor pickle."""
    entries, records = [], {}
    for i, (k, v) in enumerate(state.items()):
        if k == drop:
            continue
        entries.append((k, tensor_pickle if k == name else
                        hf.p_tensor(str(i), hf.STORAGE_CLASS[v.dtype.name], v.size, v.shape,
                                    hf.contiguous_strides(v.shape))))
        records[str(i)] = np.ascontiguousarray(v).tobytes()
    records.update(records_extra or {})
    return hf.torch_save_zip(hf.state_dict_pickle(entries), records)


def _build_targeted(cases: Cases, state: dict) -> dict[str, str]:
    """Hostile files for the items of issue 9; returns {case: substring the message must hold}."""
    expect = {}
    good_zip, good_pkl = hf.state_dict_zip(state)
    cases.file("valid", good_zip)
    bias = min((k for k in state if k.endswith(".bias")), key=lambda k: state[k].size)

    # 1. BUILD on a tensor after validation (widens a 1-float bias); a stride of 2**40.
    widened = hf.p_tensor("900", "FloatStorage", 1, (1,), (1,)) + b"}" + hf.p_str("shape") + \
        hf.p_tuple((state[bias].size,)) + b"s" + b"b"
    cases.file("build_widens_tensor", _pickle_with_tensor(bias, widened, state, {"900": b"\0" * 4}))
    expect["build_widens_tensor"] = "BUILD applied to a tensor"
    setitem = hf.p_tensor("900", "FloatStorage", 1, (1,), (1,)) + hf.p_str("shape") + hf.p_tuple((64,)) + b"s"
    cases.file("setitem_on_tensor", _pickle_with_tensor(bias, setitem, state, {"900": b"\0" * 4}))
    expect["setitem_on_tensor"] = "SETITEM applied to a tensor"
    far = hf.p_tensor("900", "FloatStorage", 8, (2, 4), (2**40, 1))
    cases.file("stride_2_40", _pickle_with_tensor(bias, far, state, {"900": b"\0" * 32}))
    expect["stride_2_40"] = "exceeds its storage"
    # 2. Three 20000x20000 broadcast (stride 0) tensors in < 2 KB; deflate bombs.
    bcast = [(f"b{i}", hf.p_tensor("0", "FloatStorage", 1, (20000, 20000), (0, 0))) for i in range(3)]
    cases.file("stride_0", hf.torch_save_zip(hf.state_dict_pickle(bcast), {"0": b"\0" * 4}))
    expect["stride_0"] = "broadcast or overlapping strides"
    bomb = {"0": b"\0" * (64 << 20)}
    small = [("w", hf.p_tensor("0", "FloatStorage", 4, (4,), (1,)))]
    cases.file("deflate_bomb_storage", hf.torch_save_zip(hf.state_dict_pickle(small), bomb,
                                                         compress={"0": zipfile.ZIP_DEFLATED}))
    expect["deflate_bomb_storage"] = "more than the 16 its tensors declare"
    declared = [("w", hf.p_tensor("0", "FloatStorage", 16 << 20, (16 << 20,), (1,)))]
    cases.file("deflate_bomb_declared", hf.torch_save_zip(hf.state_dict_pickle(declared), bomb,
                                                          compress={"0": zipfile.ZIP_DEFLATED}))
    expect["deflate_bomb_declared"] = "a zip bomb"
    cases.file("deflate_bomb_byteorder", hf.torch_save_zip(good_pkl, {}, byteorder=b"\0" * (32 << 20),
                                                           compress={"byteorder": zipfile.ZIP_DEFLATED}))
    expect["deflate_bomb_byteorder"] = "more than the 16 accepted"
    # 3. Exponential pickle: list i holds list i-1 twice, 40 deep (2**40 paths); deep nesting;
    #    a dict key that is a DAG of tuples (hashing it is exponential).
    exp = b"\x80\x02" + hf.p_tensor("0", "FloatStorage", 1, (1,), (1,)) + b"\x85q\x00"  # memo 0 = (t,)
    for i in range(1, 41):
        exp += b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i])
    cases.file("exponential_dag", hf.torch_save_zip(exp + b".", {"0": b"\0" * 4}))
    expect["exponential_dag"] = "no consistency-decoder or SD VAE tensor names"
    deep = b"\x80\x02" + b"]" * 150 + hf.p_tensor("0", "FloatStorage", 1, (1,), (1,)) + b"a" * 150 + b"."
    cases.file("deep_nesting", hf.torch_save_zip(deep, {"0": b"\0" * 4}))
    expect["deep_nesting"] = "nested more than 100 levels"
    # 400 dicts of 256 tensors each (one shared tensor): 102,400 names.
    many = b"\x80\x02" + hf.p_tensor("0", "FloatStorage", 1, (1,), (1,)) + b"q\x00}("
    block = b"}(" + b"".join(b"M" + i.to_bytes(2, "little") + b"h\x00" for i in range(256)) + b"u"
    many += b"".join(hf.p_str(f"m{j}") + block for j in range(400)) + b"u."
    cases.file("too_many_tensors", hf.torch_save_zip(many, {"0": b"\0" * 4}))
    expect["too_many_tensors"] = "more than 100000 tensors"
    key = b"\x80\x02)q\x00" + b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])
                                       for i in range(60))
    cases.file("dag_dict_key", hf.torch_save_zip(key + b"}h\x3cK\x01s.", {}))
    expect["dag_dict_key"] = "dict key of type tuple"
    # 4. A NaN in a bf16 weight; an int32 weight.
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
    bf[bias] = bf[bias].copy()
    bf[bias][0] = np.nan
    cases.file("nan_bf16", hf.state_dict_zip(bf)[0])
    expect["nan_bf16"] = "NaN/inf values"
    ints = dict(state)
    ints[bias] = np.zeros(state[bias].shape, np.int32)
    cases.file("int32_weight", hf.state_dict_zip(ints)[0])
    expect["int32_weight"] = f"{bias}: int32"
    # 6. diffusers config.json with bad values; safetensors [2**64], a 200k-deep header; a zip
    #    whose central directory lies about a record's size.
    for name, change in [("groups_0", {"norm_num_groups": 0}), ("layers_str", {"layers_per_block": "2"}),
                         ("layers_3000", {"layers_per_block": 3000}),
                         ("levels_200", {"block_out_channels": [8] * 200})]:
        cases.folder(f"config_{name}", {**MICRO_JSON, **change}, good_zip)
        expect[f"config_{name}"] = f"field {next(iter(change))}"
    bad_json = {"deep": "[" * 100_000 + "]" * 100_000, "huge_int": '{"layers_per_block": 1' + "0" * 5000 + "}"}
    for name, text in bad_json.items():
        folder = cases.folder(f"config_json_{name}", {}, good_zip)
        (folder / "config.json").write_text(text)
        expect[f"config_json_{name}"] = "config.json: invalid JSON"
    cases.file("st_shape_2_64", hf.safetensors_raw(
        json.dumps({"w": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 4]}}).encode(), b"\0" * 4),
        ".safetensors")
    expect["st_shape_2_64"] = "4 bytes for shape"
    cases.file("st_deep_header", hf.safetensors_raw(b"[" * 200_000 + b"]" * 200_000, b""), ".safetensors")
    expect["st_deep_header"] = "nested too deeply"
    # 7. Python-int sizes: [2**62+1, 4] would wrap to 16 bytes in int64.
    cases.file("st_size_wraps", hf.safetensors_raw(
        json.dumps({"w": {"dtype": "F32", "shape": [2**62 + 1, 4], "data_offsets": [0, 16]}}).encode(),
        b"\0" * 16), ".safetensors")
    expect["st_size_wraps"] = "16 bytes for shape"
    first = "archive/data/0"
    cases.file("zip_size_lies_small", hf.set_central_size(good_zip, first, 4))
    expect["zip_size_lies_small"] = "fewer than the"
    cases.file("zip_size_lies_huge", hf.set_central_size(good_zip, first, 2**32 - 1))
    expect["zip_size_lies_huge"] = "more than the"
    # 13. A FIFO and a device as SRC.
    fifo = cases.src / "fifo.pt"
    os.mkfifo(fifo)
    cases.items["fifo"] = fifo
    expect["fifo"] = "is a FIFO"
    cases.items["dev_zero"] = Path("/dev/zero")
    expect["dev_zero"] = "is a device"
    return expect


# Opcodes swapped into data.pkl by the corpus: ones that build, mutate or look up objects.
_SWAP_OPCODES = b"bsuaeRQ)]}(t.hq\x85\x86\x87\x81cN"


def _build_corpus(cases: Cases, state: dict) -> list[str]:
    """Mutations of the valid micro checkpoint: truncations, flipped bytes and appended bytes of
    the zip, flipped bytes / swapped opcodes / truncations of data.pkl (re-zipped, so the parser
    sees them), and flipped bytes of a safetensors header."""
    rng = np.random.default_rng(CORPUS_SEED)
    good_zip, good_pkl = hf.state_dict_zip(state)
    names = []

    def add(name, content, suffix=".pt"):
        cases.file(name, content, suffix)
        names.append(name)

    for i in range(CORPUS_PER_KIND):
        add(f"zip_cut_{i}", good_zip[:int(rng.integers(1, len(good_zip)))])
        buf = bytearray(good_zip)
        for pos in rng.integers(0, len(buf), 8):
            buf[pos] ^= int(rng.integers(1, 256))
        add(f"zip_flip_{i}", bytes(buf))
        pkl = bytearray(good_pkl)
        for pos in rng.integers(2, len(pkl), 4):
            pkl[pos] ^= int(rng.integers(1, 256))
        add(f"pkl_flip_{i}", hf.rezip_with_pickle(good_zip, bytes(pkl)))
        pkl = bytearray(good_pkl)
        for pos in rng.integers(2, len(pkl), 2):
            pkl[pos] = _SWAP_OPCODES[int(rng.integers(len(_SWAP_OPCODES)))]
        add(f"pkl_swap_{i}", hf.rezip_with_pickle(good_zip, bytes(pkl)))
        add(f"pkl_cut_{i}", hf.rezip_with_pickle(good_zip, good_pkl[:int(rng.integers(1, len(good_pkl)))]))
        # bytes appended after the zip's end record (zip readers allow a trailing comment-like tail)
        add(f"zip_tail_{i}", good_zip + rng.integers(0, 256, int(rng.integers(1, 64)), np.uint8).tobytes())
    st = hf.safetensors_bytes(state)
    header_len = int.from_bytes(st[:8], "little")
    for i in range(CORPUS_PER_KIND):
        buf = bytearray(st)
        for pos in rng.integers(0, 8 + header_len, 3):
            buf[pos] = int(rng.integers(0, 256))
        add(f"st_flip_{i}", bytes(buf), ".safetensors")
    return names


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Run the converter once over every targeted case and the corpus."""
    cases = Cases(tmp_path_factory.mktemp("hostile"))
    state = micro_state()
    expect = _build_targeted(cases, state)
    corpus = _build_corpus(cases, state)
    return cases, cases.run(), expect, corpus


def _assert_clean_refusal(cases: Cases, name: str, result: dict, must_contain: str | None = None) -> None:
    lines = result["stderr"].strip().splitlines()
    assert result["rc"] == 1, f"{name}: exit {result['rc']}: {result['stderr'][-1500:]}"
    # One message: one line, or (the weight-mapping report) a first line and an indented list.
    assert lines and lines[0].startswith("error: "), f"{name}: {result['stderr'][-1500:]}"
    assert all(line.startswith("  ") for line in lines[1:]), f"{name}: {result['stderr'][-1500:]}"
    assert "Traceback" not in result["stderr"]
    src = cases.items[name]
    assert str(src) in lines[0] or str(src.parent) in lines[0], f"{name}: file not named: {lines[0]}"
    if must_contain:
        assert must_contain in result["stderr"], f"{name}: {result['stderr']}"
    assert not (cases.root / "dst" / name).exists(), f"{name}: something was left at DST"
    assert result["seconds"] < 60


def test_valid_micro_checkpoint_converts_exactly(converted):
    cases, results, _, _ = converted
    assert results["valid"]["rc"] == 0, results["valid"]["stderr"]
    assert results["valid"]["same"] is True


TARGETED = [
    "build_widens_tensor", "setitem_on_tensor", "stride_2_40", "stride_0", "deflate_bomb_storage",
    "deflate_bomb_declared", "deflate_bomb_byteorder", "exponential_dag", "deep_nesting", "dag_dict_key",
    "too_many_tensors", "nan_bf16", "int32_weight", "config_groups_0", "config_layers_str", "config_layers_3000",
    "config_levels_200", "config_json_deep", "config_json_huge_int", "st_shape_2_64", "st_deep_header",
    "st_size_wraps", "zip_size_lies_small", "zip_size_lies_huge", "fifo", "dev_zero"]


def test_every_hostile_file_is_checked(converted):
    assert set(converted[2]) == set(TARGETED)


@pytest.mark.parametrize("name", TARGETED)
def test_hostile_file_is_refused_cleanly(converted, name):
    cases, results, expect, _ = converted
    _assert_clean_refusal(cases, name, results[name], expect[name])


def test_mutated_checkpoints_convert_exactly_or_are_refused_cleanly(converted):
    cases, results, _, corpus = converted
    outcomes = {"same": 0, "refused": 0}
    for name in corpus:
        r = results[name]
        if r["rc"] == 0:
            assert r["same"] is True, f"{name} converted to different params"
            outcomes["same"] += 1
        else:
            _assert_clean_refusal(cases, name, r)
            outcomes["refused"] += 1
    assert outcomes["refused"] >= len(corpus) // 2  # the mutations do damage
    print(outcomes)


# --------------------------------------------------------------------------------------------
# cmjax checkpoints: tampered cmjax.json, missing / truncated / flipped data files (in-process).


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "good"
    checkpoint.save_decoder(random_decoder(config=MICRO), path)
    return path


def _tampered(saved: Path, tmp_path: Path, change) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(saved, dst)
    meta = json.loads((dst / "cmjax.json").read_text())
    meta = change(meta)
    (dst / "cmjax.json").write_text(json.dumps(meta))
    return dst


def _set(path: list, value):
    def change(meta):
        meta = copy.deepcopy(meta)
        node = meta
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        return meta
    return change


def _drop(path: list):
    def change(meta):
        meta = copy.deepcopy(meta)
        node = meta
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
        return meta
    return change


@pytest.mark.parametrize("change,message", [
    (_set(["config", "extra"], 1), "unknown field(s) config.extra"),
    (_drop(["config", "unet", "in_channels"]), "field config.unet.in_channels is missing"),
    (_set(["config", "unet"], None), "field config.unet must be a JSON object"),
    (_set(["config", "latent_std"], [1, 2]), "latent_mean and latent_std need one value per latent channel"),
    (_set(["config", "unet", "norm_num_groups"], 0), "field config.unet.norm_num_groups must lie in [1, 1024]"),
    (_set(["config", "unet", "layers_per_block"], 3000), "field config.unet.layers_per_block must lie in"),
    (_set(["config", "unet", "block_out_channels"], [8, 10]), "not a multiple of norm_num_groups"),
    (_set(["version"], "2"), "field version must be a positive integer"),
    (_drop(["config"]), "field config is missing"),
    (lambda meta: [meta], "must hold a JSON object, got list"),
    (lambda meta: None, "must hold a JSON object, got NoneType"),
])
def test_tampered_cmjax_json_is_one_line_naming_the_field(saved, tmp_path, change, message):
    path = _tampered(saved, tmp_path, change)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read_decoder(path)
    assert message in str(e.value) and str(path / "cmjax.json") in str(e.value) and "\n" not in str(e.value)


def test_duplicate_json_keys_are_refused_in_every_json_input(saved, tmp_path):
    """json.loads keeps the last of two equal keys; another reader may keep the first and see
    another file. cmjax.json (at any depth), a diffusers config.json and a safetensors header refuse it."""
    from cmjax.weights.errors import parse_json
    from cmjax.weights.from_pytorch import convert

    text = (saved / "cmjax.json").read_text()
    dst = tmp_path / "ckpt"
    shutil.copytree(saved, dst)
    (dst / "cmjax.json").write_text(text.replace('"unet": {', '"unet": {"layers_per_block": 9, ', 1))
    with pytest.raises(checkpoint.CheckpointError, match="key 'layers_per_block' appears twice") as e:
        checkpoint.read_decoder(dst)
    assert str(dst / "cmjax.json") in str(e.value)
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MICRO_JSON)[:-1] + ', "in_channels": 4}')
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(hf.safetensors_bytes(micro_state()))
    with pytest.raises(ValueError, match="key 'in_channels' appears twice") as e:
        convert(folder, tmp_path / "out")
    assert str(folder / "config.json") in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(checkpoint.CheckpointError, match="key 'a' appears twice"):
        parse_json(b'{"x": {"y": [{"a": 1, "a": 2}]}}', "f.json")
    assert parse_json(b'{"a": {"a": 1}}', "f.json") == {"a": {"a": 1}}  # the same key at two depths is fine


def test_a_config_that_does_not_fit_the_params_is_refused(saved, tmp_path, capsys):
    """A valid config whose network has other shapes than the stored params: read_decoder refuses
    it, and so does decode.py (which reads the params as stored, in the background, and checks
    them against the config before it writes): one line, exit 2, no output folder."""
    path = _tampered(saved, tmp_path, _set(["config", "unet", "block_out_channels"], [8, 12]))
    with pytest.raises(checkpoint.CheckpointError, match="recorded config") as e:
        checkpoint.read_decoder(path)
    assert str(path / "params") in str(e.value) and "\n" not in str(e.value)
    np.save(tmp_path / "z.npy", np.zeros((1, 3, 4, 4), np.float32))
    status, err = run_main(capsys, "--checkpoint", path, "--output", tmp_path / "out", tmp_path / "z.npy")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and not (tmp_path / "out").exists() and "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith(f"error: {path / 'params'}: the params do not match the "
                                                     "recorded config"), err
    # written by cmjax itself from a Decoder whose params are not its config's: not noted as checked,
    # so decode.py still compares the shapes (and says so in one line)
    odd = tmp_path / "odd"
    other = DecoderConfig.from_dict(json.loads((path / "cmjax.json").read_text())["config"])
    checkpoint.save_decoder(cmjax.Decoder(other, random_decoder(config=MICRO).params), odd)
    status, err = run_main(capsys, "--checkpoint", odd, "--output", tmp_path / "out2", tmp_path / "z.npy")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and not (tmp_path / "out2").exists() and "Traceback" not in err, err
    assert len(errors) == 1 and "the params do not match the recorded config" in errors[0], err


def test_metadata_declaring_more_than_the_data_holds_is_refused_before_reading(saved):
    """decode.py reads the params laid out as orbax's metadata declares: a forged shape would be
    allocated before the config check. The declared size is bounded by the data files' bytes."""
    params_dir = saved / "params"
    layout = checkpoint._stored_layout(params_dir)  # what a real checkpoint declares passes
    assert jax.tree.structure(layout) == jax.tree.structure(random_decoder(config=MICRO).params)
    forged = {**layout, "conv_in": {**layout["conv_in"],
                                    "kernel": jax.ShapeDtypeStruct((3, 3, 100_000, 100_000), np.float32)}}
    with pytest.raises(checkpoint.CheckpointError, match="declares 335.3 GiB of params") as e:
        checkpoint._check_declared_size(params_dir, forged)
    assert str(params_dir) in str(e.value) and "\n" not in str(e.value)


def _data_files(path: Path) -> list[Path]:
    return sorted((p for p in (path / "params").rglob("*") if p.is_file() and "/d/" in str(p)),
                  key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_params_are_refused(saved, tmp_path, damage, capsys):
    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)
    target = _data_files(path)[-1]
    raw = bytearray(target.read_bytes())
    if damage == "flip":  # 64 flipped bytes in the middle: only the digest can tell
        for i in range(64):
            raw[len(raw) // 2 + i] ^= 0x5A
        target.write_bytes(bytes(raw))
    elif damage == "truncate":
        target.write_bytes(bytes(raw[: len(raw) // 3]))
    else:
        target.unlink()
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read_decoder(path)
    assert str(path / "params") in str(e.value) and "\n" not in str(e.value)
    if damage == "flip":
        assert "do not match the digest" in str(e.value)
        loaded = checkpoint.read_decoder(path, verify=False)  # the escape hatch reads it as it is
        assert loaded.config == MICRO
    # decode.py reads the params in the background while it compiles, and checks them before it writes:
    # the same one line, exit 2, no output folder
    np.save(tmp_path / "z.npy", np.zeros((1, 3, 4, 4), np.float32))
    status, err = run_main(capsys, "--checkpoint", path, "--output", tmp_path / "out", tmp_path / "z.npy")
    assert status == 2 and not (tmp_path / "out").exists(), err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: {path / 'params'}: ") and str(e.value).split(" (")[0] in errors[0]


def test_digest_is_recorded_and_verifies(saved):
    meta = json.loads((saved / "cmjax.json").read_text())
    decoder = checkpoint.read_decoder(saved)
    assert meta["params_sha256"] == checkpoint.params_digest(decoder.params)
    assert meta["params_sha256"] == checkpoint.params_digest(random_decoder(config=MICRO).params)


def test_unchanged_checked_files_are_not_hashed_again(tmp_path, monkeypatch):
    """A checkpoint cmjax wrote, or one that passed the digest check, is noted in $CMJAX_CACHE/verified
    with its files' sizes, times and inodes: reading the same untouched files again (read_decoder,
    or decode.py's background Loading) hashes nothing. Any change to a data file (even one that puts
    its modification time back), to cmjax.json, or CMJAX_REHASH=1 makes the next read hash again."""
    monkeypatch.setenv("CMJAX_CACHE", str(tmp_path / "cache"))
    hashed = []
    digest = checkpoint.params_digest
    monkeypatch.setattr(checkpoint, "params_digest", lambda params: hashed.append(1) or digest(params))

    def reads() -> int:
        hashed.clear()
        checkpoint.read_decoder(path)
        loading = checkpoint.Loading.start(path)
        loading.check()
        assert loading.decoder().config == MICRO
        return len(hashed)

    path = tmp_path / "written"
    checkpoint.save_decoder(random_decoder(config=MICRO), path)  # hashed once, while it is written
    assert len(list((tmp_path / "cache" / checkpoint.VERIFIED_DIR).iterdir())) == 1
    assert reads() == 0
    monkeypatch.setenv(checkpoint.REHASH_ENV, "1")
    assert reads() == 2
    monkeypatch.delenv(checkpoint.REHASH_ENV)

    copy = tmp_path / "copy"  # not written by cmjax here: checked on its first read, then remembered
    shutil.copytree(path, copy)
    path = copy
    assert reads() == 1 and reads() == 0

    meta = json.loads((path / "cmjax.json").read_text())
    (path / "cmjax.json").write_text(json.dumps({**meta, "source": "elsewhere"}))
    assert reads() == 1 and reads() == 0

    target = _data_files(path)[-1]
    before = target.stat()
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x5A  # same size, and the modification time put back: the change time still moves
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(checkpoint.CheckpointError, match="do not match the digest"):
        checkpoint.read_decoder(path)
    with pytest.raises(checkpoint.CheckpointError, match="do not match the digest"):
        checkpoint.Loading.start(path).check()


# --------------------------------------------------------------------------------------------
# Config bounds are checked before anything is built; the table is what h5 et al. extend.


def test_config_bounds_refuse_before_building():
    d = MICRO.to_dict()
    d["unet"]["layers_per_block"] = 3000
    with pytest.raises(ConfigError, match="layers_per_block must lie in"):
        DecoderConfig.from_dict(d)
    with pytest.raises(ConfigError, match="field unet.norm_num_groups must lie in"):
        DecoderConfig(unet=dict(MICRO.to_dict()["unet"], norm_num_groups=0))
    assert DecoderConfig.from_dict(MICRO.to_dict()) == MICRO
    assert len(abstract_params(MICRO)) > 0


# --------------------------------------------------------------------------------------------
# Image folders for train.py: symlink loops end.


def test_image_folder_walk_survives_symlink_loops(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    for p in (root / "x.png", root / "a" / "y.png", root / "a" / "b" / "z.png"):
        Image.new("RGB", (4, 4)).save(p)
    os.symlink(".", root / "l1")  # a loop to itself
    os.symlink("../..", root / "a" / "b" / "up")  # a loop back to the root
    source = data.ImageFolderSource(root)
    assert sorted(os.path.relpath(p, root) for p in source.paths) == ["a/b/z.png", "a/y.png", "x.png"]
    os.mkfifo(root / "fifo.png")  # never opened: refused by name (tests/test_data.py)
    with pytest.raises(ValueError, match=r"fifo\.png: not a regular file"):
        data.ImageFolderSource(root)


def test_small_json_files_are_read_within_a_bound(tmp_path):
    """cmjax.json, a diffusers config.json and the conv-lowering cache are read only when they are
    regular files of at most files.MAX_SMALL_FILE bytes: a sparse 4 GiB cmjax.json is refused in
    one line without being read, a FIFO named config.json is never opened."""
    from cmjax import files, tuning
    from cmjax.weights import diffusers

    ckpt = tmp_path / "ckpt"
    checkpoint.save_decoder(random_decoder(0), ckpt)
    with open(ckpt / checkpoint.CONFIG_FILE, "r+b") as f:
        f.truncate(2 ** 32)
    with pytest.raises(checkpoint.CheckpointError, match=r"cmjax\.json: 4294967296 bytes, more than such a file holds"):
        checkpoint.read_config(ckpt)
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"config\.json: not a regular file"):
        diffusers.read_config_json(tmp_path / "config.json")
    assert tuning.read_cache(tmp_path / "config.json") == {}  # unreadable cache: measured again, never blocks
    with pytest.raises(ValueError, match="not a regular file"):
        files.read_small("/dev/zero")
