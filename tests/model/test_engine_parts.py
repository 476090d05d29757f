"""Engine parts on their own: the sampler (filters, counter-based noise, min-new-tokens) and the
attention backends over the slot cache, against plain formulas."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from model.engine.kv_cache import (CachePlan, DecodeAttention, KVCache, PackedPrefillAttention, padded_groups,
                                   plan_cache)
from model.engine.runner import kv_bucket, pow2_bucket
from model.engine.scheduler import Scheduler, Sequence
from model.engine.types import Request, SamplingParams
from model.engine.sampler import (NON_FINITE, SamplingState, _filter_top_k_top_p, flag_non_finite, fused_greedy_tokens,
                                  outside_nucleus, sample, uniform_noise)

torch.set_num_threads(1)


def _state(n: int, vocab: int, **params) -> SamplingState:
    state = SamplingState.empty(n, vocab, "cpu")
    for row in range(n):
        p = dict(temperature=1.0, top_k=0, top_p=1.0, seed=row, min_new=0, stop_ids=[])
        p.update({k: (v[row] if isinstance(v, list) else v) for k, v in params.items()})
        state.assign(row, **p)
    return state


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.5, 0.05, 0.3, 0.15]]))
    out = _filter_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.8]))
    assert torch.isfinite(out).tolist() == [[True, False, True, False], [True, False, True, False]]
    assert torch.equal(out[0, [0, 2]], logits[0, [0, 2]])
    out = _filter_top_k_top_p(logits, torch.tensor([0, 0]), torch.tensor([0.81, 0.01]))
    assert torch.isfinite(out).tolist() == [[True, False, True, True], [True, False, False, False]]


def test_a_top_k_cap_sorts_fewer_logits_and_keeps_the_same_tokens():
    """Rows that all set top_k: only the largest max(top_k) logits are sorted (the engine passes
    the cap), and every row keeps exactly what the whole-vocabulary sort keeps."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 1000, generator=g) * 3
    top_k, top_p = torch.tensor([1, 5, 40, 40, 17, 2]), torch.tensor([1.0, 0.9, 0.5, 1.0, 0.99, 0.3])
    whole = _filter_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(_filter_top_k_top_p(logits, top_k, top_p, k_cap=40), whole)
    kept = torch.isfinite(whole)
    assert kept[0].nonzero().flatten().tolist() == [logits[0].argmax().item()]     # top_k 1: the argmax
    assert kept[3].sum() == 40 and (kept.sum(1) <= top_k).all()


