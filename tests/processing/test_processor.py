"""Idefics3Processor against transformers' Idefics3Processor (Pillow image processor) on fixture folders."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from processing.processor import Idefics3Processor, expand_image
from processing.tokenizer import Tokenizer
from tests.fixtures.checkpoints import build_tokenizer, write_processor_files

transformers = pytest.importorskip("transformers")


def _ours(folder):
    return Idefics3Processor.from_pretrained(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("smolvlm_proc")
    build_tokenizer(path)
    write_processor_files(path, "smolvlm")
    return path


@pytest.fixture(scope="module")
def pair(folder):
    return transformers.AutoProcessor.from_pretrained(folder), _ours(folder)


def _img(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def assert_same(ref_out, our_out, atol=1e-6):
    assert set(ref_out.keys()) == set(our_out.keys())
    for key in ref_out:
        a, b = ref_out[key], our_out[key]
        if key == "pixel_values":
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=atol, rtol=0)
        elif isinstance(a, list):
            assert a == b, key
        else:
            assert type(a) is type(b), key
            assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape), key
            assert np.array_equal(np.asarray(a), np.asarray(b)), key


@pytest.mark.parametrize("texts,n_images", [
    (["A photo"], 0),
    (["<image>What is it?"], 1),
    (["Compare <image> with<image>, please."], 2),
    (["<image><image>two", "none", "<image>one"], 3),
    (["<image>x", "<image>y"], 2),
])
@pytest.mark.parametrize("return_tensors", ["pt", "np", None])
def test_prompts_with_0_1_2_images_match_reference(pair, texts, n_images, return_tensors):
    ref, ours = pair
    images = [_img(40 + 11 * i, 70 - 13 * i, seed=i) for i in range(n_images)] or None
    kwargs = dict(padding=True, return_tensors=return_tensors)
    assert_same(ref(text=texts, images=images, **kwargs), ours(text=texts, images=images, **kwargs))


def test_batch_with_different_image_counts_pads_frames_and_left_pads_ids(pair):
    ref, ours = pair
    texts, images = ["<image><image>two", "none", "<image>one"], [_img(60, 40), _img(32, 32, 1), _img(20, 90, 2)]
    out = ours(text=texts, images=images, padding=True, return_tensors="pt")
    assert_same(ref(text=texts, images=images, padding=True, return_tensors="pt"), out)
    assert out["pixel_values"].shape[:2] == (3, 2 * 5)  # 60x40 and 20x90 split into 2x2 tiles + global
    assert out["pixel_attention_mask"][1].sum() == 0  # the text-only sample has padding frames only
    pad = ours.tokenizer.pad_token_id
    assert out["input_ids"][1, 0] == pad and out["attention_mask"][1, 0] == 0  # left padding (fixture config)


def test_nested_images_and_right_padding_override(pair):
    ref, ours = pair
    texts, images = ["<image>a", "b <image> c <image>"], [[_img(50, 30)], [_img(30, 50, 1), _img(33, 33, 2)]]
    kwargs = dict(padding="longest", padding_side="right", return_tensors="pt")
    out = ours(text=texts, images=images, **kwargs)
    assert_same(ref(text=texts, images=images, **kwargs), out)
    assert out["attention_mask"][0, -1] == 0


@pytest.mark.parametrize("image_kwargs", [
    dict(do_image_splitting=False),
    dict(size={"longest_edge": 96}, max_image_size={"longest_edge": 32}),
    dict(size={"longest_edge": 48}),
])
def test_image_kwargs_are_routed_to_the_image_processor(pair, image_kwargs):
    ref, ours = pair
    texts, images = ["<image>Describe.", "<image><image>"], [_img(90, 50), _img(31, 64, 1), _img(10, 10, 2)]
    kwargs = dict(padding=True, return_tensors="pt", **image_kwargs)
    assert_same(ref(text=texts, images=images, **kwargs), ours(text=texts, images=images, **kwargs))


def test_images_only_and_text_only(pair):
    ref, ours = pair
    images = [_img(40, 40), _img(64, 20, 1)]
    assert_same(ref(images=images, return_tensors="pt"), ours(images=images, return_tensors="pt"))
    assert_same(ref(text="just words\n\nhere"), ours(text="just words\n\nhere"))


def test_max_length_padding_and_truncation_after_the_images(pair):
    ref, ours = pair
    texts = ["<image>" + "a long tail of words that will be cut " * 3, "<image>short"]
    images = [_img(30, 30), _img(30, 30, 1)]
    kwargs = dict(padding="max_length", truncation=True, max_length=40, return_tensors="pt",
                  do_image_splitting=False)
    out = ours(text=texts, images=images, **kwargs)
    assert_same(ref(text=texts, images=images, **kwargs), out)
    assert out["input_ids"].shape == (2, 40)


def test_truncation_through_an_image_block_raises(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="cut through an image block"):
        ours(text=["hello <image> world"], images=[_img(60, 40)], truncation=True, max_length=12)
    with pytest.raises(ValueError, match="cut through an image block"):  # only the closing FAKE is lost
        ours(text=["<image>"], images=[_img(30, 30)], truncation=True, max_length=7, do_image_splitting=False)


def test_call_time_image_seq_len_is_ignored_like_the_reference(pair):
    ref, ours = pair
    kwargs = dict(text="<image>hi", images=_img(30, 30), image_seq_len=9, do_image_splitting=False)
    out = ours(**kwargs)
    assert_same(ref(**kwargs), out)
    assert out["input_ids"][0].count(ours.image_token_id) == ours.image_seq_len == 4


VALIDATION = [
    (dict(), "You need to provide at least one input to call Idefics3Processor"),
    (dict(text="a <image> b <image>"), "Found 2 <image> tokens in the text but no images were passed."),
    (dict(text=["<image>", "<image>"], images=[1]),
     "The total number of <image> tokens in the prompts should be the same as the number of images passed. "
     "Found total 2 <image> tokens and 1 images."),
    (dict(text="no placeholder", images=[1]),
     "The total number of <image> tokens in the prompts should be the same as the number of images passed. "
     "Found total 0 <image> tokens and 1 images."),
    (dict(text=["<image>", "none"], images=[[], [1]]),
     "The number of <image> tokens in each prompt should be the same as the number of images passed. "
     "Found [1, 0] <image> tokens and [0, 1] images per sample."),
    (dict(text=["ok", 3]), "`text` must be a string or list of strings."),
]


@pytest.mark.parametrize("kwargs,message", VALIDATION)
def test_validation_errors_have_the_reference_messages(pair, kwargs, message):
    ref, ours = pair
    real = {k: ([[_img(30, 30)] if g == [1] else [] for g in v] if k == "images" and isinstance(v[0], list)
                 else [_img(30, 30) for _ in v] if k == "images" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError) as ref_err:
        ref(**real)
    with pytest.raises(ValueError) as our_err:
        ours(**real)
    assert str(our_err.value) == str(ref_err.value) == message


def test_4d_array_is_refused_with_a_reason(pair):
    batch = np.zeros((2, 30, 30, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="4-D"):
        pair[1](text="<image>", images=batch)


def test_unknown_kwarg_is_a_clear_error(pair):
    with pytest.raises(TypeError, match="do_splitting"):
        pair[1](text="hi", do_splitting=False)


def test_the_references_output_options_are_taken_or_refused_by_name(pair):
    """return_row_col_info changes nothing in the reference's output (the processor drops rows/cols);
    outputs ours does not make (mm_token_type_ids, ...) are refused by name, not as unknown."""
    ref, ours = pair
    image, prompt = _img(40, 30), "Look: <image> ok"
    expected = ref(text=prompt, images=[image], return_row_col_info=True, return_tensors="np")
    got = ours(text=prompt, images=[image], return_row_col_info=True, verbose=False, return_tensors="np")
    assert sorted(got.keys()) == sorted(expected.keys())
    assert np.array_equal(got["input_ids"], expected["input_ids"])
    for option in ("return_mm_token_type_ids", "return_text_replacement_offsets", "return_length"):
        assert option.removeprefix("return_") in ref(text=prompt, images=[image], **{option: True})
        with pytest.raises(TypeError, match=f"does not implement {option}=True"):
            ours(text=prompt, images=[image], **{option: True})


def test_the_references_neutral_options_change_nothing(pair):
    """return_tensors in text_kwargs (read there first), disable_grouping, data_format="channels_first"."""
    ref, ours = pair
    image, prompt = _img(40, 30), "Look: <image> ok"
    expected = ref(text=prompt, images=[image], text_kwargs={"return_tensors": "pt"})
    assert_same(expected, ours(text=prompt, images=[image], text_kwargs={"return_tensors": "pt"}))
    options = dict(disable_grouping=True, data_format="channels_first", return_tensors="np")
    assert_same(ref(text=prompt, images=[image], **options), ours(text=prompt, images=[image], **options))
    with pytest.raises(ValueError, match="channels first"):
        ours(text=prompt, images=[image], data_format="channels_last")


def test_decode_and_batch_decode_with_skip_special_tokens(pair):
    ref, ours = pair
    out = ours(text=["<image>What?<end_of_utterance>", "plain"], images=[_img(60, 40)], padding=True)
    ids = out["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[0], skip_special_tokens=skip) == ref.decode(ids[0], skip_special_tokens=skip)
        tensor = torch.tensor(ids)
        assert ours.batch_decode(tensor, skip_special_tokens=skip) == ref.batch_decode(tensor, skip_special_tokens=skip)
    assert ours.decode(ids[0], skip_special_tokens=True) == "\n\n\nWhat?"  # the tile-row newlines stay


def test_tokenizer_config_without_padding_side_pads_right(tmp_path):
    build_tokenizer(tmp_path)
    write_processor_files(tmp_path, "idefics3")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["padding_side"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref, ours = transformers.AutoProcessor.from_pretrained(tmp_path), _ours(tmp_path)
    texts, images = ["<image>a", "bb"], [_img(40, 30)]
    out = ours(text=texts, images=images, padding=True, return_tensors="pt")
    assert_same(ref(text=texts, images=images, padding=True, return_tensors="pt"), out)
    assert ours.tokenizer.padding_side == "right" and out["attention_mask"][1, -1] == 0


def test_expansion_token_counts():
    s = 5
    assert expand_image(0, 0, s).count("<image>") == s
    split = expand_image(3, 4, s)
    assert split.count("<image>") == (3 * 4 + 1) * s
    assert split.count("<fake_token_around_image>") == 3 * 4 + 2
    assert split.count("\n") == 3 + 1 and "\n\n<fake_token_around_image><global-img>" in split
    assert split.startswith("<fake_token_around_image><row_1_col_1><image>")
    assert "<image>\n<fake_token_around_image><row_2_col_1>" in split


# --- section 2.3 worked example: a hand-built byte-level tokenizer with exactly the documented ids ---

def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in its vocabulary order."""
    order = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    rest = [b for b in range(256) if b not in order]
    chars = {b: chr(b) for b in order} | {b: chr(256 + i) for i, b in enumerate(rest)}
    return [chars[b] for b in order + rest]


