"""Training input from ``config.data``: the source, a per-host sharded grain loader, eval batches.

    source: digits | tfds | folder  -> {"image": uint8 (H, W, C)}
            npz (image/latent pairs) -> {"image": uint8 (H, W, 3), "latent": float32 (h, w, 4)}
    -> [RandomCrop(image_size), RandomFlip if data.random_flip, ToFloat(channels)]   (images)
       [PairToFloat]                                                                 (pairs)
    -> grain Batch(global_batch // process_count) -> host-local numpy batch
    -> cmjax.data.to_global_batch -> global jax.Array split over the mesh's data axis

Sharding, batching and iterator state are ``cmjax.data.make_train_loader``'s; this module only
chooses the source and the per-record transforms from the config.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np

from cmjax import data
from cmjax.files import array_headers
from cmjax.images import from_uint8


class NpzPairSource:
    """Precomputed image/latent pairs from an .npz file with arrays ``images`` (N, H, W, 3) uint8
    (or float in [-1, 1]) and ``latents`` (N, H/8, W/8, 4) float (raw SD latents, unscaled)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            array_headers(self.path)  # sizes checked against the file before np.load allocates them
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from None
        with np.load(self.path) as f:
            if "images" not in f or "latents" not in f:
                raise ValueError(f"{self.path}: an image/latent .npz needs arrays 'images' and 'latents', "
                                 f"found {sorted(f.keys())}")
            self.images, self.latents = f["images"], f["latents"].astype(np.float32)
        if len(self.images) != len(self.latents) or self.images.ndim != 4 or self.latents.ndim != 4:
            raise ValueError(f"{self.path}: images {self.images.shape} and latents {self.latents.shape} "
                             "must be (N, H, W, 3) and (N, h, w, 4)")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "latent": self.latents[i]}

    def __repr__(self) -> str:
        return f"NpzPairSource({self.path!r}, n={len(self)})"


class PairToFloat(grain.transforms.Map):
    """{"image": uint8 or float, "latent"} -> float32 image in [-1, 1] and float32 latent."""

    def map(self, record):
        image = np.asarray(record["image"])
        if image.dtype == np.uint8:
            image = from_uint8(image)
        return {"image": image.astype(np.float32), "latent": np.asarray(record["latent"], np.float32)}


def make_source(config):
    """The random-access source named by config.data.source."""
    d = config.data
    if d.source == "digits":
        return data.NumpySource(data.digits_images(d.image_size))
    if d.source == "tfds":
        return data.tfds_source(d.name, d.split, data_dir=d.get("data_dir") or None)
    if d.source == "folder":
        return data.ImageFolderSource(d.path)
    if d.source == "npz":
        return NpzPairSource(d.path)
    raise ValueError(f"unknown data.source {d.source!r} (digits, tfds, folder, npz)")


def make_loader(config, source=None, *, seed_offset: int = 0, num_epochs=None) -> grain.DataLoader:
    """A grain DataLoader of host-local batches {"image": float32 (B_host, S, S, C), "latent"?}."""
    d = config.data
    source = make_source(config) if source is None else source
    if isinstance(source, NpzPairSource):
        if source.images.shape[1] != d.image_size:
            raise ValueError(f"{source.path}: images are {source.images.shape[1]} px, data.image_size={d.image_size}")
        ops = [PairToFloat()]
    else:
        ops = [data.RandomCrop(d.image_size), *([data.RandomFlip()] if d.random_flip else []), data.ToFloat(d.channels)]
    return data.make_train_loader(source, global_batch_size=config.batch_size, seed=int(config.seed) + seed_offset,
                                  transforms=ops, num_epochs=num_epochs, worker_count=d.worker_count)


def eval_batch(config, source=None, num: int | None = None) -> dict[str, np.ndarray]:
    """A fixed host-local batch (a different shuffle seed from training) for PSNR and grids."""
    loader = make_loader(config, source, seed_offset=1000)
    batch = next(iter(loader))
    num = num or config.num_eval_images
    return {k: v[:num] for k, v in batch.items() if k in ("image", "latent")}
