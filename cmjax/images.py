"""Pictures: the one uint8 <-> [-1, 1] conversion, RGB from any PIL image, labelled image grids.

    uint8 (..., H, W, C) in [0, 255]  --from_uint8-->  float32 in [-1, 1]  --to_uint8-->  uint8
    PIL image of any mode --to_rgb--> mode RGB (alpha composited onto white)
    PIL image --upright--> turned as its EXIF orientation says (every user image goes through it)
    rows of (n, H, W, C) images --image_grid / save_image_grid--> one uint8 RGB picture / PNG

Used by the training input (cmjax.data), evaluation, decoding and the command lines alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps

from cmjax.files import atomic_write


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> mode RGB. Transparent pixels are composited onto white, since their
    stored colour is arbitrary (often black) and dropping alpha would expose it."""
    if img.mode in ("I;16", "I;16L", "I;16B"):  # 16-bit grayscale PNG: keep the top 8 bits.
        img = Image.fromarray((np.asarray(img, np.uint16) >> 8).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF Orientation tag says, as every viewer shows it (a phone's portrait
    JPEG is stored sideways with orientation 6); decodes the pixels. Every image cmjax reads from a
    user goes through this (or :func:`upright_size` for the size alone)."""
    return ImageOps.exif_transpose(img)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of ``upright(img)``, from the header alone."""
    w, h = img.size
    return (h, w) if img.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPS_SIDES else (w, h)


def from_uint8(images) -> np.ndarray:
    """uint8 images (or floats in [0, 255]) -> float32 in [-1, 1]: ``x / 127.5 - 1``."""
    return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8 ``round((x + 1) * 127.5)`` clipped to [0, 255]; uint8 passes through."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(rows: Sequence[np.ndarray], pad: int = 2, upscale: int = 1,
               column_labels: Sequence[str] | None = None,
               cell_labels: Sequence[Sequence[str]] | None = None) -> np.ndarray:
    """Rows of images -> one uint8 RGB picture (H_grid, W_grid, 3), white background.

    Each row is (n, H, W, C) float in [-1, 1] or uint8, C in {1, 3}; every image has the same size
    and is nearest-neighbour upscaled by ``upscale``. ``column_labels`` (one per column) are written
    above the first row and ``cell_labels[i][j]`` under image j of row i (e.g. its PSNR), in PIL's
    default font; a column is widened to fit its labels. Without labels the grid is the images
    with ``pad`` pixels between and around them.
    """
    from PIL import ImageDraw, ImageFont

    cells = []
    for row in rows:
        u8 = to_uint8(row)
        if u8.shape[-1] == 1:
            u8 = np.repeat(u8, 3, axis=-1)
        if upscale > 1:
            u8 = u8.repeat(upscale, axis=1).repeat(upscale, axis=2)
        cells.append(u8)
    h, w = cells[0].shape[1:3]
    ncols = max(len(row) for row in cells)
    font = ImageFont.load_default()
    text_h = font.getbbox("Ag")[3] if column_labels or cell_labels else 0

    def text_w(text: str) -> int:
        return int(font.getbbox(text)[2])

    col_w = [w] * ncols
    for j, label in enumerate(column_labels or ()):
        col_w[j] = max(col_w[j], text_w(label) + 6)
    for labels in cell_labels or ():
        for j, label in enumerate(labels):
            col_w[j] = max(col_w[j], text_w(label) + 6)
    col_x = [pad + sum(col_w[:j]) + j * pad for j in range(ncols)]
    header = text_h + pad if column_labels else 0
    row_h = h + (text_h + pad if cell_labels else 0)
    grid = np.full((pad + header + len(cells) * (row_h + pad), col_x[-1] + col_w[-1] + pad, 3), 255, np.uint8)
    for i, row in enumerate(cells):
        for j, im in enumerate(row):
            if im.shape[:2] != (h, w):
                raise ValueError(f"grid cell ({i}, {j}) is {im.shape[:2]}, expected {(h, w)}")
            y, x = pad + header + i * (row_h + pad), col_x[j] + (col_w[j] - w) // 2
            grid[y:y + h, x:x + w] = im
    if not (column_labels or cell_labels):
        return grid
    picture = Image.fromarray(grid)
    draw = ImageDraw.Draw(picture)
    for j, label in enumerate(column_labels or ()):
        draw.text((col_x[j] + (col_w[j] - text_w(label)) // 2, pad), label, fill=(0, 0, 0), font=font)
    for i, labels in enumerate(cell_labels or ()):
        y = pad + header + i * (row_h + pad) + h + pad // 2
        for j, label in enumerate(labels):
            draw.text((col_x[j] + (col_w[j] - text_w(label)) // 2, y), label, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def save_image_grid(path: str | os.PathLike, rows: Sequence[np.ndarray], **kwargs) -> str:
    """Write :func:`image_grid` (same keyword arguments) as a PNG, creating folders; returns the path."""
    path = os.fspath(path)
    picture = Image.fromarray(image_grid(rows, **kwargs))
    atomic_write(path, lambda f: picture.save(f, format="PNG"))
    return path
