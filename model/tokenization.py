"""The one tokenizer path: text (or text pairs) → token ids → right-padded batch tensors.

Training, evaluation and the server all tokenize through `tokenize` and pad through `pad_batch`, so a
text is encoded the same way everywhere.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model.ascii_wordpiece import AsciiWordPiece, untruncated_unpadded


@dataclass(frozen=True)
class Encoded:
    """One tokenized input (a text or a text pair), unpadded."""

    input_ids: list[int]
    token_type_ids: list[int]
    num_tokens_before_truncation: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def truncated(self) -> bool:
        return self.num_tokens_before_truncation > len(self.input_ids)


@dataclass
class Batch:
    """Right-padded tensors for a group of encoded inputs."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.token_type_ids.to(device))


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's own (fast) tokenizer, padding on the right as the exit loop requires."""
    tokenizer = AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    tokenizer.padding_side = "right"
    return tokenizer


TruncationSide = Literal["left", "right"]


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    max_length: int,
    truncation_side: TruncationSide | None = None,
) -> list[Encoded]:
    """Encode texts (and pairs), truncating to `max_length` tokens; keeps each untruncated length.

    `truncation_side` "right" drops tokens from the end of a text, "left" from its start (the special tokens
    stay, and a pair is shortened longest first either way); None keeps the tokenizer's own side (right for
    every checkpoint this project trains)."""
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text pairs")
    pairs = list(text_pairs) if text_pairs is not None else None
    full = _untruncated(tokenizer, list(texts), pairs)
    lengths = [len(item) for item in full]
    if max(lengths, default=0) <= max_length:
        return full
    cut = _truncating_on(tokenizer, truncation_side or tokenizer.truncation_side)(
        list(texts),
        pairs,
        add_special_tokens=True,
        truncation=True,
        max_length=max_length,
        return_token_type_ids=True,
    )
    return [
        Encoded(ids, types, length)
        for ids, types, length in zip(cut["input_ids"], cut["token_type_ids"], lengths, strict=True)
    ]


# Up to this many texts are encoded one by one on the calling thread: the tokenizers library's batch call
# hands even a single text to its worker pool, and waking that pool costs more than encoding a sentence.
SERIAL_ENCODE_MAX = 8


def _untruncated(tokenizer: PreTrainedTokenizerBase, texts: list[str], pairs: list[str] | None) -> list[Encoded]:
    """Every text (and pair) encoded whole, with special tokens.

    A BERT WordPiece tokenizer encodes printable-ASCII texts in Python (`AsciiWordPiece`: the same ids at a
    fraction of the cost, BENCHMARKS.md §29); the others, and every other fast tokenizer, go through its Rust
    backend directly (what transformers' own call does inside, without its per-call bookkeeping: a tenth of a
    millisecond per request on the server's path). The backend's truncation and padding state is transformers'
    to set: it is cleared here before encoding."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is None:
        full = tokenizer(texts, pairs, add_special_tokens=True, truncation=False, return_token_type_ids=True)
        return [
            Encoded(ids, types, len(ids)) for ids, types in zip(full["input_ids"], full["token_type_ids"], strict=True)
        ]
    ascii_pipeline = _ascii_word_piece(tokenizer, backend)
    encoded: list[Encoded | None] = [None] * len(texts)
    if ascii_pipeline is not None:
        for index, text in enumerate(texts):
            answer = ascii_pipeline.encode(text, None if pairs is None else pairs[index])
            if answer is not None:
                encoded[index] = Encoded(answer[0], answer[1], len(answer[0]))
    rest = [index for index, item in enumerate(encoded) if item is None]
    if rest:
        untruncated_unpadded(backend)
        if len(rest) <= SERIAL_ENCODE_MAX:
            if pairs is None:
                encodings = [backend.encode(texts[index]) for index in rest]
            else:
                encodings = [backend.encode(texts[index], pairs[index]) for index in rest]
        else:
            encodings = backend.encode_batch(
                [texts[index] for index in rest] if pairs is None else [(texts[index], pairs[index]) for index in rest]
            )
        for index, encoding in zip(rest, encodings, strict=True):
            encoded[index] = Encoded(encoding.ids, encoding.type_ids, len(encoding.ids))
    return encoded  # type: ignore[return-value]  # every entry filled above


_ascii_pipelines: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, AsciiWordPiece | None]] = (
    weakref.WeakKeyDictionary()
)
_ascii_pipelines_lock = threading.Lock()


def _ascii_word_piece(tokenizer: PreTrainedTokenizerBase, backend: Any) -> AsciiWordPiece | None:
    """The tokenizer's `AsciiWordPiece` (None where it has none), read once, and again if tokens were added since."""
    size = backend.get_vocab_size(with_added_tokens=True)
    known = _ascii_pipelines.get(tokenizer)
    if known is not None and known[0] == size:
        return known[1]
    with _ascii_pipelines_lock:
        known = _ascii_pipelines.get(tokenizer)
        if known is None or known[0] != size:
            known = (size, AsciiWordPiece.of(backend))
            _ascii_pipelines[tokenizer] = known
    return known[1]


