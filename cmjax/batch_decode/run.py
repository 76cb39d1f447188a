"""The run of a batch decode (decode.py's flags and main are cmjax.cli.decode): the plan, the
loop over batches, the summary.

    run: inputs.discover + scan -> drop clashes / names too long / outputs outside --output / finished items
         -> plan_batches -> per shape: program.compile_program ("compiling ... once per input
            shape"); a shape whose memory estimate does not fit a device is decoded in tiles of 64
            latents (when --tile was not given), else refused -> per batch: read this host's
            rows, run the program, write the previous batch's outputs (outputs.write_batch) while
            this one computes

Exit status: 0 when every input was decoded, 1 when any failed, 2 on a usage or checkpoint error
(then nothing is written).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from cmjax import parallel, tuning
from cmjax.batch_decode import inputs, outputs, program
from cmjax.batch_decode.inputs import Item
from cmjax.batch_decode.options import DecodeOptions
from cmjax.decoding.decoder import prepared_params
from cmjax.files import printable
from cmjax.models.decoder_config import Decoder, DecoderConfig
from cmjax.models.layers import compute_dtype
from cmjax.weights.checkpoint import Loading

# ------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class Summary:
    """Counts over all hosts (``failures`` are this host's messages)."""

    decoded: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    programs: int = 0  # distinct compiled decode programs (one per input shape)
    failures: list[str] = dataclasses.field(default_factory=list)
    psnr: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # --compare, this host's

    @property
    def images_per_second(self) -> float:
        return self.decoded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"decoded {self.decoded} images ({self.skipped} skipped, {self.failed} failed) in "
                f"{self.seconds:.1f} s: {self.images_per_second:.2f} images/s, {self.programs} compiled "
                f"program{'s' if self.programs != 1 else ''}")


# ------------------------------------------------------------------------------------------------
# Planning and multi-host


@dataclasses.dataclass
class _Batch:
    items: list[Item | None]  # this host's rows (None: padding)
    shape: tuple[int, int]
    count: int  # real items in the whole global batch


def plan_batches(items: Sequence[Item], global_batch: int, rows: np.ndarray) -> list[_Batch]:
    """Group by shape, cut each group into global batches (the last padded); keep this host's ``rows``."""
    groups: dict[tuple[int, int], list[Item]] = {}
    for item in items:
        groups.setdefault(item.shape, []).append(item)
    batches = []
    for shape in sorted(groups):
        group = groups[shape]
        for start in range(0, len(group), global_batch):
            chunk = group[start:start + global_batch]
            chunk = chunk + [None] * (global_batch - len(chunk))
            batches.append(_Batch([chunk[r] for r in rows], shape, len(group[start:start + global_batch])))
    return batches


def _host_sum(values: Sequence[int]) -> np.ndarray:
    """Sum small per-host integer vectors over all processes."""
    values = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), -1).sum(0)


def _check_same_plan(items: Sequence[Item]) -> None:
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(b"\n".join(i.identity_bytes + f"|{i.shape}".encode() for i in items)).digest()[:8]
    all_digests = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.uint32)))
    if not (all_digests == all_digests.reshape(jax.process_count(), -1)[0]).all():
        raise RuntimeError("the hosts see different inputs: every host must see the same files")


def _replicated(tree: Any, mesh) -> Any:
    """Params replicated over ``mesh``; no copy when they already are (e.g. loaded that way)."""
    target = parallel.replicated(mesh)
    leaves = jax.tree.leaves(tree)
    if all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim) for x in leaves):
        return tree
    return parallel.put_replicated(tree, mesh)


