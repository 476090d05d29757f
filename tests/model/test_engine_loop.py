"""EngineLoop: batches submitted while others run share the engine's decode steps; a bad request or
a failed step is answered request by request, naming its own, and every other one is answered."""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model import compiling
from model.engine import LLMEngine, Request, SamplingParams
from model.engine.loop import EngineLoop
from tests.model.test_engine import setup  # noqa: F401  (tiny checkpoints, the reference's answers)

torch.set_num_threads(1)


def _keyed(requests: list[Request]) -> dict:
    return {r.request_id: r for r in requests}


def test_batches_in_flight_share_steps_and_get_the_reference_answers(setup):
    ours, requests, expected, _, _ = setup
    one_by_one = LLMEngine(ours, max_batch_size=4)
    for part in (requests[:3], requests[3:6], requests[6:]):
        one_by_one.generate(part)
    engine = LLMEngine(ours, max_batch_size=4)
    loop = EngineLoop(engine)
    futures = [loop.submit(_keyed(part)) for part in (requests[:3], requests[3:6], requests[6:], [])]
    outcomes = {}
    for future in futures:
        outcomes.update(future.result(timeout=60))
    assert {k: r.token_ids for k, r in outcomes.items()} == expected
    assert all(r.request_id == k for k, r in outcomes.items())       # the caller's ids, not the loop's
    assert engine.stats["decode_steps"] < one_by_one.stats["decode_steps"]
    late = loop.submit(_keyed(requests[:2]))
    loop.close()                                                     # answers what was submitted first
    assert {k: r.token_ids for k, r in late.result(timeout=0).items()} == {
        r.request_id: expected[r.request_id] for r in requests[:2]}
    with pytest.raises(RuntimeError, match="closed"):
        loop.submit(_keyed(requests[:1]))


def test_a_bad_row_and_a_failing_step_cost_only_their_own_rows(setup, monkeypatch):
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4)
    poison = requests[5]
    prefill = engine._prefill

    def failing_prefill(scheduler, seqs):       # a step fails whenever the poison row is in it
        if any(s.request.prompt_ids == poison.prompt_ids for s in seqs):
            raise RuntimeError("out of memory")
        return prefill(scheduler, seqs)

    monkeypatch.setattr(engine, "_prefill", failing_prefill)
    loop = EngineLoop(engine)
    bad = Request("empty", [])
    first = loop.submit(_keyed(requests[:4]) | {"empty": bad})
    second = loop.submit(_keyed(requests[4:]))
    outcomes = first.result(timeout=60) | second.result(timeout=60)
    assert isinstance(outcomes["empty"], ValueError) and "'empty'" in str(outcomes["empty"])
    assert isinstance(outcomes[poison.request_id], RuntimeError)
    answered = {k: r.token_ids for k, r in outcomes.items() if k not in ("empty", poison.request_id)}
    assert answered == {k: v for k, v in expected.items() if k != poison.request_id}
    assert not engine.has_unfinished()


def test_a_step_that_fails_after_its_work_costs_only_its_own_row(setup, monkeypatch):
    """The step ran, then turning one finished row into a result failed (its text, say): the engine
    still holds the others; they are dropped and run again alone, and are answered."""
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4)
    poison = replace(requests[2], sampling=SamplingParams(max_new_tokens=2))   # ends before the others
    result = engine._result

    def failing_result(seq):
        if seq.request.prompt_ids == poison.prompt_ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return result(seq)

    monkeypatch.setattr(engine, "_result", failing_result)
    batch = _keyed(requests[:4]) | {poison.request_id: poison}
    outcomes = EngineLoop(engine).submit(batch).result(timeout=60)
    assert isinstance(outcomes.pop(poison.request_id), UnicodeDecodeError)
    assert {k: r.token_ids for k, r in outcomes.items()} == {k: expected[k] for k in outcomes}
    assert len(outcomes) == 3
    assert not engine.has_unfinished()