_other_side: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, PreTrainedTokenizerBase] = weakref.WeakKeyDictionary()
_other_side_lock = threading.Lock()


def _truncating_on(tokenizer: PreTrainedTokenizerBase, side: str) -> PreTrainedTokenizerBase:
    """`tokenizer` itself when it truncates on `side`; otherwise its copy that does, made once.

    The side is the tokenizer's own state, read at each call, and the server tokenizes on two threads (long
    inputs off the event loop), so it is never flipped per call."""
    if tokenizer.truncation_side == side:
        return tokenizer
    with _other_side_lock:
        other = _other_side.get(tokenizer)
        if other is None:
            other = copy.deepcopy(tokenizer)
            other.truncation_side = side
            _other_side[tokenizer] = other
    return other


def groups_by_length(items: Sequence[Sized], size: int) -> list[list[int]]:
    """The indices of `items`, shortest first (ties in input order), in groups of `size`: batches padded to
    their longest member waste little on padding."""
    order = sorted(range(len(items)), key=lambda index: len(items[index]))
    return [order[start : start + size] for start in range(0, len(order), size)]


# On the CPU a batch whose padding would waste more than this many tokens per extra call runs as several calls
# over rows of like length (`split_by_padding`). On an AVX2-only AMD EPYC (`python -m benchmarks.batch_split`,
# BENCHMARKS.md §20), SST-2 dev in batches of 32 in arrival order at `balanced`: every setting from 50 to 400 paid,
# 100 among the best on ONNX Runtime fp32 (1.39x the texts/s of whole batches) and the best on OpenVINO f32
# (1.18x). On a GPU batches stay whole: a call costs about the same whatever its padding, and on an NVIDIA H200
# (PyTorch float16) splitting at 100-400 ran arrival-order batches of 32 at 0.44-0.62x the texts/s of whole ones
# (loadtest/results/h200/README.md).
DEFAULT_SPLIT_TOKENS = 100


def split_tokens_setting(setting: int | None, device_type: str = "cpu", packs_tokens: bool = False) -> int:
    """The split setting a server runs with: `setting` (DEEBERT_BATCH_SPLIT_TOKENS), or where unset
    `DEFAULT_SPLIT_TOKENS` on the CPU and 0 (batches whole) on other devices and for a model whose layers skip
    the padding themselves (`packs_tokens`: ONNX Runtime fp32's packed layers). For those, whole arrival-order
    batches served a median 1.06x and 1.10x the requests/s of batches split at 100 at 32 connections (6 of 7 A/B
    pairs higher) and 0.92x and 1.02x at 4 (5 of 7) on the AVX2-only AMD EPYC (`python -m benchmarks.server_ab`,
    BENCHMARKS.md §22), and 1.03-1.08x the texts/s in process: the split keeps most calls under the padding that
    turns packing on and adds calls."""
    if setting is not None:
        return setting
    return DEFAULT_SPLIT_TOKENS if device_type == "cpu" and not packs_tokens else 0


