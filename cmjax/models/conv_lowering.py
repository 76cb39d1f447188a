"""How a stride-1 2-D convolution is lowered, chosen per shape by measuring, cached on disk.

Lowerings (all NHWC input, HWIO kernel, torch's padding k//2, same result up to fp rounding):
  "xla"     ``lax.conv_general_dilated``: XLA's own convolution (cuDNN on GPU, the conv units on TPU)
  "im2col"  the k*k shifted copies of the padded image concatenated on channels, one matmul
            with K = k*k*C (the kernel's HWIO flattening has the same (dy, dx, c) order)
  "im2row"  the k shifted copies along W only, then k matmuls (one per dy) over row slices:
            a k-times smaller buffer than im2col, K = k*C

Which is fastest depends on the shape and on the machine: on CPU, XLA's convolution is slow on
tiny images with many channels, where a single large matmul wins; how large "tiny" is differs
from one CPU model to the next (github issue 14 of this project: a threshold tuned on one AVX2
machine was 1.2x off on an AVX-512 one). So ``choose_lowering`` times the candidates once per
(shape, dtype, backend, device/CPU model, jax version), keeps the answer in a JSON file, and
reads it at trace time afterwards.

    CMJAX_CONV_LOWERING   "xla" | "im2col" | "im2row": force one lowering everywhere;
                          "measure" (the default): the cached choice, measured on a cache miss
    CMJAX_CACHE           cache root (default ~/.cache/cmjax); the file is conv_lowering.json

"xla" stays the answer unless another lowering measured at least ``MARGIN`` faster, so GPU and
TPU keep ``lax.conv`` unless it is clearly beaten. A cache file that cannot be read or parsed is
treated as empty (and rewritten on the next store); writes go to a temporary file and are renamed
into place, merged with what another process may have stored meanwhile.

Caveats: the timing is of the forward convolution alone (a training step's backward pass is not
measured). Processes of one multi-host program must trace the same program, so with more than one
process nothing is measured: "xla" is used unless CMJAX_CONV_LOWERING names a lowering (the same
on every host).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cmjax.cache import cache_dir

LOWERINGS = ("xla", "im2col", "im2row")
DEFAULT = "xla"
MEASURE = "measure"
OVERRIDE_ENV = "CMJAX_CONV_LOWERING"
CACHE_NAME = "conv_lowering.json"
MARGIN = 0.95  # another lowering replaces "xla" only when it takes < MARGIN of xla's time
REPEATS = 5  # timed calls per lowering (interleaved); the minimum is kept, robust to a busy machine
PRUNE = 2.0  # after each round, lowerings slower than PRUNE x the best so far are not timed again


def conv_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    k = kernel.shape[0]
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((k // 2, k // 2),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    k, _, c, o = kernel.shape
    b, h, w, _ = x.shape
    p = k // 2
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    cols = jnp.concatenate([padded[:, dy:dy + h, dx:dx + w, :] for dy in range(k) for dx in range(k)], -1)
    return cols @ kernel.reshape(k * k * c, o)


def conv_im2row(x: jax.Array, kernel: jax.Array) -> jax.Array:
    k, _, c, o = kernel.shape
    b, h, w, _ = x.shape
    p = k // 2
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    rows = jnp.concatenate([padded[:, :, dx:dx + w, :] for dx in range(k)], -1)  # (B, H+2p, W, k*C)
    return sum(rows[:, dy:dy + h] @ kernel[dy].reshape(k * c, o) for dy in range(k))


CONV = {"xla": conv_xla, "im2col": conv_im2col, "im2row": conv_im2row}


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One convolution call: input (batch, height, width, in_channels), kernel k x k -> out_channels."""

    batch: int
    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel: int
    dtype: str

    def key(self) -> str:
        return (f"{self.batch}x{self.height}x{self.width}x{self.in_channels}->{self.out_channels}"
                f" k{self.kernel} {self.dtype}")


