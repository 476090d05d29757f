"""Scored continuations (Request.continuation_ids): tokens after the prompt whose log p the prefill
gives (a caption's likelihood given its image), never generated.

The engine makes the continuation part of the sequence's prompt, remembering how many of its last
tokens are scored; those must run in the prefill (their logits are the scores), so a shared prefix
stops before them; a request of no answer (max_new_tokens 0) ends after its prefill.
"""
from __future__ import annotations

from dataclasses import replace

from .types import Request


def folded(request: Request) -> tuple[Request, int]:
    """The request with its continuation as the end of its prompt, and how many tokens that is."""
    scored = len(request.continuation_ids or ())
    if not scored:
        return request, 0
    return replace(request, prompt_ids=request.prompt_ids + request.continuation_ids, continuation_ids=None), scored


def unfolded(request: Request, scored: int) -> Request:
    """`folded`'s request again: its last `scored` prompt tokens as its continuation."""
    if not scored:
        return request
    return replace(request, prompt_ids=request.prompt_ids[:-scored], continuation_ids=request.prompt_ids[-scored:])


def runnable_prefix(shared: int, prompt_len: int, scored: int) -> int:
    """Of `shared` prompt tokens another slot holds, those a sequence may copy: all but its scored
    tokens and the one before them (whose logits score the first)."""
    return max(min(shared, prompt_len - scored - 1), 0)
