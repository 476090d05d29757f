"""`Idefics3ImageProcessorPil` (Pillow recipe) and `Idefics3ImageProcessor` (torch recipe).

One implementation of the parameters, the geometry (resize to the longest edge, round up to tiles,
row-major tiles + a global image), the batch padding and the outputs; the two classes differ only in
their backend: how an input becomes a working image, how it is resized, and the float recipe.

Each class means what the documentation's class of the same name means: checkpoints that name
`Idefics3ImageProcessor` and want the Pillow recipe (everything trained before the torch backend
existed) should load `Idefics3ImageProcessorPil`; `Idefics3Processor.from_pretrained(image_backend=...)`
makes that choice.

torch is imported by the torch backend's methods only: the Pillow recipe (the CPU stage's) runs
without it.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from .geometry import number_of_image_patches, plan_image
from .images import fetch_images, is_tensor, nest_images, prepare_for_pil, prepare_for_torch
from .pixels import lut_apply_torch, lut_for, lut_into_numpy, normalise_pil, normalise_torch
from .resample import pil_resize, pil_to_chw, resample_id, torch_resize
from .tokenizer import BatchEncoding

if TYPE_CHECKING:
    import torch

DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": 4 * 364}, "resample": 1,
    "do_image_splitting": True, "max_image_size": {"longest_edge": 364}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "do_pad": True, "return_row_col_info": False,
}
CALL_ONLY = ("return_tensors", "input_data_format", "device", "disable_grouping", "data_format")
# disable_grouping: how the reference's torch recipe batches same-sized images, not what they become
PROCESSOR_CONFIG, IMAGE_PROCESSOR_CONFIG = "processor_config.json", "preprocessor_config.json"


class BatchFeature(BatchEncoding):
    """A dict whose keys are also attributes (`out.pixel_values`) and `.to(device, dtype)`, like the
    reference's BatchFeature."""


def _size_dict(size: Any, name: str) -> dict:
    if isinstance(size, int):
        return {"height": size, "width": size}
    if not isinstance(size, dict) or not (size.get("longest_edge") or (size.get("height") and size.get("width"))):
        raise ValueError(f"{name} must be a dict with 'longest_edge' (or 'height' and 'width'), got {size!r}")
    return dict(size)


