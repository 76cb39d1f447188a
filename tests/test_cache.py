"""cmjax.cache: the cache root, the one file-name slug of its entries, and JAX's persistent
compilation cache under it."""
from __future__ import annotations

import jax
import pytest

from cmjax import cache


@pytest.fixture
def no_compile_cache(monkeypatch):
    """JAX's cache directory unset for the test (this session's is restored after it); nothing is
    compiled meanwhile, and JAX keeps using the cache it opened at the session's start."""
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    monkeypatch.delenv(cache.COMPILE_CACHE_ENV, raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def test_cache_dir_is_cmjax_cache_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / ".cache" / "cmjax"


def test_compile_cache_under_the_cmjax_cache(no_compile_cache, monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    assert cache.enable_compile_cache() == str(tmp_path / "xla")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == cache.MIN_COMPILE_SECONDS
    assert cache.enable_compile_cache() == str(tmp_path / "xla")  # a second call changes nothing


@pytest.mark.parametrize("value", ["0", "off", "false", "no"])
def test_compile_cache_off(no_compile_cache, monkeypatch, tmp_path, value):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(cache.COMPILE_CACHE_ENV, value)
    assert cache.enable_compile_cache() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_a_directory_chosen_for_jax_is_kept(no_compile_cache, monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "7")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 7.0)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert cache.enable_compile_cache() == str(tmp_path / "mine")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 7.0


def test_a_cache_that_cannot_be_made_is_skipped_with_one_warning(no_compile_cache, monkeypatch, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "file"))
    assert cache.enable_compile_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    err = capsys.readouterr().err
    assert err.startswith("warning: compiling without a cache: cannot make ") and err.count("\n") == 1, err


def test_slug_keeps_safe_characters_and_replaces_runs_of_others():
    assert cache.slug("tfds:mnist:train") == "tfds_mnist_train"  # FID statistics names
    assert cache.slug("openai/consistency-decoder", sep="--") == "openai--consistency-decoder"  # Hub checkpoints
    assert cache.slug("my images (v2)/") == "my_images_v2"
    assert cache.slug("a.b_c-d") == "a.b_c-d"


def test_slug_strips_cuts_and_falls_back():
    assert cache.slug("__x__") == "x" and cache.slug("--x--", sep="--") == "x"
    assert cache.slug("x" * 100, max_len=60) == "x" * 60
    assert cache.slug("", fallback="source") == "source" and cache.slug("///", sep="--", fallback="checkpoint") == "checkpoint"
