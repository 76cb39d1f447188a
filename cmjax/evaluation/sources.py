"""Image sets named on a command line, read as uniform uint8 batches (FID references, eval, edit).

    spec: an image folder | tfds:NAME[:SPLIT] | digits
      -> open_source   a random-access source of {"image": uint8 (H, W, C), ...} (cmjax.data)
      -> source_batches  RGBA -> RGB, optional shorter-side resize + center crop (cmjax.data.CenterCrop)
                         -> uint8 (b, S, S, C) batches, errors naming the offending file
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from cmjax import data

__all__ = ["DIGITS", "TFDS_PREFIX", "open_source", "source_batches"]

DIGITS = "digits"
TFDS_PREFIX = "tfds:"


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
