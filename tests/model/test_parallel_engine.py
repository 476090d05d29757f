"""Tensor parallelism end to end: separate processes joined by gloo, rank 0 driving TPEngine.

Against TP=1 (our plain model and LLMEngine): logits within 1e-4, identical greedy tokens, identical
seeded samples, ranks in lockstep, about 1/tp of the sharded parameters on each rank, clean exit.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import Idefics3ForConditionalGeneration
from model.parallel import TPEngine
from tests.model.parallel_cases import batch_inputs, reference_tokens, requests

torch.set_num_threads(1)

# idefics3: 4 query / 2 KV heads (tp 4 replicates KV heads); tp_mqa: 6 / 1 (every tp replicates it),
# tied embeddings, and tp 3 leaves the 448-token vocabulary uneven.
CASES = [("idefics3", 2), ("idefics3", 4), ("tp_mqa", 2), ("tp_mqa", 3)]


@pytest.mark.parametrize("name,tp", CASES)
def test_tp_matches_tp1(checkpoint, name, tp):
    path = checkpoint(name)
    plain = Idefics3ForConditionalGeneration.from_pretrained(path)
    inputs = batch_inputs(path)
    with torch.inference_mode():
        want_logits = plain(**inputs).logits
    greedy, sampled = requests(path), requests(path, temperature=0.9, top_k=50, top_p=0.95, seed=11)
    want_greedy, want_sampled = reference_tokens(plain, greedy), reference_tokens(plain, sampled)

    with TPEngine(path, tp, cpu_threads=1, timeout_s=120) as engine:
        processes = list(engine.processes)
        got_logits = engine.logits(**inputs)
        got_greedy = [r.token_ids for r in engine.generate(greedy)]
        got_sampled = [r.token_ids for r in engine.generate(sampled)]
        stats = engine.shard_stats()
        unseeded = [r.token_ids for r in engine.generate(requests(path, temperature=1.0))]
        unseeded_stats = engine.shard_stats()

    assert got_logits.shape == want_logits.shape
    assert (got_logits - want_logits).abs().max().item() <= 1e-4
    assert got_greedy == want_greedy
    assert got_sampled == want_sampled
    assert [s["rank"] for s in stats] == list(range(tp))
    assert all(s["last_tokens"] == got_sampled for s in stats)              # every rank sampled alike
    assert all(s["last_tokens"] == unseeded for s in unseeded_stats)       # even with seeds drawn by rank 0
    whole = sum(p.numel() for p in plain.parameters() if p.dim() >= 1)
    assert all(s["sharded_params"] < 1.1 * whole / tp for s in stats)
    assert len(processes) == tp - 1 and all(p.exitcode == 0 for p in processes)   # followers left cleanly


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_tp2_compiled_decode_matches_tp1(checkpoint):
    """The compiled decode step (the CUDA default) traces whole with the collectives inside it."""
    path = checkpoint("idefics3")
    plain = Idefics3ForConditionalGeneration.from_pretrained(path)
    reqs = requests(path)
    with TPEngine(path, 2, cpu_threads=1, timeout_s=300, compile=True) as engine:
        got = [r.token_ids for r in engine.generate(reqs)]
        stats = engine.shard_stats()
    assert got == reference_tokens(plain, reqs)
    assert [s["compiled_decode"] for s in stats] == [True, True]


@pytest.mark.parametrize("cuda_defaults", [False, True], ids=["cpu_defaults", "cuda_defaults_but_compile"])
def test_tp2_streamed_batches_match_tp1(checkpoint, cuda_defaults):
    """Batches submitted while others run join rank 0's decode steps (EngineLoop over the group):
    every rank adds and steps alike, answers equal TP=1's, a bad row fails alone. Also with a decode
    step in flight while the next is queued, and padded-group prefill (CUDA's defaults)."""
    from dataclasses import replace

    from tokenizers import Tokenizer

    from model.engine import LLMEngine, Request

    path = checkpoint("idefics3")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    plain = Idefics3ForConditionalGeneration.from_pretrained(path)
    long, short = requests(path, max_new_tokens=12), requests(path, max_new_tokens=3)
    sampled = requests(path, max_new_tokens=7, temperature=0.9, top_k=50, seed=5)
    penalized = requests(path, max_new_tokens=6, repetition_penalty=1.6, logprobs=True)
    texts = [tokenizer.decode(t, skip_special_tokens=False) for t in reference_tokens(plain, long)]
    stopped = [replace(r, sampling=replace(r.sampling, stop=[text[2:4] or "x"])) for r, text in zip(long, texts)]
    chosen = [replace(r, sampling=replace(r.sampling, choices=("red circle", "blue square", "green"), choice_logprobs=True))
              for r in long]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}}}
    patterned = [replace(r, sampling=replace(r.sampling, **(dict(json_schema=schema) if j % 2 else dict(regex="[a-z ]+."))))
                 for j, r in enumerate(long)]
    several = requests(path, max_new_tokens=6, temperature=1.2, top_k=50, seed=9, n=3, logprobs=True, top_logprobs=2)
    continued = [replace(r, continuation_ids=[5 + j, 6, 7], sampling=replace(r.sampling, max_new_tokens=2 * (j % 2)))
                 for j, r in enumerate(long)]
    searched = requests(path, max_new_tokens=6, num_beams=3, n=2, logprobs=True)
    parts = [long, short, sampled, penalized, stopped, chosen, patterned, several, continued, searched]
    want = {(i, j): tokens for i, part in enumerate(parts[:4]) for j, tokens in enumerate(reference_tokens(plain, part))}
    alone = {}
    for i in (4, 5, 6, 7, 8, 9):   # stop strings, choices (and scores), regex and JSON, samples, scored continuations, beams
        alone.update({(i, j): r for j, r in enumerate(LLMEngine(plain, tokenizer).generate(parts[i]))})
    want.update({k: r.token_ids for k, r in alone.items()})
    assert any(len(want[4, j]) < len(want[0, j]) for j in range(len(long)))        # stop strings cut answers
    options = dict(overlap=True, batched_prefill=True) if cuda_defaults else {}
    with TPEngine(path, 2, tokenizer=tokenizer, cpu_threads=1, timeout_s=120, max_batch_size=8, **options) as engine:
        for part in parts:
            engine.generate(part)
        one_at_a_time = engine.engine.stats["decode_steps"]
        engine.engine.stats.update(decode_steps=0, images_encoded=0)
        # Request j of every part asks about the same image: every rank encodes it once (the ranks
        # run the vision tower's collectives together, so their feature caches must agree), and
        # copies the same prompt prefixes.
        batches = [{(i, j): replace(r, image_key=f"image-{j}") for j, r in enumerate(part)}
                   for i, part in enumerate(parts)]
        batches[0]["bad"] = Request("bad", [])
        outcomes = {}
        for future in [engine.submit(b) for b in batches]:
            outcomes.update(future.result(timeout=120))
        streamed, images_encoded = engine.engine.stats["decode_steps"], engine.engine.stats["images_encoded"]
        stats = engine.shard_stats()
        processes = list(engine.processes)
    with pytest.raises(RuntimeError, match="shut down"):    # a batch after the close: no new loop over a left group
        engine.submit({"late": long[0]})
    bad = outcomes.pop("bad")
    assert isinstance(bad, ValueError) and "'bad'" in str(bad)
    assert {k: r.token_ids for k, r in outcomes.items()} == want
    assert all(outcomes[5, j].choice_logprobs == pytest.approx(alone[5, j].choice_logprobs, abs=1e-4)
               for j in range(len(long)))
    assert all([s.token_ids for s in outcomes[7, j].samples] == [s.token_ids for s in alone[7, j].samples]
               for j in range(len(long)))
    assert all([[i for step in s.top_logprobs for i, _ in step] for s in outcomes[7, j].samples]
               == [[i for step in s.top_logprobs for i, _ in step] for s in alone[7, j].samples] for j in range(len(long)))
    assert all([s.token_ids for s in outcomes[9, j].samples] == [s.token_ids for s in alone[9, j].samples]
               for j in range(len(long)))
    assert all(outcomes[8, j].continuation_logprobs == pytest.approx(alone[8, j].continuation_logprobs, abs=1e-4)
               for j in range(len(long)))
    assert all((r.cumulative_logprob is not None) == (k[0] in (3, 7, 9)) for k, r in outcomes.items())
    assert streamed < one_at_a_time
    assert images_encoded == sum(r.pixel_values is not None for r in long)
    assert stats[0]["last_tokens"] == stats[1]["last_tokens"]              # the ranks stepped alike
    assert stats[0]["prefix_tokens_reused"] == stats[1]["prefix_tokens_reused"] > 0
    assert all(p.exitcode == 0 for p in processes)                         # shutdown answered, then left


