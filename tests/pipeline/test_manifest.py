"""--resume continues a run only with the settings its answers were made with."""
import json
import shutil

import pytest

from pipeline import PipelineConfig, run_job
from pipeline.manifest import checkpoint_fingerprint, keep_run_settings
from tests.fixtures.checkpoints import build_checkpoint


def test_the_fingerprint_follows_the_weights_not_the_folder(checkpoint, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    other = build_checkpoint(tmp_path / "other", "smolvlm", seed=1)      # same shapes, other weights
    assert checkpoint_fingerprint(str(moved)) == checkpoint_fingerprint(str(checkpoint))
    assert checkpoint_fingerprint(str(other)) != checkpoint_fingerprint(str(checkpoint))
    assert checkpoint_fingerprint("HuggingFaceTB/SmolVLM-256M-Instruct") == "HuggingFaceTB/SmolVLM-256M-Instruct"


def test_a_resume_with_other_settings_is_refused(checkpoint, tmp_path):
    out = str(tmp_path / "out")
    config = PipelineConfig(model=str(checkpoint), prompt="Describe it.", keep_columns=["url"])
    keep_run_settings(out, config, resume=False, storage_options=None)
    keep_run_settings(out, config, resume=True, storage_options=None)              # the same: goes on
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    keep_run_settings(out, PipelineConfig(model=str(moved), prompt="Describe it.", keep_columns=["url"]),
                      resume=True, storage_options=None)                          # a moved checkpoint: goes on
    changed = PipelineConfig(model=str(build_checkpoint(tmp_path / "other", "smolvlm", seed=1)),
                             prompt="Caption it.", temperature=0.7, keep_columns=["url", "license"],
                             prompt_suffix=" One word.", question_column="query")
    with pytest.raises(ValueError) as refused:
        keep_run_settings(out, changed, resume=True, storage_options=None)
    message = str(refused.value)
    assert "prompt: 'Describe it.' -> 'Caption it.'" in message and "temperature: 0.0 -> 0.7" in message
    assert "keep_columns: ['url'] -> ['url', 'license']" in message and "the checkpoint's files" in message
    assert "prompt_suffix: '' -> ' One word.'" in message and "question_column: 'question' -> 'query'" in message
    assert "max_new_tokens" not in message
    keep_run_settings(out, changed, resume=False, storage_options=None)           # a fresh run starts over


def test_a_setting_the_earlier_run_did_not_record_counts_as_its_default(checkpoint, tmp_path):
    """A run.json written before a setting existed (repetition_penalty came later) resumes with
    that setting at its default, and is refused with another value."""
    import json

    out = str(tmp_path / "out")
    keep_run_settings(out, PipelineConfig(model=str(checkpoint)), resume=False, storage_options=None)
    path = tmp_path / "out.run.json"
    older = json.loads(path.read_text())
    del older["repetition_penalty"]
    path.write_text(json.dumps(older))
    keep_run_settings(out, PipelineConfig(model=str(checkpoint)), resume=True, storage_options=None)
    path.write_text(json.dumps(older))
    with pytest.raises(ValueError, match="repetition_penalty: 1.0 -> 1.2"):
        keep_run_settings(out, PipelineConfig(model=str(checkpoint), repetition_penalty=1.2), resume=True,
                          storage_options=None)


def test_run_job_refuses_before_any_work(checkpoint, tmp_path):
    from tests.pipeline.helpers import png, write_parquet

    write_parquet(tmp_path / "in" / "a.parquet", [{"id": "a", "image": png(20, 20)}])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-0.parquet").write_bytes((tmp_path / "in" / "a.parquet").read_bytes())
    (tmp_path / "out.checkpoint").mkdir()
    keep_run_settings(str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)), resume=False, storage_options=None)
    with pytest.raises(ValueError, match="max_new_tokens: 64 -> 8"):
        run_job(str(tmp_path / "in"), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint), max_new_tokens=8),
                resume=True)


def test_image_settings_given_at_the_value_they_default_to_are_the_same_on_resume(checkpoint, tmp_path):
    """None stands for the checkpoint's longest edge and splitting, and processing's limits: given at that
    value one time and left out the other, a resume goes on; at another value, it is refused (naming
    the values None stood for)."""
    from dataclasses import replace

    from pipeline.checks import effective_image_settings

    out, plain = str(tmp_path / "out"), PipelineConfig(model=str(checkpoint))
    given = replace(plain, **effective_image_settings(plain))
    assert given.image_longest_edge and given.max_image_pixels and given.max_image_bytes
    for first, then in ((given, plain), (plain, given)):
        keep_run_settings(out, first, resume=False, storage_options=None)
        keep_run_settings(out, then, resume=True, storage_options=None)
    edge = given.image_longest_edge
    with pytest.raises(ValueError, match=f"image_longest_edge: {edge} -> {2 * edge}.*image_splitting: True -> False"):
        keep_run_settings(out, replace(given, image_longest_edge=edge * 2,
                                       image_splitting=not given.image_splitting), resume=True, storage_options=None)


def test_a_large_file_beside_the_weights_is_hashed_a_mebibyte_at_a_time(tmp_path):
    """A Trainer's optimizer.pt (twice the model's size) was read whole into the driver's memory; the
    digest is the same as before, so a resume of an earlier run's output is not refused."""
    import hashlib
    import tracemalloc

    content = bytes(range(256)) * (8 << 12)            # 8 MiB
    (tmp_path / "optimizer.pt").write_bytes(content)
    tracemalloc.start()
    fingerprint = checkpoint_fingerprint(str(tmp_path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 << 20
    assert fingerprint == hashlib.sha256(f"optimizer.pt\0{len(content)}\0".encode() + content).hexdigest()


def test_a_fine_tune_of_the_language_model_alone_changes_the_fingerprint(tmp_path):
    """safetensors keeps tensors sorted by name: the connector's first, the vision encoder's last, the
    language model's between. Only each weights file's first and last MiB were read: a fine-tune that
    froze the vision encoder and connector passed a resume, mixing two models' answers in one output.
    A run begun before (its manifest holds the ends' fingerprint) still resumes with the same files."""
    import numpy as np
    from safetensors.numpy import save_file

    from pipeline.manifest import check_run_settings, file_ends

    rng = np.random.default_rng(0)
    weights = {"model.connector.proj": rng.standard_normal(400_000, dtype=np.float32),      # 1.6 MB
               "model.text_model.layers.0.q": rng.standard_normal(50_000, dtype=np.float32),
               "model.vision_model.last": rng.standard_normal(400_000, dtype=np.float32)}
    for name, tuned in (("base", 0.0), ("tuned", 0.01)):
        (tmp_path / name).mkdir()
        save_file({**weights, "model.text_model.layers.0.q": weights["model.text_model.layers.0.q"] + tuned},
                  str(tmp_path / name / "model.safetensors"))
    base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
    assert checkpoint_fingerprint(base, None, file_ends) == checkpoint_fingerprint(tuned, None, file_ends)  # before
    assert checkpoint_fingerprint(base) != checkpoint_fingerprint(tuned)
    out = str(tmp_path / "out")
    keep_run_settings(out, PipelineConfig(model=base), resume=False, storage_options=None)
    with pytest.raises(ValueError, match="the checkpoint's files"):
        check_run_settings(out, PipelineConfig(model=tuned), True, None)
    manifest = tmp_path / "out.run.json"
    earlier = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**earlier, "checkpoint": checkpoint_fingerprint(base, None, file_ends)}))
    check_run_settings(out, PipelineConfig(model=base), True, None)        # a run begun before stop 55: resumes
