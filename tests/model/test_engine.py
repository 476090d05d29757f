"""LLMEngine: each request's greedy answer equals transformers' generate on that request alone,
whatever the batch size, arrival order and slot; seeded samples ignore batch neighbours."""
from __future__ import annotations

import copy
import random
import shutil
from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, Request, SamplingParams
from tests.fixtures.checkpoints import build_checkpoint
from tests.fixtures.penalties import counted_penalties
from tests.model.test_generation import mixed_batch

torch.set_num_threads(1)

IMAGE_COUNTS = [1, 0, 2, 1, 0, 1, 2, 0]
MAX_NEW = [7, 3, 9, 5, 12, 4, 6, 10]


def _requests(path, counts, sampling) -> list[Request]:
    out = []
    for i, n in enumerate(counts):
        single = mixed_batch(path, counts=[0] * i + [n])      # vary the question with i
        row = {k: v[-1] for k, v in single.items()}
        ids = row["input_ids"][row["attention_mask"].bool()].tolist()
        pv = row.get("pixel_values")
        out.append(Request(f"r{i}", ids, pv, row.get("pixel_attention_mask"), sampling[i]))
    return out


def _reference(ref, request: Request) -> list[int]:
    ids = torch.tensor([request.prompt_ids])
    kwargs = dict(max_new_tokens=request.sampling.max_new_tokens, do_sample=False,
                  repetition_penalty=float(request.sampling.repetition_penalty))
    if request.pixel_values is not None:
        kwargs.update(pixel_values=request.pixel_values[None],
                      pixel_attention_mask=request.pixel_attention_mask[None])
    return ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:].tolist()


