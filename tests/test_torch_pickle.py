"""Tests for cmjax.weights.torch_pickle (torch-free checkpoint reading) and cmjax.weights.openai.

torch is used here only to write reference files and to state what ``state_dict()`` holds.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from cmjax.weights.openai import openai_state_to_diffusers, openai_to_diffusers_name  # noqa: E402
from cmjax.weights.torch_pickle import CheckpointError, load_torch_file  # noqa: E402
from tests import openai_peer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# helpers


def to_numpy(t: "torch.Tensor") -> np.ndarray:
    """Exact numpy copy of a CPU tensor (bfloat16 via ml_dtypes; bf16 -> f32 -> bf16 is exact)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy().copy()


def assert_same_state(got: dict, want: dict) -> None:
    """Names (in order), dtypes, shapes and bits must all match."""
    assert list(got) == list(want)
    for k, v in want.items():
        ref = to_numpy(v)
        assert got[k].dtype == ref.dtype, k
        assert got[k].shape == ref.shape, k
        assert got[k].tobytes() == ref.tobytes(), k
        assert got[k].flags.c_contiguous, k


# The tiny module named like OpenAI's TorchScript ConvUNetVAE (tests/openai_peer.py), two levels,
# plus two buffers in dtypes the loader must decode (a float16 and a bfloat16 table).


@pytest.fixture(scope="module")
def tiny():
    module = openai_peer.make(channels=(32, 64), layers=1, timesteps=16)
    module.register_buffer("half_table", torch.randn(3, 2).half())
    module.register_buffer("bf16_table", torch.randn(5).bfloat16())
    return module


@pytest.fixture(scope="module")
def example_inputs():
    x, _, features = openai_peer.example_inputs(h=1, w=1)
    return x, torch.tensor([3]), features


# ---------------------------------------------------------------------------------------------
# Reading TorchScript archives and torch.save files


def test_torchscript_scripted_matches_state_dict(tiny, tmp_path):
    scripted = torch.jit.script(tiny)
    path = tmp_path / "scripted.pt"
    torch.jit.save(scripted, str(path))
    got = load_torch_file(path)
    assert_same_state(got, tiny.state_dict())
    assert_same_state(got, scripted.state_dict())
    assert "blocks.down_0_conv_0.gn_1.g" in got
    assert "blocks.up_1_upsamp.f_t.w" in got
    assert "embed_time.emb.weight" in got
    assert got["half_table"].dtype == np.float16
    assert got["bf16_table"].dtype == ml_dtypes.bfloat16


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_traced_matches_state_dict(tiny, example_inputs, tmp_path):
    traced = torch.jit.trace(tiny, example_inputs)
    path = tmp_path / "traced.pt"
    torch.jit.save(traced, str(path))
    got = load_torch_file(path)
    assert_same_state(got, tiny.state_dict())


def test_torchscript_plain_tensor_attribute_and_constants(tmp_path):
    class WithAttr(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 3))
            self.table = torch.arange(4.0)  # plain tensor attribute: not in state_dict()

        def forward(self, x):
            return x @ self.w + self.table.sum()

    m = WithAttr()
    scripted_path = tmp_path / "attr_scripted.pt"
    torch.jit.save(torch.jit.script(m), str(scripted_path))
    got = load_torch_file(scripted_path)
    # A scripted module keeps the attribute; the loader returns every tensor attribute.
    assert list(got) == ["w", "table"]
    np.testing.assert_array_equal(got["table"], np.arange(4.0, dtype=np.float32))

    traced_path = tmp_path / "attr_traced.pt"
    torch.jit.save(torch.jit.trace(m, torch.randn(1, 2)), str(traced_path))
    assert list(load_torch_file(traced_path)) == ["w"]
    # Tracing turns the attribute into a constant, reachable with include_constants.
    got = load_torch_file(traced_path, include_constants=True)
    assert list(got) == ["w", "CONSTANTS.c0"]
    np.testing.assert_array_equal(got["CONSTANTS.c0"], np.arange(4.0, dtype=np.float32))


