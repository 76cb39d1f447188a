"""Test-wide settings, and the fixtures several test modules share.

Tiers (pytest.ini): ``python -m pytest`` runs the unit tests and the tiny-model parity tests, a few
minutes; the costlier tiers are marked and deselected there, and ``.ci/run`` runs them all:

    learning    training runs that must learn something (tens of seconds each)
    cli         subprocess runs of decode.py / train.py / python -m cmjax.* (several processes or devices)
    install     installs the package into a fresh virtual environment
    fid         runs the FID Inception network
    slow        the full-size models (minutes, several GB of memory), compile-heavy cases, and the
                further variants of cases the quick tier runs once (parity at more timesteps, ...)

    python -m pytest -m "learning or cli or install or fid or slow"    # the marked tiers

Convolutions use XLA's own lowering unless a test asks for another: a plan cached on the
developer's machine (``cmjax.tuning``, read by every decode) would make tests depend on it. The
tests of the plan itself (tests/test_tuning.py, test_decoder.py's default-settings tests) unset it.
Subprocesses started by tests inherit the setting (the decode.py tests set im2col for theirs:
see ``env`` below).

The tests run in parallel, one worker process per CPU (pytest-xdist, ``-n auto`` in pytest.ini;
``-n 0`` runs them in this process). One persistent JAX compilation cache serves the whole session,
every worker and every subprocess (through JAX_COMPILATION_CACHE_DIR): a program compiled once, by
any test, is loaded by the next that needs it. It lives in a temporary folder that the process
which made it (pytest's main process) removes when the session ends; $CMJAX_CACHE points into it
too (tests that look at the cache set their own).
"""
import os
import shutil
import tempfile
from pathlib import Path

os.environ["CMJAX_CONV_LOWERING"] = "xla"

import jax  # noqa: E402
import pytest  # noqa: E402

import cmjax  # noqa: E402
from tests.random_decoder import random_decoder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
_SHARED_CACHE = "CMJAX_TESTS_COMPILE_CACHE"  # set by the main process; xdist workers inherit it
_MADE_CACHE = not os.environ.get(_SHARED_CACHE)
if _MADE_CACHE:
    os.environ[_SHARED_CACHE] = tempfile.mkdtemp(prefix="cmjax-tests-jax-cache-")
COMPILE_CACHE = os.environ[_SHARED_CACHE]
# cmjax's own cache (checked checkpoints, ...) in the session's folder too, never the developer's ~/.cache
os.environ["CMJAX_CACHE"] = os.path.join(COMPILE_CACHE, "cmjax-cache")
MIN_COMPILE_SECONDS = "0.2"  # tiny models compile fast; most programs are still worth keeping
os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILE_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = MIN_COMPILE_SECONDS
jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(MIN_COMPILE_SECONDS))


def pytest_sessionfinish(session, exitstatus):
    if _MADE_CACHE:
        shutil.rmtree(COMPILE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A cmjax checkpoint of the tiny random decoder (tests.random_decoder, seed 0); read-only."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    cmjax.save_decoder(random_decoder(0), path)
    return path


@pytest.fixture(scope="session")
def env() -> dict:
    """The environment of decode.py subprocesses: this checkout first on the path, CPU only, the
    session's compilation cache (inherited), no XLA_FLAGS (callers set the device count).

    im2col: its matmul gives the same bits on 1 and 4 simulated devices; XLA's own CPU convolution
    does not at these tiny shapes (the last bit of some pixels differs), and these tests compare bits.
    """
    e = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", CMJAX_CONV_LOWERING="im2col")
    e.pop("XLA_FLAGS", None)
    return e

