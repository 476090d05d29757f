"""A question asked again (the same image's bytes, the same prompt, deterministic settings) is
answered once by the model stage: in the same batch, or from the answers of recent ones."""
import asyncio

import pyarrow as pa

from pipeline import PipelineConfig
from tests.pipeline.helpers import png


def rows_with_repeats() -> list[dict]:
    a, b, c = png(40, 30, seed=1), png(50, 20, seed=2), png(30, 30, seed=3)
    asked = [(a, "What is it?"), (a, "What is it?"), (b, None), (a, "How many shapes?"), (b, None),
             (a, "What is it?"), (c, None)]
    return [{"id": f"row-{i}", "image": image, "question": q} for i, (image, q) in enumerate(asked)]


def run_stage(stage, config: PipelineConfig, rows: list[dict]) -> dict:
    from pipeline.preprocess import Preprocess

    table = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows))))
    return {r["id"]: r for r in table.to_pylist()}


def test_repeated_questions_are_answered_once_and_as_the_reference(checkpoint, oracle):
    from pipeline.generate import Generate

    rows = rows_with_repeats()
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=8, logprobs=True)
    stage = Generate(config)
    try:
        out = run_stage(stage, config, rows)
        assert stage.shared.shared == 3                 # row-1 and row-5 ask as row-0, row-4 as row-2
        for r in rows:
            want = oracle.answer(r["image"], r["question"] or config.prompt, 8)
            assert (out[r["id"]]["answer"], out[r["id"]]["num_generated_tokens"]) == want
        assert out["row-5"]["answer_logprob"] == out["row-0"]["answer_logprob"]
        decoded = stage.engine.stats["decode_tokens"]
        again = run_stage(stage, config, rows)           # a later batch: every question answered already
        assert stage.shared.shared == 3 + len(rows) and stage.engine.stats["decode_tokens"] == decoded
        assert [again[r["id"]]["answer"] for r in rows] == [out[r["id"]]["answer"] for r in rows]
    finally:
        stage.loop.close()


def test_shared_beam_answers_count_every_returned_beams_tokens(checkpoint):
    """With --num-beams and --samples, repeated questions share their searches, and the counts the
    replica reports hold each shared row's returned beams' tokens (as the summary counts them)."""
    from collections import Counter

    from pipeline.generate import Generate

    class Recorded:
        def __init__(self):
            self.counts = Counter()

        async def report(self, counts):
            self.counts.update(counts)

    rows = rows_with_repeats()
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=6, num_beams=2, samples=2)
    stage = Generate(config)
    stage.stats = Recorded()
    try:
        out = run_stage(stage, config, rows)
    finally:
        stage.loop.close()
    repeats = ["row-1", "row-4", "row-5"]
    assert stage.stats.counts["shared_answer_rows"] == len(repeats)
    assert stage.stats.counts["shared_answer_tokens"] == sum(sum(out[i]["samples_num_generated_tokens"])
                                                             for i in repeats) > 0
    assert out["row-5"]["samples"] == out["row-0"]["samples"]


def test_sampled_answers_are_never_shared(checkpoint):
    from pipeline.generate import Generate

    rows = rows_with_repeats()
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=8, temperature=1.0, seed=3)
    stage = Generate(config)
    try:
        out = run_stage(stage, config, rows)
        assert stage.shared.shared == 0
        assert len({out[f"row-{i}"]["answer"] for i in (0, 1, 5)}) > 1      # each row its own seed
    finally:
        stage.loop.close()


