"""Chat templates: rendering identical to the reference, the three file locations, the sandbox."""
from __future__ import annotations

import json
import shutil

import jinja2
import numpy as np
import pytest
import torch
from PIL import Image

from processing.chat_template import ChatTemplateError, load_chat_template, render_chat
from processing.processor import Idefics3Processor
from processing.tokenizer import Tokenizer
from tests.fixtures.checkpoints import CHAT_TEMPLATE, build_tokenizer, write_processor_files

transformers = pytest.importorskip("transformers")

EXAMPLE = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "text", "text": "Sure?"}, {"type": "image"}]},
]
EXAMPLE_RENDERED = ("<|begin_of_text|>System: Be brief.<end_of_utterance>\nUser:<image>What is this?"
                    "<end_of_utterance>\nAssistant: A cat.<end_of_utterance>\nUser: Sure?<image><end_of_utterance>\n"
                    "Assistant:")

CONVERSATIONS = [
    EXAMPLE,
    [{"role": "user", "content": "plain string content is dropped"}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}, {"type": "text", "text": "b"}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "two"}]},
     {"role": "assistant", "content": [{"type": "text", "text": " spaced answer "}]}],
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    build_tokenizer(path)
    write_processor_files(path, "idefics3")
    return path


@pytest.fixture(scope="module")
def pair(folder):
    return transformers.AutoProcessor.from_pretrained(folder), Idefics3Processor.from_pretrained(folder)


def _img(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_section_2_4_example(pair):
    ref, ours = pair
    assert ours.apply_chat_template(EXAMPLE, add_generation_prompt=True) == EXAMPLE_RENDERED
    assert ref.apply_chat_template(EXAMPLE, add_generation_prompt=True) == EXAMPLE_RENDERED


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_rendering_matches_reference(pair, index, add_generation_prompt):
    ref, ours = pair
    conv = CONVERSATIONS[index]
    assert ours.apply_chat_template(conv, add_generation_prompt=add_generation_prompt) == \
        ref.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)


def test_plain_string_content_renders_nothing(pair):
    assert pair[1].apply_chat_template(CONVERSATIONS[1]) == "<|begin_of_text|>User: <end_of_utterance>\n"


def test_batched_conversations_and_continue_final_message(pair):
    ref, ours = pair
    assert ours.apply_chat_template(CONVERSATIONS) == ref.apply_chat_template(CONVERSATIONS)
    for conv in (EXAMPLE[:3], CONVERSATIONS[3]):
        got = ours.apply_chat_template(conv, continue_final_message=True)
        assert got == ref.apply_chat_template(conv, continue_final_message=True)
        assert not got.endswith("<end_of_utterance>\n")


def test_tokenize_true_gives_a_single_bos_and_matches_reference(pair):
    ref, ours = pair
    conv = [{"role": "user", "content": [{"type": "image", "image": _img(50, 30)},
                                         {"type": "text", "text": "What is this?"}]}]
    ids = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    assert ids == ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    bos = ours.tokenizer.bos_token_id
    assert ids[0][0] == bos and ids[0].count(bos) == 1
    # The processor called on the rendered string keeps the reference's double BOS.
    prompt = ours.apply_chat_template(conv, add_generation_prompt=True)
    assert ours(text=prompt, images=[_img(50, 30)])["input_ids"][0][:2] == [bos, bos]


def test_images_given_beside_the_conversation_are_the_references(pair):
    ref, ours = pair
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    options = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    expected = ref.apply_chat_template(conv, images=[_img(50, 30)], **options)
    got = ours.apply_chat_template(conv, images=[_img(50, 30)], **options)
    assert sorted(got.keys()) == sorted(expected.keys())
    assert all(torch.allclose(got[k].float(), expected[k].float(), atol=1e-6) for k in expected)


@pytest.mark.parametrize("option", [dict(sanitize_control_tokens=True), dict(return_assistant_tokens_mask=True),
                                    dict(continue_final_message="content")])
