"""pipeline.shared_paths: what a node must see at a run's local paths, and what it reports seeing
otherwise (a cluster of two nodes, one lacking them: tests/jobs/test_several_nodes.py)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import PipelineConfig
from pipeline.shared_paths import Expected, check_output_outlives_job, differences, expected_paths, sample


def run_folders(tmp_path, files: int = 3):
    """An input folder of Parquet files, a checkpoint folder, and the run manifest a prepared run
    writes beside its output."""
    (tmp_path / "in").mkdir()
    for i in range(files):
        pq.write_table(pa.table({"id": [str(i)]}), tmp_path / "in" / f"part-{i:03d}.parquet")
    (tmp_path / "ckpt").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / "ckpt" / name).write_text(name)
    (tmp_path / "ckpt" / "README.md").write_text("not read by a replica")
    (tmp_path / "out.run.json").write_text('{"settings": 1}')
    return str(tmp_path / "in"), str(tmp_path / "out"), PipelineConfig(model=str(tmp_path / "ckpt"))


def test_a_local_run_expects_its_manifest_bytes_its_input_files_and_its_checkpoint_files(tmp_path):
    expected = expected_paths(*run_folders(tmp_path))
    assert [(e.flag, e.path.removeprefix(f"{tmp_path}/")) for e in expected] == [
        ("--output (its run manifest)", "out.run.json"),
        ("--input", "in/part-000.parquet"), ("--input", "in/part-001.parquet"), ("--input", "in/part-002.parquet"),
        ("--model", "ckpt/config.json"), ("--model", "ckpt/model.safetensors"), ("--model", "ckpt/tokenizer.json")]
    assert expected[0].digest is not None and all(e.digest is None for e in expected[1:])
    assert differences(expected) == []      # what this machine sees is what it expects


def test_urls_and_hub_ids_are_each_nodes_own_business(tmp_path):
    config = PipelineConfig(model="HuggingFaceTB/SmolVLM-256M-Instruct", image_root="s3://bucket/images")
    assert expected_paths("s3://bucket/in", "s3://bucket/out", config) == []


def test_a_folder_of_many_input_files_is_sampled_first_and_last_included(tmp_path):
    expected = expected_paths(*run_folders(tmp_path, files=50))
    inputs = [e.path.rsplit("/", 1)[1] for e in expected if e.flag == "--input"]
    assert len(inputs) == 32 and inputs[0] == "part-000.parquet" and inputs[-1] == "part-049.parquet"
    assert sample(list(range(5)), 32) == [0, 1, 2, 3, 4]


def test_a_node_reports_each_path_it_sees_otherwise(tmp_path):
    expected = expected_paths(*run_folders(tmp_path))
    (tmp_path / "out.run.json").write_text('{"settings": 2}')        # as long, other bytes: not this run's
    (tmp_path / "in" / "part-001.parquet").unlink()
    (tmp_path / "ckpt" / "model.safetensors").write_text("a copy of other weights")
    root = tmp_path / "images"
    root.write_text("a file where the driver has a folder")
    found = differences(expected + [Expected("--image-root", str(root), None)])
    assert found == [
        f"--output (its run manifest): {tmp_path}/out.run.json is another file there (this run's, just written here, "
        "is not)",
        f"--input: {tmp_path}/in/part-001.parquet does not exist there",
        f"--model: {tmp_path}/ckpt/model.safetensors is another file there (23 bytes, here 17)",
        f"--image-root: {root} is not a folder there"]


def test_an_image_root_of_its_own_is_expected_as_a_folder(tmp_path):
    input_uri, output_uri, config = run_folders(tmp_path)
    (tmp_path / "images").mkdir()
    config = PipelineConfig(model=config.model, adapter=str(tmp_path / "ckpt"), image_root=str(tmp_path / "images"))
    expected = expected_paths(input_uri, output_uri, config)
    assert [e.flag for e in expected].count("--adapter") == 3
    assert expected[-1] == Expected("--image-root", str(tmp_path / "images"), None)


def test_an_output_in_a_submitted_jobs_copy_of_its_working_dir_is_refused(tmp_path, monkeypatch):
    """As `ray job submit --working-dir . -- python -m jobs.caption --output out` runs: in Ray's copy of the
    folder (tests/jobs/test_caption_submit.py submits one)."""
    copy = tmp_path / "_ray_pkg_1234"
    copy.mkdir()
    monkeypatch.chdir(copy)
    check_output_outlives_job("out")        # not a submitted job's
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_1234.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    for output in ("out", str(copy / "out"), "."):
        with pytest.raises(ValueError, match=rf"^output '{copy}(/out)?' lies in this job's copy of its --working-dir "
                                             rf"\({copy}\), which Ray made for the job and deletes once unused"):
            check_output_outlives_job(output)
    for output in (str(tmp_path / "out"), "../out", "s3://bucket/out"):
        check_output_outlives_job(output)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    check_output_outlives_job("out")        # a job without a working dir runs where it was started


def test_a_node_that_dies_as_it_is_asked_is_warned_of_and_not_waited_for(ray_cluster, caplog):
    """A node lost during the check ended the job in a NodeDiedError traceback (a multi-node audit)."""
    import os

    import ray

    from pipeline.shared_paths import node_answer

    @ray.remote(num_cpus=0, max_restarts=0)
    class Node:
        def differences(self):
            os._exit(1)

    node = {"NodeManagerAddress": "10.0.0.5", "NodeID": "ab12cd34" + "0" * 48}
    with caplog.at_level("WARNING", logger="pipeline.shared_paths"):
        assert node_answer(Node.remote().differences.remote(), node) == []
    assert caplog.records[-1].getMessage().startswith(
        "node 10.0.0.5 (id ab12cd34) could not say whether it sees the run's local paths (")
    assert caplog.records[-1].getMessage().endswith("): not checked")


def test_only_the_just_written_manifest_missing_is_asked_again(tmp_path):
    """A shared file system's client may not see the driver's new file for a while (NFS caches a folder's
    listing up to 60 s); what was there before the run is either seen at once or not at all."""
    from pipeline.shared_paths import only_fresh

    expected = expected_paths(*run_folders(tmp_path))
    (tmp_path / "out.run.json").unlink()
    assert only_fresh(differences(expected), expected)
    (tmp_path / "in" / "part-000.parquet").unlink()
    assert not only_fresh(differences(expected), expected)
    assert not only_fresh(differences(expected[1:]), expected[1:])      # no manifest (an object store's output)
