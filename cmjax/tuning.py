"""Which convolution lowering is fastest on this machine: measured when asked, cached, made into a plan.

    conv shapes of a program (``cmjax.models.layers.conv_shapes``: an abstract trace, nothing runs)
      -> default_plan(): CMJAX_CONV_LOWERING if set; else XLA's convolution with several hosts or on
         a GPU/TPU; else the plan cached for this CPU (never measures: nothing timed on the way to
         the first image)
      -> tune(shapes): measures the shapes this CPU has not measured, each bounded in memory and
         FLOPs and all in a time budget, caches them, returns the plan (decode.py --tune)
      -> a ``LoweringPlan`` (``cmjax.models.conv_lowering``), passed to the network as an argument

Why measure: on CPU, XLA's convolution is slow on tiny images with many channels, where one
large matmul (im2col) or Winograd's fewer multiplies win, and where the crossover lies differs
from one CPU model to the next (github issue 14 of this project: a threshold tuned on one AVX2
machine was 1.2x off on an AVX-512 one). So each (shape, dtype) is timed once per (backend, CPU
model, jax version) and the choice kept in ``$CMJAX_CACHE/conv_lowering.json``. A lowering is
charged its conv's time plus its kernel preparation's / ``EVALS_PER_PREPARE``; "xla" stays the
answer unless another lowering measured at least ``MARGIN`` faster.

Why only when asked: measuring the full-size decoder's convs takes 30-170 s on a 2-core CPU, more
than the decode itself, so the default (``cmjax.decode``, decode.py) reads the cache and never
measures; a shape not in it gets XLA's convolution. ``tune`` is bounded: a shape whose candidate
would allocate more than ``max_bytes`` (estimated from the shape, before anything is allocated)
or cost more than ``max_flops`` per call is not measured (XLA's convolution, not cached), and
measuring stops when ``budget_s`` is spent (the rest is measured by the next ``tune``).

Only the CPU is measured: GPUs and TPUs keep XLA's convolution (cuDNN, the TPU's conv units), so a
lowering chosen for a CPU is never timed on, or chosen for, another backend. Processes of one
multi-host program must trace the same program, so with more than one process nothing is
measured or read from a cache: XLA's convolution, unless CMJAX_CONV_LOWERING names one lowering
(the same on every host).

    CMJAX_CONV_LOWERING   "xla" | "im2col" | "im2row" | "winograd": that lowering for every conv
                          (where it can run); unset: the cached plan as above
    CMJAX_CACHE           cache root (default ~/.cache/cmjax); the file is conv_lowering.json

A cache file that cannot be read or parsed is treated as empty (and rewritten on the next tune);
writes go to a temporary file renamed into place, merged with what another process stored meanwhile.
Caveat: the timing is of the forward convolution alone (a training step's backward pass is not measured).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from cmjax import xla_cpu
from cmjax.cache import cache_dir
from cmjax.files import read_small
from cmjax.models.conv_lowering import DEFAULT, LOWERINGS, SUBPIXEL, XLA, ConvShape, LoweringPlan, candidates

OVERRIDE_ENV = "CMJAX_CONV_LOWERING"
CACHE_NAME = "conv_lowering.json"
MARGIN = 0.95  # another lowering replaces "xla" only when it takes < MARGIN of xla's time
REPEATS = 5  # timed calls per lowering (interleaved); the minimum is kept, robust to a busy machine
PRUNE = 2.0  # after each round, lowerings slower than PRUNE x the best so far are not timed again
# A decode prepares each kernel once for all its network evaluations (two in the default 2-step
# decode; ``layers.with_prepared_kernels``), so a lowering is charged its preparation / 2.
EVALS_PER_PREPARE = 2
# Entries of an older version are measured again (1 timed Winograd transforming its kernel per call;
# 2 timed XLA's convolution on YNNPACK, before cmjax.xla_cpu).
CACHE_VERSION = 3
# Per call (about 1.5 s at 300 GFLOP/s): every conv of the full-size decoder up to 32x32 latents
# (256x256 px) is measured; the largest there, 640->640 channels at 256x256 px, is 483 GFLOP.
MAX_FLOPS = 5e11
BUDGET_S = 600.0  # one tune's measuring time; what is left is measured by the next


def max_bytes_default() -> int:
    """What one candidate's measurement may allocate: 1/8 of physical memory, at most 4 GiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 16 * 2 ** 30
    return min(4 * 2 ** 30, physical // 8)


# ------------------------------------------------------------------------------------------------
# What a measurement is valid for, and the cache


@functools.cache  # read once per process
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
    """What a measurement is valid for: backend, device (CPU model on CPU), jax version, and on CPU
    whether XLA's convolution runs without YNNPACK (``cmjax.xla_cpu``; XLA_FLAGS is read once per process)."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{device.platform} | {device.device_kind} | jax {jax.__version__}"
    convs = "xla convs" if xla_cpu.FLAG in os.environ.get("XLA_FLAGS", "") else "ynnpack convs"
    return f"cpu | {cpu_model()} | jax {jax.__version__} | {convs}"


def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def read_cache(path: Path) -> dict:
    """{machine key: {shape key: {"choice": name, "seconds": {name: s}, ...}}}; {} if missing or unreadable."""
    try:
        data = json.loads(read_small(path))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()) else {}


def write_cache(path: Path, machine: str, shape_key: str, entry: dict) -> None:
    """Add one entry, merged with the file's current contents; temp file + rename, never a partial file."""
    data = read_cache(path)
    data.setdefault(machine, {})[shape_key] = entry
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs a re-measurement next time
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _entry_ok(entry, shape: ConvShape | None = None) -> bool:
    """A cached entry of this version whose choice can run ``shape`` and that timed (or skipped) every candidate."""
    if not (isinstance(entry, dict) and entry.get("version") == CACHE_VERSION and isinstance(entry.get("choice"), str)
            and isinstance(entry.get("seconds"), dict)):
        return False
    if shape is None:
        return True
    names = candidates(shape)
    return entry["choice"] in names and set(names) <= set(entry["seconds"]) | set(entry.get("skipped", ()))


# ------------------------------------------------------------------------------------------------
# The plan a run uses when it does not measure


def forced_plan() -> LoweringPlan | None:
    """The plan CMJAX_CONV_LOWERING forces (that lowering for every conv), None when it is unset."""
    name = os.environ.get(OVERRIDE_ENV)
    if not name:
        return None
    if name not in LOWERINGS:
        raise ValueError(f"{OVERRIDE_ENV}={name!r}: expected one of {', '.join(LOWERINGS)} (or unset)")
    return LoweringPlan(default=name)


def cached_plan(path: Path | None = None) -> LoweringPlan:
    """Every choice cached for this machine (XLA's convolution for the rest); XLA's everywhere off CPU."""
    if jax.devices()[0].platform != "cpu":
        return XLA
    entries = read_cache(path or cache_path()).get(machine_key(), {})
    choices = {key: e["choice"] for key, e in entries.items() if _entry_ok(e) and e["choice"] != DEFAULT}
    try:
        return LoweringPlan(choices)
    except ValueError:  # a tampered name: keep only the ones that are lowerings
        return LoweringPlan({k: v for k, v in choices.items() if _is_name(v)})


def _is_name(name: str) -> bool:
    return name in LOWERINGS or (name.startswith(f"{SUBPIXEL}+") and name.partition("+")[2] in LOWERINGS)


def default_plan(path: Path | None = None) -> tuple[LoweringPlan, str]:
    """(the plan a run uses without measuring, one line saying why); never measures.

    CMJAX_CONV_LOWERING if set; XLA's convolution with several processes (each could hold a
    different cache) or off CPU; else the plan cached for this CPU. ValueError on a bad override.
    """
    forced = forced_plan()
    if forced is not None:
        return forced, f"conv lowering: {forced.default} everywhere it can run ({OVERRIDE_ENV})"
    if jax.process_count() > 1:
        return XLA, f"conv lowering: XLA's convolution (a multi-host run; set {OVERRIDE_ENV} on every host for another)"
    if jax.devices()[0].platform != "cpu":
        return XLA, "conv lowering: XLA's convolution"
    plan = cached_plan(path)
    if plan.choices:
        return plan, f"conv lowering: the plan measured on this CPU ({len(plan.choices)} conv shapes not XLA's)"
    return plan, ("conv lowering: XLA's convolution (nothing measured on this CPU; --tune measures each conv's "
                  "lowerings once and keeps the fastest: see benchmarks/README.md for when it pays)")


# ------------------------------------------------------------------------------------------------
# Measuring


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


def candidate_bytes(shape: ConvShape, name: str) -> int:
    """An upper estimate of what measuring candidate ``name`` of ``shape`` allocates: the random input,
    the padded (or upsampled) input, the lowering's buffers (im2col's k*k copies, Winograd's 4x
    tiles), the output and the kernels; from the shape alone, before anything is allocated."""
    b, h, w, c, o, k = shape.batch, shape.height, shape.width, shape.in_channels, shape.out_channels, shape.kernel
    lowering = name.partition("+")[2] if name.startswith(f"{SUBPIXEL}+") else name
    if lowering != name:  # a 2x2 phase kernel with 4x the outputs, at the low resolution
        k, o = 2, 4 * o
    elif shape.upsample:
        h, w = 2 * h, 2 * w
    padded = b * (h + k) * (w + k) * c
    out = b * (h + 1) * (w + 1) * o
    copies, outs = {"xla": (1, 1), "im2col": (k * k, 1), "im2row": (k, 2), "winograd": (4, 4)}[lowering]
    elements = shape.batch * shape.height * shape.width * c + padded * (1 + copies) + out * (2 + outs) + 3 * k * k * c * o
    return elements * jnp.dtype(shape.dtype).itemsize


def conv_flops(shape: ConvShape) -> float:
    """Multiply-adds x 2 of one direct evaluation of ``shape`` (at the upsampled size for an upsampling conv)."""
    up = 4 if shape.upsample else 1
    return 2.0 * up * shape.batch * shape.height * shape.width * shape.kernel ** 2 * shape.in_channels * shape.out_channels


def measure(shape: ConvShape, names: Sequence[str] | None = None, timer: Callable[[], float] = time.perf_counter,
            repeats: int = REPEATS) -> dict[str, float]:
    """Seconds per network evaluation of each of ``names`` (default all ``candidates(shape)``) on random
    data: the conv on its prepared kernel (see ``time_calls``) plus the kernel's preparation /
    ``EVALS_PER_PREPARE``. Call it outside any trace (it runs and times compiled code)."""
    ways = {name: way for name, way in candidates(shape).items() if names is None or name in names}
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (shape.batch, shape.height, shape.width, shape.in_channels), shape.dtype)
    kernel = jax.random.normal(kk, (shape.kernel,) * 2 + (shape.in_channels, shape.out_channels), shape.dtype)
    prepares = {name: jax.jit(way.prepare) for name, way in ways.items() if way.form}
    prepared = {name: jax.block_until_ready(prepares[name](kernel)) if name in prepares else kernel
                for name in ways}  # compile + warm up
    runs = {name: jax.jit(way.run) for name, way in ways.items()}
    for name, run in runs.items():
        jax.block_until_ready(run(x, prepared[name]))  # compile + warm up
    seconds = time_calls({name: lambda name=name: jax.block_until_ready(runs[name](x, prepared[name]))
                          for name in runs}, timer, repeats)
    prepare_seconds = time_calls({name: lambda fn=fn: jax.block_until_ready(fn(kernel))
                                  for name, fn in prepares.items()}, timer, repeats=2)
    return {name: s + prepare_seconds.get(name, 0.0) / EVALS_PER_PREPARE for name, s in seconds.items()}


