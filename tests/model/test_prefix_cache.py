"""Questions about one image share the K/V of their prompt's prefix (model.engine.prefix_cache):
computed once, copied between slots, and every answer is still the reference's on that prompt alone."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, Request, SamplingParams
from model.engine.image_cache import keyed_by_shape
from model.engine.prefix_cache import MIN_SHARED_TEXT, PrefixSource, SharedPrefixAdmission, SlotPrefixes
from model.engine.scheduler import Scheduler, Sequence
from tests.model.test_engine import _reference, setup  # noqa: F401  (tiny checkpoints, the reference)

torch.set_num_threads(1)

IMAGE = 7


def _image_end(ids: list[int], image_token_id: int) -> int:
    return max(i for i, t in enumerate(ids) if t == image_token_id) + 2     # and the token closing the image


@pytest.fixture(scope="module")
def questions(setup):
    """Three questions about each image of the setup (its own, and two made of other prompts'
    endings), in runs of one image, keyed, with the reference's answer to each alone."""
    ours, requests, _, _, ref = setup
    image_token_id = ours.config.image_token_id
    with_images = [r for r in requests if r.pixel_values is not None]
    tails = [r.prompt_ids[-n:] for r, n in zip(requests[::-1], (5, 9, 13, 7))]
    out = []
    for r in with_images:
        prefix = r.prompt_ids[:_image_end(r.prompt_ids, image_token_id)]
        for j, ids in enumerate([r.prompt_ids, prefix + tails[len(out) % 4], prefix + tails[(len(out) + 1) % 4]]):
            out.append(Request(f"{r.request_id}-q{j}", ids, r.pixel_values, r.pixel_attention_mask,
                               SamplingParams(max_new_tokens=4 + len(out) % 5), image_key=f"image-of-{r.request_id}"))
    return out, {q.request_id: _reference(ref, q) for q in out}


