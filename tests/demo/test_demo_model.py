"""The bundled demo checkpoint: loads in transformers cleanly, answers held-out rows right, and our
model's greedy answers are the reference's; the training script runs end to end."""
import io
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "demo" / "model"
HELDOUT = ROOT / "demo" / "data" / "heldout.parquet"

needs_model = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(),
                                reason="demo/model not trained yet (python -m jobs.train_demo)")


def heldout_rows(n: int) -> list[dict]:
    rows = pq.read_table(HELDOUT).to_pylist()
    return rows[::len(rows) // n][:n]  # spread over question kinds


def batch(processor, rows):
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
        add_generation_prompt=True) for r in rows]
    images = [[Image.open(io.BytesIO(r["image"]))] for r in rows]
    # The template already starts with BOS: do not let the tokenizer add a second one.
    return processor(text=prompts, images=images, padding=True, add_special_tokens=False, return_tensors="pt")


@needs_model
def test_transformers_loads_with_no_missing_or_unexpected_keys():
    from transformers import Idefics3ForConditionalGeneration
    _, info = Idefics3ForConditionalGeneration.from_pretrained(MODEL, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]


@needs_model
def test_greedy_answers_match_transformers_and_the_ground_truth():
    pytest.importorskip("model.generation", reason="our generate (model/generation.py) has not landed")
    import transformers
    from model import Idefics3ForConditionalGeneration
    from processing import Idefics3Processor

    rows = heldout_rows(32)
    ours_proc, ref_proc = Idefics3Processor.from_pretrained(MODEL), transformers.Idefics3Processor.from_pretrained(MODEL)
    ours_in, ref_in = batch(ours_proc, rows), batch(ref_proc, rows)
    assert torch.equal(ours_in["input_ids"], ref_in["input_ids"])
    ours = Idefics3ForConditionalGeneration.from_pretrained(MODEL).eval()
    ref = transformers.Idefics3ForConditionalGeneration.from_pretrained(MODEL).eval()
    with torch.no_grad():
        ours_ids = ours.generate(**ours_in, max_new_tokens=40)
        ref_ids = ref.generate(**ref_in, max_new_tokens=40, do_sample=False)
    prompt_len = ref_in["input_ids"].shape[1]
    ours_new, ref_new = ours_ids[:, prompt_len:], ref_ids[:, prompt_len:]
    width = min(ours_new.shape[1], ref_new.shape[1])   # both pad finished rows; lengths may differ
    assert torch.equal(ours_new[:, :width], ref_new[:, :width])
    answers = [a.strip() for a in ours_proc.batch_decode(ours_new, skip_special_tokens=True)]
    right = [a == r["answers"][0] for a, r in zip(answers, rows)]
    # The bundled model scores 0.989 exact-match on the whole held-out split (jobs.train_demo's report
    # and jobs.evaluate; 30 of these 32: two of its five misses fall here); a random-weight model scores
    # ~0. The whole split's score is asserted in tests/jobs/test_evaluate_model.py.
    assert sum(right) >= 0.9 * len(rows), list(zip(answers, [r["answers"][0] for r in rows]))


def test_training_script_writes_a_loadable_checkpoint(tmp_path):
    """Two steps on a handful of images: the script's whole path (assets, encode, train, save, eval)."""
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "jobs.train_demo", "--out", str(out), "--steps", "2",
                           "--train-images", "8", "--heldout-rows", "4", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out exact-match" in proc.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "processor_config.json", "preprocessor_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    from transformers import Idefics3ForConditionalGeneration
    _, info = Idefics3ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
