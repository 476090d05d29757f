"""Compare our two image processors with transformers' two, in an environment that has torchvision.

The project's own venv has a CPU-only torch build that torchvision's wheels do not load with, so the
reference's torch class (`transformers.Idefics3ImageProcessor`) cannot run there. Run this in a
separate venv with the standard torch build:

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers pillow numpy
    /tmp/tvenv/bin/python bench/compare_torch_backend.py

It checks, on every image case of the parity tests (tests/processing/image_cases.py): identical
rows, cols and pixel_attention_mask, and pixel_values within 1e-6, for
  ours Idefics3ImageProcessor     vs transformers Idefics3ImageProcessor     (torch recipe, CPU)
  ours Idefics3ImageProcessorPil  vs transformers Idefics3ImageProcessorPil  (Pillow recipe)
and prints the difference between the two recipes. Exit status 1 if any case fails.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from processing.image_processor import Idefics3ImageProcessor, Idefics3ImageProcessorPil  # noqa: E402
from tests.processing.image_cases import cases  # noqa: E402


def _np(value):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def compare(ours, ref) -> tuple[bool, float]:
    if ours["rows"] != ref["rows"] or ours["cols"] != ref["cols"]:
        return False, float("inf")
    if not np.array_equal(_np(ours["pixel_attention_mask"]), _np(ref["pixel_attention_mask"])):
        return False, float("inf")
    a, b = _np(ours["pixel_values"]), _np(ref["pixel_values"])
    if a.shape != b.shape:
        return False, float("inf")
    diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
    return diff <= 1e-6, diff


def main() -> int:
    import torchvision
    import transformers
    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor as RefTorch
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as RefPil

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}")
    failures = 0
    print(f"{'case':34s} {'torch: ok  max|d|':>20s} {'pil: ok  max|d|':>20s} {'max|torch-pil| x 127.5':>28s}")
    for name, images, kwargs in cases():
        if not kwargs.get("do_pad", True):
            continue  # unpadded outputs are nested lists; covered by the regular suite
        call = {"return_row_col_info": True, "return_tensors": "pt"}
        results = []
        for ours_cls, ref_cls in ((Idefics3ImageProcessor, RefTorch), (Idefics3ImageProcessorPil, RefPil)):
            try:
                ok, diff = compare(ours_cls(**kwargs)(images, **call), ref_cls(**kwargs)(images, **call))
            except Exception as e:  # noqa: BLE001 - report and go on
                ok, diff = False, float("nan")
                print(f"  {name}: {ours_cls.__name__} raised {type(e).__name__}: {e}")
            results.append((ok, diff))
            failures += not ok
        t = _np(Idefics3ImageProcessor(**kwargs)(images, **call)["pixel_values"])
        p = _np(Idefics3ImageProcessorPil(**kwargs)(images, **call)["pixel_values"])
        grey = float(np.abs(t - p).max()) * 127.5
        (tok, td), (pok, pd) = results
        print(f"{name:34s} {str(tok):>6s} {td:13.2e} {str(pok):>6s} {pd:13.2e} {grey:28.3f}")
    print("FAILURES:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
