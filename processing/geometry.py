"""Resize and tiling arithmetic of the Idefics3 image processor (pure Python).

Every quotient is an IEEE double division and `int()` truncates, in the reference's order of
operations: exact rational arithmetic gives different sizes in rare cases (1185x4368 -> 394 wide, not 396).
Sizes are `(height, width)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_IMAGE_SIZE = 4096  # the reference's hard cap on the longest edge after step A


def resize_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Step A: longest edge -> `longest_edge` (also upscales); the short side is rounded up to even."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def cap_longest_edge(height: int, width: int, cap: int = MAX_IMAGE_SIZE) -> tuple[int, int]:
    """Step B: scale down so the longest edge is at most `cap` (no even rounding here)."""
    aspect = width / height
    if width >= height and width > cap:
        width = cap
        height = int(width / aspect)
    elif height > width and height > cap:
        height = cap
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def resized_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """Target of the first resize: steps A+B for `{"longest_edge"}`, or a fixed `{"height", "width"}`."""
    if size.get("longest_edge"):
        return cap_longest_edge(*resize_longest_edge(height, width, size["longest_edge"]))
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError(f"size must have 'longest_edge' or 'height' and 'width', got {size}")


def tile_grid_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Step C.2: both sides up to multiples of `tile`; the short side comes from the rounded-up long side."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def tile_counts(height: int, width: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of the tile grid, or (0, 0) when the image is a single tile (no global image)."""
    if height > tile or width > tile:
        return (height - tile) // tile + 1, (width - tile) // tile + 1
    return 0, 0


@dataclass(frozen=True)
class ImagePlan:
    """The successive resize targets of one image and its tile grid."""
    resize_to: tuple[int, int] | None   # step A/B target (None: no first resize)
    frame_source: tuple[int, int]       # size of the image that is tiled, or squashed to one frame
    rows: int
    cols: int

    @property
    def num_frames(self) -> int:
        return self.rows * self.cols + 1 if self.rows else 1


def plan_image(height: int, width: int, *, do_resize: bool, size: dict, do_image_splitting: bool,
               tile: int) -> ImagePlan:
    """All sizes the reference computes for one `(height, width)` input."""
    resize_to = resized_size(height, width, size) if do_resize else None
    height, width = resize_to or (height, width)
    if not do_image_splitting:
        return ImagePlan(resize_to, (tile, tile), 0, 0)
    grid = tile_grid_size(height, width, tile)
    return ImagePlan(resize_to, grid, *tile_counts(*grid, tile))


def number_of_image_patches(height: int, width: int, longest_edge: int, tile: int,
                            do_image_splitting: bool = True) -> tuple[int, int, int]:
    """The reference's token-budget helper: `(frames, rows, cols)`, `(0, 0, 0)` when unsplit.

    Deliberately keeps its quirks: step A always applies and the short side in step C is `ceil(h/tile)`
    of the step-A size (not the rescaled one), so it can disagree with real processing when
    `longest_edge` is not a multiple of `tile`.
    """
    if not do_image_splitting:
        return 0, 0, 0
    height, width = cap_longest_edge(*resize_longest_edge(height, width, longest_edge))
    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    if rows * tile > tile or cols * tile > tile:
        return rows * cols + 1, rows, cols
    return 0, 0, 0