def build_worked_example_folder(path):
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers, processors
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode())}
    vocab["ĊĊ"] = 256
    tok = Backend(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<global-img>"]
    specials += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)] + ["<end_of_utterance>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 257)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}))
    write_processor_files(path, "smolvlm")
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Idefics3Processor",
                                                            "image_seq_len": 2}))
    return path


@pytest.fixture(scope="module")
def worked(tmp_path_factory):
    path = build_worked_example_folder(tmp_path_factory.mktemp("worked"))
    return transformers.AutoProcessor.from_pretrained(path), _ours(path)


def test_worked_example_of_section_2_3(worked):
    ref, ours = worked
    expected = ("<|begin_of_text|><fake_token_around_image><row_1_col_1><image><image><fake_token_around_image>"
                "<row_1_col_2><image><image>\n<fake_token_around_image><row_2_col_1><image><image>"
                "<fake_token_around_image><row_2_col_2><image><image>\n\n<fake_token_around_image><global-img>"
                "<image><image><fake_token_around_image>Hi")
    ids = [257, 298, 261, 299, 299, 298, 262, 299, 299, 198, 298, 267, 299, 299, 298, 268, 299, 299, 256,
           298, 260, 299, 299, 298, 39, 72]
    image = _img(60, 40)
    out = ours(text="<image>Hi", images=image, return_tensors="pt")
    assert out["input_ids"][0].tolist() == ids
    assert ours.decode(out["input_ids"][0]) == expected
    assert tuple(out["pixel_values"].shape) == (1, 5, 3, 32, 32)
    assert_same(ref(text="<image>Hi", images=image, return_tensors="pt"), out)


