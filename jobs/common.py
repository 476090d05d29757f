"""Helpers shared by the job entry points: YAML job configs, JSON options, stops by signal, summaries."""
from __future__ import annotations

import argparse
import difflib
import json
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO_INPUT = REPO / "demo" / "data" / "sample.parquet"
DEMO_MODEL = REPO / "demo" / "model"
DEMO_OUTPUT = REPO / "demo" / "output" / "captions"


def add_run_flags(ap) -> None:
    """Flags of how the pipeline runs a model over rows (both jobs): replicas and their batches, the
    image recipe, where images are read from. Each defaults to None: the job's defaults (caption: its
    job.yaml, then DEFAULTS; evaluate: PipelineConfig's) fill in what is not given."""
    ap.add_argument("--replicas", type=int,
                    help="model replicas (default: one per --tensor-parallel-size GPUs of the cluster; without GPUs, "
                         "one a node)")
    ap.add_argument("--tensor-parallel-size", type=int, help="devices per replica (default 1)")
    ap.add_argument("--cpus-per-replica", type=float,
                    help="CPUs (torch threads) of each model replica (default: 1 beside a GPU; on a CPU-only "
                         "cluster the most the replicas fit on its nodes with 3 left for one preprocessing "
                         "actor and Ray Data's tasks: a 32-CPU node's replica 29)")
    ap.add_argument("--cpu-workers", type=int,
                    help="preprocessing actors (default: from 1 up to the cluster's spare CPUs, as the rows need)")
    ap.add_argument("--batch-size", type=int, help="rows per CPU-stage block; images per model call (default 16)")
    ap.add_argument("--max-batch-size", type=int, help="sequences a replica's engine decodes together (default 64)")
    ap.add_argument("--batches-in-flight", type=int,
                    help="blocks a replica answers at once, their rows sharing decode steps "
                         "(default: enough to fill --max-batch-size, plus one)")
    ap.add_argument("--step-timeout", type=float, dest="step_timeout_s",
                    help="seconds an engine step may run before its replica is restarted (a hung GPU or "
                         "collective; default 600, 0 = never)")
    ap.add_argument("--compile", dest="compile_decode", action=argparse.BooleanOptionalAction,
                    help="the decode step through torch.compile (default: on CUDA, where a replica's first step "
                         "compiles for ~2 minutes; --no-compile for short runs; off on CPU, where it is slower)")
    ap.add_argument("--generation-config", metavar="auto|none|PATH",
                    help="auto: the checkpoint's generation_config.json decides the decoding settings not given "
                         "(do_sample with its temperature, top_k, top_p; repetition_penalty, num_beams, "
                         "max_new_tokens, ...), as transformers' generate and vLLM take it (caption's default); "
                         "PATH: that .json file (or a folder's generation_config.json, local or by URL) does; "
                         "none: no file (evaluate's default: greedy, as benchmarks are scored)")
    ap.add_argument("--image-backend", choices=["pil", "torch"], help="reference image recipe (default pil)")
    add_image_flags(ap)
    ap.add_argument("--storage-options", help='JSON passed to fsspec, e.g. \'{"anon": true}\'')
    ap.add_argument("--max-image-pixels", type=int, help="larger images become error rows")
    ap.add_argument("--max-image-bytes", type=int,
                    help="larger image files become error rows, read no further than the limit (default 256 MiB)")
    ap.add_argument("--image-root", help="folder (local or URL) that relative image paths are read from "
                                         "(default: the input's folder)")
    ap.add_argument("--fetch-threads", type=int,
                    help="image paths/URLs a CPU worker reads at once (default 16)")
    ap.add_argument("--fetch-attempts", type=int,
                    help="tries of an image read that fails for a reason that may pass: timeout, "
                         "connection reset, throttling, HTTP 5xx (default 3)")
    ap.add_argument("--fetch-timeout", type=float, dest="fetch_timeout_s",
                    help="seconds an attempt to read an image (s3, gcs, http) may take (default 60)")
    ap.add_argument("--device", help="cuda / cpu (default: cuda when the cluster has GPUs)")
    ap.add_argument("--dtype", help=DTYPE_HELP)


def run_flag_names() -> list[str]:
    """The names (dests) of add_run_flags' flags."""
    ap = argparse.ArgumentParser()
    add_run_flags(ap)
    return list(vars(ap.parse_args([])))


