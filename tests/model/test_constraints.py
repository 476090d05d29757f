"""SamplingParams.regex and .json_schema: each answer that stops matches its pattern in full, and
greedy answers what transformers' generate(prefix_allowed_tokens_fn=...) answers with the same
allowed tokens, found here by brute force: every token of the vocabulary tried after the answer so
far, with `regex`'s partial matching (choices, the third way, are tests/model/test_choices.py's)."""
from __future__ import annotations

import json
import random
from dataclasses import replace

import jsonschema
import pytest
import regex
import torch

from model.engine import LLMEngine, Request, SamplingParams
from model.engine.constraints import EngineConstraints, request_pattern
from processing import Tokenizer
from tests.fixtures.checkpoints import build_tokenizer
from tests.model.test_engine import setup  # noqa: F401  (tiny checkpoints, the reference)

SCHEMA = {"type": "object", "properties": {
    "shape": {"enum": ["circle", "square", "triangle"]}, "count": {"type": "integer"},
    "filled": {"type": "boolean"}, "note": {"type": "string", "maxLength": 6}}, "required": ["shape", "filled"]}
REGEXES = [r"[A-Z][a-z]{1,5}( [a-z]{1,5}){0,2}\.", r"[0-9]{1,2} (cats|dogs)", r"(ab|ba)+c?", r"[^\n]{0,8}!"]
TEXTS = ("αβγ 日本語", "ω日本", '"a\\"日"', '"\\n🙂"', "café 🙂🙂", "naïve 🙂", "ΩΩ 12 日本", "É!")
CANDIDATES = set("αω日本語éï🙂" + "".join(TEXTS))
BYTES = {}


def as_bytes(backend, token: int) -> bytes:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = BYTES or BYTES.update({c: b for b, c in bytes_to_unicode().items()}) or BYTES
    return bytes(to_byte[c] for c in backend.id_to_token(token))


def could_go_on(data: bytes, pattern: str) -> bool:
    """Whether `data` begins a match. An unfinished last character is tried as each character of
    CANDIDATES that it begins and as its smallest and largest completions: the patterns here take
    either all characters of a block alike or only characters of CANDIDATES."""
    for cut in range(4):
        head, tail = data[:len(data) - cut], data[len(data) - cut:]
        try:
            text = head.decode()
        except UnicodeDecodeError:
            continue
        if not tail:
            return regex.fullmatch(pattern, text, partial=True) is not None
        return any(regex.fullmatch(pattern, text + char, partial=True) for char in completions(tail))
    return False


def completions(begun: bytes) -> list[str]:
    length = 2 if begun[0] < 0xE0 else 3 if begun[0] < 0xF0 else 4
    chars = [c for c in CANDIDATES if len(c.encode()) > len(begun) and c.encode().startswith(begun)]
    for filler in (b"\x80", b"\xbf"):
        try:
            chars.append((begun + filler * (length - len(begun))).decode())
        except UnicodeDecodeError:
            pass
    return chars


def as_answered(pattern: str) -> str:
    """What an answer matches: the pattern, as written or after one space."""
    return f" ?(?:{pattern})"


def brute_force_allowed(backend, generated: list[int], pattern: str, stop_ids) -> list[int]:
    """The tokens after which the answer so far could still match `pattern` (after one space or not),
    and the stop ids once it does."""
    pattern = as_answered(pattern)
    added = set(backend.get_added_tokens_decoder())
    so_far = b"".join(as_bytes(backend, t) for t in generated)
    allowed = [v for v in range(backend.get_vocab_size(with_added_tokens=False))
               if v not in added and could_go_on(so_far + as_bytes(backend, v), pattern)]
    try:
        whole = regex.fullmatch(pattern, so_far.decode()) is not None
    except UnicodeDecodeError:
        whole = False
    return sorted(allowed + (sorted(stop_ids) if whole or not allowed else []))


def reference_constrained(ref, tokenizer, request, stop_ids) -> list[int]:
    n, pattern = len(request.prompt_ids), request_pattern(request.sampling)
    ids = torch.tensor([request.prompt_ids])
    allowed = lambda _, row: brute_force_allowed(tokenizer.backend, row[n:].tolist(), pattern, stop_ids)  # noqa: E731
    kwargs = dict(max_new_tokens=request.sampling.max_new_tokens, do_sample=False, eos_token_id=sorted(stop_ids),
                  prefix_allowed_tokens_fn=allowed)
    if request.pixel_values is not None:
        kwargs.update(pixel_values=request.pixel_values[None], pixel_attention_mask=request.pixel_attention_mask[None])
    return ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, n:].tolist()