def _drop_clashes(items: list[Item], options: DecodeOptions, input_paths: set[str]) -> tuple[list[Item], list[str]]:
    """Items whose output names are too long for the file system, are taken (by an earlier item, or
    by an input file) or fall outside --output become errors, before anything is decoded."""
    owner: dict[str, Item] = {}
    kept, errors = [], []
    limits = outputs.name_limits(options.output)
    for item in items:
        paths = options.output_paths(item)
        clash = next((owner[str(p)] for p in paths if str(p) in owner), None)
        too_long = next((why for p in paths if (why := outputs.name_problem(p, options.output, limits))), None)
        if too_long is not None:
            errors.append(f"{item.name}: {too_long}; rename the input (or choose a shorter --output)")
        elif not all(outputs.is_inside(p, options.output) for p in paths):
            errors.append(f"{item.name}: its output {inputs.display(paths[0])} would lie outside --output "
                          f"{inputs.display(options.output)} (a '..' in the pattern?); name the file directly")
        elif clash is not None:
            errors.append(f"{item.name}: output {inputs.display(paths[0])} is also the output of {clash.name}; "
                          "rename one")
        elif any(os.path.realpath(p) in input_paths for p in paths):
            errors.append(f"{item.name}: output {inputs.display(paths[0])} would overwrite an input; "
                          "choose another --output")
        else:
            owner.update({str(p): item for p in paths})
            kept.append(item)
    return kept, errors


# ------------------------------------------------------------------------------------------------
# The run


class _Programs:
    """One compiled program per input shape, compiled on first use; a shape whose memory estimate
    does not fit on a device is handed to ``tiled(shape)``'s programs (tiled ones; when it gives
    any) or refused (the same answer on every host). ``params()`` gives the params (waiting for
    them while they are still being read: programs compile from ``abstract()``, their shapes and
    shardings, meanwhile); ``prepare(shape)``, when given, the params a shape's
    program runs with (the decoder's with its conv kernels prepared for that shape, made once per
    run rather than in every call; those programs compile from the prepared params). ``key(shape,
    rows)``: the program's ``program.program_key``, to keep its trace for the next run (None: not)."""

    def __init__(self, step: Callable, params: Callable[[], Any], abstract: Callable[[], Any], mesh,
                 options: DecodeOptions, latent_channels: int, say,
                 prepare: Callable[[tuple[int, int]], Any] | None = None,
                 key: Callable[[tuple[int, int], int], str | None] = lambda shape, rows: None,
                 tiled: Callable[[tuple[int, int]], _Programs | None] = lambda shape: None):
        self.step, self.params, self.abstract, self.mesh, self.options = step, params, abstract, mesh, options
        self.key, self.tiled = key, tiled
        self.delegated: dict[tuple[int, int], _Programs] = {}  # shapes decoded in tiles instead
        self.channels, self.say, self.prepare = latent_channels, say, prepare
        self.compiled: dict[tuple[int, int], Any] = {}
        self.refused: dict[tuple[int, int], str] = {}
        self.shape_params: tuple[tuple[int, int], Any] | None = None  # the last shape's, one at a time

    def _params_for(self, shape: tuple[int, int]) -> Any:
        if self.shape_params is None or self.shape_params[0] != shape:
            self.shape_params = (shape, self.params() if self.prepare is None else self.prepare(shape))
        return self.shape_params[1]

    def get(self, shape: tuple[int, int], rows: int) -> tuple[Any, Any, str | None]:
        """(compiled program or None, the params to call it with, why it was refused or None)."""
        if shape in self.refused:
            return None, None, self.refused[shape]
        if shape in self.delegated:
            return self.delegated[shape].get(shape, rows)
        h, w = shape
        what = f"{h}x{w} pixel images" if self.options.images else f"{h}x{w} latents"
        if shape in self.compiled:
            return self.compiled[shape], self._params_for(shape), None
        self.say(f"compiling the decoder for {what} (once per input shape)")
        start = time.perf_counter()
        per_row = (h, w, 3) if self.options.images else (h, w, self.channels)
        try:
            if self.prepare is None:  # the params' shapes, needed only when the program is traced
                args, key = self.abstract, self.key(shape, rows)
            else:
                args, key = self._params_for(shape), None
            compiled, loaded = program.compile_program(self.step, args, (rows, *per_row), self.mesh, key)
            self.say(f"  {'loaded from the compile cache' if loaded else 'compiled'} in "
                     f"{time.perf_counter() - start:.1f} s{_kept_for_next_time(loaded)}")
            params = self._params_for(shape)  # resident before the free memory is read
            need, free = program.bytes_needed(compiled, params), program.bytes_free(self.mesh)
            too_big, why = need is not None and free is not None and need > free, None
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what exceeds HBM itself
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, too_big, why, need, free = None, True, str(e).strip().splitlines()[0][:300], None, None
        if _host_sum([too_big])[0] > 0:  # every host takes the same branch
            size = (f"needs about {_gib(need)} per device and {_gib(free)} is free" if why is None
                    else f"does not fit in a device's memory ({why})")
            fallback = self.tiled(shape)
            if fallback is not None:
                tile = fallback.options.tile
                self.say(f"  untiled, {what} {size}: decoding them in tiles of {tile} latents instead "
                         f"(as --tile {tile}; pass --tile to choose)")
                self.delegated[shape] = fallback
                self.shape_params = None  # this shape's prepared kernels: not what the tiles run with
                return fallback.get(shape, rows)
            hint = (f"a smaller --tile than {self.options.tile}" if self.options.tile is not None
                    else "--tile with a tile smaller than the image, to decode it in tiles")
            self.refused[shape] = f"decoding {what} {size} (--micro-batch {self.options.micro_batch}); try {hint}"
            return None, None, self.refused[shape]
        self.compiled[shape] = compiled
        return compiled, self._params_for(shape), None

    def count(self) -> int:
        """Programs compiled, in tiles or not."""
        others = {id(p): p for p in self.delegated.values()}.values()
        return len(self.compiled) + sum(p.count() for p in others)


