"""Conversations (the HF chat format) to answer: ids and pixels equal transformers' processor
applying its chat template to the same messages (images in the image parts, a last assistant
turn left out); bad messages are refused naming the turn and the cause."""
from __future__ import annotations

import json

import pytest
import torch

from processing import PromptError, RowEncoder, read_conversation
from tests.fixtures.checkpoints import build_tokenizer, write_processor_files
from tests.processing.test_fast_path import _img, _png

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def setup(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build_tokenizer(path)
    write_processor_files(path, request.param)
    return transformers.AutoProcessor.from_pretrained(path), path


def text(t: str) -> dict:
    return {"type": "text", "text": t}


CONVERSATIONS = {
    "one turn, old answer": [{"role": "user", "content": [{"type": "image"}, text("What is this?")]},
                             {"role": "assistant", "content": [text("A cat.")]}],
    "multi-turn, images in two turns": [
        {"role": "system", "content": [text("Answer briefly.")]},
        {"role": "user", "content": [{"type": "image"}, text("What colour is it?")]},
        {"role": "assistant", "content": [text("Red.")]},
        {"role": "user", "content": [text("And this one?"), {"type": "image"}]}],
    "text contents": [{"role": "user", "content": [{"type": "image"}, text("Describe it.")]},
                      {"role": "assistant", "content": "Two shapes."},
                      {"role": "user", "content": "Which is larger?"}],
}


def as_reference(messages: list[dict], images: list) -> list[dict]:
    """The messages as transformers' processor takes them: parts everywhere, each image in its part."""
    images, out = iter(images), []
    for m in messages:
        content = [text(m["content"])] if isinstance(m["content"], str) else m["content"]
        out.append({"role": m["role"], "content": [dict(p, image=next(images)) if p["type"] == "image" else p
                                                   for p in content]})
    return out


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_and_pixels_equal_the_references_chat_template(setup, name):
    ref, path = setup
    messages = CONVERSATIONS[name]
    conversation = read_conversation(messages)
    images = [_img(40 + 13 * i, 30 + 7 * i, seed=i) for i in range(conversation.num_images)]
    wanted = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    want = ref.apply_chat_template(as_reference(wanted, images), add_generation_prompt=True, tokenize=True,
                                   return_dict=True, return_tensors="pt")
    enc = RowEncoder.from_pretrained(path)
    row = enc.encode_conversation([_png(i) for i in images], conversation)
    assert row.input_ids == want["input_ids"][0].tolist()
    assert torch.equal(enc.pixel_values(torch.from_numpy(row.frames)), want["pixel_values"][0])
    same = enc.encode_conversation([_png(i) for i in images], read_conversation(json.dumps(messages)))
    assert same.input_ids == row.input_ids                          # the messages' JSON text reads alike


def test_one_user_turn_is_the_question_with_its_images(setup):
    """A conversation of one user turn (images, then the text) is the row of that question."""
    _, path = setup
    enc = RowEncoder.from_pretrained(path, system_prompt="Be brief.")
    image = _png(_img(50, 30))
    conversation = read_conversation(CONVERSATIONS["one turn, old answer"], suffix=" One word.")
    assert conversation.question == "What is this? One word."
    assert enc.encode_conversation([image], conversation).input_ids == enc.encode(image, "What is this? One word.").input_ids


@pytest.mark.parametrize("messages,message", [
    ("[{nope", "not JSON"), ("[" * 100_000, "nest too deeply"), ([], "non-empty list"),
    ({"role": "user"}, "non-empty list"),
    ([{"role": "robot", "content": "hi"}], "turn 0: each message needs a role"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "turn 1: a system turn may only open"),
    ([{"role": "assistant", "content": "a"}], "ends with nothing"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
     "ends with assistant"),
    ([{"role": "user", "content": 3}], "turn 0: the content must be text or a list"),
    ([{"role": "user", "content": [{"type": "video"}]}], "parts are text or image"),
    ([{"role": "user", "content": [{"type": "image", "url": "http://x/a.png"}]}], "carries its image"),
    ([{"role": "user", "content": [text("look: <image>")]}], "image marker"),
])
def test_bad_messages_are_refused_naming_the_cause(messages, message):
    with pytest.raises(PromptError, match=message):
        read_conversation(messages)


def test_image_parts_must_match_the_rows_images(setup):
    _, path = setup
    enc = RowEncoder.from_pretrained(path)
    with pytest.raises(PromptError, match="2 image parts for the row's 1 images"):
        enc.encode_conversation([_png(_img(20, 20))], read_conversation(CONVERSATIONS["multi-turn, images in two turns"]))
