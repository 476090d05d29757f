"""The input's columns, and where the output lies, are checked in the driver, before a cluster is
started or joined."""
import re
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import PipelineConfig
from pipeline.io import input_dataset
from pipeline.job import prepare_job
from tests.pipeline.helpers import good_rows, png, serve_folder, write_parquet


def test_a_mistyped_keep_column_is_named_before_any_work(checkpoint, tmp_path):
    source = write_parquet(tmp_path / "in" / "rows.parquet", [dict(r, url="u") for r in good_rows(2)])
    config = PipelineConfig(model=str(checkpoint), keep_columns=["url", "licence"])
    with pytest.raises(ValueError, match=r"--keep-columns \['licence'\] are not columns of .*'url'"):
        prepare_job(str(source), str(tmp_path / "out"), config)      # no cluster: it fails first
    assert not (tmp_path / "out").exists()


def test_an_input_without_images_is_named_before_any_work(checkpoint, tmp_path):
    source = write_parquet(tmp_path / "in.parquet", [{"id": "a", "picture": b"x", "question": "q"}])
    with pytest.raises(ValueError, match=r"has no `image` column of images \(columns: \['id', 'picture', 'question'\]"):
        prepare_job(str(source), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)))
    job = prepare_job(str(source), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint), image_column="picture"))
    assert job.input_rows == 1


def test_a_mistyped_question_column_is_named_before_any_work(checkpoint, tmp_path):
    """Else every row would be asked --prompt instead of its question, silently."""
    source = write_parquet(tmp_path / "in.parquet", [{"id": "a", "image": b"x", "query": "q"}])
    config = PipelineConfig(model=str(checkpoint), question_column="querry")
    with pytest.raises(ValueError, match=r"has no `querry` column of questions \(columns: \['id', 'image', 'query'\]"):
        prepare_job(str(source), str(tmp_path / "out"), config)
    assert not (tmp_path / "out").exists()
    prepare_job(str(source), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)))   # no question column: --prompt


@pytest.mark.parametrize("column,values,says", [
    ("question", [5, 6], "the question column 'question' holds int64, not text"),
    ("question", [["a"], ["b"]], "the question column 'question' holds list<element: string>, not text"),
    ("image", [1.5, 2.5], "the image column 'image' holds double, not image bytes"),
    ("id", [[1], [2]], "the id column 'id' holds list<element: int64>, not text or integers"),
])
def test_a_question_or_image_column_of_another_type_is_named_before_any_work(checkpoint, tmp_path, column, values,
                                                                           says):
    """Questions that are not text failed every CPU-stage block (the job with it); images of another
    type made every row an error row; ids that are lists failed the id check obscurely."""
    rows = [{"id": i, "image": b"x", "question": "q"} for i in "ab"]
    for row, value in zip(rows, values):
        row[column] = value
    source = write_parquet(tmp_path / "in.parquet", rows)
    with pytest.raises(ValueError, match=re.escape(says)):
        prepare_job(str(source), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)))
    assert not (tmp_path / "out").exists()


def test_images_and_questions_of_every_accepted_type_pass(checkpoint, tmp_path):
    struct = {"bytes": b"x", "path": None}
    for i, (image, question) in enumerate([(b"x", "q"), ("a.png", None), (struct, "q"), ([b"x", b"y"], "q"),
                                           ([struct], "q")]):
        source = write_parquet(tmp_path / f"in{i}.parquet", [{"id": "a", "image": image, "question": question}])
        prepare_job(str(source), str(tmp_path / f"out{i}"), PipelineConfig(model=str(checkpoint)))
    categorical = pa.table({"id": ["a", "b"], "image": pa.array(["x.png", "x.png"]).dictionary_encode(),
                            "question": pa.array(["q", "q"]).dictionary_encode()})     # as pandas writes categoricals
    pq.write_table(categorical, tmp_path / "cat.parquet")
    prepare_job(str(tmp_path / "cat.parquet"), str(tmp_path / "out-cat"), PipelineConfig(model=str(checkpoint)))


