"""BERT's WordPiece tokenizer for printable-ASCII text, in Python: the same ids as the tokenizers library's
Rust pipeline, at a fraction of its cost on a lone short text.

Why: a server's lone request is tokenized soon after the model's last call has streamed its weights through the
CPU's caches, so what counts is how much memory one encoding touches. On an AVX2-only AMD EPYC (BENCHMARKS.md §29,
`python -m benchmarks.cold_tokenizing`, p50s), an SST-2 sentence took the Rust pipeline (normalizer,
pre-tokenizer, WordPiece, template, an `Encoding` with offsets and alignments) 74.5 µs after another tokenizing
call (what the server's re-warm leaves) and 140.8 µs right after the model's call; this took 38.5 and 86.7 µs: a
lowercasing, one regular expression and a dictionary lookup per word.

It takes only what it can answer exactly and leaves the rest to the Rust pipeline (`encode` returns None):
- the tokenizer must be the BERT pipeline exactly (`BertNormalizer`, `BertPreTokenizer`, `WordPiece`,
  `TemplateProcessing` or the older `BertProcessing`), as `AsciiWordPiece.of` reads from its JSON, and must answer
  a set of probe texts as the Rust pipeline does;
- the text must be printable ASCII (tabs and line breaks too), where the normalizer only lowercases and maps
  whitespace, and every character that is neither a letter, a digit nor whitespace is punctuation, a word of its
  own;
- the text must not contain any added token (`[CLS]`, `[SEP]`, ...), which the Rust pipeline matches before
  normalizing;
- and it must be at most `MAX_CHARS` long: longer texts go to the Rust pipeline, which releases the GIL.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Longer texts are encoded by the Rust pipeline: it runs without the GIL (the server tokenizes long requests on
# a worker thread beside the event loop), and the gain is per request, not per character.
MAX_CHARS = 2_000

_PRINTABLE = re.compile(r"[\t\n\r\x20-\x7e]*").fullmatch
_CASED_WORDS = re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9\s]").findall
_LOWER_WORDS = re.compile(r"[a-z0-9]+|[^a-z0-9\s]").findall
_LINE_SPACES = re.compile(r"[\t\n\r]")
_AS_SPACES = str.maketrans("\t\n\r", "   ")

# A template item: a sequence's index (0: the text, 1: its pair) or a special token's ids, with its type id.
TemplateItem = tuple[int | tuple[int, ...], int]

# Texts the pipeline must answer as the Rust one does before it is used: every printable character alone and
# together, whitespace, case, digits, words split into pieces, words with no pieces, and the longest words.
PROBES = [
    *string.printable[:95],
    string.printable[:95],
    "",
    " \t\n\r ",
    "Hello, World! It's 3:45pm -- isn't it? (Yes.) #1 e-mail: a@b.co ~x^2 $5 100% [sic]",
    "UNAFFABLE tokenization Playing unbelievably xyzzyq qqqqqqqqqqqq zzzzzzzz 1234567890123",
    "a" * 100 + " " + "b" * 101 + " " + "ab" * 60,
]


def untruncated_unpadded(backend: Any) -> None:
    """Clear a tokenizers-library `Tokenizer`'s truncation and padding (state that transformers' calls set on it),
    so that its `encode` gives every text whole."""
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()


@dataclass(frozen=True)
class AsciiWordPiece:
    """A BERT WordPiece tokenizer for printable-ASCII text (see the module's docstring)."""

    vocab: dict[str, int]
    continuations: dict[str, int]  # the pieces that continue a word, without their prefix ("##")
    unknown: int
    max_word_chars: int
    lowercase: bool
    single: tuple[TemplateItem, ...]
    pair: tuple[TemplateItem, ...]
    added_tokens: re.Pattern[str] | None  # any added token's text, case-insensitively

    @classmethod
    def of(cls, backend: Any) -> AsciiWordPiece | None:
        """The pipeline of a tokenizers-library `Tokenizer` (a fast tokenizer's `backend_tokenizer`), or None where
        it is not BERT's WordPiece exactly or answers a probe otherwise than the Rust pipeline."""
        try:
            pipeline = cls._read(json.loads(backend.to_str()))
        except (KeyError, TypeError, ValueError):
            return None
        if pipeline is None:
            return None
        untruncated_unpadded(backend)
        for index, text in enumerate(PROBES):
            other = PROBES[(index + 1) % len(PROBES)]
            for pair in (None, other):
                encoding = backend.encode(text) if pair is None else backend.encode(text, pair)
                answer = pipeline.encode(text, pair)
                if answer is not None and answer != (encoding.ids, encoding.type_ids):
                    return None
        return pipeline

    @classmethod
    def _read(cls, tokenizer: dict[str, Any]) -> AsciiWordPiece | None:
        normalizer, pre_tokenizer = tokenizer["normalizer"], tokenizer["pre_tokenizer"]
        model, template = tokenizer["model"], tokenizer["post_processor"]
        if (
            (normalizer or {}).get("type") != "BertNormalizer"
            or (pre_tokenizer or {}).get("type") != "BertPreTokenizer"
            or model.get("type") != "WordPiece"
            or (template or {}).get("type") not in ("TemplateProcessing", "BertProcessing")
        ):
            return None
        if template["type"] == "BertProcessing":  # the older form of the same template: [CLS] A [SEP] (B [SEP])
            (cls_name, cls_id), (sep_name, sep_id) = template["cls"], template["sep"]
            template = {
                "special_tokens": {cls_name: {"ids": [cls_id]}, sep_name: {"ids": [sep_id]}},
                "single": [
                    {"SpecialToken": {"id": cls_name, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": sep_name, "type_id": 0}},
                ],
                "pair": [
                    {"SpecialToken": {"id": cls_name, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": sep_name, "type_id": 0}},
                    {"Sequence": {"id": "B", "type_id": 1}},
                    {"SpecialToken": {"id": sep_name, "type_id": 1}},
                ],
            }
        vocab: dict[str, int] = dict(model["vocab"])
        prefix: str = model["continuing_subword_prefix"]
        specials = {name: tuple(token["ids"]) for name, token in template["special_tokens"].items()}

        def items(entries: list[dict[str, Any]]) -> tuple[TemplateItem, ...]:
            read: list[TemplateItem] = []
            for entry in entries:
                if "Sequence" in entry:
                    read.append(({"A": 0, "B": 1}[entry["Sequence"]["id"]], int(entry["Sequence"]["type_id"])))
                else:
                    special = entry["SpecialToken"]
                    read.append((specials[special["id"]], int(special["type_id"])))
            return tuple(read)

        added = [re.escape(token["content"]) for token in tokenizer.get("added_tokens") or [] if token["content"]]
        return cls(
            vocab=vocab,
            continuations={word[len(prefix) :]: id_ for word, id_ in vocab.items() if word.startswith(prefix)},
            unknown=vocab[model["unk_token"]],
            max_word_chars=int(model["max_input_chars_per_word"]),
            lowercase=bool(normalizer["lowercase"]),
            single=items(template["single"]),
            pair=items(template["pair"]),
            added_tokens=re.compile("|".join(added), re.IGNORECASE) if added else None,
        )

    def encode(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]] | None:
        """Token ids and type ids of a text (and its pair) with the special tokens, as the Rust pipeline gives
        them; None where this pipeline does not take the text (see the module's docstring)."""
        sequences = [self._words(text)] if pair is None else [self._words(text), self._words(pair)]
        if None in sequences:
            return None
        ids: list[int] = []
        type_ids: list[int] = []
        for item, type_id in self.single if pair is None else self.pair:
            part = sequences[item] if isinstance(item, int) else item
            ids.extend(part)  # type: ignore[arg-type]
            type_ids.extend([type_id] * len(part))  # type: ignore[arg-type]
        return ids, type_ids

    def _words(self, text: str) -> list[int] | None:
        if len(text) > MAX_CHARS or not _PRINTABLE(text):
            return None
        if self.added_tokens is not None and (
            self.added_tokens.search(text)
            # (an added token the normalizer sees: its tabs and line breaks are spaces by then)
            or (_LINE_SPACES.search(text) and self.added_tokens.search(text.translate(_AS_SPACES)))
        ):
            return None
        words: Callable[[str], list[str]] = _LOWER_WORDS if self.lowercase else _CASED_WORDS
        ids: list[int] = []
        vocab = self.vocab
        for word in words(text.lower() if self.lowercase else text):
            id_ = vocab.get(word)
            if id_ is not None:
                ids.append(id_)
            elif len(word) > self.max_word_chars:
                ids.append(self.unknown)
            else:
                ids.extend(self._pieces(word))
        return ids

    def _pieces(self, word: str) -> list[int]:
        """The longest known piece first, then the longest continuation, and so on; the unknown token for the
        whole word where some part has no piece."""
        pieces: list[int] = []
        start, table = 0, self.vocab
        while start < len(word):
            for end in range(len(word), start, -1):
                id_ = table.get(word[start:end])
                if id_ is not None:
                    pieces.append(id_)
                    start, table = end, self.continuations
                    break
            else:
                return [self.unknown]
        return pieces
