"""generate(): greedy tokens identical to transformers' generate (fp32, CPU) on mixed batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.checkpoints import build_checkpoint

torch.set_num_threads(1)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _prompt(processor, question: str, n_images: int) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def mixed_batch(path, counts=(2, 0, 1)):
    """Processor outputs for prompts with `counts` images each, different lengths, left padded."""
    from transformers import Idefics3Processor

    processor = Idefics3Processor.from_pretrained(path)
    questions = ["What is in the image?", "Hello, world! Colours: red, green, blue, yellow.",
                 "Describe this picture in one sentence.", "How many shapes?"]
    sizes = [(40, 30), (20, 50), (33, 33), (64, 20)]
    texts, images = [], []
    for i, n in enumerate(counts):
        texts.append(_prompt(processor, questions[i % len(questions)], n))
        images.append([_image(10 * i + j, sizes[(i + j) % len(sizes)]) for j in range(n)])
    if not any(images):
        return processor(text=texts, padding=True, return_tensors="pt")
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


@pytest.fixture(scope="module", params=["smolvlm", "idefics3", "odd"])
def pair(request, tmp_path_factory):
    """(our model, the reference model) on the same checkpoint."""
    from transformers import Idefics3ForConditionalGeneration as Reference

    from model import Idefics3ForConditionalGeneration

    path = build_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    ours = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    ref = Reference.from_pretrained(path, dtype=torch.float32).eval()
    return path, ours, ref


def test_greedy_matches_reference_on_mixed_batch(pair):
    path, ours, ref = pair
    inputs = mixed_batch(path)
    assert (inputs["attention_mask"] == 0).any(), "the batch should be left padded"
    kwargs = dict(max_new_tokens=12, do_sample=False)
    expected = ref.generate(**inputs, **kwargs)
    got = ours.generate(**inputs, **kwargs)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)


def test_min_new_tokens_and_eos_padding(pair):
    path, ours, ref = pair
    inputs = mixed_batch(path, counts=(1, 0))
    # Make every row stop early: the eos set includes each row's greedy first token.
    first = ref.generate(**inputs, max_new_tokens=1)[:, -1].tolist()
    kwargs = dict(max_new_tokens=6, eos_token_id=first, do_sample=False)
    expected = ref.generate(**inputs, **kwargs)
    got = ours.generate(**inputs, **kwargs)
    assert torch.equal(got, expected)
    kwargs["min_new_tokens"] = 3
    assert torch.equal(ours.generate(**inputs, **kwargs), ref.generate(**inputs, **kwargs))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeated_ngrams_match_reference(pair, n):
    """Banned n-grams counted over each row's whole ids, its left padding included, as the reference."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    kwargs = dict(max_new_tokens=12, do_sample=False, no_repeat_ngram_size=n)
    expected = ref.generate(**inputs, **kwargs)
    assert not torch.equal(expected, ref.generate(**inputs, max_new_tokens=12, do_sample=False))
    assert torch.equal(ours.generate(**inputs, **kwargs), expected)


