"""The torch recipe against its description (section 1.4): uint8 lanczos interpolate, float without
clamping, fused normalisation, BICUBIC off the CPU. (Bit-exactness against transformers' torch class
needs torchvision: bench/compare_torch_backend.py.)"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import processing.resample as resample
from processing.image_processor import Idefics3ImageProcessor, Idefics3ImageProcessorPil
from tests.processing.image_cases import SMALL, photo

torch.set_num_threads(1)
needs_lanczos = pytest.mark.skipif(not resample.torch_has_lanczos(), reason="this torch's interpolate has no lanczos")


def lanczos(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="lanczos", align_corners=False, antialias=True)[0]


def described_torch_recipe(chw_uint8: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The recipe written out for SMALL settings (L=72, m=24), a 40x30 (W x H) input: 3x3 tiles + global."""
    x = lanczos(chw_uint8, (54, 72))          # step A: int(72 / (40/30)) = 54, even
    x = lanczos(x, (72, 72))                  # step C: 54 -> 72 (multiple of 24)
    tiles = [x[:, r * 24:(r + 1) * 24, c * 24:(c + 1) * 24] for r in range(3) for c in range(3)]
    frames = torch.stack(tiles + [lanczos(x, (24, 24))])
    mean = torch.tensor([0.5, 0.5, 0.5]) * (1.0 / (1 / 255))
    std = torch.tensor([0.5, 0.5, 0.5]) * (1.0 / (1 / 255))
    return (frames.float() - mean.view(-1, 1, 1)) / std.view(-1, 1, 1), 3, 3


@needs_lanczos
def test_uint8_pipeline_is_the_described_recipe():
    hwc = photo(40, 30, 11)
    expected, rows, cols = described_torch_recipe(torch.from_numpy(hwc).permute(2, 0, 1).contiguous())
    out = Idefics3ImageProcessor(**SMALL)(hwc, return_row_col_info=True)
    assert out["rows"] == [[rows]] and out["cols"] == [[cols]]
    assert torch.equal(out["pixel_values"][0], expected)
    assert out["pixel_values"].min() >= -1 and out["pixel_values"].max() <= 1


@needs_lanczos
def test_float_inputs_are_resized_in_float_without_clamping():
    chw = torch.zeros(3, 30, 40)
    chw[:, :, 20:] = 1.0                                       # a hard edge makes lanczos ring
    out = Idefics3ImageProcessor(**SMALL)(chw, do_rescale=False)["pixel_values"]
    assert out.min() < -1.0 and out.max() > 1.0                # overshoot survives
    x = lanczos(lanczos(chw, (54, 72)), (72, 72))
    assert torch.equal(out[0, 0], (x[:, :24, :24] - 0.5) / 0.5)
    pil = Idefics3ImageProcessorPil(**SMALL)(chw, do_rescale=False, return_tensors="pt")["pixel_values"]
    assert pil.min() >= -1.0 and pil.max() <= 1.0              # the Pillow recipe quantises to uint8


@needs_lanczos
def test_geometry_identical_and_pixels_within_two_levels_of_pil_class():
    images = [[photo(97, 61, 1), photo(33, 80, 2)], [photo(24, 24, 3)]]
    t = Idefics3ImageProcessor(**SMALL)(images, return_row_col_info=True)
    p = Idefics3ImageProcessorPil(**SMALL)(images, return_row_col_info=True, return_tensors="pt")
    assert (t["rows"], t["cols"]) == (p["rows"], p["cols"])
    assert torch.equal(t["pixel_attention_mask"], p["pixel_attention_mask"])
    diff = (t["pixel_values"] - p["pixel_values"]).abs()
    # Usually <= 2 grey levels; on this noisy upscaled input transformers' own two classes differ by 3
    # (checked with torchvision installed, where ours equals transformers' torch class bit for bit).
    assert 0 < diff.max() <= 3 / 127.5 + 1e-6 and diff.mean() < 0.01


@needs_lanczos
def test_other_filters_and_rescale_only():
    hwc = photo(40, 30, 5)
    bicubic = Idefics3ImageProcessor(**SMALL)(hwc, resample=3)["pixel_values"]
    lanczos_out = Idefics3ImageProcessor(**SMALL)(hwc)["pixel_values"]
    assert not torch.equal(bicubic, lanczos_out)
    rescaled = Idefics3ImageProcessor(**SMALL)(hwc, do_normalize=False)["pixel_values"]
    assert torch.equal(rescaled, (lanczos_out * 127.5 + 127.5).round() * (1 / 255))
    with pytest.raises(ValueError, match="not available for tensors"):
        Idefics3ImageProcessor(**SMALL)(hwc, resample=4)


