"""Frechet Inception Distance, offline: features, statistics, the distance, cached references.

    extractor = FeatureExtractor()                         # Inception params from the cache (see
                                                           # cmjax.models.inception), replicated on a mesh
    ref = reference_statistics("tfds:cifar10:train", extractor=extractor, resolution=32)
    gen = sample_statistics(sample_fn, 10_000, extractor=extractor, key=jax.random.key(0))
    fid(ref, gen)

Data flow: images uint8 (or float in [0, 255]) ``(N, H, W, C)``, C in {1, 3} -> batches sharded
over the mesh's ``data`` axis -> jitted :func:`cmjax.models.inception.fid_features` (resize to 299,
scale, InceptionV3 pool-3) -> ``(N, 2048)`` features -> ``mu (2048,)``, ``sigma (2048, 2048)``
(float64, ``np.cov`` with N - 1) -> ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

The statistics and the distance are :mod:`cmjax.evaluation.frechet`'s (re-exported here: ``fid``,
``FIDStats``, ``statistics``, ``frechet_distance``); this module computes the features.

Sources (``--ref`` / ``--samples`` of ``python -m cmjax.eval fid``): an image folder (recursive,
:class:`cmjax.data.ImageFolderSource`), ``tfds:NAME[:SPLIT]`` (a prepared TFDS dataset, read
without TensorFlow), ``digits`` (scikit-learn's 8x8 digits), all read by
:mod:`cmjax.evaluation.sources`, or an ``.npz`` of ``mu``/``sigma``
(the format pytorch-fid and clean-fid write too). With ``resolution`` every image is
resized (shorter side, bicubic) and center-cropped to ``resolution``^2 first, as the training
input pipeline does for evaluation; without it all images must share one size.

Reference statistics are cached as ``$CMJAX_CACHE/fid_stats/<name>-<resolution>-<hash>.npz``
(default ``~/.cache/cmjax``), the hash covering the source (for a folder: every file's relative
path, size and mtime), the resolution, the image count and the resize mode.

Samples are scored as 8-bit images, ``round((x + 1) * 127.5)`` clipped to [0, 255], the same
quantisation as saving them as PNG.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from cmjax import cache, parallel
from cmjax.evaluation.frechet import FIDStats, fid, frechet_distance, statistics
from cmjax.evaluation.sources import DIGITS, TFDS_PREFIX, open_source, source_batches
from cmjax.files import atomic_write
from cmjax.images import to_uint8
from cmjax.models import inception
from cmjax.weights import inception as inception_weights

# FIDStats, statistics, frechet_distance and fid (cmjax.evaluation.frechet) are part of the FID API.
__all__ = [
    "FIDStats", "FeatureExtractor", "statistics", "frechet_distance", "fid",
    "source_statistics", "reference_statistics",
    "sample_features", "sample_statistics", "fid_callback", "ternary_search_sigma", "stats_cache_path",
]

STATS_VERSION = 1  # bump when anything that changes cached statistics changes


# --------------------------------------------------------------------------------------------
# Features


def _progress(total: Optional[int], desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


@functools.lru_cache(maxsize=8)
def _features_fn(mode: str, mesh) -> Callable:
    """One jitted feature function per (mode, mesh): extractors share compiled programs."""
    return jax.jit(functools.partial(inception.fid_features, mode=mode),
                   in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))


class FeatureExtractor:
    """Inception pool-3 features, jitted, batches split over a mesh's ``data`` axis.

    Args:
      params: Inception params (default :func:`cmjax.models.inception_weights.load_params`: cache, else convert).
      mesh: 1-D mesh (default every device, :func:`cmjax.parallel.make_mesh`); params replicated.
      batch_size: images per forward, rounded up to a multiple of the device count. A last,
        smaller batch is padded to it, so one program is compiled per input image size.
      mode: ``"tf"`` (the TF FID graph's resize and scaling) or ``"pytorch"`` (pytorch-fid's).

    Every process must pass the same images (the batch is built from the full host copy on each);
    results come back replicated, so every process gets all features.
    """

    def __init__(self, params: Any = None, *, mesh=None, batch_size: int = 50, mode: str = "tf"):
        if mode not in inception.RESIZE_MODES:
            raise ValueError(f"mode must be one of {inception.RESIZE_MODES}, got {mode!r}")
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.num_devices = int(self.mesh.size)
        self.batch_size = int(math.ceil(max(int(batch_size), 1) / self.num_devices) * self.num_devices)
        self.mode = mode
        params = inception_weights.load_params() if params is None else params
        self.params = parallel.put_replicated(params, self.mesh)
        self._data = parallel.data_sharding(self.mesh)
        self._fn = _features_fn(mode, self.mesh)

    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        n = len(chunk)
        x = np.asarray(chunk, np.float32)
        if n != self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n,) + x.shape[1:], np.float32)])
        arr = jax.make_array_from_callback(x.shape, self._data, lambda idx: x[idx])
        return np.asarray(self._fn(self.params, arr))[:n]

    def __call__(self, images) -> np.ndarray:
        """``(N, H, W, C)`` uint8, or float in [0, 255], C in {1, 3} -> ``(N, 2048)`` float32."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be (N, H, W, 1 or 3) NHWC, got shape {images.shape}")
        if np.issubdtype(images.dtype, np.floating) and images.size and float(images.max()) <= 1.0 + 1e-6 \
                and float(images.min()) < 0.0:
            raise ValueError("float images look like [-1, 1]; FeatureExtractor takes [0, 255] "
                             "(convert with cmjax.images.to_uint8)")
        if len(images) == 0:
            return np.zeros((0, inception.FEATURE_DIM), np.float32)
        return np.concatenate([self._forward(images[i:i + self.batch_size])
                               for i in range(0, len(images), self.batch_size)])

    def of_batches(self, batches: Iterator[np.ndarray], *, total: Optional[int] = None, desc: str = "features",
                   progress: bool = True) -> np.ndarray:
        """Features of every image of an iterator of ``(b, H, W, C)`` batches, with a progress bar."""
        out = []
        with _progress(total, desc, progress) as bar:
            for batch in batches:
                out.append(self(batch))
                bar.update(len(batch))
        if not out:
            raise ValueError(f"{desc}: no images")
        return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# Reference statistics


