"""CPU stage: rows -> token ids + uint8 frames (compact in the object store), or an error row;
the rows about one image leave as one row that carries its frames once (pipeline.groups).

A callable class on a Ray Data actor pool: each actor loads the checkpoint's tokenizer and image
processor once. Every per-row failure (null or unreadable image, undecodable or oversized image,
`<image>` typed in a question, a prompt longer than the context) becomes `error` on that row; the
row still flows on so that it is written with finish_reason="error".
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from processing.conversation import Conversation, read_conversation
from processing.errors import PromptError
from processing.options import option_list, with_option_list

from .checkpoint import local_checkpoint
from .config import PipelineConfig
from .faults import crash_always_on
from .fetch import ImageFetcher
from .groups import group_by_image
from .ledger import CrashLedger, ledger_path
from .rows import KEPT, ROW_CHOICES, ROW_SCORED, ROW_SETTINGS, RowError, error_message, reuse_recent, row_ids

ENCODED_FIELDS = [("question", pa.string()), ("input_ids", pa.list_(pa.int32())), ("frames", pa.large_binary()),
                  ("frames_shape", pa.list_(pa.int32())), ("image_key", pa.string()), ("error", pa.string())]


def row_encoder(config: PipelineConfig, folder: str, image_backend: str | None = None):
    """processing.RowEncoder of the checkpoint's processor files in `folder`, with the job's settings."""
    from processing import RowEncoder

    limits = ("max_image_pixels", "max_image_bytes")
    kwargs = {name: getattr(config, name) for name in limits if getattr(config, name) is not None}
    return RowEncoder.from_pretrained(folder, image_backend=image_backend or config.image_backend, **kwargs,
                                      system_prompt=config.system_prompt, **config.image_settings())


def conversation(messages, suffix: str):
    """The row's conversation (processing.read_conversation), or the RowError of why it is none."""
    try:
        return read_conversation(messages, suffix)
    except PromptError as e:
        return RowError(str(e))
    except Exception as e:      # whatever a cell holds, the row's error, never the batch's
        return RowError(f"{type(e).__name__}: {e}")


def with_options(question: str, hint, options: dict) -> str:
    """A multiple-choice question as lmms-eval asks MMBench's: the hint (if any), the question and its
    options, a line each after "There are several options:" (null, empty and "nan" options left out)."""
    shown = lambda value: value is not None and value == value and str(value) not in ("", "nan")  # noqa: E731
    listed = "\n".join(["There are several options:", *(f"{k}. {v}" for k, v in sorted(options.items()) if shown(v))])
    return f"{hint} {question} {listed}" if shown(hint) else f"{question} {listed}"


@dataclass(frozen=True)
class Asked:
    """A question made whole with its suffix: a row of listed options (an open question's suffix is another)."""
    text: str


def with_listed_options(question: str, cell, suffix: str, open_suffix: str) -> Asked | RowError:
    """A question as lmms-eval asks MMMU's: its options (if any) after it, a line each, then the suffix."""
    try:
        options = option_list(cell)
    except PromptError as e:
        return RowError(str(e))
    return Asked(with_option_list(question, options) + suffix if options else question + open_suffix)


def named_cells(columns: list[str], cells: tuple, text: Asked | str | None) -> tuple:
    """The cells of the columns image_N whose `<image N>` the row's text names (lmms-eval's MMMU images,
    in the columns' order); all of them where it names none that holds an image."""
    text = text.text if isinstance(text, Asked) else text
    named = {f"image_{n}" for n in re.findall(r"<image (\d+)>", text)} if isinstance(text, str) else set()
    kept = tuple(cell for column, cell in zip(columns, cells) if column in named)
    return kept if present_images(kept) != [None] else cells


def present_images(cells: tuple) -> list:
    """A row's images of several columns: the cells holding one (a list: each of its images)."""
    found = []
    for cell in cells:
        if isinstance(cell, dict) and cell.get("bytes") is None and cell.get("path") is None:
            continue        # an HF datasets image struct of nothing
        if cell is not None:
            found.extend(cell if isinstance(cell, list) else [cell])
    return found or [None]


def which(index: int, count: int) -> str:
    """Which image of a row's several an error is about (after its cause: the error's kind stays one)."""
    return f" (image {index + 1} of {count})" if count > 1 else ""


def fill(template: str, values: dict) -> str | RowError:
    try:
        return template.format_map(values)
    except (ValueError, TypeError, OverflowError, KeyError, IndexError, AttributeError) as e:
        return RowError(f"the row's values do not fit the template: {type(e).__name__}: {e}")