def test_torch_save_state_dict(tiny, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(tiny.state_dict(), path)
    assert_same_state(load_torch_file(path), tiny.state_dict())


def special_tensors() -> dict:
    torch.manual_seed(1)
    base = torch.randn(6, 5)
    shared = torch.randn(4, 3)
    tied = torch.randn(3)
    return {
        "f32": torch.randn(2, 3),
        "f16": torch.randn(4, 2).half(),
        "bf16": torch.randn(3, 3).bfloat16(),
        "f64": torch.randn(2).double(),
        "i64": torch.arange(-3, 7),
        "i32": torch.arange(5, dtype=torch.int32),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64),
        "transposed": base.t(),  # non-contiguous view of a larger storage
        "strided": base[1::2, ::2],  # offset and steps in both dims
        "bf16_transposed": torch.randn(3, 4).bfloat16().t(),
        "scalar": torch.tensor(2.5),  # 0-d
        "scalar_in_storage": base[2, 3],  # 0-d with an offset
        "row_of_shared": shared[1],  # two views of one storage
        "col_of_shared": shared[:, 2],
        "tied_a": tied,  # the same tensor under two names
        "tied_b": tied,
        "empty": torch.zeros(0, 3),
        "param": nn.Parameter(torch.randn(2, 2)),  # pickled via _rebuild_parameter
        "f8": torch.randn(4).to(torch.float8_e4m3fn),  # pickled via _rebuild_tensor_v3
    }


def assert_special(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        if v.dtype == torch.float8_e4m3fn:
            ref = v.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        else:
            ref = to_numpy(v)
        assert got[k].dtype == ref.dtype, k
        assert got[k].shape == ref.shape, k
        assert got[k].tobytes() == ref.tobytes(), k
        assert got[k].flags.c_contiguous, k
    # Returned arrays never alias each other, even where torch tensors shared storage.
    assert not np.shares_memory(got["tied_a"], got["tied_b"])
    assert not np.shares_memory(got["row_of_shared"], got["col_of_shared"])
    got["tied_a"][0] += 1
    assert got["tied_b"][0] != got["tied_a"][0]


def test_torch_save_dtypes_views_scalars(tmp_path):
    want = special_tensors()
    path = tmp_path / "special.pt"
    torch.save(want, path)
    got = load_torch_file(path)
    assert_special(got, want)
    assert got["scalar"].shape == () and got["scalar"] == np.float32(2.5)


def test_legacy_format(tmp_path):
    want = {k: v for k, v in special_tensors().items() if k != "f8"}
    path = tmp_path / "legacy.pt"
    torch.save(want, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert_special(load_torch_file(path), want)


def test_legacy_truncated(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"a": torch.randn(100)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_torch_file(path)
    assert str(path) in str(e.value)


def test_nested_dicts_and_lightning_layout(tiny, tmp_path):
    sd = tiny.state_dict()
    ckpt = {
        "epoch": 3,
        "global_step": 10,
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}}],
        "hparams": {"lr": 1e-4, "name": "x"},
    }
    path = tmp_path / "lightning.ckpt"
    torch.save(ckpt, path)
    got = load_torch_file(path)  # narrowed to "state_dict" automatically
    assert list(got) == [f"model.{k}" for k in sd]
    np.testing.assert_array_equal(got["model.output.f.w"], sd["output.f.w"].numpy())
    every = load_torch_file(path, key="optimizer_states")
    assert list(every) == ["0.state.0.exp_avg"]

    nested = {"model": {"a": torch.ones(2), "sub": {"b": torch.zeros(1)}}, "step": 5}
    path2 = tmp_path / "nested.pt"
    torch.save(nested, path2)
    assert list(load_torch_file(path2)) == ["model.a", "model.sub.b"]
    assert list(load_torch_file(path2, key="model.sub")) == ["b"]
    with pytest.raises(CheckpointError, match="no entry"):
        load_torch_file(path2, key="model.missing")


def test_duplicate_name_after_flattening(tmp_path):
    path = tmp_path / "dup.pt"
    torch.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="duplicate") as e:
        load_torch_file(path)
    assert str(path) in str(e.value) and "a.b" in str(e.value)


