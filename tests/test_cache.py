"""cmjax.cache.slug: the one file-name slug of cache entries (FID statistics, converted checkpoints)."""
from cmjax.cache import slug


def test_slug_keeps_safe_characters_and_replaces_runs_of_others():
    assert slug("tfds:mnist:train") == "tfds_mnist_train"  # FID statistics names
    assert slug("openai/consistency-decoder", sep="--") == "openai--consistency-decoder"  # Hub checkpoints
    assert slug("my images (v2)/") == "my_images_v2"
    assert slug("a.b_c-d") == "a.b_c-d"


def test_slug_strips_cuts_and_falls_back():
    assert slug("__x__") == "x" and slug("--x--", sep="--") == "x"
    assert slug("x" * 100, max_len=60) == "x" * 60
    assert slug("", fallback="source") == "source" and slug("///", sep="--", fallback="checkpoint") == "checkpoint"
