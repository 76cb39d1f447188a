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

Sources (``--ref`` / ``--samples`` of ``python -m cmjax.eval fid``): an image folder (recursive,
:class:`cmjax.data.ImageFolderSource`), ``tfds:NAME[:SPLIT]`` (a prepared TFDS dataset, read
without TensorFlow), ``digits`` (scikit-learn's 8x8 digits), or an ``.npz`` of ``mu``/``sigma``
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

import dataclasses
import functools
import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import numpy as np

from cmjax import cache, data, parallel
from cmjax.files import array_headers, atomic_write
from cmjax.models import inception
from cmjax.weights import inception as inception_weights

__all__ = [
    "FIDStats", "FeatureExtractor", "statistics", "frechet_distance", "fid",
    "open_source", "source_batches", "source_statistics", "reference_statistics",
    "sample_features", "sample_statistics", "fid_callback", "ternary_search_sigma", "stats_cache_path",
]

STATS_VERSION = 1  # bump when anything that changes cached statistics changes
DIGITS = "digits"
TFDS_PREFIX = "tfds:"


# --------------------------------------------------------------------------------------------
# Statistics and the distance


@dataclasses.dataclass(frozen=True, eq=False)
class FIDStats:
    """Gaussian statistics of Inception features: ``mu (D,)``, ``sigma (D, D)`` float64, ``num_images``.

    ``factor``: optionally a ``(D, k)`` matrix with ``sigma = factor @ factor.T`` (kept by
    :func:`statistics` when there are fewer images than dimensions, so that FIDs of small sets
    cost ``O(D^2 k)`` instead of ``O(D^3)``); it is not saved.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    factor: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False)

    @functools.cached_property
    def sigma_factor(self) -> np.ndarray:
        """A ``(D, r)`` matrix ``C`` with ``sigma = C C^T`` (``r`` = numerical rank): ``factor`` if
        given, else from one eigendecomposition, the costly part of an FID, done once per object:
        keep the reference's object to score many sample sets against it."""
        if self.factor is not None:
            return self.factor
        w, v = np.linalg.eigh((self.sigma + self.sigma.T) / 2)
        w = _psd_eigvals(w)
        keep = w > 0
        return v[:, keep] * np.sqrt(w[keep])

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``mu``, ``sigma``, ``num_images`` to an ``.npz`` (atomically: temp file + rename)."""
        path = Path(path)
        atomic_write(path, lambda f: np.savez(f, mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FIDStats":
        """Read an ``.npz`` with ``mu`` and ``sigma`` (cmjax's, pytorch-fid's or clean-fid's)."""
        try:
            array_headers(path)  # sizes checked against the file before np.load allocates them
            with np.load(path) as f:
                if "mu" not in f or "sigma" not in f:
                    raise ValueError(f"{path}: an FID statistics file needs arrays 'mu' and 'sigma', "
                                     f"found {sorted(f.files)}")
                mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
                num = int(f["num_images"]) if "num_images" in f else -1
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from e
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith(f"{path}: ") else f"{path}: {e}") from None
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        return cls(mu, sigma, num)


def statistics(features: np.ndarray) -> FIDStats:
    """``(N, D)`` features -> mean and unbiased covariance (float64). Needs N >= 2."""
    feats = np.asarray(features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows (N, D), got shape {feats.shape}")
    n, d = feats.shape
    mu = feats.mean(axis=0, dtype=np.float64)
    if n <= d:
        centered = (feats.astype(np.float64) - mu) / np.sqrt(n - 1)
        return FIDStats(mu, centered.T @ centered, n, centered.T)
    sigma = np.zeros((d, d), np.float64)
    for i in range(0, n, 4096):  # float64 a chunk at a time: 50k x 2048 features stay float32
        c = feats[i:i + 4096].astype(np.float64) - mu
        sigma += c.T @ c
    return FIDStats(mu, sigma / (n - 1), n)


def _psd_eigvals(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with those below its numerical-rank tolerance
    (``max * n * eps``, as ``np.linalg.matrix_rank``) set to 0: they are rounding noise, and their
    square roots would otherwise add up to a visible bias (e.g. FID of a set with itself)."""
    tol = max(float(w.max()), 0.0) * w.size * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in float64.

    ``tr((S1 S2)^(1/2))`` is the sum of the square roots of the eigenvalues of ``S1 S2``, which are
    those of the symmetric PSD matrix ``C^T S2 C`` for any factor ``S1 = C C^T`` (here from
    ``eigh(S1)``): exact for covariances, no complex parts, no failure on the singular matrices
    that fewer than D+1 samples give (pytorch-fid uses ``scipy.linalg.sqrtm(S1 S2)``; the two
    agree to rounding).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    return fid(FIDStats(mu1, s1, -1), FIDStats(mu2, s2, -1))


def fid(a: FIDStats, b: FIDStats) -> float:
    """FID between two sets of statistics (symmetric). The factored side is the one whose
    :attr:`FIDStats.sigma_factor` is cheaper (given or already computed, fewest columns), else
    ``a``: pass the reference first to reuse its factor."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics do not match: mu {a.mu.shape} / {b.mu.shape}, "
                         f"sigma {a.sigma.shape} / {b.sigma.shape}")

    def cost(st: FIDStats) -> float:
        ready = st.factor if st.factor is not None else st.__dict__.get("sigma_factor")
        return ready.shape[1] if ready is not None else math.inf

    if cost(b) < cost(a):
        a, b = b, a
    c = a.sigma_factor
    m = c.T @ b.sigma @ c
    tr_covmean = float(np.sum(np.sqrt(_psd_eigvals(np.linalg.eigvalsh((m + m.T) / 2)))))
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)


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
                             "(convert with cmjax.data.to_uint8)")
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
# Sources


