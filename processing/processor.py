"""Idefics3Processor: images + prompts -> model inputs (reference section 2).

Each `<image>` of a prompt becomes the expansion of its image (tiles with row/col tags, then the
global image), the text is tokenized with the checkpoint's tokenizer, and the image tensors come
from the image processor. Truncation may never cut an image block: that raises instead.
"""
from __future__ import annotations

import importlib
import json
import logging
from itertools import accumulate
from pathlib import Path
from typing import Any, Sequence

from .chat_template import Template, images_of, load_chat_template, normalize_conversations, render_chat, \
    resolve_template
from .errors import PromptError
from .tokenizer import BatchEncoding, Tokenizer, to_tensors

logger = logging.getLogger(__name__)

FAKE = "<fake_token_around_image>"
IMAGE = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"
GLOBAL = "<global-img>"

IMAGE_KWARGS = frozenset({
    "do_convert_rgb", "do_resize", "size", "resample", "do_image_splitting", "max_image_size", "do_rescale",
    "rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad", "input_data_format", "data_format",
    "device", "disable_grouping"})
TEXT_KWARGS = frozenset({
    "add_special_tokens", "padding", "truncation", "max_length", "pad_to_multiple_of", "padding_side",
    "return_attention_mask"})
IGNORED_KWARGS = frozenset({"return_row_col_info", "verbose"})   # rows/cols: always asked for, then dropped
# apply_chat_template options of the reference this processor does not follow: refused by name when set, not
# rendered as template variables (sanitize_control_tokens would be silently off)
UNSUPPORTED_CHAT_KWARGS = frozenset({"sanitize_control_tokens", "return_assistant_tokens_mask"})
UNSUPPORTED_KWARGS = frozenset({  # the reference's outputs this processor does not make: refused by name
    "return_mm_token_type_ids", "return_text_replacement_offsets", "return_token_type_ids", "return_length",
    "return_overflowing_tokens", "return_offsets_mapping", "return_special_tokens_mask", "stride",
    "is_split_into_words"})


def expand_image(rows: int, cols: int, image_seq_len: int) -> str:
    """The text that replaces one `<image>`: row-major tiles (no closing FAKE per tile, "\\n" after
    each row) and then the global image wrapped in FAKE; an unsplit image is only the global block."""
    tokens = IMAGE * image_seq_len
    global_block = f"{FAKE}{GLOBAL}{tokens}{FAKE}"
    if rows == 0 and cols == 0:
        return global_block
    grid = "".join(
        "".join(f"{FAKE}<row_{r}_col_{c}>{tokens}" for c in range(1, cols + 1)) + "\n" for r in range(1, rows + 1))
    return f"{grid}\n{global_block}"


def is_image(obj: Any) -> bool:
    """What counts as one image when nesting inputs (path strings are loaded by the image processor)."""
    if isinstance(obj, str):
        return True
    module = type(obj).__module__
    return module.startswith("PIL.") or (hasattr(obj, "shape") and hasattr(obj, "dtype"))


def nest_images(images: Any, text: list[str] | None) -> list[list[Any]]:
    """One image -> [[img]]; a flat list is spread over the prompts by their `<image>` counts
    (surplus images form an extra group that fails validation); nested lists are used as is."""
    if is_image(images):
        return [[images]]
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"images must be an image, a list of images or a list of lists of images, got {images!r:.80}")
    if not is_image(images[0]):
        return [list(group) for group in images]
    if text is None:
        return [list(images)]
    ends = [0] + list(accumulate(t.count(IMAGE) for t in text))
    groups = [list(images[a:b]) for a, b in zip(ends, ends[1:])]
    return groups + [list(images[ends[-1]:])] if len(images) > ends[-1] else groups