def add_image_flags(ap) -> None:
    """Flags of the image recipe: fewer tiles an image for speed."""
    ap.add_argument("--image-longest-edge", type=int, metavar="PX",
                    help="resize images to this longest edge before tiling (the image processor's "
                         "size.longest_edge; default: the checkpoint's, e.g. 4*364 or 4*512): smaller means "
                         "fewer tiles and image tokens a row, so faster answers")
    ap.add_argument("--image-splitting", action=argparse.BooleanOptionalAction, default=None,
                    help="--no-image-splitting: one frame an image instead of its tiles and a thumbnail "
                         "(default: the checkpoint's do_image_splitting)")


# What a bad argument raises (a missing input, an output that exists or cannot be written, a bad
# value): the jobs print its message in one line and exit 2, with no traceback.
BAD_ARGUMENTS = (FileNotFoundError, FileExistsError, PermissionError, ValueError)


def print_error(error: BaseException | str, parser: argparse.ArgumentParser | None = None) -> None:
    """A job's one-line error, without the passwords, signatures or tokens of the URLs it quotes; with the
    job's `parser`, a setting the message begins with is named by its flag (the library's
    "max_new_tokens must be >= 1" is "--max-new-tokens must be >= 1" on the command line)."""
    from pipeline.shared_paths import job_working_copy
    from pipeline.storage import redact_urls

    message = str(error)
    if parser is not None:
        message = in_flag_words(message, parser)
    copy = job_working_copy()
    if isinstance(error, FileNotFoundError) and copy is not None:
        message += (f" (a submitted job runs on the cluster's head, in Ray's copy of its --working-dir, {copy}: "
                    "a relative path is read there, an absolute one on the head's disk)")
    print(f"error: {redact_urls(message)}", file=sys.stderr)


SETTING_FIRST = re.compile(r"(\w+)(?= must | is for |: )")


def in_flag_words(message: str, parser: argparse.ArgumentParser) -> str:
    flags = {action.dest: action.option_strings[-1] for action in parser._actions if action.option_strings}
    first = SETTING_FIRST.match(message)
    if first is None or first.group(1) not in flags:
        return message
    return flags[first.group(1)] + message[first.end():]


DTYPE_HELP = ("bfloat16 / float16 / float32 (default: bfloat16 on GPUs from Ampere on, float16 on older ones "
              "such as T4 and V100, float32 on CPU; a tensor-parallel replica's ranks ask their own GPUs)")


def read_config_text(path: str) -> str:
    """A job.yaml on this disk, or at a URL (s3://, as the data and the model may be: a job submitted to
    a cluster reads it from there); Path made s3://b/job.yaml 's3:/b/job.yaml', a file nowhere."""
    if "://" not in path:
        return Path(path).read_text()
    from pipeline.storage import fsspec_fs, reading_store

    with reading_store("job config", path):
        fs, inside = fsspec_fs(path, None)
        return fs.cat_file(inside).decode()


def load_job_config(path: str | None) -> dict[str, Any]:
    """A job.yaml of flag names (dashes or underscores) -> values."""
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(read_config_text(path)) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"job config {path!r} is not YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"job config {path!r} must be a mapping of flag names to values")
    return {key.replace("-", "_"): value for key, value in data.items()}


