"""Parity of Idefics3ImageProcessorPil with transformers' Idefics3ImageProcessorPil, and the torch recipe
against its description (same geometry as the Pillow class, pixels within 2/127.5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from processing.image_processor import Idefics3ImageProcessor, Idefics3ImageProcessorPil
from tests.processing.image_cases import cases

torch.set_num_threads(1)
CASES = cases()
IDS = [name for name, _, _ in CASES]


@pytest.fixture(scope="module")
def reference_pil():
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Ref
    return Ref


def _as_numpy(value):
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, list):
        return [_as_numpy(v) for v in value]
    return np.asarray(value)


def assert_same_output(ours, ref, atol=1e-6):
    assert set(ours) == set(ref), (set(ours), set(ref))
    assert ours["rows"] == ref["rows"] and ours["cols"] == ref["cols"]
    if "pixel_attention_mask" in ref:
        mask, ref_mask = _as_numpy(ours["pixel_attention_mask"]), _as_numpy(ref["pixel_attention_mask"])
        assert mask.dtype == ref_mask.dtype == np.int64 and np.array_equal(mask, ref_mask)
    ours_pv, ref_pv = ours["pixel_values"], ref["pixel_values"]
    if isinstance(ref_pv, list):  # do_pad=False without return_tensors: per-sample lists of frames
        assert [len(s) for s in ours_pv] == [len(s) for s in ref_pv]
        pairs = [(a, b) for sa, sb in zip(ours_pv, ref_pv) for a, b in zip(sa, sb)]
    else:
        pairs = [(ours_pv, ref_pv)]
    for a, b in pairs:
        a, b = _as_numpy(a), _as_numpy(b)
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=0, atol=atol)


@pytest.mark.parametrize("name,images,kwargs", CASES, ids=IDS)
def test_pil_class_matches_reference(reference_pil, name, images, kwargs):
    call = {"return_row_col_info": True, "return_tensors": None if name == "no pad" else "np"}
    ref = reference_pil(**kwargs)(images, **call)
    ours = Idefics3ImageProcessorPil(**kwargs)(images, **call)
    assert_same_output(ours, ref)
    # the same settings given at call time instead of construction
    assert_same_output(Idefics3ImageProcessorPil()(images, **kwargs, **call), ref)


def test_pil_class_exact_on_uint8(reference_pil):
    """On uint8 inputs the Pillow recipe is bit-exact, not just within 1e-6."""
    name, images, kwargs = CASES[IDS.index("large 400x300")]
    ref = reference_pil(**kwargs)(images, return_tensors="np")
    ours = Idefics3ImageProcessorPil(**kwargs)(images, return_tensors="np")
    assert np.array_equal(ours["pixel_values"], ref["pixel_values"])


@pytest.mark.parametrize("name,images,kwargs", [c for c in CASES if c[0] != "no pad"],
                         ids=[i for i in IDS if i != "no pad"])
def test_torch_class_geometry_and_pixels_near_pil_class(name, images, kwargs):
    call = {"return_row_col_info": True}
    pil_out = Idefics3ImageProcessorPil(**kwargs)(images, return_tensors="np", **call)
    torch_out = Idefics3ImageProcessor(**kwargs)(images, **call)
    assert isinstance(torch_out["pixel_values"], torch.Tensor)  # tensors even with return_tensors=None
    assert torch_out["pixel_values"].dtype == torch.float32
    assert torch_out["rows"] == pil_out["rows"] and torch_out["cols"] == pil_out["cols"]
    assert np.array_equal(torch_out["pixel_attention_mask"].numpy(), pil_out["pixel_attention_mask"])
    a, b = torch_out["pixel_values"].numpy(), pil_out["pixel_values"].astype(np.float32)
    assert a.shape == b.shape
    if "float" in name:  # float inputs: resized in float (no clamp) vs quantised by Pillow
        return
    grey = 1 / 255 if kwargs.get("do_rescale", True) else 1.0  # one grey level in output units
    if kwargs.get("do_normalize", True):
        grey /= min(kwargs.get("image_std", [0.5]))
    # RGBA arrays are composited differently (227 vs 228 for c=200, a=128): one more grey level
    levels = 3 if "RGBA" in name and "numpy" in name else 2
    assert np.abs(a - b).max() <= levels * grey + 1e-5, (name, np.abs(a - b).max() / grey)


@pytest.mark.parametrize("name,images,kwargs", [c for c in CASES if c[0] != "no pad"],
                         ids=[i for i in IDS if i != "no pad"])
def test_torch_class_matches_reference_torch_class(name, images, kwargs):
    """Runs where torchvision loads (see bench/compare_torch_backend.py); skipped in the CPU-only venv."""
    pytest.importorskip("torchvision")
    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor as RefTorch
    call = {"return_row_col_info": True, "return_tensors": "pt"}
    assert_same_output(Idefics3ImageProcessor(**kwargs)(images, **call), RefTorch(**kwargs)(images, **call))
