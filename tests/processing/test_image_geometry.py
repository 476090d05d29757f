"""Resize/tile arithmetic against the spec's worked examples and the reference's own size functions."""
from __future__ import annotations

import numpy as np
import pytest

from processing.geometry import number_of_image_patches, plan_image, resized_size, tile_grid_size

DEFAULT = dict(do_resize=True, size={"longest_edge": 1456}, do_image_splitting=True, tile=364)


# (W, H) -> step A/B (H, W), step C (H, W), rows, cols  -- section 1.5 of the behaviour spec
WORKED = [
    ((1000, 700), (1020, 1456), (1092, 1456), 3, 4),
    ((700, 1000), (1456, 1020), (1456, 1092), 4, 3),
    ((300, 200), (970, 1456), (1092, 1456), 3, 4),
    ((4000, 100), (36, 1456), (364, 1456), 1, 4),
    ((364, 364), (1456, 1456), (1456, 1456), 4, 4),
    ((50, 50), (1456, 1456), (1456, 1456), 4, 4),
    ((10000, 1), (1, 1456), (364, 1456), 1, 4),
    ((1457, 700), (700, 1456), (728, 1456), 2, 4),
    ((1185, 4368), (1456, 394), (1456, 728), 4, 2),   # double arithmetic: 394, not 396
]


@pytest.mark.parametrize("wh,step_a,step_c,rows,cols", WORKED)
def test_worked_examples(wh, step_a, step_c, rows, cols):
    plan = plan_image(wh[1], wh[0], **DEFAULT)
    assert (plan.resize_to, plan.frame_source, plan.rows, plan.cols) == (step_a, step_c, rows, cols)
    assert plan.num_frames == rows * cols + 1


def test_other_verified_cases():
    unsplit = plan_image(700, 1000, **{**DEFAULT, "do_image_splitting": False})
    assert (unsplit.resize_to, unsplit.frame_source, unsplit.rows, unsplit.num_frames) == ((1020, 1456), (364, 364), 0, 1)
    unresized = {**DEFAULT, "do_resize": False}
    assert plan_image(100, 200, **unresized).frame_source == (364, 364)          # one stretched frame
    assert plan_image(100, 200, **unresized).rows == 0
    assert (plan_image(300, 800, **unresized).frame_source, plan_image(300, 800, **unresized).rows) == ((728, 1092), 2)
    big = plan_image(700, 1000, **{**DEFAULT, "size": {"longest_edge": 5000}})
    assert big.resize_to == (2867, 4096) and big.frame_source == (3276, 4368) and (big.rows, big.cols) == (9, 12)
    thin = plan_image(3000, 3, **DEFAULT)
    assert thin.resize_to == (1456, 2) and thin.frame_source == (1456, 364) and (thin.rows, thin.cols) == (4, 1)
    assert plan_image(5000, 5000, **unresized).rows == 14                           # no cap in step C
    assert resized_size(10, 20, {"height": 7, "width": 9}) == (7, 9)


@pytest.fixture(scope="module")
def reference():
    import transformers.models.idefics3.image_processing_pil_idefics3 as ref
    return ref


def _reference_plan(ref, height, width, longest_edge, tile):
    """Sizes the reference's own methods ask for, with resizing stubbed out (arithmetic only)."""
    from transformers.image_utils import SizeDict
    proc = ref.Idefics3ImageProcessorPil()
    calls = []

    def fake_resize(image, size, resample=None, **kwargs):
        new = ref.get_resize_output_image_size(image, size.longest_edge) if size.longest_edge else (size.height, size.width)
        calls.append(tuple(new))
        return np.zeros((1, *new), dtype=np.uint8)

    proc.resize = fake_resize
    image = proc.resize(np.zeros((1, height, width), dtype=np.uint8), SizeDict(longest_edge=longest_edge))
    image = proc.resize_for_vision_encoder(image, tile)
    _, rows, cols = proc.split_images(image, {"longest_edge": tile})
    return calls[0], calls[1], rows, cols


@pytest.mark.parametrize("longest_edge,tile", [(1456, 364), (2048, 512), (1000, 364), (72, 24), (50, 20)])
def test_random_sizes_match_reference(reference, longest_edge, tile):
    rng = np.random.default_rng(longest_edge)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 5000, size=(300, 2))]
    sizes += [(1, 1), (1, 9999), (9999, 1), (tile, tile), (tile + 1, tile - 1), (4368, 1185)]
    for h, w in sizes:
        a, c, rows, cols = _reference_plan(reference, h, w, longest_edge, tile)
        plan = plan_image(h, w, do_resize=True, size={"longest_edge": longest_edge}, do_image_splitting=True, tile=tile)
        assert (plan.resize_to, plan.frame_source, plan.rows, plan.cols) == (a, c, rows, cols), (h, w)
        assert tile_grid_size(*a, tile) == c


@pytest.mark.parametrize("longest_edge,tile,split", [(1456, 364, True), (1000, 364, True), (72, 24, True),
                                                     (1456, 364, False)])
def test_number_of_image_patches_matches_reference(reference, longest_edge, tile, split):
    proc = reference.Idefics3ImageProcessorPil()
    kwargs = {"size": {"longest_edge": longest_edge}, "max_image_size": {"longest_edge": tile},
              "do_image_splitting": split}
    rng = np.random.default_rng(tile)
    for h, w in rng.integers(1, 5000, size=(300, 2)):
        expected = proc.get_number_of_image_patches(int(h), int(w), kwargs)
        assert number_of_image_patches(int(h), int(w), longest_edge, tile, split) == expected