def validate(images: list[list[Any]] | None, text: list[str] | None) -> None:
    """The reference's checks, with its messages (PromptError is a ValueError)."""
    if text is not None:
        counts = [t.count(IMAGE) for t in text]
        if images is None and any(counts):
            raise PromptError(f"Found {sum(counts)} {IMAGE} tokens in the text but no images were passed.")
        if images is not None:
            n_images = [len(group) for group in images]
            if sum(counts) != sum(n_images):
                raise PromptError(
                    f"The total number of {IMAGE} tokens in the prompts should be the same as the number of images "
                    f"passed. Found total {sum(counts)} {IMAGE} tokens and {sum(n_images)} images.")
            if counts != n_images:
                raise PromptError(
                    f"The number of {IMAGE} tokens in each prompt should be the same as the number of images passed."
                    f" Found {counts} {IMAGE} tokens and {n_images} images per sample.")
    if images is not None and not any(images):
        raise ValueError("images holds no image at all (every sample's list is empty)")
    if images is not None and any(getattr(im, "ndim", 3) == 4 for group in images for im in group):
        # The reference counts a 4-D array as one image and then fails; say why instead.
        raise ValueError("a 4-D array/tensor is not one image: pass a list of (H, W, C) or (C, H, W) images")


def split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """Route call kwargs to the image processor or the tokenizer; unknown names are an error, and so are
    the reference's extra outputs (mm_token_type_ids, offsets, ...) when asked for."""
    image_kwargs, text_kwargs = dict(kwargs.pop("images_kwargs", {})), dict(kwargs.pop("text_kwargs", {}))
    for key, value in kwargs.items():
        if key in IMAGE_KWARGS:
            image_kwargs[key] = value
        elif key in TEXT_KWARGS:
            text_kwargs[key] = value
        elif key in UNSUPPORTED_KWARGS and value:
            raise TypeError(f"Idefics3Processor does not implement {key}={value!r} (transformers' processor does)")
        elif key not in IGNORED_KWARGS and key not in UNSUPPORTED_KWARGS:
            raise TypeError(f"Idefics3Processor got an unexpected keyword argument {key!r}")
    return image_kwargs, text_kwargs


def check_chat_options(continue_final_message: Any, kwargs: dict) -> None:
    for name in sorted(UNSUPPORTED_CHAT_KWARGS):
        if kwargs.get(name):
            raise TypeError(f"apply_chat_template does not implement {name}={kwargs[name]!r} (transformers' does)")
    if not isinstance(continue_final_message, bool):
        raise TypeError(f"continue_final_message={continue_final_message!r}: True continues the last message's "
                        "content; naming another field (transformers 5) is not implemented")


# from_pretrained's settings of the processor itself, as the reference's (not the image processor's)
PROCESSOR_SETTINGS = {"image_seq_len", "padding_side", "chat_template"}
IGNORED_SETTINGS = {"use_fast", "trust_remote_code"}     # one implementation here, no remote code


