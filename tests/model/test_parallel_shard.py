"""Sharding and sharded loading, in one process (no collectives needed to build and load a rank):
clear errors before any read, slice-only reads, shards that reassemble the checkpoint, ~1/tp per rank."""
from __future__ import annotations

import multiprocessing

import pytest
import torch
from safetensors import safe_open

import model.parallel.loading as parallel_loading
import tests.model.parallel_cases  # noqa: F401  (registers the "tp_mqa" fixture config)
from model import Idefics3Config, Idefics3ForConditionalGeneration
from model.files import open_safetensors, weight_files
from model.lm_head import padded_rows
from model.loading import target_name
from model.parallel import TPContext, TPEngine, check_tp, load_shard, sharded_fraction
from model.parallel.shard import kv_head_range, shard_specs

torch.set_num_threads(1)


class RecordingReader:
    """Wraps the loader's open_safetensors and records every read: (key, 'tensor' | 'slice', shape read)."""

    def __init__(self, log: list):
        self.log = log

    def __call__(self, file):
        return _Handle(open_safetensors(file), self.log)


class _Handle:
    def __init__(self, handle, log):
        self.handle, self.log = handle, log

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key):
        t = self.handle.get_tensor(key)
        self.log.append((key, "tensor", tuple(t.shape)))
        return t

    def get_slice(self, key):
        return _Slice(self.handle.get_slice(key), key, self.log)


class _Slice:
    def __init__(self, part, key, log):
        self.part, self.key, self.log = part, key, log

    def get_shape(self):
        return self.part.get_shape()

    def __getitem__(self, index):
        t = self.part[index]
        self.log.append((self.key, "slice", tuple(t.shape)))
        return t


@pytest.fixture
def reads(monkeypatch):
    log: list = []
    monkeypatch.setattr(parallel_loading, "open_safetensors", RecordingReader(log))
    return log


def full_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            out.update({target_name(k, False): f.get_tensor(k) for k in f.keys()})
    return out


def test_indivisible_heads_fail_before_anything_loads(checkpoint, reads):
    path = checkpoint("smolvlm")          # 3 query heads, 1 KV head
    with pytest.raises(ValueError, match=r"text_config.num_attention_heads \(3\) is not divisible by "
                                         r"tensor_parallel_size 2"):
        load_shard(path, TPContext(0, 2))
    assert reads == []
    with pytest.raises(ValueError, match="num_attention_heads"):
        TPEngine(path, 2)
    assert multiprocessing.active_children() == []      # no rank was started either


def test_check_tp_names_every_problem(checkpoint):
    config = Idefics3Config.from_pretrained(checkpoint("idefics3"))   # text 4/2 heads, vision 4 heads
    check_tp(config, 4)
    with pytest.raises(ValueError) as info:
        check_tp(config, 3)
    message = str(info.value)
    for part in ["text_config.num_attention_heads (4)", "text_config.intermediate_size (128)",
                 "vision_config.num_attention_heads (4)", "num_key_value_heads (2)"]:
        assert part in message
    assert "vision_config.intermediate_size" not in message      # 48 splits in 3
    with pytest.raises(ValueError, match="must be >= 1"):
        check_tp(config, 0)


