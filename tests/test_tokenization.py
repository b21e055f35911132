"""The one tokenizer path: truncation on either side keeps the special tokens and the right end of the text."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from model.tokenization import load_tokenizer, tokenize
from tests.server_helpers import write_word_vocab

LONG = "i love this cat but the movie was very dull"


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return load_tokenizer(write_word_vocab(tmp_path_factory.mktemp("words")))


def tokens(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)  # type: ignore[no-any-return]


def test_right_truncation_keeps_the_start_and_left_the_end(words: PreTrainedTokenizerBase) -> None:
    right, left, default = (tokenize(words, [LONG], None, 7, side)[0] for side in ("right", "left", None))
    assert tokens(words, right.input_ids) == ["[CLS]", "i", "love", "this", "cat", "but", "[SEP]"]
    assert tokens(words, left.input_ids) == ["[CLS]", "the", "movie", "was", "very", "dull", "[SEP]"]
    assert default == right, "the tokenizer's own side is right"
    assert right.num_tokens_before_truncation == left.num_tokens_before_truncation == 12
    assert right.truncated and left.truncated


def test_left_truncation_of_a_pair_shortens_the_longer_text_from_its_start(words: PreTrainedTokenizerBase) -> None:
    texts, pairs = ["the movie was good but the plot was dull"], ["a cat sat on the mat"]
    left = tokenize(words, texts, pairs, 10, "left")[0]
    right = tokenize(words, texts, pairs, 10, "right")[0]
    assert tokens(words, left.input_ids) == [
        "[CLS]",
        "the",
        "plot",
        "was",
        "dull",
        "[SEP]",
        "on",
        "the",
        "mat",
        "[SEP]",
    ]
    assert tokens(words, right.input_ids) == [
        "[CLS]",
        "the",
        "movie",
        "was",
        "good",
        "[SEP]",
        "a",
        "cat",
        "sat",
        "[SEP]",
    ]
    assert left.token_type_ids == right.token_type_ids == [0] * 6 + [1] * 4


def test_short_texts_are_the_same_on_either_side_and_the_tokenizer_keeps_its_own(
    words: PreTrainedTokenizerBase,
) -> None:
    short = ["the movie was good", "dull"]
    assert tokenize(words, short, None, 48, "left") == tokenize(words, short, None, 48, "right")
    tokenize(words, [LONG], None, 7, "left")
    assert words.truncation_side == "right", "left truncation must not flip the shared tokenizer"


@pytest.mark.parametrize("count", [1, 3, 12])
def test_encoding_matches_transformers_own_call_for_texts_and_pairs(words: PreTrainedTokenizerBase, count: int) -> None:
    """The server's path (the Rust backend directly, serial for a few texts, batched for more) gives exactly the
    ids transformers' own call gives, also after a truncating call has changed the backend's state."""
    texts = [" ".join(LONG.split()[: 2 + i % 9]) for i in range(count)]
    pairs = [LONG.split()[i % 10] for i in range(count)]
    tokenize(words, [LONG], None, 5)  # leaves truncation set on the backend
    for pair_list in (None, pairs):
        ours = tokenize(words, texts, pair_list, 64)
        theirs = words(texts, pair_list, truncation=False, return_token_type_ids=True)
        assert [e.input_ids for e in ours] == theirs["input_ids"]
        assert [e.token_type_ids for e in ours] == theirs["token_type_ids"]
        assert not any(e.truncated for e in ours)
