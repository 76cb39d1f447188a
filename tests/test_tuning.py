"""cmjax.tuning: measuring the conv lowerings (when asked, bounded), the cache, the plan a run uses."""
import dataclasses
import json
import types

import jax
import numpy as np
import pytest

from cmjax import tuning
from cmjax.batch_decode import program
from cmjax.batch_decode import run as batch_run
from cmjax.batch_decode.options import DecodeOptions
from cmjax.models.conv_lowering import LOWERINGS, XLA, ConvShape, LoweringPlan, candidates
from cmjax.models.decoder_config import DecoderConfig
from cmjax.models.decoder_unet import UNetConfig
from tests.random_decoder import random_decoder

SHAPE = ConvShape(2, 4, 6, 64, 32, 3, "float32")
TINY = DecoderConfig(unet=UNetConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8))


@pytest.fixture(autouse=True)
def no_override(monkeypatch, tmp_path):
    """The defaults a user gets: no forced lowering (conftest forces xla for the other tests), an empty cache."""
    monkeypatch.delenv(tuning.OVERRIDE_ENV, raising=False)
    monkeypatch.setenv("CMJAX_CACHE", str(tmp_path / "cache"))


def fake_measure(seconds):
    calls = []

    def measure_fn(shape, names):
        calls.append(shape)
        return {name: s for name, s in seconds.items() if name in names}
    return measure_fn, calls