def _kept_for_next_time(loaded: bool) -> str:
    where = jax.config.jax_compilation_cache_dir
    if loaded or not where:
        return ""
    return f" (kept in the compile cache {inputs.display(Path(where))} for the next run)"


def _kernel_preparer(decoder: Callable[[], Decoder], options: DecodeOptions, mesh
                     ) -> Callable[[tuple[int, int]], Any] | None:
    """shape -> the decoder's params with its conv kernels prepared for one micro-batch of that shape
    (``decoding.decoder.prepared_params`` for ``options.lowering``: Winograd's and the subpixel
    kernels, made once per run and shape instead of in every program call), replicated over
    ``mesh``. A tiled decode (its convs see tile shapes) prepares inside the program, as before;
    None when the plan prepares nothing, and for --images (params of two models)."""
    if options.images or not options.lowering.prepares:
        return None
    dtype = compute_dtype(options.dtype)

    def prepare(shape: tuple[int, int]) -> Any:
        if options.tile is not None and options.tile < max(shape):
            return _replicated(decoder().params, mesh)
        latents = (options.micro_batch, *shape, decoder().config.latent_channels)
        return _replicated(prepared_params(decoder(), latents, dtype, options.lowering), mesh)

    return prepare


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2 ** 30:.1f} GiB"


