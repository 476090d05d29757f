"""One captioning/answering run: read -> process -> write, with resume and a summary of the run."""
from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from .builder import build_processor
from .checkpoint import check_adapter, check_model
from .checks import (check_column_types, check_columns, check_ids, check_image_root, check_input_excludes_output,
                     check_input_files, check_output_outside_input, check_row_encoding, input_ids, read_schema,
                     warn_of_large_row_groups)
from .config import PipelineConfig
from .errors import RunFailed, StartFailed
from .replica import release_replica_groups
from .generation_defaults import resolved as resolved_generation_config
from .io import footer_readers_for, input_dataset, input_folder, is_glob, read_output, read_rows, write_rows
from .ledger import remove_job_ledgers
from .manifest import keep_run_settings, manifest_path
from .output_lock import OutputLock, lock_output
from .resume import (checkpoint_config, clean_pending_commits, clear_checkpoint, forget_lost_rows, has_checkpoint,
                     missing_ids, output_ids, unanswered_rows)
from .retry import drop_error_rows
from .rows import ROW_HASH, error_kind, keep_ids, rename_columns
from .run_stats import RunCounter, replica_kinds
from .shared_paths import check_nodes_share_paths, check_output_outlives_job
from .storage import (absolute_location, fsspec_fs, has_files, is_local, lists_folders, patient_stores, redact_url,
                      redact_urls, sibling, write_text)

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
COUNTED = ["id", "finish_reason", "error", "num_generated_tokens"]
ERROR_KINDS_SHOWN = 10
ANSWERS_SHOWN = 50
log = logging.getLogger(__name__)


def output_counts(output: str, storage_options: dict | None = None, samples: bool = False,
                  wanted: tuple[str, ...] | None = None) -> dict:
    """Rows, distinct ids, error and cut-short rows, generated tokens (every sample's, with `samples`),
    the commonest kinds of error; with `wanted` ids, how many of them have no row (`missing`)."""
    return counts_of(counted_columns(output, storage_options, samples), samples, wanted)


def counted_columns(output: str, storage_options: dict | None, samples: bool) -> pa.Table | None:
    """The output's columns output_counts counts (None: no output)."""
    return read_output(output, storage_options, columns=COUNTED + ["samples_num_generated_tokens"] * samples)


def counts_of(table: pa.Table | None, samples: bool = False, wanted: tuple[str, ...] | None = None) -> dict:
    """output_counts of an output's counted_columns."""
    tokens = "samples_num_generated_tokens" if samples else "num_generated_tokens"
    missing = {} if wanted is None else {"missing": len(set(wanted))}
    if table is None:
        return {"rows": 0, "ids": 0, "error_rows": 0, "cut_short_rows": 0, "generated_tokens": 0, "errors_by_kind": {},
                **missing}
    if wanted is not None:
        missing["missing"] = missing_ids(pa.array(sorted(set(wanted)), pa.string()),
                                         pc.cast(table["id"], pa.string()).combine_chunks())
    failed = table.filter(pc.equal(table["finish_reason"], "error"))
    kinds = Counter(error_kind(m or "") for m in failed["error"].to_pylist())
    return {**missing, "rows": table.num_rows, "ids": pc.count_distinct(table["id"], mode="all").as_py(),
            "error_rows": failed.num_rows,
            "cut_short_rows": pc.sum(pc.equal(table["finish_reason"], "length")).as_py() or 0,
            "generated_tokens": pc.sum(pc.list_flatten(table[tokens]) if samples else table[tokens]).as_py() or 0,
            "errors_by_kind": dict(kinds.most_common(ERROR_KINDS_SHOWN))}


def answer_counts(output: str, storage_options: dict | None = None) -> dict[str, int]:
    """A run with choices: the rows of each answer (the most common ANSWERS_SHOWN), whole answers
    only (finish_reason "stop")."""
    table = read_output(output, storage_options, columns=["answer", "finish_reason"])
    if table is None:
        return {}
    answers = table.filter(pc.equal(table["finish_reason"], "stop"))["answer"]
    counts = sorted(pc.value_counts(answers).to_pylist(), key=lambda c: (-c["counts"], str(c["values"])))
    return {c["values"]: c["counts"] for c in counts[:ANSWERS_SHOWN]}


