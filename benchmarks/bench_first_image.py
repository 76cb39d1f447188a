"""Time to the first image: ``decode.py`` as a whole process, from its start to its exit with the PNGs
written, against a ten-line diffusers script decoding the same latents from the same weights.

    python benchmarks/bench_first_image.py                     # 3 runs of each case, interleaved
    python benchmarks/bench_first_image.py breakdown           # where decode.py's time goes, in-process

Two 4x6 latents (32x48 px), the full-size decoder with random weights (a diffusers
ConsistencyDecoderVAE saved with ``save_pretrained``: decode.py reads that folder as a user would,
converting it on first use). Cases, interleaved run by run:

    new machine   decode.py with empty caches: a fresh $CMJAX_CACHE (so the checkpoint conversion,
                  the conv-lowering measurement and the compile cache all start empty)
    second run    decode.py again with the caches the first run of this case left (warmed once, untimed)
    diffusers     ConsistencyDecoderVAE.from_pretrained(folder) -> decode -> PNGs (DIFFUSERS_SCRIPT)

Each row gives the median wall time over ``--runs`` and the median peak RSS (the child's own
``ru_maxrss``, from ``os.wait4``), with the ratio to diffusers; the stderr lines of decode.py's
median run are printed with the second at which each arrived. ``breakdown`` times decode.py's phases in one process
(imports, checkpoint read, digest, trace, compile, kernel preparation, the decode, PNG writing)
with the caches of the previous breakdown in ``--work`` (``--cold``: empty them first).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LATENT_SHAPE = (4, 4, 6)  # NCHW without the batch: one 4x6 latent per file

# What a diffusers user writes: load the folder, decode, save PNGs (argv: folder, output, latent files).
DIFFUSERS_SCRIPT = """\
import os, sys, numpy as np, torch
from diffusers import ConsistencyDecoderVAE
from PIL import Image
folder, out, files = sys.argv[1], sys.argv[2], sys.argv[3:]
vae = ConsistencyDecoderVAE.from_pretrained(folder).eval()
z = torch.from_numpy(np.stack([np.load(f) for f in files]))
with torch.no_grad():
    images = vae.decode(z, generator=torch.Generator().manual_seed(0)).sample
pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
for f, x in zip(files, pixels):
    Image.fromarray(x).save(os.path.join(out, os.path.basename(f)[:-4] + ".png"))