# ------------------------------------------------------------------------------------------ backends
class _PilBackend:
    """Working images are PIL images (uint8) or CHW numpy arrays (other dtypes); outputs are numpy."""
    name = "pil"

    @staticmethod
    def prepare(image, do_convert_rgb, input_data_format, device):
        return prepare_for_pil(image, do_convert_rgb, input_data_format)

    @staticmethod
    def size(image) -> tuple[int, int]:
        return (image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape[-2:])

    resize = staticmethod(pil_resize)

    @staticmethod
    def chw(image) -> np.ndarray:
        return pil_to_chw(image) if isinstance(image, Image.Image) else image

    @staticmethod
    def empty(shape, dtype, device) -> np.ndarray:
        return np.empty(shape, dtype=np.float32 if dtype == "float32" else np.uint8)

    @staticmethod
    def normalise_into(dst: np.ndarray, frame: np.ndarray, s: dict) -> None:
        lut = lut_for("pil", frame.shape[0], s["do_rescale"], s["rescale_factor"], s["do_normalize"],
                      s["image_mean"], s["image_std"]) if frame.dtype == np.uint8 else None
        if lut is not None:
            lut_into_numpy(dst, frame, lut)
        else:
            dst[...] = normalise_pil(frame, s["do_rescale"], s["rescale_factor"], s["do_normalize"],
                                     s["image_mean"], s["image_std"])

    @staticmethod
    def normalise(frame: np.ndarray, s: dict) -> np.ndarray:
        return normalise_pil(frame, s["do_rescale"], s["rescale_factor"], s["do_normalize"],
                             s["image_mean"], s["image_std"])

    @staticmethod
    def is_uint8(frame) -> bool:
        return frame.dtype == np.uint8

    @staticmethod
    def to_numpy(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def stack(frames: list) -> np.ndarray:
        return np.stack(frames)

    @staticmethod
    def mask_like(mask: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        return mask


class _TorchBackend:
    """Working images are CHW tensors (uint8 or float) on the processing device; outputs are tensors."""
    name = "torch"

    @staticmethod
    def prepare(image, do_convert_rgb, input_data_format, device):
        return prepare_for_torch(image, do_convert_rgb, input_data_format, device)

    @staticmethod
    def size(image) -> tuple[int, int]:
        return tuple(image.shape[-2:])

    resize = staticmethod(torch_resize)

    @staticmethod
    def chw(image: torch.Tensor) -> torch.Tensor:
        return image

    @staticmethod
    def empty(shape, dtype, device) -> torch.Tensor:
        import torch
        return torch.empty(shape, dtype=torch.float32, device=device)

    @staticmethod
    def normalise_into(dst: torch.Tensor, frame: torch.Tensor, s: dict) -> None:
        lut = lut_for("torch", frame.shape[0], s["do_rescale"], s["rescale_factor"], s["do_normalize"],
                      s["image_mean"], s["image_std"]) if _TorchBackend.is_uint8(frame) else None
        if lut is None:
            dst.copy_(normalise_torch(frame, s["do_rescale"], s["rescale_factor"], s["do_normalize"],
                                      s["image_mean"], s["image_std"]))
        elif dst.device.type == "cpu":
            lut_into_numpy(dst.numpy(), frame.numpy(), lut)
        else:
            dst.copy_(lut_apply_torch(frame, lut))

    @staticmethod
    def normalise(frame: torch.Tensor, s: dict) -> torch.Tensor:
        return normalise_torch(frame, s["do_rescale"], s["rescale_factor"], s["do_normalize"],
                               s["image_mean"], s["image_std"])

    @staticmethod
    def is_uint8(frame) -> bool:
        import torch
        return frame.dtype == torch.uint8

    @staticmethod
    def to_numpy(x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()

    @staticmethod
    def stack(frames: list) -> torch.Tensor:
        import torch
        return torch.stack(frames)

    @staticmethod
    def mask_like(mask: np.ndarray, pixels: torch.Tensor) -> torch.Tensor:
        import torch
        return torch.from_numpy(mask).to(pixels.device)


# --------------------------------------------------------------------------------------- processor
class _Idefics3ImageProcessorBase:
    backend: ClassVar[type]
    model_input_names = ["pixel_values", "pixel_attention_mask"]

    def __init__(self, device: str | torch.device | None = None, **kwargs: Any) -> None:
        for key, value in DEFAULTS.items():
            setattr(self, key, json.loads(json.dumps(value)))  # private copies of the dict defaults
        self.device = device
        self._update(self.__dict__, kwargs, strict=False)

    @property
    def recipe(self) -> str:
        """"pil" or "torch": the float recipe `frames_to_pixel_values` must use for this processor's frames."""
        return self.backend.name

    @staticmethod
    def _update(target: dict, kwargs: dict, strict: bool) -> None:
        for key, value in kwargs.items():
            if key not in DEFAULTS:
                if strict:
                    raise TypeError(f"unexpected image-processor argument {key!r}")
                continue  # config files carry class names and unrelated keys
            if key in ("size", "max_image_size"):
                value = _size_dict(value, key)
            elif key == "resample":
                value = resample_id(value)
            target[key] = value

    # ---------------------------------------------------------------- construction / serialisation
    @classmethod
    def from_dict(cls, config: dict, **kwargs: Any):
        return cls(**{**config, **kwargs})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any):
        """Read the nested `processor_config.json["image_processor"]`, else `preprocessor_config.json`."""
        return cls.from_dict(_read_config(str(path)), **kwargs)

    def to_dict(self) -> dict:
        out = {key: getattr(self, key) for key in DEFAULTS if key != "return_row_col_info"}
        return {"image_processor_type": type(self).__name__, **out}

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, IMAGE_PROCESSOR_CONFIG)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict())})"

    # ------------------------------------------------------------------------------------ settings
    def _settings(self, kwargs: dict) -> dict:
        s = {key: getattr(self, key) for key in DEFAULTS}
        self._update(s, {k: v for k, v in kwargs.items() if k not in CALL_ONLY}, strict=True)
        if kwargs.get("data_format") not in (None, "channels_first"):      # ChannelDimension.FIRST is that str
            raise ValueError(f"data_format={kwargs['data_format']!r} is not supported: pixel values are channels first")
        if s["do_rescale"] and s["rescale_factor"] is None:
            raise ValueError("rescale_factor must be given when do_rescale=True")
        if s["do_normalize"] and (s["image_mean"] is None or s["image_std"] is None):
            raise ValueError("image_mean and image_std must be given when do_normalize=True")
        s["tile"] = int(s["max_image_size"]["longest_edge"])
        return s

    # ---------------------------------------------------------------------------------- per image
    def _frames(self, image, s: dict) -> tuple[list, int, int]:
        """One working image -> its frames (CHW, not normalised), rows, cols."""
        be, m, resample = self.backend, s["tile"], s["resample"]
        plan = plan_image(*be.size(image), do_resize=s["do_resize"], size=s["size"],
                          do_image_splitting=s["do_image_splitting"], tile=m)
        if plan.resize_to is not None:
            image = be.resize(image, plan.resize_to, resample)
        image = be.resize(image, plan.frame_source, resample)  # the tile grid, or (m, m) when unsplit
        if not plan.rows:
            return [be.chw(image)], 0, 0
        whole = be.chw(image)
        tiles = [whole[:, r * m:(r + 1) * m, c * m:(c + 1) * m] for r in range(plan.rows) for c in range(plan.cols)]
        return tiles + [be.chw(be.resize(image, (m, m), resample))], plan.rows, plan.cols

    def image_to_frames(self, image, **kwargs: Any) -> tuple[np.ndarray, int, int]:
        """The fast path: one image -> (uint8 frames (n, C, m, m) numpy, rows, cols), not normalised."""
        s = self._settings(kwargs)
        working = self.backend.prepare(image, s["do_convert_rgb"], kwargs.get("input_data_format"), None)
        frames, rows, cols = self._frames(working, s)
        if not all(self.backend.is_uint8(f) for f in frames):
            raise ValueError("image_to_frames needs uint8 image data (PIL images or uint8 arrays); "
                             "use the processor's __call__ for float inputs")
        return np.stack([np.asarray(self.backend.to_numpy(f)) for f in frames]), rows, cols

    # -------------------------------------------------------------------------------------- batch
    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(self, images: Any, **kwargs: Any) -> BatchFeature:
        """Images (one, a list, or a list of lists per sample) -> pixel_values (+ mask, rows, cols)."""
        s = self._settings(kwargs)
        device = kwargs.get("device", self.device) if self.backend is _TorchBackend else None
        batch = nest_images(fetch_images(images))
        if not any(batch):
            raise ValueError("no images in the batch (every sample's image list is empty)")
        per_sample, rows, cols = [], [], []
        for sample in batch:
            prepared = [self.backend.prepare(im, s["do_convert_rgb"], kwargs.get("input_data_format"), device)
                        for im in sample]
            results = [self._frames(im, s) for im in prepared]
            per_sample.append([f for frames, _, _ in results for f in frames])
            rows.append([r for _, r, _ in results])
            cols.append([c for _, _, c in results])
        out = self._pad(per_sample, s, device) if s["do_pad"] else self._unpadded(per_sample, s, kwargs)
        if s["return_row_col_info"]:
            out["rows"], out["cols"] = rows, cols
        return _convert(out, kwargs.get("return_tensors"), self.backend)

    def _pad(self, per_sample: list[list], s: dict, device) -> BatchFeature:
        """Zero-pad to (B, max frames, C, max H, max W) and mark the valid pixels in the mask."""
        be, frames = self.backend, [f for sample in per_sample for f in sample]
        num_frames = max(len(sample) for sample in per_sample)
        channels = frames[0].shape[0]
        device = frames[0].device if be is _TorchBackend else None
        height, width = max(f.shape[-2] for f in frames), max(f.shape[-1] for f in frames)
        raw = not (s["do_rescale"] or s["do_normalize"])
        padded_frames = any(len(sample) < num_frames for sample in per_sample)
        keep_uint8 = be is _PilBackend and raw and not padded_frames and all(be.is_uint8(f) for f in frames)
        shape = (len(per_sample), num_frames, channels, height, width)
        # empty, not zeros: every element is written once below (zeros would clear 20 MB per image first)
        pixels = be.empty(shape, "uint8" if keep_uint8 else "float32", device)
        mask = np.empty((len(per_sample), num_frames, height, width), dtype=np.int64)
        for i, sample in enumerate(per_sample):
            for j, frame in enumerate(sample):
                h, w = frame.shape[-2:]
                if frame.shape[0] != channels:
                    raise ValueError(f"images of one batch have different channel counts ({frame.shape[0]} "
                                     f"and {channels}); keep do_convert_rgb=True")
                be.normalise_into(pixels[i, j, :, :h, :w], frame, s)
                _fill_padded(pixels[i, j], h, w, 0)
                mask[i, j, :h, :w] = 1
                _fill_padded(mask[i, j], h, w, 0)
            pixels[i, len(sample):] = 0
            mask[i, len(sample):] = 0
        return BatchFeature(pixel_values=pixels, pixel_attention_mask=be.mask_like(mask, pixels))

    def _unpadded(self, per_sample: list[list], s: dict, kwargs: dict) -> BatchFeature:
        values = [[self.backend.normalise(f, s) for f in sample] for sample in per_sample]
        if kwargs.get("return_tensors") in ("pt", "np"):
            shapes = {tuple(f.shape) for sample in values for f in sample} | {len(sample) for sample in values}
            if len(shapes) > 2:    # one frame shape and one count: a tensor; else ragged
                raise ValueError("do_pad=False with return_tensors: the images' frames differ in size or count "
                                 "between samples, which make no one tensor; pad (do_pad=True) or return lists "
                                 "(return_tensors=None)")
            values = self.backend.stack([self.backend.stack(sample) for sample in values])
        return BatchFeature(pixel_values=values)

    # ---------------------------------------------------------------------------------- utilities
    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None
                                    ) -> tuple[int, int, int]:
        """(frames, rows, cols) for token budgeting, with the reference's simplifications (see geometry)."""
        kw = images_kwargs or {}
        return number_of_image_patches(
            height, width, kw.get("size", self.size)["longest_edge"],
            kw.get("max_image_size", self.max_image_size)["longest_edge"],
            kw.get("do_image_splitting", self.do_image_splitting))