@pytest.mark.parametrize("penalty", [1.7, 0.5])
def test_repetition_penalty_matches_reference(pair, penalty):
    """The prompt's tokens (not its left padding) and the answer's so far are penalised."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    kwargs = dict(max_new_tokens=12, do_sample=False, repetition_penalty=penalty)
    expected = ref.generate(**inputs, **kwargs)
    if penalty > 1:     # random weights repeat a token for ever: a penalty breaks that
        assert not torch.equal(expected, ref.generate(**inputs, max_new_tokens=12, do_sample=False))
    assert torch.equal(ours.generate(**inputs, **kwargs), expected)


def right_padded(inputs: dict) -> dict:
    """The batch with each row's padding moved to its end."""
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    for row in range(ids.shape[0]):
        pads = int((mask[row] == 0).sum())
        ids[row], mask[row] = ids[row].roll(-pads), mask[row].roll(-pads)
    return dict(inputs, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("penalty", [1.7, 0.5])
def test_right_padding_is_penalised_as_the_reference(pair, penalty):
    """The reference's penalty skips a row's ids before its first attended one: right padding counts."""
    path, ours, ref = pair
    inputs = right_padded(mixed_batch(path))
    kwargs = dict(max_new_tokens=6, do_sample=False, repetition_penalty=penalty)
    expected = ref.generate(**inputs, **kwargs)
    assert torch.equal(ours.generate(**inputs, **kwargs), expected)
    assert torch.equal(ours.generate(**inputs, **kwargs, num_beams=2), ref.generate(**inputs, **kwargs, num_beams=2))


def test_without_an_attention_mask_the_pad_ids_are_the_padding_as_the_reference(pair):
    """The reference's guess: where the pad id is set, in the prompt and not an eos id, its places are padding."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    padded = int((inputs["attention_mask"][:, 0] == 0).nonzero()[0, 0])
    pad = int(inputs["input_ids"][padded, 0])
    unmasked = {k: v for k, v in inputs.items() if k != "attention_mask"}
    for setting in (dict(pad_token_id=pad), dict(pad_token_id=pad, eos_token_id=[pad]), dict()):
        kwargs = dict(max_new_tokens=6, do_sample=False, **setting)
        expected = ref.generate(**unmasked, **kwargs)
        assert torch.equal(ours.generate(**unmasked, **kwargs), expected), setting
    assert torch.equal(ours.generate(**unmasked, max_new_tokens=6, pad_token_id=pad),
                       ref.generate(**inputs, max_new_tokens=6, pad_token_id=pad))       # the mask was guessed


def test_the_prompt_ids_may_come_first_as_the_references(pair):
    path, ours, ref = pair
    inputs = mixed_batch(path, counts=(0, 0))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=4), expected)
    with pytest.raises(ValueError, match="once"):
        ours.generate(ids, input_ids=ids, max_new_tokens=4)
    with pytest.raises(ValueError, match="not inputs_embeds"):
        ours.generate(inputs_embeds=ours.get_input_embeddings()(ids), max_new_tokens=4)


def test_text_only_batch(pair):
    path, ours, ref = pair
    inputs = mixed_batch(path, counts=(0, 0, 0))
    expected = ref.generate(**inputs, max_new_tokens=8)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=8), expected)


def test_sampling_is_seeded_and_valid(pair):
    path, ours, _ = pair
    inputs = mixed_batch(path, counts=(1, 0))
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    a = ours.generate(**inputs, **kwargs)
    torch.manual_seed(3)
    b = ours.generate(**inputs, **kwargs)
    assert torch.equal(a, b)
    assert a.shape[0] == 2 and (a[:, inputs["input_ids"].shape[1]:] < ours.config.text_config.vocab_size).all()


def test_several_answers_a_prompt_come_as_the_references(pair):
    """num_return_sequences: k rows a prompt, in the reference's order (its rows repeated in place);
    top_k=1 makes the samples the greedy answer, so they are the reference's tokens exactly."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=3)
    expected = ref.generate(**inputs, **kwargs)
    assert expected.shape[0] == 3 * inputs["input_ids"].shape[0]
    assert torch.equal(ours.generate(**inputs, **kwargs), expected)
    torch.manual_seed(0)
    hot = ours.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=2.0, num_return_sequences=4)
    assert hot.shape[0] == 4 * inputs["input_ids"].shape[0]
    assert torch.equal(hot[:, :inputs["input_ids"].shape[1]], inputs["input_ids"].repeat_interleave(4, 0))
    with pytest.raises(ValueError, match="num_return_sequences") as ours_error:
        ours.generate(**inputs, max_new_tokens=2, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences"):       # the reference refuses it too
        ref.generate(**inputs, max_new_tokens=2, do_sample=False, num_return_sequences=2)
    assert "do_sample" in str(ours_error.value)


@pytest.mark.parametrize("setting", [dict(num_beam_groups=3), dict(diversity_penalty=0.5), dict(top_h=0.4),
                                     dict(output_hidden_states=True, return_dict_in_generate=True),
                                     dict(exponential_decay_length_penalty=(2, 1.5))])
def test_settings_it_does_not_follow_are_refused_by_name(pair, setting):
    """Group beam search and the other settings it does not implement would change the answers:
    refused, not run greedily; their neutral values, and settings that change nothing, are accepted."""
    path, ours, ref = pair
    inputs = mixed_batch(path, counts=(1, 0))
    with pytest.raises(ValueError, match=f"does not implement {next(iter(setting))}="):
        ours.generate(**inputs, max_new_tokens=3, **setting)
    neutral = dict(num_beams=1, use_cache=True, return_dict_in_generate=False, no_repeat_ngram_size=0,
                   length_penalty=1.0, stop_strings=None, bos_token_id=1, num_beam_groups=1)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=3, **neutral), ref.generate(**inputs, max_new_tokens=3))


