"""A row's conversation, to answer its next assistant turn: messages in the Hugging Face chat
format (`{"role": ..., "content": ...}`, the content a text or a list of parts `{"type": "text",
"text": ...}` / `{"type": "image"}`), as instruction datasets keep them, with the row's images in
the order of its image parts. A last assistant turn is the one to answer again (regenerating a
dataset's answers with another model), so it is left out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import PromptError

ROLES = ("system", "user", "assistant")
IMAGE_PAYLOADS = ("image", "url", "path", "base64")     # images inside the messages: not read here


@dataclass(frozen=True)
class Conversation:
    turns: list[dict]       # the messages to render: contents as lists of parts, the last a user turn
    question: str           # the text of the turn answered (its text parts, one a line)
    num_images: int


def read_conversation(messages: Any, suffix: str = "") -> Conversation:
    """The conversation of a row's messages (a list, or its JSON text), checked: known roles, a
    system turn only first, text and image parts only, ending with a user turn once a last
    assistant turn is left out. `suffix` is appended to the last user turn's text (an answer
    format). PromptError names what is wrong."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise PromptError(f"the messages are not JSON: {e}") from None
        except RecursionError:      # json's parser recurses once a level: a cell of 100 000 "["
            raise PromptError("the messages nest too deeply to read") from None
    if not isinstance(messages, list) or not messages:
        raise PromptError(f"the messages must be a non-empty list of turns, got {_shown(messages)}")
    turns = [_turn(m, i) for i, m in enumerate(messages)]
    if turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if not turns or turns[-1]["role"] != "user":
        last = turns[-1]["role"] if turns else "nothing"
        raise PromptError(f"the conversation ends with {last} before the turn to answer: it needs a user turn last")
    if suffix:
        turns[-1] = dict(turns[-1], content=_with_suffix(turns[-1]["content"], suffix))
    question = "\n".join(p["text"] for p in turns[-1]["content"] if p["type"] == "text")
    return Conversation(turns, question, sum(p["type"] == "image" for t in turns for p in t["content"]))


def _turn(message: Any, index: int) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        role = message.get("role") if isinstance(message, dict) else None
        raise PromptError(f"turn {index}: each message needs a role of {', '.join(ROLES)}, "
                          f"got {_shown(role or message)}")
    if message["role"] == "system" and index:
        raise PromptError(f"turn {index}: a system turn may only open the conversation")
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise PromptError(f"turn {index}: the content must be text or a list of parts, got {_shown(content)}")
    return {"role": message["role"], "content": [_part(p, index) for p in content]}


def _part(part: Any, index: int) -> dict:
    from .fast_path import check_question

    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image":
        carried = [k for k in IMAGE_PAYLOADS if part.get(k) is not None]
        if carried:
            raise PromptError(f"turn {index}: an image part carries its image ({carried[0]!r}); images come from "
                              "the row's image column, in the order of the image parts")
        return {"type": "image"}
    if kind == "text":
        check_question(part.get("text"), "a message's text")
        return {"type": "text", "text": part["text"]}
    raise PromptError(f"turn {index}: parts are text or image, got {_shown(part)}")


def _with_suffix(content: list[dict], suffix: str) -> list[dict]:
    if content and content[-1]["type"] == "text":
        return content[:-1] + [{"type": "text", "text": content[-1]["text"] + suffix}]
    return content + [{"type": "text", "text": suffix}]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