def pick(seconds: dict[str, float]) -> str:
    """The fastest lowering, but "xla" unless the fastest beats it by the margin."""
    fastest = min(seconds, key=seconds.get)
    if DEFAULT in seconds and seconds[fastest] >= MARGIN * seconds[DEFAULT]:
        return DEFAULT
    return fastest


def tune(shapes: Iterable[ConvShape], *, path: Path | None = None,
         measure_fn: Callable[[ConvShape, Sequence[str]], dict[str, float]] | None = None,
         max_bytes: int | None = None, max_flops: float = MAX_FLOPS, budget_s: float = BUDGET_S,
         report: Callable[[str], None] = lambda msg: None,
         clock: Callable[[], float] = time.perf_counter) -> LoweringPlan:
    """Measure the conv ``shapes`` not yet cached for this CPU, cache them, and return the plan:
    ``default_plan`` and what was just measured (also where the cache could not be written).

    Nothing is measured when CMJAX_CONV_LOWERING forces a lowering, with several processes, or
    off CPU. A shape whose XLA candidate would allocate more than ``max_bytes`` (default
    ``max_bytes_default()``) or cost more than ``max_flops`` keeps XLA's convolution, unmeasured and
    uncached; other candidates over ``max_bytes`` are skipped; a measurement that fails (out of
    memory after all) keeps XLA's convolution too. Measuring stops once ``budget_s`` is spent.
    ``report`` gets a line per measured or skipped shape. ``measure_fn(shape, names)``: default ``measure``.
    """
    measure_fn = measure if measure_fn is None else measure_fn
    plan, why = default_plan(path)
    if plan.default != DEFAULT or jax.process_count() > 1 or jax.devices()[0].platform != "cpu":
        report(f"{why}: nothing measured")
        return plan
    path, machine = path or cache_path(), machine_key()
    max_bytes = max_bytes_default() if max_bytes is None else max_bytes
    cached = read_cache(path).get(machine, {})
    todo = [s for s in dict.fromkeys(shapes) if s.kernel > 1 and not _entry_ok(cached.get(s.key()), s)]
    if todo:
        report(f"measuring the conv lowerings of {len(todo)} shape(s) on this CPU, once (cached in {path}; "
               f"at most {budget_s:.0f} s)")
    start, measured = clock(), {}
    for i, shape in enumerate(todo):
        if clock() - start > budget_s:
            report(f"  time budget spent: {len(todo) - i} shape(s) keep XLA's convolution until the next --tune")
            break
        names = [name for name in candidates(shape) if candidate_bytes(shape, name) <= max_bytes]
        if DEFAULT not in names or conv_flops(shape) > max_flops:
            report(f"  {shape.key()}: too large to measure ({candidate_bytes(shape, DEFAULT) / 2 ** 30:.1f} GiB, "
                   f"{conv_flops(shape) / 1e9:.0f} GFLOP): XLA's convolution")
            continue
        began = clock()
        try:
            seconds = measure_fn(shape, names)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory despite the estimate: keep XLA's, go on
            report(f"  {shape.key()}: could not be measured ({type(e).__name__}: {str(e)[:100]}): XLA's convolution")
            continue
        choice = measured[shape.key()] = pick(seconds)
        skipped = sorted(set(candidates(shape)) - set(seconds))
        write_cache(path, machine, shape.key(), {"choice": choice, "seconds": seconds, "version": CACHE_VERSION,
                                                 **({"skipped": skipped} if skipped else {})})
        report(f"  {i + 1}/{len(todo)} {shape.key()}: {choice} ({seconds[choice] / seconds[DEFAULT]:.2f}x XLA's "
               f"time; measured in {clock() - began:.1f} s)")
    # what was just measured counts even where the cache could not be written
    plan = default_plan(path)[0]
    return LoweringPlan({**dict(plan.choices), **{k: v for k, v in measured.items() if v != DEFAULT}})
