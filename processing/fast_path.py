"""The pipeline's CPU-side encoder: one row (an image, or several, and a question) -> uint8 frames + token ids.

Frames stay uint8 (n_frames, 3, m, m) until they reach the model's device, where
`frames_to_pixel_values` turns them into the processor's float32 pixel values bit for bit: the
object store carries 4x fewer bytes. The ids are those of
`processor.apply_chat_template([one user turn: image(s), question], add_generation_prompt=True,
tokenize=True)`: the chat template, a single BOS, and each image's expansion.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .conversation import Conversation
from .decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, check_size, decode_image
from .errors import ImageDecodeError, PromptError
from .pixels import frames_to_pixel_values
from .processor import IMAGE, Idefics3Processor, _local_path, expand_image
from .tokenizer import LARGE_INTEGER, Tokenizer

# The marker that would add image tokens if a user typed it into a question. The block's other tags
# (<fake_token_around_image>, <global-img>, <row_i_col_j>) are text to the model as to the reference.
_IMAGE_MARKUP = re.compile(re.escape(IMAGE))
_PROBE_QUESTION = "Probe: what is in  the picture?\n\n Say it "


__all__ = ["EncodedRow", "PromptError", "RowEncoder", "payload_nbytes"]


@dataclass
class EncodedRow:
    input_ids: list[int]
    frames: np.ndarray | None  # uint8 (n_frames, 3, m, m); None for a text-only row
    rows: int = 0
    cols: int = 0

    @property
    def num_frames(self) -> int:
        return 0 if self.frames is None else int(self.frames.shape[0])

    @property
    def encoded_nbytes(self) -> int:
        """Bytes this row costs in transit: uint8 frames + int64 ids."""
        return (0 if self.frames is None else int(self.frames.nbytes)) + 8 * len(self.input_ids)

    @property
    def float32_nbytes(self) -> int:
        """What the same row would cost with float32 pixel_values (the reference's output) instead."""
        return (0 if self.frames is None else int(self.frames.size) * 4) + 8 * len(self.input_ids)


def payload_nbytes(num_frames: int, tile: int, channels: int = 3) -> dict[str, int]:
    """Pixel bytes per image: uint8 frames vs float32 pixel_values."""
    values = num_frames * channels * tile * tile
    return {"uint8": values, "float32": 4 * values}


class RowEncoder:
    """Encodes dataset rows for the GPU workers; raises InputError subclasses for bad rows."""

    def __init__(self, processor: Idefics3Processor, max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_length: int | None = None, system_prompt: str | None = None,
                 max_image_bytes: int | None = DEFAULT_MAX_BYTES):
        if system_prompt is not None:
            check_question(system_prompt, "the system prompt")
        self.system_prompt = system_prompt or None
        self.processor = processor
        self.image_processor = processor.image_processor
        self.tokenizer: Tokenizer = processor.tokenizer
        self.max_image_pixels, self.max_image_bytes = max_image_pixels, max_image_bytes
        self.max_length = max_length
        self._template = _resolve(processor)
        self._blocks: dict[tuple[int, int], list[int]] = {}
        self._splice = self._splice_is_exact()

    @classmethod
    def from_pretrained(cls, path: str | Path, image_backend: str = "pil",
                        max_image_pixels: int | None = DEFAULT_MAX_PIXELS, system_prompt: str | None = None,
                        max_image_bytes: int | None = DEFAULT_MAX_BYTES, **image_settings: Any) -> "RowEncoder":
        """`system_prompt`: a system turn before every row's user turn; `image_settings`: overrides
        of the image processor's config (Idefics3Processor.from_pretrained)."""
        path = _local_path(path)
        processor = Idefics3Processor.from_pretrained(path, image_backend=image_backend, **image_settings)
        return cls(processor, max_image_pixels=max_image_pixels, max_length=_context_length(path, processor),
                   system_prompt=system_prompt, max_image_bytes=max_image_bytes)

    @property
    def recipe(self) -> str:
        return self.image_processor.recipe

    # --- the row -------------------------------------------------------------------------------

    def encode(self, image: Any = None, question: str = "",
               tiles: tuple[np.ndarray, int, int] | None = None) -> EncodedRow:
        """bytes / PIL image / None + question -> EncodedRow (ids, uint8 frames, rows, cols).
        `tiles`: this image's `image_frames(image)`, when already made (another question about it)."""
        return self.encode_images([] if image is None else [image], question, None if tiles is None else [tiles])

    def encode_images(self, images: list, question: str = "",
                      tiles: list[tuple[np.ndarray, int, int]] | None = None) -> EncodedRow:
        """Several images (bytes / PIL) before the question in one user turn, as the processor's
        images=[[a, b, ...]]: each image's block in order, their frames concatenated (rows, cols: the
        first image's grid). `tiles`: the images' `image_frames`, when already made."""
        check_question(question)
        return self.encode_turns(question_turns(question, len(tiles) if tiles is not None else len(images)),
                                 images, tiles)

    def encode_conversation(self, images: list, conversation: Conversation,
                            tiles: list[tuple[np.ndarray, int, int]] | None = None) -> EncodedRow:
        """A conversation (processing.conversation) to answer, its image parts being `images` in order."""
        count = len(tiles) if tiles is not None else len(images)
        if conversation.num_images != count:
            raise PromptError(f"the conversation has {conversation.num_images} image parts for the row's {count} "
                              "images")
        return self.encode_turns(conversation.turns, images, tiles)

    def encode_turns(self, turns: list[dict], images: list,
                     tiles: list[tuple[np.ndarray, int, int]] | None = None) -> EncodedRow:
        """The turns' ids (after the system turn, if there is one and they have none), with the
        generation prompt, their image parts expanded for `images` in order."""
        tiles = tiles if tiles is not None else [self.image_frames(image) for image in images]
        ids = self.encode_prompt(self.render(turns), [(rows, cols) for _, rows, cols in tiles])
        if self.max_length is not None and len(ids) > self.max_length:
            raise PromptError(f"the prompt is {len(ids)} tokens (with the image), more than the model's context "
                              f"of {self.max_length}")
        if not tiles:
            return EncodedRow(ids, None)
        frames = tiles[0][0] if len(tiles) == 1 else np.concatenate([frames for frames, _, _ in tiles])
        return EncodedRow(ids, frames, tiles[0][1], tiles[0][2])

    def image_frames(self, image: Any) -> tuple[np.ndarray, int, int]:
        """Decode (bytes) or check (PIL) the image, then resize/tile it to uint8 frames."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = decode_image(image, max_pixels=self.max_image_pixels, max_bytes=self.max_image_bytes)
        elif type(image).__module__.startswith("PIL."):
            check_size(image.width, image.height, self.max_image_pixels)
        else:
            raise ImageDecodeError(f"image must be encoded bytes or a PIL image, got {type(image).__name__}")
        try:
            frames, rows, cols = self.image_processor.image_to_frames(image)
        except (OSError, ValueError) as e:  # e.g. a mode Pillow cannot convert to RGB
            raise ImageDecodeError(f"cannot convert the {image.mode} {image.width}x{image.height} image: {e}") from e
        return frames, int(rows), int(cols)

    def prompt(self, question: str, num_images: int) -> str:
        """The chat template over one user turn (num_images images, then the text) with the generation
        prompt, after the system turn if there is one."""
        return self.render(question_turns(question, num_images))

    def render(self, turns: list[dict]) -> str:
        """The chat template over `turns` with the generation prompt, after the system turn if there
        is one and they open with none."""
        if self.system_prompt and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}, *turns]
        return self.processor.apply_chat_template(turns, add_generation_prompt=True, chat_template=self._template)

    def encode_prompt(self, prompt: str, grids: list[tuple[int, int]]) -> list[int]:
        """Tokenize with a single BOS, the i-th image marker expanded for grids[i]; the images' block
        ids are spliced in from a cache when that is provably the same as tokenizing the expanded
        text (checked once at construction)."""
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and prompt.startswith(bos))
        if prompt.count(IMAGE) != len(grids):
            raise PromptError(f"the chat template produced {prompt.count(IMAGE)} {IMAGE} markers for "
                              f"{len(grids)} images")
        texts = prompt.split(IMAGE)
        if self._splice and not add_special and grids:
            ids = self.tokenizer.encode(texts[0], add_special_tokens=False)
            for grid, text in zip(grids, texts[1:]):
                ids += self.block_ids(*grid) + self.tokenizer.encode(text, add_special_tokens=False)
            return ids
        return self.tokenizer.encode(self.expand(prompt, grids), add_special_tokens=add_special)

    def expand(self, prompt: str, grids: list[tuple[int, int]]) -> str:
        """The prompt with its i-th image marker replaced by the text of grids[i]'s image block."""
        texts = prompt.split(IMAGE)
        return texts[0] + "".join(expand_image(*grid, self.processor.image_seq_len) + text
                                  for grid, text in zip(grids, texts[1:]))

    def block_ids(self, rows: int, cols: int) -> list[int]:
        if (rows, cols) not in self._blocks:
            text = expand_image(rows, cols, self.processor.image_seq_len)
            self._blocks[rows, cols] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._blocks[rows, cols]

    def _splice_is_exact(self) -> bool:
        # Added tokens split the text, so the ids around an image block do not depend on it for the
        # usual tokenizers; a normalizer or pre-tokenizer that looks at the whole string would break
        # that, and then we tokenize the full text instead.
        self._splice = True
        for grids in ([(0, 0)], [(2, 3)], [(1, 2), (0, 0)]):
            prompt = self.prompt(_PROBE_QUESTION, len(grids))
            full = self.expand(prompt, grids)
            bos = self.tokenizer.bos_token
            add_special = not (bos is not None and prompt.startswith(bos))
            if add_special or self.encode_prompt(prompt, grids) != self.tokenizer.encode(full, add_special_tokens=False):
                return False
        return True

    # --- on the model's device ------------------------------------------------------------------

    def pixel_values(self, frames: Any, device: Any = None):
        """uint8 frames -> float32 pixel values with this checkpoint's rescale/normalise settings."""
        ip = self.image_processor
        return frames_to_pixel_values(frames, recipe=self.recipe, rescale_factor=ip.rescale_factor,
                                      mean=ip.image_mean, std=ip.image_std, device=device,
                                      do_rescale=ip.do_rescale, do_normalize=ip.do_normalize)


def question_turns(question: str, num_images: int) -> list[dict]:
    """One user turn: the images, then the question."""
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}]}]


def check_question(question: Any, what: str = "the question") -> None:
    if not isinstance(question, str):
        raise PromptError(f"{what} must be a string, got {type(question).__name__}")
    found = _IMAGE_MARKUP.search(question)
    if found:
        raise PromptError(f"{what} contains the image marker {found.group()!r}; it would shift the image "
                          "tokens, so the row is refused")


def _resolve(processor: Idefics3Processor) -> str:
    from .chat_template import resolve_template
    return resolve_template(processor.chat_template)


def _context_length(path: Path, processor: Idefics3Processor) -> int | None:
    """The decoder's max_position_embeddings from config.json, else the tokenizer's model_max_length."""
    config_file = path / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        found = (config.get("text_config") or {}).get("max_position_embeddings")
        if found:
            return int(found)
    limit = processor.tokenizer.model_max_length
    return limit if limit <= LARGE_INTEGER else None