def run(decoder: Decoder | Loading, input_args: Sequence[str], options: DecodeOptions, *, mesh=None, vae=None,
        log: Callable[[str], None] | None = None) -> Summary:
    """Decode every input into ``options.output``; returns the Summary (counts over all hosts).

    ``decoder``: a cmjax Decoder (params anywhere; they are replicated over ``mesh``), or a
    checkpoint being read (``weights.checkpoint.Loading``, from ``hub.start_loading_decoder``): the
    programs compile while its params are read, and its digest check passes before the first
    output is written (else its CheckpointError is raised, and nothing is written). ``vae``: the
    SD VAE, needed for ``options.images``. ``mesh``: default a 1-D mesh over all devices.
    """
    start = time.perf_counter()
    loading = decoder if isinstance(decoder, Loading) else Loading.done(decoder)
    config = loading.config
    mesh = parallel.make_mesh() if mesh is None else mesh
    if options.images and vae is None:
        raise ValueError("--images needs the SD VAE (--vae)")
    if options.output is None:
        raise ValueError("--output is needed: the folder to write to")
    lead = jax.process_index() == 0
    local_fail = []

    def fail(msg: str) -> None:
        local_fail.append(msg)
        (log or (lambda m: tqdm.write(m, file=sys.stderr)))(f"error: {printable(msg)}")

    items, scan_errors = _find_items(input_args, options, config)
    if lead:  # every host saw the same scan errors: report (and count) them once
        for msg in scan_errors:
            fail(msg)
    items, skipped = _drop_finished(items, options)
    outputs.remove_stale_temps(options.output)
    _check_same_plan(items)

    # --batch-size, but no more rows than the largest group of same-shape inputs needs: padding rows
    # cost a whole decode each (2 inputs in a batch of 8 took 4x the time). Pixels depend on
    # --micro-batch alone, so the cap changes none.
    unit = mesh.size * options.micro_batch
    largest = max(collections.Counter(item.shape for item in items).values(), default=1)
    global_batch = -(-min(max(options.batch_size, 1), largest) // unit) * unit
    batches = plan_batches(items, global_batch, parallel.process_rows(mesh, global_batch))
    if options.tune:
        options = _tuned(options, batches, config, lead)
    params, abstract, step = _program(loading, vae, mesh, options)
    note = (lambda m: tqdm.write(m, file=sys.stderr)) if lead else (lambda m: None)
    programs = _Programs(step, params, abstract, mesh, options, config.latent_channels, note,
                         _kernel_preparer(loading.decoder, options, mesh), _program_key(config, options, mesh),
                         _tiled_programs(loading, vae, mesh, options, params, abstract, note))
    summary = Summary(skipped=skipped)
    bar = tqdm(total=len(items), unit="img", disable=not (lead and options.progress), file=sys.stderr,
               dynamic_ncols=True)
    decoded = _decode_batches(batches, programs, global_batch, config, summary, bar, fail, loading.check)
    bar.close()
    loading.decoder().release_prepared()

    summary.programs = programs.count()
    n_decoded, n_failed = _host_sum([decoded, len(local_fail)])
    summary.decoded, summary.failed = int(n_decoded), int(n_failed)
    summary.failures = local_fail
    summary.seconds = time.perf_counter() - start
    return summary


def _find_items(input_args: Sequence[str], options: DecodeOptions, config: DecoderConfig
                ) -> tuple[list[Item], list[str]]:
    """Every item of the inputs but those whose outputs clash, and the error messages."""
    suffixes = inputs.IMAGE_SUFFIXES if options.images else inputs.LATENT_SUFFIXES
    sources, errors = inputs.discover(input_args, suffixes)
    items, errors = [], list(errors)
    for src in sources:
        found, errs = (inputs.scan_image(src, config.upsample_factor) if options.images
                       else inputs.scan_latents(src, options.layout, config.latent_channels))
        items += found
        errors += errs
    items, clash_errors = _drop_clashes(items, options, {os.path.realpath(s.path) for s in sources})
    return items, errors + clash_errors


def _drop_finished(items: list[Item], options: DecodeOptions) -> tuple[list[Item], int]:
    """With --skip-existing: the items not finished on any host (hosts may not share a filesystem),
    and how many were."""
    if not options.skip_existing:
        return items, 0
    done = np.array([all(p.exists() for p in options.output_paths(i)) for i in items], np.int32)
    done = _host_sum(done) > 0
    return [i for i, d in zip(items, done) if not d], int(done.sum())


def _tuned(options: DecodeOptions, batches: Sequence[_Batch], config: DecoderConfig, lead: bool) -> DecodeOptions:
    """--tune: ``options`` with the lowering plan measured for this run's conv shapes (cmjax.tuning)."""
    f = config.upsample_factor if options.images else 1  # the latent sizes of the shapes (pixels / f with --images)
    shapes = [s for h, w in sorted({b.shape for b in batches})
              for s in program.program_conv_shapes(config, (h // f, w // f), options)]
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if lead else (lambda m: None)
    return dataclasses.replace(options, lowering=tuning.tune(shapes, report=say))


def _program(loading: Loading, vae, mesh, options: DecodeOptions
             ) -> tuple[Callable[[], Any], Callable[[], Any], Callable]:
    """(the params replicated over ``mesh``; their shapes and shardings (both made on first call); the
    jitted step): latents -> images, or with --images images -> (consistency, gan, images)."""
    if not options.images:
        abstract = functools.cache(lambda: parallel.shapes_with(loading.abstract(), parallel.replicated(mesh)))
        params = functools.cache(lambda: _replicated(loading.decoder().params, mesh))
        return params, abstract, _step(loading, vae, mesh, options)
    both = {"decoder": _replicated(loading.decoder().params, mesh), "vae": _replicated(vae.params, mesh)}
    return lambda: both, lambda: both, _step(loading, vae, mesh, options)


def _step(loading: Loading, vae, mesh, options: DecodeOptions) -> Callable:
    """The jitted step of ``_program`` (a new one for other options, over the same params)."""
    if options.images:
        return program.make_images_fn(loading.decoder(), vae, mesh, options)
    return program.make_decode_fn(loading.config, mesh, options)


AUTO_TILE = 64  # latents (512 pixels): the tile of a shape that does not fit a device untiled


def _tiled_programs(loading: Loading, vae, mesh, options: DecodeOptions, params: Callable[[], Any],
                    abstract: Callable[[], Any], note: Callable[[str], None]
                    ) -> Callable[[tuple[int, int]], _Programs | None]:
    """shape -> the programs that decode it in tiles of AUTO_TILE latents (the same params, made on
    first use), for a shape larger than one tile when --tile was not given; else None. A tiled
    decode's pixels differ from an untiled one's where the tiles overlap (cmjax.decoding.tiling)."""
    if options.tile is not None:
        return lambda shape: None
    tiled_options = dataclasses.replace(options, tile=AUTO_TILE, tile_overlap=None)
    factor = loading.config.upsample_factor if options.images else 1
    make = functools.cache(lambda: _Programs(
        _step(loading, vae, mesh, tiled_options), params, abstract, mesh, tiled_options,
        loading.config.latent_channels, note, None, _program_key(loading.config, tiled_options, mesh)))
    return lambda shape: make() if max(shape) // factor > AUTO_TILE else None


def _program_key(config: DecoderConfig, options: DecodeOptions, mesh) -> Callable[[tuple[int, int], int], str | None]:
    """(shape, rows) -> the key its traced program is kept under (``program.program_key``); None for --images."""
    def key(shape: tuple[int, int], rows: int) -> str | None:
        if options.images:
            return None
        return program.program_key(config, options, (rows, *shape, config.latent_channels), mesh)

    return key


def _decode_batches(batches: Sequence[_Batch], programs: _Programs, global_batch: int, config: DecoderConfig,
                    summary: Summary, bar: tqdm, fail: Callable[[str], None], check: Callable[[], None]) -> int:
    """Each batch through its shape's program, writing the previous batch's outputs while this one
    computes; ``check()`` (the params' digest) before the first write. Returns how many items this
    host wrote."""
    reader, pending, decoded = inputs.Reader(), None, 0

    def write(batch: _Batch, ok: list[bool], out: Any) -> int:
        check()
        written = outputs.write_batch(batch.items, ok, out, programs.options, summary.psnr, fail)
        bar.update(batch.count)
        return written

    for batch in batches:
        compiled, params, refused = programs.get(batch.shape, global_batch)
        bar.unpause()  # the rate and ETA leave out the compile
        if refused is not None:
            for item in batch.items:
                if item is not None:
                    fail(f"{item.name}: {refused}")
            bar.update(batch.count)
            continue
        arrays, ok = _read_batch(batch, reader, programs.options, config, fail)
        key_data = np.stack([program.identity_key_data(i.identity_bytes) if i is not None
                             else np.zeros(2, np.uint32) for i in batch.items])
        mesh = programs.mesh
        try:
            out = compiled(params, parallel.global_batch(arrays, mesh), parallel.global_batch(key_data, mesh))
        except (TypeError, ValueError):  # params the program does not take: the checkpoint's own error first
            check()
            raise
        if pending is not None:
            decoded += write(*pending)
        pending = (batch, ok, out)
    if pending is not None:
        decoded += write(*pending)
    return decoded


def _read_batch(batch: _Batch, reader: inputs.Reader, options: DecodeOptions, config: DecoderConfig,
                fail: Callable[[str], None]) -> tuple[np.ndarray, list[bool]]:
    """This host's rows as one array (zeros for padding and unreadable rows) and which rows are good."""
    h, w = batch.shape
    shape = (h, w, 3) if options.images else (h, w, config.latent_channels)
    arrays = np.zeros((len(batch.items), *shape), np.float32)
    ok = []
    for r, item in enumerate(batch.items):
        if item is None:
            ok.append(False)
            continue
        try:
            arrays[r] = reader.image(item) if options.images else reader.latent(item)
            ok.append(True)
        except Exception as e:  # noqa: BLE001 - one bad input must not stop the others
            fail(f"{item.name}: {inputs.reason(e)}")
            ok.append(False)
    return arrays, ok
