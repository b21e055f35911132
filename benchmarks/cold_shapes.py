"""What a new input shape costs: the first forward at each sequence length against a repeat of it.

A server meets new (batch, length) shapes all the time, so a kernel library that plans per shape (cuDNN's
attention on CUDA) makes every first request of a length slow. This times, for each length in a range, the
first plain full forward at that length and the median of repeats, at the given batch sizes; on CUDA once with
cuDNN attention and once without (what `deebert serve` runs), each on lengths the other has not seen.

    python -m benchmarks.cold_shapes --checkpoint weights/sst2-minilm-l6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import load_model
from model.device import dtype_name, model_device, pick_device, pick_dtype, prepare, synchronize
from model.modeling import DeeBert
from model.tokenization import Batch, load_tokenizer, pad_batch, tokenize
from reports.common import machine_description


def batch_of(tokenizer: Any, tokens: int, rows: int, device: torch.device) -> Batch:
    """`rows` texts of exactly `tokens` tokens (special tokens included)."""
    text = " ".join(["good"] * max(1, tokens - 2))
    return pad_batch(tokenize(tokenizer, [text] * rows, None, tokens), tokenizer.pad_token_id).to(device)


def _ms(model: DeeBert, batch: Batch) -> float:
    device = model_device(model)
    synchronize(device)
    started = time.perf_counter()
    model.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    synchronize(device)
    return 1000 * (time.perf_counter() - started)


@torch.inference_mode()
def first_and_repeat(
    model: DeeBert, tokenizer: Any, lengths: Sequence[int], rows: int, repeats: int = 5
) -> dict[str, Any]:
    """Per length: the first forward's ms and the median of `repeats` more."""
    device = model_device(model)
    first, repeat = [], []
    for tokens in lengths:
        batch = batch_of(tokenizer, tokens, rows, device)
        first.append(_ms(model, batch))
        repeat.append(statistics.median(_ms(model, batch) for _ in range(repeats)))
    return {
        "batch_size": rows,
        "lengths": list(lengths),
        "first_ms": first,
        "repeat_ms": repeat,
        "first_ms_median": statistics.median(first),
        "repeat_ms_median": statistics.median(repeat),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="weights/sst2-minilm-l6")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, ...")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated (1,8)")
    parser.add_argument("--min-length", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--step", type=int, default=4, help="every STEP-th length, odd/even offsets per variant")
    parser.add_argument("--output", help="also write the results as JSON here")
    words = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(words)
    device = pick_device(args.device)
    model = load_model(args.checkpoint, dtype=pick_dtype(args.dtype, device)).to(device).eval()
    tokenizer = load_tokenizer(args.checkpoint)
    variants = ["cuDNN attention", "without cuDNN attention (served)"] if device.type == "cuda" else ["default"]
    dtype = dtype_name(next(model.parameters()).dtype)
    print(f"{model.config.name} on {device} in {dtype}: first forward at a new length vs repeats, ms (medians)")
    with torch.inference_mode():  # the process's one-off start-up (CUDA context, allocator) is not a shape's cost
        _ms(model, batch_of(tokenizer, args.min_length - 1, 1, device))
    results = []
    for offset, variant in enumerate(variants):
        prepare(device, cudnn_attention=offset == 0)
        # Each variant on lengths no earlier variant ran, so its first calls are first for every library.
        lengths = range(args.min_length + offset, args.max_length + 1, args.step)
        for rows in (int(b) for b in args.batch_sizes.split(",")):
            result = first_and_repeat(model, tokenizer, lengths, rows)
            result["variant"] = variant
            results.append(result)
            print(
                f"  {variant:<34} batch {rows:>3}: first {result['first_ms_median']:7.2f}  "
                f"repeat {result['repeat_ms_median']:7.2f}  "
                f"(lengths {lengths.start}..{lengths.stop - 1} step {args.step})"
            )
    if args.output:
        report: dict[str, Any] = {
            "command": " ".join(["python -m benchmarks.cold_shapes", *words]),
            "machine": machine_description(),
            "results": results,
        }
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