def test_a_mistyped_or_repeating_id_column_is_named_before_any_work(checkpoint, tmp_path):
    source = write_parquet(tmp_path / "in.parquet", [{"key": k, "image": b"x"} for k in ("a", "b", "a")])
    with pytest.raises(ValueError, match=r"has no `keys` column of ids \(columns: \['image', 'key'\]"):
        prepare_job(str(source), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint), id_column="keys"))
    with pytest.raises(ValueError, match=r"1 ids occur more than once \(e.g. 'a' x2\).*Make the `key` column unique"):
        prepare_job(str(source), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint), id_column="key"))


def test_ids_are_checked_across_files_of_two_widths_a_partition_key_and_a_file_without_them(checkpoint, tmp_path):
    """Each file's ids are read with its footer known (a file without the column: null ids); a
    partition key as the id column is read from the paths."""
    config = PipelineConfig(model=str(checkpoint))
    write_parquet(tmp_path / "in" / "a.parquet", [{"id": 1, "image": b"x"}, {"id": 2, "image": b"x"}])
    pq.write_table(pa.table({"id": pa.array([3, 1], pa.int32()), "image": [b"x", b"x"]}), tmp_path / "in" / "b.parquet")
    with pytest.raises(ValueError, match=r"1 ids occur more than once \(e.g. 1 x2\)"):
        prepare_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    (tmp_path / "in" / "b.parquet").unlink()
    write_parquet(tmp_path / "in" / "c.parquet", [{"image": b"x", "question": "q"}] * 3)
    with pytest.raises(ValueError, match=r"3 rows have a null `id`"):
        prepare_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    for part in ("p", "q"):
        write_parquet(tmp_path / "parts" / f"key={part}" / "rows.parquet", [{"image": b"x"}])
    job = prepare_job(str(tmp_path / "parts"), str(tmp_path / "out2"), replace(config, id_column="key"))
    assert job.input_rows == 2


def test_an_input_on_an_http_server_without_ranges_is_named_before_any_work(checkpoint, tmp_path):
    """Python's http.server answers a ranged GET with the whole file: the footer checks passed (a small
    file fits fsspec's first block, read from byte 0) and Ray Data's first read failed the job."""
    write_parquet(tmp_path / "www" / "rows.parquet", good_rows(3))
    with serve_folder(tmp_path / "www", ranges=False) as url:
        with pytest.raises(ValueError, match=r"answers a ranged read \(HTTP Range\) with the whole file"):
            prepare_job(f"{url}/rows.parquet", str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)))
        assert not (tmp_path / "out").exists()
    with serve_folder(tmp_path / "www", ranges=True) as url:
        job = prepare_job(f"{url}/rows.parquet", str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)))
    assert job.input_rows == 3