def check_output(output: str, storage_options: dict | None, resume: bool, overwrite: bool = False) -> None:
    """A fresh run needs an empty output (or leave to empty it); a resumed one needs the checkpoint
    of the run it continues."""
    fs, path = fsspec_fs(output, storage_options)
    if is_glob(output, path):
        raise ValueError(f"output {redact_url(output)!r} holds a wildcard character (*, ? or [): a folder of that name "
                         "would be read back as a pattern, matching none of its own files; name it without them")
    if not is_local(output) and lists_folders(output) and "/" not in path.strip("/"):    # an object store's
        raise ValueError(f"output {output!r} is a bucket's root: --output names a folder inside a bucket (the "
                         "run's files are written beside it: <output>.run.json, .checkpoint, .summary.json)")
    if not is_local(output) and lists_folders(output):
        check_bucket(output, fs, path.strip("/").split("/")[0])
    if fs.isfile(path):
        raise FileExistsError(f"output {output!r} is a file: --output names a folder (of Parquet files)")
    written = has_files(output, storage_options)
    if not resume:
        if written and not overwrite:
            raise FileExistsError(f"output {output!r} already holds Parquet files: pass --resume to continue "
                                  "that run, or choose another output")
    elif written and not has_checkpoint(output, storage_options):
        raise FileNotFoundError(f"cannot resume into {output!r}: it has files but no checkpoint "
                                f"({output.rstrip('/')}.checkpoint) from a previous run of this job")


def check_bucket(output: str, fs, bucket: str) -> None:
    """An output's bucket must exist: its listing (and so a dry run) finds nothing there, as in an empty
    folder; only the run's first write said otherwise."""
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise FileNotFoundError(f"output {redact_url(output)!r} cannot be written: its bucket {bucket!r} does not "
                                "exist") from None
    except Exception:       # no right to ask of the bucket itself (a role that may only write): the write says
        return


def has_run(output: str, storage_options: dict | None) -> bool:
    """Whether an earlier run wrote answers to `output`, or began to (its settings beside it)."""
    fs, path = fsspec_fs(manifest_path(output), storage_options)
    return fs.exists(path) or has_files(output, storage_options)


def start_output(output: str, storage_options: dict | None, resume: bool, overwrite: bool = False) -> None:
    """A fresh run's output made empty: its checkpoint cleared and, with `overwrite`, the files of an
    earlier run removed (only once every check has passed). Checked again under the output's lock: a
    run of the same output that ended between this one's checks and its lock left its answers."""
    if resume:
        return
    if not overwrite and has_files(output, storage_options):
        raise FileExistsError(f"output {redact_url(output)!r} holds Parquet files written since this run's checks "
                              "(another run of it?): pass --resume to continue that run, or --overwrite to start over")
    if overwrite and has_files(output, storage_options):
        fs, path = fsspec_fs(output, storage_options)
        fs.rm(path, recursive=True)
    clear_checkpoint(output, storage_options)


def forget_summary(output: str, storage_options: dict | None) -> None:
    """The earlier run's summary, once this run is let go on: a run killed before its own leaves none,
    not one of rows it has since taken out (--retry-errors); a run refused leaves it."""
    fs, path = fsspec_fs(sibling(output, ".summary.json"), storage_options)
    if fs.exists(path):
        fs.rm(path)


@contextmanager
def writing_output(output: str):
    """A store that refuses the output (a read-only folder, credentials without write rights) or has no
    bucket for it is named in one line, not met as a traceback (s3fs's "Access Denied" and "The specified
    bucket does not exist" name no path)."""
    try:
        yield
    except PermissionError as e:
        raise PermissionError(f"output {redact_url(output)!r} cannot be written: {e}") from None
    except FileNotFoundError as e:
        if "bucket" not in str(e).lower() or redact_url(output) in str(e):      # the checks' own name the output
            raise
        raise FileNotFoundError(f"output {redact_url(output)!r} cannot be written: {e}") from None
    except (ValueError, FileExistsError):       # the checks' own
        raise
    except Exception as e:      # botocore's ParamValidationError of a bucket name with a space, an endpoint down
        why = " ".join(redact_urls(str(e)).split())     # one line: botocore's runs to several
        raise PermissionError(f"output {redact_url(output)!r} cannot be written: {type(e).__name__}: {why}") from None


