"""SamplingParams.choices: each answer is one of the choices, and greedy answers what transformers'
generate(prefix_allowed_tokens_fn=...) answers with the same allowed tokens, found here by brute
force over the vocabulary's decoded texts."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, SamplingParams
from model.engine import Request
from model.engine.constraints import EngineConstraints, choices_pattern
from processing import Tokenizer
from tests.fixtures.checkpoints import build_tokenizer
from tests.model.test_engine import setup  # noqa: F401  (tiny checkpoints, the reference)

# Several tokens each, shared beginnings, one choice a prefix of another, one the tokenizer never merged.
CHOICES = ("red circle", "red", "blue square", "green triangles", "purple", "zebra crossing")


def brute_force_allowed(backend, generated: list[int], choices, stop_ids) -> list[int]:
    """Every token after which the answer's text is still a beginning of a choice (or of a space and
    a choice), and the stop ids once it is a whole one: each token's text decoded with the answer.
    `backend`: the `tokenizers` Tokenizer."""
    texts = [c for choice in choices for c in (choice, " " + choice)]
    added = set(backend.get_added_tokens_decoder())
    so_far = backend.decode(generated, skip_special_tokens=False)
    allowed = [v for v in range(backend.get_vocab_size(with_added_tokens=False)) if v not in added
               for text in [backend.decode(generated + [v], skip_special_tokens=False)]
               if len(text) > len(so_far) and any(t.startswith(text) for t in texts)]
    return allowed + (sorted(stop_ids) if so_far in texts else [])


def reference_choice(ref, tokenizer, request, choices, stop_ids) -> list[int]:
    n = len(request.prompt_ids)
    ids = torch.tensor([request.prompt_ids])
    kwargs = dict(max_new_tokens=request.sampling.max_new_tokens, do_sample=False, eos_token_id=sorted(stop_ids),
                  prefix_allowed_tokens_fn=lambda _, row: brute_force_allowed(tokenizer.backend, row[n:].tolist(),
                                                                              choices, stop_ids))
    if request.pixel_values is not None:
        kwargs.update(pixel_values=request.pixel_values[None], pixel_attention_mask=request.pixel_attention_mask[None])
    return ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, n:].tolist()


@pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlapped"])
def test_greedy_choice_equals_reference_with_the_same_allowed_tokens(setup, overlap):
    """A batch of rows with different choices beside rows without: each constrained answer is
    one of its choices, spelled by the tokens the reference picks; the others are unchanged."""
    ours, requests, expected, tokenizer, ref = setup
    tokenizer = Tokenizer(tokenizer)
    rng = random.Random(0)
    engine = LLMEngine(ours, tokenizer, max_batch_size=3, overlap=overlap)
    stop_ids = frozenset(engine.stop_ids)
    chosen, want = [], {}
    for i, r in enumerate(requests):
        if i % 4 == 3:
            want[r.request_id] = expected[r.request_id]
        else:
            choices = tuple(rng.sample(CHOICES, 3))
            r = replace(r, sampling=replace(r.sampling, max_new_tokens=12, choices=choices))
            want[r.request_id] = reference_choice(ref, tokenizer, r, choices, stop_ids)
        chosen.append(r)
    results = engine.generate(chosen)
    for req, res in zip(chosen, results):
        assert res.token_ids == want[req.request_id], req.request_id
        if req.sampling.choices:
            assert res.finish_reason == "stop" and res.text.removeprefix(" ") in req.sampling.choices
    texts = {res.text for req, res in zip(chosen, results) if req.sampling.choices}
    assert len(texts) > 1                       # what the test is about: the masks steer each row
    unconstrained = [res.token_ids for req, res in zip(chosen, results) if not req.sampling.choices]
    assert unconstrained and all(t == expected[r.request_id] for t, r in zip(unconstrained, requests[3::4]))


def test_sampled_choices_ignore_batch_neighbours(setup):
    ours, requests, _, tokenizer, _ = setup
    sampled = [replace(r, sampling=SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7 + i,
                                                  choices=CHOICES, repetition_penalty=1.2))
               for i, r in enumerate(requests)]
    together = LLMEngine(ours, tokenizer, max_batch_size=4).generate(sampled)
    alone = [LLMEngine(ours, tokenizer, max_batch_size=1).generate([r])[0] for r in sampled[:3]]
    assert [r.token_ids for r in alone] == [r.token_ids for r in together[:3]]
    assert all(r.text.removeprefix(" ") in CHOICES for r in together)
    assert len({r.text for r in together}) > 1


def test_a_stop_string_ends_only_a_whole_choice_or_match(setup):
    """A stop string ended a constrained answer wherever it completed: choices ("yes", "no") with
    stop "e" answered "ye", a JSON schema with stop ":" answered ' {"a":', both finish_reason "stop"."""
    ours, requests, _, tokenizer, _ = setup
    asked = [replace(r, sampling=SamplingParams(max_new_tokens=16, temperature=1.5, seed=i, choices=CHOICES,
                                                stop=tuple("aeiou")))
             for i, r in enumerate(requests)]
    asked += [replace(r, request_id=f"{r.request_id}-json", sampling=SamplingParams(
        max_new_tokens=24, json_schema={"type": "object", "properties": {"a": {"enum": ["x", "y"]}},
                                        "required": ["a"]}, stop=(":", '"')))
        for r in requests[:2]]
    results = LLMEngine(ours, tokenizer, max_batch_size=4).generate(asked)
    assert all(r.finish_reason == "stop" for r in results), [(r.text, r.finish_reason) for r in results]
    assert all(r.text.removeprefix(" ") in CHOICES for r in results[:len(requests)])
    assert all(r.text.removeprefix(" ") in ('{"a":"x"}', '{"a": "x"}', '{"a":"y"}', '{"a": "y"}')
               for r in results[len(requests):])


def test_requests_with_choices_the_engine_cannot_answer_are_refused(setup):
    ours, requests, _, tokenizer, _ = setup
    r = requests[0]
    with pytest.raises(ValueError, match="need the engine.s tokenizer"):
        LLMEngine(ours).generate([replace(r, sampling=SamplingParams(choices=("red",)))])
    with pytest.raises(ValueError, match="needs a stop token"):
        LLMEngine(ours, tokenizer).generate([replace(r, sampling=SamplingParams(choices=("red",), stop_token_ids=()))])
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(choices=("red",), min_new_tokens=2)
    with pytest.raises(ValueError, match="non-empty"):
        SamplingParams(choices=("red", ""))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("tok")))


def test_allowed_tokens_of_every_answer_so_far(tokenizer):
    """Byte-level pieces of characters (é, 日本, 🙂 are several tokens each): every answer on the way
    to a choice allows what the brute force allows; tokens past the model's vocabulary never."""
    choices = ("café", "日本語", "naïve 🙂", "red", "red circle")
    constraints = EngineConstraints(tokenizer, len(tokenizer) + 40, "cpu")
    constraint = constraints.constraint(choices_pattern(choices), frozenset({1, 2}))
    checked = 0
    for choice in choices:
        for text in (choice, " " + choice):
            ids = tokenizer.encode(text, add_special_tokens=False)
            for n in range(len(ids) + 1):
                got = constraint.allowed_ids(constraint.advance(constraint.start, ids[:n]))
                assert got == sorted(brute_force_partial(tokenizer, ids[:n], choices, {1, 2})), (text, n)
                checked += 1
    assert checked > 30