def test_a_folder_without_parquet_files_is_named_as_such(checkpoint, tmp_path):
    """It was refused as having no `image` column (columns: [])."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"input '.*in' holds no \.parquet file"):
        prepare_job(str(tmp_path / "in"), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)))


def test_hive_partition_keys_are_columns(checkpoint, tmp_path):
    """`rows/lang=en/part.parquet`: Ray Data adds `lang` to the rows, so it may be kept."""
    for lang in ("en", "fr"):
        rows = [dict(r, id=f"{lang}-{r['id']}") for r in good_rows(2)]
        write_parquet(tmp_path / "rows" / f"lang={lang}" / "part.parquet", rows)
    assert set(input_dataset(str(tmp_path / "rows")).schema.names) == {"id", "image", "question", "lang"}
    config = PipelineConfig(model=str(checkpoint), keep_columns=["lang"])
    job = prepare_job(str(tmp_path / "rows"), str(tmp_path / "out"), config)
    assert job.input_rows == 4 and job.config.keep_columns == ["lang"]


def test_a_used_column_of_two_types_is_named_before_any_work(checkpoint, tmp_path):
    """Ray Data takes the schema of the first 16 files: a later file with text ids where the others
    have integers would fail the job when reached (and every resume). A column the run does not
    read may differ; types that widen may too."""
    for k in range(17):
        write_parquet(tmp_path / "in" / f"a{k:02d}.parquet", [{"id": k, "image": b"x", "notes": k}])
    write_parquet(tmp_path / "in" / "b.parquet", [{"id": "x17", "image": b"x", "notes": "text"}])
    config = PipelineConfig(model=str(checkpoint))
    with pytest.raises(ValueError, match=r"column 'id' has types that do not convert to one another across files "
                                         r"\(int64 in .*a00\.parquet; string in .*b\.parquet\)"):
        prepare_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    write_parquet(tmp_path / "in" / "b.parquet", [{"id": 17, "image": b"x", "notes": "text"}],
                  schema=pa.schema([("id", pa.int32()), ("image", pa.large_binary()), ("notes", pa.string())]))
    job = prepare_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    assert job.input_rows == 18 and job.columns == ("id", "image")      # `notes` is not read
    assert job.schema == pa.schema([("id", pa.int64()), ("image", pa.large_binary())])      # what all convert to
    write_parquet(tmp_path / "in" / "b.parquet", [{"id": 17, "image": "pictures/17.png"}])   # a path, not bytes
    with pytest.raises(ValueError, match=r"column 'image' has types .* \(binary in .*a00\.parquet; string in "):
        prepare_job(str(tmp_path / "in"), str(tmp_path / "out"), config)


def test_an_output_that_is_a_file_is_named_as_such(checkpoint, tmp_path):
    """It failed in Arrow: "Could not read schema from '.../answers.txt'. Is this a 'parquet' file?"."""
    source = write_parquet(tmp_path / "in.parquet", good_rows(1))
    (tmp_path / "answers.txt").write_text("an earlier tool's output")
    with pytest.raises(FileExistsError, match=r"output '.*answers\.txt' is a file: --output names a folder"):
        prepare_job(str(source), str(tmp_path / "answers.txt"), PipelineConfig(model=str(checkpoint)))
    assert (tmp_path / "answers.txt").read_text() == "an earlier tool's output"


def test_an_output_named_with_a_wildcard_is_refused_before_any_work(checkpoint, tmp_path):
    """Its files were read back as a pattern's matches, none: every row written, the summary said none
    were (exit 1), and the resume it asked for failed on its own manifest's name."""
    source = write_parquet(tmp_path / "in.parquet", good_rows(1))
    for name in ("exp[1]", "run*", "what?"):
        with pytest.raises(ValueError, match=r"output '.*' holds a wildcard character .* name it without them"):
            prepare_job(str(source), str(tmp_path / name), PipelineConfig(model=str(checkpoint)))
        assert not (tmp_path / name).exists()


