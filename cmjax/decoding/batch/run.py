"""decode.py: its flags and their validation, the plan, the loop over batches, the summary.

    argv -> parse_args -> options_from_args (every check of the flags, here and only here)
         -> main: multi-host set-up, mesh, checkpoints (decoder, SD VAE), timesteps checked
                  against the model, --output checked writable -> run -> summary, exit status
    run: inputs.discover + scan -> drop clashes / outputs outside --output / finished items
         -> plan_batches -> per shape: program.compile_program ("compiling ... once per input
            shape"), refused when its memory estimate does not fit -> per batch: read this host's
            rows, run the program, write the previous batch's outputs while this one computes

Exit status: 0 when every input was decoded, 1 when any failed, 2 on a usage or checkpoint error
(then nothing is written).
"""
from __future__ import annotations

import argparse
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

from cmjax.weights import checkpoint
from cmjax import data, parallel
from cmjax.decoding import schedule, tiling
from cmjax.cli import HelpFormatter
from cmjax.weights.hub import fetch_hub_decoder, resolve_checkpoint
from cmjax.weights.sd_vae import load_pytorch_vae
from cmjax.decoding.decoder import DecoderConfig
from cmjax.decoding.batch import inputs, outputs, program
from cmjax.decoding.batch.inputs import Item

DESCRIPTION = """Decode SD latents (or images, via the SD VAE) into PNGs with the consistency decoder.

    decode.py --checkpoint openai --output out latents/            # .npy/.npz/.safetensors
    decode.py --checkpoint openai --images --output out examples/    # photos, via the SD encoder
    decode.py --checkpoint openai --images --compare --vae sd-vae/ --output out examples/

Runs on every local device (and every host of a multi-host run).
"""
DEFAULT_VAE = "openai/consistency-decoder"  # the Hub repo bundles the SD encoder (not the GAN decoder)
DEFAULT_STEPS = 2  # 1008, 512 for the released model
SEED_RANGE = (-2 ** 63, 2 ** 63)  # what jax.random.key takes
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
            compiled = program.compile_program(self.step, self.params, (rows, *per_row), self.mesh)
            need, free = program.bytes_needed(compiled, self.params), program.bytes_free(self.mesh)
            too_big = need is not None and free is not None and need > free
            if _host_sum([too_big])[0] > 0:  # every host takes the same branch
                hint = (f"a smaller --tile than {self.options.tile}" if self.options.tile is not None
                        else "--tile 64 (or smaller) to decode it in tiles")
                self.refused[shape] = (f"decoding {what} needs about {_gib(need)} per device "
                                       f"(--micro-batch {self.options.micro_batch}) and {_gib(free)} is free; "
                                       f"try {hint}")
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
    psnr_gan = tiling.psnr(np.clip(gan, -1, 1), original)
    psnr_cd = tiling.psnr(np.clip(consistency, -1, 1), original)
    summary.psnr.setdefault("gan", []).append(psnr_gan)
    summary.psnr.setdefault("consistency", []).append(psnr_cd)
    tqdm.write(f"{item.name}: PSNR SD GAN decoder {psnr_gan:.2f} dB, consistency decoder {psnr_cd:.2f} dB")
    strip = data.image_grid([np.stack([original, gan, consistency])], column_labels=COMPARE_LABELS,
                            cell_labels=[["", f"PSNR {psnr_gan:.2f} dB", f"PSNR {psnr_cd:.2f} dB"]])
    outputs.write_png(path, strip)


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _lead_first(fetch: Callable[[bool], Any]) -> Any:
    """``fetch(lead)`` on process 0 first, then on the others (which then find its download or
    conversion in the cache instead of racing it); the plain call on a single host."""
    lead = jax.process_index() == 0
    if jax.process_count() > 1:
        if lead:
            fetch(True)
        multihost_utils.sync_global_devices("cmjax checkpoint fetch")
    return fetch(lead)


def _report(lead: bool):
    return (lambda m: print(m, file=sys.stderr)) if lead else None


