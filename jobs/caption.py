"""Caption (or answer) every row of a Parquet dataset with an Idefics3-family checkpoint, on Ray.

    python -m jobs.caption --input s3://bucket/rows/ --output s3://bucket/captions --model path/to/ckpt
    ray job submit --working-dir . -- python -m jobs.caption --input ... --output ...

Flags may also come from `--config job.yaml` (same names); the command line wins. At the end a
summary (rows, error rows, rows/s, generated tokens/s, wall time) is printed and written to
`<output>.summary.json`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.common import (BAD_ARGUMENTS, DEMO_INPUT, DEMO_MODEL, DEMO_OUTPUT, Interrupted, add_run_flags, demo_path,
                         interrupted, json_option, merge_args, output_folder, print_error, print_rehearsal,
                         print_summary, run_failed, stop_on_signals)
from jobs.cluster import check_cluster_fits, init_ray
from pipeline.errors import RunFailed

DEFAULTS = dict(input=None, output=None, model=None, adapter=None, prompt="Describe this image.", system_prompt=None,
                prompt_template=None, prompt_suffix="", id_column="id", image_column="image", image_columns="",
                question_column="question", option_list_column=None, open_question_suffix=None,
                messages_column=None, max_new_tokens=64, min_new_tokens=0, temperature=0.0, top_p=1.0, top_k=0,
                min_p=0.0,
                typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, no_repeat_ngram_size=0,
                num_beams=1, length_penalty=1.0,
                early_stopping=False, logprobs=False, stop=None, bad_words=None, choices=None, choices_column=None,
                sampling_column=None, score_column=None, choice_logprobs=False, regex=None, json_schema=None, seed=None,
                samples=1, top_logprobs=0, replicas=None, tensor_parallel_size=1, cpu_workers=None,
                cpus_per_replica=None, batch_size=16, max_batch_size=64, batches_in_flight=None, keep_columns="",
                rows_per_file=1000, resume=False, retry_errors=None, limit=None, dry_run=None,
                image_backend="pil",
                image_longest_edge=None, image_splitting=None, storage_options=None, max_image_pixels=None, max_image_bytes=None,
                image_root=None, fetch_threads=16, fetch_attempts=3, fetch_timeout_s=60.0, step_timeout_s=600.0,
                compile_decode=None, device=None, dtype=None, show=5, generation_config="auto",
                bad_words_ids=None, sequence_bias=None, suppress_tokens=None, begin_suppress_tokens=None, min_length=0)


def early_stopping(text: str) -> bool | str:
    choices = {"true": True, "false": False, "never": "never"}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"--early-stopping takes true, false or never, got {text!r}")
    return choices[text.lower()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.caption", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", help=f"Parquet file, folder or glob; local, s3:// or any fsspec URL "
                                    f"(default: {DEMO_INPUT.relative_to(DEMO_INPUT.parents[2])})")
    ap.add_argument("--output", type=output_folder,
                    help="output folder of Parquet files (default: demo/output/captions)")
    ap.add_argument("--model", help="HF-layout checkpoint: a folder, its URL (s3://..., copied once per node) "
                                    "or a hub id (default: demo/model)")
    ap.add_argument("--adapter", help="a PEFT LoRA (or DoRA) adapter of --model: its folder or URL, merged "
                                      "into the weights as they load (a fine-tune published as an adapter)")
    ap.add_argument("--prompt", help="the user turn for rows without a question")
    ap.add_argument("--system-prompt", help="a system turn before every row's user turn (the checkpoint's chat "
                                            "template renders it; default: none)")
    ap.add_argument("--prompt-template", metavar="TEXT",
                    help="every row's question made of its columns, e.g. \"The photo's alt text is '{alt}'. Write a "
                         "detailed caption.\" (a row with a null in one of them is asked --prompt)")
    ap.add_argument("--prompt-suffix", help="appended to every row's question (or --prompt), e.g. "
                                            "' Answer with one word.' (default: none)")
    ap.add_argument("--id-column", help="the input column of row ids, the output's `id` (unique; default: id, "
                                        "else ids from each row's file and index)")
    ap.add_argument("--image-column", help="the input column of each row's image(s) (default: image)")
    ap.add_argument("--image-columns", metavar="A,B",
                    help="instead of --image-column: columns of an image each, a row's images their non-null cells "
                         "in this order (MMMU's image_1,...,image_7; NLVR2's left,right)")
    ap.add_argument("--question-column", help="the input column of each row's question; rows whose cell is "
                                              "null get --prompt (default: question, if there is one)")
    ap.add_argument("--option-list-column", metavar="NAME",
                    help="a column of each question's options as a list (or its text, as MMMU's `options`): listed "
                         "after the question, 'A. ...' a line each, as lmms-eval asks MMMU's; a row without options "
                         "is an open question")
    ap.add_argument("--open-question-suffix", metavar="TEXT",
                    help="with --option-list-column: the suffix of a row without options (default: --prompt-suffix)")
    ap.add_argument("--messages-column", metavar="NAME",
                    help="an input column of each row's conversation (Hugging Face chat messages: role and content, "
                         "{\"type\": \"image\"} parts standing for the row's images in order; or their JSON text): "
                         "its next assistant turn is answered, a last assistant turn answered again")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--min-new-tokens", type=int, metavar="N",
                    help="no answer ends (on its end-of-turn token) before N tokens (transformers' min_new_tokens: "
                         "longer captions from models that stop early; default 0)")
    ap.add_argument("--temperature", type=float, help="0 = greedy")
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (0 = all)")
    ap.add_argument("--min-p", type=float, help="sample no token less probable than min-p times the likeliest "
                                                "(transformers' and vLLM's min_p, e.g. 0.05; default 0 = none)")
    ap.add_argument("--typical-p", type=float, help="sample only among the tokens whose surprise is nearest the "
                                                    "entropy, this much probability mass (transformers' typical_p, "
                                                    "e.g. 0.9; default 1 = none)")
    ap.add_argument("--epsilon-cutoff", type=float, help="sample no token less probable than this but the likeliest "
                                                         "(transformers' epsilon_cutoff, e.g. 3e-4; default 0 = none)")
    ap.add_argument("--eta-cutoff", type=float, help="sample no token less probable than min(eta, sqrt(eta) * "
                                                     "exp(-entropy)) but the likeliest (transformers' eta_cutoff, "
                                                     "e.g. 2e-3; default 0 = none)")
    ap.add_argument("--repetition-penalty", type=float,
                    help="> 1 discourages tokens already in the prompt or the answer (as transformers' "
                         "repetition_penalty; 1.2 stops small models' loops; default 1 = none)")
    ap.add_argument("--presence-penalty", type=float,
                    help="taken off the logit of each token the answer holds already (vLLM's and OpenAI's "
                         "presence_penalty, in [-2, 2]: > 0 favours new words; default 0 = none)")
    ap.add_argument("--frequency-penalty", type=float,
                    help="taken off a token's logit once for each time the answer holds it (vLLM's and OpenAI's "
                         "frequency_penalty, in [-2, 2]: > 0 stops long captions' loops; default 0 = none)")
    ap.add_argument("--no-repeat-ngram-size", type=int, metavar="N",
                    help="no N tokens in a row twice in the prompt and answer (transformers' no_repeat_ngram_size: "
                         "3 or 4 stops long captions' loops; default 0 = none)")
    ap.add_argument("--num-beams", type=int, metavar="K",
                    help="beam search: the likeliest answer among K kept a step (transformers' num_beams; slower, "
                         "K slots a row); with --samples N (<= K), the N best beams; default 1 = greedy")
    ap.add_argument("--length-penalty", type=float,
                    help="beam search ranks answers by log-probability / length ** this (transformers' "
                         "length_penalty: > 0 favours longer answers, < 0 shorter; default 1)")
    ap.add_argument("--early-stopping", type=early_stopping, metavar="true|false|never",
                    help="beam search stops once K answers are finished (true), when a better one looks unlikely "
                         "(false, the default) or never before --max-new-tokens, as transformers' early_stopping")
    ap.add_argument("--stop", action="append", metavar="TEXT",
                    help="end an answer with the token that completes TEXT (repeatable; transformers' "
                         "stop_strings: the answer keeps it), e.g. --stop '.' for one sentence")
    ap.add_argument("--bad-words", action="append", metavar="TEXT",
                    help="no answer holds TEXT (repeatable; vLLM's bad_words, transformers' bad_words_ids: its tokens "
                         "as written and after a space), e.g. --bad-words 'The image shows' to keep that opening out "
                         "of captions")
    ap.add_argument("--choice", action="append", metavar="TEXT", dest="choices",
                    help="answer with one of these texts only (repeatable; vLLM's guided choice): each token must "
                         "keep the answer on the way to a choice, e.g. --choice yes --choice no to label images")
    ap.add_argument("--choices-column", help="an input column of each row's own choices (lists of text), for "
                                             "rows whose candidates differ; a null cell takes --choice's")
    ap.add_argument("--sampling-column", metavar="NAME",
                    help="an input column of each row's own decoding settings, overriding the job's for that row (a "
                         "struct, or JSON text: max_new_tokens, min_new_tokens, temperature, top_p, top_k, min_p, "
                         "typical_p, "
                         "epsilon_cutoff, eta_cutoff, repetition_penalty, presence_penalty, frequency_penalty, "
                         "seed, stop, choices, regex, json_schema, num_beams, length_penalty, bad_words; as "
                         "ray.data.llm's per-row sampling_params)")
    ap.add_argument("--score-column", metavar="NAME",
                    help="score each row's text in this column as its answer instead of answering: answer_logprob is "
                         "its log-probability given the image and question (caption filtering, reranking); "
                         "num_generated_tokens is its token count")
    ap.add_argument("--choice-logprobs", action="store_true", default=None,
                    help="add a choice_logprobs column: each choice's log-probability as the whole answer (both "
                         "spellings, then the end), for thresholds (p(yes) > 0.9) and ranked labels")
    ap.add_argument("--regex", metavar="PATTERN",
                    help="every answer matches PATTERN in full (Python's re syntax; vLLM's guided regex), e.g. "
                         "--regex '[0-9]+' to count objects")
    ap.add_argument("--json-schema", metavar="FILE_OR_JSON",
                    help="every answer is a JSON document this schema allows (a .json file, or the schema's text): "
                         "structured captions, e.g. objects with a label and a count")
    ap.add_argument("--logprobs", action="store_true", default=None,
                    help="add an answer_logprob column: the sum of the answer tokens' log-probabilities under "
                         "the model (a confidence score to filter captions by; divide by num_generated_tokens "
                         "for the mean)")
    ap.add_argument("--seed", type=int, help="sampling seed; each row's seed derives from it and the row id")
    ap.add_argument("--top-logprobs", type=int, metavar="K",
                    help="add a token_logprobs column: each answer token's id and log-probability and the K (<= 20) "
                         "likeliest tokens' at its step, as vLLM's logprobs (soft labels to distil a smaller model)")
    ap.add_argument("--samples", type=int, metavar="N",
                    help="sample N answers a row (needs --temperature > 0, or --num-beams >= N): list columns samples, "
                         "samples_finish_reason, samples_num_generated_tokens (and samples_logprob, samples_json); "
                         "the first sample is the row's answer, as without --samples (default 1)")
    ap.add_argument("--rows-per-file", type=int,
                    help="at least this many output rows a Parquet file, whole blocks gathered until they "
                         "hold them (default 1000; the last file holds the rest)")
    ap.add_argument("--keep-columns", help="comma-separated input columns to copy to the output")
    ap.add_argument("--resume", action="store_true", default=None, help="skip ids already in --output")
    ap.add_argument("--retry-errors", nargs="?", const="", metavar="TEXT",
                    help="resume --output and answer again its error rows (only those whose error or its kind, "
                         "as the summary counts them, holds TEXT in any case, e.g. 'read image' or 'TimeoutError', "
                         "if given): rows that failed for a passing reason, such as an image server's outage, "
                         "without re-running the rest")
    ap.add_argument("--limit", type=int, help="answer only N rows (a trial run into a fresh output; "
                                              "--resume then answers the rest)")
    ap.add_argument("--dry-run", type=int, nargs="?", const=64, metavar="N",
                    help="rehearse the job on this machine, writing nothing and loading no weights: every check "
                         "of a run, then the CPU stage on the input's first N rows (default 64): their images read "
                         "and tiled, their prompts tokenized; prints the rows that would fail and why, prompt "
                         "tokens and tiles, and what that makes of the whole input")
    add_run_flags(ap)
    ap.add_argument("--show", type=int, help="print this many output rows at the end (default 5)")
    ap.add_argument("--config", help="job.yaml (a path or URL) with any of the flags above, and the settings of "
                                     "token ids a generation config holds (bad_words_ids, sequence_bias, "
                                     "suppress_tokens, begin_suppress_tokens, min_length)")
    return ap


def pipeline_config(values: dict):
    from pipeline import PipelineConfig

    keys = set(PipelineConfig.field_names()) - {"storage_options"}
    config = {k: v for k, v in values.items() if k in keys}
    config["model"] = demo_path(values["model"], DEMO_MODEL, "model")
    config["json_schema"] = schema_text(values.get("json_schema"))
    return PipelineConfig(storage_options=json_option(values["storage_options"], "--storage-options"), **config)


def schema_text(value: str | dict | None) -> str | dict | None:
    """--json-schema's schema: a file's text, or the value itself where it is not a file's path (a
    job.yaml's mapping too)."""
    if value is None or isinstance(value, dict) or value.lstrip().startswith("{"):
        return value
    try:
        return Path(value).read_text()
    except OSError as e:
        raise ValueError(f"--json-schema {value!r} is neither a schema's JSON text nor a readable file ({e})") from None


