"""One captioning/answering run: read -> process -> write, with resume and a summary of the run."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray.data

from .builder import build_processor
from .checkpoint import check_model
from .config import PipelineConfig
from .generate import release_replica_groups
from .io import input_dataset, input_folder, read_footers, read_output, read_rows, write_rows
from .ledger import remove_job_ledgers
from .manifest import keep_run_settings
from .resume import checkpoint_config, clear_checkpoint, forget_lost_rows, has_checkpoint
from .rows import error_kind, keep_ids
from .storage import has_files, lists_folders, reader_fs, sibling, write_text

COUNTED = ["id", "finish_reason", "error", "num_generated_tokens"]
ERROR_KINDS_SHOWN = 10
log = logging.getLogger(__name__)


def output_counts(output: str, storage_options: dict | None = None) -> dict:
    table = read_output(output, storage_options, columns=COUNTED)
    if table is None:
        return {"rows": 0, "ids": 0, "error_rows": 0, "generated_tokens": 0, "errors_by_kind": {}}
    failed = table.filter(pc.equal(table["finish_reason"], "error"))
    kinds = Counter(error_kind(m or "") for m in failed["error"].to_pylist())
    return {"rows": table.num_rows, "ids": pc.count_distinct(table["id"], mode="all").as_py(),
            "error_rows": failed.num_rows,
            "generated_tokens": pc.sum(table["num_generated_tokens"]).as_py() or 0,
            "errors_by_kind": dict(kinds.most_common(ERROR_KINDS_SHOWN))}


def prepare_output(output: str, storage_options: dict | None, resume: bool) -> None:
    """A fresh run needs an empty output; a resumed one needs the checkpoint of the run it continues."""
    written = has_files(output, storage_options)
    if not resume:
        if written:
            raise FileExistsError(f"output {output!r} already holds Parquet files: pass --resume to continue "
                                  "that run, or choose another output")
        clear_checkpoint(output, storage_options)
    elif written and not has_checkpoint(output, storage_options):
        raise FileNotFoundError(f"cannot resume into {output!r}: it has files but no checkpoint "
                                f"({output.rstrip('/')}.checkpoint) from a previous run of this job")


@contextmanager
def writing_output(output: str):
    """A store that refuses the output (a read-only folder, credentials without write rights) is named
    in one line, not met as a traceback (s3fs's "Access Denied" names no path)."""
    try:
        yield
    except PermissionError as e:
        raise PermissionError(f"output {output!r} cannot be written: {e}") from None


def release_run() -> None:
    """Driver side, after a run, finished or not: what its actors left on this node (the replicas'
    placement groups, the ledger files)."""
    release_replica_groups()
    remove_job_ledgers()


def with_image_root(config: PipelineConfig, input_uri: str) -> PipelineConfig:
    """Relative image paths of the rows are read from the input's folder unless `image_root` says otherwise."""
    return replace(config, image_root=config.image_root or input_folder(input_uri, config.storage_options))


def check_image_root(root: str | None, storage_options: dict | None) -> None:
    """A given `image_root` (local, or an object store's prefix) must exist: else every row naming
    its image by a relative path would become an error row, after the whole run. Other stores
    (HTTP) cannot say whether a folder exists, so they are not asked, nor is a store that refuses
    the listing."""
    if root is None or not lists_folders(root):
        return
    fs, path = reader_fs(root, storage_options)
    try:
        missing = not fs.isdir(path)
    except OSError:         # credentials that may read objects but not list them: not known, not refused
        return
    if missing:
        raise FileNotFoundError(f"image root {root!r}: no such folder (relative image paths of the rows "
                                "are read from it)")


def check_input_files(source: str, storage_options: dict | None) -> int:
    """The input's row count; refuses, before any work, an input with a file that cannot be read
    (Ray Data would fail the job when it reached it, hours in), naming every such file."""
    footers = read_footers(source, storage_options)
    bad = {path: why for path, why in footers.items() if isinstance(why, str)}
    if not bad:
        return sum(footers.values())
    named = "; ".join(f"{path} ({why})" for path, why in list(bad.items())[:5])
    raise ValueError(f"input {source!r}: {len(bad)} Parquet file(s) cannot be read, so nothing was started; "
                     f"repair or remove them: {named}")


def check_unique_ids(rows: pads.Dataset, source: str, column: str = "id") -> None:
    """Resume skips every input row whose id is already written, so two rows sharing an id (an image id
    given to several questions) would lose one of them on resume: refused before any work."""
    if column not in rows.schema.names:
        return
    ids = rows.to_table(columns=[column]).column(column)        # only that column is read
    if pc.count_distinct(ids, mode="all").as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    examples = ", ".join(f"{v['values']!r} x{v['counts']}" for v in repeated.slice(0, 3).to_pylist())
    raise ValueError(f"input {source!r}: {len(repeated)} ids occur more than once (e.g. {examples}); "
                     f"a resumed run would skip every row of an id already written. Make the `{column}` column "
                     "unique, or rename it (rows without `id` get ids from their file and row)")


def check_columns(names: list[str], config: PipelineConfig, source: str) -> None:
    """The rows (`names`: their columns, as the model stage gets them) must have the image column
    and every column `keep_columns` names."""
    names = set(names)
    if config.image_column not in names:
        raise ValueError(f"input {source!r} has no `{config.image_column}` column of images (columns: "
                         f"{sorted(names)}; --image-column names another)")
    if config.id_column != "id" and config.id_column not in names:
        raise ValueError(f"input {source!r} has no `{config.id_column}` column of ids (columns: {sorted(names)})")
    if config.question_column != "question" and config.question_column not in names:
        raise ValueError(f"input {source!r} has no `{config.question_column}` column of questions (columns: "
                         f"{sorted(names)})")
    missing = [c for c in config.keep_columns if c not in names]
    if missing:
        raise ValueError(f"--keep-columns {missing} are not columns of {source!r} (columns: {sorted(names)})")


Adapt = Callable[[pa.Table], pa.Table]


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
    only_ids: tuple[str, ...] | None = None     # answer only the rows of these ids
    adapt: Adapt | None = None                  # applied to each read batch (e.g. renames its columns)


def prepare_job(input_uri: str, output_uri: str, config: PipelineConfig, *, resume: bool = False,
                limit: int | None = None, only_ids: list[str] | None = None, adapt: Adapt | None = None) -> PreparedJob:
    """Every check a run can make without a cluster (bad arguments fail here, in seconds, naming the
    cause), and the output made ready: emptied checkpoint, or lost rows forgotten for a resume.

    `only_ids`: answer only the rows of these ids (as strings). `adapt`: a picklable function of each
    read batch, run before the pipeline; it must keep the ids (resume filters them before it), and
    the columns are checked as it leaves them."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if limit is not None and resume:
        # Ray Data pushes a limit down to the read, before the checkpoint's filter of rows already
        # written, so a resumed run with one would take rows it then skips.
        raise ValueError("limit is for a fresh run; resume without it to answer the rest")
    opts = config.storage_options
    check_model(config.model, opts, config.tensor_parallel_size)
    check_image_root(config.image_root, opts)
    config = with_image_root(config, input_uri)
    with writing_output(output_uri):
        prepare_output(output_uri, opts, resume)
    input_rows = check_input_files(input_uri, opts)
    rows = input_dataset(input_uri, opts)
    columns = rows.schema.names if adapt is None else adapt(rows.schema.empty_table()).column_names
    check_columns(columns, config, input_uri)
    check_unique_ids(rows, input_uri, config.id_column)
    with writing_output(output_uri):
        keep_run_settings(output_uri, config, resume, opts)
    lost = forget_lost_rows(output_uri, opts) if resume else 0
    if lost:
        log.warning("%d rows of an earlier run have no output row any more (a deleted output file?): "
                    "they are answered again", lost)
    wanted = input_rows if only_ids is None else len(set(only_ids))
    wanted = wanted if limit is None else min(wanted, limit)
    return PreparedJob(input_uri, output_uri, config, limit, wanted, lost, output_counts(output_uri, opts),
                       None if only_ids is None else tuple(only_ids), adapt)


def run_prepared(job: PreparedJob) -> dict:
    """Runs a prepared job on the Ray cluster this process is connected to; returns (and writes
    beside the output) the summary."""
    opts = job.config.storage_options
    context = ray.data.DataContext.get_current()
    context.checkpoint_config = checkpoint_config(job.output_uri, opts, job.config.id_column)
    try:
        ds = read_rows(job.input_uri, opts)
        if job.only_ids is not None:
            ds = ds.map_batches(keep_ids, fn_kwargs={"ids": job.only_ids, "column": job.config.id_column},
                                batch_format="pyarrow")
        if job.adapt is not None:
            ds = ds.map_batches(job.adapt, batch_format="pyarrow")
        if job.limit is not None:
            ds = ds.limit(job.limit)
        start = time.perf_counter()
        write_rows(build_processor(job.config)(ds), job.output_uri, opts, job.config.rows_per_file)
        wall = time.perf_counter() - start
    finally:
        context.checkpoint_config = None
        release_run()
    summary = summarize(job.input_uri, job.output_uri, job.before, output_counts(job.output_uri, opts), wall,
                        job.input_rows)
    summary.update(lost_rows_answered_again=job.lost_rows, limit=job.limit)
    write_text(sibling(job.output_uri, ".summary.json"), json.dumps(summary, indent=2), opts)
    return summary


def run_job(input_uri: str, output_uri: str, config: PipelineConfig, *, resume: bool = False,
            limit: int | None = None) -> dict:
    """Answer every row of `input_uri` into `output_uri` (with `limit`, only that many: a trial
    before the whole dataset, which a later resume completes); returns (and writes beside it) the
    summary."""
    return run_prepared(prepare_job(input_uri, output_uri, config, resume=resume, limit=limit))


def summarize(input_uri: str, output_uri: str, before: dict, after: dict, wall: float, input_rows: int) -> dict:
    """The run in numbers, and the reconciliation a user needs at scale: input rows (those the run
    was to answer) with no output row (`missing_rows`) and output rows of an id written twice
    (`duplicate_rows`), both 0 unless something went wrong."""
    rows, tokens = after["rows"] - before["rows"], after["generated_tokens"] - before["generated_tokens"]
    return {"input": input_uri, "output": output_uri, "input_rows": input_rows,
            "missing_rows": max(input_rows - after["ids"], 0), "duplicate_rows": after["rows"] - after["ids"],
            "rows": after["rows"], "error_rows": after["error_rows"],
            "rows_this_run": rows, "generated_tokens_this_run": tokens, "wall_s": round(wall, 3),
            "rows_per_s": round(rows / wall, 3) if wall > 0 else None,
            "generated_tokens_per_s": round(tokens / wall, 3) if wall > 0 else None,
            "errors_by_kind": after["errors_by_kind"]}
