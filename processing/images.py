"""Input handling shared by both image processors: nesting, channel layout, RGB conversion.

Both recipes accept PIL images, numpy arrays and torch tensors (channels first or last). They differ
only where the reference's two backends differ (section 1.2 of the behaviour spec):
4-channel arrays are composited over white in float64 with rounding (Pillow recipe) or in float32 with
`floor(v * 255.999)` (torch recipe); PIL images go through Pillow's own conversion in both.

torch is imported by the torch recipe's functions only: the Pillow recipe (the CPU stage's) runs
without it, and a process that has not imported it holds no tensor.
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from .errors import ImageDecodeError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

ImageLike = Union[Image.Image, np.ndarray, "torch.Tensor"]
CHANNEL_COUNTS = (1, 3, 4)


def is_tensor(x: Any) -> bool:
    """Without importing torch (a CPU stage never does): no torch, or one another thread is still
    importing (no Tensor yet), made no tensor."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    return tensor is not None and isinstance(x, tensor)


def is_image(x: Any) -> bool:
    return isinstance(x, (Image.Image, np.ndarray)) or is_tensor(x)


# ----------------------------------------------------------------------------------------- strings
def load_image(source: str) -> Image.Image:
    """The reference's string loader: local path, `data:image/...;base64,` or bare base64.

    Like the reference: EXIF orientation applied, then `convert("RGB")` (which drops alpha without
    compositing). Remote URLs are not fetched: download them first.
    """
    if source.startswith(("http://", "https://")):
        raise ImageDecodeError(f"remote image URLs are not fetched by the processor: {source[:80]!r}")
    if os.path.isfile(source):
        with open(source, "rb") as f:
            data = f.read()
    else:
        payload = source.split(",", 1)[1] if source.startswith("data:image/") else source
        try:
            data = base64.b64decode(payload.encode(), validate=False)
        except (binascii.Error, ValueError) as e:
            raise ImageDecodeError(f"not an image path, data URL or base64 string: {source[:80]!r}") from e
    from .decode import decode_image  # decode imports this module for types only
    return decode_image(data, exif_transpose=True).convert("RGB")


def fetch_images(images: Any) -> Any:
    """Replace strings (paths, data URLs) by loaded images, keeping the nesting."""
    if isinstance(images, (list, tuple)):
        return [fetch_images(x) for x in images]
    if isinstance(images, str):
        return load_image(images)
    if is_image(images):
        return images
    raise TypeError(f"images must be PIL images, numpy arrays, torch tensors or paths, got {type(images).__name__}")


# ----------------------------------------------------------------------------------------- nesting
def _ndim(image: ImageLike) -> int | None:
    return None if isinstance(image, Image.Image) else image.ndim


def _is_image_list(items: Any) -> bool:
    return isinstance(items, (list, tuple)) and len(items) > 0 and all(is_image(x) for x in items)


def nest_images(images: Any) -> list[list[ImageLike]]:
    """Batch of samples of images: one image -> [[img]], a flat list -> one sample, lists of lists as is.

    A 4-D array/tensor is split along its first axis into the images of one sample; 2-D arrays are
    rejected (give (H, W, 1)).
    """
    if isinstance(images, (list, tuple)) and all(isinstance(x, (list, tuple)) for x in images) \
            and all(_is_image_list(x) or not x for x in images):
        return [list(x) for x in images]
    if _is_image_list(images):
        if _ndim(images[0]) in (None, 3):
            return [list(images)]
        if _ndim(images[0]) == 4:
            return [list(x) for x in images]
    if is_image(images):
        if _ndim(images) in (None, 3):
            return [[images]]
        if _ndim(images) == 4:
            return [list(images)]
    raise ValueError("Invalid input type. Must be a single image, a list of images, or a list of batches of "
                     "images (arrays and tensors must be 3-D: (H, W, C) or (C, H, W)).")


# ---------------------------------------------------------------------------------- channel layout
def infer_channels_first(shape: tuple[int, ...], input_data_format: str | None = None) -> bool:
    """Channel axis of a 3-D array: dim 0 in {1,3,4} wins (even if the last dim also is), else the last."""
    if input_data_format is not None:
        fmt = getattr(input_data_format, "value", input_data_format)
        if fmt not in ("channels_first", "channels_last"):
            raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {fmt!r}")
        return fmt == "channels_first"
    if len(shape) != 3:
        raise ValueError(f"Unsupported number of image dimensions: {len(shape)} (shape {tuple(shape)})")
    first, last = shape[0] in CHANNEL_COUNTS, shape[-1] in CHANNEL_COUNTS
    if first and last:
        logger.warning("The channel dimension is ambiguous for shape %s; assuming channels first. Pass "
                       "input_data_format to choose.", tuple(shape))
    if first or last:
        return first
    raise ValueError(f"Unable to infer the channel dimension of an image of shape {tuple(shape)}: "
                     "no axis of size 1, 3 or 4 at either end")