def print_rows(output: str, storage_options: dict, n: int) -> None:
    """A few answered rows, so a person sees what the job wrote."""
    from pipeline.io import read_output

    if n <= 0:
        return
    table = read_output(output, storage_options, columns=["id", "question", "answer", "finish_reason", "error"],
                        limit=n)
    for row in ([] if table is None else table.to_pylist()):
        said = row["answer"] if row["finish_reason"] != "error" else f"<error: {row['error']}>"
        print(f"[{shown(str(row['id']))[1:-1]}] {shown(row['question'])} -> {shown(said)}")


def shown(value, limit: int = 300) -> str:
    """A dataset's text as a terminal should print it: escaped (an id's control sequences rewrote the
    terminal's lines) and cut (a question of 100 MB was printed whole)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def rehearse(source: str, output: str, config, values: dict) -> int:
    """--dry-run: the rehearsal's findings as JSON (jobs.common.print_rehearsal)."""
    from pipeline.dry_run import dry_run

    return print_rehearsal(dry_run(source, output, config, rows=values["dry_run"], resume=bool(values["resume"]),
                                   overwrite=values["overwrite"], limit=values["limit"],
                                   retry_errors=values["retry_errors"]))


def main(argv: list[str] | None = None) -> int:
    stop_on_signals()
    try:
        from pipeline.job import prepare_job, run_prepared     # 1-2.5 s of imports: a stop then is one line too

        parser = build_parser()
        values = merge_args(parser.parse_args(argv), DEFAULTS, parser)
        config = pipeline_config(values)
        source = demo_path(values["input"], DEMO_INPUT, "input")
        output = values["output"] or str(DEMO_OUTPUT)
        # the demo's own output starts over unless told to resume (as jobs.evaluate's demo does)
        values["overwrite"] = values["output"] is None and not values["resume"]
        if values["dry_run"] is not None:
            return rehearse(source, output, config, values)
        check_cluster_fits(config.cpu_workers, config.cpus_per_worker, config.device)
        job = prepare_job(source, output, config, resume=bool(values["resume"]), limit=values["limit"],
                          retry_errors=values["retry_errors"], overwrite=values["overwrite"])
        # only once the arguments are known good: a typo costs no cluster start
        if job.has_rows:
            init_ray(config.device)
        summary = run_prepared(job)
    except BAD_ARGUMENTS as e:
        print_error(e, build_parser())
        return 2
    except RunFailed as e:     # StartFailed too
        return run_failed(e)
    except (KeyboardInterrupt, Interrupted) as e:
        return interrupted(e, "the answers written are kept; the same command with --resume answers the rest")
    print_rows(output, config.storage_options, values["show"])
    return 0 if print_summary(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
