"""Where a node keeps its own files: the checkpoint cache and the actors' ledgers, in a temp folder
of the user's alone."""
import os
import stat
import tempfile

import pytest

from pipeline.checkpoint import CACHE_ENV, cache_root
from pipeline.ledger import ROOT_ENV, ledger_root
from pipeline.storage import private_temp_folder, reading_store


@pytest.fixture
def shared_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv(ROOT_ENV, raising=False)
    return tmp_path


def test_the_cache_and_ledgers_default_to_folders_of_the_users_alone(shared_tmp):
    uid = os.getuid()
    assert cache_root() == shared_tmp / f"idefics3-checkpoints-{uid}"
    assert ledger_root() == shared_tmp / f"idefics3-ray-ledgers-{uid}"
    for folder in (cache_root(), ledger_root()):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert cache_root() == shared_tmp / f"idefics3-checkpoints-{uid}"          # found again, as it is


@pytest.mark.parametrize("planted", ["open to all", "a link", "another user's"])
def test_a_folder_another_user_could_have_made_is_refused(shared_tmp, planted):
    """In a shared /tmp another user could make the folder first (and fill it, marked complete) or
    plant a link that the copy's writes follow."""
    folder = shared_tmp / f"idefics3-checkpoints-{os.getuid()}"
    if planted == "a link":
        (shared_tmp / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(shared_tmp / "elsewhere")
    else:
        folder.mkdir(mode=0o700)
        if planted == "open to all":
            folder.chmod(0o777)
        elif os.getuid() == 0:
            os.chown(folder, 12345, -1)
        else:
            pytest.skip("only root can give a folder to another user")
    with pytest.raises(PermissionError, match="is not a folder of this user's alone"):
        private_temp_folder("idefics3-checkpoints")


def test_a_folder_named_by_the_environment_is_taken_as_it_is(shared_tmp, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(shared_tmp / "team-cache"))
    assert cache_root() == shared_tmp / "team-cache"


def test_a_text_file_is_replaced_whole(tmp_path, monkeypatch):
    """A run manifest written in place and cut short by a signal was left empty: every resume failed
    to read it (and said only "Expecting value")."""
    import pipeline.storage as storage
    from pipeline.storage import write_text

    target = tmp_path / "out.run.json"
    write_text(str(target), '{"a": 1}')
    monkeypatch.setattr(storage.os, "replace", lambda *_: (_ for _ in ()).throw(SystemExit("stopped")))
    with pytest.raises(SystemExit):
        write_text(str(target), '{"a": 2}')
    assert target.read_text() == '{"a": 1}'
    monkeypatch.undo()
    write_text(str(target), '{"a": 3}')
    assert target.read_text() == '{"a": 3}' and [p.name for p in tmp_path.iterdir() if p.name != "out.run.json"] in (
        [], [f".out.run.json.{os.getpid()}.tmp"])


def test_a_run_manifest_that_does_not_read_is_named(tmp_path, checkpoint):
    from pipeline import PipelineConfig
    from pipeline.manifest import keep_run_settings

    (tmp_path / "out.run.json").write_text("")
    with pytest.raises(ValueError, match=r"the run manifest '.*out.run.json' does not read .*Remove it"):
        keep_run_settings(str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)), True, None)


def test_a_stores_refusal_that_names_no_url_is_named_by_what_was_read():
    """s3fs's words for wrong credentials ("The request signature we calculated does not match ...",
    "Access Denied") name no URL: the job's one line did not say whether the input or the model."""
    signature = "The request signature we calculated does not match the signature you provided."
    with pytest.raises(PermissionError, match=r"^input 's3://b/in/\?X-Amz-Signature=\*\*\*' cannot be read: The req"):
        with reading_store("input", "s3://b/in/?X-Amz-Signature=abc"):
            raise PermissionError(signature)
    named = PermissionError("[Errno 13] Permission denied: '/data/model/config.json'")
    with pytest.raises(PermissionError) as refused:
        with reading_store("model", "/data/model"):
            raise named
    assert refused.value is named