def reference_steps(ref, request, k: int = 1) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
    """transformers' greedy tokens for `request` alone, each one's log p and each step's k likeliest
    (id, log p), from generate(output_logits=True)."""
    ids = torch.tensor([request.prompt_ids])
    kwargs = dict(max_new_tokens=request.sampling.max_new_tokens, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    if request.pixel_values is not None:
        kwargs.update(pixel_values=request.pixel_values[None], pixel_attention_mask=request.pixel_attention_mask[None])
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    chosen, top = [], []
    for step, token in zip(out.logits, tokens):
        log_p = step[0].float().log_softmax(-1)
        values, best = log_p.topk(k)
        chosen.append(log_p[token].item())
        top.append(list(zip(best.tolist(), values.tolist())))
    return tokens, chosen, top


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def setup(request, tmp_path_factory):
    from tokenizers import Tokenizer
    from transformers import Idefics3ForConditionalGeneration as Reference

    from model import Idefics3ForConditionalGeneration

    path = build_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    ours = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    ref = Reference.from_pretrained(path, dtype=torch.float32).eval()
    requests = _requests(path, IMAGE_COUNTS, [SamplingParams(max_new_tokens=m) for m in MAX_NEW])
    expected = {r.request_id: _reference(ref, r) for r in requests}
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return ours, requests, expected, tokenizer, ref


@pytest.fixture(params=[False, True], ids=["step-by-step", "overlapped"])
def overlap(request) -> bool:
    """Both decode loops: tokens read after each step, or step N+1 queued before N's are read."""
    return request.param


@pytest.mark.parametrize("batch,slots", [(1, 1), (3, 3), (8, 8), (8, 3)])
def test_greedy_equals_reference_alone(setup, batch, slots, overlap):
    ours, requests, expected, tokenizer, _ = setup
    engine = LLMEngine(ours, tokenizer, max_batch_size=slots, overlap=overlap)
    chosen = requests[:batch]
    results = engine.generate(chosen)
    assert [r.request_id for r in results] == [r.request_id for r in chosen]
    for req, res in zip(chosen, results):
        assert res.token_ids == expected[req.request_id], req.request_id
        assert res.num_prompt_tokens == len(req.prompt_ids)
        assert res.num_generated_tokens == len(res.token_ids)
        stopped = res.token_ids[-1] in engine.stop_ids
        assert res.finish_reason == ("stop" if stopped else "length")
        assert res.text == tokenizer.decode(res.token_ids, skip_special_tokens=True)


def test_prompt_ids_may_be_the_processors_tensor(setup):
    """The README's engine example fed `inputs["input_ids"][0]` (a tensor): the validation failed in
    "Boolean value of Tensor with more than one value is ambiguous". Taken as its ids; a batch's
    rows (2-D) are refused naming the request."""
    ours, requests, expected, _, _ = setup
    req = requests[0]
    given = Request(req.request_id, torch.tensor(req.prompt_ids), req.pixel_values, req.pixel_attention_mask,
                    req.sampling)
    assert LLMEngine(ours).generate([given])[0].token_ids == expected[req.request_id]
    with pytest.raises(ValueError, match=r"request 'x': 2 rows of token ids: give one prompt's \(input_ids\[0\]\)"):
        Request("x", torch.tensor([req.prompt_ids, req.prompt_ids]))


@pytest.mark.parametrize("slots", [8, 3])
def test_batched_prefill_equals_reference(setup, slots):
    """Prompts prefilled together attend as padded groups (the CUDA default): same tokens."""
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=slots, batched_prefill=True)
    for req, res in zip(requests, engine.generate(requests)):
        assert res.token_ids == expected[req.request_id], req.request_id
    assert engine.runner.batched_prefill


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.filterwarnings("error:torch.compile of")
def test_cuda_defaults_on_cpu_equal_reference(setup, monkeypatch):
    """The CUDA defaults but graphs: the decode step through torch.compile, which must trace whole
    (fullgraph; a failure would fall back to eager with a warning, made an error here), the
    prefill's elementwise chains and the greedy draw compiled, overlapped steps and padded-group
    prefill; the reference's tokens through several batch and kv buckets.
    No step runs one row, not even with one slot: torch.compile specialises a size of 1, which would
    compile the step again once the rows change (the 8B bench, batch 1 then 32, on an H200)."""
    from model.engine.runner import ModelRunner
    from model.pointwise import COMPILED

    ours, requests, expected, _, _ = setup
    batches, decode = [], ModelRunner.decode
    monkeypatch.setattr(ModelRunner, "decode",
                        lambda self, rows, kv_len: batches.append(rows) or decode(self, rows, kv_len))
    engine = LLMEngine(ours, max_batch_size=3, compile=True, overlap=True, batched_prefill=True)
    for req, res in zip(requests, engine.generate(requests)):
        assert res.token_ids == expected[req.request_id], req.request_id
    assert engine.runner.compile
    assert ours.model.text_model.norm.pointwise is COMPILED        # the prefill's norms, RoPE, activation
    alone = LLMEngine(ours, max_batch_size=3, compile=True).generate(requests[:1])[0]
    assert alone.token_ids == expected[requests[0].request_id]
    one_slot = LLMEngine(ours, max_batch_size=1, compile=True, kv_cache_tokens=1 << 14)   # a spare row, never scheduled
    for req, res in zip(requests[:2], one_slot.generate(requests[:2])):
        assert res.token_ids == expected[req.request_id], req.request_id
    assert len(one_slot._scheduler.free) == 1 and one_slot.runner.cache.num_slots == 2
    assert min(batches) == 2, batches
    no_room = LLMEngine(ours, max_batch_size=1, compile=True)        # a budget of one sequence: no spare row
    assert no_room._ensure_cache(256).cache.num_slots == 1


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_compiles_once_over_batch_and_kv_buckets(setup):
    """Shapes torch.compile would specialise, each a second compile of the whole step mid-run (~85 s
    at 8B on an H200): a first step's rows equal to another size (the cache's slots: a full cache;
    here also its 2 layers), kept equal ever after; a step over the cache's whole length (the last
    kv bucket; the cache keeps a spare position). Batches of one the engine avoids (test above)."""
    from torch._dynamo.utils import counters

    from model.engine.kv_cache import KVCache
    from model.engine.runner import ModelRunner

    ours = setup[0]
    tc = ours.config.text_config
    cache = KVCache(tc.num_hidden_layers, 4, tc.num_key_value_heads, 256, tc.head_dim, torch.float32, "cpu")
    runner = ModelRunner(ours, cache, use_cuda_graphs=False, compile=True)
    torch._dynamo.reset()                           # no step compiled by an earlier test serves these
    runner.decode(4, 64)
    compiled = counters["stats"]["unique_graphs"]
    for rows, kv_len in [(2, 128), (3, 256), (4, 256), (2, 64)]:
        runner.decode(rows, kv_len)
    assert counters["stats"]["unique_graphs"] == compiled and runner.compile


