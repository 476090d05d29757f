"""PipelineConfig: everything the Ray Data graph needs, in the style of `ray.data.llm`'s processor configs."""
from __future__ import annotations

import json
import math
import numbers
import string
from dataclasses import asdict, dataclass, field, fields

DEFAULT_PROMPT = "Describe this image."
DTYPES = ("bfloat16", "float16", "float32")
# What a row's own settings (`sampling_column`) may set, and the Arrow types a column of them may hold
SETTABLE = {"max_new_tokens": "integer", "min_new_tokens": "integer", "temperature": "number", "top_p": "number",
            "top_k": "integer",
            "min_p": "number", "typical_p": "number", "epsilon_cutoff": "number", "eta_cutoff": "number",
            "repetition_penalty": "number", "presence_penalty": "number", "frequency_penalty": "number",
            "no_repeat_ngram_size": "integer", "seed": "integer", "stop": "texts",
            "choices": "texts", "regex": "text", "json_schema": "text", "num_beams": "integer",
            "length_penalty": "number", "bad_words": "texts"}
# Decoding settings of token ids, as a generation config gives them (a run's, not a row's)
TOKEN_SETTINGS = ("bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "min_length")
OUTPUT_COLUMNS = ("id", "question", "answer", "finish_reason", "error", "num_prompt_tokens", "num_generated_tokens",
                  "answer_logprob", "answer_json", "choice_logprobs", "samples", "samples_finish_reason",
                  "samples_num_generated_tokens", "samples_logprob", "samples_json", "token_logprobs")


def kept_name(column: str) -> str:
    """The output's name of a kept input column: its own, or input_<name> where the output has a
    column of that name (a dataset's `answer` or `question`, kept beside the run's)."""
    return f"input_{column}" if column in OUTPUT_COLUMNS else column


@dataclass
class PipelineConfig:
    model: str                                  # HF-layout checkpoint folder (or hub id)
    adapter: str | None = None                  # a PEFT LoRA adapter folder (or its URL) of `model`, merged
    prompt: str = DEFAULT_PROMPT                # the user turn when a row has no question
    system_prompt: str | None = None            # a system turn before every row's user turn
    prompt_template: str | None = None          # every row's question made of its columns: "{title}: describe it."
                                                # (a row with a null in one of them: `prompt`)
    prompt_suffix: str = ""                     # appended to every row's question (or prompt): an answer
                                                # format, e.g. a benchmark's "Answer with one word."
    id_column: str = "id"                       # the input column of row ids (absent "id": Ray Data's row hash)
    image_column: str = "image"                 # the input column of each row's image(s)
    image_columns: list[str] = field(default_factory=list)    # instead of image_column: columns of an image
                                                # each (MMMU's image_1 ... image_7): a row's images are their
                                                # non-null cells, in this order
    images_named_in_text: bool = False          # with image_columns image_N: only those whose `<image N>` the
                                                # row's question (options listed) names, as lmms-eval takes
                                                # MMMU's; all of them where it names none
    question_column: str = "question"           # the input column of each row's question (null: `prompt`)
    option_columns: list[str] = field(default_factory=list)   # a multiple-choice question's options, a column
                                                # each named by its letter (MMBench's A..E): asked after the
                                                # question as lmms-eval asks MMBench's (null options left out)
    hint_column: str | None = None              # with option_columns: a text asked before the question (null: none)
    option_list_column: str | None = None       # a column of each question's options as one list (or its text, as
                                                # MMMU's `options`): asked after the question as lmms-eval asks
                                                # MMMU's, "A. ..." a line each; a row without options: an open one
    open_question_suffix: str | None = None     # with option_list_column: the suffix of a row without options
                                                # (None: prompt_suffix)
    capitalize_questions: bool = False          # each question as str.capitalize writes it (lmms-eval's TextVQA,
                                                # VizWiz)
    question_removals: list[str] = field(default_factory=list)  # each question stripped of surrounding space,
                                                # then these texts taken out (lmms-eval's MMStar: " Please answer
                                                # yes or no.")
    messages_column: str | None = None          # an input column of each row's conversation (HF chat messages,
                                                # or their JSON text) whose next assistant turn is answered
                                                # (a last assistant turn: answered again); null: `prompt`
    max_new_tokens: int = 64
    min_new_tokens: int = 0                     # no end (eos) before this many tokens (transformers' min_new_tokens)
    temperature: float = 0.0                    # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0                          # sampling: no token below min_p x the likeliest's probability
    typical_p: float = 1.0                      # sampling: transformers' typical_p (1 = none)
    epsilon_cutoff: float = 0.0                 # sampling: no token below this probability (0 = none)
    eta_cutoff: float = 0.0                     # sampling: transformers' eta_cutoff (0 = none)
    generation_config: str = "auto"             # "auto": the checkpoint's generation_config.json sets the decoding
                                                # settings left at their defaults (pipeline.generation_defaults);
                                                # a .json file's path (or a folder's): that one; "none": none
    given_settings: list[str] = field(default_factory=list)     # settings the file does not replace even at
                                                # their defaults (the jobs' flags given: --temperature 0)
    repetition_penalty: float = 1.0             # transformers' repetition_penalty; 1 = none
    presence_penalty: float = 0.0               # vLLM's presence_penalty (on the answer's tokens); 0 = none
    frequency_penalty: float = 0.0              # vLLM's frequency_penalty (each repeat of a token); 0 = none
    no_repeat_ngram_size: int = 0               # transformers' no_repeat_ngram_size: no n-gram twice; 0 = none
    num_beams: int = 1                          # > 1: beam search (transformers' num_beams); `samples`: the best beams
    length_penalty: float = 1.0                 # beam search ranks an answer by its log p / its length ** this
    early_stopping: bool | str = False          # beam search: True (stop at num_beams answers), False (when no
                                                # better one is likely) or "never", as transformers'
    logprobs: bool = False                      # an `answer_logprob` column: the answer's log p under the model
    stop: list[str] = field(default_factory=list)   # strings that end an answer (transformers' stop_strings)
    bad_words: list[str] = field(default_factory=list)  # texts no answer holds (vLLM's bad_words: as written
                                                # and after a space, as tokenized; transformers' bad_words_ids)
    bad_words_ids: list[list[int]] = field(default_factory=list)    # token sequences no answer holds
                                                # (transformers' bad_words_ids, as a generation config gives them)
    sequence_bias: list = field(default_factory=list)   # [[token ids, bias], ...] (or {id: bias}) added to the
                                                # logits before the penalties (transformers' sequence_bias; a
                                                # one-token entry is vLLM's logit_bias)
    suppress_tokens: list[int] = field(default_factory=list)        # token ids no answer takes (transformers')
    begin_suppress_tokens: list[int] = field(default_factory=list)  # token ids no answer begins with
    min_length: int = 0                         # no end before prompt + answer hold this many tokens (transformers'
                                                # min_length; min_new_tokens > 0 wins over it)
    choices: list[str] = field(default_factory=list)    # every answer is one of these (vLLM's guided choice)
    choices_column: str | None = None           # an input column of each row's own choices (lists of text;
                                                # a null cell: `choices`)
    sampling_column: str | None = None          # an input column of each row's own decoding settings (a struct,
                                                # or JSON text, of SETTABLE names): they override the job's
    score_column: str | None = None             # an input column of texts scored as each row's answer
                                                # (`answer_logprob`: log p given image and question), none generated
    choice_logprobs: bool = False               # a `choice_logprobs` column: each choice's log p (model.engine.scoring)
    regex: str | None = None                    # every answer matches this expression in full (vLLM's guided regex)
    json_schema: str | None = None              # every answer is a JSON document this schema (its JSON text) allows
    seed: int | None = None                     # with sampling: per-row seed = f(seed, id), batch-independent
    samples: int = 1                            # answers sampled a row (`samples` columns; the first is `answer`)
    top_logprobs: int = 0                       # a `token_logprobs` column: each token's log p and the step's
                                                # top_logprobs likeliest tokens' (0-20)
    replicas: int | None = None                 # model replicas (actors); None: every GPU (/ tp), or one a CPU node
    tensor_parallel_size: int = 1               # devices per replica (placement group, STRICT_PACK)
    cpu_workers: int | None = None              # preprocessing actors; None: 1 up to the CPUs left (autoscaled)
    cpus_per_worker: float = 1.0
    cpus_per_replica: float | None = None       # CPUs (torch threads) of a model replica actor; None: 1 beside a
                                                # GPU, on CPUs the most the replicas fit on the nodes with 3 left
                                                # (pipeline.builder.replica_cpu_count)
    batch_size: int = 16                        # rows per block / per model call
    max_batch_size: int = 64                    # sequences the engine decodes together
    batches_in_flight: int | None = None        # blocks a replica streams at once; None: enough to fill the engine
    step_timeout_s: float | None = 600.0        # an engine step running longer (compiling aside) ends its replica's process
                                                # (a hung device or collective), which Ray restarts; None: never
    compile_decode: bool | None = None          # the decode step through torch.compile; None: on CUDA (a replica's
                                                # first step compiles, ~2 min at 8B), off on CPU (slower there)
    keep_columns: list[str] = field(default_factory=list)
    rows_per_file: int = 1000                   # output rows gathered into one Parquet file (a killed run
                                                # loses at most about this many unwritten rows' work)
    image_backend: str = "pil"                  # "pil" | "torch": which reference image recipe
    image_longest_edge: int | None = None       # the image processor's size["longest_edge"] (None: the
                                                # checkpoint's); smaller = fewer tiles, faster answers
    image_splitting: bool | None = None         # do_image_splitting (None: the checkpoint's); False = one frame
    max_image_pixels: int | None = None         # larger images become error rows (None = processing's default)
    max_image_bytes: int | None = None          # larger image files become error rows, read no further
                                                # (None = processing's default, 256 MiB)
    device: str | None = None                   # None: cuda when the cluster has GPUs, else cpu
    dtype: str | None = None                    # one of DTYPES; None: model.loading.compute_dtype (bfloat16
                                                # on GPUs from Ampere on, float16 before), float32 on cpu
    storage_options: dict = field(default_factory=dict)
    image_root: str | None = None               # relative image paths are read from here (jobs: the input's folder)
    fetch_threads: int = 16                     # image paths/URLs a CPU worker reads at once
    fetch_attempts: int = 3                     # tries of a read that fails for a reason that may pass
    fetch_timeout_s: float = 60.0               # an image read (async stores: s3, gcs, http) not done by then fails

    def __post_init__(self) -> None:
        for name in ("stop", "choices", "bad_words", "question_removals"):
            texts = getattr(self, name)
            texts = [texts] if isinstance(texts, str) else list(dict.fromkeys(texts or []))
            if any(not isinstance(s, str) or not s for s in texts):
                raise ValueError(f"{name} must be non-empty strings, got {texts!r}")
            setattr(self, name, texts)
        self._check_integers()
        self._check_token_settings()
        for name in ("keep_columns", "image_columns", "option_columns"):     # a YAML mapping is no list of them
            if not isinstance(getattr(self, name), (str, list, tuple)):
                raise ValueError(f"{name} must be a list of column names (or their text, comma-separated), got "
                                 f"{type(getattr(self, name)).__name__}")
            setattr(self, name, column_list(getattr(self, name)))
        # The output's id is the input's id column; an input `id` beside another id column (a VQAv2 image id
        # beside question_id), as another output column's name, is kept as input_<name>.
        self.keep_columns = [c for c in dict.fromkeys(self.keep_columns) if c != "id" or self.id_column != "id"]
        clash = [c for c in self.keep_columns if kept_name(c) != c and kept_name(c) in self.keep_columns]
        if clash:
            raise ValueError(f"keep_columns {clash} would be written as {[kept_name(c) for c in clash]}, which are "
                             "kept too (an input column named as an output column is kept as input_<name>)")
        positive = ["max_new_tokens", "samples", "num_beams", "tensor_parallel_size", "batch_size", "max_batch_size",
                    "rows_per_file", "fetch_threads", "fetch_attempts"]
        optional = ("replicas", "batches_in_flight", "cpu_workers", "image_longest_edge", "max_image_pixels",
                    "max_image_bytes")
        positive += [n for n in optional if getattr(self, n) is not None]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.step_timeout_s is not None and not self.step_timeout_s >= 0:     # NaN too
            raise ValueError(f"step_timeout_s must be >= 0 (0 or None: no watchdog), got {self.step_timeout_s}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2] (0: none), got {getattr(self, name)}")
        if self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s must be > 0, got {self.fetch_timeout_s}")
        if self.cpus_per_replica is not None and not self.cpus_per_replica > 0:
            raise ValueError(f"cpus_per_replica must be > 0, got {self.cpus_per_replica}")
        if self.device not in (None, "cpu", "cuda"):     # a Ray actor sees its own GPU as cuda
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in (None, *DTYPES):
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("id_column", "image_column", "question_column", "choices_column", "messages_column",
                     "sampling_column", "score_column"):
            if name in ("choices_column", "messages_column", "sampling_column", "score_column") \
                    and getattr(self, name) is None:
                continue
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a column name, got {getattr(self, name)!r}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ValueError(f"generation_config must be 'auto', 'none' or a file's path, got "
                             f"{self.generation_config!r}")
        if self.image_backend not in ("pil", "torch"):
            raise ValueError(f"image_backend must be 'pil' or 'torch', got {self.image_backend!r}")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:      # NaN fails both
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0: none), got {self.no_repeat_ngram_size}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0: none), got {self.min_p}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        from model.engine.cutoffs import check_cutoffs
        check_cutoffs(self.typical_p, self.epsilon_cutoff, self.eta_cutoff)
        if self.top_k < 0:      # else every row's request would be refused, each an error row
            raise ValueError(f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.top_logprobs and self.samples > 1:
            raise ValueError("top_logprobs describes one answer's tokens: not with samples > 1")
        if self.samples > 1 and self.temperature == 0 and self.num_beams == 1:
            raise ValueError(f"samples={self.samples} greedy answers would all be the same one: sample them "
                             "(temperature > 0), or search with num_beams >= samples")
        self._check_constraint()
        self._check_beams()
        self.template_columns()          # a template it cannot fill is refused here
        generating = [name for name, on in (("choices", self.choices or self.choices_column), ("regex", self.regex),
                                            ("json_schema", self.json_schema), ("samples", self.samples > 1),
                                            ("sampling_column", self.sampling_column), ("stop", self.stop),
                                            ("bad_words", self.bad_words),
                                            ("top_logprobs", self.top_logprobs), ("num_beams", self.num_beams > 1))
                      if on]
        if self.score_column is not None and not generating and self.given_settings:
            generating = sorted(self.given_settings)        # --temperature and the like: they changed nothing
        if self.score_column is not None and generating:
            raise ValueError(f"score_column scores given answers; {generating[0]} is about generating them: give one")
        made = next((name for name in ("messages_column", "prompt_template") if getattr(self, name) is not None), None)
        if self.question_column != "question" and made and (self.messages_column is not None or
                                                            self.question_column not in self.template_columns()):
            raise ValueError(f"question_column {self.question_column!r} is not read beside {made}: give one")
        if self.messages_column is not None and self.prompt_template is not None:
            raise ValueError("messages_column and prompt_template are two ways to make what each row asks: give one")
        if (self.option_columns or self.hint_column) and made:
            raise ValueError(f"option_columns and {made} are two ways to make what each row asks: give one")
        if self.hint_column is not None and not self.option_columns:
            raise ValueError("hint_column is asked before a multiple-choice question's options: give option_columns")
        self._check_option_list(made)
        if self.image_columns and self.image_column != "image":
            raise ValueError("image_column and image_columns both name the rows' images: give one")
        if any(not isinstance(c, str) or not c for c in self.image_columns):
            raise ValueError(f"image_columns must be column names, got {self.image_columns!r}")

    def _check_option_list(self, made: str | None) -> None:
        if self.option_list_column is None:
            if self.open_question_suffix is not None:
                raise ValueError("open_question_suffix is the suffix of a row without options: give "
                                 "option_list_column")
            return
        if not isinstance(self.option_list_column, str) or not self.option_list_column:
            raise ValueError(f"option_list_column must be a column name, got {self.option_list_column!r}")
        other = made or ("option_columns" if self.option_columns else None)
        if other:
            raise ValueError(f"option_list_column and {other} are two ways to make what each row asks: give one")

    def image_sources(self) -> list[str]:
        """The input columns of the rows' images."""
        return self.image_columns or [self.image_column]

    def _check_integers(self) -> None:
        """Fields typed int are integers (a job.yaml's 2.5 would fail every row, or a replica's start)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type not in ("int", "int | None") or value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            setattr(self, f.name, int(value))       # numpy's as Python's: the manifest writes them as JSON

    def _check_token_settings(self) -> None:
        """Settings of token ids (a generation config's) in one form, JSON's (the run manifest compares them)."""
        from model.engine.bad_words import check_bad_words
        from model.engine.biases import normalized_sequence_bias, normalized_token_ids

        check_bad_words(self.bad_words_ids or [], vocab=1 << 62)    # the vocabulary: each replica's engine checks it
        self.bad_words_ids = [list(word) for word in self.bad_words_ids or []]
        self.sequence_bias = [[list(ids), bias] for ids, bias in normalized_sequence_bias(self.sequence_bias)]
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            setattr(self, name, list(normalized_token_ids(getattr(self, name), name)))
        if self.min_length < 0:         # an integer: _check_integers
            raise ValueError(f"min_length must be an integer >= 0 (0: none), got {self.min_length!r}")

    def min_new_tokens_for(self, prompt_len: int, min_new_tokens: int, max_new_tokens: int) -> int:
        """A row's min_new_tokens: the one given (> 0), else what min_length leaves after its prompt,
        at most max_new_tokens (transformers: min_new_tokens wins; past max_new_tokens, the answer ends there)."""
        if min_new_tokens or not self.min_length:
            return min_new_tokens
        return min(max(self.min_length - prompt_len, 0), max_new_tokens)

    def _check_beams(self) -> None:
        """Beam search keeps the best answers, greedily: nothing that samples or constrains them."""
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.num_beams == 1:
            return
        if self.samples > self.num_beams:
            raise ValueError(f"samples={self.samples} > num_beams={self.num_beams}: beam search returns at most "
                             "its beams")
        beside = [name for name, on in (("temperature > 0", self.temperature > 0),
                                        ("choices", self.choices or self.choices_column),
                                        ("regex", self.regex), ("json_schema", self.json_schema),
                                        ("top_logprobs", self.top_logprobs),
                                        ("presence_penalty", self.presence_penalty),
                                        ("frequency_penalty", self.frequency_penalty)) if on]
        if beside:
            raise ValueError(f"num_beams={self.num_beams}: beam search cannot be combined with {beside[0]}")
        if self.num_beams > self.max_batch_size:
            raise ValueError(f"num_beams={self.num_beams} beams take as many of the engine's max_batch_size="
                             f"{self.max_batch_size} slots")

    def template_columns(self) -> list[str]:
        """The input columns `prompt_template` names, in order (ValueError for a field that is not
        one column: positional, an attribute or an index)."""
        if self.prompt_template is None:
            return []
        try:
            fields = list(template_fields(self.prompt_template))
        except ValueError as e:
            raise ValueError(f"prompt_template {self.prompt_template!r}: {e}") from None
        bad = [f for f in fields if not f or f.isdigit() or "." in f or "[" in f]
        if bad or not fields:
            raise ValueError(f"prompt_template {self.prompt_template!r}: name input columns in braces, "
                             f"as {{title}} (got {bad[0]!r} instead)" if bad else
                             f"prompt_template {self.prompt_template!r} names no column: use --prompt")
        return list(dict.fromkeys(fields))

    def _check_constraint(self) -> None:
        """One way to constrain answers, and a pattern the engine can follow (else every row would be
        an error row): checked without torch, in the driver."""
        from model.engine.automaton import Automaton
        from model.engine.json_schema import schema_text_pattern

        if self.json_schema is not None:        # one text for one schema (the run manifest compares them)
            try:
                schema = json.loads(self.json_schema) if isinstance(self.json_schema, str) else self.json_schema
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema: the JSON schema is not JSON: {e}") from None
            self.json_schema = json.dumps(schema, ensure_ascii=False)
        ways = [name for name, on in (("choices", self.choices or self.choices_column), ("regex", self.regex),
                                      ("json_schema", self.json_schema)) if on]
        if len(ways) > 1:
            raise ValueError(f"{' and '.join(ways)} are two ways to constrain answers: give one")
        for name in ("min_new_tokens", "min_length"):
            if ways and getattr(self, name):
                raise ValueError(f"{name} cannot be combined with {ways[0]} (a whole answer may come first)")
        if self.choice_logprobs and ways != ["choices"]:
            raise ValueError("choice_logprobs scores the choices: give choices (or a choices column)")
        if self.regex is not None or self.json_schema is not None:
            name = "regex" if self.regex is not None else "json_schema"
            try:
                pattern = self.regex if self.regex is not None else schema_text_pattern(self.json_schema)
                automaton = Automaton(pattern)
                if automaton.start is None:
                    raise ValueError("it matches no text")
                if automaton.ends(automaton.start):
                    raise ValueError("it matches only the empty answer")
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    def image_settings(self) -> dict:
        """Overrides of the checkpoint's image-processor config (processing.RowEncoder.from_pretrained)."""
        out = {}
        if self.image_longest_edge is not None:
            out["size"] = {"longest_edge": self.image_longest_edge}
        if self.image_splitting is not None:
            out["do_image_splitting"] = self.image_splitting
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def column_list(value: str | list | tuple) -> list:
    """Column names given as a list, or as their text, comma-separated ("a, b")."""
    return [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else list(value)


def template_fields(template: str):
    """The fields a format string names, those inside its format specs too ("{alt:>{width}}": alt, width)."""
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            yield name
            if spec:
                yield from template_fields(spec)