def release_run() -> None:
    """Driver side, after a run, finished or not: what its actors left on this node (the replicas'
    placement groups, the ledger files)."""
    release_replica_groups()
    remove_job_ledgers()


def with_image_root(config: PipelineConfig, input_uri: str) -> PipelineConfig:
    """Relative image paths of the rows are read from the input's folder unless `image_root` says otherwise."""
    return replace(config, image_root=config.image_root or input_folder(input_uri, config.storage_options))


@dataclass(frozen=True)
class PreparedJob:
    """A run whose input, output and model passed the driver's checks; nothing started on Ray yet."""
    input_uri: str
    output_uri: str
    config: PipelineConfig
    limit: int | None
    input_rows: int         # rows the run is to answer
    lost_rows: int          # written by an earlier run, their output file gone since: answered again
    before: dict            # output_counts before the run
    columns: tuple[str, ...] = ()               # the input columns the run reads: those it uses
    schema: pa.Schema | None = None             # their types (but hive partition keys'), as all files convert
    only_ids: tuple[str, ...] | None = None     # answer only the rows of these ids
    renames: dict | None = None                 # input column -> the name the pipeline knows it by
    generation_defaults: dict = field(default_factory=dict)   # settings taken from generation_config.json
    retried_rows: int = 0                       # error rows of the earlier run answered again (retry_errors)
    input_files: int = 1                        # Parquet files of the input (they size Ray Data's footer pool)
    output_lock: OutputLock | None = field(default=None, compare=False, repr=False)   # until run_prepared ends
    unanswered: int | None = None               # of those, rows the output has none of (None: not counted)

    @property
    def has_rows(self) -> bool:
        """Whether the run has rows to answer: one without (an empty input, a resume of a finished
        output) needs no cluster."""
        return self.input_rows > 0 and self.unanswered != 0


def used_columns(names: list[str], config: PipelineConfig, renames: dict[str, str]) -> list[str]:
    """The input columns a run reads (its rows' id, image, question, choices, messages, settings,
    scored texts, template's and kept columns): a dataset's other columns (a second image,
    embeddings) are not read, nor can their types fail the run."""
    used = {config.id_column, *config.image_sources(), config.question_column, config.choices_column,
            config.messages_column, config.sampling_column, config.score_column, config.hint_column,
            config.option_list_column, *config.option_columns, *config.keep_columns, *config.template_columns()}
    return [name for name in names if renames.get(name, name) in used]


def input_columns(footers: dict[str, pq.FileMetaData], dataset_schema: pa.Schema) -> list[str]:
    """Every column of the input: each file's, in the order first seen (a dataset's schema is its
    first file's: a question or id column that file lacks was read from no file), then the hive
    partition keys of the paths."""
    names = {}
    for meta in footers.values():
        names.update(dict.fromkeys(meta.schema.to_arrow_schema().names))
    return list({**names, **dict.fromkeys(dataset_schema.names)})


@dataclass(frozen=True)
class CheckedJob:
    """What the driver's checks of a run learned (they write nothing)."""
    config: PipelineConfig                  # with the image root the rows' relative paths are read from
    columns: list[str]                      # the input columns the run reads
    schema: pa.Schema                       # their types, as all files convert
    input_rows: int
    renames: dict[str, str]
    generation_defaults: dict = field(default_factory=dict)   # the settings taken from generation_config.json
    input_files: int = 1                    # the input's Parquet files
    ids: pa.ChunkedArray | None = None      # the input's ids (None: rows without, Ray Data's row hash serves)


