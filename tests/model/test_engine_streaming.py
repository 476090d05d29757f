"""The engine's streaming API (add_requests / step): requests that arrive while others run join
their decode steps, with the same answers as alone; failures and cache growth in between."""
from __future__ import annotations

import pytest
import torch

from model.engine import LLMEngine, Request, SamplingParams
from tests.model.test_engine import setup  # noqa: F401  (the fixture: tiny checkpoints, reference answers)

torch.set_num_threads(1)


def _drain(engine: LLMEngine, arrivals: dict[int, list[Request]]) -> tuple[dict[str, list[int]], int]:
    """Step until done, adding arrivals[k] before step k; request id -> tokens, and the steps taken."""
    answers, steps = {}, 0
    while engine.has_unfinished() or any(k >= steps for k in arrivals):
        if steps in arrivals:
            engine.add_requests(arrivals[steps])
        answers.update({r.request_id: r.token_ids for r in engine.step()} if engine.has_unfinished() else {})
        steps += 1
    return answers, steps


@pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlapped"])
def test_requests_arriving_mid_run_share_its_steps(setup, overlap):
    ours, requests, expected, _, _ = setup
    first, second = requests[:4], requests[4:]
    one_by_one = LLMEngine(ours, max_batch_size=4, overlap=overlap)
    one_by_one.generate(first)
    one_by_one.generate(second)
    engine = LLMEngine(ours, max_batch_size=4, overlap=overlap)
    answers, _ = _drain(engine, {0: first, 3: second})
    assert answers == {r.request_id: expected[r.request_id] for r in requests}
    # the second batch filled the slots the first one freed, instead of waiting for its longest row
    assert engine.stats["decode_steps"] < one_by_one.stats["decode_steps"], (engine.stats, one_by_one.stats)
    assert not engine.has_unfinished()


def test_generate_refuses_while_streamed_requests_run(setup):
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4)
    engine.add_requests(requests[:2])
    with pytest.raises(RuntimeError, match="unfinished"):
        engine.generate(requests[2:3])
    with pytest.raises(ValueError, match="empty prompt"):      # checked before anything is queued
        engine.add_requests([requests[3], Request("bad", [])])
    answers, _ = _drain(engine, {})
    assert answers == {r.request_id: expected[r.request_id] for r in requests[:2]}


def test_a_failed_step_drops_the_running_requests_and_the_engine_goes_on(setup, monkeypatch):
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4)
    engine.add_requests(requests[:3])
    engine.step()                                               # prefill
    monkeypatch.setattr(engine.runner, "decode", lambda *a: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert not engine.has_unfinished() and engine.step() == []
    assert not engine.row_state.active.any()                              # no dropped row advances any more
    monkeypatch.undo()
    assert [r.token_ids for r in engine.generate(requests[:3])] == [expected[r.request_id] for r in requests[:3]]


def test_a_request_longer_than_the_cache_waits_for_it_to_grow(setup):
    ours, requests, _, _, _ = setup
    long = Request("long", requests[1].prompt_ids, sampling=SamplingParams(max_new_tokens=300, min_new_tokens=300))
    alone = LLMEngine(ours).generate([long])[0].token_ids
    engine = LLMEngine(ours, max_batch_size=4)
    answers, _ = _drain(engine, {0: requests[:2], 2: [long, requests[2]]})
    assert engine.runner.cache.max_len >= len(long.prompt_ids) + 300
    grown = engine.runner.cache.max_len
    one_more = grown + 1 - len(long.prompt_ids)
    longer = Request("longer", long.prompt_ids, sampling=SamplingParams(max_new_tokens=one_more))
    engine.generate([longer])
    assert engine.runner.cache.max_len == 2 * grown       # grown ahead: it costs no slot here
    assert answers["long"] == alone and len(alone) == 300
    assert set(answers) == {"r0", "r1", "long", "r2"}