def test_a_request_the_cache_cannot_hold_fails_alone(setup):
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4, kv_cache_tokens=300)
    huge = replace(requests[0], request_id="huge", sampling=SamplingParams(max_new_tokens=400))
    loop = EngineLoop(engine)
    outcomes = loop.submit({"r1": requests[1], "huge": huge, "r2": requests[2]}).result(timeout=60)
    assert isinstance(outcomes["huge"], ValueError) and "KV cache budget" in str(outcomes["huge"])
    assert {k: outcomes[k].token_ids for k in ("r1", "r2")} == {k: expected[k] for k in ("r1", "r2")}
    assert not engine.has_unfinished()


def test_submissions_from_many_threads(setup):
    ours, requests, expected, _, _ = setup
    loop = EngineLoop(LLMEngine(ours, max_batch_size=3))
    outcomes, lock = {}, threading.Lock()

    def call(part):
        got = loop.submit(_keyed(part)).result(timeout=60)
        with lock:
            outcomes.update(got)

    threads = [threading.Thread(target=call, args=([r],)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {k: r.token_ids for k, r in outcomes.items()} == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_submissions_from_threads_moving_pixels_while_graphs_are_captured(setup):
    """As the pipeline does: callers put each request's pixels on the device while the loop's
    thread captures CUDA graphs for new buckets."""
    import copy
    from dataclasses import replace

    ours, requests, _, _, _ = setup
    model = copy.deepcopy(ours).to("cuda", torch.bfloat16)
    eager = {r.request_id: r.token_ids for r in
             LLMEngine(model, max_batch_size=3, use_cuda_graphs=False, compile=False).generate(requests)}
    loop = EngineLoop(LLMEngine(model, max_batch_size=3, compile=False))
    outcomes, lock = {}, threading.Lock()

    def call(request):
        pv = None if request.pixel_values is None else request.pixel_values.to("cuda", torch.bfloat16)
        got = loop.submit({request.request_id: replace(request, pixel_values=pv)}).result(timeout=120)
        with lock:
            outcomes.update(got)

    threads = [threading.Thread(target=call, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {k: r.token_ids for k, r in outcomes.items()} == eager


def test_a_step_that_does_not_return_calls_the_watchdog(setup):
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4)
    release, stalls = threading.Event(), []
    step = engine.step

    def wedged_once():          # the first step blocks until the watchdog has fired
        engine.step = step
        release.wait(timeout=60)
        return step()

    engine.step = wedged_once
    loop = EngineLoop(engine, stall_timeout_s=0.5, on_fatal=lambda why: stalls.append(why) or release.set())
    outcomes = loop.submit(_keyed(requests[:3])).result(timeout=60)
    loop.close()
    assert len(stalls) == 1 and "has not returned for" in stalls[0]
    assert {k: r.token_ids for k, r in outcomes.items()} == {r.request_id: expected[r.request_id] for r in requests[:3]}
    quiet = EngineLoop(LLMEngine(ours, max_batch_size=4), stall_timeout_s=5.0, on_fatal=stalls.append)
    quiet.submit(_keyed(requests[:3])).result(timeout=60)
    quiet.close()
    assert len(stalls) == 1                     # steps that return in time never call it


def compiling_first_step(engine: LLMEngine, seconds: float, fn) -> None:
    """The engine's next step first compiles `fn` (new to dynamo) as the engine's compiles do
    (model.compiling.compiled) through a backend that takes `seconds`: the real path, its callbacks included."""
    step = engine.step

    def slow_backend(graph, example_inputs):
        time.sleep(seconds)
        return graph.forward

    compiled = compiling.compiled(fn, backend=slow_backend)

    def compiling_once():
        engine.step = step
        compiled(torch.zeros(3))
        return step()

    engine.step = compiling_once


def test_a_step_that_compiles_past_the_stall_timeout_is_not_a_hang(setup):
    """A replica's first compiled decode step compiles for minutes (100-110 s at 8B on an H200):
    the watchdog does not count torch.compile's time, only the rest."""
    ours, requests, expected, _, _ = setup
    engine, stalls = LLMEngine(ours, max_batch_size=4), []
    compiling_first_step(engine, 3.0, lambda x: x + 1)
    loop = EngineLoop(engine, stall_timeout_s=1.5, on_fatal=stalls.append)
    outcomes = loop.submit(_keyed(requests[:3])).result(timeout=60)
    loop.close()
    assert stalls == []
    assert {k: r.token_ids for k, r in outcomes.items()} == {r.request_id: expected[r.request_id] for r in requests[:3]}


def test_compiles_after_a_dynamo_reset_are_still_counted():
    """torch._dynamo.reset() (other tests', a notebook's) drops every compile callback, and a function
    compiled before it compiles again: the clock is registered again as the watchdog reads it (in CI
    it counted no compile after another file's reset, and the watchdog ended the engine)."""
    def slow_backend(graph, example_inputs):
        time.sleep(0.3)
        return graph.forward

    run = compiling.compiled(lambda x: x - 1, backend=slow_backend)
    run(torch.zeros(2))
    torch._dynamo.reset()
    before = compiling.compile_seconds()        # as the watchdog reads it when an engine call starts
    run(torch.zeros(2))
    assert compiling.compile_seconds() - before >= 0.3


def test_the_model_and_the_engine_compile_only_through_compiled():
    """The clock is registered by model.compiling.compiled: a torch.compile of its own in model/ or
    pipeline/ would compile uncounted in a fresh replica, and its watchdog would end it mid-compile."""
    root = Path(__file__).resolve().parents[2]
    sources = [path for folder in ("model", "pipeline") for path in (root / folder).rglob("*.py")
               if path.name != "compiling.py"]
    direct = [f"{path.relative_to(root)}:{n}" for path in sources
              for n, line in enumerate(path.read_text().splitlines(), 1) if "torch.compile(" in line]
    assert direct == []


def test_a_compile_past_its_own_limit_is_a_hang(setup, monkeypatch):
    import model.engine.loop as loop_module

    ours, requests, _, _, _ = setup
    engine, stalls = LLMEngine(ours, max_batch_size=4), []
    compiling_first_step(engine, 3.0, lambda x: x * 2)          # the watchdog looks every 1.25 s
    monkeypatch.setattr(loop_module, "COMPILE_LIMIT_S", 0.4)
    loop = EngineLoop(engine, stall_timeout_s=5.0, on_fatal=stalls.append)
    loop.submit(_keyed(requests[:1])).result(timeout=60)
    loop.close()
    assert len(stalls) == 1 and "of it compiling" in stalls[0]


def test_a_step_failing_on_a_broken_device_is_the_process_fault_not_the_rows(setup):
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4)
    assert engine.device_ok()                   # CPU: always
    fatal, step = [], engine.step

    def lost_device():                          # as after a CUDA illegal address: the step fails ...
        engine.step = step
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.step, engine.device_ok = lost_device, lambda: False      # ... and so would any other call
    loop = EngineLoop(engine, on_fatal=fatal.append)
    outcomes = loop.submit(_keyed(requests[:3])).result(timeout=60)
    loop.close()
    assert len(fatal) == 1 and "illegal memory access" in fatal[0] and "no longer works" in fatal[0]
    # on_fatal returned (its default ends the process): the rows went on as after any failed step
    assert {k: r.token_ids for k, r in outcomes.items()} == {r.request_id: expected[r.request_id] for r in requests[:3]}


def test_a_device_check_that_hangs_and_a_device_lost_in_a_rows_run_alone_are_the_process_fault(setup):
    """device_ok() after a failed step is watched (on a wedged GPU its synchronize never returns),
    and a run alone that fails on a lost device calls on_fatal too (every row after would have been
    answered with the device's error as its own)."""
    ours, requests, _, _, _ = setup
    engine, fatal = LLMEngine(ours, max_batch_size=4), []
    step = engine.step

    def fails_once():
        engine.step = step
        raise RuntimeError("NCCL watchdog: collective timed out")

    engine.step, engine.device_ok = fails_once, lambda: time.sleep(2.0) or True
    loop = EngineLoop(engine, stall_timeout_s=0.5, on_fatal=fatal.append)
    loop.submit(_keyed(requests[:1])).result(timeout=60)
    loop.close()
    assert fatal and "has not returned" in fatal[0]

    engine, fatal = LLMEngine(ours, max_batch_size=4), []

    def lost():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.step, engine.device_ok = lost, lambda: False
    loop = EngineLoop(engine, on_fatal=fatal.append)
    loop.submit(_keyed(requests[:2])).result(timeout=60)
    loop.close()
    assert len(fatal) == 3          # the batch's step, then each row's run alone


def test_a_submit_racing_close_is_answered_or_refused_never_left_unread(setup, monkeypatch):
    import model.engine.loop as loop_module

    ours, requests, expected, _, _ = setup
    loop, made = EngineLoop(LLMEngine(ours, max_batch_size=2)), loop_module.Submission.__init__

    def slow(self, batch):          # widens the gap between submit()'s check that the loop is open and its put
        made(self, batch)
        time.sleep(0.5)

    monkeypatch.setattr(loop_module.Submission, "__init__", slow)
    outcome = {}

    def submit():
        try:
            outcome["future"] = loop.submit(_keyed(requests[:1]))
        except RuntimeError as e:
            outcome["refused"] = e

    thread = threading.Thread(target=submit)
    thread.start()
    time.sleep(0.1)
    loop.close()
    thread.join()
    assert "refused" in outcome or outcome["future"].result(timeout=10)[requests[0].request_id].token_ids == \
        expected[requests[0].request_id]


def test_samples_through_the_loop_are_named_after_the_request(setup):
    ours, requests, _, _, _ = setup
    loop = EngineLoop(LLMEngine(ours, max_batch_size=4))
    asked = replace(requests[0], sampling=SamplingParams(max_new_tokens=3, temperature=1.0, n=3, seed=1))
    result = loop.submit({"k": asked}).result(timeout=60)["k"]
    loop.close()
    assert [s.request_id for s in result.samples] == [asked.request_id] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_ok_sees_a_lost_cuda_context(checkpoint):
    """In a child process: a device-side assert loses the context for every later CUDA call."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]

    script = (
        "import torch\n"
        "from model import Idefics3ForConditionalGeneration\n"
        "from model.engine import LLMEngine\n"
        f"m = Idefics3ForConditionalGeneration.from_pretrained({str(checkpoint('smolvlm'))!r}, device='cuda')\n"
        "e = LLMEngine(m, max_batch_size=2)\n"
        "print('before', e.device_ok())\n"
        "try:\n"
        "    torch.zeros(2, device='cuda')[torch.tensor([7], device='cuda')].item()\n"
        "except Exception:\n"
        "    pass\n"
        "print('after', e.device_ok())\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=repo,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])))
    assert "before True" in run.stdout and "after False" in run.stdout, run.stdout + run.stderr[-2000:]


def test_a_request_a_set_kv_budget_cannot_hold_is_refused_when_added(setup):
    """With kv_cache_tokens set, a request too long for it is refused by add_requests, naming it; it
    failed the next step instead, which dropped every request queued beside it."""
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=2, kv_cache_tokens=1024)
    big = replace(requests[0], request_id="big", prompt_ids=requests[0].prompt_ids + [5] * 900,
                  sampling=SamplingParams(max_new_tokens=200))
    with pytest.raises(ValueError, match="request 'big': KV cache budget too small .*kv_cache_tokens=1024"):
        engine.add_requests([big])
    results = engine.generate(requests[1:3])
    assert [r.token_ids for r in results] == [expected[r.request_id] for r in requests[1:3]]


def test_a_row_run_alone_whose_abort_fails_too_is_still_answered(setup, monkeypatch):
    """A step fails for a row's reason, so its rows run alone; then the engine breaks (a tensor-
    parallel group whose rank died: every broadcast raises, abort too). The row being run alone was
    left unsettled and its batch's future never completed."""
    ours, requests, _, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4)
    broken = RuntimeError("Connection reset by peer: rank 1 died")

    aborts = []

    def abort():                    # the abort after the failed step works; the group breaks after it
        aborts.append(1)
        if len(aborts) > 1:
            raise broken
        real_abort()

    def first_step_fails():
        monkeypatch.setattr(engine, "add_requests", lambda _: (_ for _ in ()).throw(broken))
        raise ValueError("a row's own failure")

    real_abort = engine.abort
    monkeypatch.setattr(engine, "step", first_step_fails)
    monkeypatch.setattr(engine, "abort", abort)
    outcomes = EngineLoop(engine).submit(_keyed(requests[:2])).result(timeout=30)
    assert set(outcomes) == {r.request_id for r in requests[:2]}
    assert all(isinstance(o, RuntimeError) and "rank 1 died" in str(o) for o in outcomes.values())