def test_choice_is_measured_once_then_read_from_the_cache(tmp_path):
    path = tmp_path / "sub" / "conv_lowering.json"
    measure_fn, calls = fake_measure({"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 9.0})
    plan = tuning.tune([SHAPE], path=path, measure_fn=measure_fn)
    assert plan == LoweringPlan({SHAPE.key(): "im2col"}) and plan.name(SHAPE) == "im2col"
    assert tuning.tune([SHAPE, SHAPE], path=path, measure_fn=measure_fn) == plan
    assert calls == [SHAPE]
    stored = json.loads(path.read_text())[tuning.machine_key()][SHAPE.key()]
    assert stored == {"choice": "im2col", "seconds": {"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 9.0},
                      "version": tuning.CACHE_VERSION}
    # another shape is measured separately and merged into the same file; XLA's choices are not named
    other = dataclasses.replace(SHAPE, height=64, width=64)
    slow_im2col, calls2 = fake_measure({"xla": 1.0, "im2col": 2.0, "im2row": 3.0, "winograd": 9.0})
    assert tuning.tune([SHAPE, other], path=path, measure_fn=slow_im2col) == plan
    assert set(json.loads(path.read_text())[tuning.machine_key()]) == {SHAPE.key(), other.key()}
    assert calls2 == [other]
    assert [p.name for p in path.parent.iterdir()] == ["conv_lowering.json"]  # no temp files left
    assert tuning.default_plan(path)[0] == plan  # what a run reads without measuring


def test_default_plan_never_measures_and_is_xla_where_nothing_was_measured(tmp_path, monkeypatch):
    path = tmp_path / "conv_lowering.json"
    plan, why = tuning.default_plan(path)
    assert plan == XLA and "--tune" in why and not path.exists()
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: pytest.fail("default_plan measured"))
    path.write_text(json.dumps({tuning.machine_key(): {SHAPE.key(): {
        "choice": "winograd", "seconds": {}, "version": tuning.CACHE_VERSION}}}))
    assert tuning.default_plan(path)[0] == LoweringPlan({SHAPE.key(): "winograd"})


def test_an_unmeasured_backend_gets_xla_and_is_never_measured(tmp_path, monkeypatch):
    """A plan cached on this CPU is not used on a GPU/TPU, and tune measures nothing there."""
    path = tmp_path / "conv_lowering.json"
    cpu_key = tuning.machine_key()
    path.write_text(json.dumps({cpu_key: {SHAPE.key(): {"choice": "im2col", "seconds": {}, "version": 2}}}))
    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100")
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu])
    measure_fn, calls = fake_measure({"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 0.5})
    assert tuning.default_plan(path)[0] == XLA
    assert tuning.cached_plan(path) == XLA
    assert tuning.tune([SHAPE], path=path, measure_fn=measure_fn) == XLA
    assert calls == [] and list(json.loads(path.read_text())) == [cpu_key]


@pytest.mark.parametrize("old", [
    {"choice": "im2col", "seconds": {"xla": 3.0, "im2col": 1.0, "im2row": 2.0}, "version": tuning.CACHE_VERSION},
    {"choice": "im2col", "seconds": {"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 4.0}}])
def test_old_entries_are_measured_again(tmp_path, old):
    """An entry written before Winograd existed, or by an older version (Winograd then transformed
    its kernel in every call), is measured once more, with every candidate."""
    path = tmp_path / "conv_lowering.json"
    path.write_text(json.dumps({tuning.machine_key(): {SHAPE.key(): old}}))
    measure_fn, calls = fake_measure({"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 0.5})
    assert tuning.tune([SHAPE], path=path, measure_fn=measure_fn).name(SHAPE) == "winograd"
    assert tuning.tune([SHAPE], path=path, measure_fn=measure_fn).name(SHAPE) == "winograd"
    assert calls == [SHAPE]


def test_upsampling_convs_are_measured_with_their_subpixel_variants(tmp_path):
    path = tmp_path / "conv_lowering.json"
    up = dataclasses.replace(SHAPE, upsample=True)
    assert up.key() == SHAPE.key() + " up2"  # plain and upsampling convs of one input never share an entry
    ticks = iter(range(1000))
    seconds = tuning.measure(dataclasses.replace(up, in_channels=4, out_channels=4), timer=lambda: float(next(ticks)),
                             repeats=1)
    assert set(seconds) == set(LOWERINGS) | {"subpixel+xla", "subpixel+im2col", "subpixel+im2row"}
    measure_fn, _ = fake_measure({**{name: 2.0 for name in candidates(up)}, "subpixel+im2row": 1.0})
    assert tuning.tune([up], path=path, measure_fn=measure_fn).name(up) == "subpixel+im2row"
    assert json.loads(path.read_text())[tuning.machine_key()][up.key()]["choice"] == "subpixel+im2row"


def test_forced_lowering_and_multi_host_runs_never_measure(tmp_path, monkeypatch):
    """CMJAX_CONV_LOWERING forces one lowering; several hosts must trace one program: no per-host
    measurement or cache, XLA's convolution unless the override names one (the same on every host)."""
    path = tmp_path / "conv_lowering.json"
    measure_fn, calls = fake_measure({"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 9.0})
    monkeypatch.setenv(tuning.OVERRIDE_ENV, "im2row")
    assert tuning.tune([SHAPE], path=path, measure_fn=measure_fn) == LoweringPlan(default="im2row")
    monkeypatch.delenv(tuning.OVERRIDE_ENV)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert tuning.tune([SHAPE], path=path, measure_fn=measure_fn) == XLA
    assert calls == [] and not path.exists()
    monkeypatch.setenv(tuning.OVERRIDE_ENV, "im2col")
    assert tuning.default_plan(path)[0] == LoweringPlan(default="im2col")
    monkeypatch.setenv(tuning.OVERRIDE_ENV, "fastest")
    with pytest.raises(ValueError, match="CMJAX_CONV_LOWERING='fastest'"):
        tuning.default_plan(path)


def test_oversized_shapes_fall_back_without_allocating(tmp_path):
    """The conv shapes of a 4x4096x4096 latent are found by an abstract trace (nothing allocated);
    those whose measurement would need more than max_bytes or max_flops are never measured (XLA's
    convolution, not cached), the small ones are; a candidate alone over the limit is skipped."""
    path = tmp_path / "conv_lowering.json"
    huge = program.program_conv_shapes(TINY, (4096, 4096), DecodeOptions(timesteps=(1008, 512)))
    small = program.program_conv_shapes(TINY, (2, 3), DecodeOptions(timesteps=(1008, 512)))
    assert huge[0] == ConvShape(1, 32768, 32768, 7, 32, 3, "float32")
    assert tuning.candidate_bytes(huge[0], "xla") > 2 ** 36  # what measuring it would have allocated
    measure_fn, calls = fake_measure({name: 1.0 for name in candidates(dataclasses.replace(SHAPE, upsample=True))})
    lines = []
    plan = tuning.tune(small + huge, path=path, measure_fn=measure_fn, max_bytes=2 ** 30, report=lines.append)
    assert calls == list(small) and plan == XLA  # equal times: XLA's convolution kept everywhere
    assert set(json.loads(path.read_text())[tuning.machine_key()]) == {s.key() for s in small}
    assert sum("too large to measure" in line for line in lines) == len(huge)
    # a limit between the im2col buffer (k*k copies) and XLA's: measured without im2col, not again
    limit = (tuning.candidate_bytes(SHAPE, "xla") + tuning.candidate_bytes(SHAPE, "im2col")) // 2
    calls.clear()
    tuning.tune([SHAPE], path=path, measure_fn=measure_fn, max_bytes=limit)
    tuning.tune([SHAPE], path=path, measure_fn=measure_fn, max_bytes=limit)
    entry = json.loads(path.read_text())[tuning.machine_key()][SHAPE.key()]
    assert calls == [SHAPE] and entry["skipped"] == ["im2col"] and "im2col" not in entry["seconds"]


@pytest.mark.slow  # the full-size decoder's conv shapes at three sizes
def test_the_flop_bound_measures_every_conv_of_the_full_size_decoder_up_to_32x32_latents():
    """MAX_FLOPS bounds the measuring time of huge shapes; it must not leave the benchmark's cases
    (bench_decoder.py: 4x6 and 16x16 latents) or 256 px images with XLA's convolution: with 1e11 the
    two 640->640 convs at 128x128 px went unmeasured and a 16x16 decode was 6% slower."""
    for hw in (6, 16, 32):
        shapes = program.program_conv_shapes(DecoderConfig(), (hw, hw), DecodeOptions(timesteps=(1008, 512)))
        assert len(shapes) == 23 and max(tuning.conv_flops(s) for s in shapes) <= tuning.MAX_FLOPS, hw
    largest = program.program_conv_shapes(DecoderConfig(), (40, 40), DecodeOptions(timesteps=(1008, 512)))
    assert max(tuning.conv_flops(s) for s in largest) > tuning.MAX_FLOPS  # the bound does bound


def test_a_failing_measurement_keeps_xla_and_goes_on(tmp_path):
    path = tmp_path / "conv_lowering.json"
    other = dataclasses.replace(SHAPE, height=8)
    lines = []

    def measure_fn(shape, names):
        if shape == SHAPE:
            raise MemoryError("RESOURCE_EXHAUSTED")
        return {name: 0.5 if name == "im2row" else 1.0 for name in names}

    plan = tuning.tune([SHAPE, other], path=path, measure_fn=measure_fn, report=lines.append)
    assert (plan.name(SHAPE), plan.name(other)) == ("xla", "im2row")
    assert any("could not be measured (MemoryError" in line for line in lines)
    assert list(json.loads(path.read_text())[tuning.machine_key()]) == [other.key()]


def test_measuring_stops_when_the_time_budget_is_spent(tmp_path):
    path = tmp_path / "conv_lowering.json"
    shapes = [dataclasses.replace(SHAPE, height=h) for h in (4, 6, 8, 10)]
    clock = iter(range(0, 1000, 10))
    measure_fn, calls = fake_measure({"xla": 3.0, "im2col": 1.0, "im2row": 2.0, "winograd": 9.0})
    plan = tuning.tune(shapes, path=path, measure_fn=measure_fn, budget_s=45, clock=lambda: float(next(clock)))
    assert calls == shapes[:2] and [plan.name(s) for s in shapes] == ["im2col", "im2col", "xla", "xla"]


def test_xla_kept_unless_clearly_beaten():
    assert tuning.pick({"xla": 1.0, "im2col": 0.97, "im2row": 0.99}) == "xla"  # within the margin
    assert tuning.pick({"xla": 1.0, "im2col": 0.90, "im2row": 0.99}) == "im2col"
    assert tuning.pick({"xla": 1.0, "im2col": 0.90, "im2row": 0.50}) == "im2row"
    assert tuning.pick({"xla": 0.5, "im2col": 0.90, "im2row": 0.70}) == "xla"


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"m": 3}', b""])
def test_corrupt_cache_is_remeasured_and_rewritten(tmp_path, content):
    path = tmp_path / "conv_lowering.json"
    path.write_bytes(content)
    assert tuning.default_plan(path)[0] == XLA
    measure_fn, calls = fake_measure({"xla": 1.0, "im2col": 0.5, "im2row": 2.0, "winograd": 9.0})
    assert tuning.tune([SHAPE], path=path, measure_fn=measure_fn).name(SHAPE) == "im2col"
    assert calls == [SHAPE]
    assert json.loads(path.read_text())[tuning.machine_key()][SHAPE.key()]["choice"] == "im2col"


def test_a_tampered_choice_is_ignored(tmp_path):
    path = tmp_path / "conv_lowering.json"
    other = dataclasses.replace(SHAPE, height=8)
    entry = {"seconds": {}, "version": tuning.CACHE_VERSION}
    path.write_text(json.dumps({tuning.machine_key(): {SHAPE.key(): {**entry, "choice": "rm -rf"},
                                                       other.key(): {**entry, "choice": "im2row"}}}))
    assert tuning.default_plan(path)[0] == LoweringPlan({other.key(): "im2row"})


def test_unwritable_cache_still_chooses(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    measure_fn, calls = fake_measure({"xla": 1.0, "im2col": 0.5, "im2row": 2.0, "winograd": 9.0})
    plan = tuning.tune([SHAPE], path=blocker / "conv_lowering.json", measure_fn=measure_fn)
    assert calls == [SHAPE] and plan.name(SHAPE) == "im2col"  # not kept, but used by this run


def test_measure_times_every_lowering_with_the_given_timer():
    """Each timed call spans one tick: a lowering costs its conv plus its kernel preparation shared
    by EVALS_PER_PREPARE network evaluations (Winograd prepares; XLA's conv, im2col, im2row do not)."""
    ticks = iter(range(1000))
    seconds = tuning.measure(ConvShape(1, 3, 4, 4, 4, 3, "float32"), timer=lambda: float(next(ticks)), repeats=2)
    assert seconds == {"xla": 1.0, "im2col": 1.0, "im2row": 1.0, "winograd": 1.0 + 1.0 / tuning.EVALS_PER_PREPARE}


def test_timing_drops_a_call_that_cannot_win():
    spans = {"xla": 5.0, "im2col": 1.0, "im2row": 1.5}
    clock, counts = [0.0], {name: 0 for name in spans}

    def call(name):
        counts[name] += 1
        clock[0] += spans[name]

    calls = {name: lambda name=name: call(name) for name in spans}
    assert tuning.time_calls(calls, timer=lambda: clock[0], repeats=3) == spans
    assert counts == {"xla": 1, "im2col": 3, "im2row": 3}  # xla > PRUNE x the best after round one


def test_cpu_model_tells_generations_apart(tmp_path):
    """A VM's bare "AMD EPYC" gets family/model/stepping, so two generations never share a cached choice."""
    info = "processor\t: {}\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu {}\n\n"
    zen5, zen2 = tmp_path / "zen5", tmp_path / "zen2"
    zen5.write_text(info.format(0, 26, 2, "avx2 avx512f") + info.format(1, 26, 2, "avx2 avx512f"))
    zen2.write_text(info.format(0, 23, 49, "avx2"))
    assert tuning.cpu_model(str(zen5)) == "AMD EPYC (family 26, model 2, stepping 1) +avx512"
    assert tuning.cpu_model(str(zen2)) == "AMD EPYC (family 23, model 49, stepping 1)"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n\n")
    assert tuning.cpu_model(str(arm)).endswith("(CPU implementer 0x41, CPU part 0xd0c)")
    odd = tmp_path / "odd"
    odd.write_bytes(b"model name\t: Odd \xff CPU\n\n")
    assert tuning.cpu_model(str(odd)).startswith("Odd \ufffd CPU")
    assert tuning.cpu_model(str(tmp_path / "missing"))  # no /proc: platform's name, never an error


@pytest.mark.slow  # two compiles; the quick tier's default-settings hostile inputs: tests/test_decode_hostile.py
@pytest.mark.parametrize("tune", [False, True])
def test_a_huge_latent_beside_a_good_one(tmp_path, monkeypatch, tune):
    """Issue 24's folder (a good latent and a 4x4096x4096 one), default settings and --tune: the
    good one is decoded; the huge one is never measured (nor allocated) and fails with one line."""
    folder = tmp_path / "in"
    folder.mkdir()
    np.save(folder / "good.npy", np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32))
    np.lib.format.open_memmap(folder / "huge.npy", mode="w+", dtype=np.float16, shape=(4, 4096, 4096)).flush()
    measured = []
    monkeypatch.setattr(tuning, "measure", lambda shape, names: measured.append(shape) or {n: 1.0 for n in names})
    options = DecodeOptions(output=tmp_path / "out", timesteps=(1008,), progress=False, tune=tune,
                             lowering=tuning.default_plan()[0])
    messages = []
    summary = batch_run.run(random_decoder(), [str(folder)], options, log=messages.append)
    assert (summary.decoded, summary.failed) == (1, 1)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.png"]
    assert len(messages) == 1 and "huge.npy" in messages[0] and "\n" not in messages[0]
    assert bool(measured) == tune and all(s.height <= 16 for s in measured)  # the good one's shapes only
