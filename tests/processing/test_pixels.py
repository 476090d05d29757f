"""The uint8 fast path: image_to_frames + frames_to_pixel_values reproduce the processors bit for bit."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from processing.image_processor import Idefics3ImageProcessor, Idefics3ImageProcessorPil
from processing.pixels import (frames_to_pixel_values, image_to_frames, lut_into_numpy, normalisation_lut,
                               normalise_pil, normalise_torch)
from processing import resample
from processing.resample import pil_to_chw
from tests.processing.image_cases import SMALL, photo, pil

torch.set_num_threads(1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SETTINGS = [{}, {"image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27]}, {"do_normalize": False},
            {"rescale_factor": 1 / 127}]


def _frames_kwargs(settings: dict) -> dict:
    return {"rescale_factor": settings.get("rescale_factor", 1 / 255),
            "mean": settings.get("image_mean", (0.5, 0.5, 0.5)), "std": settings.get("image_std", (0.5, 0.5, 0.5)),
            "do_normalize": settings.get("do_normalize", True)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "clip-stats", "no-normalize", "rescale-1/127"])
@pytest.mark.parametrize("cls", [Idefics3ImageProcessorPil, Idefics3ImageProcessor])
@pytest.mark.parametrize("image", [pil(97, 61, "RGB", 1), pil(24, 24, "RGBA", 2), photo(5, 300, 3)],
                         ids=["rgb", "rgba-tile", "thin-array"])
def test_frames_to_pixel_values_is_bit_identical(cls, settings, device, image):
    proc = cls(**SMALL, **settings)
    frames, rows, cols = image_to_frames(image, proc)
    out = proc(image, return_row_col_info=True, return_tensors="pt")
    assert frames.dtype == np.uint8 and frames.shape == (out["pixel_values"].shape[1], 3, 24, 24)
    assert (rows, cols) == (out["rows"][0][0], out["cols"][0][0])
    values = frames_to_pixel_values(torch.from_numpy(frames), proc.recipe, device=device, **_frames_kwargs(settings))
    assert values.dtype == torch.float32 and values.device.type == device
    expected = out["pixel_values"][0]
    assert values.cpu().numpy().tobytes() == expected.numpy().tobytes()  # bit for bit, signed zeros too


@pytest.mark.parametrize("recipe", ["pil", "torch"])
def test_tables_equal_the_literal_recipes(recipe):
    values = torch.arange(256, dtype=torch.uint8).repeat(3, 7, 1)      # (3, 7, 256)
    table = normalisation_lut(recipe, 3)
    literal = normalise_pil(values.numpy(), True, 1 / 255, True, (0.5,) * 3, (0.5,) * 3) if recipe == "pil" else \
        normalise_torch(values, True, 1 / 255, True, (0.5,) * 3, (0.5,) * 3).numpy()
    assert literal[:, 0, :].tobytes() == table.tobytes()
    via_frames = frames_to_pixel_values(values[None], recipe)[0].numpy()
    assert via_frames.tobytes() == literal.tobytes()


def test_recipes_differ_in_the_last_bit():
    assert not np.array_equal(normalisation_lut("pil", 3), normalisation_lut("torch", 3))
    assert np.abs(normalisation_lut("pil", 3) - normalisation_lut("torch", 3)).max() < 1e-7


def test_frames_to_pixel_values_checks_its_input():
    with pytest.raises(TypeError, match="uint8"):
        frames_to_pixel_values(torch.zeros(1, 3, 4, 4), "pil")
    with pytest.raises(ValueError, match="recipe"):
        frames_to_pixel_values(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "tf")
    with pytest.raises(ValueError, match="image_mean"):
        frames_to_pixel_values(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), "pil")


def test_image_to_frames_needs_uint8_data():
    with pytest.raises(ValueError, match="uint8"):
        Idefics3ImageProcessorPil(**SMALL).image_to_frames(photo(30, 20).astype(np.float32) / 255)


def test_fast_path_saves_three_quarters_of_the_bytes():
    proc = Idefics3ImageProcessorPil()
    frames, rows, cols = proc.image_to_frames(pil(1000, 700))
    assert (rows, cols) == (3, 4) and frames.shape == (13, 3, 364, 364)
    assert frames.nbytes * 4 == proc(pil(1000, 700))["pixel_values"].nbytes


LUT_SETTINGS = [(True, 1 / 255, True, (0.5,) * 3, (0.5,) * 3),
                (True, 1 / 255, True, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                (True, 1 / 127, True, (0.1, 0.9, 0.5), (2.0, 0.3, 1.0)),
                (True, 1 / 255, False, (0.5,) * 3, (0.5,) * 3),
                (False, 1 / 255, True, (0.5, 0.2, 0.7), (0.5, 0.3, 0.1)),
                (True, 0.004, True, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))]


@pytest.mark.parametrize("recipe", ["pil", "torch"])
@pytest.mark.parametrize("settings", LUT_SETTINGS)
def test_table_application_equals_the_literal_recipe_on_every_value(recipe, settings):
    """All 256 values per channel, read through a strided HWC view as the processor does (4-byte pixels)."""
    hwc = np.zeros((2, 256, 4), dtype=np.uint8)
    hwc[..., :3] = np.arange(256, dtype=np.uint8)[None, :, None]
    hwc[1, :, :3] = hwc[1, ::-1, :3]
    frame = hwc[..., :3].transpose(2, 0, 1)                               # (3, 2, 256), not contiguous
    literal = normalise_pil(frame.copy(), *settings) if recipe == "pil" else \
        normalise_torch(torch.from_numpy(frame.copy()), *settings).numpy()
    out = np.full((3, 2, 256), np.nan, dtype=np.float32)
    lut_into_numpy(out, frame, normalisation_lut(recipe, 3, *settings))
    assert out.tobytes() == np.ascontiguousarray(literal, dtype=np.float32).tobytes()


@pytest.mark.parametrize("arrow", [True, False], ids=["arrow", "no-pyarrow"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "I;16"])
@pytest.mark.parametrize("size", [(1, 1), (97, 61), (2000, 2100)], ids=["1x1", "small", "multi-block"])
def test_pil_to_chw_equals_numpy(mode, size, arrow, monkeypatch):
    """Bands through Arrow views (Pillow's single-block images) or copies (multi-block, other modes)."""
    if not arrow:
        monkeypatch.setattr(resample, "pa", None)
    image = pil(*size, "RGBA", 3).convert(mode)
    hwc = np.asarray(image)
    expected = hwc[None] if hwc.ndim == 2 else hwc.transpose(2, 0, 1)
    chw = pil_to_chw(image)
    del image
    gc.collect()
    assert chw.dtype == expected.dtype and np.array_equal(chw, expected)


def test_unpadded_uint8_frames_are_private_copies():
    image = pil(24, 24, "RGB", 4)  # already tile-sized: no resize, the working image is the input
    frames = Idefics3ImageProcessorPil(**SMALL, do_pad=False, do_rescale=False, do_normalize=False,
                                       do_resize=False, do_image_splitting=False)(image)["pixel_values"][0]
    assert all(f.flags.writeable and f.dtype == np.uint8 for f in frames)