def test_the_nucleus_without_a_sort_keeps_what_the_sort_keeps():
    """Rows where no sampled row sets top_k: the nucleus by bisection (outside_nucleus) keeps the
    tokens the sorted cumulative sum keeps, so the seeded draw picks the same tokens."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 3000, generator=g) * torch.tensor([0.3, 1, 2, 3, 5, 8, 2])[:, None]
    logits[6, 100:] = float("-inf")                           # a row held to 100 tokens (min_new's stop mask)
    top_p = torch.tensor([0.9, 0.5, 0.99, 1.0, 0.2, 0.95, 0.999])
    sorted_kept = torch.isfinite(_filter_top_k_top_p(logits, torch.zeros(7, dtype=torch.long), top_p))
    assert torch.equal(~outside_nucleus(logits, top_p) & torch.isfinite(logits), sorted_kept)
    assert sorted_kept[3].sum() == 3000 and sorted_kept[5].sum() < 30
    state = _state(7, 3000, temperature=[1.0] * 7, top_k=[0] * 7, top_p=top_p.tolist())
    rows = torch.arange(7)
    for step in range(3):
        state.step[:] = step
        by_sort = sample(logits, state, rows, any_sampling=True, any_filter=True)
        assert torch.equal(sample(logits, state, rows, any_sampling=True, any_filter=True, sort_free_nucleus=True), by_sort)


def test_a_nucleus_tied_at_its_edge_keeps_every_tied_token():
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    assert (~outside_nucleus(logits, torch.tensor([0.5]))).tolist() == [[True, True, True, True]]
    assert (~outside_nucleus(logits, torch.tensor([0.4]))).tolist() == [[True, False, False, False]]


def tied_logits(rows: int, vocab: int, seed: int = 5) -> torch.Tensor:
    """Logits as a bf16 LM head gives them (the GPU's): few distinct values, so many ties."""
    return (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2).bfloat16().float()


def test_ties_never_make_a_rows_kept_tokens_depend_on_its_neighbours():
    """Which candidates a row's batch makes it take (the top-k cap is the batch's largest top_k; a
    row without top_k makes every row sort the whole vocabulary, or none does and the nucleus is
    found by bisection) must not change its kept tokens: equal logits rank by token id, and every
    token tied with the nucleus's edge stays."""
    logits = tied_logits(12, 2000)
    top_k = torch.tensor([50, 50, 7, 7, 120, 1] * 2)
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.6, 0.95, 1.0] * 2)
    whole = torch.isfinite(_filter_top_k_top_p(logits, top_k, top_p))
    for cap in (120, 500):
        assert torch.equal(torch.isfinite(_filter_top_k_top_p(logits, top_k, top_p, k_cap=cap)), whole)
    assert torch.equal(whole[top_p == 1].sum(-1), top_k[top_p == 1])                # exactly k ...
    ranked = logits.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(whole[0], torch.zeros_like(whole[0]).scatter(0, ranked.indices[0, :50], True))  # ... lowest ids
    no_k = torch.zeros(12, dtype=torch.long)
    nucleus = torch.tensor([0.9, 0.5, 0.99, 0.7, 0.95, 0.3] * 2)
    by_sort = torch.isfinite(_filter_top_k_top_p(logits, no_k, nucleus))
    assert torch.equal(~outside_nucleus(logits, nucleus), by_sort)


def test_tied_rows_sample_the_same_tokens_whatever_their_batch():
    logits = (tied_logits(6, 2000, seed=6) * 2).round() / 2         # coarser still: ties at the top
    params = dict(temperature=[3.0] * 6, top_k=[2, 5, 3, 0, 0, 200], top_p=[1.0, 0.8, 1.0, 0.9, 0.5, 0.95])
    state, rows = _state(6, 2000, **params), torch.arange(6)
    with_k, without_k = rows[[0, 1, 2, 5]], rows[[3, 4]]
    for step in range(20):
        state.step[:] = step
        mixed = sample(logits, state, rows, any_sampling=True, any_filter=True)   # whole-vocabulary sort
        capped = sample(logits[with_k], state, with_k, any_sampling=True, any_filter=True, top_k_cap=200)
        bisected = sample(logits[without_k], state, without_k, any_sampling=True, any_filter=True,
                          sort_free_nucleus=True)
        assert torch.equal(capped, mixed[with_k]) and torch.equal(bisected, mixed[without_k]), step


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.filterwarnings("error:torch.compile of the")
def test_the_fused_noise_draws_the_eager_samples():
    """fuse_noise (the engine's choice with a compiled decode step): the noise, logs and argmax as
    one compiled kernel give the eager sampler's tokens, with and without filters, any batch."""
    g = torch.Generator().manual_seed(5)
    for rows in (5, 3):
        logits = torch.randn(rows, 700, generator=g) * 2
        state = _state(rows, 700, temperature=[1.0, 0.7, 1.3, 0.0, 1.0][:rows], top_k=[0, 40, 0, 0, 5][:rows],
                       top_p=[1.0, 0.9, 0.8, 1.0, 1.0][:rows])
        for any_filter, cap in ((False, None), (True, None), (True, 40)):
            state.top_k[:] = state.top_k.clamp_min(1) if cap else state.top_k
            eager = sample(logits, state, torch.arange(rows), any_sampling=True, any_filter=any_filter, top_k_cap=cap)
            fused = sample(logits, state, torch.arange(rows), any_sampling=True, any_filter=any_filter, top_k_cap=cap,
                           fuse_noise=True)
            assert torch.equal(fused, eager), (rows, any_filter, cap)
        state.top_k[:] = 0                  # no top_k: the nucleus's bisection, compiled too
        nucleus = dict(any_sampling=True, any_filter=True, sort_free_nucleus=True)
        assert torch.equal(sample(logits, state, torch.arange(rows), **nucleus, fuse_noise=True),
                           sample(logits, state, torch.arange(rows), **nucleus))


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.filterwarnings("error:torch.compile of the")
def test_the_fused_greedy_draw_gives_the_eager_tokens_and_flags():
    """An all-greedy step with a compiled decode: one compiled function for the argmax (stop ids
    masked while too early) and the non-finite flag, as sample() then flag_non_finite()."""
    g = torch.Generator().manual_seed(6)
    for rows in (6, 4):
        logits = torch.randn(rows, 500, generator=g)
        logits[:, 7] = 10.0                                       # every row's argmax, a stop id
        logits[1, 3] = float("nan")
        logits[2, 9] = float("inf")
        state = _state(rows, 500, temperature=[0.0] * rows, top_k=[0] * rows, top_p=[1.0] * rows)
        state.min_new[1:] = 2                                     # row 0 may stop, the others not yet
        for row in range(rows):
            state.stop_mask[row, 7] = True
        slots = torch.arange(rows)
        eager = flag_non_finite(sample(logits, state, slots, any_sampling=False, any_filter=False), logits)
        fused = fused_greedy_tokens(logits, state.step, state.min_new, state.stop_mask, slots)
        assert torch.equal(fused, eager) and fused[1] == fused[2] == NON_FINITE
        assert fused[0] == 7 and fused[-1] not in (7, NON_FINITE)


