"""The checkpoint's generation_config.json decides the decoding settings a run leaves at their
defaults, as transformers' generate (and ours) reads it; `generation_config="none"` ignores it."""
import json
import logging
import shutil

import pytest

from pipeline import PipelineConfig
from pipeline.checkpoint import generation_config_of
from pipeline.generation_defaults import checkpoint_settings, with_checkpoint_defaults
from tests.pipeline.helpers import good_rows, write_parquet


def with_generation_config(checkpoint, tmp_path, settings: dict):
    """A copy of `checkpoint` whose generation_config.json also holds `settings`."""
    folder = tmp_path / "tuned"
    shutil.copytree(checkpoint, folder)
    path = folder / "generation_config.json"
    found = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**found, **settings}))
    return folder


def test_sampling_settings_count_only_with_do_sample_and_then_as_transformers_defaults_them():
    assert checkpoint_settings({"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 20}) == {"max_new_tokens": 20}
    assert checkpoint_settings({"do_sample": True, "top_p": 0.9}) == {"temperature": 1.0, "top_k": 50, "top_p": 0.9}
    assert checkpoint_settings({"do_sample": True, "temperature": 0.6, "top_k": 0, "min_p": 0.1,
                                "stop_strings": "."}) == {"temperature": 0.6, "top_k": 0, "min_p": 0.1, "stop": ["."]}
    assert checkpoint_settings({"repetition_penalty": 1.2, "num_beams": 3, "early_stopping": True}) == {
        "repetition_penalty": 1.2, "num_beams": 3, "early_stopping": True}
    # settings of a way of decoding the run does not use are not taken (they would change nothing)
    assert with_checkpoint_defaults(PipelineConfig(model="m"), {"early_stopping": True, "length_penalty": 2.0,
                                                                 "top_p": 0.5})[1] == {}
    assert with_checkpoint_defaults(PipelineConfig(model="m"), {"early_stopping": True, "num_beams": 2})[1] == {
        "num_beams": 2, "early_stopping": True}


def test_the_jobs_own_settings_win_and_none_ignores_the_file(caplog):
    tuned = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.3, "max_new_tokens": 30,
             "bos_token_id": 1, "eos_token_id": [2, 3], "transformers_version": "5.0", "guidance_scale": 1.5}
    config, taken = with_checkpoint_defaults(PipelineConfig(model="m", top_p=0.5, max_new_tokens=12), tuned)
    assert taken == {"temperature": 0.6, "top_k": 50, "repetition_penalty": 1.3}
    assert (config.temperature, config.top_k, config.top_p, config.repetition_penalty, config.max_new_tokens) == (
        0.6, 50, 0.5, 1.3, 12)
    assert "guidance_scale=1.5" in caplog.text        # what a run cannot follow is named
    assert "eos_token_id" not in caplog.text
    caplog.clear()                                    # a file named by URL is named without its secrets
    with_checkpoint_defaults(PipelineConfig(model="m"), tuned, "https://alice:pw0@h/gen.json?token=t0")
    assert "generation config 'https://***@h/gen.json?token=***'" in caplog.text
    assert "pw0" not in caplog.text and "t0" not in caplog.text
    ignored = PipelineConfig(model="m", generation_config="none")
    assert with_checkpoint_defaults(ignored, tuned) == (ignored, {})
    with pytest.raises(ValueError, match="generation_config must be 'auto', 'none' or a file's path"):
        PipelineConfig(model="m", generation_config="")


def test_a_flag_given_at_its_default_value_still_wins(tmp_path):
    """`--temperature 0` (or job.yaml's temperature: 0) is greedy even where the file samples."""
    from jobs.caption import DEFAULTS, parse_args, pipeline_config
    from jobs.common import merge_args

    (tmp_path / "job.yaml").write_text("top-k: 0\n")
    values = merge_args(parse_args(["--model", "m", "--temperature", "0", "--seed", "3", "--config",
                                    str(tmp_path / "job.yaml")]), DEFAULTS)
    config = pipeline_config(values)
    assert config.given_settings == ["temperature", "top_k"]
    sampling = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.9}
    resolved, taken = with_checkpoint_defaults(config, sampling)
    assert taken == {} and (resolved.temperature, resolved.top_k, resolved.top_p) == (0.0, 0, 1.0)   # greedy
    assert with_checkpoint_defaults(pipeline_config(merge_args(parse_args(["--model", "m"]), DEFAULTS)),
                                    sampling)[1] == {"temperature": 0.6, "top_k": 20, "top_p": 0.9}


