"""The Python WordPiece for printable-ASCII text gives the Rust pipeline's ids exactly, and takes nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from benchmarks import tokenizer_parity
from model.ascii_wordpiece import MAX_CHARS, AsciiWordPiece
from model.tokenization import _ascii_word_piece, load_tokenizer, tokenize
from tests.helpers import SPECIAL, WORDS, sentiment_rows, write_tsv

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "sst2-minilm-l6"

SENTENCES = [
    "it 's a charming and often affecting journey . ",
    "unflinchingly bleak and desperate ",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
    "austere locales .",
    'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .',
    "The DVD-CCA then appealed to the state Supreme Court.",
    "Shares of Genentech Inc. rose $2.49, or 3.5%, to $73.99 on 10/14/2003 -- a 52-week high!",
    "e-mail: someone@example.com; http://www.example.org/path?q=1&r=2#frag ~ ^_^ `code` {x|y} <tag>",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "ALL CAPS Mixed Case tExT",
    "tabs\tand\nline\r\nbreaks   and    spaces",
    "",
    "   ",
]
# Texts the Rust pipeline must take: beyond ASCII, control characters, added tokens, too long.
OTHERS = [
    "naïve café — “quoted” 東京 😀",
    "a bell\x07 and a nul\x00 and a vertical\x0btab",
    "first part [SEP] second part",
    "lower-case [cls] is an added token too",
    "x" * (MAX_CHARS + 1),
]


@pytest.fixture(scope="module")
def shipped() -> PreTrainedTokenizerBase:
    return load_tokenizer(SHIPPED)


def rust(tokenizer: PreTrainedTokenizerBase, text: str, pair: str | None = None) -> tuple[list[int], list[int]]:
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    encoding = backend.encode(text) if pair is None else backend.encode(text, pair)
    return encoding.ids, encoding.type_ids


def test_the_shipped_tokenizer_has_the_ascii_pipeline_and_it_answers_as_rust(shipped: PreTrainedTokenizerBase) -> None:
    pipeline = AsciiWordPiece.of(shipped.backend_tokenizer)
    assert pipeline is not None and pipeline.lowercase
    texts = SENTENCES + list(tokenizer_parity.random_inputs(1500, seed=0))
    for index, text in enumerate(texts):
        answer = pipeline.encode(text)
        assert answer is not None, repr(text)
        assert answer == rust(shipped, text), repr(text)
        pair = texts[(index * 7 + 3) % len(texts)]
        assert pipeline.encode(text, pair) == rust(shipped, text, pair), (text, pair)
    assert pipeline.encode(SENTENCES[1], "[SEP]") is None


@pytest.mark.parametrize("text", OTHERS)
def test_texts_it_does_not_take_go_to_the_rust_pipeline_with_the_same_ids(
    shipped: PreTrainedTokenizerBase, text: str
) -> None:
    pipeline = _ascii_word_piece(shipped, shipped.backend_tokenizer)
    assert pipeline is not None
    assert pipeline.encode(text) is None
    assert pipeline.encode(SENTENCES[0], text) is None
    (encoded,) = tokenize(shipped, [text], None, 100_000)
    assert (encoded.input_ids, encoded.token_type_ids) == rust(shipped, text)


@pytest.mark.parametrize("count", [3, 20])
def test_a_mixed_batch_keeps_its_order_serial_and_batched(shipped: PreTrainedTokenizerBase, count: int) -> None:
    """Texts the Python pipeline takes and texts it leaves, interleaved, few (encoded one by one) and many (the
    Rust pipeline's batch call): every text in its place, as transformers' own call encodes it."""
    texts = [(SENTENCES + OTHERS)[(index * 5) % len(SENTENCES + OTHERS)] for index in range(count)]
    pairs = [SENTENCES[index % len(SENTENCES)] for index in range(count)]
    for pair_list in (None, pairs):
        ours = tokenize(shipped, texts, pair_list, 100_000)
        theirs = shipped(texts, pair_list, truncation=False, return_token_type_ids=True)
        assert [e.input_ids for e in ours] == theirs["input_ids"]
        assert [e.token_type_ids for e in ours] == theirs["token_type_ids"]
        assert [e.num_tokens_before_truncation for e in ours] == [len(ids) for ids in theirs["input_ids"]]


@pytest.mark.parametrize("lowercase", [True, False])
def test_a_cased_or_uncased_vocabulary_of_its_own(tmp_path: Path, lowercase: bool) -> None:
    vocab = {word: i for i, word in enumerate(SPECIAL + sorted(set(WORDS)) + ["The", "##s", "##ing", "Dull", "!"])}
    BertTokenizerFast(vocab=vocab, do_lower_case=lowercase).save_pretrained(str(tmp_path))
    tokenizer = load_tokenizer(tmp_path)
    pipeline = AsciiWordPiece.of(tokenizer.backend_tokenizer)
    assert pipeline is not None and pipeline.lowercase is lowercase
    texts = ["The movie was dull!", "the Movies DULL films thing", "cats and dogs, 42 times"]
    for text in [*texts, *tokenizer_parity.random_inputs(200, seed=0)]:
        assert pipeline.encode(text) == rust(tokenizer, text), repr(text)


def test_a_pipeline_other_than_berts_wordpiece_has_none(shipped: PreTrainedTokenizerBase) -> None:
    document = json.loads(shipped.backend_tokenizer.to_str())
    document["pre_tokenizer"] = {"type": "Whitespace"}
    assert AsciiWordPiece.of(Tokenizer.from_str(json.dumps(document))) is None
    document = json.loads(shipped.backend_tokenizer.to_str())
    document["normalizer"] = {"type": "Sequence", "normalizers": [document["normalizer"]]}
    assert AsciiWordPiece.of(Tokenizer.from_str(json.dumps(document))) is None


def test_a_pipeline_that_answers_a_probe_otherwise_is_not_used(
    shipped: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probes guard against a BERT-like tokenizer this reading gets wrong: here, one read as cased."""
    read = AsciiWordPiece._read

    def misread(document: dict[str, object]) -> AsciiWordPiece | None:
        pipeline = read(document)
        return None if pipeline is None else AsciiWordPiece(**{**pipeline.__dict__, "lowercase": False})

    monkeypatch.setattr(AsciiWordPiece, "_read", staticmethod(misread))
    assert AsciiWordPiece.of(shipped.backend_tokenizer) is None


def test_tokens_added_later_are_matched_by_the_rust_pipeline(tmp_path: Path) -> None:
    vocab = {word: i for i, word in enumerate(SPECIAL + sorted(set(WORDS)))}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(str(tmp_path))
    tokenizer = load_tokenizer(tmp_path)
    text = "the movie was a Blockbuster"
    before = tokenize(tokenizer, [text], None, 64)[0].input_ids
    tokenizer.add_tokens(["blockbuster"])
    after = tokenize(tokenizer, [text], None, 64)[0].input_ids
    assert after != before and after == tokenizer(text)["input_ids"]
    assert _ascii_word_piece(tokenizer, tokenizer.backend_tokenizer) is not None


def test_long_texts_are_left_to_the_rust_pipeline_which_releases_the_gil(shipped: PreTrainedTokenizerBase) -> None:
    pipeline = AsciiWordPiece.of(shipped.backend_tokenizer)
    assert pipeline is not None
    fitting = ("word " * MAX_CHARS)[:MAX_CHARS]
    assert pipeline.encode(fitting) == rust(shipped, fitting)
    assert pipeline.encode(fitting + "s") is None


def test_the_parity_benchmark_counts_every_input_and_finds_no_difference(tmp_path: Path) -> None:
    data = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [*sentiment_rows(10), ["naïve café", "1"]])
    output = tmp_path / "parity.json"
    argv = ["--checkpoint", str(SHIPPED), "--data", str(data), "--random", "50", "--output", str(output)]
    assert tokenizer_parity.main(argv) == 0
    counts = json.loads(output.read_text())["counts"]
    assert counts[str(data)] == {"inputs": 11, "taken": 10, "different": 0}
    assert counts["random (seed 0)"] == {"inputs": 100, "taken": 100, "different": 0}


