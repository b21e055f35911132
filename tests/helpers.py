"""Tiny random-weight BERT/RoBERTa DeeBERT models and data files for fast tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, RobertaConfig, RobertaModel

from model import exit_rule
from model.config import DeeBertConfig
from model.modeling import DeeBert
from model.tokenization import Batch, pad_arrays, pad_batch, tokenize

WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "was",
    "is",
    "good",
    "great",
    "bad",
    "awful",
    "fine",
    "boring",
    "fun",
    "plot",
    "acting",
    "it",
    "not",
    "very",
    "really",
    "and",
    "but",
    "story",
    "cast",
    "dull",
    "brilliant",
    "terrible",
    "love",
    "hate",
    "i",
    "this",
    "that",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "a",
    "man",
    "woman",
    "said",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
HIDDEN = 32
LAYERS = 4


def write_vocab(directory: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer over a few dozen words (`WORDS`, one id each), saved into `directory`.

    The vocabulary is given as a dict: transformers 5's `BertTokenizerFast(vocab_file=...)` left every word [UNK]."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {word: i for i, word in enumerate(SPECIAL + sorted(set(WORDS)))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def backbone_values(model_type: str, vocab_size: int = 64) -> dict[str, object]:
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 80,
        "type_vocab_size": 2,
        "pad_token_id": 0,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
    }


def tiny_model(
    model_type: str = "bert",
    labels: tuple[str, ...] = ("negative", "positive"),
    pooling: str = "first",
    seed: int = 0,
    sharpen: float = 40.0,
    text_columns: tuple[str, ...] = ("sentence",),
) -> DeeBert:
    """A random DeeBERT whose off-ramps are sharpened so entropies spread over (0, ln C)."""
    torch.manual_seed(seed)
    config = DeeBertConfig(
        backbone=backbone_values(model_type),
        labels=list(labels),
        pooling=pooling,  # type: ignore[arg-type]
        max_length=48,
        text_columns=list(text_columns),
        name=f"tiny-{model_type}",
    )
    model = DeeBert(config)
    with torch.no_grad():
        for ramp in model.off_ramps:
            ramp.classifier.weight.normal_(0, sharpen / HIDDEN**0.5)
    return model.eval()


def save_plain_backbone(directory: Path, model_type: str = "bert") -> Path:
    """A plain (non-DeeBERT) BERT/RoBERTa checkpoint directory with a tokenizer."""
    tokenizer = write_vocab(directory)
    values = backbone_values(model_type, vocab_size=len(tokenizer))
    values.pop("model_type")
    config = (BertConfig if model_type == "bert" else RobertaConfig)(**values)
    torch.manual_seed(1)
    (BertModel if model_type == "bert" else RobertaModel)(config).save_pretrained(str(directory))
    return directory


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


def sentiment_rows(count: int, seed: int = 0) -> list[list[str]]:
    """Learnable synthetic sentiment: 'good' words → 1, 'bad' words → 0."""
    generator = torch.Generator().manual_seed(seed)
    good, bad = ["good", "great", "fun", "brilliant", "love"], ["bad", "awful", "boring", "dull", "terrible"]
    rows = []
    for i in range(count):
        label = i % 2
        pool = good if label else bad
        word = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        filler = ["the movie was", "this film is", "i think the plot was really", "the acting"][i % 4]
        rows.append([f"{filler} {word}", str(label)])
    return rows


# A few sentences of the tiny vocabulary, of different lengths (so a batch of them is padded).
SENTENCES = [
    "the movie was good",
    "this film is awful and boring",
    "i love the cat",
    "the plot was not very fun but the cast was brilliant and the story was great",
    "dull",
    "a man said the dog sat on the mat",
]


def encode(tokenizer, texts: list[str] = SENTENCES) -> Batch:  # type: ignore[no-untyped-def]
    """The texts tokenized and right-padded into one batch."""
    return pad_batch(tokenize(tokenizer, texts, None, 48), tokenizer.pad_token_id)


def all_entropies(model: DeeBert, batch: Batch) -> torch.Tensor:
    """Every off-ramp's entropy for the batch, [layers, rows], on the CPU (the batch moved to the model's device)."""
    on_device = batch.to(next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(on_device.input_ids, on_device.attention_mask, on_device.token_type_ids)
    return exit_rule.entropy_from_logits(logits)[1].cpu()


# Floats computed in different batch shapes (or on different CPUs) differ in their last digits: a pair alone
# and the same pair inside a batch agreed to 5 significant digits on one Intel Xeon (5.95335378e-11 vs
# 5.95334268e-11). Answers are compared with this tolerance; everything that is not a float exactly.
ANSWER_TOLERANCE = 1e-5


def assert_same_answer(actual: object, expected: object, tolerance: float = ANSWER_TOLERANCE, where: str = "") -> None:
    """`actual` equals `expected` (JSON-like: dicts, lists, strings, ints exactly; floats within `tolerance`)."""
    if isinstance(expected, float) or isinstance(actual, float):
        assert isinstance(actual, int | float) and isinstance(expected, int | float), f"{where}: {actual!r}"
        assert abs(float(actual) - float(expected)) <= tolerance, f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), f"{where}: keys {actual!r}"
        for key, value in expected.items():
            assert_same_answer(actual[key], value, tolerance, f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple) and len(actual) == len(expected), f"{where}: {actual!r}"
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            assert_same_answer(got, want, tolerance, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def thresholds_between_layers(model: DeeBert, batch: Batch) -> list[float]:
    """Per-row thresholds that make rows leave at different layers (and a full-depth first row)."""
    entropies = all_entropies(model, batch)
    return [
        0.0 if row == 0 else float(entropies[row % model.num_layers, row]) + 1e-3
        for row in range(batch.input_ids.shape[0])
    ]


def assert_matches_torch(model: DeeBert, exported: object, tokenizer: BertTokenizerFast) -> None:
    """Another backend's exit layers, labels, rows per layer (compaction) and probabilities equal torch's on
    SENTENCES, at uniform thresholds and at thresholds that spread the rows over the layers."""
    import pytest

    batch = encode(tokenizer)
    grids = [[t] * len(SENTENCES) for t in (0.0, 0.05, 0.3, 1e9)] + [thresholds_between_layers(model, batch)]
    for thresholds in grids:
        expected = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds)
        got = exported.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds)  # type: ignore[attr-defined]
        assert got.exit_layer == expected.exit_layer
        assert got.label == expected.label
        assert got.rows_per_layer == expected.rows_per_layer  # compaction: the same rows run at each layer
        torch.testing.assert_close(got.probabilities, expected.probabilities, atol=1e-4, rtol=0)
        assert got.entropy == pytest.approx(expected.entropy, abs=1e-4)


def assert_compacts_mixed_thresholds(model: DeeBert, exported: object, tokenizer: BertTokenizerFast) -> None:
    """Per-row thresholds spread the rows over the layers; with compaction each layer runs only the rows still
    going, without it every row runs until all have left, with the same answers."""
    batch = encode(tokenizer)
    thresholds = thresholds_between_layers(model, batch)
    args = (batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds)
    result = exported.infer(*args)  # type: ignore[attr-defined]
    assert len(set(result.exit_layer)) > 2  # the thresholds spread the rows over several layers
    for layer in range(1, model.num_layers + 1):
        assert result.rows_per_layer[layer - 1] == sum(1 for e in result.exit_layer if e >= layer)
    masked = exported.infer(*args, compact=False)  # type: ignore[attr-defined]
    assert masked.exit_layer == result.exit_layer and masked.label == result.label
    assert masked.layers_executed > result.layers_executed


def assert_alone_equals_batched(model: DeeBert, exported: object, tokenizer: BertTokenizerFast) -> None:
    """Each sentence alone leaves at the layer, with the label (and probabilities within 1e-4), it has in a
    batch with the others at mixed thresholds; `iter_exits` yields it once, at that layer."""
    batch = encode(tokenizer)
    thresholds = thresholds_between_layers(model, batch)
    together = exported.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, thresholds)  # type: ignore[attr-defined]
    for row, text in enumerate(SENTENCES):
        one = encode(tokenizer, [text])
        args = (one.input_ids, one.attention_mask, one.token_type_ids, [thresholds[row]])
        alone = exported.infer(*args)  # type: ignore[attr-defined]
        assert (alone.exit_layer[0], alone.label[0]) == (together.exit_layer[row], together.label[row])
        torch.testing.assert_close(alone.probabilities[0], together.probabilities[row], atol=1e-4, rtol=0)
        events = list(exported.iter_exits(*args))  # type: ignore[attr-defined]
        assert [(e.layer, e.rows) for e in events] == [(alone.exit_layer[0], [0])]
        assert_lone_row_entry_answers_as_infer(exported, tokenizer, text, thresholds[row])
        assert_lone_row_entry_answers_as_infer(exported, tokenizer, text, model.config.criterion.full_depth)


def assert_lone_row_entry_answers_as_infer(
    exported: Any, tokenizer: BertTokenizerFast, text: str, threshold: float
) -> None:
    """The server's lone-row entry (`exit_lone_row`, on numpy arrays) answers as `infer` does on the same row, by
    each way the backend has (its exit graph, the steps one by one, the full graph), and makes no torch tensor
    where the runtime computes on numpy (right after a runtime call the first torch operation costs ~50 µs)."""
    arrays = pad_arrays(tokenize(tokenizer, [text], None, 48), tokenizer.pad_token_id)
    expected = exported.infer(*(torch.from_numpy(array) for array in arrays), [threshold])
    ways = [contextlib.nullcontext()]
    if getattr(exported, "exit_graph", None) is not None:  # also by the steps, as an export without it runs
        ways.append(mock.patch.object(exported, "exit_graph", None))
    for way in ways:
        with way, _torch_forbidden(not exported.computes_in_torch):
            lone = exported.exit_lone_row(*arrays, threshold)
        assert (lone.layer, lone.label) == (expected.exit_layer[0], expected.label[0])
        assert lone.probabilities == pytest.approx(expected.probabilities[0].tolist(), abs=1e-5)
        assert lone.entropy == pytest.approx(expected.entropy[0], abs=1e-4)
        assert all(isinstance(value, float) for value in [*lone.probabilities, lone.entropy])


@contextlib.contextmanager
def _torch_forbidden(forbidden: bool) -> Iterator[None]:
    """While inside, making a torch tensor fails (when `forbidden`)."""
    if not forbidden:
        yield
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a lone row on a numpy runtime made a torch tensor")

    with mock.patch.multiple(torch, from_numpy=refuse, tensor=refuse, as_tensor=refuse, zeros=refuse, empty=refuse):
        yield


def refill_batches(tokenizer: BertTokenizerFast, thresholds: list[float], size: int) -> list[tuple]:  # type: ignore[type-arg]
    """SENTENCES (twice, so that rows of several batches meet at a layer) in batches of `size`, each row with
    its threshold from `thresholds` (cycled): what `infer_refilled` takes."""
    texts = SENTENCES * 2
    batches = []
    for start in range(0, len(texts), size):
        chunk = encode(tokenizer, texts[start : start + size])
        row_thresholds = [thresholds[(start + i) % len(thresholds)] for i in range(chunk.input_ids.shape[0])]
        batches.append((chunk.input_ids, chunk.attention_mask, chunk.token_type_ids, row_thresholds))
    return batches


def assert_refilled_matches_per_batch(
    model: DeeBert, exported: object, tokenizer: BertTokenizerFast, criterion: exit_rule.ExitCriterion | None = None
) -> None:
    """Refilled between layers (`infer_refilled`), every row leaves at the layer, with the label (probabilities
    within 1e-4), it has when its batch runs alone; no call holds more than its rows; every row exits once."""
    import pytest

    spread = thresholds_between_layers(model, encode(tokenizer))
    if criterion is not None:
        spread = [criterion.full_depth if t == 0.0 else float(1 + i % 2) for i, t in enumerate(spread)]
    for size in (3, 5):
        batches = refill_batches(tokenizer, spread, size)
        per_batch = [exported.infer(*batch, criterion=criterion) for batch in batches]  # type: ignore[attr-defined]
        refilled = exported.infer_refilled(batches, size, criterion=criterion)  # type: ignore[attr-defined]
        assert refilled.exit_layer == [layer for r in per_batch for layer in r.exit_layer]
        assert refilled.label == [label for r in per_batch for label in r.label]
        expected = torch.cat([r.probabilities for r in per_batch])
        torch.testing.assert_close(refilled.probabilities, expected, atol=1e-4, rtol=0)
        assert refilled.entropy == pytest.approx([e for r in per_batch for e in r.entropy], abs=1e-4)
        events = list(exported.iter_exits_refilled(batches, size, criterion=criterion))  # type: ignore[attr-defined]
        assert all(len(e.rows) > 0 and e.rows_run <= size for e in events)
        assert sorted(row for e in events for row in e.rows) == list(range(len(refilled.exit_layer)))
        # Refilling runs no more row-layers than the batches alone: each row runs exactly to its exit.
        assert sum(refilled.rows_per_layer) == sum(refilled.exit_layer)


def assert_exit_graph_leaves_as_the_steps(exported: Any, tokenizer: BertTokenizerFast) -> None:
    """Each sentence alone, at thresholds just above each off-ramp's entropy (and one no off-ramp meets): the exit
    graph, in one call, leaves at the layer the rule picks on the step graphs' off-ramps, with those logits, and
    `infer` answers from it without calling a step graph."""
    import pytest

    rule = exported.config.criterion
    n = exported.num_layers
    graph = exported.exit_graph
    assert graph is not None
    for text in SENTENCES:
        one = encode(tokenizer, [text])
        args = (one.input_ids, one.attention_mask, one.token_type_ids)
        off_ramps = exported.all_off_ramp_logits(*args)[:, 0]
        entropies = [rule.outputs_of(logits.tolist())[1] for logits in off_ramps]
        for threshold in [entropy + 1e-4 for entropy in entropies[:-1]] + [1e-9, 1e9]:
            if any(abs(entropy - threshold) < 1e-6 for entropy in entropies):
                continue  # a float32 graph and Python doubles may decide a tie differently
            expected = next((i for i, entropy in enumerate(entropies[:-1], 1) if entropy < threshold), n)
            found = exported.exit_in_one_call(*args, threshold)
            assert found is not None
            layer, logits = found
            assert layer == expected
            torch.testing.assert_close(torch.tensor(logits), off_ramps[layer - 1], atol=1e-5, rtol=0)
            result = exported.infer(*args, [threshold])
            assert result.exit_layer == [expected] and result.rows_per_layer == [1] * expected
            assert result.entropy == pytest.approx([entropies[expected - 1]], abs=1e-5)