def test_noise_depends_only_on_seed_step_and_token():
    seeds, steps = torch.tensor([5, 9, 5]), torch.tensor([0, 0, 1])
    u = uniform_noise(seeds, steps, 1000)
    assert ((u > 0) & (u < 1)).all()
    assert torch.equal(uniform_noise(seeds[2:], steps[2:], 1000)[0], u[2])      # no neighbour effect
    assert not torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert abs(u.mean().item() - 0.5) < 0.03
    some = torch.tensor([[7, 999, 0], [3, 3, 500], [42, 1, 2]])       # the sampler's top-k candidates
    assert torch.equal(uniform_noise(seeds, steps, some), u.gather(1, some))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    n = 4000
    state = _state(n, 4)
    tokens = sample(probs.log().expand(n, 4), state, torch.arange(n), any_sampling=True, any_filter=False)
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert (freq - probs).abs().max() < 0.03, freq


def test_greedy_rows_and_min_new_tokens():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    state = _state(3, 3, temperature=[0.0, 0.0, 0.0], min_new=[0, 2, 2], stop_ids=[[1]] * 3)
    state.step[2] = 2
    tokens = sample(logits, state, torch.arange(3), any_sampling=False, any_filter=False)
    assert tokens.tolist() == [1, 2, 1]       # row 1 may not stop before 2 new tokens


def _naive_attention(q, k, v, visible):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])


