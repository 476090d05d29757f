"""Image inputs and settings shared by the parity tests and bench/compare_torch_backend.py.

Deterministic (seeded), natural-looking (smooth colour fields plus noise) so that resampling
differences between backends show up as they would on photos. Only numpy, torch and Pillow.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

SMALL = {"size": {"longest_edge": 72}, "max_image_size": {"longest_edge": 24}}   # L = 3m, like 1456 = 4*364
DEFAULT: dict = {}                                                               # L = 1456, m = 364


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth random colours plus fine noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, (height, width, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def pil(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 1)
    rgb = photo(width, height, seed)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (height, width), dtype=np.uint8)]), "RGBA")
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(rgb).convert("L"), Image.fromarray(rgb[..., 0])])
    if mode == "P+transparency":
        image = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=32)
        image.info["transparency"] = 3
        return image
    if mode == "RGB+transparency":  # an RGB PNG with a tRNS colour key
        image = Image.fromarray(rgb)
        buf = io.BytesIO()
        image.save(buf, "PNG", transparency=tuple(int(v) for v in rgb[0, 0]))
        return Image.open(io.BytesIO(buf.getvalue()))
    if mode == "I;16":
        return Image.frombytes("I;16", (width, height), (rgb[..., 0].astype("<u2") * 4).tobytes())
    if mode == "P":
        return Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=64)
    return Image.fromarray(rgb).convert(mode)


def cases() -> list[tuple[str, object, dict]]:
    """(name, images argument, processor kwargs) -- 40+ cases, mostly at small tile sizes."""
    hwc = photo(50, 34, 7)
    rgba = np.dstack([photo(40, 30, 8), np.random.default_rng(9).integers(0, 256, (30, 40), dtype=np.uint8)])
    return [
        ("1x1", pil(1, 1), SMALL),
        ("thin 300x2", pil(300, 2), SMALL),
        ("thin 2x300", pil(2, 300), SMALL),
        ("tile 24x24", pil(24, 24), SMALL),
        ("tile 24x24 no resize", pil(24, 24), {**SMALL, "do_resize": False}),
        ("tile+1 25x25 no resize", pil(25, 25), {**SMALL, "do_resize": False}),
        ("tile-1 23x23 no resize", pil(23, 23), {**SMALL, "do_resize": False}),
        ("tile+1 25x24", pil(25, 24), SMALL),
        ("tile-1 24x23", pil(24, 23), SMALL),
        ("large 400x300", pil(400, 300), SMALL),
        ("portrait 70x100", pil(70, 100), SMALL),
        ("RGBA", pil(40, 30, "RGBA"), SMALL),
        ("LA", pil(30, 40, "LA"), SMALL),
        ("P", pil(45, 31, "P"), SMALL),
        ("P+transparency", pil(45, 31, "P+transparency"), SMALL),
        ("RGB+transparency", pil(33, 29, "RGB+transparency"), SMALL),
        ("L", pil(37, 50, "L"), SMALL),
        ("CMYK", pil(41, 29, "CMYK"), SMALL),
        ("I;16", pil(41, 29, "I;16"), SMALL),
        ("1-bit", pil(41, 29, "1"), SMALL),
        ("numpy HWC", hwc, SMALL),
        ("numpy CHW", np.ascontiguousarray(hwc.transpose(2, 0, 1)), SMALL),
        ("torch CHW", torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1))), SMALL),
        ("torch HWC", torch.from_numpy(hwc), SMALL),
        ("numpy HWC RGBA", rgba, SMALL),
        ("numpy HW1 grey", hwc[..., :1].copy(), SMALL),
        ("numpy float [0,1]", hwc.astype(np.float32) / 255, {**SMALL, "do_rescale": False}),
        ("numpy float 0..255", hwc.astype(np.float64), SMALL),
        ("torch float [0,1] CHW", torch.from_numpy(hwc.transpose(2, 0, 1) / 255.0).float(),
         {**SMALL, "do_rescale": False}),
        ("batch 2/0/1", [[pil(40, 30, seed=1), pil(30, 40, seed=2)], [], [pil(24, 24, seed=3)]], SMALL),
        ("batch 1/3", [[pil(60, 20, seed=4)], [pil(20, 60, seed=5), pil(5, 5, seed=6), pil(90, 90, seed=7)]], SMALL),
        ("flat list = one sample", [pil(40, 30, seed=8), pil(24, 24, seed=9)], SMALL),
        ("no splitting", pil(100, 70), {**SMALL, "do_image_splitting": False}),
        ("L not a multiple of m", pil(100, 70), {"size": {"longest_edge": 50}, "max_image_size": {"longest_edge": 20}}),
        ("fixed height/width", pil(100, 70), {**SMALL, "size": {"height": 40, "width": 30}}),
        ("no resize, large", pil(100, 60), {**SMALL, "do_resize": False}),
        ("no pad", [[pil(40, 30)], [pil(40, 30, seed=3)]], {**SMALL, "do_pad": False}),
        ("no rescale, no normalize", pil(40, 30), {**SMALL, "do_rescale": False, "do_normalize": False}),
        ("no normalize", pil(40, 30), {**SMALL, "do_normalize": False}),
        ("custom mean/std", pil(40, 30), {**SMALL, "image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27]}),
        ("bicubic", pil(40, 30), {**SMALL, "resample": 3}),
        ("grey kept", pil(40, 30, "L"), {**SMALL, "do_convert_rgb": False, "do_normalize": False}),
        ("default 1000x700", pil(1000, 700), DEFAULT),
        ("default 300x1106 portrait", pil(300, 1106), DEFAULT),
    ]
