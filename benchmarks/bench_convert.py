"""Memory and time of converting a full-size OpenAI consistency decoder (621M params, 2.49 GB fp32).

    python benchmarks/bench_convert.py [--format torchscript|safetensors] [--workdir DIR] [--keep]

Builds an OpenAI-format checkpoint of the released architecture with random weights (a TorchScript
``decoder.pt`` written by torch.jit.save, like OpenAI's, or the extracted safetensors pair), then
converts it with ``python -m cmjax.convert`` in a fresh process and prints that process's peak
resident memory (ru_maxrss, also net of the memory in use before the conversion starts) against the
file size, and the wall time. Targets: peak < 2x the file size, < 60 s. Needs torch for the
TorchScript file only; the conversion itself never imports torch (checked).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Runs in the measured process: import, note the baseline high-water mark, convert, report.
CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import jax, numpy as np
from cmjax.weights.from_pytorch import convert
base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
convert(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"import_s": t1 - t0, "convert_s": t2 - t1, "base_kb": base_kb, "peak_kb": peak_kb,
                  "torch_imported": "torch" in sys.modules}))
"""


def build_torchscript(path: Path) -> None:
    import torch

    from tests.openai_peer import ConvUNetVAE

    torch.manual_seed(0)
    with torch.no_grad():
        model = ConvUNetVAE(channels=(320, 640, 1024, 1024), layers=3, timesteps=1024).eval()
    torch.jit.save(torch.jit.script(model), str(path))


def build_safetensors(folder: Path) -> None:
    """The extracted pair, written without torch: OpenAI names for every param of the model."""
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from cmjax.models.decoder_config import DecoderConfig, abstract_params
    from cmjax.weights.mapping import torch_key_for
    from cmjax.weights.openai import PAIR_EMBEDDING, PAIR_WEIGHTS, diffusers_to_openai_name

    rng = np.random.default_rng(0)
    state = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(DecoderConfig()))[0]:
        keys = tuple(k.key for k in path)
        shape = leaf.shape
        if keys[-1] == "kernel":  # torch layout
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        state[diffusers_to_openai_name(torch_key_for(keys))] = rng.standard_normal(shape, np.float32) * 0.02
    table = state.pop("embed_time.emb.weight")
    save_file(state, str(folder / PAIR_WEIGHTS))
    save_file({"weight": table}, str(folder / PAIR_EMBEDDING))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=("torchscript", "safetensors"), default="torchscript")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cmjax-bench-convert")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint and the output")
    args = parser.parse_args()

    work = args.workdir / args.format
    work.mkdir(parents=True, exist_ok=True)
    src = work / ("decoder.pt" if args.format == "torchscript" else "")
    marker = work / "complete"
    if not marker.exists():
        print(f"building a full-size {args.format} checkpoint in {work} ...", flush=True)
        t = time.perf_counter()
        # In a child process, so that the builder's memory does not linger in this one.
        builder = "build_torchscript" if args.format == "torchscript" else "build_safetensors"
        target = src if args.format == "torchscript" else work
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                        f"from benchmarks.bench_convert import {builder}; from pathlib import Path; "
                        f"{builder}(Path({str(target)!r}))"], check=True, cwd=REPO)
        marker.touch()
        print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
    files = [src] if src.is_file() else sorted(work.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)

    out = work / "converted"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode:
        print(res.stderr, file=sys.stderr)
        return 1
    m = json.loads(res.stdout.strip().splitlines()[-1])
    gb = 1e9
    peak, base = m["peak_kb"] * 1024, m["base_kb"] * 1024
    print(f"format            {args.format} ({', '.join(f.name for f in files)})")
    print(f"file size         {size / gb:.3f} GB")
    print(f"peak RSS          {peak / gb:.3f} GB = {peak / size:.2f}x file size "
          f"(before converting: {base / gb:.3f} GB; net {(peak - base) / gb:.3f} GB = {(peak - base) / size:.2f}x)")
    print(f"convert time      {m['convert_s']:.1f} s (imports {m['import_s']:.1f} s, process wall {wall:.1f} s)")
    print(f"torch imported    {m['torch_imported']}")
    print(f"targets           peak < 2x file: {'ok' if peak < 2 * size else 'MISSED'}; "
          f"< 60 s: {'ok' if m['convert_s'] < 60 else 'MISSED'}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