def test_worked_example_unsplit_and_two_images(worked):
    ref, ours = worked
    out = ours(text="<image>Hi", images=_img(60, 40), do_image_splitting=False)
    assert ours.decode(out["input_ids"][0]) == ("<|begin_of_text|><fake_token_around_image><global-img><image><image>"
                                                "<fake_token_around_image>Hi")
    images = [_img(60, 40), _img(20, 20, 1)]
    out = ours(text="A<image>B<image>C", images=images, do_image_splitting=False)
    block = "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
    assert ours.decode(out["input_ids"][0]) == f"<|begin_of_text|>A{block}B{block}C"
    assert_same(ref(text="A<image>B<image>C", images=images, do_image_splitting=False), out)


def test_processor_appends_missing_image_tokens_like_the_reference(worked):
    ref, ours = worked
    for token in ("<fake_token_around_image>", "<image>", "<end_of_utterance>"):
        assert ours.tokenizer.convert_tokens_to_ids(token) == ref.tokenizer.convert_tokens_to_ids(token)
    assert (ours.fake_image_token_id, ours.image_token_id) == (298, 299)


def test_from_pretrained_reads_image_seq_len_and_template(folder, tmp_path):
    ours = _ours(folder)
    assert ours.image_seq_len == 4 and ours.chat_template.startswith("<|begin_of_text|>")
    shutil.copytree(folder, tmp_path / "ck")
    (tmp_path / "ck" / "processor_config.json").unlink()
    assert _ours(tmp_path / "ck").image_seq_len == 169
    with pytest.raises(ValueError, match="image_backend"):
        Idefics3Processor.from_pretrained(folder, image_backend="cv2")


