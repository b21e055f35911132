"""Dev accuracy of a split (one runtime for batches of one, another for batches) at a preset, against fp32 full
depth, and how often a text's answer alone equals its answer in a batch.

    python -m benchmarks.split_accuracy --checkpoint weights/mrpc-minilm-l6 --data ../shared/data/mrpc/dev.tsv
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_model
from model.data import read_dataset
from model.tokenization import load_tokenizer, pad_batch, tokenize
from model.tune import Candidate, load_served


def _inputs(batch: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch.input_ids, batch.attention_mask, batch.token_type_ids  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--single", default="onnxruntime-fp32", help="runtime of batches of one")
    parser.add_argument("--batched", default="openvino-bf16", help="runtime of batches")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    model = load_model(args.checkpoint).eval()
    tokenizer = load_tokenizer(args.checkpoint)
    data = read_dataset(args.data, label_names=model.config.labels)
    encoded = tokenize(tokenizer, data.texts, data.text_pairs, model.config.max_length)
    gold = np.array(data.labels)
    pad = int(tokenizer.pad_token_id or 0)
    batches = [pad_batch(encoded[k : k + args.batch_size], pad) for k in range(0, len(encoded), args.batch_size)]
    with torch.inference_mode():
        full = [label for b in batches for label in model.plain_forward(*_inputs(b)).argmax(-1).tolist()]
    single, batched_runtime = Candidate.parse(args.single), Candidate.parse(args.batched)
    served = load_served(Path(args.checkpoint), single, batched_runtime, None, args.threads)
    threshold, _ = served.config.resolve_threshold(args.preset)
    batched = [label for b in batches for label in served.infer(*_inputs(b), [threshold] * len(b.input_ids)).label]
    alone = [served.infer(*_inputs(pad_batch([item], pad)), [threshold]).label[0] for item in encoded]

    def share(a: list[int], b: object) -> float:
        return 100 * float(np.mean(np.array(a) == np.array(b)))

    print(f"fp32 full depth: {share(full, gold):.2f} %")
    print(f"{args.preset} in batches of {args.batch_size} ({args.batched}): {share(batched, gold):.2f} %")
    print(f"{args.preset} alone ({args.single}): {share(alone, gold):.2f} %")
    print(f"answers alone equal to answers in batches: {share(alone, batched):.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