def check_job(input_uri: str, output_uri: str, config: PipelineConfig, *, resume: bool = False,
              renames: dict[str, str] | None = None, overwrite: bool = False) -> CheckedJob:
    """Every check of the model, the input and the output a run makes before it starts, reading
    only (a checkpoint's configs, the input's footers and ids, the output's listing)."""
    opts = config.storage_options
    shapes = check_model(config.model, opts, config.tensor_parallel_size)
    config, taken = resolved_generation_config(config)
    check_adapter(config.adapter, opts, shapes)
    check_row_encoding(config)
    check_image_root(config.image_root, opts)
    config = with_image_root(config, input_uri)
    check_output_outside_input(input_uri, output_uri, opts)
    check_output_outlives_job(output_uri)
    with writing_output(output_uri):
        check_output(output_uri, opts, resume, overwrite)
    footers = check_input_files(input_uri, opts)
    check_input_excludes_output(list(footers), output_uri, opts)
    renames = dict(renames or {})
    rows = input_dataset(input_uri, opts)
    names = input_columns(footers, rows.schema)
    check_columns([renames.get(name, name) for name in names], config, input_uri)
    columns = used_columns(names, config, renames)
    if ROW_HASH in columns:
        raise ValueError(f"input {input_uri!r}: its column {ROW_HASH!r} is the name of the column Ray Data adds "
                         "(a hash of each row's file and position): the run cannot read both; rename yours")
    schema = read_schema(footers, columns, input_uri)
    warn_of_large_row_groups(footers, columns, input_uri)
    check_column_types(schema, config, input_uri, renames)
    ids = input_ids(rows, footers, schema, config.id_column, input_uri, opts)
    check_ids(ids, input_uri, config.id_column)
    return CheckedJob(config, columns, schema, sum(meta.num_rows for meta in footers.values()), renames, taken,
                      len(footers), ids)


def check_run_arguments(output_uri: str, config: PipelineConfig, resume: bool, limit: int | None,
                        retry_errors: str | None) -> None:
    """The checks of a run's limit and retried errors against the output (a dry run's too)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if limit is not None and resume:
        # Ray Data pushes a limit down to the read, before the checkpoint's filter of rows already
        # written, so a resumed run with one would take rows it then skips.
        raise ValueError("limit is for a fresh run; resume without it to answer the rest")
    if retry_errors is not None and not resume:
        raise ValueError("retry_errors answers again the error rows of the run an output holds: resume it")
    if retry_errors is not None and not has_run(output_uri, config.storage_options):
        raise ValueError(f"retry_errors: the output {redact_url(output_uri)!r} holds no earlier run whose error "
                         "rows to answer again")


def prepare_job(input_uri: str, output_uri: str, config: PipelineConfig, *, resume: bool = False,
                limit: int | None = None, only_ids: list[str] | None = None,
                renames: dict[str, str] | None = None, overwrite: bool = False,
                retry_errors: str | None = None) -> PreparedJob:
    """Every check a run can make without a cluster (bad arguments fail here, in seconds, naming the
    cause), and the output made ready: emptied checkpoint, or lost rows forgotten for a resume.

    `only_ids`: answer only the rows of these ids (as strings). `renames`: input columns the
    pipeline is to know by other names (not the id column: resume filters by it before renames).
    `overwrite`: a fresh run may start over in an output that holds an earlier run's answers.
    `retry_errors` (with resume): the earlier run's error rows whose error holds this text ("": all)
    are answered again (pipeline.retry), once the run's settings are found to be the same."""
    output_uri = absolute_location(output_uri)
    check_run_arguments(output_uri, config, resume, limit, retry_errors)
    checked = check_job(input_uri, output_uri, config, resume=resume, renames=renames, overwrite=overwrite)
    config, columns, schema, input_rows, renames = (checked.config, checked.columns, checked.schema,
                                                    checked.input_rows, checked.renames)
    opts = config.storage_options
    with writing_output(output_uri):
        lock = lock_output(output_uri)      # before the output changes: a resume removes uncommitted files
    try:
        with writing_output(output_uri):
            start_output(output_uri, opts, resume, overwrite)
            keep_run_settings(output_uri, config, resume, opts)
            forget_summary(output_uri, opts)
            if resume:
                clean_pending_commits(output_uri, opts)
            retried = 0 if retry_errors is None else drop_error_rows(output_uri, opts, retry_errors, only_ids)
        # the output read once for what a resume checks and counts (20 000 files took 74 s, read five times)
        counted = counted_columns(output_uri, opts, config.samples > 1)
        written = output_ids(counted)
        lost = max((forget_lost_rows(output_uri, opts, written) if resume else 0) - retried, 0)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    before = counts_of(counted, config.samples > 1, only_ids)
    if retried:
        log.warning("%d error rows of the earlier run are answered again", retried)
    elif retry_errors and before["error_rows"]:
        log.warning("retry_errors %r matches no error row the run answers (the output holds %d: %s): none is "
                    "answered again", retry_errors, before["error_rows"], "; ".join(before["errors_by_kind"]))
    if lost:
        log.warning("%d rows of an earlier run have no output row any more (a deleted output file?): "
                    "they are answered again", lost)
    wanted = input_rows if only_ids is None else len(set(only_ids))
    wanted = wanted if limit is None else min(wanted, limit)
    unanswered = None
    if resume and limit is None and checked.ids is not None:
        unanswered = unanswered_rows(checked.ids if only_ids is None else pa.array(list(only_ids)), written)
        if not unanswered:
            log.warning("every row of the input has its output row already: nothing to answer")
    return PreparedJob(input_uri, output_uri, config, limit, wanted, lost, before, tuple(columns), schema,
                       None if only_ids is None else tuple(only_ids), renames, checked.generation_defaults, retried,
                       checked.input_files, lock, unanswered)


