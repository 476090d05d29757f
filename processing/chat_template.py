"""Chat templates: loading from the HF layout and rendering in a sandboxed Jinja2 environment.

Templates ship with checkpoints, so they are untrusted code: they run in Jinja2's
ImmutableSandboxedEnvironment (no attribute access to dunders, no mutation of our data), with the
same helpers the reference exposes to templates (raise_exception, tojson, strftime_now), and with
bounds on their time and memory (template_limits).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from jinja2.ext import Extension, loopcontrols

from .errors import ChatTemplateError
from .template_limits import (MAX_DATE_FORMAT, MAX_JSON_INDENT, BoundedSandbox, check_printable, check_size,
                              render_within_deadline)

Template = str | dict[str, str]
# Appended to the last text of the final message so we can cut the render right after it.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON. The indent repeats on every line.
    check_size(len(indent) if isinstance(indent, str) else indent or 0, "tojson's indent", MAX_JSON_INDENT)
    check_printable(value)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    check_size(len(fmt), "strftime_now's format", MAX_DATE_FORMAT, "characters")    # one C call, unstoppable
    return datetime.now().strftime(fmt)


class _StrictSandbox(BoundedSandbox):
    """Jinja2's sandbox turns an unsafe attribute into an Undefined that only fails when used;
    we fail at the access itself, so a probing template can never render quietly."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"chat template tried to reach the unsafe attribute {attribute!r} of a {type(obj).__name__}")


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (the reference's marks of the assistant's tokens, for
    its assistant-tokens mask): the body renders as it is."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(source)


def load_chat_template(path: str | Path) -> Template | None:
    """Find a checkpoint's template. Order (as the reference): chat_template.json, then
    chat_template.jinja (+ named templates in chat_templates/*.jinja), then the processor config's
    "chat_template"; finally tokenizer_config.json's "chat_template" (the reference processor stops
    before this last one and refuses to render; we use it)."""
    path = Path(path)
    legacy = path / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text(encoding="utf-8"))["chat_template"]
    templates = {f.stem: f.read_text(encoding="utf-8") for f in sorted((path / "chat_templates").glob("*.jinja"))}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    for name in ("processor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            found = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
            if found:
                return _named_list_to_dict(found)
    return None


def _named_list_to_dict(found: Any) -> Template:
    # tokenizer_config.json may hold [{"name": ..., "template": ...}, ...]
    if isinstance(found, list):
        return {entry["name"]: entry["template"] for entry in found}
    return found


def resolve_template(template: Template | None, choice: str | None = None) -> str:
    """Pick the template string: `choice` names a template of a dict or is a template itself."""
    if choice is not None:
        return template[choice] if isinstance(template, dict) and choice in template else choice
    if isinstance(template, dict):
        if "default" not in template:
            raise ValueError(f"the checkpoint has several chat templates and none is named 'default'; "
                             f"pass chat_template= one of {sorted(template)}")
        return template["default"]
    if template is None:
        raise ValueError("this processor has no chat template (no chat_template.json, chat_template.jinja or "
                         "tokenizer_config.json 'chat_template'); pass chat_template=")
    return template


def render_chat(template: str, conversation: list[dict], add_generation_prompt: bool = False,
                continue_final_message: bool = False, **variables: Any) -> str:
    """Render one conversation. `variables` (bos_token, ...) are visible to the template; `tools` and
    `documents` are None unless given, as the reference defines them."""
    if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
        raise ValueError("a conversation must be a list of message dicts")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set: the first "
                         "continues the last message, the second opens a new one")
    check_tools(variables.get("tools"))
    messages = [plain_data({k: v for k, v in m.items() if v is not None}) for m in conversation]
    last_text = _tag_final_message(messages) if continue_final_message else None
    variables = {"tools": None, "documents": None, **plain_data(variables)}
    try:
        rendered = render_within_deadline(compile_template(template), {
            **variables, "messages": messages, "add_generation_prompt": add_generation_prompt})
    except (jinja2.exceptions.SecurityError, ChatTemplateError):
        raise
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
    except Exception as e:      # {% include %} (no loader), a macro's recursion, range(10**10)'s overflow
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    return _cut_at_tag(rendered, last_text) if continue_final_message else rendered


def plain_data(value: Any) -> Any:
    """What a template sees of the caller's data: rebuilt of JSON's types (str, int, float, bool, None,
    dicts, lists, tuples), anything else a placeholder naming its type ("<Image>"). An image's or an
    array's methods are not known unsafe to the sandbox, and some write files or change the caller's
    image; templates only ask whether a block has an image, never read it (the reference does the same)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):           # numpy's scalars: np.bool_(False) stays falsy
        return plain_data(value.item())
    for kind, exact in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, kind):             # subclasses (enums) carry methods of their own
            return exact(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def check_tools(tools: Any) -> None:
    """Tools reach a template as JSON schemas; the reference also derives one from a function's signature
    and docstring, which we do not."""
    for tool in tools or ():
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools: each tool is a JSON schema (a dict), got a {type(tool).__name__} "
                             f"({getattr(tool, '__name__', tool)!r}): write its schema")


def _tag_final_message(messages: list[dict]) -> str:
    """Mark the end of the final message's (last) text so the render can be cut right after it."""
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty")
    content = messages[-1].get("content")
    if isinstance(content, str):
        messages[-1]["content"] = content + _CONTINUE_TAG
        return content
    for block in reversed(content or []):
        if isinstance(block, dict) and "text" in block:
            text = block["text"]
            block["text"] = text + _CONTINUE_TAG
            return text
    raise ValueError("continue_final_message is set but the final message has no text to continue")


def _cut_at_tag(rendered: str, final_text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if tag not in rendered or final_text.strip() not in rendered:
        raise ValueError("continue_final_message is set but the chat template dropped the final message's text")
    at = rendered.rindex(tag)
    # If the template trimmed whitespace around the tag, the message's own trailing space went too.
    return rendered[:at] if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:at].rstrip()


def normalize_conversations(conversation: Any) -> tuple[list[list[dict]], bool]:
    """A single conversation or a batch of them -> (batch, was_batched); OpenAI image_url blocks
    become {"type": "image", "url": ...}."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("conversation must be a non-empty list of messages (or a list of conversations)")
    batched = isinstance(conversation[0], (list, tuple))
    batch = [list(c) for c in conversation] if batched else [list(conversation)]
    return [[_normalize_message(m) for m in conv] for conv in batch], batched


def _normalize_message(message: Any) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"chat messages must be dicts, got {type(message).__name__}")
    message = {k: v for k, v in message.items() if v is not None}
    content = message.get("content")
    if isinstance(content, list):
        message["content"] = [_openai_block(block) for block in content]
    return message


def _openai_block(block: Any) -> Any:
    if isinstance(block, dict) and block.get("type") == "image_url" and "image_url" in block:
        url = block["image_url"].get("url", "") if isinstance(block["image_url"], dict) else block["image_url"]
        return {"type": "image", "url": url}
    return block


def images_of(conversation: list[dict]) -> list[Any]:
    """Images carried by the conversation's image blocks (keys image / url / path / base64), in order."""
    found = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str) or not content:
            continue
        for block in content:
            if isinstance(block, dict) and block.get("type") == "image":
                found += [block[key] for key in ("image", "url", "path", "base64") if key in block]
    return found