def test_tp1_engine_needs_no_processes(checkpoint):
    path = checkpoint("idefics3")
    plain = Idefics3ForConditionalGeneration.from_pretrained(path)
    reqs = requests(path)
    with TPEngine(path, 1) as engine:
        assert engine.processes == []
        assert [r.token_ids for r in engine.generate(reqs)] == reference_tokens(plain, reqs)


def test_ranks_asked_for_their_devices_dtype_agree_on_one(checkpoint):
    """dtype "device" (a tensor-parallel replica's actor holds no GPU to ask): each rank asks its
    own device (float32 on a CPU) and the ranks settle on one dtype, float16 if their GPUs differ."""
    from model.loading import common_dtype

    path = checkpoint("idefics3")
    plain = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    reqs = requests(path)
    with TPEngine(path, 2, dtype="device", cpu_threads=1, timeout_s=120) as engine:
        got = [r.token_ids for r in engine.generate(reqs)]
        assert [s["dtype"] for s in engine.shard_stats()] == ["float32", "float32"]
    assert got == reference_tokens(plain, reqs)
    assert common_dtype([torch.bfloat16, torch.bfloat16]) == torch.bfloat16
    assert common_dtype([torch.bfloat16, torch.float16]) == torch.float16


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL)")
def test_nccl_tp2_matches_tp1(checkpoint):
    path = checkpoint("idefics3")
    plain = Idefics3ForConditionalGeneration.from_pretrained(path, device="cuda")
    inputs = batch_inputs(path)
    reqs = requests(path)
    with torch.inference_mode():
        want_logits = plain(**{k: v.cuda() for k, v in inputs.items()}).logits.cpu()
    want = reference_tokens(plain, reqs)
    with TPEngine(path, 2, device_type="cuda", timeout_s=120) as engine:
        assert (engine.logits(**inputs) - want_logits).abs().max().item() <= 1e-4
        assert [r.token_ids for r in engine.generate(reqs)] == want
    with TPEngine(path, 2, dtype="device", device_type="cuda", timeout_s=120) as engine:
        newer = torch.cuda.get_device_capability() >= (8, 0)
        assert {s["dtype"] for s in engine.shard_stats()} == {"bfloat16" if newer else "float16"}


