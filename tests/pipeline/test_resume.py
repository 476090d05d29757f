"""A resume's look at the checkpoint: ids committed whose output rows are gone are taken out of it,
each file replaced whole (real Parquet files in the layout Ray's checkpointing writes)."""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.resume as resume
from pipeline.resume import checkpoint_uri, forget_lost_rows


def ids_of(path: Path) -> list[str]:
    return pq.read_table(path).column("id").to_pylist()


@pytest.fixture
def output(tmp_path):
    """An output whose rows b, d, e are gone; checkpoint files: all present, one lost, all lost."""
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": ["a", "c", "f"], "answer": ["x", "y", "z"]}), out / "part-0.parquet")
    folder = Path(checkpoint_uri(str(out)))
    folder.mkdir()
    for name, ids in (("k0", ["a", "f"]), ("k1", ["b", "c"]), ("k2", ["d", "e"])):
        pq.write_table(pa.table({"id": ids}), folder / f"{name}.parquet")
    return out, folder


def test_lost_ids_leave_the_checkpoint_files_that_held_them(output):
    out, folder = output
    assert forget_lost_rows(str(out)) == 3
    assert ids_of(folder / "k0.parquet") == ["a", "f"] and ids_of(folder / "k1.parquet") == ["c"]
    assert not (folder / "k2.parquet").exists() and sorted(p.name for p in folder.iterdir()) == ["k0.parquet",
                                                                                                   "k1.parquet"]


def test_a_death_while_a_checkpoint_file_is_rewritten_leaves_it_whole(output, monkeypatch):
    """It was rewritten in place: killed there, it was left empty, and every resume after failed."""
    out, folder = output
    real_write = pq.write_table

    def dies_halfway(table, where, **kwargs):
        where.write(b"PAR1")             # a few bytes reach the file, then the process is gone
        raise SystemExit("killed")

    monkeypatch.setattr(resume.pq, "write_table", dies_halfway)
    with pytest.raises(SystemExit):
        forget_lost_rows(str(out))
    assert ids_of(folder / "k1.parquet") == ["b", "c"]          # as it was
    monkeypatch.setattr(resume.pq, "write_table", real_write)
    assert forget_lost_rows(str(out)) == 3 and ids_of(folder / "k1.parquet") == ["c"]


def test_a_resume_reads_the_output_once(tmp_path, monkeypatch):
    """Its lost-row check, its counts and its count of rows left each read the whole output (five reads of
    a 20 000-file output took 74 s; on S3 a GET a file each): one read now, and a resume with nothing
    left to answer reads it no more."""
    import pipeline.io as io
    from jobs.common import DEMO_MODEL
    from pipeline import PipelineConfig
    from pipeline.job import prepare_job, run_prepared
    from tests.pipeline.helpers import png, write_parquet

    ids = ["r0", "r1", "r2"]
    write_parquet(tmp_path / "in.parquet", [{"id": i, "image": png(24, 24), "question": "Q?"} for i in ids])
    config, out = PipelineConfig(model=str(DEMO_MODEL)), tmp_path / "out"
    prepare_job(str(tmp_path / "in.parquet"), str(out), config).output_lock.release()    # a run's start
    out.mkdir(exist_ok=True)        # and what it wrote before it ended
    pq.write_table(pa.table({"id": ids, "answer": ["x"] * 3, "finish_reason": ["stop"] * 3,
                             "error": pa.nulls(3, pa.string()), "num_generated_tokens": [1, 2, 3]}),
                   out / "part-0.parquet")
    Path(checkpoint_uri(str(out))).mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": ids}), Path(checkpoint_uri(str(out))) / "k0.parquet")
    reads, read_files = [], io.read_files
    monkeypatch.setattr(io, "read_files",
                        lambda files, uri, *a, **k: reads.append(uri) or read_files(files, uri, *a, **k))
    summary = run_prepared(prepare_job(str(tmp_path / "in.parquet"), str(out), config, resume=True))
    counts = ("rows", "rows_this_run", "missing_rows", "duplicate_rows", "lost_rows_answered_again")
    assert [summary[k] for k in counts] == [3, 0, 0, 0, 0]
    assert reads.count(str(out)) == 1, reads