@functools.lru_cache(maxsize=None)  # read once per process, not once per traced convolution
def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name with its family/model/stepping and "+avx512" if it has it (``/proc/cpuinfo``).

    The numbers matter: a virtual machine may report only "AMD EPYC", a name shared by five
    generations with different vector units. Without a model name (Arm, no /proc)
    ``platform.processor()`` or the machine type stands in.
    """
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, errors="replace") as f:  # a stray byte must not stop a decode
            for line in f:
                field, _, value = line.partition(":")
                fields.setdefault(field.strip(), value.strip())
                if not line.strip():
                    break  # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    ids = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping", "CPU implementer", "CPU part")
           if k in fields]  # x86; Arm (no model name there) has implementer and part
    if ids:
        name += f" ({', '.join(ids).replace('cpu family', 'family')})"
    return name + (" +avx512" if "avx512f" in fields.get("flags", "").split() else "")


def machine_key() -> str:
    """What a measurement is valid for: backend, device (CPU model on CPU), jax version."""
    device = jax.devices()[0]
    kind = cpu_model() if device.platform == "cpu" else device.device_kind
    return f"{device.platform} | {kind} | jax {jax.__version__}"


def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def read_cache(path: Path) -> dict:
    """{machine key: {shape key: {"choice": name, "seconds": {name: s}}}}; {} if missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()) else {}


def write_cache(path: Path, machine: str, shape_key: str, entry: dict) -> None:
    """Add one entry, merged with the file's current contents; temp file + rename, never a partial file."""
    data = read_cache(path)
    data.setdefault(machine, {})[shape_key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs a re-measurement next time
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass


def time_calls(calls: dict[str, Callable[[], object]], timer: Callable[[], float] = time.perf_counter,
               repeats: int = REPEATS) -> dict[str, float]:
    """Min seconds per call of each zero-argument call, timed in interleaved rounds.

    After each round, calls slower than PRUNE x the best so far are dropped (they cannot win).
    """
    best = {name: float("inf") for name in calls}
    active = list(calls)
    for _ in range(repeats):
        for name in active:
            start = timer()
            calls[name]()
            best[name] = min(best[name], timer() - start)
        active = [name for name in active if best[name] <= PRUNE * min(best.values())]
    return best


def measure(shape: ConvShape, candidates=LOWERINGS, timer: Callable[[], float] = time.perf_counter,
            repeats: int = REPEATS) -> dict[str, float]:
    """Seconds per call of each lowering on random data of ``shape`` (see ``time_calls``)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(shape.batch, shape.height, shape.width, shape.in_channels)).astype(np.float32)
    kernel = rng.normal(size=(shape.kernel,) * 2 + (shape.in_channels, shape.out_channels)).astype(np.float32)
    # Inside a jit trace (where Conv calls this) the arrays and calls must run now, not be staged.
    with jax.ensure_compile_time_eval():
        x, kernel = jnp.asarray(x, shape.dtype), jnp.asarray(kernel, shape.dtype)
        fns = {name: jax.jit(CONV[name]) for name in candidates}
        for fn in fns.values():
            jax.block_until_ready(fn(x, kernel))  # compile + warm up
        calls = {name: lambda fn=fn: jax.block_until_ready(fn(x, kernel)) for name, fn in fns.items()}
        return time_calls(calls, timer, repeats)


def pick(seconds: dict[str, float]) -> str:
    """The fastest lowering, but "xla" unless the fastest beats it by the margin."""
    fastest = min(seconds, key=seconds.get)
    if DEFAULT in seconds and seconds[fastest] >= MARGIN * seconds[DEFAULT]:
        return DEFAULT
    return fastest


def choose_lowering(shape: ConvShape, override: str | None = None, path: Path | None = None,
                    measure_fn: Callable[[ConvShape], dict[str, float]] = measure) -> str:
    """The lowering to use for ``shape``: ``override``, else $CMJAX_CONV_LOWERING, else cached/measured."""
    mode = override or os.environ.get(OVERRIDE_ENV) or MEASURE
    if mode in LOWERINGS:
        return mode
    if mode != MEASURE:
        raise ValueError(f"{OVERRIDE_ENV}={mode!r}: expected one of {', '.join(LOWERINGS + (MEASURE,))}")
    if shape.kernel == 1:
        return DEFAULT  # a 1x1 convolution is a plain matmul under every lowering
    if jax.process_count() > 1:
        # Hosts measuring on their own (or reading their own caches) could trace different programs
        # and then hang in the first collective; a multi-host run gets XLA's convolution everywhere
        # unless CMJAX_CONV_LOWERING names one lowering for all hosts.
        return DEFAULT
    path = path or cache_path()
    machine, key = machine_key(), shape.key()
    entry = read_cache(path).get(machine, {}).get(key)
    if isinstance(entry, dict) and entry.get("choice") in LOWERINGS:
        return entry["choice"]
    seconds = measure_fn(shape)
    choice = pick(seconds)
    write_cache(path, machine, key, {"choice": choice, "seconds": seconds})
    return choice