def load_decoder_checkpoint(name_or_path: str, mesh=None):
    """A cmjax Decoder from a checkpoint folder, a PyTorch checkpoint or a name ("openai"), via
    ``cmjax.weights.hub.resolve_checkpoint`` (download + conversion on first use)."""
    path = _lead_first(lambda lead: resolve_checkpoint(name_or_path, progress=lead, report=_report(lead)))
    return checkpoint.load_decoder(path, sharding=parallel.replicated(mesh) if mesh is not None else None)


def load_vae_checkpoint(name_or_path: str, mesh=None):
    """The SD VAE for --images: a cmjax VAE checkpoint folder; PyTorch weights converted in memory (a
    diffusers AutoencoderKL or ConsistencyDecoderVAE folder or file, an LDM checkpoint); or the Hub
    repo "openai/consistency-decoder", whose bundled SD encoder is fetched (encoder only: no --compare)."""
    if (Path(name_or_path) / checkpoint.CONFIG_FILE).is_file():
        return checkpoint.load_vae(name_or_path, sharding=parallel.replicated(mesh) if mesh is not None else None)
    if not Path(name_or_path).exists() and name_or_path == DEFAULT_VAE:
        name_or_path = _lead_first(lambda lead: fetch_hub_decoder(DEFAULT_VAE, progress=lead, report=_report(lead)))
    return load_pytorch_vae(name_or_path)


# ------------------------------------------------------------------------------------------------
# decode.py: flags, their validation, main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """decode.py's (and cmjax-decode's) command line. Every option's help states its default."""
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="latent files (.npy, .npz, .safetensors; 3-D or 4-D batches, NCHW or NHWC), folders "
                        "(searched recursively) or globs; with --images: image files "
                        f"({', '.join(inputs.IMAGE_SUFFIXES)}), folders or globs")
    p.add_argument("--checkpoint", required=True,
                   help="cmjax decoder checkpoint folder, a PyTorch checkpoint, or a name such as 'openai' (required)")
    p.add_argument("--output", required=True, help="folder for the PNGs, created if missing (required)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int,
                       help=f"number of sampling steps (default {DEFAULT_STEPS}: timesteps 1008,512 for the "
                            "released model)")
    steps.add_argument("--timesteps",
                       help="explicit timesteps on the model's distilled grid (16..1008 for the released "
                            "model), e.g. 1008,512 (default: from --steps)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="global batch, rounded up to a multiple of the devices (default 8)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="images each device decodes at once (default 1): more can be faster on small images; "
                        "pixels depend on this, never on --batch-size or the device/host count")
    p.add_argument("--seed", type=int, default=0, help="noise seed; same seed + same input = same image (default 0)")
    p.add_argument("--dtype", choices=sorted(program.DTYPES), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                   help="clamp to [-1, 1] after every step (OpenAI; --no-clip: diffusers) (default --clip)")
    p.add_argument("--layout", choices=["nchw", "nhwc"],
                   help="force the latent layout (default: detected by the 4-channel axis)")
    p.add_argument("--save-npy", action="store_true",
                   help="also write the float image (H, W, 3) in [-1, 1] as .npy (default off)")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip inputs whose outputs exist, to resume a run (default off)")
    p.add_argument("--tile", type=int,
                   help="decode in overlapping tiles of this many latents, for large images (default: untiled)")
    p.add_argument("--tile-overlap", type=int, help="tile overlap in latents (default tile // 4)")
    p.add_argument("--images", action="store_true",
                   help="inputs are images: encode with the SD VAE, then decode (default off: latents)")
    p.add_argument("--compare", action="store_true",
                   help="with --images: also write input | SD GAN decoder | consistency decoder, labelled, "
                        "and PSNRs (default off)")
    p.add_argument("--vae", help="SD VAE for --images: a cmjax VAE checkpoint or PyTorch weights (diffusers "
                   "AutoencoderKL folder, LDM checkpoint) (default: the SD encoder bundled with "
                   f"{DEFAULT_VAE} on the Hub; it has no GAN decoder, so --compare needs --vae)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr)")
    p.add_argument("--coordinator",
                   help="multi-host: coordinator address host:port (default: auto-detected in a cluster)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes (default: auto-detected)")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index (default: auto-detected)")
    return p.parse_args(argv)