def rewrite_big_endian(src: Path, dst: Path, itemsize: int) -> None:
    """Copy a torch.save zip, declaring big-endian storages and byte-swapping them."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename and itemsize > 1:
                data = np.frombuffer(data, f"u{itemsize}").byteswap().tobytes()
            zout.writestr(info.filename, data)


@pytest.mark.parametrize("dtype,itemsize", [(torch.float32, 4), (torch.float16, 2),
                                            (torch.bfloat16, 2), (torch.int64, 8)])
def test_big_endian_archive(tmp_path, dtype, itemsize):
    want = {"x": (torch.randn(3, 4) * 10).to(dtype), "y": (torch.randn(5) * 10).to(dtype).t()}
    src, dst = tmp_path / "le.pt", tmp_path / "be.pt"
    torch.save(want, src)
    rewrite_big_endian(src, dst, itemsize)
    got = load_torch_file(dst)
    for k, v in want.items():
        assert got[k].tobytes() == to_numpy(v).tobytes()


def test_complex_big_endian(tmp_path):
    want = {"c": torch.randn(4, dtype=torch.complex64)}
    src, dst = tmp_path / "le.pt", tmp_path / "be.pt"
    torch.save(want, src)
    rewrite_big_endian(src, dst, 4)  # complex64 = two big-endian float32 components
    assert load_torch_file(dst)["c"].tobytes() == want["c"].numpy().tobytes()


# ---------------------------------------------------------------------------------------------
# Security


def zip_with_pickle(path: Path, payload: bytes, extra: dict | None = None) -> None:
    """Write a zip laid out like torch.save's, with ``payload`` as archive/data.pkl."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            z.writestr(f"archive/{name}", data)


class SystemPayload:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class OpenPayload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class EvalPayload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({self.path!r}, 'w')",))


@pytest.mark.parametrize("make,global_name", [
    (lambda m: SystemPayload(f"touch {m}"), f"{os.system.__module__}.system"),
    (lambda m: OpenPayload(str(m)), "io.open"),
    (lambda m: EvalPayload(str(m)), "builtins.eval"),
])
def test_malicious_global_is_refused(tmp_path, make, global_name):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": make(marker)}, protocol=2)
    # The payload is live: plain pickle would run it.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.pt"
    zip_with_pickle(path, payload)
    with pytest.raises(CheckpointError) as e:
        load_torch_file(path)
    msg = str(e.value)
    assert str(path) in msg and "forbidden global" in msg and global_name in msg
    assert not marker.exists()


def test_malicious_legacy_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.pt"
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True}, f, protocol=2)
        pickle.dump({"w": SystemPayload(f"touch {marker}")}, f, protocol=2)
    with pytest.raises(CheckpointError, match="forbidden global") as e:
        load_torch_file(path)
    assert "system" in str(e.value)
    assert not marker.exists()