def job_rows(job: PreparedJob) -> ray.data.Dataset:
    """The rows the run answers, as the pipeline knows them: only the ids asked for, renamed, the first `limit`."""
    ds = read_rows(job.input_uri, job.config.storage_options, schema=job.schema)
    ds = ds.select_columns([*job.columns, ROW_HASH])
    keys = [c for c in job.columns if job.schema is not None and c not in job.schema.names]   # hive partition keys
    if keys:
        ds = ds.map_batches(hive_nulls, fn_kwargs={"columns": keys}, batch_format="pyarrow")
    if job.only_ids is not None:
        ds = ds.map_batches(keep_ids, fn_kwargs={"ids": job.only_ids, "column": job.config.id_column},
                            batch_format="pyarrow")
    if job.renames:
        ds = ds.map_batches(rename_columns, fn_kwargs={"renames": job.renames}, batch_format="pyarrow")
    return ds if job.limit is None else ds.limit(job.limit)


def hive_nulls(batch: pa.Table, columns: list[str]) -> pa.Table:
    """Spark's folder of a null partition value (key=__HIVE_DEFAULT_PARTITION__) as a null: Ray Data
    read it as that text, which a kept key or a prompt template then held."""
    for name in columns:
        column = batch.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            null = pc.equal(column, HIVE_NULL)
            batch = batch.set_column(batch.column_names.index(name), name,
                                     pc.if_else(null, pa.scalar(None, column.type), column))
    return batch


def run_prepared(job: PreparedJob) -> dict:
    """Runs a prepared job on the Ray cluster this process is connected to; returns (and writes
    beside the output) the summary. The output's lock (prepare_job's) is released at the end."""
    try:
        with patient_stores():      # the run, its counts and its summary: a store's blip must not end them
            return _run(job)
    finally:
        if job.output_lock is not None:
            job.output_lock.release()


def _run(job: PreparedJob) -> dict:
    opts = job.config.storage_options
    wall, reported = answer_rows(job) if job.has_rows else (0.0, None)
    if is_local(job.output_uri):        # an empty input's output is an empty folder, not none (its readers fail)
        fs, path = fsspec_fs(job.output_uri, opts)
        fs.makedirs(path, exist_ok=True)
    # a run without rows to answer left the output as prepare_job counted it
    after = output_counts(job.output_uri, opts, job.config.samples > 1, job.only_ids) if job.has_rows else job.before
    summary = summarize(job.input_uri, job.output_uri, job.before, after, wall, job.input_rows, reported,
                        scored=job.config.score_column is not None)
    summary.update(lost_rows_answered_again=job.lost_rows, limit=job.limit)
    if job.retried_rows:
        summary["error_rows_answered_again"] = job.retried_rows
    if job.generation_defaults:
        summary["settings_from_generation_config"] = job.generation_defaults
    if job.config.choices or job.config.choices_column:
        summary["answers_by_choice"] = answer_counts(job.output_uri, opts)
    if job.config.regex is not None or job.config.json_schema is not None:
        # answers --max-new-tokens ended before the pattern was whole
        summary["answers_cut_short"] = after["cut_short_rows"]
    write_text(sibling(job.output_uri, ".summary.json"), json.dumps(summary, indent=2), opts)
    return summary


