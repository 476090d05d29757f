"""--adapter: a LoRA adapter of the checkpoint checked in the driver (one on S3, copied to each node
and merged through a Ray run: tests/pipeline/test_s3.py)."""
import json

import pyarrow as pa
import pytest

from model.files import CheckpointError
from pipeline import PipelineConfig, run_job
from tests.fixtures.checkpoints import build_checkpoint
from tests.model.test_lora import ADAPTERS, build_adapter
from tests.pipeline.helpers import good_rows, write_parquet


def build_dora_adapter(checkpoint, folder):
    build_adapter(checkpoint, folder, **ADAPTERS["dora"])
    return folder


@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory):
    return build_dora_adapter(checkpoint, tmp_path_factory.mktemp("adapter"))


def engine_answers(checkpoint, adapter, rows: list[dict], max_new: int) -> dict:
    """The model stage's answers without Ray (Preprocess, then Generate)."""
    import asyncio

    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    config = PipelineConfig(model=str(checkpoint), adapter=adapter and str(adapter), max_new_tokens=max_new)
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    return {r["id"]: (r["answer"], r["num_generated_tokens"]) for r in answered}


def test_an_adapter_the_replicas_could_not_merge_is_refused_before_any_work(checkpoint, adapter, tmp_path):
    write_parquet(tmp_path / "in.parquet", good_rows(1))
    run = lambda folder: run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"),  # noqa: E731
                                 PipelineConfig(model=str(checkpoint), adapter=str(folder)))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="modules_to_save set"):
        run(bad)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        run(bad)
    other = tmp_path / "other"          # an adapter of another base model (its layers' sizes differ)
    build_adapter(build_checkpoint(tmp_path / "idefics3", "idefics3"), other, **ADAPTERS["lora"])
    with pytest.raises(CheckpointError, match=r"does not fit the model: model\.text_model\.layers\.0\.mlp\."
                                              r"down_proj\.weight is 48 x 96 in the model, 64 x 128 in the adapter"):
        run(other)
    assert not (tmp_path / "out").exists()