def tensor_pickle(numel: int, size: tuple, stride: tuple, offset: int = 0, key: str = "0") -> bytes:
    """Hand-assembled protocol-2 pickle of ``{"w": <float32 tensor>}`` as torch.save writes it."""

    def s(text: str) -> bytes:  # BINUNICODE
        b = text.encode()
        return b"X" + len(b).to_bytes(4, "little") + b

    def i(v: int) -> bytes:  # BININT, or LONG1 for big values
        if -2**31 <= v < 2**31:
            return b"J" + v.to_bytes(4, "little", signed=True)
        return b"\x8a\x08" + v.to_bytes(8, "little", signed=True)

    def tup(vals: tuple) -> bytes:
        return b"(" + b"".join(i(v) for v in vals) + b"t"

    return (b"\x80\x02}" + s("w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
            + b"(" + s("storage") + b"ctorch\nFloatStorage\n" + s(key) + s("cpu") + i(numel)
            + b"tQ" + i(offset) + tup(size) + tup(stride) + b"\x89"
            + b"ccollections\nOrderedDict\n)R" + b"tR" + b"s.")


def test_hand_made_pickle_reads(tmp_path):
    path = tmp_path / "ok.pt"
    data = np.arange(6, dtype=np.float32)
    zip_with_pickle(path, tensor_pickle(6, (2, 2), (1, 2), offset=1),
                    {"data/0": data.tobytes()})
    got = load_torch_file(path)["w"]
    np.testing.assert_array_equal(got, np.array([[1, 3], [2, 4]], np.float32))


@pytest.mark.parametrize("numel,size,stride,offset", [
    (4, (16,), (1,), 0),  # larger than the storage
    (4, (2, 2), (2, 1), 1),  # offset pushes the end past the storage
    (4, (), (), 4),  # 0-d just past the end
])
def test_out_of_bounds_geometry_is_refused(tmp_path, numel, size, stride, offset):
    path = tmp_path / "oob.pt"
    zip_with_pickle(path, tensor_pickle(numel, size, stride, offset),
                    {"data/0": np.zeros(numel, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match="exceeds its storage"):
        load_torch_file(path)


def test_absurd_broadcast_shape_is_refused(tmp_path):
    # stride 0 stays inside a one-element storage but would need 2**64 bytes to materialise
    path = tmp_path / "huge.pt"
    zip_with_pickle(path, tensor_pickle(1, (2**62,), (0,)), {"data/0": b"\0" * 4})
    with pytest.raises(CheckpointError, match="broadcast or overlapping strides"):
        load_torch_file(path)


def test_storage_smaller_than_declared(tmp_path):
    path = tmp_path / "short.pt"
    zip_with_pickle(path, tensor_pickle(8, (8,), (1,)), {"data/0": b"\0" * 12})
    with pytest.raises(CheckpointError, match="storage") as e:
        load_torch_file(path)
    assert str(path) in str(e.value)


def test_missing_storage(tmp_path):
    path = tmp_path / "nostorage.pt"
    zip_with_pickle(path, tensor_pickle(4, (4,), (1,), key="7"))
    with pytest.raises(CheckpointError, match="missing storage") as e:
        load_torch_file(path)
    assert str(path) in str(e.value) and "archive/data/7" in str(e.value)


def test_module_does_not_import_torch(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"a": torch.randn(2, 2).bfloat16(), "b": torch.ones(3)}, path)
    code = ("import sys; from cmjax.weights.torch_pickle import load_torch_file; "
            f"d = load_torch_file({str(path)!r}); assert list(d) == ['a', 'b']; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# Broken files


def assert_error(path: Path, pattern: str) -> None:
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_torch_file(path)
    assert str(path) in str(e.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert_error(path, "empty")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_error(path, "not a PyTorch checkpoint")


def test_missing_file(tmp_path):
    assert_error(tmp_path / "nope.pt", "cannot open")


def test_truncated_zip(tiny, tmp_path):
    full = tmp_path / "full.pt"
    torch.jit.save(torch.jit.script(tiny), str(full))
    data = full.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    assert_error(path, "truncated or corrupt zip")


def test_corrupt_storage_bytes(tmp_path):
    full = tmp_path / "full.pt"
    t = torch.arange(1000, dtype=torch.float32) * 1.5
    torch.save({"t": t}, full)
    data = bytearray(full.read_bytes())
    where = bytes(data).find(t.numpy().tobytes())
    assert where > 0
    data[where + 100] ^= 0xFF  # the central directory stays intact; the CRC catches it
    path = tmp_path / "corrupt.pt"
    path.write_bytes(bytes(data))
    assert_error(path, "corrupt")


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "nodata.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/version", "3\n")
        z.writestr("archive/data/0", b"\0" * 16)
    assert_error(path, "no data.pkl")


def test_empty_zip(tmp_path):
    path = tmp_path / "emptyzip.pt"
    with zipfile.ZipFile(path, "w"):
        pass
    assert_error(path, "no data.pkl")


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "badpickle.pt"
    zip_with_pickle(path, b"\x80\x02}X\x05\x00")
    assert_error(path, "cannot unpickle")


# ---------------------------------------------------------------------------------------------
# OpenAI -> diffusers names


@pytest.mark.parametrize("src,dst", [
    ("embed_image.f.w", "conv_in.weight"),
    ("embed_image.f.b", "conv_in.bias"),
    ("embed_time.emb.weight", "time_proj.weight"),
    ("embed_time.f_1.w", "time_embedding.linear_1.weight"),
    ("embed_time.f_1.b", "time_embedding.linear_1.bias"),
    ("embed_time.f_2.w", "time_embedding.linear_2.weight"),
    ("embed_time.f_2.b", "time_embedding.linear_2.bias"),
    ("output.gn.g", "conv_norm_out.weight"),
    ("output.gn.b", "conv_norm_out.bias"),
    ("output.f.w", "conv_out.weight"),
    ("output.f.b", "conv_out.bias"),
    ("blocks.down_0_conv_0.gn_1.g", "down_blocks.0.resnets.0.norm1.weight"),
    ("blocks.down_0_conv_0.gn_1.b", "down_blocks.0.resnets.0.norm1.bias"),
    ("blocks.down_1_conv_0.f_s.w", "down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("blocks.down_2_conv_2.f_t.b", "down_blocks.2.resnets.2.time_emb_proj.bias"),
    ("blocks.down_3_conv_1.gn_2.g", "down_blocks.3.resnets.1.norm2.weight"),
    ("blocks.down_0_downsamp.f_1.w", "down_blocks.0.downsamplers.0.conv1.weight"),
    ("blocks.down_2_downsamp.f_2.b", "down_blocks.2.downsamplers.0.conv2.bias"),
    ("blocks.mid_0.f_1.w", "mid_block.resnets.0.conv1.weight"),
    ("blocks.mid_1.gn_2.b", "mid_block.resnets.1.norm2.bias"),
    # the up path is reversed: OpenAI up_3 (coarsest) is diffusers up_blocks.0
    ("blocks.up_3_conv_0.f_s.w", "up_blocks.0.resnets.0.conv_shortcut.weight"),
    ("blocks.up_0_conv_3.f_2.w", "up_blocks.3.resnets.3.conv2.weight"),
    ("blocks.up_2_conv_1.f_t.w", "up_blocks.1.resnets.1.time_emb_proj.weight"),
    ("blocks.up_1_conv_2.gn_1.g", "up_blocks.2.resnets.2.norm1.weight"),
    ("blocks.up_3_upsamp.gn_1.g", "up_blocks.0.upsamplers.0.norm1.weight"),
    ("blocks.up_1_upsamp.f_2.b", "up_blocks.2.upsamplers.0.conv2.bias"),
    # names re-saved from an nn.Module port use weight/bias
    ("blocks.mid_0.gn_1.weight", "mid_block.resnets.0.norm1.weight"),
    ("embed_image.f.weight", "conv_in.weight"),
])
def test_openai_names(src, dst):
    assert openai_to_diffusers_name(src) == dst


def test_num_levels_changes_up_reversal():
    assert openai_to_diffusers_name("blocks.up_0_conv_0.f_1.w", num_levels=2) == \
        "up_blocks.1.resnets.0.conv1.weight"
    assert openai_to_diffusers_name("blocks.up_1_upsamp.f_1.w", num_levels=2) == \
        "up_blocks.0.upsamplers.0.conv1.weight"
    with pytest.raises(ValueError, match="up_2_conv_0"):
        openai_to_diffusers_name("blocks.up_2_conv_0.f_1.w", num_levels=2)


@pytest.mark.parametrize("name", [
    "foo.bar",
    "blocks.down_0_conv_0.gn_1.w",  # GroupNorm has g/b, not w
    "blocks.down_0_conv_0.f_1.g",  # a conv has no g
    "blocks.down_0_conv_0.attn.w",  # no such sub-module
    "blocks.down_0_upsamp.f_1.w",  # the down path has no upsampler
    "blocks.up_1_downsamp.f_1.w",
    "blocks.down_4_conv_0.f_1.w",  # level out of range for 4 levels
    "blocks.side_0_conv_0.f_1.w",
    "embed_time.emb.b",
    "output.f.w.extra",
    "",
])
def test_unknown_names_raise(name):
    with pytest.raises(ValueError) as e:
        openai_to_diffusers_name(name)
    assert repr(name) in str(e.value) or name in str(e.value)


def test_state_conversion_with_separate_embedding():
    table = np.arange(12.0).reshape(4, 3)
    state = {"embed_image.f.w": 1, "blocks.up_0_conv_0.f_1.b": 2}
    out = openai_state_to_diffusers(state, embedding={"weight": table})
    assert out == {"conv_in.weight": 1, "up_blocks.3.resnets.0.conv1.bias": 2,
                   "time_proj.weight": table}
    with pytest.raises(ValueError, match="twice"):
        openai_state_to_diffusers({"embed_time.emb.weight": table}, embedding={"weight": table})
    with pytest.raises(ValueError, match="weight"):
        openai_state_to_diffusers(state, embedding={"w": table})
    with pytest.raises(ValueError, match="conv_in.weight"):
        openai_state_to_diffusers({"embed_image.f.w": 1, "embed_image.f.weight": 2})


def openai_full_names(channels=(320, 640, 1024, 1024), down_layers=3, up_layers=4) -> list[str]:
    """Every parameter name of OpenAI's ConvUNetVAE, as in diffusers' conversion script."""
    block = ["gn_1.g", "gn_1.b", "f_1.w", "f_1.b", "f_t.w", "f_t.b", "gn_2.g", "gn_2.b",
             "f_2.w", "f_2.b"]
    names = ["embed_image.f.w", "embed_image.f.b", "embed_time.emb.weight", "embed_time.f_1.w",
             "embed_time.f_1.b", "embed_time.f_2.w", "embed_time.f_2.b"]
    levels = len(channels)
    prev = channels[0]
    for i, c in enumerate(channels):
        for j in range(down_layers):
            extra = ["f_s.w", "f_s.b"] if prev != c else []
            names += [f"blocks.down_{i}_conv_{j}.{p}" for p in block + extra]
            prev = c
        if i < levels - 1:
            names += [f"blocks.down_{i}_downsamp.{p}" for p in block]
    names += [f"blocks.mid_{k}.{p}" for k in range(2) for p in block]
    for i in reversed(range(levels)):
        for j in range(up_layers):
            # every up block sees concat([h, skip]), so all of them have a 1x1 shortcut
            names += [f"blocks.up_{i}_conv_{j}.{p}" for p in block + ["f_s.w", "f_s.b"]]
        if i > 0:
            names += [f"blocks.up_{i}_upsamp.{p}" for p in block]
    names += ["output.gn.g", "output.gn.b", "output.f.w", "output.f.b"]
    return names


def test_full_openai_name_set_maps_injectively():
    names = openai_full_names()
    out = openai_state_to_diffusers({n: None for n in names})
    assert len(out) == len(names)
    # Structure of diffusers' UNet2DModel with this config.
    assert sum(k.startswith("up_blocks.0.resnets.") for k in out) == 4 * 12
    assert sum(".upsamplers.0." in k for k in out) == 3 * 10
    assert sum(".downsamplers.0." in k for k in out) == 3 * 10
    assert {k.split(".")[0] for k in out} == {
        "conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block", "up_blocks",
        "conv_norm_out", "conv_out"}
    assert "down_blocks.1.resnets.0.conv_shortcut.weight" in out
    assert "down_blocks.0.resnets.0.conv_shortcut.weight" not in out


def test_end_to_end_torchscript_to_diffusers_names(tiny, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(tiny), str(path))
    state = load_torch_file(path)
    state = {k: v for k, v in state.items() if not k.endswith("_table")}  # test-only buffers
    out = openai_state_to_diffusers(state, num_levels=2)
    np.testing.assert_array_equal(out["up_blocks.0.upsamplers.0.time_emb_proj.weight"],
                                  tiny.blocks["up_1_upsamp"].f_t.w.detach().numpy())
    np.testing.assert_array_equal(out["up_blocks.1.resnets.0.conv_shortcut.bias"],
                                  tiny.blocks["up_0_conv_0"].f_s.b.detach().numpy())
    np.testing.assert_array_equal(out["time_proj.weight"],
                                  tiny.embed_time.emb.weight.detach().numpy())