def test_a_fresh_run_checks_its_output_again_under_the_lock(tmp_path):
    """A run of the same output that ended between this one's checks and its lock left its answers: a
    fresh run cleared their checkpoint and wrote its own beside them (every row twice)."""
    from pipeline.job import start_output
    from pipeline.resume import checkpoint_uri

    write_parquet(tmp_path / "out" / "part-0.parquet", good_rows(1))
    write_parquet(tmp_path / "out.checkpoint" / "c.parquet", [{"id": "row-0"}])
    assert checkpoint_uri(str(tmp_path / "out")) == str(tmp_path / "out.checkpoint")
    with pytest.raises(FileExistsError, match="written since this run's checks .* pass --resume"):
        start_output(str(tmp_path / "out"), None, resume=False)
    assert (tmp_path / "out.checkpoint" / "c.parquet").exists()
    start_output(str(tmp_path / "out"), None, resume=False, overwrite=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoint" / "c.parquet").exists()


def test_an_output_inside_the_input_folder_is_refused(checkpoint, tmp_path):
    """A resume would read the answers (and Ray's checkpoint files) back as input rows."""
    write_parquet(tmp_path / "data" / "a.parquet", good_rows(2))
    config = PipelineConfig(model=str(checkpoint))
    for output in (tmp_path / "data" / "answers", tmp_path / "data" / "sub" / "answers", tmp_path / "data"):
        with pytest.raises(ValueError, match="lies inside the input folder"):
            prepare_job(str(tmp_path / "data"), str(output), config)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["a.parquet"]
    for source, output in ((tmp_path / "data", tmp_path / "data-answers"),
                           (tmp_path / "data" / "a.parquet", tmp_path / "data" / "answers"),   # one file is read
                           (tmp_path / "data" / "*.parquet", tmp_path / "data" / "answers")):   # the glob's files
        assert prepare_job(str(source), str(output), config).input_rows == 2


def test_a_glob_input_that_matches_the_outputs_files_is_refused(checkpoint, tmp_path):
    """A fresh run cannot tell (the output is empty); its resume names the files the glob matches."""
    write_parquet(tmp_path / "data" / "en" / "a.parquet", good_rows(2))
    write_parquet(tmp_path / "data" / "answers" / "part-0.parquet", [{"id": "row-0", "answer": "x"}])
    (tmp_path / "data" / "answers.checkpoint").mkdir()
    with pytest.raises(ValueError, match=r"the input matches 1 files of the output .* \(e.g. .*answers/part-0.parquet"):
        prepare_job(str(tmp_path / "data" / "*" / "*.parquet"), str(tmp_path / "data" / "answers"),
                    PipelineConfig(model=str(checkpoint)), resume=True)


def test_a_choices_column_that_is_missing_or_not_lists_of_text_is_named_before_any_work(checkpoint, tmp_path):
    rows = [{"id": "a", "image": png(20, 20), "options": ["yes", "no"], "label": "yes"},
            {"id": "b", "image": png(20, 20), "options": None, "label": "no"}]
    source = write_parquet(tmp_path / "in.parquet", rows)
    with pytest.raises(ValueError, match=r"has no `choice` column of choices \(columns: \['id', 'image', 'label', "):
        prepare_job(str(source), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint), choices_column="choice"))
    with pytest.raises(ValueError, match=r"the choices column 'label' holds string, not lists of text"):
        prepare_job(str(source), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint), choices_column="label"))
    job = prepare_job(str(source), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint), choices_column="options"))
    assert "options" in job.columns and "label" not in job.columns        # read: the run uses it


def test_columns_of_view_types_are_read_as_their_plain_types(ray_cluster, checkpoint, tmp_path):
    """pyarrow keeps string_view / binary_view through Parquet (polars writes text so); the CPU
    stage's Arrow kernels have none for them: the run reads them as string and binary."""
    from pipeline import read_output, run_job

    rows = good_rows(3)
    table = pa.table({"id": pa.array([r["id"] for r in rows], pa.string_view()),
                      "image": pa.array([r["image"] for r in rows], pa.binary_view()),
                      "question": pa.array([r["question"] for r in rows], pa.string_view()),
                      "note": pa.array(["a", None, "c"], pa.string_view()),
                      "tags": pa.array([["x"], [], None], pa.list_(pa.string_view()))})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "rows.parquet")
    assert pq.read_schema(tmp_path / "in" / "rows.parquet").field("note").type == pa.string_view()
    config = PipelineConfig(model=str(checkpoint), keep_columns=["note", "tags"], max_new_tokens=3)
    summary = run_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    out = read_output(str(tmp_path / "out")).sort_by("id")
    assert summary["error_rows"] == 0 and out.column("id").to_pylist() == [r["id"] for r in rows]
    assert out.column("note").to_pylist() == ["a", None, "c"] and out.column("tags").to_pylist() == [["x"], [], None]
    assert out.schema.field("note").type == pa.string()


def test_hidden_files_are_not_the_inputs_and_kept_columns_may_bear_the_stages_names(ray_cluster, checkpoint, tmp_path):
    """Ray Data's listing of a folder leaves out paths starting with "." or "_" (`_SUCCESS`,
    `.ipynb_checkpoints/`): the checks count what it reads (they counted those rows, which then went
    missing, or refused their ids as repeated). A kept column named as one of the stages' own
    (input_ids, image_key) keeps the input's values (the prompt's ids were written, or the run failed)."""
    from pipeline import read_output, run_job

    rows = [dict(r, input_ids=[7, i], image_key=f"k{i}") for i, r in enumerate(good_rows(3))]
    write_parquet(tmp_path / "in" / "part-0.parquet", rows)
    write_parquet(tmp_path / "in" / "_part-1.parquet", [dict(r, id=r["id"] + "x") for r in rows])
    write_parquet(tmp_path / "in" / ".ipynb_checkpoints" / "part-0-checkpoint.parquet", rows)   # same ids
    config = PipelineConfig(model=str(checkpoint), keep_columns=["input_ids", "image_key"], max_new_tokens=3)
    assert prepare_job(str(tmp_path / "in"), str(tmp_path / "dry"), config).input_rows == 3
    summary = run_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    assert (summary["input_rows"], summary["rows"], summary["missing_rows"], summary["error_rows"]) == (3, 3, 0, 0)
    out = read_output(str(tmp_path / "out")).sort_by("id").to_pylist()
    assert [(r["input_ids"], r["image_key"]) for r in out] == [([7, i], f"k{i}") for i in range(3)]


