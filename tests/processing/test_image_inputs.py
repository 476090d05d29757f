"""Input forms, nesting, channel layout, config loading and output types of both image processors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from processing.image_processor import Idefics3ImageProcessor, Idefics3ImageProcessorPil
from tests.processing.image_cases import SMALL, photo, pil

BOTH = [Idefics3ImageProcessorPil, Idefics3ImageProcessor]


@pytest.fixture(scope="module")
def ref_cls():
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Ref
    return Ref


def _pv(out):
    value = out["pixel_values"]
    return value.numpy() if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("cls", BOTH)
def test_same_pixels_for_pil_numpy_torch_hwc_chw(cls):
    hwc = photo(50, 34, 3)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    forms = [Image.fromarray(hwc), hwc, chw, torch.from_numpy(hwc), torch.from_numpy(chw),
             chw.transpose(1, 2, 0)]  # a non-contiguous HWC view
    outs = [_pv(cls(**SMALL)(x, return_tensors="np")) for x in forms]
    for out in outs[1:]:
        assert np.array_equal(out, outs[0])


@pytest.mark.parametrize("cls", BOTH)
def test_nesting_errors(cls):
    proc = cls(**SMALL)
    with pytest.raises(ValueError, match="no images"):
        proc([[], []])
    with pytest.raises(ValueError, match="Invalid input type"):
        proc(np.zeros((30, 40), np.uint8))            # 2-D arrays are rejected
    with pytest.raises(TypeError):
        proc(42)
    with pytest.raises(TypeError, match="unexpected"):
        proc(pil(30, 20), do_magic=True)


@pytest.mark.parametrize("cls", BOTH)
def test_4d_array_is_one_sample(cls, ref_cls):
    stack = np.stack([photo(40, 30, 1), photo(40, 30, 2)])
    out = cls(**SMALL)(stack, return_row_col_info=True, return_tensors="np")
    ref = ref_cls(**SMALL)(stack, return_row_col_info=True, return_tensors="np")
    assert out["rows"] == ref["rows"] == [[3, 3]]
    assert _pv(out).shape == ref["pixel_values"].shape


def test_ambiguous_layout_reads_channels_first(ref_cls):
    image = photo(500, 3, 4)                          # HWC (3, 500, 3): ambiguous
    out = Idefics3ImageProcessorPil(**SMALL)(image, return_row_col_info=True, return_tensors="np")
    ref = ref_cls(**SMALL)(image, return_row_col_info=True, return_tensors="np")
    assert out["rows"] == ref["rows"] and np.array_equal(out["pixel_values"], ref["pixel_values"])
    hinted = Idefics3ImageProcessorPil()(photo(3000, 3, 5), input_data_format="channels_last", return_row_col_info=True)
    assert (hinted["rows"], hinted["cols"]) == ([[1]], [[4]])
    ambiguous = Idefics3ImageProcessorPil()(photo(3, 3000, 5)[..., :3], input_data_format="channels_last",
                                            return_row_col_info=True)
    assert (ambiguous["rows"], ambiguous["cols"]) == ([[4]], [[1]])


def test_uint16_arrays_pil_errors_torch_passes_raw():
    image = (photo(20, 10).astype(np.uint16) * 200)
    with pytest.raises(ValueError, match="outside the range"):
        Idefics3ImageProcessorPil(**SMALL)(image)
    out = Idefics3ImageProcessor(**SMALL)(image, do_resize=False, do_image_splitting=False, do_rescale=False,
                                          do_normalize=False)
    assert out["pixel_values"].max() > 255                     # raw values, no scaling


def test_rgba_array_composite_differs_by_one_between_recipes():
    pixel = np.array([[[200, 200, 200, 128]]], np.uint8).repeat(24, 0).repeat(24, 1)
    kw = dict(do_resize=False, do_image_splitting=False, do_rescale=False, do_normalize=False, **SMALL)
    assert Idefics3ImageProcessorPil(**kw)(pixel)["pixel_values"].max() == 227
    assert Idefics3ImageProcessor(**kw)(pixel)["pixel_values"].max() == 228
    assert Idefics3ImageProcessorPil(**kw)(Image.fromarray(pixel, "RGBA"))["pixel_values"].max() == 227


def test_a_bool_rgba_array_is_blended_over_one_as_the_reference(ref_cls):
    array = np.zeros((5, 5, 4), dtype=bool)
    array[..., 3] = True                    # opaque black, but for one transparent pixel
    array[0, 0] = False
    kw = dict(size={"longest_edge": 5}, max_image_size={"longest_edge": 5}, do_rescale=False, do_normalize=False)
    expected = ref_cls(**kw)(array, return_tensors="np")["pixel_values"]
    assert np.array_equal(Idefics3ImageProcessorPil(**kw)(array, return_tensors="np")["pixel_values"], expected)
    assert expected[0, 0, 0].sum() < expected[0, 0, 0].size       # not all white


@pytest.mark.parametrize("cls", BOTH)
def test_unpadded_frames_of_different_counts_as_one_tensor_are_refused_with_the_way_out(cls):
    images = [[pil(40, 30)], [pil(30, 24, seed=1), pil(24, 24, seed=2)]]
    with pytest.raises(ValueError, match="do_pad=False with return_tensors: .*return_tensors=None"):
        cls(**SMALL)(images, do_pad=False, return_tensors="np")


def test_string_inputs_use_the_path_loader(tmp_path, ref_cls):
    path = tmp_path / "a.png"
    rgba = np.dstack([photo(30, 20), np.full((20, 30), 100, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(path)
    ours = Idefics3ImageProcessorPil(**SMALL)(str(path), return_tensors="np")
    ref = ref_cls(**SMALL)(str(path), return_tensors="np")
    assert np.array_equal(ours["pixel_values"], ref["pixel_values"])   # alpha dropped, not composited


@pytest.mark.parametrize("cls", BOTH)
def test_from_pretrained_flat_and_nested(tmp_path, cls):
    from tests.fixtures.checkpoints import write_processor_files
    write_processor_files(tmp_path, "idefics3")
    proc = cls.from_pretrained(tmp_path)
    assert proc.size == {"longest_edge": 72} and proc.max_image_size == {"longest_edge": 24} and proc.resample == 1
    nested = dict(json.loads((tmp_path / "preprocessor_config.json").read_text()), size={"longest_edge": 48})
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": nested, "image_seq_len": 9}))
    assert cls.from_pretrained(tmp_path).size == {"longest_edge": 48}          # nested config wins
    assert cls.from_pretrained(tmp_path, do_image_splitting=False).do_image_splitting is False
    saved = cls(**SMALL).save_pretrained(tmp_path / "out")
    assert cls.from_pretrained(tmp_path / "out").to_dict() == cls(**SMALL).to_dict()
    assert json.loads(open(saved).read())["image_processor_type"] == cls.__name__
    with pytest.raises(FileNotFoundError):
        cls.from_pretrained(tmp_path / "missing")


def test_output_types():
    image = pil(40, 30)
    np_out = Idefics3ImageProcessorPil(**SMALL)(image)
    assert isinstance(np_out["pixel_values"], np.ndarray) and np_out["pixel_values"].dtype == np.float32
    assert np_out["pixel_attention_mask"].dtype == np.int64
    pt = Idefics3ImageProcessorPil(**SMALL)(image, return_tensors="pt")
    assert pt.pixel_values.dtype == torch.float32 and pt.pixel_attention_mask.dtype == torch.int64
    t = Idefics3ImageProcessor(**SMALL)(image)
    assert isinstance(t["pixel_values"], torch.Tensor)
    assert isinstance(Idefics3ImageProcessor(**SMALL)(image, return_tensors="np")["pixel_values"], np.ndarray)
    assert "rows" not in t and Idefics3ImageProcessor(**SMALL)(image, return_row_col_info=True)["rows"] == [[3]]
    raw = Idefics3ImageProcessorPil(**SMALL)(image, do_rescale=False, do_normalize=False)
    assert raw["pixel_values"].dtype == np.uint8                                # the reference's quirk
    with pytest.raises(ValueError, match="return_tensors"):
        Idefics3ImageProcessorPil(**SMALL)(image, return_tensors="tf")


@pytest.mark.parametrize("cls", BOTH)
def test_unpadded_outputs(cls):
    images = [[pil(40, 30)], [pil(30, 24, seed=1), pil(24, 24, seed=2)]]
    out = cls(**SMALL)(images, do_pad=False)
    assert [len(s) for s in out["pixel_values"]] == [10, 10 + 10] and "pixel_attention_mask" not in out


@pytest.mark.parametrize("cls", BOTH)
def test_number_of_image_patches(cls):
    proc = cls()
    assert proc.get_number_of_image_patches(700, 1000) == (13, 3, 4)
    assert proc.get_number_of_image_patches(700, 1000, {"do_image_splitting": False}) == (0, 0, 0)


def test_a_torch_another_thread_is_still_importing_makes_no_tensor(monkeypatch):
    """A CPU stage never imports torch: the image check reads sys.modules, where a torch that another
    thread is importing has no Tensor yet."""
    import sys
    import types

    from processing.images import is_image, is_tensor

    tensor = torch.zeros(2, 2, 3)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    assert not is_tensor(tensor) and is_image(np.zeros((2, 2, 3)))
    monkeypatch.undo()
    assert is_tensor(tensor)
