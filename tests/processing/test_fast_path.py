"""RowEncoder: ids and frames of one dataset row, against transformers' processor."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from processing import InputError, PromptError, RowEncoder
from processing.errors import ImageDecodeError, ImageTooLargeError
from processing.fast_path import payload_nbytes
from tests.fixtures.checkpoints import build_tokenizer, write_processor_files

transformers = pytest.importorskip("transformers")
QUESTION = "What is in the image? Answer briefly."


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def setup(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build_tokenizer(path)
    write_processor_files(path, request.param)
    return transformers.AutoProcessor.from_pretrained(path), RowEncoder.from_pretrained(path), path


def _img(w, h, seed=0, mode="RGB"):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _reference(ref, image, question):
    images = image if isinstance(image, list) else [] if image is None else [image]
    content = [{"type": "image", "image": i} for i in images] + [{"type": "text", "text": question}]
    return ref.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True, return_tensors="pt")


@pytest.mark.parametrize("size", [(60, 40), (20, 90), (1, 1), (72, 72), (300, 7), (33, 33)])
def test_ids_and_pixels_match_reference_apply_chat_template(setup, size):
    ref, enc, _ = setup
    image = _img(*size, seed=sum(size))
    row = enc.encode(image=_png(image), question=QUESTION)
    want = _reference(ref, image, QUESTION)
    assert row.input_ids == want["input_ids"][0].tolist()
    assert row.frames.dtype == np.uint8 and row.frames.shape[0] == want["pixel_values"].shape[1]
    pixels = enc.pixel_values(torch.from_numpy(row.frames))
    assert pixels.dtype == torch.float32
    assert torch.equal(pixels, want["pixel_values"][0])  # bit-identical
    grid = (row.rows, row.cols)
    assert row.frames.shape[0] == (grid[0] * grid[1] + 1 if grid != (0, 0) else 1)


@pytest.mark.parametrize("settings, fewer", [({"size": {"longest_edge": 48}}, False), ({"do_image_splitting": False}, True),
                                             ({"size": {"longest_edge": 20}}, True), ({"size": {"longest_edge": 100}}, False)])
def test_image_settings_override_the_config_as_the_reference_kwargs(setup, settings, fewer):
    """Fewer (or more) tiles, or one frame, for speed: our overrides equal the reference's
    AutoProcessor.from_pretrained(path, **settings) on ids and pixels."""
    _, _, path = setup
    ref = transformers.AutoProcessor.from_pretrained(path, **settings)
    enc = RowEncoder.from_pretrained(path, **settings)
    default_frames = setup[1].encode(image=_png(_img(90, 60, seed=3)), question=QUESTION).frames.shape[0]
    for size in [(90, 60), (20, 90), (33, 33)]:
        image = _img(*size, seed=sum(size))
        row = enc.encode(image=_png(image), question=QUESTION)
        want = _reference(ref, image, QUESTION)
        assert row.input_ids == want["input_ids"][0].tolist()
        assert torch.equal(enc.pixel_values(torch.from_numpy(row.frames)), want["pixel_values"][0])
    if fewer:
        assert enc.encode(image=_png(_img(90, 60, seed=3)), question=QUESTION).frames.shape[0] < default_frames
    with pytest.raises(TypeError, match="unknown image-processor settings"):
        RowEncoder.from_pretrained(path, longest_edge=48)


def test_a_system_prompt_comes_before_the_user_turn_as_in_the_reference(setup):
    ref, _, path = setup
    system = "You write one short, factual caption."
    enc = RowEncoder.from_pretrained(path, system_prompt=system)
    image = _img(60, 40, seed=5)
    content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}, {"role": "user", "content": content}]
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    row = enc.encode(image=_png(image), question=QUESTION)
    assert row.input_ids == want["input_ids"][0].tolist()
    assert row.input_ids != setup[1].encode(image=_png(image), question=QUESTION).input_ids
    assert enc.encode(question="text only").input_ids[:5] == want["input_ids"][0].tolist()[:5]
    with pytest.raises(InputError, match="image marker"):
        RowEncoder.from_pretrained(path, system_prompt="Look at <image> first.")


@pytest.mark.parametrize("sizes", [[(60, 40), (20, 90)], [(72, 72), (1, 1), (300, 7)], [(33, 33), (33, 33)]])
def test_several_images_match_reference_apply_chat_template(setup, sizes):
    """A row of several images (MMMU, NLVR2): each image's block in order, then the question."""
    ref, enc, _ = setup
    images = [_img(*size, seed=i) for i, size in enumerate(sizes)]
    row = enc.encode_images([_png(image) for image in images], QUESTION)
    want = _reference(ref, images, QUESTION)
    assert row.input_ids == want["input_ids"][0].tolist()
    frames = torch.from_numpy(row.frames)
    assert torch.equal(enc.pixel_values(frames), want["pixel_values"][0][: frames.shape[0]])
    assert not want["pixel_values"][0][frames.shape[0]:].any()       # the reference's padding frames only
    tiles = [enc.image_frames(_png(image)) for image in images]
    assert enc.encode_images(images, QUESTION, tiles=tiles).input_ids == row.input_ids


def test_pil_input_and_rgba_and_grey(setup):
    ref, enc, _ = setup
    for image in (_img(50, 30, 1, "RGBA"), _img(30, 50, 2, "L"), _img(40, 40, 3, "P")):
        row = enc.encode(image=image, question="Describe.")
        want = _reference(ref, image, "Describe.")
        assert row.input_ids == want["input_ids"][0].tolist()
        assert torch.equal(enc.pixel_values(row.frames), want["pixel_values"][0])