def test_a_failed_compile_runs_eagerly_with_the_same_rows(setup, monkeypatch):
    """A compile that fails (on one tensor-parallel rank, say) falls back to eager steps, which run
    the rows the other ranks run: the rows do not follow the fallback."""
    import model.engine.runner as runner_module
    from model.engine.kv_cache import KVCache

    def broken():
        def step(*args):
            raise RuntimeError("no compiler here")
        return step

    ours = setup[0]
    tc = ours.config.text_config
    cache = KVCache(tc.num_hidden_layers, 4, tc.num_key_value_heads, 64, tc.head_dim, torch.float32, "cpu")
    runner = runner_module.ModelRunner(ours, cache, use_cuda_graphs=False, compile=True)
    monkeypatch.setattr(runner_module, "compiled_decode", broken)
    assert runner.decode_rows(1) == 2
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed"):
        logits = runner.decode(2, 64)
    assert not runner.compile and logits.shape[0] == 2 and runner.decode_rows(1) == 2


class _PostGradGraph:
    """Records the ops of each graph inductor compiles (after its own post-grad passes)."""

    def __init__(self) -> None:
        self.ops: list[str] = []

    def __call__(self, graph) -> None:
        self.ops += [str(node.target) for node in graph.nodes if node.op == "call_function"]

    def uuid(self) -> None:
        return None


@pytest.mark.parametrize("setup", ["smolvlm"], indirect=True)       # the graph's form, whatever the shapes
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_compiled_decode_writes_the_cache_in_place(setup, device):
    """A K/V write through a view of the cache (its layer slice) is functionalised by torch.compile
    into a scatter of that whole slice, every layer of every step: decode time grows with the cache
    (100x on CPU at SmolVLM-256M shapes). Writes indexed into the cache itself stay in place."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from model.engine.kv_cache import KVCache
    from model.engine.runner import decode_logits

    if device == "cpu" and shutil.which("g++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    ours = setup[0] if device == "cpu" else copy.deepcopy(setup[0]).to(device)
    tc = ours.config.text_config
    cache = KVCache(tc.num_hidden_layers, 4, tc.num_key_value_heads, 128, tc.head_dim, torch.float32, device)
    tokens, positions = torch.tensor([5, 6, 7], device=device), torch.tensor([3, 0, 9], device=device)
    graph = _PostGradGraph()
    CustomGraphPass.register(_PostGradGraph)
    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_post_pass=graph, fx_graph_cache=False), torch.inference_mode():
        compiled = torch.compile(decode_logits, fullgraph=True, dynamic=True)(
            ours, cache.k, cache.v, tokens, positions, 64)
        k_after = cache.k.clone()
        cache.k.zero_()
        eager = decode_logits(ours, cache.k, cache.v, tokens, positions, 64)
    assert graph.ops and not [op for op in graph.ops if "scatter" in op], sorted(set(graph.ops))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_after, cache.k, rtol=1e-4, atol=1e-4)    # same rows written, in place


def test_arrival_order_and_slot_reuse(setup, overlap):
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=3, overlap=overlap)     # 8 requests through 3 slots: every slot reused
    for seed in (0, 1):
        order = requests[:]
        random.Random(seed).shuffle(order)
        for req, res in zip(order, engine.generate(order)):
            assert res.request_id == req.request_id
            assert res.token_ids == expected[req.request_id], req.request_id
            assert res.text is None


def test_repetition_penalty_equals_reference_alone(setup, overlap):
    """Rows with and without a penalty (> 1 and < 1) share decode steps through reused slots; each
    answer equals transformers' generate(repetition_penalty=...) on that row alone."""

    ours, requests, expected, _, ref = setup
    penalties = [1.8, 1.0, 0.6, 1.8, 1.3, 1.0, 2.5, 1.8]
    penalized = [replace(r, sampling=replace(r.sampling, repetition_penalty=p)) for r, p in zip(requests, penalties)]
    want = {r.request_id: _reference(ref, r) for r in penalized}
    assert any(want[r.request_id] != expected[r.request_id] for r in penalized)    # the penalty changes answers
    results = LLMEngine(ours, max_batch_size=3, overlap=overlap).generate(penalized[::-1])
    assert {r.request_id: r.token_ids for r in results} == want


