"""Request and response bodies (pydantic): what the HTTP API accepts and returns."""

from __future__ import annotations

from typing import Annotated, cast

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
    score: float = Field(description="probability of the predicted label")
    exit_layer: int = Field(description="layer (1..n) whose off-ramp answered")
    entropy: float = Field(description="entropy (nats) of that off-ramp's prediction")
    probabilities: dict[str, float] | None = None


class ClassifyResponse(BaseModel):
    model: str
    threshold: float = Field(description="the threshold that was applied (of the model's exit criterion)")
    num_layers: int
    results: list[ClassifyResult]


class PredictRequest(BaseModel):
    """Body of `POST /predict`, as in text-embeddings-inference."""

    model_config = ConfigDict(extra="forbid")

    inputs: StrictStr | list[StrictStr] | list[list[StrictStr]] = Field(
        description="a text, a list of texts, or a list of [text, text_pair]"
    )
    truncate: StrictBool = True
    raw_scores: StrictBool = Field(False, description="accepted for compatibility; scores are probabilities")

    def normalized(self, pair_model: bool) -> tuple[list[str], list[str] | None, bool]:
        """(texts, pairs, batched). A two-string list is one pair on a pair model, as TEI reads it."""
        value = self.inputs
        texts: list[str]
        pairs: list[str] | None = None
        batched = True
        if isinstance(value, str):
            texts, batched = [value], False
        elif all(isinstance(v, str) for v in value):
            flat = cast(list[str], value)
            if pair_model and len(flat) == 2:
                texts, pairs, batched = [flat[0]], [flat[1]], False
            else:
                texts = list(flat)
        else:
            entries = cast(list[list[str]], value)
            if any(isinstance(v, str) or len(v) != 2 for v in entries):
                raise DeeBertError(
                    ErrorType.VALIDATION, "each entry of 'inputs' must be a text or a [text, text_pair] list"
                )
            texts, pairs = [v[0] for v in entries], [v[1] for v in entries]
        checked_texts, checked_pairs = check_texts(texts, pairs)
        return checked_texts, checked_pairs, batched


class PredictScore(BaseModel):
    label: str
    score: float


class PresetInfo(BaseModel):
    name: str
    threshold: float
    accuracy: float | None = None
    expected_saving: float | None = None


class ModelInfo(BaseModel):
    model: str
    task: str
    labels: list[str]
    num_layers: int
    max_length: int
    pooling: str
    exit_criterion: str = Field(description="what thresholds mean: entropy (DeeBERT), max-prob or patience")
    default_threshold: float
    default_threshold_name: str | None
    presets: list[PresetInfo]
    device: str
    dtype: str = Field(description="precision the model computes in: float32, float16, bfloat16 or int8")
    backend: str = Field(description="inference backend: torch or onnxruntime")
    max_batch_size: int
    max_texts_per_request: int


class HealthStatus(BaseModel):
    status: str


def check_texts(texts: list[str], pairs: list[str] | None) -> tuple[list[str], list[str] | None]:
    """Non-empty texts, and exactly one pair per text when pairs are given."""
    if not texts:
        raise DeeBertError(ErrorType.EMPTY_INPUT, "'texts' is empty; send at least one text")
    for index, text in enumerate(texts):
        if not text.strip():
            raise DeeBertError(ErrorType.EMPTY_INPUT, f"text {index} is empty")
    if pairs is not None:
        if len(pairs) != len(texts):
            raise DeeBertError(
                ErrorType.VALIDATION, f"{len(texts)} texts but {len(pairs)} text pairs; send one pair per text"
            )
        for index, pair in enumerate(pairs):
            if not pair.strip():
                raise DeeBertError(ErrorType.EMPTY_INPUT, f"text pair {index} is empty")
    return texts, pairs
