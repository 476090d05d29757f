"""What the engine refuses before any work starts: each ValueError names the request and the cause."""
from __future__ import annotations

from .bad_words import check_bad_words
from .biases import check_in_vocabulary
from .types import Request


def check_request(request: Request, config, has_tokenizer: bool) -> None:
    """`config`: the model's Idefics3Config."""
    continuation = request.continuation_ids or []
    rid, n = request.request_id, len(request.prompt_ids) + len(continuation)
    if not request.prompt_ids:
        raise ValueError(f"request {rid!r}: empty prompt")
    if request.sampling.max_new_tokens == 0 and not continuation:
        raise ValueError(f"request {rid!r}: max_new_tokens 0 answers nothing: give continuation_ids to score")
    text = config.text_config
    ids = request.prompt_ids + continuation
    outside = [t for t in (min(ids), max(ids)) if not 0 <= t < text.vocab_size]
    if outside:     # on CUDA the embedding's lookup would be a device-side assert: the replica lost
        raise ValueError(f"request {rid!r}: token id {outside[0]} is outside the model's vocabulary of "
                         f"{text.vocab_size} (is the tokenizer the checkpoint's?)")
    if request.sampling.stop and not has_tokenizer:
        raise ValueError(f"request {rid!r}: stop strings need the engine's tokenizer")
    if request.sampling.constrained and not has_tokenizer:
        raise ValueError(f"request {rid!r}: choices, regex or json_schema need the engine's tokenizer")
    if n >= text.max_position_embeddings + (request.sampling.max_new_tokens == 0):   # an answer is cut there
        if request.sampling.max_new_tokens == 0:        # a scored text asks for no answer
            raise ValueError(f"request {rid!r}: the prompt and its scored text ({n} tokens) pass the model's "
                             f"context of {text.max_position_embeddings} positions")
        raise ValueError(f"request {rid!r}: the prompt ({n} tokens) fills the model's context of "
                         f"{text.max_position_embeddings} positions, leaving no room for an answer")
    if request.pixel_values is not None:
        check_pixels(request, config)
    check_image_tokens(request, config.image_token_id)


def check_image_tokens(request: Request, image_token_id: int) -> None:
    """Image tokens only where pixel values give their features: alone, a text-only prompt's image
    tokens are read as text, but a batch beside images counts them among its features and fails."""
    rid = request.request_id
    if request.pixel_values is None and image_token_id in request.prompt_ids:
        raise ValueError(f"request {rid!r}: image tokens in the prompt but no pixel_values")
    if image_token_id in (request.continuation_ids or ()):
        raise ValueError(f"request {rid!r}: image tokens in continuation_ids: an image belongs to the prompt")


def check_search(request: Request, stop_ids, max_batch_size: int, vocab: int) -> None:
    """Beams the engine can hold, bad words, biased and suppressed tokens of the vocabulary."""
    rid, p = request.request_id, request.sampling
    if p.num_beams > max_batch_size:
        raise ValueError(f"request {rid!r}: num_beams={p.num_beams} takes as many slots, and the engine has "
                         f"max_batch_size={max_batch_size}")
    if p.num_beams > 1 and max(2, 1 + len(stop_ids)) * p.num_beams > vocab:
        raise ValueError(f"request {rid!r}: num_beams={p.num_beams} keeps more candidates a step than the "
                         f"vocabulary's {vocab} tokens")
    try:
        if p.bad_words_ids:
            check_bad_words(p.bad_words_ids, vocab)
        check_in_vocabulary(vocab, p.sequence_bias, suppress_tokens=p.suppress_tokens,
                            begin_suppress_tokens=p.begin_suppress_tokens)
    except ValueError as e:
        raise ValueError(f"request {rid!r}: {e}") from None


def check_pixels(request: Request, config) -> None:
    """Frames of the right rank, none all zeros (padding), as many image features as image tokens."""
    rid, pv = request.request_id, request.pixel_values
    if pv.dim() != 4:
        raise ValueError(f"request {rid!r}: pixel_values must be (n_frames, 3, H, W), got {tuple(pv.shape)}")
    if bool((pv.flatten(1) == 0).all(1).any()):
        raise ValueError(f"request {rid!r}: a frame of pixel_values is all zeros (read as padding)")
    p, s = config.vision_config.patch_size, config.scale_factor
    per_frame = (pv.shape[-2] // p) * (pv.shape[-1] // p) // (s * s)
    n_image = sum(1 for t in request.prompt_ids if t == config.image_token_id)
    if n_image != pv.shape[0] * per_frame:
        raise ValueError(f"request {rid!r}: {n_image} image tokens in the prompt but {pv.shape[0]} frames "
                         f"x {per_frame} features")