@pytest.mark.parametrize("whose", ["reference's", "ours"])
def test_stop_strings_end_rows_as_the_reference(pair, whose):
    """stop_strings (with the reference's tokenizer or ours): a row ends with the token completing
    one, then is padded; the reference's tokens; in beam searches, a candidate completing one ends."""
    from transformers import AutoTokenizer

    from processing import Idefics3Processor

    path, ours, ref = pair
    inputs = mixed_batch(path)
    reference_tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer = reference_tokenizer if whose == "reference's" else Idefics3Processor.from_pretrained(path).tokenizer
    start = inputs["input_ids"].shape[1]
    greedy = ref.generate(**inputs, max_new_tokens=12, do_sample=False)
    texts = reference_tokenizer.batch_decode(greedy[:, start:])
    stops = [texts[0][4:6] or "x", texts[2][6:9] or "y"]
    kwargs = dict(max_new_tokens=12, do_sample=False, stop_strings=stops, min_new_tokens=2)
    expected = ref.generate(**inputs, tokenizer=reference_tokenizer, **kwargs)
    assert torch.equal(ours.generate(**inputs, tokenizer=tokenizer, **kwargs), expected)
    assert not torch.equal(expected, greedy[:, :expected.shape[1]]) or expected.shape[1] < greedy.shape[1]
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        ours.generate(**inputs, **kwargs)
    for beams in (dict(num_beams=2), dict(num_beams=3, num_return_sequences=3, length_penalty=-1.0)):
        expected = ref.generate(**inputs, tokenizer=reference_tokenizer, **kwargs, **beams)
        assert torch.equal(ours.generate(**inputs, tokenizer=tokenizer, **kwargs, **beams), expected), beams


def _likely_eos(ref, inputs, count: int, seed: int) -> list[int]:
    """Tokens the greedy answers (count 0) or the beams take (some, or all for count < 0): as eos
    ids, beams end at different steps, and searches stop early."""
    greedy = ref.generate(**inputs, max_new_tokens=12, do_sample=False)[:, -12:].flatten()
    if not count:
        return greedy.unique().tolist()
    beams = ref.generate(**inputs, max_new_tokens=12, do_sample=False, num_beams=4, num_return_sequences=4,
                         eos_token_id=[])[:, -10:].flatten()
    if count < 0:
        return beams.unique().tolist()
    return beams[torch.randperm(beams.numel(), generator=torch.Generator().manual_seed(seed))[:count]].unique().tolist()


BEAM_SETTINGS = [dict(num_beams=3), dict(num_beams=4, num_return_sequences=3),
                 dict(num_beams=2, length_penalty=-0.5, early_stopping=True),
                 dict(num_beams=3, early_stopping="never", length_penalty=2.0),
                 dict(num_beams=3, repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=2)]


@pytest.mark.parametrize("setting", BEAM_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_beam_search_matches_reference(pair, setting):
    """Beam search's hypotheses, their order and the step each search stops at are the reference's,
    on a left-padded batch of mixed prompts, with eos ids the beams meet (searches end early, at
    different steps)."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    stopped = 0
    for seed, count in ((0, 0), (4, 3), (5, -1)):
        eos = _likely_eos(ref, inputs, count, seed)
        kwargs = dict(max_new_tokens=14, do_sample=False, eos_token_id=eos, pad_token_id=0, **setting)
        expected = ref.generate(**inputs, **kwargs)
        assert torch.equal(ours.generate(**inputs, **kwargs), expected), kwargs
        kwargs["num_return_sequences"] = setting["num_beams"]       # every hypothesis kept, in order
        expected = ref.generate(**inputs, **kwargs)
        assert torch.equal(ours.generate(**inputs, **kwargs), expected), kwargs
        stopped += int(torch.isin(expected[:, inputs["input_ids"].shape[1]:], torch.tensor(eos)).any(-1).sum())
    # the random smolvlm model loops on one token at almost no cost: only a negative length penalty
    # lets a hypothesis that ends beat the loops there
    assert stopped or ("smolvlm" in str(path) and setting.get("length_penalty", 1.0) > 0), "no hypothesis ended"


def test_beam_search_asked_by_the_checkpoint_is_followed(pair, monkeypatch):
    path, ours, ref = pair
    inputs = mixed_batch(path, counts=(1, 0))
    monkeypatch.setattr(ours, "generation_config", {**(ours.generation_config or {}), "num_beams": 4})
    assert torch.equal(ours.generate(**inputs, max_new_tokens=5), ref.generate(**inputs, max_new_tokens=5, num_beams=4))
    assert torch.equal(ours.generate(**inputs, max_new_tokens=3, num_beams=1), ref.generate(**inputs, max_new_tokens=3))


def test_beam_settings_it_cannot_follow_are_refused(pair):
    path, ours, _ = pair
    inputs = mixed_batch(path, counts=(1, 0))
    with pytest.raises(ValueError, match="beam sampling"):
        ours.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="num_return_sequences=3 > num_beams=2"):
        ours.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping"):
        ours.generate(**inputs, max_new_tokens=3, num_beams=2, early_stopping="sometimes")


def test_bad_input_names_the_cause(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="input_ids"):
        ours.generate(input_ids=torch.tensor([1, 2, 3]), max_new_tokens=2)