def test_device_option_cpu():
    hwc = photo(40, 30, 6)
    out = Idefics3ImageProcessor(**SMALL, device="cpu")(hwc)
    assert out["pixel_values"].device.type == "cpu"
    assert torch.equal(out["pixel_values"], Idefics3ImageProcessor(**SMALL)(hwc)["pixel_values"])


def test_a_torch_without_lanczos_falls_back_to_bicubic_with_a_warning(monkeypatch, caplog):
    """torch releases before lanczos refuse mode="lanczos" (seen with torch 2.11): every image of the torch
    recipe failed there; transformers' torch class takes BICUBIC then (torchvision < 0.27)."""
    real = F.interpolate

    def without_lanczos(*args, mode="nearest", **kwargs):
        if mode == "lanczos":
            raise ValueError("Anti-alias option is restricted to bilinear and bicubic modes and requires a 4-D tensor")
        return real(*args, mode=mode, **kwargs)

    monkeypatch.setattr(F, "interpolate", without_lanczos)
    monkeypatch.setattr(resample, "_has_lanczos", None)
    monkeypatch.setattr(resample, "_warned_bicubic", False)
    assert not resample.torch_has_lanczos()
    hwc = photo(40, 30, 8)
    with caplog.at_level(logging.WARNING):
        out = Idefics3ImageProcessor(**SMALL)(hwc)["pixel_values"]
    assert "BICUBIC" in caplog.text and "not in this torch" in caplog.text
    assert torch.equal(out, Idefics3ImageProcessor(**SMALL)(hwc, resample=3)["pixel_values"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_falls_back_to_bicubic_with_a_warning(caplog):
    resample._warned_bicubic = False
    hwc = photo(40, 30, 7)
    with caplog.at_level(logging.WARNING):
        out = Idefics3ImageProcessor(**SMALL)(hwc, device="cuda", return_row_col_info=True)
    assert "BICUBIC" in caplog.text and out["pixel_values"].device.type == "cuda"
    cpu = Idefics3ImageProcessor(**SMALL)(hwc, resample=3, return_row_col_info=True)   # bicubic on CPU
    assert out["rows"] == cpu["rows"] and torch.equal(out["pixel_attention_mask"].cpu(), cpu["pixel_attention_mask"])
    assert (out["pixel_values"].cpu() - cpu["pixel_values"]).abs().max() <= 2 / 127.5 + 1e-6


def test_box_and_hamming_pass_where_no_resize_is_needed():
    """As torchvision: a frame already of its size is not resized, whatever the filter."""
    square = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    assert torch.equal(resample.torch_resize(square, (24, 24), 4), square)
    out = Idefics3ImageProcessor(**SMALL)(square.permute(1, 2, 0).numpy(), resample=5, do_resize=False,
                                          do_image_splitting=False)["pixel_values"]
    assert out.shape == (1, 1, 3, 24, 24)
    with pytest.raises(ValueError, match="not available for tensors"):
        resample.torch_resize(square, (12, 12), 5)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_integer_types_torchvision_rounds_are_rounded_the_rest_truncated(dtype):
    torch.manual_seed(0)
    image = torch.randint(0, 30000, (3, 30, 40), dtype=torch.int32)
    resized = F.interpolate(image[None].float(), size=(20, 25), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.equal(resample.torch_resize(image.to(dtype), (20, 25), 2), resized.round().to(dtype))
    truncated = resample.torch_resize(image.to(torch.uint16), (20, 25), 2)
    assert torch.equal(truncated, resized.to(torch.uint16))
    assert not torch.equal(truncated, resized.round().to(torch.uint16))
    bits = image > 15000                                                # a 1-bit image: any coverage sets a pixel
    covered = F.interpolate(bits[None].float(), size=(20, 25), mode="bilinear", align_corners=False, antialias=True)[0]
    ones = resample.torch_resize(bits, (20, 25), 2)
    assert torch.equal(ones, covered != 0) and not torch.equal(ones, covered.round().bool())
