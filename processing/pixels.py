"""The float recipes: uint8 frames -> normalised float32 pixel values, bit-identical to each reference backend.

Pillow recipe: `y = float32(float64(x) * rescale_factor)`, then `(y - mean) / std` in float32.
Torch recipe (fused): `(float32(x) - mean/rescale_factor) / (std/rescale_factor)` in float32, with
`mean/rescale_factor` computed in float32 as `tensor(mean) * (1.0 / rescale_factor)`.

For uint8 frames each recipe is a function of (channel, value) only, so it is tabulated once in a
256-entry lookup table per channel, computed on the CPU with the reference's own operations: applying
the table is exact on every device, and faster than the float arithmetic. Non-uint8 frames (float
inputs) go through the literal operations.

torch is imported by the torch recipe's functions only (the CPU stage's Pillow recipe runs without it).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

Recipe = Literal["pil", "torch"]
RECIPES = ("pil", "torch")


def _per_channel(values: float | Sequence[float], channels: int, name: str) -> tuple:
    if isinstance(values, (int, float)):
        return (values,) * channels
    values = tuple(values)
    if len(values) != channels:
        raise ValueError(f"{name} must have {channels} elements (one per channel), got {len(values)}")
    return values


# ------------------------------------------------------------------------------ literal operations
def normalise_pil(frame: np.ndarray, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                  mean, std) -> np.ndarray:
    """The Pillow backend's rescale then normalise on a CHW numpy frame (any dtype)."""
    if do_rescale:
        frame = (frame.astype(np.float64) * rescale_factor).astype(np.float32)
    if do_normalize:
        if not np.issubdtype(frame.dtype, np.floating):
            frame = frame.astype(np.float32)
        channels = frame.shape[0]
        mean = np.array(_per_channel(mean, channels, "image_mean"), dtype=frame.dtype)[:, None, None]
        std = np.array(_per_channel(std, channels, "image_std"), dtype=frame.dtype)[:, None, None]
        frame = (frame - mean) / std
    return frame


def normalise_torch(frame: torch.Tensor, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                    mean, std) -> torch.Tensor:
    """The torch backend's fused rescale+normalise on a (..., C, H, W) tensor (any dtype)."""
    import torch
    if do_normalize:
        channels = frame.shape[-3]
        mean, std = _per_channel(mean, channels, "image_mean"), _per_channel(std, channels, "image_std")
        if do_rescale:  # fold the rescale into mean and std, as the reference does
            mean = torch.tensor(mean) * (1.0 / rescale_factor)
            std = torch.tensor(std) * (1.0 / rescale_factor)
        mean = torch.as_tensor(mean, dtype=torch.float32, device=frame.device).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32, device=frame.device).view(-1, 1, 1)
        return (frame.to(torch.float32) - mean) / std
    if do_rescale:
        return frame * rescale_factor
    return frame


# ------------------------------------------------------------------------------------ lookup tables
@lru_cache(maxsize=64)
def normalisation_lut(recipe: Recipe, channels: int, do_rescale: bool = True, rescale_factor: float = 1 / 255,
                      do_normalize: bool = True, mean: tuple = (0.5, 0.5, 0.5),
                      std: tuple = (0.5, 0.5, 0.5)) -> np.ndarray | None:
    """(channels, 256) float32 table of the recipe for uint8 input, or None when nothing is applied."""
    if not (do_rescale or do_normalize):
        return None
    values = np.tile(np.arange(256, dtype=np.uint8), (channels, 1))[:, None, :]  # a (C, 1, 256) "image"
    if recipe == "pil":
        table = normalise_pil(values, do_rescale, rescale_factor, do_normalize, mean, std)
    elif recipe == "torch":
        import torch
        table = normalise_torch(torch.from_numpy(values), do_rescale, rescale_factor, do_normalize,
                                mean, std).numpy()
    else:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    table = np.ascontiguousarray(table[:, 0, :], dtype=np.float32)
    table.setflags(write=False)
    return table


def _hashable(values) -> tuple | float:
    return values if isinstance(values, (int, float)) else tuple(values)


def lut_for(recipe: Recipe, channels: int, do_rescale: bool, rescale_factor: float, do_normalize: bool,
            mean, std) -> np.ndarray | None:
    return normalisation_lut(recipe, channels, bool(do_rescale), float(rescale_factor), bool(do_normalize),
                             _hashable(mean), _hashable(std))