def test_a_generation_config_named_by_path_is_the_one_read(checkpoint, tmp_path):
    """--generation-config PATH: that .json file, or a folder's generation_config.json; one not there
    is refused, named; its impossible settings are named by its path."""
    from pipeline.generation_defaults import resolved

    chosen = tmp_path / "sampling.json"
    chosen.write_text(json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.8}))
    config, taken = resolved(PipelineConfig(model=str(checkpoint), generation_config=str(chosen)))
    assert taken == {"temperature": 0.7, "top_k": 50, "top_p": 0.8} and config.temperature == 0.7
    folder = with_generation_config(checkpoint, tmp_path, {"repetition_penalty": 1.4})
    assert resolved(PipelineConfig(model=str(checkpoint), generation_config=str(folder)))[1] == {
        "repetition_penalty": 1.4}
    with pytest.raises(FileNotFoundError, match="generation_config '.*missing.json': no such file"):
        resolved(PipelineConfig(model=str(checkpoint), generation_config=str(tmp_path / "missing.json")))
    chosen.write_text(json.dumps({"do_sample": True, "num_beams": 3}))
    with pytest.raises(ValueError, match=r"generation config '.*sampling.json' sets num_beams=3"):
        resolved(PipelineConfig(model=str(checkpoint), generation_config=str(chosen)))


def test_a_file_that_makes_the_run_impossible_is_named():
    with pytest.raises(ValueError, match=r"generation_config.json sets min_new_tokens=5.*choices.*"
                                         r"--generation-config none"):
        with_checkpoint_defaults(PipelineConfig(model="m", choices=["yes", "no"]), {"min_new_tokens": 5})
    with pytest.raises(ValueError, match="generation_config.json sets num_beams=4, temperature=0.7"):
        with_checkpoint_defaults(PipelineConfig(model="m"), {"do_sample": True, "temperature": 0.7, "num_beams": 4})


def test_a_scoring_run_takes_nothing_of_the_file(caplog):
    """It decodes nothing: a fine-tune's num_beams or stop_strings refused it, its temperature was announced."""
    scoring = PipelineConfig(model="m", score_column="caption")
    for file in ({"num_beams": 3}, {"stop_strings": ["."]}, {"do_sample": True, "temperature": 0.6}):
        with caplog.at_level(logging.WARNING):
            assert with_checkpoint_defaults(scoring, file) == (scoring, {})
    assert "decoding as" not in caplog.text


def test_the_file_is_read_from_a_folder_the_hub_cache_and_refused_when_it_is_not_json(checkpoint, tmp_path,
                                                                                   monkeypatch):
    from huggingface_hub import constants

    from model.files import CheckpointError
    from tests.pipeline.test_checkpoint import hub_cache

    folder = with_generation_config(checkpoint, tmp_path, {"repetition_penalty": 1.5})
    assert generation_config_of(str(folder))["repetition_penalty"] == 1.5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "owner/tuned", folder)))
    assert generation_config_of("owner/tuned")["repetition_penalty"] == 1.5
    (folder / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="generation_config.json is not a JSON object"):
        generation_config_of(str(folder))
    (folder / "generation_config.json").unlink()
    assert generation_config_of(str(folder)) == {}


def test_a_run_answers_as_the_checkpoints_own_generate(ray_cluster, checkpoint, tmp_path, caplog):
    """A checkpoint whose generation_config.json asks for a repetition penalty and no repeated
    bigram: the run's answers equal transformers' generate on that checkpoint (which reads the file
    itself), not the plain checkpoint's; the summary and the dry run say what was taken; with
    generation_config="none" the answers are the plain ones."""
    from pipeline import read_output, run_job
    from pipeline.dry_run import dry_run
    from tests.pipeline.helpers import Oracle

    caplog.set_level(logging.WARNING)
    tuned = with_generation_config(checkpoint, tmp_path, {"repetition_penalty": 3.0, "no_repeat_ngram_size": 2,
                                                          "max_new_tokens": 10})
    rows = good_rows(3)
    write_parquet(tmp_path / "in" / "part-0.parquet", rows)
    config = PipelineConfig(model=str(tuned), batch_size=3)
    taken = {"repetition_penalty": 3.0, "no_repeat_ngram_size": 2, "max_new_tokens": 10}
    rehearsed = dry_run(str(tmp_path / "in"), str(tmp_path / "out"), config, rows=3)
    assert rehearsed["settings_from_generation_config"] == taken
    assert {k: rehearsed["decoding"][k] for k in taken} == taken and rehearsed["decoding"]["temperature"] == 0.0
    summary = run_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    assert summary["settings_from_generation_config"] == taken
    assert "decoding as the checkpoint's generation_config.json asks" in caplog.text
    got = {r["id"]: (r["answer"], r["num_generated_tokens"]) for r in read_output(str(tmp_path / "out")).to_pylist()}
    own, plain = Oracle(tuned), Oracle(checkpoint)
    want = {r["id"]: own.answer(r["image"], r["question"] or config.prompt, None) for r in rows}
    assert got == want
    assert want != {r["id"]: plain.answer(r["image"], r["question"] or config.prompt, 10) for r in rows}
    import ray.data

    from pipeline import build_processor
    built = build_processor(config)(ray.data.read_parquet(str(tmp_path / "in"))).take_all()     # the library's way
    assert {r["id"]: (r["answer"], r["num_generated_tokens"]) for r in built} == want
    ignored = PipelineConfig(model=str(tuned), batch_size=3, generation_config="none", max_new_tokens=10)
    summary = run_job(str(tmp_path / "in"), str(tmp_path / "plain"), ignored)
    assert "settings_from_generation_config" not in summary
    got = {r["id"]: (r["answer"], r["num_generated_tokens"]) for r in read_output(str(tmp_path / "plain")).to_pylist()}
    assert got == {r["id"]: plain.answer(r["image"], r["question"] or config.prompt, 10) for r in rows}


