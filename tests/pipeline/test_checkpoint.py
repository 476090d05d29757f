"""pipeline.checkpoint.check_model on local folders and hub ids: what the driver refuses before any work
(URLs: test_s3)."""
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from model.files import CheckpointError
from pipeline.checkpoint import check_model


def copy_without(checkpoint, tmp_path, *names: str):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns(*names))
    return folder


REPO = Path(__file__).resolve().parents[2]


def test_a_whole_checkpoint_passes(checkpoint):
    check_model(str(checkpoint))
    check_model(f"file://{checkpoint}")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="the suite's offline hub (tests/conftest.py)")
def test_a_hub_id_the_driver_cannot_ask_about_is_left_to_the_actors(caplog):
    check_model("HuggingFaceTB/SmolVLM-256M-Instruct")      # offline, not cached here
    assert "not checked" in caplog.text and "HF_HUB_OFFLINE" in caplog.text


def hub_cache(root: Path, repo: str, checkpoint: Path) -> Path:
    """The hub cache's layout (models--owner--name/refs/main -> snapshots/<commit>/) holding `checkpoint`."""
    entry = root / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, entry / "snapshots" / commit)
    return root


def test_a_hub_id_is_checked_from_the_hub_cache(checkpoint, tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache(tmp_path, "owner/smolvlm", checkpoint)))
    check_model("owner/smolvlm")
    assert "not checked" not in caplog.text
    with pytest.raises(CheckpointError, match="'owner/smolvlm': cannot shard this model"):
        check_model("owner/smolvlm", tensor_parallel_size=5)


class StandInHub(BaseHTTPRequestHandler):
    """Answers as the hub does for repositories it does not have, or that are gated."""

    def do_HEAD(self):
        code = "GatedRepo" if "/gated/" in self.path else "RepoNotFound"
        self.send_response(403 if code == "GatedRepo" else 404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", "stand-in hub")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.fixture()
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.parametrize("model,said", [
    ("owner/mistyped", "no such checkpoint folder, nor a repository on the hub"),
    ("owner/gated", "a gated hub repository"),
])
def test_a_hub_id_the_hub_does_not_have_fails_the_job_at_once(hub, tmp_path, model, said):
    env = dict(os.environ, HF_ENDPOINT=hub, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "jobs.caption", "--model", model, "--output", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert said in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


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