def test_torchrun_entry_point(checkpoint):
    from model.engine import Request, SamplingParams
    from model.parallel import free_port

    path = checkpoint("tp_mqa")
    prompt = [5, 17, 300, 42, 9, 120]
    plain = Idefics3ForConditionalGeneration.from_pretrained(path)
    want = reference_tokens(plain, [Request("0", prompt, sampling=SamplingParams(max_new_tokens=6))])[0]
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "model.parallel.worker", "--model", str(path), "--device", "cpu", "--cpu-threads", "1",
         "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "6"],
        cwd=root, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    tokens, reason = out.stdout.split()[:-1], out.stdout.split()[-1]
    assert [int(t) for t in tokens] == want and reason in ("stop", "length")


def test_a_checkpoint_that_does_not_fit_fails_on_every_rank_without_hanging(checkpoint, tmp_path):
    import json
    import multiprocessing
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint("idefics3"), broken)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 256          # still splits, but no longer matches the weights
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=r"rank 0: CheckpointError: .*does not match the model.*; rank 1: CheckpointError"):
        TPEngine(broken, 2, cpu_threads=1, timeout_s=60)
    assert multiprocessing.active_children() == []


def test_a_dead_rank_fails_the_call_and_close_still_stops_the_group(checkpoint, tmp_path, monkeypatch):
    """A follower killed mid-request: the call raises (gloo's closed connection); close() then parts
    without it instead of raising the same error again and leaving the group's processes behind."""
    import multiprocessing

    from model.parallel.faults import RANK_CRASH_ONCE_ENV

    path = checkpoint("tp_mqa")
    monkeypatch.setenv(RANK_CRASH_ONCE_ENV, f"1:doomed={tmp_path / 'marker'}")       # the spawned rank 1 reads it
    engine = TPEngine(path, 2, cpu_threads=1, timeout_s=60)
    doomed = requests(path)[0]
    with pytest.raises(RuntimeError):
        engine.generate([dataclasses.replace(doomed, request_id="doomed")])
    engine.close()
    assert multiprocessing.active_children() == [] and engine.processes == []


def test_a_rank_that_exits_before_joining_is_named_at_once(checkpoint, tmp_path):
    """Before: rank 0 waited in the rendezvous for the whole timeout (600 s by default). Here the
    spawned rank dies as it imports the script (a script without a __main__ guard fails so)."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import os, time\n"
        "if os.environ.get('SPAWNED'):\n    os._exit(3)\n"
        "os.environ['SPAWNED'] = '1'\n"
        "from model.parallel import TPEngine\n"
        "start = time.monotonic()\n"
        "try:\n"
        f"    TPEngine({str(checkpoint('tp_mqa'))!r}, 2, cpu_threads=1, timeout_s=100)\n"
        "except RuntimeError as e:\n"
        "    print(f'{time.monotonic() - start:.0f} s: {e}')\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=100,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    said = out.stdout.strip()
    assert said.endswith("tensor-parallel rank 1 exited (code 3) before joining the group"), out.stderr[-2000:]
    assert int(said.split(" s:")[0]) < 30