def brute_force_partial(tokenizer, generated, choices, stop_ids) -> list[int]:
    """brute_force_allowed on bytes (a token that is part of a character decodes to U+FFFD)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    backend = tokenizer.backend
    added = set(backend.get_added_tokens_decoder())
    as_bytes = lambda v: bytes(to_byte[c] for c in backend.id_to_token(v))  # noqa: E731
    texts = [t.encode() for c in choices for t in (c, " " + c)]
    so_far = b"".join(map(as_bytes, generated))
    allowed = {v for v in range(backend.get_vocab_size(with_added_tokens=False)) if v not in added
               and any(t.startswith(so_far + as_bytes(v)) for t in texts)}
    return sorted(allowed | (set(stop_ids) if so_far in texts else set()))


def test_a_choice_no_tokens_spell_is_named(tokenizer):
    """A model vocabulary shorter than the tokenizer's (its embedding cut) may lack a byte's token."""
    byte_ids = {tokenizer.backend.token_to_id(c) for c in "abcdefghijklmnopqrstuvwxyz"}
    cut = EngineConstraints(tokenizer, max(byte_ids) + 1, "cpu")
    request = Request("cut", [1], sampling=SamplingParams(choices=("red", "日本")))
    with pytest.raises(ValueError, match="request 'cut': no tokens of the vocabulary spell the choice '日本'"):
        cut.check(request, frozenset({1}))
    cut.check(replace(request, sampling=SamplingParams(choices=("red", "bed"))), frozenset({1}))


def test_long_choices_and_many_sets_of_them(tokenizer):
    """A long option text (no recursion over its bytes), and sets of choices beyond what is kept."""
    constraints = EngineConstraints(tokenizer, len(tokenizer), "cpu")
    long = "the quick brown fox jumps over the lazy dog " * 60
    constraint = constraints.constraint(choices_pattern((long, "short")), frozenset({1}))
    ids = tokenizer.encode(" " + long, add_special_tokens=False)
    after = lambda n: constraint.allowed_ids(constraint.advance(constraint.start, ids[:n]))  # noqa: E731
    assert all(ids[n] in after(n) for n in range(0, len(ids), 97))
    assert after(len(ids)) == [1]
    for i in range(constraints.KEPT + 5):
        constraints.constraint(choices_pattern((f"option {i}",)), frozenset({1}))
    assert len(constraints._constraints) == constraints.KEPT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_choices_answer_as_on_cpu(setup):
    """CUDA's defaults (compiled step in graphs, overlapped steps, padded-group prefill) with rows with
    choices and rows with a JSON schema among rows without: the CPU engine's answers, float32."""
    import copy

    ours, requests, _, tokenizer, _ = setup
    torch.backends.cuda.matmul.allow_tf32 = False
    schema = {"type": "object", "properties": {"shape": {"enum": ["circle", "square"]}, "n": {"type": "integer"}}}
    constraints = [None, dict(choices=CHOICES[:3]), dict(json_schema=schema)]
    chosen = [replace(r, sampling=replace(r.sampling, max_new_tokens=24, **constraints[i % 3])) if i % 3 else r
              for i, r in enumerate(requests)]
    on_cpu = LLMEngine(ours, tokenizer, max_batch_size=3).generate(chosen)
    on_gpu = LLMEngine(copy.deepcopy(ours).to("cuda"), tokenizer, max_batch_size=3).generate(chosen)
    assert [r.token_ids for r in on_gpu] == [r.token_ids for r in on_cpu]


def test_a_running_answer_keeps_its_constraint_when_the_engine_forgets_it(setup):
    """Rows with more sets of choices than the engine keeps: each answer still one of its own."""
    ours, requests, _, tokenizer, _ = setup
    engine = LLMEngine(ours, Tokenizer(tokenizer), max_batch_size=4)
    engine.constraints.KEPT = 2
    sets = [CHOICES[i:i + 2] for i in range(5)]
    chosen = [replace(r, sampling=replace(r.sampling, max_new_tokens=24, choices=sets[i % 5]))
              for i, r in enumerate(requests)]
    results = engine.generate(chosen)
    assert [(r.finish_reason, r.text.removeprefix(" ") in q.sampling.choices) for r, q in zip(results, chosen)] \
        == [("stop", True)] * len(chosen), [(r.finish_reason, r.text) for r in results]
    assert len(engine.constraints._constraints) == 2
