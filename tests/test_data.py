"""Data readers: formats, pairs, string labels, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.data import DataError, read_dataset
from model.tokenization import tokenize
from tests.helpers import write_tsv


def test_tsv_single_sentence_with_int_labels(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "d.tsv", ["sentence", "label"], [['it \'s "good"', "1"], ["bad", "0"]])
    data = read_dataset(path)
    assert data.texts == ['it \'s "good"', "bad"] and data.labels == [1, 0]
    assert data.label_names == ["0", "1"] and data.text_pairs is None


def test_pairs_with_string_labels_keep_their_names(tmp_path: Path) -> None:
    path = write_tsv(
        tmp_path / "rte.tsv",
        ["sentence1", "sentence2", "label"],
        [["a cat sat", "a cat", "entailment"], ["a dog", "no dog", "not_entailment"], ["x", "y", "entailment"]],
    )
    data = read_dataset(path)
    assert data.text_columns == ["sentence1", "sentence2"]
    assert data.text_pairs == ["a cat", "no dog", "y"]
    assert data.label_names == ["entailment", "not_entailment"] and data.labels == [0, 1, 0]


def test_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text('sentence,label\n"good, really",pos\nbad,neg\n')
    data = read_dataset(tmp_path / "d.csv", label_names=["neg", "pos"])
    assert data.texts == ["good, really", "bad"] and data.labels == [1, 0]
    rows = [{"sentence1": "a", "sentence2": "b", "label": 2}, {"sentence1": "c", "sentence2": "d", "label": 0}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = read_dataset(tmp_path / "d.jsonl")
    assert data.labels == [2, 0] and data.label_names == ["0", "1", "2"]


def test_int_labels_index_the_models_label_names(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "d.tsv", ["sentence", "label"], [["good", "1"], ["bad", "0"]])
    assert read_dataset(path, label_names=["negative", "positive"]).labels == [1, 0]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.tsv", None, "does not exist"),
        ("d.txt", "sentence\tlabel\n", "unknown file type"),
        ("d.tsv", "words\tlabel\nhello\t1\n", "no text column"),
        ("d.tsv", "sentence\tgold\nhello\t1\n", "no 'label' column"),
        ("d.tsv", "sentence\tlabel\n", "has no rows"),
        ("d.tsv", "sentence\tlabel\nhello\t1\textra\n", "expected 2 columns"),
        ("d.jsonl", '{"sentence": "a", "label": 1}\nnot json\n', "not valid JSON"),
    ],
)
def test_bad_data_files_fail_clearly(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_dataset(path)


def test_unknown_column_and_unknown_label_are_named(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "d.tsv", ["sentence", "label"], [["good", "great"]])
    with pytest.raises(DataError, match="unknown column"):
        read_dataset(path, text_columns=["review"])
    with pytest.raises(DataError, match="great"):
        read_dataset(path, label_names=["negative", "positive"])


def test_tokenize_truncates_and_keeps_the_full_length(tokenizer) -> None:  # type: ignore[no-untyped-def]
    long_text = " ".join(["good"] * 30)
    short, long = tokenize(tokenizer, ["good", long_text], None, 10)
    assert len(short) == 3 and not short.truncated
    assert len(long) == 10 and long.num_tokens_before_truncation == 32 and long.truncated
    pair = tokenize(tokenizer, ["the cat"], ["the dog"], 16)[0]
    assert pair.token_type_ids == [0, 0, 0, 0, 1, 1, 1]


def test_multi_label_data_reads_sets_of_labels_as_names_ids_or_json_lists(tmp_path: Path) -> None:
    tsv = tmp_path / "topics.tsv"
    tsv.write_text("sentence\tlabel\na cat\tanimals\na cat in a film\tanimals,films\nnothing\t\n")
    data = read_dataset(tsv, multi_label=True)
    assert data.labels is None and data.label_names == ["animals", "films"]
    assert data.label_sets == [[0], [0, 1], []]
    assert data.targets() == [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    assert data.subset([1]).label_sets == [[0, 1]]
    jsonl = tmp_path / "topics.jsonl"
    jsonl.write_text('{"text": "a", "label": [2, 0]}\n{"text": "b", "label": []}\n')
    by_id = read_dataset(jsonl, label_names=["x", "y", "z"], multi_label=True)
    assert by_id.label_sets == [[0, 2], []]
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"text": "a", "label": ["w"]}\n')
    with pytest.raises(DataError, match="'w' is not among the labels"):
        read_dataset(unknown, label_names=["x", "y"], multi_label=True)