@contextmanager
def failures_in_one_line():
    """The run ends with a failure's cause in one line, not Ray's remote traceback (hundreds of lines):
    an actor that could not start (StartFailed, naming the stage, "Generate": the model replicas), or a
    task or actor that failed, a node's death among the causes (RunFailed). A failed task's error is
    also of its cause's type, so a store's FileNotFoundError or PermissionError mid-run (a bucket
    removed, credentials revoked) read as a bad argument (exit 2)."""
    try:
        yield
    except ray.exceptions.RayError as e:    # RayTaskError, RayActorError, NodeDiedError, UnserializableException...
        stage = re.search(r"MapBatches\((\w+)\)", str(e))
        if isinstance(e, ray.exceptions.RayActorError) and getattr(e, "actor_init_failed", False):
            raise StartFailed(f"the run's {stage.group(1) + ' ' if stage else ''}actors could not start: "
                              f"{last_line(e)}") from None
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
        raise RunFailed(f"the run failed: {type(cause).__name__}: {redact_urls(last_line(cause))}") from None


def last_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[-1]


def answer_rows(job: PreparedJob) -> tuple[float, dict]:
    """The run on Ray Data: its rows read, answered and written; its wall time and its counts."""
    opts = job.config.storage_options
    check_nodes_share_paths(job.input_uri, job.output_uri, job.config)
    context = ray.data.DataContext.get_current()
    context.checkpoint_config = checkpoint_config(job.output_uri, opts, job.config.id_column)
    stats = RunCounter()
    try:
        with footer_readers_for(job.input_files, ray.cluster_resources().get("CPU")):
            rows = job_rows(job)
            start = time.perf_counter()
            answered = build_processor(job.config, stats.name, checkpoint_defaults=False)(rows)
            with failures_in_one_line():
                write_rows(answered, job.output_uri, opts, job.config.rows_per_file)
        wall = time.perf_counter() - start
    finally:
        context.checkpoint_config = None
        reported = stats.close()
        release_run()
    return wall, reported


def run_job(input_uri: str, output_uri: str, config: PipelineConfig, *, resume: bool = False,
            limit: int | None = None, retry_errors: str | None = None) -> dict:
    """Answer every row of `input_uri` into `output_uri` (with `limit`, only that many: a trial
    before the whole dataset, which a later resume completes; with `retry_errors`, a resume also
    answers again the error rows whose error holds that text, "" for all); returns (and writes
    beside it) the summary."""
    return run_prepared(prepare_job(input_uri, output_uri, config, resume=resume, limit=limit,
                                    retry_errors=retry_errors))


def summarize(input_uri: str, output_uri: str, before: dict, after: dict, wall: float, input_rows: int,
              reported: dict | None = None, scored: bool = False) -> dict:
    """The run in numbers, and the reconciliation a user needs at scale: input rows (those the run
    was to answer) with no output row (`missing_rows`) and output rows of an id written twice
    (`duplicate_rows`), both 0 unless something went wrong. Generated tokens are the model's: the
    rows that took a repeated question's answer (`shared_answer_rows`, `reported` by the replicas)
    are rows of the run, their tokens are not. A `scored` run's tokens are its rows' own texts,
    counted apart (`scored_tokens_*`): it generates none. `replicas`: the model replicas that answered
    this run's rows, by how they ran (device, dtype: "cpu float32": 1); one Ray started again counts again."""
    reported = reported or {}
    shared = reported.get("shared_answer_tokens", 0)
    rows = after["rows"] - before["rows"]
    tokens = after["generated_tokens"] - before["generated_tokens"] - shared
    rate = (lambda n: round(n / wall, 3) if wall > 0 else None)  # noqa: E731
    generated = 0 if scored else tokens
    summary = {"input": redact_url(input_uri), "output": redact_url(output_uri), "input_rows": input_rows,
               "missing_rows": after.get("missing", max(input_rows - after["ids"], 0)),
               "duplicate_rows": after["rows"] - after["ids"],
               "rows": after["rows"], "error_rows": after["error_rows"],
               "rows_this_run": rows, "generated_tokens_this_run": generated, "wall_s": round(wall, 3),
               "rows_per_s": rate(rows), "generated_tokens_per_s": rate(generated),
               "shared_answer_rows": reported.get("shared_answer_rows", 0), "shared_answer_tokens": shared,
               "replicas": replica_kinds(reported),
               "errors_by_kind": after["errors_by_kind"]}
    if scored:
        summary.update(scored_tokens_this_run=tokens, scored_tokens_per_s=rate(tokens))
    return summary
