"""cmjax.images.image_grid: the one picture-grid helper (eval recon, edit, training samples)."""
from __future__ import annotations

import numpy as np
from PIL import ImageFont

from cmjax.images import image_grid, to_uint8


def test_to_uint8_rounds_and_clips():
    x = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 255, 255, 255])  # round(127.5) = 128 (half to even)
    u8 = np.arange(5, dtype=np.uint8)
    assert to_uint8(u8) is u8


def test_grid_without_labels_places_every_image():
    rng = np.random.default_rng(0)
    rows = [rng.uniform(-1, 1, (3, 4, 5, 3)), rng.uniform(-1, 1, (2, 4, 5, 1))]  # short row, gray row
    grid = image_grid(rows, pad=2, upscale=2)
    assert grid.shape == (2 + 2 * (8 + 2), 2 + 3 * (10 + 2), 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[2:10:2, 14:24:2], to_uint8(rows[0][1]))
    np.testing.assert_array_equal(grid[12:20:2, 2:12:2, 1], to_uint8(rows[1][0])[..., 0])
    assert (grid[12:20, 26:36] == 255).all()  # the missing cell stays white


def test_labels_sit_above_columns_and_under_cells():
    text_h = ImageFont.load_default().getbbox("Ag")[3]
    rows = [np.full((3, 20, 20, 3), -1.0), np.full((3, 20, 20, 3), -1.0)]  # black cells
    long = "consistency decoder"
    grid = image_grid(rows, pad=2, column_labels=["in", "GAN", long],
                      cell_labels=[["", "31.20 dB", "33.10 dB"], ["", "", ""]])
    top, row_h = 2 + text_h + 2, 20 + text_h + 2
    assert grid.shape[0] == top + 2 * (row_h + 2)
    width_long = ImageFont.load_default().getbbox(long)[2]
    assert grid.shape[1] >= 2 + 2 * (20 + 2) + width_long  # the third column widened to its label
    assert (grid[:top] < 128).any(axis=(0, 2)).sum() > width_long // 2  # label ink above the grid
    np.testing.assert_array_equal(grid[top:top + 20, 2:22], 0)  # first cell, unmoved (column 0 fits "in")
    under_first_row = grid[top + 20:top + row_h]
    x0 = 2 + 20 + 2  # column 1 starts here
    assert (under_first_row[:, :x0] == 255).all()  # an empty label: nothing drawn
    assert (under_first_row[:, x0:] < 128).any()  # the PSNRs
    under_second_row = grid[top + row_h + 2 + 20:top + 2 * row_h + 2]
    assert (under_second_row == 255).all()