def timesteps_from_args(args, num_train_timesteps: int = schedule.NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """--timesteps or --steps (default 2) as timesteps on the grid of a model with ``num_train_timesteps``."""
    if args.timesteps is not None:
        try:
            values = [int(t) for t in args.timesteps.split(",")] if args.timesteps.strip() else []
        except ValueError:
            raise ValueError(f"--timesteps must be comma-separated integers, got {args.timesteps!r}") from None
        if not values:
            raise ValueError("--timesteps is empty: give at least one timestep, e.g. 1008,512")
        return schedule.check_timesteps(values, num_train_timesteps)
    return schedule.timesteps_for_steps(DEFAULT_STEPS if args.steps is None else args.steps, num_train_timesteps)


def options_from_args(args, num_train_timesteps: int = schedule.NUM_TRAIN_TIMESTEPS) -> DecodeOptions:
    """DecodeOptions from decode.py's flags; raises ValueError on bad values or combinations."""
    timesteps = timesteps_from_args(args, num_train_timesteps)
    if not SEED_RANGE[0] <= args.seed < SEED_RANGE[1]:
        raise ValueError(f"--seed must lie in [-2**63, 2**63), got {args.seed}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    if args.tile is not None and args.tile < 1:
        raise ValueError(f"--tile must be >= 1, got {args.tile}")
    if args.tile_overlap is not None and (args.tile is None or not 0 <= args.tile_overlap < args.tile):
        raise ValueError("--tile-overlap needs --tile and must lie in [0, tile)")
    if args.compare and not args.images:
        raise ValueError("--compare needs --images")
    return DecodeOptions(output=Path(args.output), timesteps=tuple(timesteps), batch_size=args.batch_size,
                         seed=args.seed, micro_batch=args.micro_batch, dtype=args.dtype, clip_denoised=args.clip,
                         layout=args.layout, save_npy=args.save_npy, skip_existing=args.skip_existing,
                         tile=args.tile, tile_overlap=args.tile_overlap, images=args.images, compare=args.compare,
                         progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    """decode.py: set up (multi-host, mesh, checkpoints), run, print the summary. Returns the exit status:
    0 when every input was decoded, 1 when any failed, 2 on a usage or checkpoint error."""
    args = parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    mesh = parallel.make_mesh()
    lead = jax.process_index() == 0
    try:
        decoder = load_decoder_checkpoint(args.checkpoint, mesh)
        num_train_timesteps = decoder.config.unet.num_train_timesteps
        try:
            options = dataclasses.replace(options, timesteps=timesteps_from_args(args, num_train_timesteps))
        except ValueError as e:
            raise ValueError(f"{args.checkpoint}: {e} (this model has {num_train_timesteps} training "
                             "timesteps)") from None
        vae = None
        if options.images:
            if options.compare and not args.vae:
                raise ValueError("--compare needs --vae: an SD VAE with its GAN decoder (a cmjax VAE checkpoint, "
                                 "a diffusers AutoencoderKL folder or an LDM checkpoint)")
            vae = load_vae_checkpoint(args.vae or DEFAULT_VAE, mesh)
            if options.compare and "decoder" not in vae.parts:
                raise ValueError(f"--compare needs the SD GAN decoder, and {args.vae} holds only the encoder")
        problem = outputs.check_writable(options.output)
        if problem is not None:
            raise ValueError(f"--output {inputs.display(options.output)}: cannot write there: {problem}")
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if lead:
        print(f"{jax.device_count()} device(s) on {jax.process_count()} host(s); timesteps "
              f"{options.timesteps}; {options.dtype}", file=sys.stderr)
    summary = run(decoder, args.inputs, options, mesh=mesh, vae=vae)
    if lead:
        if summary.psnr:
            means = {k: float(np.mean(v)) for k, v in summary.psnr.items()}
            print(f"mean PSNR over this host's images: SD GAN decoder {means['gan']:.2f} dB, "
                  f"consistency decoder {means['consistency']:.2f} dB")
        print(summary.line())
    return 1 if summary.failed else 0
