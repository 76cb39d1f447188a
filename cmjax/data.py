"""Training input: sources, grain transforms, the per-host sharded loader (grain's checkpoint
handler saves its iterator, see cmjax.training.run_checkpoints), and the step from host-local numpy
batches to one global `jax.Array`. Pixel conversions and grids are cmjax.images'.

Data flow:
  source[i] -> {"image": uint8 (H, W, C), ...}            (TFDS / image folder / numpy array)
  -> RandomCrop or CenterCrop -> uint8 (S, S, C)
  -> RandomFlip (train only)
  -> ToFloat(channels) -> {"image": float32 (S, S, channels) in [-1, 1], "label"?}
  -> grain Batch (per-host batch, drop_remainder) -> float32 (B_host, S, S, channels) NHWC
  -> to_global_batch(batch, sharding) -> jax.Array (B_global, S, S, channels)

TensorFlow is never needed: TFDS datasets are read with `tfds.data_source` (random-access
ArrayRecord files, images decoded with PIL). Preparing a dataset (`tfds build`) is TFDS's job
and is done beforehand, with whatever that needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from cmjax.images import from_uint8, to_rgb, upright

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------
# Sources: random-access `len()` + `[i]` returning {"image": uint8 (H, W, C), ...}.


def tfds_source(name: str, split: str, data_dir: str | os.PathLike | None = None):
    """A prepared TFDS dataset as a random-access grain source (no TensorFlow needed).

    Records are dicts as the dataset defines them, e.g. {"image": uint8 (H, W, C), "label": int64}.
    The dataset must already be prepared in ArrayRecord format under `data_dir`.
    """
    import tensorflow_datasets as tfds  # Lazy: `import cmjax.data` should stay light.

    return tfds.data_source(name, split=split, data_dir=data_dir)


class ImageFolderSource:
    """Every image file under `root`, recursively, as {"image": uint8 (H, W, 3) RGB, "path": str}.

    Files are ordered by their path relative to `root` (sorted), so the index -> file mapping is
    the same on every host and every run. Extensions match case-insensitively. Grayscale,
    palette and RGBA images are converted to RGB (alpha composited onto white).

    A file that cannot be decoded is not skipped: `__getitem__` raises an `OSError` naming it,
    so a corrupt dataset fails the run loudly instead of silently changing the epoch; an image
    name that is not a regular file (a FIFO, a device, a dangling link) is a ValueError here.
    """

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} does not exist or is not a folder")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        rel_paths, special = [], []
        # Symlinked folders are followed, but each real folder is walked once: a link to a
        # parent (l1 -> .) would otherwise make the walk run until memory is gone.
        visited = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in visited:  # reached again through another link
                dirnames[:] = []
                continue
            visited.add(real)
            dirnames[:] = [d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in visited]
            for fname in filenames:
                path = os.path.join(dirpath, fname)
                if fname.lower().endswith(exts):
                    # Regular files only: opening a FIFO named x.png would block the loader.
                    (rel_paths if os.path.isfile(path) else special).append(os.path.relpath(path, self.root))
        if special:  # loud, like an unreadable image: skipping them would change the data silently
            raise ValueError(f"{os.path.join(self.root, sorted(special)[0])}: not a regular file (a FIFO, device or "
                             f"dangling link){f', and {len(special) - 1} more like it' if len(special) > 1 else ''} "
                             f"in the image folder; remove {'them' if len(special) > 1 else 'it'}")
        if not rel_paths:
            raise ValueError(f"no image files ({', '.join(exts)}) found under {self.root!r}")
        # Sort on '/'-separated relative paths so the order does not depend on the OS or os.walk.
        rel_paths.sort(key=lambda p: p.replace(os.sep, "/"))
        self.paths = [os.path.join(self.root, p) for p in rel_paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img.load()  # Decode now, so truncated files fail here and not later.
                image = np.asarray(to_rgb(upright(img)), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise OSError(f"cannot read image file {path!r}: {err}") from err
        return {"image": image, "path": path}

    def __repr__(self) -> str:
        return f"ImageFolderSource(root={self.root!r}, num_images={len(self)})"


class NumpySource:
    """An in-memory uint8 array (N, H, W, C) (or (N, H, W), read as C=1) as a grain source.

    Records are {"image": uint8 (H, W, C)} plus {"label": labels[i]} when labels are given.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = {"image": self.images[index]}
        if self.labels is not None:
            record["label"] = self.labels[index]
        return record

    def __repr__(self) -> str:  # Keep the array out of grain's logs and state validation.
        return f"NumpySource(images={self.images.dtype}{list(self.images.shape)})"


def digits_images(size: int = 8) -> np.ndarray:
    """scikit-learn's bundled 8x8 handwritten digits as uint8 (1797, size, size, 1).

    Values 0..16 are scaled to 0..255 (16 -> 255). For size != 8 each image is resized with
    bicubic interpolation. Real data for tests and small CPU runs; needs scikit-learn.
    """
    from sklearn.datasets import load_digits  # Lazy: only these helpers need scikit-learn.

    digits = load_digits().images  # float64 (1797, 8, 8), integer values 0..16.
    images = np.round(digits * (255.0 / 16.0)).astype(np.uint8)
    if size != 8:
        images = np.stack([
            np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
            for im in images
        ])
    return images[..., None]


# --------------------------------------------------------------------------------------------
# Transforms on single records. Images stay uint8 HWC until `ToFloat`.


