"""pipeline.checkpoint.check_model on local folders: what the driver refuses before any work (URLs: test_s3)."""
import shutil

import pytest

from model.files import CheckpointError
from pipeline.checkpoint import check_model


def copy_without(checkpoint, tmp_path, *names: str):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns(*names))
    return folder


def test_a_whole_checkpoint_and_a_hub_id_pass(checkpoint):
    check_model(str(checkpoint))
    check_model(f"file://{checkpoint}")
    check_model("HuggingFaceTB/SmolVLM-256M-Instruct")      # left to the actors: nothing is fetched here


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json"])
def test_a_folder_without_a_file_the_actors_read_is_named(checkpoint, tmp_path, missing):
    folder = copy_without(checkpoint, tmp_path, missing)
    with pytest.raises(FileNotFoundError, match=f"has no {missing}: not a checkpoint folder"):
        check_model(str(folder))


def test_pickle_weights_only_are_refused(checkpoint, tmp_path):
    folder = copy_without(checkpoint, tmp_path, "*.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        check_model(str(folder))


@pytest.mark.parametrize("path", ["/no/such/checkpoint", "./ckpt", "~/models/x", "a/b/c"])
def test_a_path_that_is_no_folder_nor_a_hub_id(path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        check_model(path)


def test_a_weights_file_named_instead_of_its_folder(checkpoint):
    with pytest.raises(FileNotFoundError, match="a file, not a checkpoint folder"):
        check_model(str(checkpoint / "model.safetensors"))


def test_a_config_the_replicas_cannot_build_or_split(checkpoint, tmp_path):
    import json

    from tests.fixtures.checkpoints import build_checkpoint

    check_model(str(build_checkpoint(tmp_path / "idefics3", "idefics3")), tensor_parallel_size=2)
    config = json.loads((checkpoint / "config.json").read_text())
    heads = config["text_config"]["num_attention_heads"]
    with pytest.raises(CheckpointError, match=f"cannot shard this model: text_config.num_attention_heads "
                                              f"\\({heads}\\) is not divisible by tensor_parallel_size 2"):
        check_model(str(checkpoint), tensor_parallel_size=2)
    folder = copy_without(checkpoint, tmp_path)
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        check_model(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="Expecting property name"):
        check_model(str(folder))