def test_columns_only_a_later_file_has_are_read_from_every_file(ray_cluster, checkpoint, tmp_path):
    """The run's columns came from the first file's schema: one without questions made every row of
    every file answer --prompt, silently; one without ids dropped every file's ids (row hashes
    instead, and no check of them)."""
    from pipeline import read_output, run_job

    rows = good_rows(4)
    write_parquet(tmp_path / "in" / "a.parquet", [{"id": r["id"], "image": r["image"]} for r in rows[:2]])
    write_parquet(tmp_path / "in" / "b.parquet", [{"id": r["id"], "image": r["image"], "question": r["question"]}
                                                  for r in rows[2:]])
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=2)
    run_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    asked = {r["id"]: r["question"] for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert asked == {**{r["id"]: config.prompt for r in rows[:2]}, **{r["id"]: r["question"] or config.prompt for r in rows[2:]}}
    write_parquet(tmp_path / "ids" / "a.parquet", [{"image": b"x"}])
    write_parquet(tmp_path / "ids" / "b.parquet", [{"id": "b0", "image": b"x"}])
    with pytest.raises(ValueError, match=r"1 rows have a null `id`"):
        prepare_job(str(tmp_path / "ids"), str(tmp_path / "out2"), config)


def test_a_kept_column_named_as_an_output_column_is_kept_as_input_name(ray_cluster, checkpoint, tmp_path):
    """--keep-columns answer (a dataset's ground truth) or question (the original, under
    --prompt-template) were dropped without a word: the output has columns of those names."""
    from pipeline import read_output, run_job

    rows = [dict(r, answer=f"truth {i}", note=f"n{i}", key=f"k{i}") for i, r in enumerate(good_rows(2))]
    write_parquet(tmp_path / "in.parquet", rows)
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=2, prompt_template="About {note}: what is it?",
                            keep_columns=["question", "answer", "note", "id"], id_column="key")
    run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    out = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    for i, row in enumerate(rows):
        kept = out[row["key"]]
        assert (kept["input_question"], kept["input_answer"], kept["note"]) == (row["question"], f"truth {i}", f"n{i}")
        assert kept["question"] == f"About n{i}: what is it?" and kept["answer"] != f"truth {i}"
        assert kept["input_id"] == row["id"]        # an `id` beside the id column (VQAv2's image id): kept too
    with pytest.raises(ValueError, match=r"keep_columns \['answer'\] would be written as \['input_answer'\]"):
        PipelineConfig(model="m", keep_columns=["answer", "input_answer"])
    assert PipelineConfig(model="m", keep_columns=["id", "note"]).keep_columns == ["note"]     # the output's id


def test_a_glob_leaves_out_hidden_paths_as_a_folder_does_unless_it_names_them(checkpoint, tmp_path):
    """`nested/**/*.parquet` matched `.ipynb_checkpoints/x.parquet` (here cut short: the job was refused)."""
    from pipeline.io import parquet_files

    write_parquet(tmp_path / "in" / "a" / "part-0.parquet", good_rows(2))
    (tmp_path / "in" / "a" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "in" / "a" / ".ipynb_checkpoints" / "part-0-checkpoint.parquet").write_bytes(b"PAR1 cut")
    write_parquet(tmp_path / "in" / "_temporary" / "part-9.parquet", good_rows(2))
    config = PipelineConfig(model=str(checkpoint))
    assert prepare_job(str(tmp_path / "in" / "**" / "*.parquet"), str(tmp_path / "out"), config).input_rows == 2
    named = parquet_files(str(tmp_path / "in" / "_temporary" / "*.parquet"))
    assert [p.rsplit("/", 2)[-2:] for p in named] == [["_temporary", "part-9.parquet"]]


