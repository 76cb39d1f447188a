"""The run of a batch decode (decode.py's flags and main are cmjax.cli.decode): the plan, the
loop over batches, the summary.

    run: inputs.discover + scan -> drop clashes / outputs outside --output / finished items
         -> plan_batches -> per shape: program.compile_program ("compiling ... once per input
            shape"), refused when its memory estimate does not fit -> per batch: read this host's
            rows, run the program, write the previous batch's outputs while this one computes

Exit status: 0 when every input was decoded, 1 when any failed, 2 on a usage or checkpoint error
(then nothing is written).
"""
from __future__ import annotations

import dataclasses
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

from cmjax import data, parallel
from cmjax.decoding import schedule, tiling
from cmjax.decoding.batch import inputs, outputs, program
from cmjax.decoding.batch.inputs import Item
from cmjax.decoding.decoder import DecoderConfig
from cmjax.evaluation import metrics

COMPARE_LABELS = ("input", "SD GAN decoder", "consistency decoder")


# ------------------------------------------------------------------------------------------------
# Options and results


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """What decode.py's flags set. ``batch_size`` is global (all devices of all hosts)."""

    output: Path
    timesteps: tuple[int, ...] = schedule.DEFAULT_TIMESTEPS
    batch_size: int = 8
    seed: int = 0
    dtype: str = "fp32"
    clip_denoised: bool = True
    layout: str | None = None  # None: detect by the 4-channel axis; "nchw" / "nhwc" to force
    save_npy: bool = False
    skip_existing: bool = False
    tile: int | None = None  # latent tile size; None: untiled
    tile_overlap: int | None = None  # latents; None: tiling.default_overlap(tile)
    micro_batch: int = 1  # images each device decodes at once; outputs depend on it (and nothing else)
    images: bool = False  # inputs are images: encode with the SD VAE first
    compare: bool = False  # also write input | SD GAN decoder | consistency decoder
    progress: bool = True

    @property
    def overlap(self) -> int | None:
        if self.tile is None:
            return None
        return tiling.default_overlap(self.tile) if self.tile_overlap is None else self.tile_overlap

    def output_paths(self, item: Item) -> list[Path]:
        return outputs.output_paths(item, self.output, save_npy=self.save_npy, compare=self.compare)

    def program_args(self) -> dict[str, Any]:
        """The keyword arguments of program.make_decode_fn / make_images_fn."""
        return dict(seed=self.seed, timesteps=tuple(self.timesteps), clip_denoised=self.clip_denoised,
                    dtype=self.dtype, tile=self.tile, overlap=self.overlap, micro_batch=self.micro_batch)


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
    """Items whose output names are taken (by an earlier item, or by an input file) or fall outside
    --output become errors."""
    owner: dict[str, Item] = {}
    kept, errors = [], []
    for item in items:
        paths = options.output_paths(item)
        clash = next((owner[str(p)] for p in paths if str(p) in owner), None)
        if not all(outputs.is_inside(p, options.output) for p in paths):
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
    """One compiled program per input shape, compiled on first use; shapes whose memory estimate
    does not fit on a device are refused (the same answer on every host)."""

    def __init__(self, step: Callable, params: Any, mesh, options: DecodeOptions, latent_channels: int, say):
        self.step, self.params, self.mesh, self.options = step, params, mesh, options
        self.channels, self.say = latent_channels, say
        self.compiled: dict[tuple[int, int], Any] = {}
        self.refused: dict[tuple[int, int], str] = {}

    def get(self, shape: tuple[int, int], rows: int) -> tuple[Any, str | None]:
        """(compiled program or None, why it was refused or None)."""
        if shape in self.refused:
            return None, self.refused[shape]
        if shape not in self.compiled:
            h, w = shape
            what = f"{h}x{w} pixel images" if self.options.images else f"{h}x{w} latents"
            self.say(f"compiling the decoder for {what} (once per input shape)")
            per_row = (h, w, 3) if self.options.images else (h, w, self.channels)
            try:
                compiled = program.compile_program(self.step, self.params, (rows, *per_row), self.mesh)
                need, free = program.bytes_needed(compiled, self.params), program.bytes_free(self.mesh)
                too_big, why = need is not None and free is not None and need > free, None
            except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what exceeds HBM itself
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                compiled, too_big, why = None, True, str(e).strip().splitlines()[0][:300]
            if _host_sum([too_big])[0] > 0:  # every host takes the same branch
                hint = (f"a smaller --tile than {self.options.tile}" if self.options.tile is not None
                        else "--tile 64 (or smaller) to decode it in tiles")
                size = (f"needs about {_gib(need)} per device" if why is None
                        else f"does not fit in a device's memory ({why})")
                self.refused[shape] = (f"decoding {what} {size} (--micro-batch {self.options.micro_batch})"
                                       f"{f' and {_gib(free)} is free' if why is None else ''}; try {hint}")
                return None, self.refused[shape]
            self.compiled[shape] = compiled
        return self.compiled[shape], None


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2 ** 30:.1f} GiB"


