"""The one tokenizer path: truncation on either side keeps the special tokens and the right end of the text."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from transformers import PreTrainedTokenizerBase

from model.tokenization import (
    DEFAULT_SPLIT_TOKENS,
    Encoded,
    arrival_batches,
    load_tokenizer,
    pad_arrays,
    pad_batch,
    split_by_padding,
    split_tokens_setting,
    tokenize,
)
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


def padded_cost(lengths: list[int], groups: list[list[int]], call_tokens: int) -> int:
    """What `split_by_padding` minimizes: per group, one call's cost plus its rows padded to its longest."""
    return sum(call_tokens + len(group) * max(lengths[row] for row in group) for group in groups)


def test_a_batch_splits_where_calls_over_like_lengths_cost_less_than_the_padding() -> None:
    short, long = [8] * 16, [60] * 16
    assert split_by_padding(short + long, 200) == [list(range(16)), list(range(16, 32))]
    assert split_by_padding(short + long, 0) == [list(range(32))], "0: never split"
    assert split_by_padding(short + long, 16 * 52) == [list(range(32))], "a call costs more than the padding saved"
    mixed = [60, 8, 61, 9, 59, 8]
    assert split_by_padding(mixed, 20) == [[1, 5, 3], [4, 0, 2]], "rows sorted by length, shortest group first"
    assert split_by_padding(mixed, 0) == [list(range(6))], "kept whole, in its order"
    assert split_by_padding([12, 12, 13, 12], 200) == [[0, 1, 2, 3]], "a batch of like lengths stays whole"
    assert split_by_padding([30], 1) == [[0]]


def test_arrival_batches_keep_the_order_of_arrival_and_split_each_batch_alone() -> None:
    lengths = [60, 8, 61, 9, 59, 8, 12, 40, 41]
    assert arrival_batches(lengths, 4, 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]], "0: batches whole, in order"
    calls = arrival_batches(lengths, 6, 20)
    assert calls[:2] == [[1, 5, 3], [4, 0, 2]], "the first batch split as split_by_padding splits it"
    assert calls[2:] == [[6], [7, 8]], "the second batch: 12 alone, 40 and 41 together"
    assert all(max(call) - min(call) < 6 for call in calls), "no call mixes texts of two batches"
    assert sorted(itertools.chain.from_iterable(calls)) == list(range(len(lengths))), "every text once"
    assert arrival_batches([], 4, 100) == []


def test_the_split_setting_defaults_by_device_and_a_set_value_stands() -> None:
    assert split_tokens_setting(None) == split_tokens_setting(None, "cpu") == DEFAULT_SPLIT_TOKENS > 0
    assert split_tokens_setting(None, "cuda") == 0, "on a GPU batches stay whole"
    assert split_tokens_setting(40, "cuda") == 40 and split_tokens_setting(0, "cpu") == 0
    # Layers that skip the padding themselves (ONNX Runtime fp32's packed layers) take batches whole.
    assert split_tokens_setting(None, "cpu", packs_tokens=True) == 0
    assert split_tokens_setting(40, "cpu", packs_tokens=True) == 40


def test_the_split_is_the_cheapest_partition_of_the_rows_sorted_by_length() -> None:
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(3, 64) for _ in range(rng.randint(2, 8))]
        call_tokens = rng.choice([1, 10, 40, 100])
        groups = split_by_padding(lengths, call_tokens)
        assert sorted(itertools.chain.from_iterable(groups)) == list(range(len(lengths))), "every row once"
        bounds = [(min(lengths[r] for r in g), max(lengths[r] for r in g)) for g in groups]
        assert all(high <= low for (_, high), (low, _) in itertools.pairwise(bounds)), "runs of the sorted rows"
        order = sorted(range(len(lengths)), key=lambda row: lengths[row])
        cheapest = min(  # every way to cut the sorted rows into consecutive groups
            padded_cost(lengths, [order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))], call_tokens)
            for size in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), size)
        )
        assert padded_cost(lengths, groups, call_tokens) == cheapest


def test_padded_arrays_of_a_lone_text_are_those_of_any_batch() -> None:
    """A lone text takes `pad_arrays`' short way (no padding to fill); a batch is right-padded with the pad id,
    mask 0 and type 0; `pad_batch` is the same arrays as tensors."""
    short, long = Encoded([101, 7, 102], [0, 0, 0], 3), Encoded([101, 8, 9, 102, 5, 102], [0, 0, 0, 0, 1, 1], 6)
    ids, mask, types = pad_arrays([long], pad_token_id=0)
    assert ids.tolist() == [long.input_ids] and mask.tolist() == [[1] * 6] and types.tolist() == [long.token_type_ids]
    assert ids.dtype == mask.dtype == types.dtype == np.int64 and ids.flags.c_contiguous
    ids, mask, types = pad_arrays([short, long], pad_token_id=3)
    assert ids.tolist() == [[101, 7, 102, 3, 3, 3], long.input_ids]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6] and types.tolist() == [[0] * 6, long.token_type_ids]
    batch = pad_batch([short, long], pad_token_id=3)
    assert batch.input_ids.tolist() == ids.tolist() and batch.attention_mask.tolist() == mask.tolist()
    with pytest.raises(ValueError, match="empty"):
        pad_arrays([], pad_token_id=0)