def test_presence_and_frequency_penalties_equal_vllms_formula_on_the_reference(setup, overlap):
    """Rows with presence and frequency penalties (beside a repetition penalty, or none) share decode
    steps through reused slots; each answer equals transformers' generate on that row alone with
    vLLM's formula as its logits processor."""
    from transformers import LogitsProcessorList

    ours, requests, expected, _, ref = setup
    settings = [(1.5, 0.0, 1.0), (0.0, 0.0, 1.0), (0.0, 2.0, 1.0), (-1.0, 0.5, 1.0), (2.0, 1.0, 1.3),
                (0.0, 0.0, 1.3), (0.5, 2.0, 1.0), (1.0, -0.5, 1.0)]
    asked = [replace(r, sampling=replace(r.sampling, max_new_tokens=12, presence_penalty=p, frequency_penalty=f,
                                         repetition_penalty=rep))
             for r, (p, f, rep) in zip(requests, settings)]
    want = {}
    for r, (p, f, _) in zip(asked, settings):
        ids = torch.tensor([r.prompt_ids])
        kwargs = dict(max_new_tokens=12, do_sample=False, repetition_penalty=r.sampling.repetition_penalty,
                      logits_processor=LogitsProcessorList([counted_penalties(len(r.prompt_ids), p, f)]))
        if r.pixel_values is not None:
            kwargs.update(pixel_values=r.pixel_values[None], pixel_attention_mask=r.pixel_attention_mask[None])
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        want[r.request_id] = out[0, ids.shape[1]:].tolist()
    plain = {r.request_id: _reference(ref, replace(r, sampling=replace(r.sampling, presence_penalty=0.0,
                                                                          frequency_penalty=0.0))) for r in asked}
    assert sum(want[i] != plain[i] for i in want) >= 3       # the penalties change answers
    results = LLMEngine(ours, max_batch_size=3, overlap=overlap).generate(asked[::-1])
    assert {r.request_id: r.token_ids for r in results} == want
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(ValueError, match=rf"{name} must be in \[-2, 2\]"):
            SamplingParams(**{name: -2.5})


def test_logprobs_equal_the_references_raw_logits(setup, overlap):
    """Result.cumulative_logprob: the sum of log_softmax(raw logits) at the chosen tokens, as from
    transformers' generate(output_logits=True) on each row alone; rows that do not ask get None."""

    ours, requests, _, _, ref = setup
    asked = [replace(r, sampling=replace(r.sampling, logprobs=i % 3 != 1)) for i, r in enumerate(requests)]
    results = LLMEngine(ours, max_batch_size=3, overlap=overlap).generate(asked)
    for req, res in zip(asked, results):
        if not req.sampling.logprobs:
            assert res.cumulative_logprob is None
            continue
        tokens, chosen, _ = reference_steps(ref, req)
        want = sum(chosen)
        assert res.token_ids == tokens
        assert res.cumulative_logprob == pytest.approx(want, abs=1e-4), req.request_id