def test_decode_attention_reads_each_slot_up_to_its_length():
    torch.manual_seed(0)
    cache = KVCache(num_layers=2, num_slots=4, num_kv_heads=2, max_len=16, head_dim=8, dtype=torch.float32,
                    device="cpu")
    cache.k.normal_()
    cache.v.normal_()
    positions = torch.tensor([3, 0, 9, 15])
    q, k, v = torch.randn(4, 4, 1, 8), torch.randn(4, 2, 1, 8), torch.randn(4, 2, 1, 8)
    out = DecodeAttention(cache.k, cache.v, positions, kv_len=16)(1, q, k, v)
    assert torch.equal(cache.k[1, torch.arange(4), :, positions], k[:, :, 0])
    visible = torch.arange(16)[None] <= positions[:, None]
    expected = _naive_attention(q, cache.k[1, :, :, :16], cache.v[1, :, :, :16], visible)   # past 16: the spare position
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batched", [False, True], ids=["per-prompt", "padded-groups"])
def test_packed_prefill_equals_separate_causal_attention(batched):
    torch.manual_seed(1)
    lengths, slots = [3, 5, 1, 12, 2, 7], [2, 0, 5, 3, 6, 1]
    cache = KVCache(2, 8, 2, 16, 4, torch.float32, "cpu")
    total = sum(lengths)
    q, k, v = torch.randn(1, 4, total, 4), torch.randn(1, 2, total, 4), torch.randn(1, 2, total, 4)
    attention = PackedPrefillAttention(cache, slots, lengths, batched=batched)
    assert batched == (len(attention.batches) < len(lengths))         # one call per group, or per prompt
    out = attention(1, q, k, v)
    start = 0
    for n, slot in zip(lengths, slots):
        seg = slice(start, start + n)
        ref = F.scaled_dot_product_attention(q[:, :, seg], k[:, :, seg].repeat_interleave(2, 1),
                                             v[:, :, seg].repeat_interleave(2, 1), is_causal=True)
        torch.testing.assert_close(out[:, :, seg], ref)
        assert torch.equal(cache.k[1, slot, :, :n], k[0, :, seg])
        assert torch.equal(cache.v[1, slot, :, :n], v[0, :, seg])
        start += n
    assert (cache.k[1, [4, 7]] == 0).all() and (cache.k[0] == 0).all()   # untouched slots and layer


