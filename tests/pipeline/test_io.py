"""Reading an output folder back (summaries, resume, the rows a job shows): every file once, its
columns in one type, or only its first rows; the pool Ray Data reads the input's footers with."""
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import FOOTER_READERS, footer_readers_for, read_output


def test_an_output_reads_back_whole_in_one_type_or_its_first_rows(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # Files of other writers: a column of nulls without a type (an Arrow dataset's scan, which takes
    # the first file's schema, failed to cast the next file's strings to it); a column missing.
    pq.write_table(pa.table({"id": ["a", "b"], "error": pa.nulls(2), "answer_logprob": [-1.0, -2.0]}), out / "1.parquet")
    pq.write_table(pa.table({"id": ["c"], "error": ["decode image: bad"]}), out / "2.parquet")
    table = read_output(str(out))
    assert table.sort_by("id").to_pylist() == [{"id": "a", "error": None, "answer_logprob": -1.0},
                                               {"id": "b", "error": None, "answer_logprob": -2.0},
                                               {"id": "c", "error": "decode image: bad", "answer_logprob": None}]
    assert table.schema.field("error").type == pa.string()
    assert read_output(str(out), columns=["error", "id"]).column_names == ["error", "id"]
    assert read_output(str(out), columns=["id"], limit=1).num_rows == 1
    assert read_output(str(tmp_path / "missing")) is None and read_output(str(tmp_path / "missing"), limit=3) is None
    (tmp_path / "empty").mkdir()
    assert read_output(str(tmp_path / "empty")) is None


@pytest.mark.parametrize("files, readers", [(1, "1"), (10, "1"), (11, "2"), (5000, "32")])
def test_ray_datas_footer_pool_is_sized_to_the_input_unless_the_environment_sets_it(monkeypatch, files, readers):
    monkeypatch.delenv(FOOTER_READERS, raising=False)
    with footer_readers_for(files):
        assert os.environ[FOOTER_READERS] == readers
    assert FOOTER_READERS not in os.environ
    monkeypatch.setenv(FOOTER_READERS, "7")
    with footer_readers_for(files):
        assert os.environ[FOOTER_READERS] == "7"
    assert os.environ[FOOTER_READERS] == "7"
    monkeypatch.delenv(FOOTER_READERS)      # no more than the cluster's CPUs: 200 files on 4 made 20 processes
    with footer_readers_for(files, cpus=4.0):
        assert os.environ[FOOTER_READERS] == str(min(int(readers), 4))