def test_stop_strings_end_answers_as_the_references_stop_strings(setup, overlap, tmp_path):
    """SamplingParams.stop: an answer ends with the token that completes a stop string (even one
    spanning tokens), as transformers' generate(stop_strings=...) on that row alone."""

    from transformers import PreTrainedTokenizerFast

    ours, requests, expected, tokenizer, ref = setup
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    stopped, want = [], {}
    for r in requests[:6]:
        text = tokenizer.decode(expected[r.request_id], skip_special_tokens=False)
        # (text of partial UTF-8 byte tokens decodes to U+FFFD, which neither finds in their bytes)
        stop = [text[3:6]] if len(text) >= 6 else ["never-generated"]
        req = replace(r, sampling=replace(r.sampling, stop=stop))
        ids = torch.tensor([r.prompt_ids])
        kwargs = dict(max_new_tokens=r.sampling.max_new_tokens, do_sample=False, stop_strings=stop,
                      tokenizer=hf_tokenizer)
        if r.pixel_values is not None:
            kwargs.update(pixel_values=r.pixel_values[None], pixel_attention_mask=r.pixel_attention_mask[None])
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        want[r.request_id] = out[0, ids.shape[1]:].tolist()
        stopped.append(req)
    assert any(len(want[k]) < len(expected[k]) for k in want)           # some answers did stop early
    results = LLMEngine(ours, tokenizer, max_batch_size=3, overlap=overlap).generate(stopped)
    assert {r.request_id: r.token_ids for r in results} == want
    assert all(r.finish_reason == "stop" for r in results if len(r.token_ids) < len(expected[r.request_id]))
    with pytest.raises(ValueError, match="need the engine's tokenizer"):
        LLMEngine(ours).generate([stopped[0]])


def test_small_prefill_budget_and_one_slot_at_a_time(setup, overlap):
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4, max_prefill_tokens=1, overlap=overlap)   # prefill requests one by one
    for req, res in zip(requests, engine.generate(requests)):
        assert res.token_ids == expected[req.request_id]


def test_finish_reasons_and_counts(setup, overlap):
    ours, requests, expected, _, _ = setup
    req = requests[2]
    answer = expected[req.request_id]
    stop_at = answer[2]
    first = answer.index(stop_at)
    params = SamplingParams(max_new_tokens=9, stop_token_ids=[stop_at])
    stop = Request("stop", req.prompt_ids, req.pixel_values, req.pixel_attention_mask, params)
    late = SamplingParams(max_new_tokens=9, min_new_tokens=first + 1, stop_token_ids=[stop_at])
    no_stop = Request("late", req.prompt_ids, req.pixel_values, req.pixel_attention_mask, late)
    length = Request("length", req.prompt_ids, req.pixel_values, req.pixel_attention_mask,
                     SamplingParams(max_new_tokens=2, stop_token_ids=[]))
    r_stop, r_late, r_len = LLMEngine(ours, max_batch_size=2, overlap=overlap).generate([stop, no_stop, length])
    assert (r_stop.finish_reason, r_stop.token_ids) == ("stop", answer[:first + 1])
    assert r_stop.num_generated_tokens == first + 1
    assert stop_at not in r_late.token_ids[:first + 1] and len(r_late.token_ids) > first + 1
    assert (r_len.finish_reason, r_len.token_ids, r_len.num_generated_tokens) == ("length", answer[:2], 2)


def test_a_request_whose_logits_overflow_ends_in_error_and_spoils_no_later_one(setup, overlap):
    """Pixels that overflow the vision tower make a request's logits NaN: it ends with
    finish_reason "error" naming the cause, and the requests that take its slot after it still
    answer as the reference (attention reads its stale rows with weight 0, and 0 x NaN is NaN)."""
    ours, requests, expected, _, _ = setup
    r = requests[2]                                    # the longest prompt: later ones leave its rows behind
    bad = Request("bad", r.prompt_ids, r.pixel_values * 1e30, r.pixel_attention_mask, r.sampling)
    later = [requests[i] for i in (0, 1, 3, 4, 5)]
    for slots in (1, 2):
        results = LLMEngine(ours, max_batch_size=slots, overlap=overlap).generate([bad, *later])
        assert (results[0].finish_reason, results[0].token_ids) == ("error", [])
        assert results[0].error.startswith("NonFiniteLogitsError: ") and "new token 1 " in results[0].error
        for req, res in zip(later, results[1:]):
            assert (res.token_ids, res.error) == (expected[req.request_id], None), req.request_id