@pytest.mark.parametrize("heads,kv,tp", [(4, 2, 4), (6, 1, 2), (6, 1, 3), (8, 2, 8), (8, 8, 2), (32, 8, 4)])
def test_each_rank_gets_the_kv_head_its_query_heads_use(heads, kv, tp):
    groups, local = heads // kv, heads // tp
    for rank in range(tp):
        first, last = kv_head_range(kv, TPContext(rank, tp))
        used = sorted({h // groups for h in range(rank * local, (rank + 1) * local)})
        assert used == list(range(first, last))


@pytest.mark.parametrize("name,tp,shard_size", [("idefics3", 2, "40KB"), ("idefics3", 4, None), ("tp_mqa", 3, None)])
def test_ranks_read_only_their_slices_and_reassemble_the_checkpoint(checkpoint, reads, name, tp, shard_size):
    kwargs = {"shard_size": shard_size} if shard_size else {}
    path = checkpoint(name, **kwargs)
    full = full_tensors(path)
    shards = []
    for rank in range(tp):
        reads.clear()
        shard = load_shard(path, TPContext(rank, tp))
        specs = shard_specs(shard)
        assert {target_name(k, False) for k, _, _ in reads} >= set(specs) & set(full)
        for key, how, shape in reads:
            spec = specs.get(target_name(key, False))
            if spec is None:
                continue
            assert how == "slice", f"{key} read whole on rank {rank}"
            assert shape[spec.dim] == spec.stop - spec.start
            replicated_kv = key.endswith(("k_proj.weight", "v_proj.weight")) and "text_model" in key and \
                full[target_name(key, False)].shape[0] == shape[0]
            assert shape[spec.dim] < spec.full or replicated_kv, f"{key}: rank {rank} read all of it"
        shards.append((shard, specs))
    state = {n: p for n, p in shards[0][0].named_parameters()}
    for name_, tensor in full.items():
        if name_ not in shards[0][1]:
            torch.testing.assert_close(state[name_], tensor, rtol=0, atol=0)   # replicated, whole
            continue
        spec = shards[0][1][name_]
        parts = []
        for shard, specs in shards:
            s = specs[name_]
            parts.append((s.start, dict(shard.named_parameters())[name_].narrow(s.dim, 0, s.stop - s.start)))
        # distinct slices in rank order (replicated KV heads appear on several ranks) rebuild the tensor
        distinct = dict(sorted(parts, key=lambda p: p[0]))
        rebuilt = torch.cat(list(distinct.values()), dim=spec.dim)
        torch.testing.assert_close(rebuilt, tensor, rtol=0, atol=0)


@pytest.mark.parametrize("name,tp,bound", [("idefics3", 2, 1.0), ("idefics3", 4, 1.06), ("tp_mqa", 3, 1.06)])
def test_each_rank_holds_about_one_tp_th_of_the_sharded_parameters(checkpoint, name, tp, bound):
    path = checkpoint(name)
    whole, whole_total = sharded_fraction(load_shard(path, TPContext(0, 1)))
    for rank in range(tp):
        shard = load_shard(path, TPContext(rank, tp))
        sharded, total = sharded_fraction(shard)
        vocab = shard.config.text_config.vocab_size
        equal_part = -(-vocab // tp)
        tables = {id(m.weight): m.weight for m in (shard.lm_head, shard.model.text_model.embed_tokens)}
        assert all(w.shape[0] == padded_rows(equal_part) and w.shape[0] % 64 == 0 for w in tables.values())
        alignment = sum((w.shape[0] - equal_part) * w.shape[1] for w in tables.values())
        ratio = (sharded - alignment) / (whole / tp)
        # exact for a clean split; replicated KV heads (tp > kv heads) and an uneven vocab split add a little
        assert 1.0 <= ratio <= bound, (rank, ratio)
        assert total - sharded == whole_total - whole   # norms, patch/position embeddings, connector: whole


def test_tp1_shard_is_the_plain_model(checkpoint):
    path = checkpoint("idefics3")
    plain = Idefics3ForConditionalGeneration.from_pretrained(path)
    shard = load_shard(path, TPContext(0, 1))
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    torch.testing.assert_close(shard(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)


def test_a_tied_checkpoint_storing_a_different_head_keeps_both_on_every_rank(checkpoint, tmp_path):
    """As the plain loader (tests/model/test_loading.py): a rank tied both names to one tensor, and
    the key read last overwrote the other (answers made with the embeddings as the LM head)."""
    from tests.model.test_loading import copy_checkpoint, edit_weights

    folder = copy_checkpoint(checkpoint("tp_mqa"), tmp_path / "ck")
    embed = full_tensors(folder)["model.text_model.embed_tokens.weight"]
    head = torch.randn(embed.shape, generator=torch.Generator().manual_seed(1)) * 0.02
    edit_weights(folder, lambda s: s.update({"lm_head.weight": head}))
    for rank in range(2):
        shard = load_shard(folder, TPContext(rank, 2))
        spec = shard_specs(shard)["lm_head.weight"]
        rows = slice(spec.start, spec.stop)
        assert torch.equal(shard.lm_head.weight[:spec.stop - spec.start], head[rows])
        assert torch.equal(shard.model.text_model.embed_tokens.weight[:spec.stop - spec.start], embed[rows])
    tied = load_shard(checkpoint("tp_mqa"), TPContext(1, 2))
    assert tied.lm_head.weight is tied.model.text_model.embed_tokens.weight     # a plain tied one stays tied