def test_text_only_row(setup):
    ref, enc, _ = setup
    row = enc.encode(image=None, question=QUESTION)
    assert row.frames is None and (row.rows, row.cols) == (0, 0)
    assert row.input_ids == _reference(ref, None, QUESTION)["input_ids"][0].tolist()
    assert row.input_ids.count(enc.tokenizer.bos_token_id) == 1


def test_splice_equals_full_tokenization(setup):
    _, enc, _ = setup
    assert enc._splice  # byte-level BPE: the cached block ids are exact
    image = _png(_img(64, 40))
    spliced = enc.encode(image=image, question=QUESTION).input_ids
    enc._splice = False
    try:
        assert enc.encode(image=image, question=QUESTION).input_ids == spliced
    finally:
        enc._splice = True


@pytest.mark.parametrize("question", ["look <image> here", "<image>"])
def test_the_image_marker_in_the_question_is_refused(setup, question):
    _, enc, _ = setup
    with pytest.raises(PromptError, match="image marker") as err:
        enc.encode(image=_png(_img(30, 30)), question=question)
    assert isinstance(err.value, InputError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("question", ["<fake_token_around_image>", "a<global-img>", "<row_1_col_2> tile",
                                      "<row_9_col_9>"])
def test_the_image_blocks_other_tags_in_the_question_are_text_as_the_references(setup, question):
    """They were refused too, where the reference answers: they add no image token."""
    ref, enc, _ = setup
    image = _img(30, 30)
    assert enc.encode(image=_png(image), question=question).input_ids == \
        _reference(ref, image, question)["input_ids"][0].tolist()


def test_bad_rows_raise_input_errors(setup):
    _, enc, _ = setup
    with pytest.raises(ImageDecodeError):
        enc.encode(image=b"", question="q")
    with pytest.raises(ImageDecodeError):
        enc.encode(image=b"not an image at all", question="q")
    with pytest.raises(ImageDecodeError):
        enc.encode(image=_png(_img(30, 30))[:40], question="q")
    with pytest.raises(ImageDecodeError, match="bytes or a PIL image"):
        enc.encode(image=12, question="q")
    with pytest.raises(PromptError, match="string"):
        enc.encode(image=None, question=None)


def test_pixel_limit_is_configurable(setup):
    _, _, path = setup
    small = RowEncoder.from_pretrained(path, max_image_pixels=1000)
    with pytest.raises(ImageTooLargeError):
        small.encode(image=_png(_img(40, 30)), question="q")
    with pytest.raises(ImageTooLargeError):
        small.encode(image=_img(40, 30), question="q")
    assert small.encode(image=_png(_img(30, 30)), question="q").frames is not None


def test_prompt_longer_than_the_context_is_refused(setup):
    _, enc, _ = setup
    assert enc.max_length == 4096  # tokenizer_config model_max_length (no config.json in this folder)
    enc.max_length, saved = 20, enc.max_length
    try:
        with pytest.raises(PromptError, match="context"):
            enc.encode(image=_png(_img(30, 30)), question="q")
    finally:
        enc.max_length = saved


def test_max_length_prefers_the_model_config(setup, tmp_path):
    _, _, path = setup
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 777}}))
    assert RowEncoder.from_pretrained(tmp_path).max_length == 777


def test_torch_backend_recipe(setup):
    _, _, path = setup
    enc = RowEncoder.from_pretrained(path, image_backend="torch")
    assert enc.recipe == "torch"
    image = _img(60, 40)
    row = enc.encode(image=image, question=QUESTION)
    want = enc.processor(text=enc.prompt(QUESTION, 1), images=[image], add_special_tokens=False,
                         return_tensors="pt")
    assert row.input_ids == want["input_ids"][0].tolist()
    assert torch.equal(enc.pixel_values(row.frames), want["pixel_values"][0])


def test_encoded_nbytes_is_a_quarter_of_float32(setup):
    _, enc, _ = setup
    row = enc.encode(image=_png(_img(60, 40)), question=QUESTION)
    m = row.frames.shape[-1]
    assert row.frames.nbytes == payload_nbytes(row.num_frames, m)["uint8"]
    pixel_bytes = row.float32_nbytes - 8 * len(row.input_ids)
    assert pixel_bytes == 4 * row.frames.nbytes == payload_nbytes(row.num_frames, m)["float32"]
    assert row.encoded_nbytes == row.frames.nbytes + 8 * len(row.input_ids)


def test_published_sizes_bytes_per_image():
    # 1024x768 with Idefics3-8B settings -> 4x3 tiles + global = 13 frames of 364^2.
    idefics3 = payload_nbytes(13, 364)
    assert idefics3 == {"uint8": 5_167_344, "float32": 20_669_376}
    smolvlm = payload_nbytes(13, 512)  # SmolVLM: 2048 / 512 -> 4x3 + 1
    assert smolvlm["float32"] - smolvlm["uint8"] == 3 * 13 * 3 * 512 * 512


def test_encoder_survives_pickling_for_ray_actors(setup):
    import pickle
    _, enc, _ = setup
    copy = pickle.loads(pickle.dumps(enc))
    image = _png(_img(60, 40))
    assert copy.encode(image=image, question=QUESTION).input_ids == enc.encode(image=image, question=QUESTION).input_ids
    assert copy.tokenizer.decode(copy.encode(None, "hi").input_ids, skip_special_tokens=True).startswith("User: hi")