def test_logits_that_turn_non_finite_mid_answer_end_that_answer_there(setup, overlap):
    """A token whose embedding is NaN: the request that generates it errs at the next token (its
    answer so far kept), one whose prompt holds it errs at once, the others answer as the reference."""
    ours, requests, expected, _, _ = setup
    if ours.config.tie_word_embeddings:
        pytest.skip("a NaN embedding row would be a NaN logit of every row")
    answering = requests[2]
    token = expected[answering.request_id][1]
    broken = copy.deepcopy(ours)
    with torch.no_grad():
        broken.model.text_model.embed_tokens.weight[token] = float("nan")
    results = LLMEngine(broken, max_batch_size=3, overlap=overlap).generate(requests)
    for req, res in zip(requests, results):
        want = expected[req.request_id]
        if token in req.prompt_ids:
            assert (res.finish_reason, res.token_ids) == ("error", []), req.request_id
        elif token in want[:-1]:
            upto = want.index(token) + 1
            assert (res.finish_reason, res.token_ids) == ("error", want[:upto]), req.request_id
            assert f"new token {upto + 1} " in res.error
        else:
            assert (res.token_ids, res.finish_reason) == (want, "stop" if want[-1] in LLMEngine(ours).stop_ids
                                                          else "length"), req.request_id
    assert results[2].finish_reason == "error"


def test_seeded_samples_ignore_batch_neighbours(setup, overlap):
    ours, requests, _, _, _ = setup
    # Row 1 sets no top_k: alone, rows 0 and 2 sort only their 30 largest logits (the top-k cap),
    # together with row 1 the whole vocabulary, for the same tokens.
    hot = [SamplingParams(max_new_tokens=8, temperature=1.3, top_k=0 if i == 1 else 30, top_p=0.95, seed=100 + i)
           for i in range(len(requests))]
    sampled = [Request(r.request_id, r.prompt_ids, r.pixel_values, r.pixel_attention_mask, p)
               for r, p in zip(requests, hot)]
    alone = [LLMEngine(ours, max_batch_size=1).generate([r])[0].token_ids for r in sampled[:3]]
    mixed = sampled[:3] + [requests[5]]          # plus a greedy neighbour
    together = LLMEngine(ours, max_batch_size=4, overlap=overlap).generate(mixed[::-1])[::-1]
    assert [r.token_ids for r in together[:3]] == alone
    other_seed = SamplingParams(max_new_tokens=8, temperature=1.3, top_k=30, top_p=0.95, seed=7)
    changed = LLMEngine(ours).generate([Request("x", sampled[0].prompt_ids, sampled[0].pixel_values,
                                                sampled[0].pixel_attention_mask, other_seed)])
    assert len(changed[0].token_ids) >= 1


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.filterwarnings("error:torch.compile of the")
@pytest.mark.parametrize("setup", ["smolvlm"], indirect=True)       # the sampler's fusion, whatever the model
def test_a_compiled_engine_samples_as_the_eager_one(setup):
    """The CUDA default: a compiled decode step, and the sampler's noise and draw fused by
    torch.compile too, its nuclei (no row sets top_k) by bisection: the eager engine's seeded
    samples (the eager one sorts), with and without top-p."""
    ours, requests, _, _, _ = setup
    sampled = [replace(r, sampling=SamplingParams(max_new_tokens=8, temperature=1.1, seed=3 + i,
                                                  top_p=0.9 if i % 2 else 1.0)) for i, r in enumerate(requests[:4])]
    eager = LLMEngine(ours, max_batch_size=4).generate(sampled)
    compiled = LLMEngine(ours, max_batch_size=4, compile=True)
    assert [r.token_ids for r in compiled.generate(sampled)] == [r.token_ids for r in eager]
    assert compiled.runner.compile


def test_overlap_runs_no_step_past_a_known_last_token(setup):
    """Length-limited rows: the overlapped loop queues exactly the steps the step-by-step one runs."""
    ours, requests, expected, _, _ = setup
    fixed = [Request(r.request_id, r.prompt_ids, r.pixel_values, r.pixel_attention_mask,
                     SamplingParams(max_new_tokens=m, min_new_tokens=m)) for r, m in zip(requests, MAX_NEW)]
    steps = {}
    for overlap in (False, True):
        engine = LLMEngine(ours, max_batch_size=3, overlap=overlap)
        results = engine.generate(fixed)
        assert [len(r.token_ids) for r in results] == MAX_NEW
        steps[overlap] = engine.stats["decode_steps"]
    assert steps[True] == steps[False]