@lru_cache(maxsize=64)
def _two_op_form(lut_bytes: bytes, channels: int) -> tuple[str, np.ndarray, np.ndarray] | None:
    """A float32 two-operation formula that reproduces the table exactly on all 256 values, if any.

    Two vectorised ufunc passes beat a table gather (which needs an intp copy of the indices); the
    formula is only used when it equals the table everywhere, so results stay bit-identical.
    """
    lut = np.frombuffer(lut_bytes, dtype=np.float32).reshape(channels, 256)
    x = np.arange(256, dtype=np.float32)
    # the table is affine in x: recover its scale and offset from the end points, in float64
    slope = (lut[:, 255].astype(np.float64) - lut[:, 0]) / 255
    for kind in ("div-sub", "sub-div"):
        if kind == "div-sub":   # x / a - b      (Pillow recipe with the usual mean/std)
            a, b = (1 / slope).astype(np.float32), (-lut[:, 0].astype(np.float64)).astype(np.float32)
            got = x[None] / a[:, None] - b[:, None]
        else:                   # (x - b) / a    (torch recipe)
            a = (1 / slope).astype(np.float32)
            b = (-lut[:, 0].astype(np.float64) / slope).astype(np.float32)
            got = (x[None] - b[:, None]) / a[:, None]
        if np.all(slope > 0) and got.astype(np.float32).tobytes() == lut.tobytes():  # signed zeros too
            return kind, a, b
    return None


def lut_into_numpy(dst: np.ndarray, frame: np.ndarray, lut: np.ndarray) -> None:
    """dst[c] = lut[c][frame[c]] for a CHW uint8 frame (by an exact two-op formula when there is one)."""
    form = _two_op_form(lut.tobytes(), lut.shape[0])
    for c in range(frame.shape[0]):
        if form is not None:
            # uint8 -> float32 is exact; a plain casting copy then two in-place float32 passes beats
            # ufuncs that cast their (strided) uint8 input through a buffer
            kind, a, b = form
            dst[c] = frame[c]
            if kind == "div-sub":
                np.divide(dst[c], a[c], out=dst[c])
                np.subtract(dst[c], b[c], out=dst[c])
            else:
                np.subtract(dst[c], b[c], out=dst[c])
                np.divide(dst[c], a[c], out=dst[c])
        elif dst[c].flags.c_contiguous:
            np.take(lut[c], frame[c], out=dst[c], mode="clip")
        else:
            dst[c] = lut[c][frame[c]]


def lut_apply_torch(frames: torch.Tensor, lut: np.ndarray) -> torch.Tensor:
    """lut[c][frames[..., c, :, :]] on the frames' device (a gather, exact everywhere)."""
    import torch
    channels = frames.shape[-3]
    table = torch.from_numpy(lut).to(frames.device).reshape(-1)
    offsets = (torch.arange(channels, device=frames.device) * 256).view(channels, 1, 1)
    return table[frames.long() + offsets]


# -------------------------------------------------------------------------------------- public API
def frames_to_pixel_values(frames_uint8: torch.Tensor | np.ndarray, recipe: Recipe = "pil",
                           rescale_factor: float = 1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                           device: str | torch.device | None = None, *, do_rescale: bool = True,
                           do_normalize: bool = True) -> torch.Tensor:
    """uint8 frames (n, C, m, m) -> float32 pixel values on `device`, bit-identical to the processor.

    Move the uint8 frames first (4x fewer bytes), then expand them on the target device.
    """
    import torch
    frames = torch.as_tensor(frames_uint8)
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim < 3:
        raise ValueError(f"frames must be (..., C, H, W), got shape {tuple(frames.shape)}")
    frames = frames.to(device) if device is not None else frames
    lut = lut_for(recipe, frames.shape[-3], do_rescale, rescale_factor, do_normalize, mean, std)
    if lut is None:
        return frames.to(torch.float32)
    if frames.device.type == "cpu":
        out = np.empty(tuple(frames.shape), dtype=np.float32)
        flat_in, flat_out = frames.reshape(-1, *frames.shape[-3:]).numpy(), out.reshape(-1, *frames.shape[-3:])
        for src, dst in zip(flat_in, flat_out):
            lut_into_numpy(dst, src, lut)
        return torch.from_numpy(out)
    return lut_apply_torch(frames, lut)


def image_to_frames(image, processor) -> tuple[np.ndarray, int, int]:
    """One image -> (uint8 frames (n, 3, m, m), rows, cols) with `processor`'s settings, not normalised.

    `processor` is an `Idefics3ImageProcessor` or `Idefics3ImageProcessorPil`; its resampler is used.
    Turn the frames into pixel values with `frames_to_pixel_values(frames, recipe=processor.recipe, ...)`.
    """
    return processor.image_to_frames(image)