@pytest.mark.parametrize("batched", [False, True], ids=["per-prompt", "padded-groups"])
def test_prompts_continuing_a_cached_prefix_attend_over_their_slots_rows(batched):
    """Segments 1 and 3 hold only the ends of their prompts: their first 2 and 12 positions are
    already in their slots (copied from another slot); the others are whole prompts. Padded
    together, 2 + 8 and 12 + 2 keys: a pad query must not widen the keys past the cache's 16."""
    torch.manual_seed(2)
    lengths, prefixes, slots = [4, 8, 5, 2, 6], [0, 2, 0, 12, 0], [3, 1, 0, 6, 2]
    cache = KVCache(2, 8, 2, 16, 4, torch.float32, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    cached_k, cached_v = cache.k.clone(), cache.v.clone()
    cache.copy_prefix(1, 5, 6)
    assert torch.equal(cache.k[:, 5, :, :6], cached_k[:, 1, :, :6]) and torch.equal(cache.k[:, 5, :, 6:], cached_k[:, 5, :, 6:])
    cache.k[:, 5], cache.v[:, 5] = cached_k[:, 5], cached_v[:, 5]
    total = sum(lengths)
    q, k, v = torch.randn(1, 4, total, 4), torch.randn(1, 2, total, 4), torch.randn(1, 2, total, 4)
    out = PackedPrefillAttention(cache, slots, lengths, batched=batched, prefixes=prefixes)(1, q, k, v)
    start = 0
    for n, p, slot in zip(lengths, prefixes, slots):
        seg = slice(start, start + n)
        keys = torch.cat([cached_k[1, slot, :, :p], k[0, :, seg]], dim=1)[None]     # prefix rows, then its own
        values = torch.cat([cached_v[1, slot, :, :p], v[0, :, seg]], dim=1)[None]
        visible = torch.arange(p + n)[None, :] <= p + torch.arange(n)[:, None]
        ref = F.scaled_dot_product_attention(q[:, :, seg], keys.repeat_interleave(2, 1),
                                             values.repeat_interleave(2, 1), attn_mask=visible)
        torch.testing.assert_close(out[:, :, seg], ref)
        assert torch.equal(cache.k[1, slot, :, :p], cached_k[1, slot, :, :p])        # the prefix stays
        assert torch.equal(cache.k[1, slot, :, p:p + n], k[0, :, seg])
        start += n


def test_padded_groups_hold_each_prompt_once_within_the_waste_bound():
    lengths = [40, 3, 17, 17, 90, 1, 60, 8, 33]
    groups = padded_groups(lengths, waste=2.0)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 2.0 * sum(lengths[i] for i in g)
    assert len(groups) < len(lengths)
    assert padded_groups([5, 5, 5, 5]) == [[0, 1, 2, 3]]


def test_buckets():
    assert [pow2_bucket(n, 1, 256) for n in (1, 3, 8, 200, 300)] == [1, 4, 8, 256, 256]
    assert [kv_bucket(n, 4096) for n in (1, 65, 512, 513, 1100, 5000)] == [64, 128, 512, 1024, 1536, 4096]


def test_while_sequences_run_waiting_ones_are_admitted_in_groups():
    def seq(i: int) -> Sequence:
        return Sequence(Request(f"r{i}", [1, 2, 3], sampling=SamplingParams(max_new_tokens=4)), frozenset())

    scheduler = Scheduler(num_slots=8, max_prefill_tokens=100)
    for i in range(11):
        scheduler.add(seq(i))
    assert scheduler.can_admit() and len(scheduler.admit()) == 8       # nothing runs: admit what fits
    assert not scheduler.can_admit() and scheduler.admit_group == 2
    scheduler.release(scheduler.running[5])
    assert not scheduler.can_admit() and scheduler.can_admit(finishing=1)   # one free slot, three waiting
    scheduler.release(scheduler.running[2])
    assert scheduler.can_admit() and [s.slot for s in scheduler.admit()] == [2, 5]
    scheduler.release(scheduler.running[0])
    assert scheduler.can_admit()                                        # the last one waiting: no group to wait for


def test_rows_with_a_nan_or_an_infinity_are_flagged():
    logits = torch.randn(5, 1000)
    logits[1, 7], logits[2, 0], logits[3, 999] = float("nan"), float("inf"), float("-inf")
    tokens = torch.arange(5)
    assert flag_non_finite(tokens, logits).tolist() == [0, NON_FINITE, NON_FINITE, NON_FINITE, 4]
    big = torch.full((2, 1000), 60000.0, dtype=torch.float16)     # its sum overflows float16, not float32
    assert flag_non_finite(torch.arange(2), big).tolist() == [0, 1]


def test_the_cache_plan():
    room = lambda budget: lambda length: budget // length            # noqa: E731
    assert plan_cache(300, 0, 4096, 64, room(10_000)) == CachePlan(512, 19, 19)       # 256-multiples ...
    assert plan_cache(300, 0, 4096, 8, room(300)) == CachePlan(300, 1, 1)       # ... where one fits (300 was refused)
    assert plan_cache(4097, 0, 4100, 64, room(10**6)) == CachePlan(4100, 64, 64)      # at most the cap
    # a cache that grew doubles, where that costs no slot ...
    assert plan_cache(600, 512, 8192, 4, room(10**6)) == CachePlan(1024, 4, 4)
    # ... and keeps what it needs where it would
    assert plan_cache(600, 512, 8192, 64, room(10_000)) == CachePlan(768, 13, 13)
    assert plan_cache(600, 512, 900, 4, room(10**6)) == CachePlan(900, 4, 4)          # doubling stops at the cap
    # a compiled step's spare row, where there is room for it
    assert plan_cache(100, 0, 4096, 1, room(10_000), min_rows=2) == CachePlan(256, 1, 2)
    assert plan_cache(100, 0, 4096, 1, room(300), min_rows=2) == CachePlan(256, 1, 1)
    assert plan_cache(100, 0, 4096, 8, room(99)).slots == 0                           # no room: the caller says so