def test_bad_requests_are_named(setup):
    ours, requests, _, _, _ = setup
    engine = LLMEngine(ours)
    img = requests[0]
    cut = img.prompt_ids.index(ours.config.image_token_id)
    with pytest.raises(ValueError, match="r_bad.*image tokens"):
        engine.generate([Request("r_bad", img.prompt_ids[:cut] + img.prompt_ids[cut + 1:], img.pixel_values)])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([Request("e", [])])
    vocab = ours.config.text_config.vocab_size
    for token in (vocab, -1):       # a tokenizer that is not the checkpoint's
        with pytest.raises(ValueError, match=f"'v': token id {token} is outside the model's vocabulary of {vocab}"):
            engine.generate([Request("v", [1, token, 2])])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        SamplingParams(max_new_tokens=-1)
    with pytest.raises(ValueError, match="'z': max_new_tokens 0 answers nothing"):  # unless it scores a continuation
        engine.generate([Request("z", [1, 2], sampling=SamplingParams(max_new_tokens=0))])
    for bad in (dict(temperature=float("nan")), dict(temperature=-1.0), dict(top_p=float("nan")), dict(top_p=0.0),
                dict(top_k=-1), dict(repetition_penalty=float("nan")), dict(min_new_tokens=65),
                # not integers: refused here, where a step would fail (and take the running requests with it)
                dict(top_k=2.5), dict(max_new_tokens=4.5), dict(min_new_tokens=True), dict(seed=1.5),
                dict(seed=2 ** 100), dict(length_penalty=float("nan"), num_beams=2)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    import numpy as np
    assert SamplingParams(max_new_tokens=np.int64(5), seed=np.int32(3)).max_new_tokens.__class__ is int


def test_an_answer_longer_than_the_context_leaves_is_cut_there(setup, monkeypatch, overlap):
    """As vLLM's: the answer ends at the context, finish_reason "length" (it was an error: a long
    prompt with a generous max_new_tokens lost its row); a prompt that fills the context is refused."""
    ours, requests, expected, _, _ = setup
    long = requests[4]          # text only, 12 new tokens
    assert not set(expected[long.request_id][:-1]) & set(LLMEngine(ours).stop_ids)
    monkeypatch.setattr(ours.config.text_config, "max_position_embeddings", len(long.prompt_ids) + 5)
    engine = LLMEngine(ours, max_batch_size=2, overlap=overlap)
    cut, other = engine.generate([long, Request("short", long.prompt_ids[:-3], sampling=SamplingParams(4))])
    assert cut.token_ids == expected[long.request_id][:5] and cut.finish_reason == "length"
    assert other.num_generated_tokens == 4 or other.finish_reason == "stop"
    with pytest.raises(ValueError, match=r"'full': the prompt \(\d+ tokens\) fills the model's context of"):
        engine.generate([Request("full", long.prompt_ids + [1] * 5)])
    with pytest.raises(ValueError, match=r"'scored': the prompt and its scored text \(\d+ tokens\) pass the model"):
        engine.generate([Request("scored", long.prompt_ids, continuation_ids=[1] * 6,
                                 sampling=SamplingParams(max_new_tokens=0))])     # it asks for no answer


def test_requests_with_different_tile_sizes_share_a_batch(setup):
    ours, requests, _, _, _ = setup
    cfg = ours.config
    small = 2 * cfg.vision_config.patch_size * cfg.scale_factor // 2      # a smaller square tile
    if small % (cfg.vision_config.patch_size * cfg.scale_factor):
        small = cfg.vision_config.patch_size * cfg.scale_factor
    per_frame = (small // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor ** 2
    text = [t for t in requests[1].prompt_ids if t != cfg.image_token_id]
    g = torch.Generator().manual_seed(0)
    tiny = Request("tiny", text[:3] + [cfg.image_token_id] * (2 * per_frame) + text[3:],
                   torch.randn(2, 3, small, small, generator=g), None, SamplingParams(max_new_tokens=5))
    engine = LLMEngine(ours, max_batch_size=4)
    alone = engine.generate([tiny])[0].token_ids
    together = engine.generate([requests[0], tiny, requests[2]])
    assert together[1].token_ids == alone
    with pytest.raises(ValueError, match="all zeros"):
        engine.generate([Request("z", tiny.prompt_ids, torch.zeros(2, 3, small, small))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp32_graphs_equal_reference(setup):
    ours, requests, expected, _, _ = setup
    model = copy.deepcopy(ours).to("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    results = LLMEngine(model, max_batch_size=3).generate(requests)
    assert [r.token_ids for r in results] == [expected[r.request_id] for r in requests]
    # The repetition penalty's mask on the device, too.
    penalized = [replace(r, sampling=replace(r.sampling, repetition_penalty=1.8, logprobs=True)) for r in requests[:4]]
    on_cpu = LLMEngine(ours, max_batch_size=3).generate(penalized)
    on_gpu = LLMEngine(model, max_batch_size=3).generate(penalized)        # logprobs through pinned host buffers
    assert [r.token_ids for r in on_gpu] == [r.token_ids for r in on_cpu]
    assert [r.cumulative_logprob for r in on_gpu] == pytest.approx([r.cumulative_logprob for r in on_cpu], abs=1e-3)
    one_slot = LLMEngine(model, max_batch_size=1).generate(penalized)       # compiled: two rows, a spare one
    assert [r.token_ids for r in one_slot] == [r.token_ids for r in on_cpu]
    assert [r.cumulative_logprob for r in one_slot] == pytest.approx([r.cumulative_logprob for r in on_cpu], abs=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_top_p_samples_as_on_cpu(setup):
    """No row sets top_k: on CUDA the nucleus is found by bisection (and compiled), on CPU by a
    sort; the same seeded tokens (fp32); min_p beside it on some rows, typical_p and the cutoffs on others."""
    ours, requests, _, _, _ = setup
    torch.backends.cuda.matmul.allow_tf32 = False
    cutoffs = [{}] * 4 + [dict(typical_p=0.7, epsilon_cutoff=1e-3), dict(eta_cutoff=0.3)]
    nucleus = [replace(r, sampling=replace(r.sampling, temperature=1.0, top_p=0.8 + 0.05 * i, seed=i,
                                           min_p=0.3 * (i % 2), **cut))
               for i, (r, cut) in enumerate(zip(requests, cutoffs))]
    on_cpu = LLMEngine(ours, max_batch_size=3).generate(nucleus)
    on_gpu = LLMEngine(copy.deepcopy(ours).to("cuda"), max_batch_size=3).generate(nucleus)
    assert [r.token_ids for r in on_gpu] == [r.token_ids for r in on_cpu]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager_bf16(setup):
    ours, requests, _, _, _ = setup
    model = copy.deepcopy(ours).to("cuda", torch.bfloat16)
    graphed_engine = LLMEngine(model, max_batch_size=3)
    graphed = graphed_engine.generate(requests)
    assert graphed_engine.runner.graphs, "decode should have been captured in CUDA graphs"
    eager = LLMEngine(model, max_batch_size=3, use_cuda_graphs=False).generate(requests)
    assert [r.token_ids for r in graphed] == [r.token_ids for r in eager]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_overflowing_request_spoils_no_later_one(setup):
    """The CUDA defaults (graphs, compiled and overlapped decode, bf16): a request whose pixels
    overflow ends in error, and the requests after it in its slot answer as without it."""
    ours, requests, _, _, _ = setup
    model = copy.deepcopy(ours).to("cuda", torch.bfloat16)
    r = requests[2]
    bad = Request("bad", r.prompt_ids, r.pixel_values * 1e30, r.pixel_attention_mask, r.sampling)
    later = [requests[i] for i in (0, 1, 3, 4, 5)]
    alone = LLMEngine(model, max_batch_size=2).generate(later)
    results = LLMEngine(model, max_batch_size=2).generate([bad, *later])
    assert results[0].finish_reason == "error" and "NonFiniteLogitsError" in results[0].error
    assert [r.token_ids for r in results[1:]] == [r.token_ids for r in alone]