# ---------------------------------------------------------------------------------- RGB conversion
def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Pillow's RGB conversion; anything with alpha or a transparency key is composited over white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_unit_range(lo: float, hi: float) -> None:
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"The image to be converted to RGB contains values outside the range [0, 1], "
                         f"got [{lo}, {hi}].")


def array_to_rgb(image: np.ndarray, channels_first: bool) -> np.ndarray:
    """Pillow recipe for arrays: grey repeated, RGBA blended over white in float64 (rounded)."""
    hwc = np.moveaxis(image, 0, -1) if channels_first else image
    channels = hwc.shape[-1]
    if channels == 1:
        rgb = np.repeat(hwc, 3, axis=-1)
    elif channels == 4:
        is_int = np.issubdtype(hwc.dtype, np.integer)      # bool too is blended over 1.0, as the reference
        if not is_int:
            _check_unit_range(hwc.min(), hwc.max())
        white = 255 if is_int else 1.0
        alpha = hwc[..., 3:4] / white
        blend = alpha * hwc[..., :3] + (1 - alpha) * white
        rgb = np.round(blend).astype(hwc.dtype) if is_int else blend.astype(hwc.dtype)
    else:
        rgb = hwc
    return np.moveaxis(rgb, -1, 0) if channels_first else rgb


def tensor_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """Torch recipe for CHW tensors: grey repeated, RGBA blended in float32, back as floor(v * 255.999)."""
    import torch
    channels = image.shape[-3]
    if channels == 1:
        return image.repeat(3, 1, 1)
    if channels == 2:
        raise ValueError("cannot convert a 2-channel image to RGB; pass do_convert_rgb=False")
    if channels != 4:
        return image
    if image.is_floating_point():
        _check_unit_range(image.min().item(), image.max().item())
    hwc, dtype = image.movedim(-3, -1), image.dtype
    if dtype.is_floating_point:
        unit = hwc.to(torch.float32)
    else:
        unit = hwc.to(torch.float32).mul_(1.0 / torch.iinfo(dtype).max)
    rgb = unit[..., :3] * unit[..., 3:] + (1 - unit[..., 3:])
    if dtype.is_floating_point:
        rgb = rgb.to(dtype)
    else:
        rgb = rgb.mul(torch.iinfo(dtype).max + 1.0 - 1e-3).to(dtype)
    return rgb.movedim(-1, -3)


# ------------------------------------------------------------------------- per-recipe preparation
def _writable(array: np.ndarray) -> np.ndarray:
    # torch.from_numpy warns on read-only arrays (e.g. np.asarray of a PIL image); copy those.
    return array if array.flags.writeable else array.copy()


def prepare_for_pil(image: ImageLike, do_convert_rgb: bool, input_data_format: str | None = None
                    ) -> Image.Image | np.ndarray:
    """Pillow recipe: an RGB PIL image (the fast path) or a CHW numpy array of the input's dtype."""
    if isinstance(image, Image.Image):
        if do_convert_rgb:
            return pil_to_rgb(image)
        array = np.array(image)
        return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    array = image.detach().cpu().numpy() if is_tensor(image) else image
    if do_convert_rgb:
        array = array_to_rgb(array, infer_channels_first(array.shape, input_data_format))
    if array.ndim == 2:
        return array[None]
    return array if infer_channels_first(array.shape, input_data_format) else np.moveaxis(array, -1, 0)


def prepare_for_torch(image: ImageLike, do_convert_rgb: bool, input_data_format: str | None = None,
                      device: str | torch.device | None = None) -> torch.Tensor:
    """Torch recipe: a contiguous CHW tensor of the input's dtype, on `device`."""
    import torch
    if isinstance(image, Image.Image):
        array = np.array(pil_to_rgb(image)) if do_convert_rgb else np.array(image)
        tensor = torch.from_numpy(array)
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    else:
        tensor = torch.from_numpy(_writable(image)) if isinstance(image, np.ndarray) else image
        if tensor.ndim == 2:
            tensor = tensor[None]
        elif not infer_channels_first(tuple(tensor.shape), input_data_format):
            tensor = tensor.permute(2, 0, 1)
        if do_convert_rgb:
            tensor = tensor_to_rgb(tensor)
    tensor = tensor.contiguous()
    return tensor if device is None else tensor.to(device)