def test_a_panic_in_a_step_fails_its_rows_and_the_loop_serves_on(setup, monkeypatch):
    """A Rust library's panic (pyo3's PanicException) is a BaseException, past every `except Exception`:
    it ended the loop's thread, and every caller waited for ever."""
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4)

    class PanicException(BaseException):
        pass

    step = engine.step

    def panicking_step():
        monkeypatch.setattr(engine, "step", step)
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(engine, "step", panicking_step)
    loop = EngineLoop(engine)
    outcomes = loop.submit(_keyed(requests[:2])).result(timeout=30)
    assert all(isinstance(o, RuntimeError) and "PanicException" in str(o) for o in outcomes.values()), outcomes
    later = loop.submit(_keyed(requests[2:4])).result(timeout=60)
    assert {k: r.token_ids for k, r in later.items()} == {r.request_id: expected[r.request_id] for r in requests[2:4]}
    loop.close()


def test_a_batch_whose_caller_cancelled_it_does_not_stop_the_loop(setup):
    ours, requests, expected, _, _ = setup
    loop = EngineLoop(LLMEngine(ours, max_batch_size=4))
    cancelled = loop.submit(_keyed(requests[:2]))
    cancelled.cancel()
    later = loop.submit(_keyed(requests[2:4])).result(timeout=60)
    assert {k: r.token_ids for k, r in later.items()} == {r.request_id: expected[r.request_id] for r in requests[2:4]}
    loop.close()