def open_source(spec: str | os.PathLike, *, data_dir: Optional[str] = None):
    """A random-access source of ``{"image": uint8 (H, W, C), ...}`` records for ``spec``.

    ``spec``: an image folder, ``tfds:NAME[:SPLIT]`` (split default ``train``; the dataset must be
    prepared under ``data_dir``), or ``digits``.
    """

    spec = os.fspath(spec)
    if spec.startswith(TFDS_PREFIX):
        name, _, split = spec[len(TFDS_PREFIX):].partition(":")
        if not name:
            raise ValueError(f"{spec!r}: expected tfds:NAME[:SPLIT]")
        try:
            return data.tfds_source(name, split or "train", data_dir=data_dir or None)
        except Exception as e:  # TFDS raises many types for a missing / unprepared dataset
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # not TFDS's list of every dataset
            raise ValueError(f"{spec}: cannot open the TFDS dataset {name!r} split {split or 'train'!r} "
                             f"(data_dir={data_dir or 'default'}): {first}") from e
    if spec == DIGITS:
        return data.NumpySource(data.digits_images())
    if os.path.isdir(spec):
        return data.ImageFolderSource(spec)
    raise ValueError(f"{spec!r} is not an image folder, 'tfds:NAME[:SPLIT]', '{DIGITS}' or an FID "
                     "statistics .npz file")


def _record_name(source, i: int, record: Mapping[str, Any]) -> str:
    return str(record.get("path", f"record {i} of {source!r}"))


def source_batches(source, *, resolution: Optional[int] = None, max_images: Optional[int] = None,
                   batch_size: int = 50, image_key: str = "image") -> Iterator[np.ndarray]:
    """uint8 ``(b, S, S, C)`` batches of the first ``max_images`` records of ``source``.

    ``resolution``: resize the shorter side (bicubic) and center-crop to a square of that side
    (:class:`cmjax.data.CenterCrop`); without it every image must have the first one's size.
    RGBA is reduced to RGB (alpha dropped). Errors name the offending file.
    """

    n = len(source) if max_images is None else min(int(max_images), len(source))
    crop = data.CenterCrop(int(resolution)) if resolution else None
    shape, batch = None, []
    for i in range(n):
        record = source[i]
        if image_key not in record:
            raise ValueError(f"{_record_name(source, i, record)}: no {image_key!r} field (fields: {sorted(record)})")
        image = np.asarray(record[image_key])
        if image.ndim == 2:
            image = image[..., None]
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"{_record_name(source, i, record)}: expected a uint8 (H, W, C) image, got "
                             f"{image.dtype} {image.shape}")
        if image.shape[-1] == 4:
            image = image[..., :3]
        if crop is not None:
            image = crop.map({"image": image})["image"]
        if shape is None:
            shape = image.shape
        elif image.shape != shape:
            raise ValueError(f"{_record_name(source, i, record)}: size {image.shape} differs from the first "
                             f"image's {shape}; pass a resolution (--resolution) to crop all images to one size")
        batch.append(image)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def source_statistics(source, extractor: FeatureExtractor, *, resolution: Optional[int] = None,
                      max_images: Optional[int] = None, desc: str = "images", progress: bool = True) -> FIDStats:
    """FID statistics of (the first ``max_images`` images of) a source, without caching."""
    n = len(source) if max_images is None else min(int(max_images), len(source))
    batches = source_batches(source, resolution=resolution, max_images=n, batch_size=extractor.batch_size)
    return statistics(extractor.of_batches(batches, total=n, desc=desc, progress=progress))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "source"


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
    return root_dir / f"{_slug(name)}-{resolution or 'native'}-{h.hexdigest()[:16]}.npz"


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
    batch is trimmed. Images are quantised to uint8 first (:func:`cmjax.data.to_uint8`); with ``save_dir``
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
            u8 = data.to_uint8(sample_fn(jax.random.fold_in(key, i), batch_size))[: num - done]
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
