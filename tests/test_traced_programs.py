"""decode.py's start-up: the params read in the background while the program is loaded or compiled,
and the traced program kept for the next run (cmjax.batch_decode.program.compile_program's ``key``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from cmjax import parallel
from cmjax.batch_decode import program
from cmjax.batch_decode import run as batch_run
from cmjax.batch_decode.options import DecodeOptions
from cmjax.weights import hub
from tests.random_decoder import random_decoder


@pytest.fixture
def traced(tmp_path, monkeypatch) -> tuple[Path, list]:
    """Traced programs kept in a folder of this test's own; every jax.export.export call counted."""
    folder = tmp_path / "traced"
    monkeypatch.setattr(program, "traced_path", lambda key: None if key is None else folder / f"{key}.jaxexport")
    exports, real = [], jax.export.export

    def counted(*args, **kwargs):
        exports.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.export, "export", counted)
    return folder, exports


def _decode(ckpt: Path, latents: Path, out: Path, **options) -> bytes:
    summary = batch_run.run(hub.start_loading_decoder(ckpt), [str(latents)], DecodeOptions(output=out, **options),
                            log=lambda m: None)
    assert summary.decoded == 2 and summary.failed == 0
    return b"".join((out / f"z_{i:03d}.png").read_bytes() for i in range(2))


def test_the_traced_program_is_kept_reused_and_gives_the_same_pixels(ckpt, traced, tmp_path, monkeypatch):
    folder, exports = traced
    np.save(tmp_path / "z.npy", np.random.default_rng(0).normal(size=(2, 4, 3, 5)).astype(np.float32))
    first = _decode(ckpt, tmp_path / "z.npy", tmp_path / "o1")
    kept = list(folder.glob("*.jaxexport"))
    assert len(kept) == 1 and len(exports) == 1
    assert _decode(ckpt, tmp_path / "z.npy", tmp_path / "o2") == first  # loaded, not traced again
    assert len(exports) == 1
    kept[0].write_bytes(b"not a program")  # a damaged file is traced and written again
    assert _decode(ckpt, tmp_path / "z.npy", tmp_path / "o4") == first and len(exports) == 2
    assert len(list(folder.glob("*.jaxexport"))) == 1 and kept[0].read_bytes() != b"not a program"
    monkeypatch.setattr(program, "traced_path", lambda key: None)  # no cache: jit(step) itself, same bits
    assert _decode(ckpt, tmp_path / "z.npy", tmp_path / "o5") == first and len(exports) == 2


def test_the_program_key_follows_what_reaches_the_program():
    mesh = parallel.make_mesh()
    config = random_decoder(0).config
    base = DecodeOptions(output=Path("a"))

    def key(options=base, rows=(1, 4, 3, 4), cfg=config):
        return program.program_key(cfg, options, rows, mesh)

    same = [DecodeOptions(output=Path("b")), DecodeOptions(output=Path("a"), batch_size=64, save_npy=True,
                                                           skip_existing=True, progress=False, layout="nhwc")]
    assert all(key(o) == key() for o in same)
    other = [DecodeOptions(output=Path("a"), seed=1), DecodeOptions(output=Path("a"), timesteps=(1008,)),
             DecodeOptions(output=Path("a"), micro_batch=2), DecodeOptions(output=Path("a"), dtype="bf16"),
             DecodeOptions(output=Path("a"), clip_denoised=False), DecodeOptions(output=Path("a"), tile=2)]
    keys = {key(o) for o in other} | {key(rows=(1, 4, 4, 4)), key(cfg=dataclasses.replace(config, sigma_data=0.6)), key()}
    assert len(keys) == len(other) + 3

