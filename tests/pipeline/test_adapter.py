"""--adapter: a LoRA adapter of the checkpoint, local or on S3 (moto on loopback), checked in the
driver, copied to each node, merged by the replicas: answers of the merged model, recorded in the
run's manifest."""
import json

import pyarrow as pa
import pytest

from model.files import CheckpointError
from pipeline import PipelineConfig, read_output, run_job
from pipeline.checkpoint import check_adapter
from tests.model.test_lora import ADAPTERS, build_adapter
from tests.pipeline.helpers import good_rows, write_parquet
from tests.pipeline.test_s3 import s3, s3_cluster, upload_checkpoint  # noqa: F401  (moto S3, a Ray cluster on it)


@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    build_adapter(checkpoint, folder, **ADAPTERS["dora"])
    return folder


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


def test_an_adapter_on_s3_is_checked_copied_and_merged(s3, s3_cluster, checkpoint, adapter, tmp_path):  # noqa: F811
    rows = good_rows(4)
    want = engine_answers(checkpoint, adapter, rows, 6)
    assert want != engine_answers(checkpoint, None, rows, 6)        # the adapter changes the answers
    upload_checkpoint(s3, adapter, "bucket/adapters/dora")
    check_adapter("s3://bucket/adapters/dora/")
    write_parquet(tmp_path / "in.parquet", rows)
    config = PipelineConfig(model=str(checkpoint), adapter="s3://bucket/adapters/dora/", max_new_tokens=6)
    summary = run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    assert summary["error_rows"] == 0
    got = {r["id"]: (r["answer"], r["num_generated_tokens"]) for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert got == want
    manifest = json.loads((tmp_path / "out.run.json").read_text())
    assert manifest["adapter"] and manifest["adapter"] != manifest["checkpoint"]
    with pytest.raises(ValueError, match=r"the adapter \(one then, none now\)"):
        run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint),
                max_new_tokens=6), resume=True)
    s3.pipe("bucket/adapters/cut/adapter_config.json", (adapter / "adapter_config.json").read_bytes())
    s3.pipe("bucket/adapters/cut/adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes()[:-9])
    with pytest.raises(CheckpointError, match="not a complete safetensors file"):
        check_adapter("s3://bucket/adapters/cut")


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
    assert not (tmp_path / "out").exists()