def flag_names(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each long flag's name as a job.yaml key (`--step-timeout`: step_timeout) -> its action."""
    return {option[2:].replace("-", "_"): action for action in parser._actions
            for option in action.option_strings if option.startswith("--")}


def by_destination(parser: argparse.ArgumentParser, values: dict[str, Any], source: str) -> dict[str, Any]:
    """A job.yaml's keys spelled as their flags (`step-timeout`, `choice`, `no-compile`,
    `no-image-splitting`) as the settings they set (step_timeout_s, choices, compile_decode: false,
    image_splitting: false); a switch's `false` is the flag not given."""
    out = {}
    for key, value in values.items():
        action = flag_names(parser).get(key)
        if action is None or key == action.dest:
            out[key] = value
        elif action.nargs != 0:
            out[action.dest] = value
        elif not isinstance(value, bool):
            raise ValueError(f"job config {source!r}: {key}: {value!r} is not true or false")
        elif isinstance(action, argparse.BooleanOptionalAction):
            out[action.dest] = value != key.startswith("no_")
        elif value:
            out[action.dest] = action.const
    return out


PURE_TEXT = {"prompt", "prompt_template", "prompt_suffix", "system_prompt", "model", "adapter", "input", "output",
             "image_root", "regex", "id_column", "image_column", "question_column", "messages_column",
             "choices_column", "sampling_column", "score_column", "option_list_column",
             "open_question_suffix"}     # a YAML mapping or list is no value of theirs


def typed_values(parser: argparse.ArgumentParser, values: dict[str, Any], source: str) -> dict[str, Any]:
    """A job.yaml's values as its flags would take them (`limit: '3'` is 3); one the flag would refuse
    (`temperature: hot`, `resume: 'false'`, `stop: 5`) is a ValueError naming it."""
    actions = {a.dest: a for a in parser._actions}
    typed = {key: value for key, value in values.items() if value is not None or key not in actions}  # null: default
    for key, value in values.items():
        action = actions.get(key)
        if action is None or value is None:
            continue
        wrong = f"job config {source!r}: {key}: {value!r} is not "
        if action.nargs == 0:           # a switch (--resume, --compile / --no-compile)
            if not isinstance(value, bool):
                raise ValueError(wrong + "true or false")
        elif isinstance(action, argparse._AppendAction):        # repeatable: one text, or a list of them
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in items):
                quote = " (YAML reads yes, no, on, off as true or false: quote them)" if any(
                    isinstance(v, bool) for v in items) else ""
                raise ValueError(wrong + "a text or a list of texts" + quote)
        elif action.type is None:       # text (JSON options may be YAML mappings, kept columns a list)
            if isinstance(value, (dict, list)) and key in PURE_TEXT:
                raise ValueError(wrong + "a text" + (" (YAML reads {question} as a mapping: quote it)"
                                                     if isinstance(value, dict) else ""))
            typed[key] = value if isinstance(value, (str, dict, list)) else str(value)
        else:
            kind = {int: "an integer", float: "a number"}.get(action.type, "a value")
            try:
                if isinstance(value, (list, dict)):
                    raise ValueError
                typed[key] = action.type(str(value))
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                raise ValueError(wrong + f"{kind}, as {action.option_strings[0]} takes") from None
    return typed