def test_image_paths_are_loaded_like_the_reference(pair, tmp_path):
    ref, ours = pair
    path = tmp_path / "x.png"
    _img(50, 30, mode="RGBA").save(path)
    kwargs = dict(text=["<image>hi", "<image>"], images=[str(path), _img(20, 20)], padding=True, return_tensors="pt")
    assert_same(ref(**kwargs), ours(**kwargs))


@pytest.mark.parametrize("args, kwargs", [(("cpu", torch.bfloat16), {}), ((torch.bfloat16,), {}),
                                          ((), {"device": "cpu", "dtype": torch.float16}), (("cpu",), {})])
def test_outputs_move_and_cast_as_the_references(pair, args, kwargs):
    """`.to("cpu", torch.bfloat16)`: a positional dtype cast the ids and masks too (generate then
    failed in the embedding), and the image processor's outputs took a device only."""
    ref, ours = pair
    text, images = ["<image>What is it?"], [[_img(40, 30)]]
    ref_out = ref(text=text, images=images, return_tensors="pt").to(*args, **kwargs)
    our_out = ours(text=text, images=images, return_tensors="pt").to(*args, **kwargs)
    assert {k: v.dtype for k, v in our_out.items()} == {k: v.dtype for k, v in ref_out.items()}
    pixels = ours.image_processor(images, return_tensors="pt").to(*args, **kwargs)
    assert {k: v.dtype for k, v in pixels.items()} == {k: v.dtype for k, v in ref_out.items() if k in pixels}


def test_a_hub_ids_processor_fetches_only_the_processors_files(folder, monkeypatch):
    """It fetched the whole repository (weights, any pickles and ONNX exports: gigabytes) in every
    preprocessing actor of a job given `--model owner/name`, and took no revision."""
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    processor = Idefics3Processor.from_pretrained("owner/name", revision="v1", size={"longest_edge": 728})
    assert asked == [("owner/name", {"allow_patterns": ["*.json", "*.jinja", "*.txt", "*.model"], "revision": "v1"})]
    assert processor.image_processor.size == {"longest_edge": 728}


def test_from_pretrained_takes_the_processors_own_settings_as_the_reference(folder):
    """image_seq_len, padding_side and chat_template are the processor's, not the image processor's:
    they were refused as "unknown image-processor settings", and so were use_fast and trust_remote_code."""
    settings = dict(image_seq_len=9, padding_side="left", chat_template="{{ messages[0]['content'] }}")
    ref = transformers.AutoProcessor.from_pretrained(folder, **settings)
    ours = Idefics3Processor.from_pretrained(folder, use_fast=True, trust_remote_code=True, **settings)
    assert (ours.image_seq_len, ours.tokenizer.padding_side) == (9, "left")
    assert ours.chat_template == settings["chat_template"]
    kwargs = dict(text=["<image>hi", "a longer text <image>"], images=[_img(40, 30), _img(20, 20)], padding=True,
                  return_tensors="pt")
    assert_same(ref(**kwargs), ours(**kwargs))
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        Idefics3Processor.from_pretrained(folder, padding_side="middle")


def test_save_pretrained_writes_what_both_processors_load(folder, tmp_path):
    """The processor had no save_pretrained: a model saved with ours could not be loaded with its processor."""
    ours = Idefics3Processor.from_pretrained(folder, image_seq_len=9, padding_side="left")
    (tmp_path / "saved").mkdir()        # over an older transformers save, whose chat_template.json is read first
    (tmp_path / "saved" / "chat_template.json").write_text('{"chat_template": "OLD {{ messages }}"}')
    ours.save_pretrained(tmp_path / "saved")
    kwargs = dict(text=["<image>hi", "a longer text <image>"], images=[_img(40, 30), _img(20, 20)], padding=True,
                  return_tensors="pt")
    want = ours(**kwargs)
    again = Idefics3Processor.from_pretrained(tmp_path / "saved")
    assert_same(want, again(**kwargs))
    assert again.chat_template == ours.chat_template and again.tokenizer.padding_side == "left"
    assert_same(transformers.AutoProcessor.from_pretrained(tmp_path / "saved")(**kwargs), want)