def _fill_padded(frame, height: int, width: int, value) -> None:
    """Set the padding of a (..., H, W) frame whose top-left (height, width) block holds the image."""
    frame[..., height:, :] = value
    frame[..., :height, width:] = value


def _convert(out: BatchFeature, return_tensors: str | None, backend) -> BatchFeature:
    if return_tensors not in (None, "pt", "np"):
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
    for key in ("pixel_values", "pixel_attention_mask"):
        value = out.get(key)
        if return_tensors == "pt" and isinstance(value, np.ndarray):
            import torch
            out[key] = torch.from_numpy(value)
        elif return_tensors == "np" and is_tensor(value):
            out[key] = backend.to_numpy(value)
    return out


def _read_config(path: str) -> dict:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if not os.path.isdir(path):
        if path.startswith((".", "/", "~")) or path.count("/") > 1:
            raise FileNotFoundError(f"no such checkpoint directory: {path}")
        from huggingface_hub import snapshot_download  # a hub id
        path = snapshot_download(path, allow_patterns=["*.json"])
    nested = os.path.join(path, PROCESSOR_CONFIG)
    if os.path.isfile(nested):
        with open(nested) as f:
            config = json.load(f)
        if isinstance(config.get("image_processor"), dict):
            return config["image_processor"]
    flat = os.path.join(path, IMAGE_PROCESSOR_CONFIG)
    if os.path.isfile(flat):
        with open(flat) as f:
            return json.load(f)
    raise FileNotFoundError(f"no {IMAGE_PROCESSOR_CONFIG} (nor an 'image_processor' entry in "
                            f"{PROCESSOR_CONFIG}) in {path}")


class Idefics3ImageProcessorPil(_Idefics3ImageProcessorBase):
    """The Pillow recipe: Pillow LANCZOS on uint8, float64 rescale then float32 normalise."""
    backend = _PilBackend


class Idefics3ImageProcessor(_Idefics3ImageProcessorBase):
    """The torch recipe: `interpolate(mode="lanczos", antialias=True)` on uint8 CHW tensors (BICUBIC off
    the CPU, with a warning), float inputs resized in float without clamping, fused rescale+normalise."""
    backend = _TorchBackend