def test_settings_of_token_ids_take_the_files_forms_and_min_length_counts_each_rows_prompt():
    config = PipelineConfig(model="m", sequence_bias={"5": -2, (3, 4): 1.5}, suppress_tokens=[1, 1, 2],
                            begin_suppress_tokens=7, bad_words_ids=[(3, 4)], min_length=10, max_new_tokens=8)
    assert config.sequence_bias == [[[5], -2.0], [[3, 4], 1.5]]        # JSON's form: the manifest compares it
    assert (config.suppress_tokens, config.begin_suppress_tokens, config.bad_words_ids) == ([1, 2], [7], [[3, 4]])
    assert [config.min_new_tokens_for(prompt, 0, 8) for prompt in (4, 9, 12, 1)] == [6, 1, 0, 8]
    assert config.min_new_tokens_for(4, 2, 8) == 2                      # min_new_tokens wins, as transformers'
    for bad, match in ((dict(min_length=-1), "min_length must be"), (dict(sequence_bias=[[5]]), "sequence_bias"),
                       (dict(bad_words_ids=[[]]), "bad_words_ids"), (dict(suppress_tokens=["a"]), "suppress_tokens"),
                       (dict(min_length=3, choices=["a"]), "min_length cannot be combined with choices")):
        with pytest.raises(ValueError, match=match):
            PipelineConfig(model="m", **bad)
    taken = with_checkpoint_defaults(PipelineConfig(model="m"), {"suppress_tokens": [4], "min_length": 30})[1]
    assert taken == {"suppress_tokens": [4], "min_length": 30}


def test_a_run_follows_the_files_token_settings_as_transformers_does(ray_cluster, checkpoint, oracle, tmp_path):
    """suppress_tokens, begin_suppress_tokens, sequence_bias, bad_words_ids and min_length (which
    counts the prompt) from the file: each row's answer is transformers' generate's on that checkpoint."""
    from pipeline import read_output, run_job
    from tests.pipeline.helpers import Oracle

    rows = good_rows(3)
    write_parquet(tmp_path / "in" / "part-0.parquet", rows)
    asked = [(r["image"], r["question"] or PipelineConfig(model="m").prompt) for r in rows]
    first = [oracle.new_tokens(*row, 8) for row in asked]
    settings = {"max_new_tokens": 8, "begin_suppress_tokens": [first[0][0]], "suppress_tokens": [first[1][1]],
                "sequence_bias": [[[first[1][0]], -8.0], [[first[0][1], first[0][2]], 6.0]],
                "bad_words_ids": [[first[0][2], first[0][3]]]}
    biased = Oracle(with_generation_config(checkpoint, tmp_path / "biased", settings))
    assert sum(biased.new_tokens(*row, None) != first[i] for i, row in enumerate(asked)) >= 2
    eos = oracle.model.generation_config.eos_token_id
    stop = biased.new_tokens(*asked[2], None)[1]        # row 2 would end at its second token...
    settings.update(eos_token_id=(eos if isinstance(eos, list) else [eos]) + [stop],
                    min_length=oracle.inputs(*asked[2])["input_ids"].shape[1] + 5)     # ... but not before 5
    tuned = with_generation_config(checkpoint, tmp_path, settings)
    summary = run_job(str(tmp_path / "in"), str(tmp_path / "out"), PipelineConfig(model=str(tuned), batch_size=3))
    assert summary["settings_from_generation_config"] == {k: v for k, v in settings.items() if k != "eos_token_id"}
    got = {r["id"]: (r["answer"], r["num_generated_tokens"]) for r in read_output(str(tmp_path / "out")).to_pylist()}
    own = Oracle(tuned)
    want = {r["id"]: own.answer(*row, None) for r, row in zip(rows, asked)}
    assert got == want
    assert own.answer(*asked[2], None, min_length=0)[1] <= 2 < want["row-2"][1]        # min_length held row 2