class Preprocess:
    def __init__(self, config: PipelineConfig, folder: str | None = None):
        """folder: the checkpoint's processor files (default: this node's copy of the checkpoint)."""
        self.encoder = row_encoder(config, folder or local_checkpoint(config.model, config.storage_options))
        self.config = config
        self.fetcher = ImageFetcher(config.storage_options, root=config.image_root, threads=config.fetch_threads,
                                    attempts=config.fetch_attempts, timeout_s=config.fetch_timeout_s,
                                    max_bytes=config.max_image_bytes)
        self.recent: OrderedDict[str, tuple] = OrderedDict()    # image key -> its frames, rows, cols (made once)
        self.ledger = CrashLedger(ledger_path("preprocess"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        questions = self.questions(batch)
        images = self.images(batch, questions)
        ids = row_ids(batch, self.config.id_column)
        encoded = self.encode_rows([str(i) for i in ids.to_pylist()], images, questions)
        if self.config.score_column in batch.column_names:      # here, not in the model stage: a dry run sees it
            unscored = error_message("score column", RowError("the row has no text to score"))
            texts = self.cells(batch, self.config.score_column)
            encoded = [self.failed_row(q, unscored) if not text and row[-1] is None else row
                       for row, q, text in zip(encoded, questions, texts)]
        columns = {"id": ids}
        for i, (name, type_) in enumerate(ENCODED_FIELDS):
            columns[name] = pa.array([row[i] for row in encoded], type=type_)
        if self.config.choices_column in batch.column_names:
            columns[ROW_CHOICES] = batch.column(self.config.choices_column)
        if self.config.score_column in batch.column_names:
            columns[ROW_SCORED] = batch.column(self.config.score_column)
        if self.config.sampling_column in batch.column_names:
            columns[ROW_SETTINGS] = batch.column(self.config.sampling_column)
        for name in self.config.keep_columns:
            columns[KEPT + name] = batch.column(name)
        return group_by_image(pa.table(columns))

    def questions(self, batch: pa.Table) -> list:
        """Each row's question: its question column's, or the template filled with its columns (None,
        so the job's prompt, where one of them is null; a RowError where a value does not fit the
        template's format, such as 2**21 for {count:c}), or its conversation (a Conversation, or a
        RowError where its messages are not one; None where null)."""
        if self.config.messages_column is not None:
            return [None if m is None else conversation(m, self.config.prompt_suffix)
                    for m in self.cells(batch, self.config.messages_column)]
        return [self.cleaned(q) if isinstance(q, str) else q for q in self._questions(batch)]

    def cleaned(self, question: str) -> str:
        if self.config.question_removals:
            question = question.strip()
            for text in self.config.question_removals:
                question = question.replace(text, "")
        return question.capitalize() if self.config.capitalize_questions else question

    def images(self, batch: pa.Table, questions: list) -> list[list]:
        """Each row's images: its image column's cell (a list: several), or those of its image columns
        (those its question names, with images_named_in_text)."""
        columns = self.config.image_columns
        if not columns:
            return [cell if isinstance(cell, list) else [cell] for cell in self.cells(batch, self.config.image_column)]
        rows = zip(*(self.cells(batch, c) for c in columns))
        if self.config.images_named_in_text:
            rows = (named_cells(columns, cells, question) for cells, question in zip(rows, questions))
        return [present_images(cells) for cells in rows]

    def _questions(self, batch: pa.Table) -> list:
        template, listed = self.config.prompt_template, self.config.option_list_column
        if listed is not None:
            suffix = self.config.prompt_suffix
            open_suffix = suffix if self.config.open_question_suffix is None else self.config.open_question_suffix
            return [with_listed_options(self.config.prompt if q is None else q, cell, suffix, open_suffix)
                    for q, cell in zip(self.cells(batch, self.config.question_column), self.cells(batch, listed))]
        if template is None and self.config.option_columns:
            hints = self.cells(batch, self.config.hint_column) if self.config.hint_column else [None] * batch.num_rows
            options = zip(*(self.cells(batch, name) for name in self.config.option_columns))
            return [with_options(self.config.prompt if q is None else q, hint, dict(zip(self.config.option_columns, o)))
                    for q, hint, o in zip(self.cells(batch, self.config.question_column), hints, options)]
        if template is None:
            return self.cells(batch, self.config.question_column)
        names = self.config.template_columns()
        return [None if None in values else fill(template, dict(zip(names, values)))
                for values in zip(*(self.cells(batch, name) for name in names))]

    @staticmethod
    def cells(batch: pa.Table, column: str) -> list:
        return batch.column(column).to_pylist() if column in batch.column_names else [None] * batch.num_rows

    def encode_rows(self, names: list[str], images: list, questions: list) -> list[tuple]:
        """encode_row for each row, with the rows in flight on the ledger: rows that were in flight
        when an earlier process of this actor died run one at a time after the others, and those
        that died with it alone too often fail."""
        ledger, out = self.ledger, [None] * len(names)
        ordinary = [k for k, name in enumerate(names) if not ledger.suspect(name)]
        with ledger.working([names[k] for k in ordinary]):
            images = self.fetch(images)
            for k in ordinary:
                crash_always_on("preprocess", [names[k]])
                out[k] = self.encode_row(images[k], questions[k])
        for k in [k for k, row in enumerate(out) if row is None]:
            if ledger.condemned(names[k]):
                out[k] = self.failed_row(questions[k], error_message("preprocess", RowError(ledger.verdict(names[k]))))
                continue
            with ledger.working([names[k]], alone=True):
                crash_always_on("preprocess", [names[k]])
                out[k] = self.encode_row(images[k], questions[k])
        return out

    def fetch(self, images: list[list]) -> list[list[bytes | RowError]]:
        """Each row's images' bytes (or why there are none), all of the batch's files read at once; a
        row naming more images than the context holds is not read."""
        refused = [self.too_many(row) for row in images]
        flat = iter(self.fetcher.fetch([image for row, no in zip(images, refused) if no is None for image in row]))
        return [[no] if no is not None else [next(flat) for _ in row] for row, no in zip(images, refused)]

    def too_many(self, images: list) -> RowError | None:
        """Each image takes at least image_seq_len tokens of the context."""
        limit = self.encoder.max_length
        most = limit // self.encoder.processor.image_seq_len if limit else len(images)
        if len(images) > most:
            return RowError(f"more images than the model's context holds (the row has {len(images)}; its "
                            f"{limit} tokens hold at most {most})")     # one kind of error, whatever the counts
        return None

    def encode_row(self, data: list[bytes | RowError], question: str | RowError | None) -> tuple:
        """(question, input_ids, frames bytes, frames shape, image key, error) for one row of one
        image or several; never raises. The key is a hash of the image files: the engine encodes
        rows of one image once."""
        if isinstance(question, RowError):
            stage = ("messages" if self.config.messages_column is not None else
                     "options" if self.config.option_list_column is not None else "prompt template")
            return self.failed_row(question, error_message(stage, question))
        if not data:
            return self.failed_row(question, error_message("read image", RowError("image list is empty")))
        failed = next((k for k, d in enumerate(data) if isinstance(d, RowError)), None)
        if failed is not None:
            return self.failed_row(question, error_message("read image", data[failed]) + which(failed, len(data)))
        text = self.user_text(question)
        hashes = [hashlib.blake2b(d, digest_size=16).hexdigest() for d in data]
        key = hashes[0] if len(hashes) == 1 else hashlib.blake2b("".join(hashes).encode(), digest_size=16).hexdigest()
        tiles = []
        for k, (h, d) in enumerate(zip(hashes, data)):
            try:
                tiles.append(reuse_recent(self.recent, h, lambda d=d: self.encoder.image_frames(d)))
            except Exception as e:      # this row's, the batch goes on
                return self.failed_row(question, error_message("preprocess", e) + which(k, len(data)))
        try:
            if isinstance(question, Conversation):
                row = self.encoder.encode_conversation(data, question, tiles=tiles)
            else:
                row = self.encoder.encode_images(data, text, tiles=tiles)
            self.check_context(len(row.input_ids))
        except Exception as e:  # any failure is this row's, the batch goes on
            return self.failed_row(question, error_message("preprocess", e))
        frames = np.ascontiguousarray(row.frames, dtype=np.uint8)
        return text, row.input_ids, frames.tobytes(), list(frames.shape), key, None

    def user_text(self, question) -> str:
        """The row's question (else the job's prompt) with the job's suffix, or the text of its
        conversation's turn answered (the suffix in it): what the model is asked."""
        if isinstance(question, Conversation):
            return question.question
        if isinstance(question, Asked):
            return question.text
        return (self.config.prompt if question is None else question) + self.config.prompt_suffix

    def failed_row(self, question, message: str) -> tuple:
        if isinstance(question, RowError):          # no question could be made of the row
            return self.config.prompt_template, None, None, None, None, message
        return self.user_text(question), None, None, None, None, message

    def check_context(self, num_prompt_tokens: int) -> None:
        """A prompt must leave room for an answer; an answer longer than the room is cut ("length")."""
        limit = self.encoder.max_length
        if limit is not None and num_prompt_tokens >= limit:
            raise PromptError(f"the prompt is {num_prompt_tokens} tokens, which fills the model's context of {limit}: "
                              f"no room for an answer")     # as the encoder's past the context: one kind of error