"""


def prepare(work: Path) -> None:
    """The weights folder, the two latent files and the diffusers script under ``work`` (made once)."""
    import numpy as np

    weights = work / "weights"
    if not (weights / "config.json").is_file():
        import torch
        from diffusers import ConsistencyDecoderVAE

        torch.manual_seed(0)
        print(f"writing random full-size weights to {weights}", flush=True)
        ConsistencyDecoderVAE().save_pretrained(str(weights), safe_serialization=True)
    latents = work / "latents"
    latents.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.save(latents / f"{name}.npy", rng.normal(size=LATENT_SHAPE).astype(np.float32))
    (work / "diffusers_decode.py").write_text(DIFFUSERS_SCRIPT)


def run_process(cmd: list[str], env: dict[str, str]) -> tuple[float, int, list[tuple[float, str]], int]:
    """Run ``cmd``: (wall seconds, peak RSS bytes, [(second, stderr line)], exit status)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[tuple[float, str]] = []

    def read():
        for line in proc.stderr:
            lines.append((time.perf_counter() - start, line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    return wall, usage.ru_maxrss * 1024, lines, proc.returncode


def case_command(case: str, work: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CMJAX_", "JAX_COMPILATION"))}
    latents = [str(work / "latents" / f"{n}.npy") for n in ("a", "b")]
    if case == "diffusers":
        return [sys.executable, str(work / "diffusers_decode.py"), str(work / "weights"), str(out), *latents], env
    env["CMJAX_CACHE"] = str(work / ("cache-new" if case == "new machine" else "cache-warm"))
    return ([sys.executable, str(ROOT / "decode.py"), "--checkpoint", str(work / "weights"), "--output", str(out),
             "--no-progress", *latents], env)


def timed_runs(work: Path, runs: int) -> None:
    cases = ("new machine", "second run", "diffusers")
    results: dict[str, list[tuple[float, int, list]]] = {c: [] for c in cases}
    print("warming the second-run caches (untimed)", flush=True)
    shutil.rmtree(work / "cache-warm", ignore_errors=True)
    cmd, env = case_command("second run", work, work / "out")
    _, _, lines, rc = run_process(cmd, env)
    if rc != 0:
        sys.exit("decode.py failed:\n" + "\n".join(line for _, line in lines))
    for i in range(runs):
        for case in cases:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            shutil.rmtree(work / "cache-new", ignore_errors=True)
            cmd, env = case_command(case, work, out)
            wall, rss, lines, rc = run_process(cmd, env)
            pngs = sorted(p.name for p in out.glob("*.png"))
            if rc != 0 or pngs != ["a.png", "b.png"]:
                sys.exit(f"{case} failed (exit {rc}, PNGs {pngs}):\n" + "\n".join(line for _, line in lines))
            print(f"run {i + 1} {case:12s} {wall:7.1f} s  peak RSS {rss / 2 ** 30:.2f} GiB", flush=True)
            results[case].append((wall, rss, lines))
    shutil.rmtree(work / "cache-new", ignore_errors=True)
    base_wall = statistics.median(r[0] for r in results["diffusers"])
    base_rss = statistics.median(r[1] for r in results["diffusers"])
    print(f"\n{'case':12s} {'wall (median)':>14s} {'runs':>20s} {'peak RSS':>10s} {'x diffusers':>18s}")
    for case in cases:
        walls, rss = [r[0] for r in results[case]], statistics.median(r[1] for r in results[case])
        wall = statistics.median(walls)
        print(f"{case:12s} {wall:12.1f} s {' '.join(f'{w:.1f}' for w in walls):>20s} {rss / 2 ** 30:7.2f} GiB "
              f"   {wall / base_wall:.2f} time, {rss / base_rss:.2f} memory")
    for case in ("new machine", "second run"):
        median_run = sorted(results[case], key=lambda r: r[0])[len(results[case]) // 2]
        print(f"\ndecode.py's stderr, {case} (median run, {median_run[0]:.1f} s), second of arrival:")
        for t, line in median_run[2]:
            print(f"  {t:6.1f}  {line}")
    from bench_decoder import machine_line

    print(machine_line())


def breakdown(work: Path, cold: bool) -> None:
    """decode.py's path, phase by phase, in this process (its imports timed in a fresh one)."""
    cache = work / "cache-breakdown"  # warm after a --cold run
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    os.environ["CMJAX_CACHE"] = str(cache)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cmjax.cli.decode"], check=True, cwd=ROOT)
    print(f"imports (python -c 'import cmjax.cli.decode', a fresh process)  {time.perf_counter() - t:6.2f} s")
    phases = _phases(work)
    for name, seconds in phases:
        print(f"{name:88s} {seconds:6.2f} s")


def _phases(work: Path) -> list[tuple[str, float]]:
    """decode.py's steps (cmjax.cli.decode.main -> cmjax.batch_decode.run), one at a time."""
    import jax
    import numpy as np

    from cmjax import cache, images, parallel, tuning
    from cmjax.batch_decode import outputs, program
    from cmjax.batch_decode.options import DecodeOptions
    from cmjax.decoding.decoder import prepared_params
    from cmjax.weights import checkpoint, hub

    phases, clock = [], [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        phases.append((f"{name} [peak RSS {peak:.2f} GiB]", now - clock[0]))
        clock[0] = now

    cache.enable_compile_cache()
    mesh = parallel.make_mesh()
    lap("compile cache setup, mesh")
    path = hub.resolve_checkpoint(str(work / "weights"), report=print)
    lap("resolve the checkpoint (conversion on first use)")
    decoder = checkpoint.read_decoder(path, sharding=parallel.replicated(mesh), verify=False)
    jax.block_until_ready(decoder.params)
    lap("read the checkpoint (orbax restore)")
    checkpoint.params_digest(decoder.params)
    lap("params digest (SHA-256 of 2.5 GB)")
    lowering, why = tuning.default_plan()
    options = DecodeOptions(output=work / "out", lowering=lowering)  # decode.py's defaults: micro-batch 1
    params = jax.block_until_ready(prepared_params(decoder, (1, 4, 6, 4), np.float32, lowering))
    lap(f"kernels prepared for the plan, once per shape ({why})")
    step = program.make_decode_fn(decoder.config, mesh, options)
    rows = jax.ShapeDtypeStruct((2, 4, 6, 4), np.float32, sharding=parallel.data_sharding(mesh))
    keys = jax.ShapeDtypeStruct((2, 2), np.uint32, sharding=parallel.data_sharding(mesh))
    lowered = step.lower(params, rows, keys)
    lap("trace + lower the decode program")
    compiled = lowered.compile()
    lap("XLA compile (or compile-cache read)")
    latents = np.stack([np.load(work / "latents" / f"{n}.npy").transpose(1, 2, 0) for n in ("a", "b")])
    key_data = np.stack([program.identity_key_data(n) for n in ("a", "b")])
    args = (parallel.global_batch(latents, mesh), parallel.global_batch(key_data, mesh))
    out = jax.block_until_ready(compiled(params, *args))
    lap("first run: 2 images x 2 steps")
    out = jax.block_until_ready(compiled(params, *args))
    lap("second run of the same program (the first's extra: above minus this)")
    tmp = Path(tempfile.mkdtemp())
    for i, image in enumerate(parallel.local_rows(out)):
        outputs.write_png(tmp / f"{i}.png", images.to_uint8(image))
    shutil.rmtree(tmp)
    lap("write 2 PNGs")
    return phases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=("runs", "breakdown"), default="runs")
    p.add_argument("--runs", type=int, default=3, help="runs of each case (default 3)")
    p.add_argument("--work", help="folder for the weights, latents and caches (default: a temporary one, "
                                  "removed at the end); kept when given, so the weights are written once")
    p.add_argument("--cold", action="store_true", help="breakdown: with empty caches")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cmjax-first-image-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepare(work)
        if args.mode == "breakdown":
            breakdown(work, args.cold)
        else:
            timed_runs(work, args.runs)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