def source_statistics(source, extractor: FeatureExtractor, *, resolution: Optional[int] = None,
                      max_images: Optional[int] = None, desc: str = "images", progress: bool = True) -> FIDStats:
    """FID statistics of (the first ``max_images`` images of) a source, without caching."""
    n = len(source) if max_images is None else min(int(max_images), len(source))
    batches = source_batches(source, resolution=resolution, max_images=n, batch_size=extractor.batch_size)
    return statistics(extractor.of_batches(batches, total=n, desc=desc, progress=progress))


def stats_cache_path(spec: str, source, *, resolution: Optional[int], max_images: Optional[int], mode: str,
                     data_dir: Optional[str] = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the reference statistics of ``spec`` are cached (see the module docstring)."""
    h = hashlib.sha256()
    n = len(source) if max_images is None else min(int(max_images), len(source))
    h.update(f"v{STATS_VERSION}|{mode}|res={resolution}|n={n}|{inception_weights.CACHE_NAME}\n".encode())
    if spec.startswith(TFDS_PREFIX) or spec == DIGITS:
        h.update(f"{spec}|{data_dir or ''}|len={len(source)}".encode())
        name = spec
    else:
        root = os.path.abspath(spec)
        h.update(root.encode())
        for p in source.paths[:n]:
            st = os.stat(p)
            h.update(f"\n{os.path.relpath(p, root)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
        name = os.path.basename(root.rstrip(os.sep))
    root_dir = Path(cache_dir) if cache_dir is not None else cache.cache_dir() / "fid_stats"
    return root_dir / f"{cache.slug(name, max_len=60, fallback='source')}-{resolution or 'native'}-{h.hexdigest()[:16]}.npz"


def reference_statistics(spec: str | os.PathLike, *, extractor: Optional[FeatureExtractor] = None,
                         resolution: Optional[int] = None, max_images: Optional[int] = None,
                         data_dir: Optional[str] = None, cache: bool = True,
                         cache_dir: str | os.PathLike | None = None, progress: bool = True) -> FIDStats:
    """Statistics of a reference set, computed once and cached (``cache=False`` neither reads
    nor writes the cache). ``spec``: see :func:`open_source`, or an ``.npz`` statistics file."""
    spec = os.fspath(spec)
    if spec.endswith(".npz") and os.path.isfile(spec):
        return FIDStats.load(spec)
    source = open_source(spec, data_dir=data_dir)
    extractor = extractor if extractor is not None else FeatureExtractor()
    path = stats_cache_path(spec, source, resolution=resolution, max_images=max_images, mode=extractor.mode,
                            data_dir=data_dir, cache_dir=cache_dir) if cache else None
    if path is not None and path.is_file():
        return FIDStats.load(path)
    stats = source_statistics(source, extractor, resolution=resolution, max_images=max_images,
                              desc=f"reference {spec}", progress=progress)
    if path is not None and jax.process_index() == 0:
        stats.save(path)
    return stats


# --------------------------------------------------------------------------------------------
# Generated samples


SampleFn = Callable[[jax.Array, int], Any]  # (key, n) -> (n, H, W, C) float in [-1, 1]


def sample_features(sample_fn: SampleFn, num: int, *, extractor: FeatureExtractor, key: jax.Array,
                    batch_size: int = 250, save_dir: str | os.PathLike | None = None,
                    progress: bool = True) -> np.ndarray:
    """Features of ``num`` generated images: ``sample_fn(fold_in(key, i), batch_size)`` for batch i.

    ``sample_fn`` is always called with the same ``n = batch_size`` (one compilation); the last
    batch is trimmed. Images are quantised to uint8 first (:func:`cmjax.images.to_uint8`); with ``save_dir``
    they are also written there as ``000000.png``, ... . Returns ``(num, 2048)``.
    """
    from PIL import Image

    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)

    def batches():
        done = 0
        for i in range(int(math.ceil(num / batch_size))):
            u8 = to_uint8(sample_fn(jax.random.fold_in(key, i), batch_size))[: num - done]
            if save_dir is not None and jax.process_index() == 0:
                for j, im in enumerate(u8):
                    picture = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
                    atomic_write(os.path.join(save_dir, f"{done + j:06d}.png"),
                                 lambda f, picture=picture: picture.save(f, format="PNG"))
            done += len(u8)
            yield u8

    return extractor.of_batches(batches(), total=num, desc="samples", progress=progress)


def sample_statistics(sample_fn: SampleFn, num: int, *, extractor: FeatureExtractor, key: jax.Array,
                      batch_size: int = 250, save_dir: str | os.PathLike | None = None,
                      progress: bool = True) -> FIDStats:
    """FID statistics of ``num`` samples; see :func:`sample_features`."""
    return statistics(sample_features(sample_fn, num, extractor=extractor, key=key, batch_size=batch_size,
                                      save_dir=save_dir, progress=progress))


def fid_callback(sample_fn: Callable[[Any, jax.Array, int], Any], reference, *, num_samples: int = 10_000,
                 every: int = 0, batch_size: int = 250, seed: int = 0, resolution: Optional[int] = None,
                 extractor: Optional[FeatureExtractor] = None, name: str = "fid",
                 progress: bool = False) -> Callable[[Any, int], dict]:
    """A hook for a training loop: ``callback(params, step) -> {name: FID}``, ``{}`` off-schedule.

    Args:
      sample_fn: ``(params, key, n) -> (n, H, W, C)`` images in [-1, 1], e.g.
        ``lambda p, k, n: family.sample(p, k, n, 1)``; jitted here with ``n`` static.
      reference: :class:`FIDStats`, an ``.npz`` path, or a source spec (:func:`open_source`),
        whose statistics are computed (and cached) on the first call at ``resolution``
        (default: the samples' size).
      every: evaluate when ``step % every == 0`` (``0``: at every call).
      seed: the same sample noise at every evaluation (``fold_in(key(seed), batch)``), so
        successive values differ only through the params.
    """
    jitted = jax.jit(sample_fn, static_argnums=2)
    state: dict[str, Any] = {"ref": reference if isinstance(reference, FIDStats) else None}

    def callback(params, step: int) -> dict:
        if every and step % every:
            return {}
        nonlocal extractor
        extractor = extractor if extractor is not None else FeatureExtractor()
        feats = sample_features(lambda k, n: jitted(params, k, n), num_samples, extractor=extractor,
                                key=jax.random.key(seed), batch_size=batch_size, progress=progress)
        if state["ref"] is None:
            res = resolution
            if res is None:  # the samples' size, from shapes only (nothing runs)
                res = int(jax.eval_shape(lambda p, k: sample_fn(p, k, batch_size), params,
                                         jax.random.key(seed)).shape[1])
            state["ref"] = reference_statistics(reference, extractor=extractor, resolution=res, progress=progress)
        return {name: fid(state["ref"], statistics(feats))}

    return callback


# --------------------------------------------------------------------------------------------
# Choosing the intermediate sigma of two-step sampling


def ternary_search_sigma(fid_fn: Callable[[float], float], lo: float, hi: float, iters: int = 6, *,
                         log_space: bool = False, report: Optional[Callable[[float, float], None]] = None
                         ) -> tuple[float, float, dict[float, float]]:
    """Minimise ``fid_fn(sigma)`` over ``[lo, hi]`` by ternary search (as the CM paper chose the
    intermediate sigma of two-step sampling), assuming it is unimodal there.

    Each iteration evaluates the two inner third-points and drops the worse outer third;
    ``log_space`` does the splitting on ``log(sigma)``. Every value is computed once (memoised),
    and after ``iters`` iterations the midpoint of what is left is evaluated too. ``report(sigma,
    fid)`` is called after each new evaluation. Returns ``(best_sigma, best_fid, {sigma: fid})``
    over all evaluated points (``2 * iters + 1`` evaluations at most).
    """
    if not lo < hi or (log_space and lo <= 0):
        raise ValueError(f"need lo < hi{' and lo > 0 for log_space' if log_space else ''}, got {lo}, {hi}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    to_x = math.log if log_space else float
    from_x = math.exp if log_space else float
    history: dict[float, float] = {}

    def evaluate(x: float) -> float:
        sigma = float(f"{from_x(x):.12g}")  # canonical: exp(log(s)) round trips must hit the memo
        if sigma not in history:
            history[sigma] = float(fid_fn(sigma))
            if report is not None:
                report(sigma, history[sigma])
        return history[sigma]

    a, b = to_x(lo), to_x(hi)
    for _ in range(iters):
        m1, m2 = a + (b - a) / 3, b - (b - a) / 3
        if evaluate(m1) <= evaluate(m2):
            b = m2
        else:
            a = m1
    evaluate((a + b) / 2)
    best = min(history, key=history.get)
    return best, history[best], dict(sorted(history.items()))
