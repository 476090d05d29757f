"""Tokenizer and processor files of the demo checkpoint (everything in the HF layout except weights).

A byte-level BPE trained with `tokenizers` on the demo questions and answers, carrying the Idefics3
special tokens; the Idefics3 chat template; processor/preprocessor configs with image splitting on;
a generation config whose stop ids include `<end_of_utterance>`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
FAKE, IMAGE, EOU, GLOBAL = "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"
IMAGE_TOKENS = [FAKE, IMAGE, EOU, GLOBAL] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

# Idefics3-8B's template (behaviour spec 2.4).
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Tile side m = 32 px; images are resized to longest edge 64 -> 2x2 tiles + one global frame.
TILE, LONGEST_EDGE = 32, 64


def chat_text(question: str, answer: str | None = None) -> str:
    """The template's rendering of one user turn [image, question] (and the answer, when given)."""
    prompt = f"{BOS}User:{IMAGE}{question}{EOU}\nAssistant:"
    return prompt if answer is None else f"{prompt} {answer}{EOU}\n"


def build_tokenizer(path: str | Path, corpus: Iterable[str], vocab_size: int = 512, *,
                    padding_side: str = "left", model_max_length: int = 1024) -> Path:
    """Train a byte-level BPE with the Idefics3 tokens on `corpus`; write tokenizer.json and
    tokenizer_config.json (also the test fixtures' tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.add_special_tokens(IMAGE_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "pad_token": PAD, "padding_side": padding_side, "model_max_length": model_max_length,
        "additional_special_tokens": [FAKE, IMAGE, EOU],
    }, indent=2) + "\n")
    return path


def write_processor_files(path: str | Path, image_seq_len: int) -> Path:
    """preprocessor_config.json, processor_config.json and chat_template.jinja."""
    path = Path(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Idefics3ImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"longest_edge": LONGEST_EDGE}, "resample": 1, "do_image_splitting": True,
        "max_image_size": {"longest_edge": TILE}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True,
    }, indent=2) + "\n")
    (path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Idefics3Processor", "image_seq_len": image_seq_len}, indent=2) + "\n")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def write_generation_config(path: str | Path, bos: int, eos: int, eou: int, pad: int) -> Path:
    file = Path(path) / "generation_config.json"
    file.write_text(json.dumps({"bos_token_id": bos, "eos_token_id": [eos, eou], "pad_token_id": pad,
                                "do_sample": False, "max_new_tokens": 48}, indent=2) + "\n")
    return file