def test_chat_options_it_does_not_follow_are_refused_by_name(pair, option):
    """Not rendered as template variables and ignored: a guard against injected control tokens silently off."""
    with pytest.raises(TypeError, match=next(iter(option))):
        pair[1].apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi<end_of_utterance>"}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": "A"}]}],
                                    tokenize=True, **option)


def test_tokenize_return_dict_with_images_and_tensors(pair):
    ref, ours = pair
    convs = [[{"role": "user", "content": [{"type": "image", "image": _img(40, 40)}, {"type": "text", "text": "a"}]}],
             [{"role": "user", "content": [{"type": "text", "text": "text only, longer"}]}]]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    # (a fresh processor_kwargs dict per call: the reference writes into the one it is given)
    want = ref.apply_chat_template(convs, processor_kwargs={"padding": True}, **kwargs)
    got = ours.apply_chat_template(convs, processor_kwargs={"padding": True}, **kwargs)
    assert set(want.keys()) == set(got.keys())
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), atol=1e-6, rtol=0)


def _folder_with_template(src, tmp_path, where):
    dst = tmp_path / where
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink()
    marked = CHAT_TEMPLATE.replace("Assistant:", f"Assistant({where}):")
    if where == "chat_template.json":
        (dst / "chat_template.json").write_text(json.dumps({"chat_template": marked}))
    elif where == "chat_template.jinja":
        (dst / "chat_template.jinja").write_text(marked)
    else:
        config = json.loads((dst / "tokenizer_config.json").read_text())
        (dst / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": marked}))
    return dst, marked


@pytest.mark.parametrize("where", ["chat_template.json", "chat_template.jinja", "tokenizer_config.json"])
def test_templates_load_from_each_file_location(folder, tmp_path, where):
    path, marked = _folder_with_template(folder, tmp_path, where)
    ours = Idefics3Processor.from_pretrained(path)
    assert ours.chat_template == marked
    got = ours.apply_chat_template(EXAMPLE, add_generation_prompt=True)
    assert got.endswith(f"Assistant({where}):")
    if where == "tokenizer_config.json":  # the reference processor ignores it; its tokenizer renders it
        want = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
            EXAMPLE, add_generation_prompt=True, tokenize=False)
    else:
        want = transformers.AutoProcessor.from_pretrained(path).apply_chat_template(EXAMPLE, add_generation_prompt=True)
    assert got == want


def test_chat_template_json_wins_over_jinja(folder, tmp_path):
    path, marked = _folder_with_template(folder, tmp_path, "chat_template.json")
    (path / "chat_template.jinja").write_text("IGNORED")
    assert load_chat_template(path) == marked
    assert transformers.AutoProcessor.from_pretrained(path).chat_template == marked


def test_no_template_is_a_clear_error(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "ck")
    (tmp_path / "ck" / "chat_template.jinja").unlink()
    ours = Idefics3Processor.from_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(EXAMPLE)
    assert ours.apply_chat_template(EXAMPLE, chat_template="{{ messages | length }}") == "4"


def test_template_variables_and_helpers(pair):
    ours = pair[1]
    tpl = "{{ bos_token }}|{{ eos_token }}|{{ messages[0] | tojson }}|{{ custom }}"
    got = ours.apply_chat_template([{"role": "user", "content": "é"}], chat_template=tpl, custom="x")
    assert got == '<|begin_of_text|>|<|end_of_text|>|{"role": "user", "content": "é"}|x'
    with pytest.raises(ChatTemplateError, match="only users may speak"):
        render_chat("{{ raise_exception('only users may speak') }}", [])