def test_an_answers_error_names_the_callers_request_not_the_loops(setup):
    """The loop gives the engine ids of its own ('6#r0') and the engine its samples ('r0\\x1fsample1'):
    an error ended in a step named those."""
    ours, requests, _, _, _ = setup
    vocab = ours.config.text_config.vocab_size
    barred = replace(requests[0], sampling=SamplingParams(max_new_tokens=4, n=2, temperature=1.0, seed=3,
                                                          sequence_bias={t: float("-inf") for t in range(vocab)}))
    loop = EngineLoop(LLMEngine(ours, max_batch_size=3))
    result = loop.submit({"row": barred}).result(timeout=60)["row"]
    loop.close()
    name = repr(barred.request_id)
    assert result.error.startswith(f"NoTokenLeftError: request {name}: at new token 1 no token was left")
    assert result.samples[1].error.startswith(f"NoTokenLeftError: request {name} (sample 1): at new token 1")


def test_a_panic_while_a_request_is_added_settles_the_rest_of_its_batch(setup, monkeypatch):
    """The panic's request and those after it in its submission were never added nor settled: their
    caller waited for ever while the loop served others."""
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4)

    class PanicException(BaseException):
        pass

    check = engine.check_request

    def panicking_check(request):
        if request.request_id == requests[1].request_id:
            raise PanicException("called `Option::unwrap()` on a `None` value")
        return check(request)

    monkeypatch.setattr(engine, "check_request", panicking_check)
    loop = EngineLoop(engine)
    outcomes = loop.submit(_keyed(requests[:3])).result(timeout=30)
    assert all(isinstance(o, RuntimeError) and "PanicException" in str(o) for o in outcomes.values()), outcomes
    later = loop.submit(_keyed(requests[3:4])).result(timeout=60)
    assert {k: r.token_ids for k, r in later.items()} == {r.request_id: expected[r.request_id] for r in requests[3:4]}
    loop.close()