class Idefics3Processor:
    """Image processor + tokenizer + chat template, as in the reference."""

    def __init__(self, image_processor: Any, tokenizer: Tokenizer, image_seq_len: int = 169,
                 chat_template: Template | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_seq_len = int(image_seq_len)
        self.chat_template = chat_template
        self.image_token, self.fake_image_token, self.global_image_tag = IMAGE, FAKE, GLOBAL
        self.end_of_utterance_token = END_OF_UTTERANCE
        # No-op for checkpoints that already have them; otherwise appended to the vocabulary.
        tokenizer.add_special_tokens({"additional_special_tokens": [FAKE, IMAGE, END_OF_UTTERANCE]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self.fake_image_token_id = tokenizer.convert_tokens_to_ids(FAKE)
        self.global_image_token_id = tokenizer.convert_tokens_to_ids(GLOBAL)
        self.end_of_utterance_token_id = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)

    @classmethod
    def from_pretrained(cls, path: str | Path, image_backend: str = "pil",
                        **image_settings: Any) -> "Idefics3Processor":
        """Load tokenizer, image processor ("pil": the Pillow recipe checkpoints were trained with;
        "torch": the torch recipe), image_seq_len and chat template from a local HF-layout folder.
        `image_settings` override the image processor's config, as the reference's kwargs do
        (`size={"longest_edge": 2 * 364}`: fewer tiles; `do_image_splitting=False`: one frame). A hub
        id's files come through huggingface_hub (revision=, cache_dir=, token= as the model's loader takes)."""
        classes = {"pil": "Idefics3ImageProcessorPil", "torch": "Idefics3ImageProcessor"}
        if image_backend not in classes:
            raise ValueError(f"image_backend must be 'pil' or 'torch', got {image_backend!r}")
        path = _local_path(path, **{k: image_settings.pop(k) for k in HUB_ARGUMENTS & image_settings.keys()})
        own = {k: image_settings.pop(k) for k in PROCESSOR_SETTINGS & image_settings.keys()}
        for name in IGNORED_SETTINGS & image_settings.keys():       # transformers' that change nothing here
            image_settings.pop(name)
        ip = importlib.import_module(".image_processor", __package__)
        unknown = sorted(set(image_settings) - set(ip.DEFAULTS))
        if unknown:
            raise TypeError(f"unknown image-processor settings {unknown}; known: {sorted(ip.DEFAULTS)}")
        image_processor = getattr(ip, classes[image_backend]).from_pretrained(path, **image_settings)
        tokenizer = Tokenizer.from_pretrained(path)
        if own.get("padding_side") is not None:
            if own["padding_side"] not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {own['padding_side']!r}")
            tokenizer.padding_side = own["padding_side"]
        seq_len = own.get("image_seq_len")
        return cls(image_processor, tokenizer, image_seq_len=read_image_seq_len(path) if seq_len is None else seq_len,
                   chat_template=own.get("chat_template") or load_chat_template(path))

    def save_pretrained(self, path: str | Path) -> Path:
        """The files from_pretrained reads (transformers' too): the tokenizer's, the image processor's,
        processor_config.json (image_seq_len) and the chat template (chat_template.jinja; named
        templates in chat_templates/)."""
        path = Path(path)
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (path / "processor_config.json").write_text(json.dumps(
            {"image_seq_len": self.image_seq_len, "processor_class": "Idefics3Processor"}, indent=2) + "\n")
        templates = self.chat_template if isinstance(self.chat_template, dict) else {"default": self.chat_template}
        if (path / "chat_template.json").is_file():     # an older save's, read before the .jinja: it would win
            (path / "chat_template.json").unlink()
        for name, source in templates.items():
            if source is None:
                continue
            file = path / "chat_template.jinja" if name == "default" else path / "chat_templates" / f"{name}.jinja"
            file.parent.mkdir(exist_ok=True)
            file.write_text(source, encoding="utf-8")
        return path

    # --- __call__ ------------------------------------------------------------------------------

    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None, image_seq_len: int | None = None,
                 return_tensors: str | None = None, **kwargs: Any) -> BatchEncoding:
        if image_seq_len is not None and image_seq_len != self.image_seq_len:
            # The reference ignores it too: the model's feature count is fixed by its config.
            logger.warning("image_seq_len=%s is ignored; the processor uses %s", image_seq_len, self.image_seq_len)
        if images is None and text is None:
            raise ValueError("You need to provide at least one input to call Idefics3Processor")
        text = _as_text_list(text)
        images = None if images is None else nest_images(images, text)
        validate(images, text)
        image_kwargs, text_kwargs = split_kwargs(kwargs)
        return_tensors = text_kwargs.pop("return_tensors", return_tensors)    # the reference reads it there first
        out: dict[str, Any] = {}
        if images is not None:
            pixels = dict(self.image_processor(images, return_row_col_info=True, return_tensors=return_tensors,
                                               **image_kwargs))
            rows, cols = pixels.pop("rows"), pixels.pop("cols")
            if text is not None:
                text = self.expand_prompts(text, rows, cols)
            out.update(pixels)
        if text is not None:
            encoded = self.tokenizer(text, **text_kwargs)
            if images is not None:
                self._check_image_blocks(text, encoded["input_ids"], text_kwargs)
            out = {**to_tensors(dict(encoded), return_tensors), **out}
        return BatchEncoding(out)

    def expand_prompts(self, text: list[str], rows: list[list[int]], cols: list[list[int]]) -> list[str]:
        """Replace each `<image>`, in order over the batch, by the expansion of the next image."""
        grids = iter([(r, c) for rs, cs in zip(rows, cols) for r, c in zip(rs, cs)])
        expanded = []
        for prompt in text:
            pieces = prompt.split(IMAGE)
            blocks = [expand_image(int(r), int(c), self.image_seq_len) for r, c in
                      (next(grids) for _ in pieces[1:])]
            expanded.append(pieces[0] + "".join(b + p for b, p in zip(blocks, pieces[1:])))
        return expanded

    def _check_image_blocks(self, text: list[str], input_ids: list[list[int]], text_kwargs: dict) -> None:
        """Every image block starts and ends with FAKE, so a cut block loses FAKE or IMAGE ids."""
        for i, (prompt, ids) in enumerate(zip(text, input_ids)):
            want = (prompt.count(FAKE), prompt.count(IMAGE))
            got = (ids.count(self.fake_image_token_id), ids.count(self.image_token_id))
            if want != got:
                raise PromptError(
                    f"prompt {i}: tokenization would cut through an image block (max_length="
                    f"{text_kwargs.get('max_length')}, truncation={text_kwargs.get('truncation')}): expected "
                    f"{want[1]} {IMAGE} and {want[0]} {FAKE} tokens, got {got[1]} and {got[0]}. "
                    "Raise max_length, or truncate only the text outside the images.")

    # --- chat template -----------------------------------------------------------------------

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = False, return_dict: bool = False, return_tensors: str | None = None,
                            processor_kwargs: dict | None = None, **kwargs: Any) -> Any:
        """Render the conversation(s); with tokenize=True also run the processor on the result,
        without the tokenizer's own BOS when the rendered prompt already starts with it."""
        template = resolve_template(self.chat_template, chat_template)
        conversations, batched = normalize_conversations(conversation)
        check_chat_options(continue_final_message, kwargs)
        processor_kwargs = dict(processor_kwargs or {})
        if "images" in kwargs:
            processor_kwargs.setdefault("images", kwargs.pop("images"))
        return_tensors = processor_kwargs.pop("return_tensors", return_tensors)
        processor_kwargs.update({k: kwargs.pop(k) for k in list(kwargs) if k in IMAGE_KWARGS | TEXT_KWARGS})
        variables = {**self.tokenizer.special_tokens_map, **kwargs}
        prompts = [render_chat(template, conv, add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, **variables) for conv in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        bos = self.tokenizer.bos_token
        if bos is not None and prompts[0].startswith(bos):
            processor_kwargs["add_special_tokens"] = False
        batch_images = [images_of(conv) for conv in conversations]
        images = processor_kwargs.pop("images", batch_images if any(batch_images) else None)   # given ones win
        out = self(text=prompts, images=images, return_tensors=return_tensors, **processor_kwargs)
        return out if return_dict else out["input_ids"]

    # --- decoding ------------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        return self.tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)


def _as_text_list(text: Any) -> list[str] | None:
    if text is None:
        return None
    text = [text] if isinstance(text, str) else text
    if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
        raise ValueError("`text` must be a string or list of strings.")
    return list(text)


PROCESSOR_FILES = ["*.json", "*.jinja", "*.txt", "*.model"]     # all a processor reads: never a weight file
HUB_ARGUMENTS = frozenset({"revision", "cache_dir", "token", "local_files_only", "force_download"})


def _local_path(path: str | Path, **hub_kwargs: Any) -> Path:
    path = Path(path)
    if path.is_dir():
        return path
    try:  # a hub id: resolved through the local cache / huggingface_hub (offline in tests)
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(path), allow_patterns=PROCESSOR_FILES, **hub_kwargs))
    except Exception as e:
        raise FileNotFoundError(f"{path} is not a checkpoint folder and could not be fetched: {e}") from e


def read_image_seq_len(path: Path) -> int:
    """image_seq_len from processor_config.json (default 169, the Idefics3-8B value)."""
    config = path / "processor_config.json"
    if config.is_file():
        return int(json.loads(config.read_text(encoding="utf-8")).get("image_seq_len", 169))
    return 169
