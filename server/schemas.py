"""Request and response bodies (pydantic): what the HTTP API accepts and returns."""

from __future__ import annotations

from typing import Annotated, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from server.errors import DeeBertError, ErrorType

ThresholdValue = Annotated[
    StrictFloat | StrictInt | StrictStr,
    Field(
        description="threshold of the model's exit criterion (DeeBERT entropy: a number >= 0, 0 = full depth) "
        "or a preset name such as 'balanced'"
    ),
]


class ClassifyRequest(BaseModel):
    """Body of `POST /v1/classify`: one text or a list, optional pairs, optional threshold."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "a gripping, beautifully acted film"},
                {"texts": ["great", "dull"], "threshold": "fast"},
            ]
        },
    )

    text: StrictStr | None = Field(None, description="a single text")
    texts: list[StrictStr] | None = Field(None, description="several texts, answered in input order")
    text_pair: StrictStr | None = Field(None, description="second text of a pair (pair models)")
    text_pairs: list[StrictStr] | None = Field(None, description="second texts, one per entry of `texts`")
    threshold: ThresholdValue | None = None
    truncate: StrictBool = Field(True, description="truncate long texts to the max length instead of a 422")
    return_probabilities: StrictBool = Field(False, description="include every label's probability")

    def normalized(self) -> tuple[list[str], list[str] | None]:
        """The texts (and pairs) in input order; 422 when they are missing, empty or mismatched."""
        if self.text is not None and self.texts is not None:
            raise DeeBertError(ErrorType.VALIDATION, "send either 'text' or 'texts', not both")
        if self.text_pair is not None and self.text_pairs is not None:
            raise DeeBertError(ErrorType.VALIDATION, "send either 'text_pair' or 'text_pairs', not both")
        if self.text is not None:
            if self.text_pairs is not None:
                raise DeeBertError(ErrorType.VALIDATION, "'text_pairs' goes with 'texts'; use 'text_pair' with 'text'")
            texts, pairs = [self.text], [self.text_pair] if self.text_pair is not None else None
        elif self.texts is not None:
            if self.text_pair is not None:
                raise DeeBertError(ErrorType.VALIDATION, "'text_pair' goes with 'text'; use 'text_pairs' with 'texts'")
            texts, pairs = list(self.texts), list(self.text_pairs) if self.text_pairs is not None else None
        else:
            raise DeeBertError(ErrorType.EMPTY_INPUT, "send 'text' (a string) or 'texts' (a list of strings)")
        return check_texts(texts, pairs)


class ClassifyResult(BaseModel):
    label: str
    label_id: int
    score: float = Field(description="probability of the predicted label (multi-label: the highest label's sigmoid)")
    exit_layer: int = Field(description="layer (1..n) whose off-ramp answered")
    entropy: float = Field(
        description="entropy (nats) of that off-ramp's prediction (multi-label: the largest per-label binary entropy)"
    )
    probabilities: dict[str, float] | None = Field(
        None, description="every label's probability (multi-label: each label's sigmoid; always given)"
    )
    labels_on: list[str] | None = Field(
        None, description="multi-label models only: the labels whose sigmoid is >= 0.5, in label order"
    )


class ClassifyResponse(BaseModel):
    model: str
    threshold: float = Field(description="the threshold that was applied (of the model's exit criterion)")
    num_layers: int
    results: list[ClassifyResult]


class TextClassificationParameters(BaseModel):
    """`parameters` of the Hugging Face Inference API's text classification, which huggingface_hub's
    `InferenceClient.text_classification` sends along (TEI ignores them; see the README's TEI table)."""

    model_config = ConfigDict(extra="forbid")

    function_to_apply: Literal["softmax", "none", "sigmoid"] | None = Field(
        None, description='"softmax" (the default): probabilities; "none": log-probabilities, as `raw_scores`'
    )
    top_k: StrictInt | None = Field(None, ge=1, description="only the k highest-scoring labels")


class PredictRequest(BaseModel):
    """Body of `POST /predict` (and `POST /`, `POST /invocations`), as text-embeddings-inference takes it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": "a gripping, beautifully acted film"},
                {"inputs": [["great fun"], ["a dull, lifeless mess"]], "raw_scores": True},
            ]
        },
    )

    inputs: StrictStr | list[StrictStr] | list[list[StrictStr]] = Field(
        description="a text; a pair [text, text_pair]; or a batch [[text], [text, text_pair], ...]"
    )
    truncate: StrictBool | None = Field(
        None, description="truncate texts over the max length instead of a 422; null: the server's default (true)"
    )
    truncation_direction: Literal["left", "right", "Left", "Right"] = Field(
        "right", description="which end of a long text is cut"
    )
    raw_scores: StrictBool = Field(
        False, description="log-probabilities (the logits up to a constant) instead of probabilities"
    )
    parameters: TextClassificationParameters | None = None

    def normalized(self, pair_model: bool) -> tuple[list[str], list[str] | None, bool]:
        """(texts, pairs, batched), reading `inputs` as text-embeddings-inference does: a string, or a list of
        one or two strings, is one input (a text, or a pair); a list of lists is a batch. A flat list of three
        or more strings is read as a batch of texts (TEI refuses it). 422 when the inputs do not fit the model."""
        value = self.inputs
        entries: list[list[str]]
        if isinstance(value, str):
            entries, batched = [[value]], False
        elif all(isinstance(v, str) for v in value):
            flat = cast(list[str], value)
            entries, batched = ([flat], False) if 1 <= len(flat) <= 2 else ([[text] for text in flat], True)
        else:
            entries, batched = cast(list[list[str]], value), True
        if not entries:
            raise DeeBertError(ErrorType.EMPTY_INPUT, "'inputs' is empty; send a text, a pair or a batch")
        for index, entry in enumerate(entries):
            if len(entry) not in (1, 2):
                raise DeeBertError(
                    ErrorType.VALIDATION,
                    f"entry {index} of 'inputs' has {len(entry)} strings; each is [text] or [text, text_pair]",
                )
        if pair_model:
            if any(len(entry) == 1 for entry in entries):
                raise DeeBertError(
                    ErrorType.VALIDATION,
                    "this model classifies sentence pairs: send 'inputs' as [text, text_pair], "
                    "or a batch [[text, text_pair], ...]",
                )
            return (*check_texts([e[0] for e in entries], [e[1] for e in entries]), batched)
        if any(len(entry) == 2 for entry in entries):
            if not batched:
                raise DeeBertError(
                    ErrorType.VALIDATION,
                    "'inputs' [a, b] is one sentence pair (text-embeddings-inference's format), and this model "
                    'classifies single texts. To classify several texts, send a batch: {"inputs": [["first '
                    'text"], ["second text"]]}',
                )
            raise DeeBertError(
                ErrorType.VALIDATION,
                "'inputs' holds a sentence pair [text, text_pair], and this model classifies single texts: "
                'send each text of a batch as [text], as in {"inputs": [["first text"], ["second text"]]}',
            )
        return (*check_texts([e[0] for e in entries], None), batched)

    def log_probabilities(self, multi_label: bool = False) -> bool:
        """Whether scores are raw (`raw_scores`, or `parameters.function_to_apply` "none"): log-probabilities, or
        for a multi-label model its sigmoids' logits; 422 for what cannot be honoured."""
        function = self.parameters.function_to_apply if self.parameters is not None else None
        expected = "sigmoid" if multi_label else "softmax"
        if multi_label and function == "softmax":
            raise DeeBertError(
                ErrorType.VALIDATION,
                'parameters.function_to_apply "softmax" is not available: this multi-label model scores each label '
                'with its own sigmoid; send "sigmoid" (the default) or "none" (logits)',
            )
        if function == "sigmoid" and not multi_label:
            raise DeeBertError(
                ErrorType.VALIDATION,
                'parameters.function_to_apply "sigmoid" is not available: the early-exit loop keeps each '
                'off-ramp\'s softmax; send "softmax" (probabilities) or "none" (log-probabilities)',
            )
        if function == expected and self.raw_scores:
            raise DeeBertError(
                ErrorType.VALIDATION, f'raw_scores: true contradicts parameters.function_to_apply "{expected}"'
            )
        return self.raw_scores or function == "none"


class PredictScore(BaseModel):
    score: float = Field(description="probability of the label (a log-probability with raw_scores)")
    label: str


class ClassifierInfo(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class TeiModelType(BaseModel):
    classifier: ClassifierInfo


class TeiInfo(BaseModel):
    """`GET /info`: text-embeddings-inference's Info, with what this server can fill honestly (README)."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    served_model_name: str
    model_type: TeiModelType
    max_concurrent_requests: int = Field(description="most texts waiting (DEEBERT_MAX_QUEUE_SIZE); more get 429")
    max_input_length: int = Field(description="max tokens per text")
    max_batch_tokens: int = Field(description="most tokens in one forward batch: max_batch_requests x max_input_length")
    max_batch_requests: int | None = Field(description="most texts in one forward batch")
    max_client_batch_size: int = Field(description="most texts in one request")
    auto_truncate: bool = Field(description="what truncate: null means")
    version: str
    sha: str | None = None
    docker_label: str | None = None


class PresetInfo(BaseModel):
    name: str
    threshold: float
    accuracy: float | None = None
    expected_saving: float | None = None


class AgreementInfo(BaseModel):
    estimate: float | None = Field(description="share of shadow samples whose label here is the full model's")
    lower: float = Field(description="lower end of its 90 % Wilson interval")
    upper: float = Field(description="upper end of its 90 % Wilson interval")
    samples: int


class ControllerInfo(BaseModel):
    """The threshold controller (DEEBERT_TARGET_AGREEMENT / DEEBERT_TARGET_P99_MS) as it stands now."""

    threshold: float = Field(description="the live default threshold")
    rung: int = Field(description="its rung on the ladder (0 = full depth)")
    ladder: list[float] = Field(description="the thresholds the default moves along, full depth to the ceiling")
    configured_threshold: float = Field(description="the default the server started with")
    target_agreement: float | None
    target_p99_ms: float | None
    agreement_floor: float | None = Field(description="with a latency target: the agreement it may not push below")
    agreement: dict[str, AgreementInfo] = Field(description="agreement at the live default over the newest N samples")
    expected_saving: float | None = Field(description="expected saving at the live default over the shadow samples")
    samples: int = Field(description="shadow samples in the evidence window")
    p99_ms: float | None = Field(description="p99 request time the latency target is judged on")
    latency_rungs: int = Field(description="rungs beyond the agreement's that the latency target asks for")
    latency_state: str | None = Field(
        default=None, description="the latency policy's state (steady, pushed, recovering); null without a p99 target"
    )


class ModelInfo(BaseModel):
    model: str
    task: str
    labels: list[str]
    num_layers: int
    max_length: int
    pooling: str
    exit_criterion: str = Field(
        description="what thresholds mean: entropy (DeeBERT), max-prob, patience, or label-entropy (multi-label)"
    )
    multi_label: bool = Field(False, description="one sigmoid per label (any number of labels on) instead of a softmax")
    default_threshold: float
    default_threshold_name: str | None
    presets: list[PresetInfo]
    device: str
    dtype: str = Field(description="precision the model computes in: float32, float16, bfloat16 or int8")
    backend: str = Field(description="inference backend: torch, onnxruntime or openvino")
    backend_reason: str = Field(
        "", description="why it serves: requested, or backend auto's measured choice on this CPU (deebert tune)"
    )
    max_batch_size: int
    max_texts_per_request: int
    batches_on_loop: str = Field(
        "alone",
        description="which batches run on the event loop instead of the batch thread (DEEBERT_BATCHES_ON_LOOP): none, "
        "alone or all",
    )
    batch_streams: int = Field(
        1,
        description="batches that run at once under load, each on its share of the threads (DEEBERT_BATCH_STREAMS)",
    )
    controller: ControllerInfo | None = Field(
        None, description="the threshold controller, when a target is set; default_threshold is then its live value"
    )


class HealthStatus(BaseModel):
    status: str


def check_texts(texts: list[str], pairs: list[str] | None) -> tuple[list[str], list[str] | None]:
    """Non-empty, valid Unicode texts, and exactly one pair per text when pairs are given."""
    if not texts:
        raise DeeBertError(ErrorType.EMPTY_INPUT, "'texts' is empty; send at least one text")
    for index, text in enumerate(texts):
        if not text.strip():
            raise DeeBertError(ErrorType.EMPTY_INPUT, f"text {index} is empty")
        check_unicode(text, f"text {index}")
    if pairs is not None:
        if len(pairs) != len(texts):
            raise DeeBertError(
                ErrorType.VALIDATION, f"{len(texts)} texts but {len(pairs)} text pairs; send one pair per text"
            )
        for index, pair in enumerate(pairs):
            if not pair.strip():
                raise DeeBertError(ErrorType.EMPTY_INPUT, f"text pair {index} is empty")
            check_unicode(pair, f"text pair {index}")
    return texts, pairs


def check_unicode(text: str, name: str) -> None:
    """422 `invalid_text` for a string that is not valid Unicode text.

    JSON's `\\u` escapes can spell a lone UTF-16 surrogate (`"\\ud800"`): valid JSON, but no character, and
    neither UTF-8 nor the tokenizer can encode it."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DeeBertError(
            ErrorType.INVALID_TEXT,
            f"{name} is not valid Unicode: character {err.start} is a lone surrogate "
            f"(\\u{ord(text[err.start]):04x}), half of a UTF-16 pair; send the whole pair (such as "
            "\\ud83d\\ude00) or the character itself",
        ) from None