def arrival_batches(lengths: Sequence[int], batch_size: int, call_tokens: int) -> list[list[int]]:
    """The calls a server makes of texts arriving in this order (indices into `lengths`): batches of up to
    `batch_size` in order, each split by `split_by_padding` at `call_tokens` (0: each batch one call)."""
    calls: list[list[int]] = []
    for first in range(0, len(lengths), batch_size):
        batch = range(first, min(first + batch_size, len(lengths)))
        for group in split_by_padding([lengths[row] for row in batch], call_tokens):
            calls.append([batch[index] for index in group])
    return calls


def split_by_padding(lengths: Sequence[int], call_tokens: int) -> list[list[int]]:
    """A batch's rows (indices into `lengths`) in the groups that cost least to run one call each, each padded to
    its longest: the cost of a group is `call_tokens` (one more call's fixed cost, in tokens) plus its rows ×
    its longest length. Groups are runs of the rows sorted by length, shortest first.

    Texts that arrive one per request come in any order of length, and a batch of them padded to its longest
    spends most of its work on padding; two or three calls over rows of like length cost less (SST-2 dev in
    batches of 32 in arrival order at `balanced`, `call_tokens` 100: 1.39x the texts/s on ONNX Runtime fp32 and
    1.18x on OpenVINO f32 on an AVX2-only AMD EPYC, `python -m benchmarks.batch_split`, BENCHMARKS.md §20).
    `call_tokens` 0 (or a batch padding wastes less than that on) keeps the batch whole, in its order."""
    count = len(lengths)
    if call_tokens <= 0 or count < 2 or count * max(lengths) - sum(lengths) <= call_tokens:
        return [list(range(count))]
    order = sorted(range(count), key=lambda index: lengths[index])
    ascending = [lengths[index] for index in order]
    # best[end]: the least cost of the first `end` rows in order; start[end]: where its last group begins.
    best = [0] + [0] * count
    start = [0] * (count + 1)
    for end in range(1, count + 1):
        longest = ascending[end - 1]
        costs = ((best[first] + call_tokens + (end - first) * longest, first) for first in range(end))
        best[end], start[end] = min(costs)
    groups: list[list[int]] = []
    end = count
    while end > 0:
        groups.append(order[start[end] : end])
        end = start[end]
    return groups[::-1]


def pad_arrays(items: Sequence[Encoded], pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad a group of encoded inputs to its longest member (dynamic padding), as int64 numpy arrays:
    token ids, attention mask, token types (what `pad_batch` hands to torch; the runtimes that compute on numpy
    take a lone row's arrays as they are)."""
    if not items:
        raise ValueError("cannot pad an empty batch")
    if len(items) == 1:  # a lone text has no padding: two conversions and a fill (it runs right after a model call)
        input_ids = np.array([items[0].input_ids], dtype=np.int64)
        return input_ids, np.ones_like(input_ids), np.array([items[0].token_type_ids], dtype=np.int64)
    longest = max(len(item) for item in items)
    input_ids = np.full((len(items), longest), pad_token_id, dtype=np.int64)
    token_type_ids = np.zeros((len(items), longest), dtype=np.int64)
    attention_mask = np.zeros((len(items), longest), dtype=np.int64)
    for row, item in enumerate(items):
        length = len(item)
        input_ids[row, :length] = item.input_ids
        token_type_ids[row, :length] = item.token_type_ids
        attention_mask[row, :length] = 1
    return input_ids, attention_mask, token_type_ids


def pad_batch(items: Sequence[Encoded], pad_token_id: int) -> Batch:
    """Right-pad a group of encoded inputs to its longest member (dynamic padding).

    Filled in numpy (`pad_arrays`) and handed to torch without a copy: a torch tensor per row and per field cost
    ~0.5 ms for a batch of 32 (~45 µs this way), and the ONNX Runtime and OpenVINO backends read numpy anyway."""
    input_ids, attention_mask, token_type_ids = pad_arrays(items, pad_token_id)
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(attention_mask), torch.from_numpy(token_type_ids))