def merge_args(args: argparse.Namespace, defaults: dict[str, Any],
               parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """Command line > job.yaml > defaults. Flags are declared with default None to tell them apart;
    `given_settings` names the decoding settings given either way (the checkpoint's
    generation_config.json replaces none of them, even one given at its default value). `parser`:
    the job's, whose flags type the job.yaml's values (typed_values)."""
    from pipeline.generation_defaults import SETTINGS

    from_file = load_job_config(getattr(args, "config", None))
    if parser is not None:
        from_file = typed_values(parser, by_destination(parser, from_file, args.config), args.config)
    unknown = set(from_file) - set(defaults)
    if unknown:
        known = sorted(set(defaults) | set(flag_names(parser))) if parser is not None else sorted(defaults)
        hints = [f"{key} (did you mean {', '.join(close)}?)" if close else key
                 for key in sorted(unknown) for close in [difflib.get_close_matches(key, known, 2)]]
        raise ValueError(f"unknown keys in {args.config!r}: {', '.join(hints)}")
    merged = dict(defaults)
    merged.update(from_file)
    given = {k: v for k, v in vars(args).items() if v is not None and k in defaults}
    merged.update(given)
    merged["given_settings"] = sorted((given.keys() | from_file.keys()) & SETTINGS)
    if merged.get("retry_errors") is not None:      # answering an output's error rows again resumes its run
        merged["resume"] = True
    return merged


def json_option(text: str | dict | None, name: str) -> dict:
    if text is None or isinstance(text, dict):
        return text or {}
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a JSON object, got {text!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} must be a JSON object: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def output_folder(value: str) -> str:
    """--output's type: a local path made absolute, a URL as it is (pipeline.storage.absolute_location)."""
    from pipeline.storage import absolute_location

    return absolute_location(value)


def demo_path(value: str | None, default: Path, what: str) -> str:
    """The given path, else the bundled demo one, which must exist."""
    if value:
        return str(value)
    if not default.exists():
        raise FileNotFoundError(f"no {what} given and the demo {what} {default} is missing: pass --{what}")
    return str(default)


class Interrupted(BaseException):
    """A stop asked of the job by a signal (not an Exception: nothing that handles a row's failure
    takes it for one)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """SIGTERM (a scheduler's stop, `timeout`) and SIGHUP (a closed terminal) end the job as Ctrl-C
    does: the clean-up runs (placement groups, ledgers) and the job says it was stopped. Installed
    again after ray.init, whose own SIGTERM handler exits without a word. A signal the job was started
    ignoring stays ignored: `nohup`'s SIGHUP stopped a job that was to outlive its terminal."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, _raise_interrupted)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)     # Ctrl-C, a scheduler's stop, a closed terminal


@contextmanager
def stops_held() -> Iterator[None]:
    """A stop asked by a signal inside the block is raised once it ends (KeyboardInterrupt for Ctrl-C, else
    Interrupted): inside ray.init, Ctrl-C could land in logging's at-fork lock release, where Python
    ignores the exception and the lock stays held (the job hung)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = {signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in STOP_SIGNALS
              if signal.getsignal(signum) is not signal.SIG_IGN}       # nohup's SIGHUP, a background job's SIGINT
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)    # None: set outside Python
    if held:
        raise KeyboardInterrupt if held[0] == signal.SIGINT else Interrupted(held[0])


def interrupted(error: BaseException, then: str) -> int:
    """The job's one line on a stop asked by a signal (Ctrl-C's KeyboardInterrupt, or Interrupted);
    later signals are ignored, so that Ray's own shutdown is not cut short. 128 + the signal number."""
    signum = getattr(error, "signum", signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        for each in STOP_SIGNALS:
            signal.signal(each, signal.SIG_IGN)
    print_error(f"stopped by {signal.Signals(signum).name}: {then}")
    return 128 + signum


def run_failed(error: BaseException) -> int:
    """The job's one line on a run that ended on a failure of its own (pipeline.errors): exit 1."""
    print_error(f"{error} (the answers written are kept: the same command with --resume answers the rest)")
    return 1


def print_rehearsal(found: dict) -> int:
    """Prints a dry run's findings (pipeline.dry_run) as JSON; the exit status: 1 if every row tried would fail."""
    print(json.dumps(found, indent=2, ensure_ascii=False))
    return 1 if found["rows_tried"] and found["error_rows"] == found["rows_tried"] else 0


def print_summary(summary: dict) -> bool:
    """Prints the run's summary; False (and says so) when the output does not hold every input row once."""
    limited = " (--limit)" if summary.get("limit") else ""
    print(f"rows {summary['rows']} of {summary['input_rows']} input rows{limited} ({summary['error_rows']} errors) | "
          f"this run: {summary['rows_this_run']} rows in {summary['wall_s']:.1f}s = {summary['rows_per_s']} rows/s, "
          + (f"{summary['scored_tokens_per_s']} scored tokens/s" if "scored_tokens_per_s" in summary else
             f"{summary['generated_tokens_per_s']} generated tokens/s"))
    kinds = summary.get("errors_by_kind") or {}
    if kinds:
        print("errors: " + "; ".join(f"{n} x {kind}" for kind, n in kinds.items()))
    answers = summary.get("answers_by_choice")
    if answers:
        print("answers: " + "; ".join(f"{n} x {answer!r}" for answer, n in answers.items()))
    if summary.get("answers_cut_short"):
        print(f"{summary['answers_cut_short']} answers were cut short by --max-new-tokens before they matched "
              "the pattern or schema in full (finish_reason 'length')")
    taken = summary.get("settings_from_generation_config")
    if taken:
        from pipeline.generation_defaults import listed_settings
        print("decoding took from the generation config: " + listed_settings(taken))
    if summary.get("shared_answer_rows"):
        print(f"{summary['shared_answer_rows']} rows asked a question already asked about the same image with "
              "the same settings and took its answer (their tokens are not in the generated tokens/s)")
    if summary.get("error_rows_answered_again"):
        print(f"{summary['error_rows_answered_again']} error rows of the earlier run were answered again "
              f"({summary['error_rows']} error rows now)")
    if summary.get("lost_rows_answered_again"):
        print(f"{summary['lost_rows_answered_again']} rows whose output file was lost since the earlier run "
              "were answered again")
    problem = incomplete_output(summary, "input rows")
    if problem:
        print(f"error: the output does not hold every input row once: {problem}", file=sys.stderr)
    print(json.dumps(summary))
    return problem is None


def incomplete_output(summary: dict, rows: str) -> str | None:
    """What is wrong with an output that does not hold each of the `rows` once, and what to do."""
    missing, repeated = summary["missing_rows"], summary["duplicate_rows"]
    said = [f"{missing} {rows} have no output row (run again with --resume to answer them)"] * bool(missing)
    said += [f"{repeated} output rows repeat an id (files of another run or copies in the output folder? "
             "--resume does not remove them)"] * bool(repeated)
    return "; ".join(said) or None
