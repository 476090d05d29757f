"""The crash ledger and the gate, on their own: a row in flight at a process death becomes a
suspect, one that dies alone SOLO_DEATHS times is condemned; suspects run with nothing else in flight."""
import asyncio

from pipeline.ledger import SOLO_DEATHS, CrashLedger, Gate


def died_working(ledger: CrashLedger, rows: list[str], alone: bool = False, held: list = []):  # noqa: B006
    """Enter `working` and never leave it, as a process that dies there (the context is kept alive:
    closing it on garbage collection would run its exit)."""
    context = ledger.working(rows, alone)
    context.__enter__()
    held.append(context)


def test_a_death_makes_suspects_and_dying_alone_condemns(tmp_path):
    path = tmp_path / "ledger.json"
    first = CrashLedger(path)
    with first.working(["a"]):
        pass
    died_working(first, ["b", "c"])
    second = CrashLedger(path)
    assert [second.suspect(r) for r in "abc"] == [False, True, True]
    assert not second.condemned("b")
    for _ in range(SOLO_DEATHS):
        died_working(second, ["c"], alone=True)          # ... and again with c alone, each time
        second = CrashLedger(path)
    with second.working(["b"], alone=True):
        pass                             # b ran alone and came back: still a suspect, never condemned
    assert second.condemned("c") and not second.condemned("b")
    assert f"({SOLO_DEATHS} times; {SOLO_DEATHS + 1} deaths with it in flight)" in second.verdict("c")
    assert not CrashLedger(None).suspect("a")                    # outside an actor: nothing kept


def test_gate_runs_suspects_with_nothing_else_in_flight():
    gate, events = Gate(), []

    async def batch(name: str, alone: bool, hold: float):
        async with (gate.alone() if alone else gate.shared()):
            events.append(f"+{name}")
            await asyncio.sleep(hold)
            events.append(f"-{name}")

    async def main():
        first = asyncio.create_task(batch("a", False, 0.05))
        second = asyncio.create_task(batch("b", False, 0.05))
        await asyncio.sleep(0.01)
        solo = asyncio.create_task(batch("s", True, 0.05))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(batch("c", False, 0.01))     # arrives while s waits: goes after it
        await asyncio.gather(first, second, solo, late)

    asyncio.run(main())
    assert events[:2] == ["+a", "+b"] and events[4:] == ["+s", "-s", "+c", "-c"]


def test_stale_ledger_files_of_ended_jobs_are_removed(tmp_path, monkeypatch):
    """The driver removes its job's files on its own node only; each actor clears week-old ones
    where it starts, leaving live ones (a live actor rewrites its file as it works)."""
    import os
    import time

    from pipeline.ledger import ROOT_ENV, STALE_S, remove_stale_ledgers

    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    old, fresh = tmp_path / "01000000-generate-a.json", tmp_path / "02000000-generate-b.json"
    for path in (old, fresh):
        path.write_text("{}")
    past = time.time() - STALE_S - 60
    os.utime(old, (past, past))
    assert remove_stale_ledgers() == 1
    assert not old.exists() and fresh.exists()


def test_a_suspect_cancelled_as_it_waits_does_not_hold_back_the_others():
    gate = Gate()

    async def main():
        async with gate.shared():
            solo = asyncio.create_task(gate.alone().__aenter__())
            await asyncio.sleep(0.01)
            solo.cancel()
            await asyncio.gather(solo, return_exceptions=True)
        async with gate.shared():           # waited for ever on the cancelled suspect
            return "ran"

    assert asyncio.run(asyncio.wait_for(main(), timeout=5)) == "ran"