def run(decoder, input_args: Sequence[str], options: DecodeOptions, *, mesh=None, vae=None,
        log: Callable[[str], None] | None = None) -> Summary:
    """Decode every input into ``options.output``; returns the Summary (counts over all hosts).

    ``decoder``: a cmjax Decoder (params anywhere; they are replicated over ``mesh``). ``vae``: the
    SD VAE, needed for ``options.images``. ``mesh``: default a 1-D mesh over all devices.
    """
    start = time.perf_counter()
    mesh = parallel.make_mesh() if mesh is None else mesh
    lead = jax.process_index() == 0
    local_fail = []

    def fail(msg: str) -> None:
        local_fail.append(msg)
        (log or (lambda m: tqdm.write(m, file=sys.stderr)))(f"error: {msg}")

    if options.images and vae is None:
        raise ValueError("--images needs the SD VAE (--vae)")
    config = decoder.config
    suffixes = inputs.IMAGE_SUFFIXES if options.images else inputs.LATENT_SUFFIXES
    sources, errors = inputs.discover(input_args, suffixes)
    items, scan_errors = [], list(errors)
    for src in sources:
        found, errs = (inputs.scan_image(src, config.upsample_factor) if options.images
                       else inputs.scan_latents(src, options.layout, config.latent_channels))
        items += found
        scan_errors += errs
    items, clash_errors = _drop_clashes(items, options, {os.path.realpath(s.path) for s in sources})
    scan_errors += clash_errors
    if lead:  # every host saw the same scan errors: report (and count) them once
        for msg in scan_errors:
            fail(msg)
    if options.skip_existing:
        done = np.array([all(p.exists() for p in options.output_paths(i)) for i in items], np.int32)
        done = _host_sum(done) > 0  # finished on any host (hosts may not share a filesystem)
        skipped = int(done.sum())
        items = [i for i, d in zip(items, done) if not d]
    else:
        skipped = 0
    outputs.remove_stale_temps(options.output)
    _check_same_plan(items)

    unit = mesh.size * options.micro_batch
    global_batch = -(-max(options.batch_size, 1) // unit) * unit
    rows = parallel.process_rows(mesh, global_batch)
    batches = plan_batches(items, global_batch, rows)
    params = _replicated(decoder.params, mesh)
    if options.images:
        params = {"decoder": params, "vae": _replicated(vae.params, mesh)}
        step = program.make_images_fn(decoder, vae, mesh, compare=options.compare, **options.program_args())
    else:
        step = program.make_decode_fn(config, mesh, **options.program_args())
    bar = tqdm(total=len(items), unit="img", disable=not (lead and options.progress), file=sys.stderr,
               dynamic_ncols=True)
    note = (lambda m: tqdm.write(m, file=sys.stderr)) if lead else (lambda m: None)
    programs = _Programs(step, params, mesh, options, config.latent_channels, note)
    reader = inputs.Reader()
    summary = Summary(skipped=skipped)
    decoded = 0
    pending = None
    for batch in batches:
        compiled, refused = programs.get(batch.shape, global_batch)
        bar.unpause()  # the rate and ETA leave out the compile
        if refused is not None:
            for item in batch.items:
                if item is not None:
                    fail(f"{item.name}: {refused}")
            bar.update(batch.count)
            continue
        arrays, ok = _read_batch(batch, reader, options, config, fail)
        key_data = np.stack([program.identity_key_data(i.identity_bytes) if i is not None
                             else np.zeros(2, np.uint32) for i in batch.items])
        out = compiled(params, parallel.global_batch(arrays, mesh), parallel.global_batch(key_data, mesh))
        if pending is not None:
            decoded += _finish(*pending, options, summary, fail)
            bar.update(pending[0].count)
        pending = (batch, ok, out)
    if pending is not None:
        decoded += _finish(*pending, options, summary, fail)
        bar.update(pending[0].count)
    bar.close()

    summary.programs = len(programs.compiled)
    n_decoded, n_failed = _host_sum([decoded, len(local_fail)])
    summary.decoded, summary.failed = int(n_decoded), int(n_failed)
    summary.failures = local_fail
    summary.seconds = time.perf_counter() - start
    return summary


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


def _finish(batch: _Batch, ok: list[bool], out: Any, options: DecodeOptions, summary: Summary,
            fail: Callable[[str], None]) -> int:
    """Fetch this host's rows of a finished batch and write them; returns how many were written."""
    if isinstance(out, tuple):  # --images: (consistency, gan, inputs)
        images, extra = parallel.local_rows(out[0]), [parallel.local_rows(o) for o in out[1:]]
    else:
        images, extra = parallel.local_rows(out), None
    written = 0
    for r, (item, good) in enumerate(zip(batch.items, ok)):
        if not good:
            continue
        try:
            paths = options.output_paths(item)
            if options.save_npy:
                outputs.write_npy(paths[1], images[r])
            if options.compare and extra is not None:
                _write_compare(item, paths[-1], extra[1][r], extra[0][r], images[r], summary)
            outputs.write_png(paths[0], data.to_uint8(images[r]))  # last: its presence marks the item finished
            written += 1
        except Exception as e:  # noqa: BLE001
            fail(f"{item.name}: cannot write output: {inputs.reason(e)}")
    return written


def _write_compare(item: Item, path: Path, original, gan, consistency, summary: Summary) -> None:
    """input | SD GAN decoder | consistency decoder, labelled, with PSNRs against the input below."""
    psnr_gan = metrics.mean_psnr(gan, original)  # clipped to [-1, 1], as the PNG is
    psnr_cd = metrics.mean_psnr(consistency, original)
    summary.psnr.setdefault("gan", []).append(psnr_gan)
    summary.psnr.setdefault("consistency", []).append(psnr_cd)
    tqdm.write(f"{item.name}: PSNR SD GAN decoder {psnr_gan:.2f} dB, consistency decoder {psnr_cd:.2f} dB")
    strip = data.image_grid([np.stack([original, gan, consistency])], column_labels=COMPARE_LABELS,
                            cell_labels=[["", f"PSNR {psnr_gan:.2f} dB", f"PSNR {psnr_cd:.2f} dB"]])
    outputs.write_png(path, strip)