def test_dictionary_columns_are_read_as_their_values_in_every_file(ray_cluster, checkpoint, tmp_path):
    """pandas writes a categorical as a dictionary: as ids it failed the job (Arrow counts no dictionary)
    and one file's dictionary beside another's plain text was refused as types that do not convert."""
    from pipeline import read_output, run_job

    rows = good_rows(4)
    (tmp_path / "in").mkdir()
    for k, part in enumerate((rows[:2], rows[2:])):
        table = pa.table({"id": [r["id"] for r in part], "image": [r["image"] for r in part],
                          "question": [r["question"] for r in part], "lang": ["en", "fr"]})
        if k == 0:
            table = pa.table({name: column.dictionary_encode() if name != "image" else column
                              for name, column in zip(table.column_names, table.columns)})
        pq.write_table(table, tmp_path / "in" / f"part-{k}.parquet")
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "in" / "part-0.parquet").field("id").type)
    config = PipelineConfig(model=str(checkpoint), keep_columns=["lang"], max_new_tokens=2)
    summary = run_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    out = read_output(str(tmp_path / "out")).sort_by("id")
    assert (summary["rows"], summary["error_rows"], summary["missing_rows"]) == (4, 0, 0)
    assert out.column("id").to_pylist() == sorted(r["id"] for r in rows)
    assert out.column("lang").to_pylist().count("en") == 2 and pa.types.is_string(out.schema.field("id").type)