def _resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 with min(H, W) == size, aspect kept (bicubic, antialiased)."""
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    gray = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if gray else image)
    # PIL's resize widens the filter when downscaling, i.e. it antialiases.
    out = np.asarray(pil.resize((new_w, new_h), Image.BICUBIC))
    return out[..., None] if gray else out


def _with_image(record: Mapping[str, Any], image: np.ndarray) -> dict[str, Any]:
    out = dict(record)
    out["image"] = image
    return out


class RandomCrop(grain.transforms.RandomMap):
    """Resize the shorter side to `image_size`, then crop a random `image_size` square."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def random_map(self, record, rng: np.random.Generator):
        image = _resize_shorter_side(record["image"], self.image_size)
        h, w = image.shape[:2]
        top = int(rng.integers(0, h - self.image_size + 1))
        left = int(rng.integers(0, w - self.image_size + 1))
        crop = image[top:top + self.image_size, left:left + self.image_size]
        return _with_image(record, crop)


class CenterCrop(grain.transforms.Map):
    """Resize the shorter side to `image_size`, then crop the central square (evaluation)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def map(self, record):
        image = _resize_shorter_side(record["image"], self.image_size)
        h, w = image.shape[:2]
        top, left = (h - self.image_size) // 2, (w - self.image_size) // 2
        crop = image[top:top + self.image_size, left:left + self.image_size]
        return _with_image(record, crop)


class RandomFlip(grain.transforms.RandomMap):
    """Mirror the image left-right with probability 1/2."""

    def random_map(self, record, rng: np.random.Generator):
        if rng.random() < 0.5:
            return _with_image(record, np.ascontiguousarray(record["image"][:, ::-1]))
        return dict(record)


# ITU-R BT.601 luma, as PIL's convert("L").
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class ToFloat(grain.transforms.Map):
    """uint8 (H, W, C) -> {"image": float32 (H, W, channels) in [-1, 1]}, keeping "label".

    channels=1 turns RGB into BT.601 luma; channels=3 repeats a single gray channel. Other
    keys (e.g. an image folder's "path" strings) are dropped so batches hold only arrays.
    """

    def __init__(self, channels: int = 3):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def map(self, record):
        image = np.asarray(record["image"], np.float32)
        if image.shape[-1] == 4:  # RGBA from a TFDS dataset: drop alpha.
            image = image[..., :3]
        if self.channels == 1 and image.shape[-1] == 3:
            image = np.round(image @ _LUMA)[..., None]
        elif self.channels == 3 and image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        if image.shape[-1] != self.channels:
            raise ValueError(f"cannot turn an image of shape {record['image'].shape} into "
                             f"{self.channels} channels")
        out = {"image": from_uint8(image)}
        if "label" in record:
            out["label"] = np.asarray(record["label"])
        return out


def train_transforms(image_size: int, channels: int = 3) -> list[grain.transforms.Map]:
    """Random crop, random flip, then float32 in [-1, 1]."""
    return [RandomCrop(image_size), RandomFlip(), ToFloat(channels)]


# --------------------------------------------------------------------------------------------
# The loader.


def make_train_loader(
    source,
    *,
    global_batch_size: int,
    seed: int,
    image_size: int | None = None,
    channels: int = 3,
    transforms: Sequence[grain.transforms.Map] | None = None,
    shard_by_host: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> grain.DataLoader:
    """A grain DataLoader yielding {"image": float32 (B_host, S, S, channels) in [-1, 1], ...}.

    Args:
        source: random-access source (`len`, `[i]`) of {"image": uint8 (H, W, C), ...}.
        global_batch_size: batch size summed over all hosts.
        seed: seeds the shuffle and the random crops/flips; same seed, same stream.
        image_size: S, the side of the square crops of the default transforms.
        channels: 1 or 3 output channels of the default transforms.
        transforms: the per-record operations, instead of ``train_transforms(image_size, channels)``.
        shard_by_host: each JAX process reads a disjoint 1/process_count of every epoch. If False,
            every host reads the whole dataset in the same order and yields whole global
            batches.
        num_epochs: None repeats forever.
        worker_count: grain worker processes (0 reads in the main process).
        shard_options: explicit sharding, overriding `shard_by_host` (e.g. to simulate hosts).

    The per-host batch is global_batch_size // shard_count; remainders (of the shard and of the
    last batch of an epoch) are dropped so every host runs the same number of steps.
    """
    if shard_options is None:
        if shard_by_host:
            shard_options = grain.sharding.ShardOptions(
                shard_index=jax.process_index(), shard_count=jax.process_count(),
                drop_remainder=True)
        else:
            shard_options = grain.sharding.NoSharding()
    shard_count = shard_options.shard_count
    if global_batch_size % shard_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the number "
                         f"of input shards (hosts) {shard_count}")
    host_batch_size = global_batch_size // shard_count
    if len(source) // shard_count < host_batch_size:
        raise ValueError(f"{len(source)} records over {shard_count} shard(s) cannot fill one "
                         f"per-host batch of {host_batch_size}")
    if worker_count > 0:
        _ensure_absl_flags_parsed()
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard_options, shuffle=True,
        num_epochs=num_epochs, seed=seed)
    if transforms is None:
        transforms = train_transforms(image_size, channels)
    operations = [*transforms, grain.transforms.Batch(host_batch_size, drop_remainder=True)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count, shard_options=shard_options)


def _ensure_absl_flags_parsed():
    """grain's worker processes read absl flags; outside `absl.app.run` (pytest, notebooks,
    argparse mains) nothing has parsed them, so take their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# --------------------------------------------------------------------------------------------
# Host-local -> global.


def to_global_batch(batch, sharding: jax.sharding.Sharding):
    """Host-local numpy batch (a pytree) -> global `jax.Array`s laid out by `sharding`.

    Each host passes its own (B_host, ...) slice; with `NamedSharding(mesh, P("data"))` the
    result is (B_host * process_count, ...) sharded over the batch axis. Every leaf uses the same
    sharding, so it should shard only leading axes (labels are (B,), images (B, H, W, C)).
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
