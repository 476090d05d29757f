"""The two resamplers: Pillow (uint8 through PIL images) and torch `interpolate` (uint8 or float CHW).

Pillow recipe: every resize goes through a PIL image. uint8 data is used as is; other arrays must be
integer-valued in 0..255 (cast to uint8) or in [0, 1] (truncated to uint8 after x255, resized, then
multiplied back by 1/255) -- so float inputs are quantised at every resize, even to the same size.

Torch recipe: `interpolate(antialias=True)` directly on uint8 CHW tensors on CPU (native uint8 kernels
for lanczos/bicubic), in float without clamping for float inputs; a resize to the current size is
skipped. Off the CPU, or with a torch whose interpolate lacks it, LANCZOS falls back to BICUBIC with a
warning, as in the reference.
torch is imported by the torch recipe's functions only (the CPU stage's Pillow recipe runs without it).
"""
from __future__ import annotations

import functools
import logging
import platform
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

try:  # zero-copy access to Pillow's pixels (a runtime dependency; without it, pixels are copied)
    import pyarrow as pa
except ImportError:
    pa = None

logger = logging.getLogger(__name__)

# PIL enum value -> torch interpolate mode (the reference maps NEAREST to nearest-exact).
TORCH_MODES = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_NAMES = {"nearest": 0, "nearest-exact": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def resample_id(resample: int | str | Image.Resampling) -> int:
    """Normalise a PIL enum, its int value or a mode name to the PIL int value."""
    if isinstance(resample, str):
        key = resample.lower()
        if key not in _NAMES:
            raise ValueError(f"unknown resample {resample!r}; expected one of {sorted(_NAMES)}")
        return _NAMES[key]
    value = int(getattr(resample, "value", resample))
    if value not in TORCH_MODES:
        raise ValueError(f"unknown resample {resample!r}; expected a PIL resampling filter 0..5")
    return value


# ------------------------------------------------------------------------------------------ Pillow
def _needs_unit_rescale(array: np.ndarray) -> bool:
    """True for [0, 1] data that must be scaled by 255; False for integer-valued 0..255 data."""
    if array.dtype == np.uint8:
        return False
    if np.allclose(array, array.astype(int)):
        if np.all(array >= 0) and np.all(array <= 255):
            return False
        raise ValueError("The image to be converted to a PIL image contains values outside the range "
                         f"[0, 255], got [{array.min()}, {array.max()}] which cannot be converted to uint8.")
    if np.all(array >= 0) and np.all(array <= 1):
        return True
    raise ValueError("The image to be converted to a PIL image contains values outside the range [0, 1], "
                     f"got [{array.min()}, {array.max()}] which cannot be converted to uint8.")


def _chw_to_pil(array: np.ndarray, unit_rescale: bool) -> Image.Image:
    hwc = np.moveaxis(array, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    if unit_rescale:
        hwc = (hwc.astype(np.float64) * 255).astype(np.float32)
    return Image.fromarray(hwc.astype(np.uint8))


def _band_pixels(band: Image.Image) -> np.ndarray:
    """(H, W) uint8 pixels of an 8-bit band: a zero-copy view through the Arrow C data interface, or a copy.

    Pillow exports single-block images without copying (Pillow >= 11.2); `np.asarray` copies twice.
    """
    if pa is not None and hasattr(band, "__arrow_c_array__"):
        try:
            array = pa.array(band)
        except (ValueError, TypeError):  # pixels in several memory blocks (large images)
            array = None
        if array is not None and array.offset == 0:
            return np.frombuffer(array.buffers()[1], np.uint8, count=len(array)).reshape(band.height, band.width)
    return np.asarray(band)


def pil_to_chw(image: Image.Image) -> np.ndarray:
    """A CHW copy of a PIL image's pixels, tile rows contiguous.

    For 8-bit images Pillow splits the bands (fast C), numpy stacks views of them: one pass, versus two
    copies through `tobytes` plus a slow byte-strided transpose for every tile taken from an HWC array.
    """
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return np.stack([_band_pixels(band) for band in image.split()])
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def pil_resize(image: Image.Image | np.ndarray, size: tuple[int, int], resample: int
               ) -> Image.Image | np.ndarray:
    """Resize to `size` = (height, width) with Pillow; uint8 stays a PIL image (no round trip to numpy)."""
    height, width = size
    if isinstance(image, Image.Image):
        return image if image.size == (width, height) else image.resize((width, height), resample)
    if image.dtype == np.uint8:
        if image.shape[-2:] == (height, width):
            return image
        return _chw_to_pil(image, False).resize((width, height), resample)
    unit_rescale = _needs_unit_rescale(image)
    resized = _chw_to_pil(image, unit_rescale).resize((width, height), resample)
    if not unit_rescale:
        return resized
    return (pil_to_chw(resized).astype(np.float64) * (1 / 255)).astype(np.float32)


# ------------------------------------------------------------------------------------------- torch
_warned_bicubic = False
_has_lanczos: bool | None = None


def torch_has_lanczos() -> bool:
    """Whether this torch's `interpolate` has mode="lanczos" (recent releases only: older ones refuse
    it, as transformers' torch class does with torchvision < 0.27)."""
    global _has_lanczos
    if _has_lanczos is None:
        import torch
        import torch.nn.functional as F
        try:
            for dtype in (torch.uint8, torch.float32):
                F.interpolate(torch.zeros(1, 1, 4, 4, dtype=dtype), size=[2, 2], mode="lanczos", antialias=True)
            _has_lanczos = True
        except (ValueError, NotImplementedError, RuntimeError):
            _has_lanczos = False
    return _has_lanczos


def _warn_bicubic_once(why: str) -> None:
    global _warned_bicubic
    if not _warned_bicubic:
        logger.warning("LANCZOS resampling of tensors %s: falling back to BICUBIC, like the reference. Use the "
                       "Pillow recipe (or device='cpu' with a torch that has it) to match the checkpoint's "
                       "preprocessing exactly.", why)
        _warned_bicubic = True


def _native_uint8(mode: str, device: torch.device) -> bool:
    if mode == "nearest-exact":
        return True
    if device.type != "cpu":
        return False
    if mode == "bilinear":  # torch's uint8 bilinear kernel is vectorised only on these CPUs
        import torch
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or \
            platform.machine() in ("aarch64", "arm64")
    return mode in ("bicubic", "lanczos")


def torch_mode(resample: int, device: torch.device) -> str:
    mode = TORCH_MODES[resample]
    if mode in ("box", "hamming"):
        raise ValueError(f"resample={mode!r} is not available for tensors; use the Pillow recipe")
    if mode == "lanczos" and device.type != "cpu":
        _warn_bicubic_once("is only implemented on CPU")
        return "bicubic"
    if mode == "lanczos" and not torch_has_lanczos():
        import torch
        _warn_bicubic_once(f"is not in this torch ({torch.__version__})")
        return "bicubic"
    return mode


@functools.cache
def _rounded_dtypes() -> frozenset:
    """The integer types torchvision rounds back to after resizing (uint16, bool and the rest: truncated)."""
    import torch
    return frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def torch_resize(image: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """Resize a (..., C, H, W) tensor to `size`; identity sizes are returned untouched."""
    import torch
    import torch.nn.functional as F
    *lead, channels, height, width = image.shape
    if (height, width) == tuple(size) or image.numel() == 0:
        return image            # before the mode's check, as the reference: box and hamming need no resize here
    mode = torch_mode(resample, image.device)
    smooth = mode in ("bilinear", "bicubic", "lanczos")
    batch = image.reshape(-1, channels, height, width)
    dtype = image.dtype
    cast = not (dtype in (torch.float32, torch.float64) or (dtype == torch.uint8 and _native_uint8(mode, image.device)))
    if cast:
        batch = batch.to(torch.float32)
    out = F.interpolate(batch, size=list(size), mode=mode, align_corners=False if smooth else None,
                        antialias=smooth)
    if cast:
        if mode in ("bicubic", "lanczos") and dtype == torch.uint8:
            out = out.clamp_(0, 255)
        if dtype in _rounded_dtypes():
            out = out.round_()
        out = out.to(dtype)
    return out.reshape(*lead, channels, *size)
