"""Assemblers for hostile checkpoint files: torch.save pickles and zips, safetensors headers.

Everything is written byte by byte (no torch), so a test can build exactly the malformed input it
needs: a pickle opcode out of place, a storage smaller than its tensor, a zip record that lies
about its size. The opcodes are those of ``pickletools`` (protocol 2, as torch.save writes).
"""
from __future__ import annotations

import io
import json
import struct
import zipfile
from typing import Sequence

import numpy as np

# storage class names of torch.save, by NumPy dtype name
STORAGE_CLASS = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
                 "int32": "IntStorage", "int64": "LongStorage", "bool": "BoolStorage"}


def p_str(text: str) -> bytes:
    """BINUNICODE."""
    b = text.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def p_int(v: int) -> bytes:
    """BININT, or LONG1 for values outside int32."""
    if -2**31 <= v < 2**31:
        return b"J" + v.to_bytes(4, "little", signed=True)
    n = (v.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def p_tuple(values: Sequence[int]) -> bytes:
    return b"(" + b"".join(p_int(v) for v in values) + b"t"


def p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


EMPTY_ORDERED_DICT = p_global("collections", "OrderedDict") + b")R"


def p_tensor(key: str, storage_class: str, numel: int, shape: Sequence[int], stride: Sequence[int],
             offset: int = 0) -> bytes:
    """``torch._utils._rebuild_tensor_v2(<persistent storage>, offset, shape, stride, False, {})``."""
    persid = (b"(" + p_str("storage") + p_global("torch", storage_class) + p_str(key) + p_str("cpu")
              + p_int(numel) + b"tQ")
    return (p_global("torch._utils", "_rebuild_tensor_v2") + b"(" + persid + p_int(offset)
            + p_tuple(shape) + p_tuple(stride) + b"\x89" + EMPTY_ORDERED_DICT + b"tR")


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def state_dict_pickle(entries: Sequence[tuple[str, bytes]]) -> bytes:
    """An OrderedDict ``{name: <value pickle>}`` as torch.save writes a state dict."""
    body = b"".join(p_str(name) + value for name, value in entries)
    return b"\x80\x02" + EMPTY_ORDERED_DICT + b"(" + body + b"u."


def torch_save_zip(pickle_bytes: bytes, records: dict[str, bytes], *, byteorder: bytes = b"little",
                   compress: dict[str, int] | None = None) -> bytes:
    """A zip laid out like torch.save's: archive/data.pkl, archive/byteorder, archive/data/<key>.

    ``compress``: zipfile compression method per record name (default stored, as torch writes).
    """
    compress = compress or {}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes, compress.get("data.pkl", zipfile.ZIP_STORED))
        z.writestr("archive/byteorder", byteorder, compress.get("byteorder", zipfile.ZIP_STORED))
        z.writestr("archive/version", "3\n")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data, compress.get(key, zipfile.ZIP_STORED))
    return out.getvalue()


def state_dict_zip(state: dict[str, np.ndarray]) -> tuple[bytes, bytes]:
    """(zip bytes, data.pkl bytes) of a torch.save'd state dict: one storage per tensor."""
    entries, records = [], {}
    for i, (name, value) in enumerate(state.items()):
        value = np.ascontiguousarray(value)
        entries.append((name, p_tensor(str(i), STORAGE_CLASS[value.dtype.name], value.size, value.shape,
                                       contiguous_strides(value.shape))))
        records[str(i)] = value.tobytes()
    pkl = state_dict_pickle(entries)
    return torch_save_zip(pkl, records), pkl


def rezip_with_pickle(zip_bytes: bytes, pickle_bytes: bytes) -> bytes:
    """The same archive with data.pkl replaced (fresh CRCs: the pickle parser sees the bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = pickle_bytes if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data)
    return out.getvalue()


def set_central_size(zip_bytes: bytes, member: str, size: int) -> bytes:
    """Rewrite the uncompressed size the central directory records for ``member`` (a lying zip)."""
    buf = bytearray(zip_bytes)
    name = member.encode()
    pos = buf.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", buf, pos + 28)[0]
        if bytes(buf[pos + 46:pos + 46 + name_len]) == name:
            struct.pack_into("<I", buf, pos + 24, size)
            return bytes(buf)
        pos = buf.find(b"PK\x01\x02", pos + 4)
    raise KeyError(member)


_ST_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32"}


def safetensors_bytes(state: dict[str, np.ndarray]) -> bytes:
    header, chunks, pos = {}, [], 0
    for name, value in state.items():
        raw = np.ascontiguousarray(value).tobytes()
        header[name] = {"dtype": _ST_CODES[value.dtype.name], "shape": list(value.shape),
                        "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    return safetensors_raw(json.dumps(header).encode(), b"".join(chunks))


def safetensors_raw(header: bytes, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + data