@pytest.mark.parametrize("attack", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{% set d = messages[0] %}{{ d.update({'role': 'x'}) }}",
    "{{ cycler.__init__.__globals__.os }}",
])
def test_sandbox_blocks_escapes_and_mutation(attack):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat(attack, messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_render_does_not_modify_the_callers_messages(pair):
    conv = json.loads(json.dumps(EXAMPLE))
    pair[1].apply_chat_template(conv, continue_final_message=True)
    assert conv == EXAMPLE


def test_a_template_sees_the_callers_objects_only_as_placeholders(pair, tmp_path):
    """An image's methods are not known unsafe to the sandbox: a template wrote files with PIL's save and
    numpy's tofile and changed the caller's pixels; `tojson` of a block with an image failed. It sees
    "<Image>" as the reference's does, and numpy's scalars as Python's."""
    image, array = _img(4, 4), np.zeros((2, 2), np.uint8)
    before = np.asarray(image).copy()
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "image", "image": array},
                                         {"type": "text", "text": "hi", "flag": np.bool_(False)}]}]
    attack = ("{% set c = messages[0].content %}{{ c[0].image.save('" + str(tmp_path / "a.png") + "') }}"
              "{{ c[1].image.tofile('" + str(tmp_path / "a.bin") + "') }}{{ c[0].image.putpixel((0, 0), 0) }}")
    with pytest.raises(ChatTemplateError, match="has no attribute 'save'"):
        pair[1].apply_chat_template(conv, chat_template=attack)
    assert not list(tmp_path.iterdir()) and (np.asarray(image) == before).all()
    shown = "{{ messages[0].content|tojson }}|{{ 'set' if messages[0].content[2].flag else 'unset' }}"
    assert pair[1].apply_chat_template(conv, chat_template=shown) == pair[0].apply_chat_template(
        conv, chat_template=shown) == ('[{"type": "image", "image": "<Image>"}, {"type": "image", "image": '
                                       '"<ndarray>"}, {"type": "text", "text": "hi", "flag": false}]|unset')


def test_tools_as_functions_are_refused_by_name(pair):
    """The reference derives a schema from a function's docstring; ours failed in json.dumps, naming no tool."""
    def weather(city: str) -> str:
        return city

    with pytest.raises(ValueError, match=r"tools: each tool is a JSON schema \(a dict\), got a function \('weather'\)"):
        pair[1].apply_chat_template([{"role": "user", "content": "hi"}], tools=[weather])


def test_tokenizer_exposes_tokenizer_config_template(folder, tmp_path):
    path, marked = _folder_with_template(folder, tmp_path, "tokenizer_config.json")
    assert Tokenizer.from_pretrained(path).chat_template == marked


def test_multi_turn_with_two_images_tokenized_matches_reference(pair):
    ref, ours = pair
    conv = json.loads(json.dumps(EXAMPLE))
    conv[1]["content"][0]["image"] = _img(70, 40, 1)
    conv[3]["content"][1]["image"] = _img(24, 24, 2)
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    want, got = ref.apply_chat_template(conv, **kwargs), ours.apply_chat_template(conv, **kwargs)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    np.testing.assert_allclose(got["pixel_values"].numpy(), want["pixel_values"].numpy(), atol=1e-6, rtol=0)
    assert got["input_ids"][0].tolist().count(ours.tokenizer.bos_token_id) == 1


def test_template_variables_tags_and_refusals_are_the_references(pair):
    """`tools` and `documents` are None unless given (Llama 3.1's template reads them); a
    {% generation %} block renders its body; continuing the last message while opening a new one is
    refused; images given in processor_kwargs replace the conversation's."""
    ref, ours = pair
    template = ("{% if tools is not none %}{{ tools | tojson }}{% endif %}{% if documents is none %}|no docs{% endif %}"
                "{% for m in messages %}{% generation %}{{ m.role }}{% endgeneration %}{% endfor %}")
    for given in ({}, {"tools": [{"name": "f"}]}):
        assert ours.apply_chat_template(EXAMPLE, chat_template=template, **given) == \
            ref.apply_chat_template(EXAMPLE, chat_template=template, **given)
    for processor in (ref, ours):
        with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt"):
            processor.apply_chat_template(EXAMPLE, continue_final_message=True, add_generation_prompt=True)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    image = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                  processor_kwargs={"images": [image]})
    got, want = ours.apply_chat_template(conversation, **kwargs), ref.apply_chat_template(conversation, **kwargs)
    assert torch.equal(got["input_ids"], want["input_ids"])
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)