@pytest.mark.parametrize("slots,batched", [(16, False), (4, False), (1, False), (4, True)])
def test_questions_about_one_image_answer_as_the_reference_with_one_prefill_of_it(setup, questions, slots, batched):
    ours = setup[0]
    requests, expected = questions
    engine = LLMEngine(ours, max_batch_size=slots, batched_prefill=batched)
    got = {r.request_id: r.token_ids for r in engine.generate(requests)}
    assert got == expected
    images = len(requests) // 3
    assert engine.stats["images_encoded"] == images
    shared = sum(_image_end(r.prompt_ids, ours.config.image_token_id) for r in requests[1::3] + requests[2::3])
    # With few slots a waiting question may find its image's slot taken by an earlier row, but
    # one slot or enough slots keep every image until its questions are in.
    assert engine.stats["prefix_tokens_reused"] >= (shared if slots in (1, 16) else 1)
    plain = LLMEngine(ours, max_batch_size=slots, batched_prefill=batched, share_prefixes=False)
    assert {r.request_id: r.token_ids for r in plain.generate(requests)} == expected
    assert plain.stats["prefix_tokens_reused"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_streamed_in_any_order_and_any_grouping_every_answer_is_the_references(setup, questions, seed):
    """Questions and text-only rows arrive shuffled, in random groups between steps, into 3 slots
    (slots change hands, sources are overwritten or kept, questions wait or not)."""
    ours, requests, expected_text_only, _, _ = setup
    asked, expected = questions
    text_only = [r for r in requests if r.pixel_values is None]
    rows = asked + text_only
    expected = {**expected, **{r.request_id: expected_text_only[r.request_id] for r in text_only}}
    engine = LLMEngine(ours, max_batch_size=3, overlap=seed % 2 == 1, batched_prefill=seed >= 2)
    assert streamed_in_random_groups(engine, rows, seed) == expected
    assert engine.stats["prefix_tokens_reused"] > 0


def streamed_in_random_groups(engine: LLMEngine, rows: list[Request], seed: int) -> dict[str, list[int]]:
    """The rows shuffled, added in random groups (1-4) between the engine's steps; tokens by id."""
    import random

    rng = random.Random(seed)
    rows = rows[:]
    rng.shuffle(rows)
    got = {}
    while rows or engine.has_unfinished():
        if rows and rng.random() < 0.5:
            engine.add_requests([rows.pop() for _ in range(min(len(rows), rng.randint(1, 4)))])
        got.update({r.request_id: r.token_ids for r in engine.step()})
    return got


def test_a_later_request_reuses_a_finished_rows_prefix_and_an_abort_forgets_them(setup, questions):
    ours = setup[0]
    requests, expected = questions
    engine = LLMEngine(ours, max_batch_size=2)
    engine.generate(requests[:1])
    key = keyed_by_shape(requests[0]).image_key         # the engine's: the user's and the image's grid
    assert engine.prefixes.holds(key)
    before = engine.stats["prefix_tokens_reused"]
    assert engine.generate(requests[1:2])[0].token_ids == expected[requests[1].request_id]
    assert engine.stats["prefix_tokens_reused"] > before and engine.stats["images_encoded"] == 1
    engine.abort()
    assert not engine.prefixes.holds(key)


def test_a_slot_overwritten_by_another_prompt_is_no_source(setup, questions):
    ours, requests, expected_text_only, _, _ = setup
    asked, expected = questions
    text_only = next(r for r in requests if r.pixel_values is None)
    engine = LLMEngine(ours, max_batch_size=1)
    engine.generate(asked[:1])
    assert engine.generate([text_only])[0].token_ids == expected_text_only[text_only.request_id]
    assert engine.generate(asked[1:2])[0].token_ids == expected[asked[1].request_id]
    assert engine.stats["prefix_tokens_reused"] == 0 and engine.stats["images_encoded"] == 1   # features cached


def test_slot_prefixes_choose_the_longest_prefix_that_covers_the_image_and_survives_this_prefill():
    prefixes = SlotPrefixes(IMAGE)
    pixels = torch.ones(1, 3, 2, 2)

    def ask(ids: list[int], key: str | None = "a") -> Request:
        return Request("r", ids, pixels, image_key=key)

    prefixes.remember([ask([1, IMAGE, IMAGE, 2, 3]), ask([1, IMAGE, IMAGE, 2, 4, 5]), ask([1, IMAGE, 9], "b")],
                      [0, 1, 2])
    assert prefixes.plan([ask([1, IMAGE, IMAGE, 2, 4, 6])], [5]) == [PrefixSource(1, 5)]     # the longer one
    assert prefixes.plan([ask([1, IMAGE, IMAGE, 2, 3])], [6]) == [PrefixSource(0, 4)]       # one token left to run
    # slot 0 is overwritten by this prefill: only its own new request may use its old rows (no copy)
    assert prefixes.plan([ask([1, IMAGE, IMAGE, 2, 3, 3]), ask([1, IMAGE, IMAGE, 8])],
                         [3, 0]) == [PrefixSource(1, 4), PrefixSource(0, 3)]
    assert prefixes.plan([ask([1, IMAGE, 9, 9], "b")], [2]) == [PrefixSource(2, 3)]
    # the rows a slot's new request keeps serve another request of this prefill too
    assert prefixes.plan([ask([1, IMAGE, IMAGE, 2, 4, 8]), ask([1, IMAGE, IMAGE, 2, 4, 5, 6])],
                         [1, 7]) == [PrefixSource(1, 5), PrefixSource(1, 5)]
    assert prefixes.plan([ask([1, IMAGE, IMAGE])], [4]) == [None]           # the image is the end: nothing to run
    prefixes.remember([ask([1, IMAGE, IMAGE, 2])], [4])
    assert prefixes.plan([ask([1, 5, IMAGE, IMAGE, 2])], [6]) == [None]     # the image not covered
    assert prefixes.plan([ask([1, IMAGE, IMAGE, 2, 9], key=None)], [6]) == [None]         # no key, no sharing
    assert prefixes.plan([ask([1, IMAGE, IMAGE, 2, 9], key="c")], [6]) == [None]          # another image
    prefixes.clear()
    assert not prefixes.holds("a")


class Holding:
    """An admission policy that holds the requests `held` names, takes the lowest slot, counts whole prompts."""

    def __init__(self, held) -> None:
        self.held = held

    def hold(self, seq: Sequence, batch: list[Sequence]) -> bool:
        return self.held(seq)

    def choose_slot(self, seq: Sequence, free: set[int]) -> int:
        return min(free)

    def prefill_tokens(self, seq: Sequence) -> int:
        return seq.prompt_len


def test_held_requests_keep_their_place_in_the_queue():
    scheduler = Scheduler(num_slots=4, max_prefill_tokens=100)
    seqs = [Sequence(Request(f"r{i}", [1] * 3), frozenset()) for i in range(5)]
    for s in seqs:
        scheduler.add(s)
    odd = scheduler.admit(Holding(lambda seq: int(seq.request.request_id[1:]) % 2 == 1))
    assert [s.request.request_id for s in odd] == ["r0", "r2", "r4"]
    assert [s.request.request_id for s in scheduler.waiting] == ["r1", "r3"]
    assert [s.request.request_id for s in scheduler.admit(Holding(lambda seq: True))] == ["r1"]   # never none
    # A held request does not count against the budget, nor stop the ones behind it.
    scheduler = Scheduler(num_slots=4, max_prefill_tokens=5)
    for i, n in enumerate([3, 3, 2]):
        scheduler.add(Sequence(Request(f"r{i}", [1] * n), frozenset()))
    assert [s.request.request_id for s in scheduler.admit(Holding(lambda seq: seq.request.request_id == "r1"))] == ["r0", "r2"]


def test_free_slots_holding_a_requests_image_come_first_and_wanted_images_are_kept():
    prefixes = SlotPrefixes(IMAGE)
    pixels = torch.ones(1, 3, 2, 2)
    prefixes.remember([Request("b0", [1, IMAGE, 2], pixels, image_key="b"),
                       Request("a0", [1, IMAGE, 3], pixels, image_key="a")], [0, 1])
    scheduler = Scheduler(num_slots=4, max_prefill_tokens=100)
    for key in "acb":
        scheduler.add(Sequence(Request(key, [1, IMAGE, 4, 5], pixels, image_key=key), frozenset()))
    admitted = scheduler.admit(SharedPrefixAdmission(prefixes, scheduler.waiting))
    # a: its image's slot; c: not slot 0, whose image b a waiting request wants; b: its image's slot
    assert {s.request.request_id: s.slot for s in admitted} == {"a": 1, "c": 2, "b": 0}


def test_requests_about_one_image_wait_one_prefill_for_its_prefix(setup, questions):
    ours = setup[0]
    requests, _ = questions
    engine = LLMEngine(ours, max_batch_size=16)
    engine.add_requests(requests[:3] + [replace(requests[3], image_key=None)])
    engine.step()
    running = {s.request.request_id for s in engine._scheduler.running.values()}
    assert running == {requests[0].request_id, requests[3].request_id}       # the others copy the first's
    engine.step()
    assert len(engine._scheduler.running) == 4 and engine.stats["prefills"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp32_shared_prefixes_equal_reference(setup, questions):
    """CUDA's defaults (graphs, compiled and overlapped decode, padded-group prefill) with prefixes
    copied between slots: the reference's tokens."""
    requests, expected = questions
    model = copy.deepcopy(setup[0]).to("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    engine = LLMEngine(model, max_batch_size=4)
    assert {r.request_id: r.token_ids for r in engine.generate(requests)} == expected
    assert engine.stats["prefix_tokens_reused"] > 0


def test_the_prefill_budget_counts_the_tokens_a_prefill_runs(setup, questions):
    """A budget that one whole prompt fills lets in both questions that copy the image's prefix."""
    ours = setup[0]
    requests, expected = questions
    engine = LLMEngine(ours, max_batch_size=16, max_prefill_tokens=max(len(r.prompt_ids) for r in requests[:3]))
    engine.add_requests(requests[:3])
    engine.step()
    assert len(engine._scheduler.running) == 1
    engine.step()
    assert len(engine._scheduler.running) == 3 and engine.stats["prefills"] == 2
    got = {}
    while engine.has_unfinished():
        got.update({r.request_id: r.token_ids for r in engine.step()})
    assert got == {r.request_id: expected[r.request_id] for r in requests[:3]}


# ---- a long text before the image (a system prompt), shared whatever the image -----------------------

@pytest.fixture(scope="module")
def with_system_prompt(setup):
    """Each image request of the setup behind the same 70-token system turn, and two more
    questions about each of two images (keyed, so their image prefixes are shared too), with the
    reference's answer to each alone."""
    ours, requests, _, _, ref = setup
    image = ours.config.image_token_id
    text = [t for r in requests if r.pixel_values is not None for t in r.prompt_ids[_image_end(r.prompt_ids, image):]]
    system = (text * 70)[:70]
    out = []
    for r in requests:
        if r.pixel_values is None:
            continue
        ids = r.prompt_ids[:1] + system + r.prompt_ids[1:]
        key = f"image-of-{r.request_id}" if len(out) < 4 else None
        out.append(Request(f"{r.request_id}-s", ids, r.pixel_values, r.pixel_attention_mask,
                           SamplingParams(max_new_tokens=3 + len(out) % 4), image_key=key))
        if key is not None:
            out.append(replace(out[-1], request_id=f"{r.request_id}-s2", prompt_ids=ids[:-3] + text[:5]))
    assert all(ids.index(image) >= MIN_SHARED_TEXT for ids in (r.prompt_ids for r in out))
    return out, {q.request_id: _reference(ref, q) for q in out}, len(system) + 1


@pytest.mark.parametrize("slots,batched", [(16, False), (1, False), (4, True)])
def test_a_long_system_prompt_is_prefilled_once_whatever_the_image(setup, with_system_prompt, slots, batched):
    ours = setup[0]
    requests, expected, _ = with_system_prompt
    engine = LLMEngine(ours, max_batch_size=slots, batched_prefill=batched)
    assert {r.request_id: r.token_ids for r in engine.generate(requests)} == expected
    image = ours.config.image_token_id
    text = [r.prompt_ids.index(image) for r in requests]
    # Every request after the first copies at least its text before the image (one slot: the
    # previous row's; 16: the first prefill runs one request, the second copies from it).
    if slots in (1, 16):
        assert engine.stats["prefix_tokens_reused"] >= sum(text[1:])
        assert engine.stats["images_encoded"] == len({r.image_key or r.request_id for r in requests})
    else:
        assert engine.stats["prefix_tokens_reused"] > 0
    plain = LLMEngine(ours, max_batch_size=slots, batched_prefill=batched, share_prefixes=False)
    assert {r.request_id: r.token_ids for r in plain.generate(requests)} == expected
    assert plain.stats["prefix_tokens_reused"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp32_shared_system_prompt_equals_reference(setup, with_system_prompt):
    """CUDA's defaults with a system turn copied between slots: the reference's tokens."""
    requests, expected, _ = with_system_prompt
    model = copy.deepcopy(setup[0]).to("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    engine = LLMEngine(model, max_batch_size=4)
    assert {r.request_id: r.token_ids for r in engine.generate(requests)} == expected
    assert engine.stats["prefix_tokens_reused"] > 0


@pytest.mark.parametrize("seed", range(2))
def test_system_prompted_rows_streamed_in_any_order_answer_as_the_reference(setup, with_system_prompt, seed):
    ours, requests, expected_plain, _, _ = setup
    asked, expected, _ = with_system_prompt
    rows = asked + requests
    expected = {**expected, **expected_plain}
    engine = LLMEngine(ours, max_batch_size=3, overlap=seed == 1, batched_prefill=seed == 1)
    assert streamed_in_random_groups(engine, rows, seed) == expected
    assert engine.stats["prefix_tokens_reused"] > 0


def test_slot_prefixes_share_a_long_text_before_the_image_with_any_image():
    prefixes = SlotPrefixes(IMAGE)
    pixels = torch.ones(1, 3, 2, 2)
    system = list(range(100, 100 + MIN_SHARED_TEXT))

    def ask(ids: list[int], key: str | None = None, image: bool = True) -> Request:
        return Request("r", ids, pixels if image else None, image_key=key)

    prefixes.remember([ask(system + [IMAGE, IMAGE, 2, 3], "a"), ask(system[1:] + [IMAGE, 9], "b")], [0, 1])
    n = len(system)
    assert prefixes.plan([ask(system + [IMAGE, 5])], [2]) == [PrefixSource(0, n)]             # no key: its text
    assert prefixes.plan([ask(system + [IMAGE, 5], "c")], [3]) == [PrefixSource(0, n)]        # another image
    assert prefixes.plan([ask(system + [IMAGE, IMAGE, 2, 4], "a")], [4]) == [PrefixSource(0, n + 3)]   # its image
    assert prefixes.plan([ask(system[1:] + [IMAGE, 5], "c")], [5]) == [None]      # text shorter than MIN_SHARED_TEXT
    assert prefixes.plan([ask(system[:-1] + [8, IMAGE, 5])], [5]) == [None]       # another text
    assert prefixes.plan([ask(system + [5, 6], image=False)], [5]) == [None]      # no image: nothing shared
    # slot 0 is taken by this prefill: its new request keeps its text, which serves the other too
    assert prefixes.plan([ask(system + [IMAGE, 7]), ask(system + [IMAGE, 8])],
                         [0, 6]) == [PrefixSource(0, n), PrefixSource(0, n)]
    prefixes.remember([ask(system + [IMAGE, 7])], [0])
    assert prefixes.holds_text(tuple(system)) and prefixes.reusable(ask(system + [IMAGE, 1], "z")) == n
    assert prefixes.plan([ask(system + [11, 12, IMAGE, 5])], [5]) == [PrefixSource(0, n)]     # their common text
    prefixes.remember([ask(system + [11, 12, 13, IMAGE, 5])], [5])
    assert prefixes.plan([ask(system + [11, 12, IMAGE, 5])], [6]) == [PrefixSource(5, n + 2)]     # the longest
    prefixes.plan([ask([1, IMAGE, 2]), ask([1, IMAGE, 3])], [0, 5])     # overwritten by prompts without that text
    assert not prefixes.holds_text(tuple(system)) and prefixes.reusable(ask(system + [IMAGE, 1])) == 0


def test_requests_with_one_system_prompt_wait_one_prefill_for_it(setup, with_system_prompt):
    ours = setup[0]
    requests = [r for r in with_system_prompt[0] if r.image_key is None]       # three images
    plain = next(r for r in setup[1] if r.pixel_values is None)
    engine = LLMEngine(ours, max_batch_size=16)
    engine.add_requests(requests + [plain])
    engine.step()
    running = {s.request.request_id for s in engine._scheduler.running.values()}
    assert running == {requests[0].request_id, plain.request_id}     # the others copy the first's text
    engine.step()
    assert len(engine._scheduler.running) == 4 and engine.stats["prefills"] == 2
    assert engine.stats["prefix_tokens_reused"] == 2 * requests[1].prompt_ids.index(ours.config.image_token_id)


def test_common_prefix_length_by_halving_equals_counting():
    import random

    from model.engine.prefix_cache import common_prefix_length

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randint(0, 2) for _ in range(rng.randint(0, 40))]
        b = a[:rng.randint(0, len(a))] + [rng.randint(0, 2) for _ in range(rng.randint(0, 40))]
        counted = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix_length(a, b) == common_prefix_length(b, a) == counted


def test_a_text_is_found_in_a_slot_this_prefill_does_not_take():
    """The latest slots holding the text are being given other prompts: an older one serves."""
    from model.engine.prefix_cache import TEXT_SOURCES_ASKED

    prefixes = SlotPrefixes(IMAGE)
    system = list(range(100, 100 + MIN_SHARED_TEXT))
    pixels = torch.ones(1, 3, 2, 2)

    def ask(ids: list[int]) -> Request:
        return Request("r", ids, pixels)

    prefixes.remember([ask(system + [IMAGE, i]) for i in range(12)], list(range(12)))
    taken = list(range(12 - TEXT_SOURCES_ASKED, 12))
    plan = prefixes.plan([ask([1, IMAGE, 2])] * len(taken) + [ask(system + [IMAGE, 99])], taken + [12])
    assert plan == [None] * len(taken) + [PrefixSource(12 - TEXT_SOURCES_ASKED - 1, len(system))]