def test_the_older_bert_processing_template_reads_the_same(shipped: PreTrainedTokenizerBase) -> None:
    document = json.loads(shipped.backend_tokenizer.to_str())
    document["post_processor"] = {"type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101]}
    backend = Tokenizer.from_str(json.dumps(document))
    pipeline = AsciiWordPiece.of(backend)
    assert pipeline is not None
    for text, pair in zip(SENTENCES, [None, *SENTENCES[:-1]], strict=True):
        encoding = backend.encode(text) if pair is None else backend.encode(text, pair)
        assert pipeline.encode(text, pair) == (encoding.ids, encoding.type_ids)


def test_an_added_token_with_a_space_is_found_across_a_tab_or_line_break(tmp_path: Path) -> None:
    """The normalizer turns tabs and line breaks into spaces before added tokens are matched."""
    vocab = {word: i for i, word in enumerate(SPECIAL + sorted(set(WORDS)))}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(str(tmp_path))
    tokenizer = load_tokenizer(tmp_path)
    tokenizer.add_tokens(["the movie"])
    for text in ["the movie was good", "The\tmovie was good", "the\nmovie", "the  movie", "the mov ie"]:
        (encoded,) = tokenize(tokenizer, [text], None, 64)
        assert encoded.input_ids == rust(tokenizer, text)[0], repr(text)
