"""Where a node keeps its own files: the checkpoint cache and the actors' ledgers, in a temp folder
of the user's alone."""
import os
import stat
import tempfile

import pytest

from pipeline.checkpoint import CACHE_ENV, cache_root
from pipeline.ledger import ROOT_ENV, ledger_root
from pipeline.storage import private_temp_folder


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