def test_ids_that_int64_cannot_hold_and_a_column_named_as_rays_row_hash_are_refused(checkpoint, tmp_path):
    config = PipelineConfig(model=str(checkpoint))
    pq.write_table(pa.table({"id": pa.array([2**63 + 5], pa.uint64()), "image": [b"x"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": pa.array([7], pa.int64()), "image": [b"x"]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"column 'id' has types that do not convert .*\(uint64 in .*; int64 in"):
        prepare_job(str(tmp_path / "*.parquet"), str(tmp_path / "out"), config)
    source = write_parquet(tmp_path / "h" / "in.parquet", [{"id": "a", "image": b"x", "row_hash": "mine"}])
    with pytest.raises(ValueError, match=r"its column 'row_hash' is the name of the column Ray Data adds"):
        prepare_job(str(source), str(tmp_path / "out"), replace(config, keep_columns=["row_hash"]))
    prepare_job(str(source), str(tmp_path / "out"), config)       # not read: no conflict


def test_sparks_folder_of_a_null_partition_value_is_a_null(ray_cluster, checkpoint, tmp_path):
    """Spark writes a null key as `lang=__HIVE_DEFAULT_PARTITION__/`: Ray Data read it as that text, which
    a kept key (or a prompt template) then held."""
    from pipeline.job import job_rows

    for lang in ("en", "__HIVE_DEFAULT_PARTITION__"):
        write_parquet(tmp_path / "rows" / f"lang={lang}" / "part.parquet", [dict(good_rows(1)[0], id=lang)])
    job = prepare_job(str(tmp_path / "rows"), str(tmp_path / "out"), PipelineConfig(model=str(checkpoint),
                                                                                     keep_columns=["lang"]))
    job.output_lock.release()
    langs = {r["id"]: r["lang"] for r in job_rows(job).take_all()}
    assert langs == {"en": "en", "__HIVE_DEFAULT_PARTITION__": None}


def test_an_option_list_or_image_columns_missing_or_of_another_type_are_named_before_any_work(checkpoint, tmp_path):
    rows = [{"id": "a", "image_1": png(20, 20), "image_2": None, "options": "['x', 'y']", "count": 3},
            {"id": "b", "image_1": None, "image_2": png(20, 20), "options": "[]", "count": 4}]
    source, out = str(write_parquet(tmp_path / "in.parquet", rows)), str(tmp_path / "out")
    config = PipelineConfig(model=str(checkpoint), image_columns="image_1, image_2", option_list_column="options")
    for wrong, says in ((dict(option_list_column="choices"), r"has no `choices` column of options"),
                        (dict(option_list_column="count"), r"the options column 'count' holds int64, not lists"),
                        (dict(image_columns=["image_1", "image_3"]), r"has no `image_3` column of images .*; "
                                                                     r"--image-columns name others"),
                        (dict(image_columns=["image_1", "count"]), r"the image column 'count' holds int64")):
        with pytest.raises(ValueError, match=says):
            prepare_job(source, out, replace(config, **wrong))
    job = prepare_job(source, out, config)
    assert {"image_1", "image_2", "options"} <= set(job.columns) and "count" not in job.columns


@pytest.mark.parametrize("settings, says", [
    (dict(option_list_column="options", option_columns=["A", "B"]), "option_list_column and option_columns are"),
    (dict(option_list_column="options", prompt_template="{q}"), "option_list_column and prompt_template are"),
    (dict(open_question_suffix=" Briefly."), "give option_list_column"),
    (dict(image_columns=["a", "b"], image_column="picture"), "image_column and image_columns both"),
    (dict(image_columns=["a", ""]), "image_columns must be column names"),
    (dict(image_columns={"image_2": 1}), "image_columns must be a list of column names"),
    (dict(keep_columns={"a": 1}), "keep_columns must be a list of column names"),
])
def test_ways_to_ask_that_do_not_go_together_are_refused(settings, says):
    with pytest.raises(ValueError, match=says):
        PipelineConfig(model="m", **settings)


def test_a_rows_images_of_several_columns_are_its_cells_holding_one(checkpoint):
    from pipeline.groups import ungroup
    from pipeline.preprocess import Preprocess

    nothing = {"bytes": None, "path": None}         # an HF datasets image struct of no image
    table = pa.Table.from_pylist([{"id": "a", "left": {"bytes": png(20, 20), "path": None}, "right": nothing},
                                  {"id": "b", "left": None, "right": nothing}])
    config = PipelineConfig(model=str(checkpoint), image_columns=["left", "right"])
    rows, _ = ungroup(Preprocess(config)(table))
    errors = rows.column("error").to_pylist()
    assert errors[0] is None and "null" in errors[1] and rows.column("input_ids").to_pylist()[1] is None


def test_an_input_of_large_row_groups_is_warned_of_before_any_work(checkpoint, tmp_path, monkeypatch, caplog):
    """Arrow reads a row group whole: one of inline images in one group took several times its size
    in one process. The file of the largest group is named, with the way out."""
    monkeypatch.setattr("pipeline.checks.LARGE_ROW_GROUP_BYTES", 20_000)
    rows = good_rows(8)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "one-group.parquet")
    others = [dict(r, id=f"other-{r['id']}") for r in rows]
    pq.write_table(pa.Table.from_pylist(others), tmp_path / "in" / "small-groups.parquet", row_group_size=1)
    config = PipelineConfig(model=str(checkpoint))
    sizes = [pq.ParquetFile(tmp_path / "in" / name).metadata.row_group(0).total_byte_size
             for name in ("one-group.parquet", "small-groups.parquet")]
    assert sizes[0] > 20_000 > sizes[1]
    with caplog.at_level("WARNING", logger="pipeline.checks"):
        prepare_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    warned = [r.getMessage() for r in caplog.records if "row groups" in r.getMessage()]
    assert len(warned) == 1 and "1 file(s)" in warned[0] and "one-group.parquet" in warned[0]
    assert "row_group_size" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.checks"):
        prepare_job(str(tmp_path / "in" / "small-groups.parquet"), str(tmp_path / "out2"), config)
    spare = [dict(r, image=png(2, 2), spare=bytes(30_000)) for r in rows]      # a large column the run leaves
    pq.write_table(pa.Table.from_pylist(spare), tmp_path / "spare.parquet")
    with caplog.at_level("WARNING", logger="pipeline.checks"):
        prepare_job(str(tmp_path / "spare.parquet"), str(tmp_path / "out3"), config)
    assert not [r for r in caplog.records if "row groups" in r.getMessage()]