def test_a_failed_first_asking_fails_only_the_rows_waiting_on_it():
    """Two calls in flight ask one question; the call that asks first fails: the other call's row
    gets that failure as its own result (an error row), its other rows their answers; nothing failed
    is remembered."""
    from model.engine import Request, SamplingParams
    from pipeline.dedup import SharedAnswers

    shared = SharedAnswers()
    same, other = [1, 2, 3], [4, 5]
    started = None

    async def failing(requests):
        started.set()
        await asyncio.sleep(0.01)
        raise RuntimeError("device lost")

    async def answering(requests):
        return {i: f"answer to {r.prompt_ids}" for i, r in requests.items()}

    async def both():
        nonlocal started
        started = asyncio.Event()
        first = asyncio.create_task(shared.answer({0: Request("a", same, sampling=SamplingParams())}, failing))
        await started.wait()
        second = await shared.answer({0: Request("b", same, sampling=SamplingParams()),
                                      1: Request("c", other, sampling=SamplingParams())}, answering)
        return first, second

    first, second = asyncio.run(both())
    assert isinstance(first.exception(), RuntimeError)
    assert isinstance(second[0], RuntimeError) and "device lost" in str(second[0])
    assert second[1] == "answer to [4, 5]" and len(shared.recent) == 1 and not shared.pending


def test_the_run_summary_counts_the_shared_answers_apart_from_the_generated_tokens(ray_cluster, checkpoint, tmp_path):
    """Through a real Ray run: the replica reports the rows that took another row's answer, and
    the summary's generated tokens are only those the model generated."""
    from pipeline import read_output, run_job
    from tests.pipeline.helpers import write_parquet

    rows = rows_with_repeats()
    write_parquet(tmp_path / "in" / "part-0.parquet", rows)
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=8, batch_size=3, replicas=1)
    summary = run_job(str(tmp_path / "in"), str(tmp_path / "out"), config)
    tokens = {r["id"]: r["num_generated_tokens"] for r in read_output(str(tmp_path / "out")).to_pylist()}
    repeats = ["row-1", "row-4", "row-5"]
    assert summary["rows_this_run"] == len(rows) and summary["shared_answer_rows"] == len(repeats)
    assert summary["shared_answer_tokens"] == sum(tokens[i] for i in repeats) > 0
    assert summary["generated_tokens_this_run"] == sum(tokens.values()) - summary["shared_answer_tokens"]
    assert summary["replicas"] == {"cpu float32": 1}     # how the one replica ran, its dtype left to its device


def test_the_runs_counter_adds_the_reports_and_a_lost_one_costs_no_batch(ray_cluster):
    from pipeline.run_stats import RunCounter, StatsReporter

    counter = RunCounter()
    reporter = StatsReporter(counter.name)
    asyncio.run(reporter.report({"shared_answer_rows": 2, "shared_answer_tokens": 0}))
    asyncio.run(reporter.report({"shared_answer_rows": 1, "shared_answer_tokens": 5}))
    assert counter.close() == {"shared_answer_rows": 3, "shared_answer_tokens": 5}
    gone = StatsReporter(counter.name + "-gone")        # no such counter: no error, the counts lost
    asyncio.run(gone.report({"shared_answer_rows": 1}))
    assert gone.lost


def test_a_waiting_call_cancelled_leaves_the_asking_call_and_other_waiters_their_answer():
    """Cancelling a call that waits on another's question cancelled the future they shared: the asking
    call then failed as it set the answer, and the other waiters were cancelled too."""
    from model.engine import Request, SamplingParams
    from pipeline.dedup import SharedAnswers

    shared, same = SharedAnswers(), [1, 2, 3]

    def ask(name):
        return {0: Request(name, same, sampling=SamplingParams())}

    async def slow(requests):
        await asyncio.sleep(0.05)
        return {i: "the answer" for i in requests}

    async def calls():
        asking = asyncio.create_task(shared.answer(ask("a"), slow))
        await asyncio.sleep(0)
        cancelled, waiting = (asyncio.create_task(shared.answer(ask(n), slow)) for n in "bc")
        await asyncio.sleep(0.01)
        cancelled.cancel()
        return await asking, await waiting, await asyncio.gather(cancelled, return_exceptions=True)

    asking, waiting, (cancelled,) = asyncio.run(calls())
    assert asking == waiting == {0: "the answer"} and isinstance(cancelled, asyncio.CancelledError)