def constrain(request: Request, i: int, max_new_tokens: int = 24) -> Request:
    kind = i % 4
    extra = {0: dict(json_schema=SCHEMA), 1: dict(regex=REGEXES[i // 4 % len(REGEXES)]),
             2: dict(json_schema=json.dumps(SCHEMA))}.get(kind)
    if extra is None:
        return request
    return replace(request, sampling=replace(request.sampling, max_new_tokens=max_new_tokens, **extra))


@pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlapped"])
def test_greedy_patterns_equal_reference_with_the_same_allowed_tokens(setup, overlap):
    ours, requests, expected, tokenizer, ref = setup
    tokenizer = Tokenizer(tokenizer)
    engine = LLMEngine(ours, tokenizer, max_batch_size=3, overlap=overlap)
    stop_ids = frozenset(engine.stop_ids)
    chosen = [constrain(r, i) for i, r in enumerate(requests)]
    results = engine.generate(chosen)
    stopped = 0
    for req, res in zip(chosen, results):
        if not req.sampling.constrained:
            assert res.token_ids == expected[req.request_id]
            continue
        assert res.token_ids == reference_constrained(ref, tokenizer, req, stop_ids), req.request_id
        text = tokenizer.decode(res.token_ids, skip_special_tokens=True)
        if res.finish_reason == "stop":
            stopped += 1
            assert regex.fullmatch(as_answered(request_pattern(req.sampling)), text), text
            if req.sampling.json_schema is not None:
                jsonschema.validate(json.loads(text), SCHEMA)
        else:
            assert regex.fullmatch(as_answered(request_pattern(req.sampling)), text, partial=True), text
    assert stopped       # what the test is about: whole answers the pattern allows


def test_sampled_patterns_ignore_batch_neighbours(setup):
    ours, requests, _, tokenizer, _ = setup
    sampled = [replace(r, sampling=SamplingParams(max_new_tokens=16, temperature=1.3, top_k=50, seed=3 + i,
                                                  regex=REGEXES[i % len(REGEXES)]))
               for i, r in enumerate(requests)]
    together = LLMEngine(ours, tokenizer, max_batch_size=4).generate(sampled)
    alone = [LLMEngine(ours, tokenizer, max_batch_size=1).generate([r])[0] for r in sampled[:3]]
    assert [r.token_ids for r in alone] == [r.token_ids for r in together[:3]]
    for req, res in zip(sampled, together):
        assert regex.fullmatch(as_answered(req.sampling.regex), res.text, partial=res.finish_reason == "length")


def test_requests_whose_pattern_cannot_be_kept_are_refused(setup):
    ours, requests, _, tokenizer, _ = setup
    r, engine = requests[0], LLMEngine(ours, tokenizer)
    with pytest.raises(ValueError, match="request 'r0': the pattern uses groupref"):
        engine.generate([replace(r, sampling=SamplingParams(regex=r"(a)\1"))])
    with pytest.raises(ValueError, match="request 'r0': the pattern .* matches no text"):
        engine.generate([replace(r, sampling=SamplingParams(regex=r"[^\s\S]"))])
    with pytest.raises(ValueError, match="need the engine's tokenizer"):
        LLMEngine(ours).generate([replace(r, sampling=SamplingParams(regex="a+"))])
    with pytest.raises(ValueError, match="give one"):
        SamplingParams(regex="a", choices=("a",))
    with pytest.raises(ValueError, match="'minimum' is not supported"):
        SamplingParams(json_schema={"type": "integer", "minimum": 1})
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(regex="a+", min_new_tokens=2)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("pattern", [r"[α-ω]{1,3} ?日本語?", r'"(?:[^"\\]|\\.)*"', r"(?:café|naïve) 🙂+", r"[^a-z]+"])
def test_allowed_tokens_through_characters_of_several_bytes(tokenizer, pattern):
    """Tokens that end inside a character are allowed where some completion of it goes on: the
    walk's sets equal the brute force's along answers of several-byte characters."""
    rng = random.Random(pattern)
    constraint = EngineConstraints(tokenizer, len(tokenizer), "cpu").constraint(pattern, frozenset({1}))
    backend, checked = tokenizer.backend, 0
    for text in TEXTS:
        ids, state = [], constraint.start
        for _ in range(12):
            want = brute_force_allowed(backend, ids, pattern, {1})
            got = constraint.allowed_ids(state)
            assert got == want, (text, ids)
            checked += 1
            options = [t for t in got if t != 1]
            if not options:
                break
            spelled = tokenizer.encode(text, add_special_tokens=False)
            following = spelled[len(ids)] if len(ids) < len(spelled) else None
            token = following if following in options else rng.choice(options)
            ids.append(token)
            state = constraint.advance(state, [token])
    assert checked > 20


@pytest.mark.parametrize("pattern,exact", [
    (r"[α-ω]{1,3} ?日本語?", True), (r'"(?:[^"\\]|\\.)*"', True), (r"(?:café|naïve) 🙂+", True), (r"[^a-z]+", True),
    (r"[^\n]{0,12}!", True), (r"\w+ \d{2,}", False), (r"(?a:\w)+\s", False)])
def test_the_vocabulary_read_all_at_once_allows_what_the_walk_allows(tokenizer, pattern, exact):
    """Two ways to find a state's tokens (the trie walked byte by byte; every token's characters
    run through the automaton at once, model.engine.token_chars) agree on every state met along
    random answers, and with the brute force where its completions of a character are `exact` (not
    for Unicode's \\w, \\d and \\s, which take some characters of a block and not others)."""
    rng = random.Random(pattern)
    constraint = EngineConstraints(tokenizer, len(tokenizer), "cpu").constraint(pattern, frozenset({1}))
    constraint.WALKED = 0        # never walk where reading all at once is possible
    checked = 0
    for _ in range(6):
        state, ids = constraint.start, []
        for _ in range(10):
            got = constraint.allowed_ids(state)
            if not state[1]:     # between characters: both ways
                assert sorted(constraint._walk(state)) == [t for t in got if t != 1] or got == [1]
                checked += 1
            assert not exact or got == brute_force_allowed(tokenizer.backend, ids, pattern, {1}), ids
            options = [t for t in got if t != 1]
            if not options:
                break
            token = rng.choice(options)
            ids.append(token)
            state = constraint.advance(state, [token])
    assert checked > 10


def test_a_request_left_no_token_to_take_ends_in_error_alone(setup):
    """A constraint whose every allowed token its other settings keep out (its stop ids suppressed once
    the answer is whole; a bias of -inf on them) ends in error naming it; its batch is answered (the
    argmax of all -inf took token 0, which broke the pattern and failed the whole step; without a
    constraint, token 0 was the answer)."""
    ours, requests, expected, tokenizer, _ = setup
    engine = LLMEngine(ours, tokenizer, max_batch_size=4)
    stops = tuple(sorted(engine.stop_ids))
    dead = [replace(requests[0], request_id="suppressed",
                    sampling=SamplingParams(max_new_tokens=8, regex="[0-9]", suppress_tokens=stops)),
            replace(requests[1], request_id="biased",
                    sampling=SamplingParams(max_new_tokens=8, choices=("yes",), sequence_bias={s: float("-inf")
                                                                                              for s in stops}))]
    # unconstrained: every token biased by -inf, or all but the stop ids before min_new_tokens
    vocab = ours.config.text_config.vocab_size
    dead += [replace(requests[3], request_id="all biased",
                     sampling=SamplingParams(max_new_tokens=8, sequence_bias={t: float("-inf") for t in range(vocab)})),
             replace(requests[4], request_id="too early", sampling=SamplingParams(
                 max_new_tokens=8, min_new_tokens=2, sequence_bias={t: float("-inf") for t in range(vocab)
                                                                    if t not in stops}))]
    plain = requests[2]
    results = {r.request_id: r for r in engine.generate([*dead, plain])}
    for name in ("suppressed", "biased", "all biased", "too early"):
        assert results[name].finish_reason == "error" and results[name].error.startswith("NoTokenLeftError"), name
    assert results[plain.request_id].token_ids == expected[plain.request_id]


def test_a_stop_id_outside_the_vocabulary_is_refused_for_a_constrained_request(setup):
    ours, requests, _, tokenizer, _ = setup
    asked = replace(requests[0], sampling=SamplingParams(max_new_tokens=4, regex="[0-9]", stop_token_ids=(1, 99999)))
    with pytest.raises(ValueError, match=r"'r0': stop token id 99999 is outside the vocabulary"):
        LLMEngine(ours, tokenizer).generate([asked])       # (an IndexError inside the step before)
