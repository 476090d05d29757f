"""Benchmark: constrained answers — labels (SamplingParams.choices) or JSON documents of a schema
(SamplingParams.json_schema) — our engine vs transformers' generate with prefix_allowed_tokens_fn,
on the same random-weight checkpoint and prompts, and what the constraint costs our decode step.

    python bench/constraints.py [--batch 8] [--labels 10] [--repeats 3] [--threads 2]
    python bench/constraints.py --json [--new-tokens 48]
    python bench/constraints.py --scores     # labels and each label's log p (choice_logprobs)

The reference's allowed tokens come from our own cached constraint (the cheapest function it could
be given), so the comparison is of the two loops, not of how the sets are found. A byte-level
vocabulary of the model's size is made up (256 byte tokens and random words), since no real
tokenizer may be downloaded here. Prints one JSON row: seconds for both, the rows whose tokens
agree, our decode step with and without the constraint, and the first request's seconds (the
vocabulary read, the allowed tokens of each state found).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import SHAPES, make_requests, our_model, padded_batch, reference_model, with_fresh_keys  # noqa: E402
from model.engine import LLMEngine, SamplingParams  # noqa: E402
from model.engine.constraints import request_pattern  # noqa: E402
from model.engine.stop_strings import byte_level_alphabet  # noqa: E402

LABELS = ["cat", "dog", "car", "person", "tree", "building", "food", "text", "animal", "vehicle",
          "bicycle", "boat", "bird", "chart", "document", "screenshot"]


def made_up_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE of `vocab_size` tokens: SmolVLM's special ids (0-2: <|endoftext|>,
    <|im_start|>, <|im_end|>; the last: <end_of_utterance>), the 256 byte characters, and random
    words (with and without the leading-space character) in between."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    rng = random.Random(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(specials + list(byte_level_alphabet()))}
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < vocab_size - 1:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))
        vocab.setdefault(("Ġ" if rng.random() < 0.5 else "") + word, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials + ["<end_of_utterance>"]])
    return tok


def time_ours(engine: LLMEngine, requests, repeats: int) -> tuple[float, dict, dict]:
    best, stats, tokens = float("inf"), {}, {}
    for run in range(repeats):
        engine.stats = dict.fromkeys(engine.stats, 0)
        start = time.perf_counter()
        results = engine.generate(with_fresh_keys(requests, f"run{run}"))
        if time.perf_counter() - start < best:
            best, stats = time.perf_counter() - start, dict(engine.stats)
            tokens = {r.request_id: r.token_ids for r in results}
    return best, stats, tokens


def time_reference(ref, requests, constraint, stop_ids: list[int], new_tokens: int, repeats: int):
    inputs = padded_batch(requests, ref.generation_config.pad_token_id, "cpu")
    prompt = inputs["input_ids"].shape[1]
    pad = ref.generation_config.pad_token_id
    known: dict = {}

    def allowed(_, row):        # a finished row goes on with padding
        answer = row[prompt:].tolist()
        if set(answer) & set(stop_ids):
            return [pad]
        state = constraint.advance(constraint.start, answer)
        if state not in known:
            known[state] = constraint.allowed_ids(state)
        return known[state]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            out = ref.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=stop_ids,
                               prefix_allowed_tokens_fn=allowed)
            best = min(best, time.perf_counter() - start)
    answers = {}
    for r, row in zip(requests, out[:, prompt:].tolist()):
        ends = [i + 1 for i, t in enumerate(row) if t in stop_ids]
        answers[r.request_id] = row[:ends[0]] if ends else row
    return best, answers


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--labels", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, help="max_new_tokens (default 12 for labels, 48 for JSON)")
    ap.add_argument("--json", action="store_true", help="answers are JSON documents of SCHEMA, not labels")
    ap.add_argument("--scores", action="store_true",
                    help="labels with each label's log p (choice_logprobs); the reference scores them with one "
                         "forward pass of every row per spelling")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = "smolvlm-256m"
    ref = reference_model(name, 128, "cpu", torch.float32)
    ours = our_model(ref)
    tokenizer = made_up_tokenizer(SHAPES[name]["text"]["vocab_size"])
    labels = tuple(LABELS[:args.labels])
    new_tokens = args.new_tokens or (48 if args.json else 12)
    schema = {"type": "object", "properties": {"label": {"enum": list(labels)}, "confident": {"type": "boolean"},
                                               "caption": {"type": "string", "maxLength": 16}},
              "required": ["label", "confident", "caption"]}
    constraint = dict(json_schema=schema) if args.json else dict(choices=labels, choice_logprobs=args.scores)
    base = make_requests(name, 128, args.batch, 3, new_tokens, "cpu")
    chosen = [replace(r, sampling=SamplingParams(max_new_tokens=new_tokens, **constraint)) for r in base]
    engine = LLMEngine(ours, tokenizer, max_batch_size=args.batch)
    start = time.perf_counter()
    engine.generate(chosen)          # warm-up: reads the vocabulary, finds the allowed tokens of the states met
    warm_s = time.perf_counter() - start
    stop_ids = sorted(engine.stop_ids)
    found = engine.constraints.constraint(request_pattern(chosen[0].sampling), frozenset(stop_ids))
    ours_s, stats, our_tokens = time_ours(engine, chosen, args.repeats)
    _, free_stats, _ = time_ours(engine, base, args.repeats)        # same prompts, answers of new_tokens, free
    ref_s, ref_tokens = time_reference(ref, chosen, found, stop_ids, new_tokens, args.repeats)
    scores = {}
    if args.scores:
        score_s, ref_scores = time_reference_scores(ref, tokenizer, chosen, labels, stop_ids, args.repeats)
        ours_scores = {r.request_id: r.choice_logprobs for r in engine.generate(with_fresh_keys(chosen, "scores"))}
        scores = {"ref_score_s": round(score_s, 3), "speedup_with_scores": round((ref_s + score_s) / ours_s, 2),
                  "score_max_abs_diff": max(abs(ours_scores[k][c] - v) for k, row in ref_scores.items()
                                            for c, v in row.items())}
        ours_plain = [replace(r, sampling=replace(r.sampling, choice_logprobs=False)) for r in chosen]
        scores["ours_s_without_scores"] = round(time_ours(engine, ours_plain, args.repeats)[0], 3)
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    step = lambda s: 1e3 * s["decode_s"] / max(s["decode_steps"], 1)  # noqa: E731
    print(json.dumps({
        "batch": args.batch, "answers": "json" if args.json else f"{len(labels)} labels", "threads": args.threads,
        "same_tokens": f"{sum(our_tokens[k] == ref_tokens[k] for k in ref_tokens)}/{len(ref_tokens)}",
        "whole_answers": sum(is_whole(text(t), labels, schema if args.json else None) for t in our_tokens.values()),
        "generated_tokens": sum(map(len, our_tokens.values())),
        "ref_s": round(ref_s, 3), "ours_s": round(ours_s, 3), "speedup": round(ref_s / ours_s, 2),
        "ours_step_ms_constrained": round(step(stats), 2), "ours_step_ms_free": round(step(free_stats), 2),
        "first_batch_s": round(warm_s, 2), **scores}))


def time_reference_scores(ref, tokenizer, requests, labels, stop_ids: list[int], repeats: int):
    """Each label's log p the way one would with transformers: per spelling, one forward pass over
    every row's prompt and the spelling (left-padded), summed, plus any stop token after it."""
    pad = ref.generation_config.pad_token_id
    best, scores = float("inf"), {}
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            per_spelling = {}
            for label in labels:
                for text in (label, " " + label):
                    forced = tokenizer.encode(text, add_special_tokens=False).ids
                    inputs = padded_batch([replace(r, prompt_ids=r.prompt_ids + forced) for r in requests], pad, "cpu")
                    log_p = ref(**inputs).logits[:, -len(forced) - 1:].float().log_softmax(-1)
                    spelled = log_p[:, :-1].gather(-1, torch.tensor(forced).expand(len(requests), -1)[..., None])
                    per_spelling[label, text] = spelled.sum((1, 2)) + log_p[:, -1, stop_ids].logsumexp(-1)
            scores = {r.request_id: {label: float(torch.logaddexp(per_spelling[label, label][i],
                                                                   per_spelling[label, " " + label][i]))
                                     for label in labels} for i, r in enumerate(requests)}
            best = min(best, time.perf_counter() - start)
    return best, scores


def is_whole(text: str, labels, schema: dict | None) -> bool:
    if schema is None:
        return text in labels
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return False
    return set(document) == set(schema["properties"]) and document["label"] in labels


if __name__ == "__main__":
    main()
