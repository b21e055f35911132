"""`deebert tune` and `--backend auto`: the eligibility rule, the choice, its cache, and the server using it."""

from __future__ import annotations

import logging
import os
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model import tune
from model.checkpoint import load_model
from model.onnx_export import model_digest
from model.tokenization import DEFAULT_SPLIT_TOKENS
from model.tune import (
    Candidate,
    Measurement,
    Timing,
    TuneResult,
    TuneSample,
    batched_inputs,
    cache_path,
    cached_result,
    candidate_split_tokens,
    choose,
    fingerprint,
    judge,
    make_sample,
    resolve_auto,
    run_tune,
    store_result,
)
from tests.helpers import sentiment_rows, write_tsv

FAST = Timing(batch1_rows=4, batched_rows=16, batch_size=8, rounds=1)
PLAIN_CPUS = ["avx2", "fma", "sse4_2"]


def measured(key: str, batch1_ms: float, per_s: float, agreement: float = 1.0, accuracy: float = 0.9) -> Measurement:
    return Measurement(key, batch1_ms, per_s, 0.2, agreement, 1.0, accuracy, 0.5)


def test_a_candidate_that_disagrees_with_fp32_is_rejected_however_fast() -> None:
    fast_but_wrong = judge(measured("onnxruntime-int8", 0.1, 9000, agreement=0.98), 0.9, has_answers=True)
    assert not fast_but_wrong.eligible and "98.0% < 99.5%" in fast_but_wrong.reason
    less_accurate = judge(measured("openvino-bf16", 0.2, 5000, accuracy=0.894), 0.9, has_answers=True)
    assert not less_accurate.eligible and "0.60 points below" in less_accurate.reason
    within = judge(measured("openvino-bf16", 0.2, 5000, agreement=0.995, accuracy=0.895), 0.9, has_answers=True)
    assert within.eligible
    reference = judge(measured("onnxruntime-fp32", 1.0, 1000), 0.9, has_answers=True)
    chosen = choose([fast_but_wrong, less_accurate, within, reference], "throughput")
    assert chosen is not None and chosen.candidate == "openvino-bf16"


def test_without_answers_to_check_only_fp32_may_serve() -> None:
    assert judge(measured("openvino-fp32", 1.0, 100), None, has_answers=False).eligible
    assert not judge(measured("openvino-bf16", 0.5, 900), None, has_answers=False).eligible
    not_measured = judge(Measurement("torch-fp32", reason="failed: boom"), None, has_answers=False)
    assert not not_measured.eligible and not_measured.reason == "failed: boom"


def test_split_serves_batches_of_one_and_batches_on_their_fastest() -> None:
    alone = judge(measured("onnxruntime-fp32", 0.7, 2000), 0.9, True)
    batches = judge(measured("openvino-bf16", 1.1, 2500), 0.9, True)
    wrong = judge(measured("onnxruntime-int8", 0.2, 9000, agreement=0.9), 0.9, True)
    assert tune.choose_split([alone, batches, wrong]) == (alone, batches)
    assert tune.choose_split([alone]) == (alone, alone)
    assert tune.choose_split([wrong]) is None
    result = TuneResult(fingerprint("d" * 64, 2, 32), "split", "onnxruntime-fp32", [alone, batches, wrong])
    result.batched_choice = "openvino-bf16"
    assert "batch 1 on onnxruntime-fp32" in result.reason() and "batches on openvino-bf16" in result.reason()
    marks = {row[0].strip() for row in tune.table_rows(result)}
    assert marks == {"1 onnxruntime-fp32", "B openvino-bf16", "onnxruntime-int8"}
    # One runtime fastest alone and in batches (as on an AVX2-only EPYC): the reason says it serves every size.
    one = TuneResult(fingerprint("d" * 64, 2, 32), "split", "onnxruntime-fp32", [alone, wrong])
    assert "onnxruntime-fp32 for every batch size (fastest alone and in batches)" in one.reason()


def test_a_close_call_at_batch_1_is_timed_again_side_by_side_and_decides() -> None:
    """The two fastest eligible candidates within 25 % at batch 1 are timed again in alternating order, text by
    text; each gets the mean over texts of each text's fastest pass (a slow spell in one pass costs nothing), and
    the choice follows them. Ineligible ones and clear winners are left alone."""
    quick = judge(measured("onnxruntime-fp32", 2.43, 500), 0.9, True)  # timed in a slow spell
    bf16 = judge(measured("openvino-bf16", 2.08, 1800), 0.9, True)
    wrong = judge(measured("onnxruntime-int8", 1.0, 600, agreement=0.96), 0.9, True)
    slow = judge(measured("torch-fp32", 4.4, 600), 0.9, True)
    passes = {  # three texts per pass; a slow spell in one pass of each
        "onnxruntime-fp32": iter([[1.9, 1.7, 2.0], [1.8, 9.0, 1.9], [5.0, 5.0, 5.0], [2.0, 1.8, 1.6]]),
        "openvino-bf16": iter([[2.1, 2.0, 2.2], [2.0, 2.1, 2.3], [2.05, 2.2, 2.1], [9.0, 9.0, 9.0]]),
    }
    calls: list[str] = []

    def time_one(key: str, texts: int) -> list[float]:
        calls.append(key)
        assert texts == 3
        return next(passes[key])

    measurements = [quick, bf16, wrong, slow]
    assert tune.settle_close_call(measurements, time_one, 3, rounds=4) == (bf16, quick)  # fastest first, before
    assert calls == ["openvino-bf16", "onnxruntime-fp32", "onnxruntime-fp32", "openvino-bf16"] * 2
    assert quick.batch1_ms == pytest.approx((1.8 + 1.7 + 1.6) / 3)  # each text's fastest pass, then the mean
    assert bf16.batch1_ms == pytest.approx((2.0 + 2.0 + 2.1) / 3)
    assert quick.batch1_retimed and bf16.batch1_retimed and not slow.batch1_retimed and wrong.batch1_ms == 1.0
    assert tune.choose_split(measurements) == (quick, bf16)
    result = tune.TuneResult({}, "split", "onnxruntime-fp32", measurements, batched_choice="openvino-bf16")
    retimed_cells = {row[0].strip(): row[1] for row in tune.table_rows(result)}
    assert retimed_cells["1 onnxruntime-fp32"] == "1.70 (side by side)" and retimed_cells["torch-fp32"] == "4.40"
    # A clear winner (the second over CLOSE_CALL times the first) is not timed again.
    clear = [judge(measured("onnxruntime-fp32", 1.0, 500), 0.9, True)]
    clear.append(judge(measured("openvino-bf16", 2.1, 900), 0.9, True))
    assert tune.settle_close_call(clear, time_one, 3) is None and not any(m.batch1_retimed for m in clear)


def test_a_close_call_in_batches_is_timed_again_batch_by_batch_and_decides() -> None:
    """The two fastest eligible in batches within 25 % (texts/s) are timed again side by side: each batch's
    fastest of the passes, summed, gives the texts/s. On an AVX2-only EPYC one pass of the first-start tune put
    OpenVINO fp32 ahead of ONNX Runtime fp32 in batches, where every longer measure had it behind."""
    ort = judge(measured("onnxruntime-fp32", 3.6, 324), 0.9, True)  # timed in a slow spell
    ov = judge(measured("openvino-fp32", 6.0, 335), 0.9, True)
    torch_fp32 = judge(measured("torch-fp32", 10.0, 250), 0.9, True)  # 335 / 250 > 1.25: not in it
    passes = {  # seconds of each of two batches of 32 texts; a slow spell in one pass of each
        "onnxruntime-fp32": iter([[0.09, 0.08], [0.30, 0.08], [0.08, 0.09], [0.09, 0.08]]),
        "openvino-fp32": iter([[0.10, 0.10], [0.10, 0.11], [0.10, 0.10], [0.40, 0.40]]),
    }
    calls: list[str] = []

    def time_one(key: str, texts: int) -> list[float]:
        calls.append(key)
        assert texts == 64
        return next(passes[key])

    measurements = [ort, ov, torch_fp32]
    assert tune.settle_close_call(measurements, time_one, 64, batched=True) == (ov, ort)  # fastest first, before
    assert calls == ["openvino-fp32", "onnxruntime-fp32", "onnxruntime-fp32", "openvino-fp32"] * 2
    assert ort.batched_per_s == pytest.approx(64 / (0.08 + 0.08))
    assert ov.batched_per_s == pytest.approx(64 / (0.10 + 0.10))
    assert ort.batched_retimed and ov.batched_retimed and not torch_fp32.batched_retimed
    assert not ort.batch1_retimed and ort.batch1_ms == 3.6  # the batch-1 figures are left alone
    assert tune.choose_split(measurements) == (ort, ort)
    result = tune.TuneResult({}, "split", "onnxruntime-fp32", measurements)
    cells = {row[0].strip(): row[2] for row in tune.table_rows(result)}
    assert cells["* onnxruntime-fp32"] == "400 (side by side)" and cells["torch-fp32"] == "250"
    # No time left for it: nothing is timed, nothing changes.
    assert tune.settle_close_call([ort, ov], time_one, 64, batched=True, fit=lambda a, b, n: 0) is None
    assert ort.batched_per_s == pytest.approx(400) and len(calls) == 8
    # A clear winner in batches is not timed again.
    clear = [
        judge(measured("onnxruntime-fp32", 1.0, 500), 0.9, True),
        judge(measured("openvino-bf16", 1.3, 1100), 0.9, True),
    ]
    assert tune.settle_close_call(clear, time_one, 64, batched=True) is None


def test_a_close_call_the_budget_cannot_hold_whole_is_timed_on_fewer_texts(caplog: pytest.LogCaptureFixture) -> None:
    """A first-start tune whose exports took most of its budget: the close call in batches is timed side by side
    on the texts that fit, in whole batches, rather than left to one pass each (which served batches on the
    slower runtime). Below two batches it is skipped, and the log says which."""
    ort = judge(measured("onnxruntime-fp32", 3.0, 251), 0.9, True)  # one pass each, in a slow spell
    ov = judge(measured("openvino-fp32", 5.0, 261), 0.9, True)
    # 400 texts: (1/251 + 1/261) s per text, x 1.5 x 5 passes ≈ 0.059 s per text; 10 s left fit 169: 5 batches
    with caplog.at_level(logging.INFO, logger="deebert.tune"):
        assert tune.close_call_texts(ov, ort, 400, True, left_s=10, budget_s=120, batch_size=32) == 160
        assert "allows timing them again on 160 of 400 texts" in caplog.text
        assert tune.close_call_texts(ov, ort, 400, True, left_s=30, budget_s=120, batch_size=32) == 400
        assert tune.close_call_texts(ov, ort, 400, True, left_s=3, budget_s=120, batch_size=32) == 0
        assert "would overrun the 120 s budget" in caplog.text
        assert tune.close_call_texts(ov, ort, 400, True, left_s=-5, budget_s=120, batch_size=32) == 0
        # Alone: (3 + 5) ms per text x 7.5 = 0.06 s per text; 3.03 s left fit 50 of 200 (at least 40)
        assert tune.close_call_texts(ort, ov, 200, False, left_s=3.03, budget_s=120, batch_size=32) == 50
        assert tune.close_call_texts(ort, ov, 200, False, left_s=2, budget_s=120, batch_size=32) == 0
    calls: list[int] = []

    def time_one(key: str, texts: int) -> list[float]:
        calls.append(texts)
        return [0.1] * (texts // 32) if key == "onnxruntime-fp32" else [0.12] * (texts // 32)

    def fit(first: Measurement, second: Measurement, texts: int) -> int:
        return tune.close_call_texts(first, second, texts, True, left_s=10, budget_s=120, batch_size=32)

    assert tune.settle_close_call([ort, ov], time_one, 400, batched=True, fit=fit) == (ov, ort)
    assert set(calls) == {160} and len(calls) == 2 * tune.CLOSE_CALL_ROUNDS
    assert ort.batched_per_s == pytest.approx(160 / 0.5) and ov.batched_per_s == pytest.approx(160 / 0.6)
    assert tune.choose_split([ort, ov]) == (ort, ort)


def test_batches_go_to_another_runtime_only_past_the_noise_of_one_pass() -> None:
    """With a split, a second runtime serves batches when it was timed side by side with the batch-1 choice
    and won, or when one pass each puts it ahead by more than SPLIT_MARGIN: a 4 % lead in one pass is noise."""
    alone = judge(measured("onnxruntime-fp32", 2.7, 251), 0.9, True)
    near = judge(measured("openvino-fp32", 4.7, 261), 0.9, True)
    assert tune.choose_split([alone, near]) == (alone, alone)
    result = TuneResult(fingerprint("d" * 64, 2, 32), "split", "onnxruntime-fp32", [alone, near])
    assert "fastest alone; openvino-fp32's 261 texts/s in batches, one pass each, is within 15%" in result.reason()
    far = judge(measured("openvino-bf16", 2.8, 251 * tune.SPLIT_MARGIN + 5), 0.9, True)
    assert tune.choose_split([alone, far]) == (alone, far)
    alone.batched_retimed = near.batched_retimed = True  # side by side, the 4 % lead stands
    assert tune.choose_split([alone, near]) == (alone, near)


def test_batch1_text_ms_times_each_text_on_its_own() -> None:
    """The close call's pass: one time per text, from the tune's clock (a fake one here)."""
    ticks = iter([0.0, 0.002, 0.010, 0.013])

    class Model:
        def infer(self, input_ids, attention_mask, token_type_ids, thresholds):  # type: ignore[no-untyped-def]
            return type("Result", (), {"label": [0], "exit_layer": [1]})()

    single = type("Batch", (), {"input_ids": torch.zeros(1, 3), "attention_mask": None, "token_type_ids": None})()
    times = tune.batch1_text_ms(Model(), [single, single], 0.2, lambda: next(ticks))
    assert times == pytest.approx([2.0, 3.0])


def test_the_objective_decides_between_latency_and_throughput() -> None:
    quick_alone = judge(measured("onnxruntime-fp32", 0.7, 2000), 0.9, True)
    quick_in_batches = judge(measured("openvino-bf16", 1.1, 2500), 0.9, True)
    both = [quick_alone, quick_in_batches]
    assert choose(both, "latency") is quick_alone
    assert choose(both, "throughput") is quick_in_batches
    # mixed: the mean of each one's ratio to the best (0.7 ms, 2500/s): 1.125 vs 1.29
    assert choose(both, "mixed") is quick_alone
    assert choose([judge(measured("openvino-bf16", 1, 1, agreement=0.5), 0.9, True)], "mixed") is None
    with pytest.raises(tune.TuneError, match="unknown objective"):
        choose(both, "cheapest")


def test_bf16_candidates_need_native_bf16() -> None:
    runnable, skipped = tune.available_candidates(PLAIN_CPUS)
    assert Candidate("torch", "fp32") in runnable and Candidate("torch", "bf16") not in runnable
    assert "no native bf16" in skipped["torch-bf16"]
    runnable, _ = tune.available_candidates([*PLAIN_CPUS, "avx512_bf16"])
    assert Candidate("torch", "bf16") in runnable


def test_without_openvino_the_tune_skips_it_with_a_log_line(  # type: ignore[no-untyped-def]
    monkeypatch, caplog, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    monkeypatch.setattr("model.openvino_backend.openvino_unavailable_reason", lambda: "openvino is not installed")
    runnable, skipped = tune.available_candidates(PLAIN_CPUS)
    assert all(c.backend != "openvino" for c in runnable)
    assert skipped["openvino-fp32"] == "openvino is not installed"
    with caplog.at_level(logging.INFO, logger="deebert.tune"):
        result = run_tune(tiny_checkpoint, tmp_path, threads=1, timing=FAST, candidates=[Candidate("torch", "fp32")])
    assert "openvino-fp32 not run: openvino is not installed" in caplog.text
    assert result.choice == "torch-fp32" and result.skipped["openvino-bf16"] == "openvino is not installed"


def _sampled_checkpoint(checkpoint: Path, tmp_path: Path) -> Path:
    model = load_model(checkpoint).eval()
    from model.data import read_dataset
    from model.tokenization import load_tokenizer

    data = write_tsv(tmp_path / "sample.tsv", ["sentence", "label"], sentiment_rows(40, seed=3))
    dataset = read_dataset(data, label_names=model.config.labels)
    sample = make_sample(model, load_tokenizer(checkpoint), dataset, size=24)
    sample.write(checkpoint)
    return checkpoint


def test_a_tune_measures_chooses_and_caches(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = _sampled_checkpoint(tiny_checkpoint, tmp_path)
    sample = TuneSample.read(checkpoint)
    assert sample is not None and len(sample) == 24 and sample.labels is not None
    candidates = [Candidate("torch", "fp32"), Candidate("onnxruntime", "fp32"), Candidate("openvino", "fp32")]
    result = run_tune(checkpoint, tmp_path / "cache", threads=1, objective="mixed", timing=FAST, candidates=candidates)
    assert [m.candidate for m in result.measurements] == ["onnxruntime-fp32", "openvino-fp32", "torch-fp32"]
    for m in result.measurements:
        # fp32 everywhere: the same answers as the reference, so all three may serve
        assert m.batch1_ms and m.batch1_ms > 0 and m.batched_per_s and m.batched_per_s > 0
        assert m.balanced_agreement == 1.0 and m.full_depth_agreement == 1.0 and m.eligible, m
    assert result.choice in {m.candidate for m in result.measurements}
    assert result.choice == choose(result.measurements, "mixed").candidate  # type: ignore[union-attr]
    stored = cached_result(tmp_path / "cache", result.fingerprint)
    assert stored is not None and stored.choice == result.choice and stored.to_json() == result.to_json()


def test_the_first_start_tune_checks_only_what_decides(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The server's first-start tune leaves out the full-depth labels (a table figure the rule does not read), so
    that its budget goes to the close calls; the balanced agreement and accuracy that decide are still checked."""
    checkpoint = _sampled_checkpoint(tiny_checkpoint, tmp_path)
    assert not tune.STARTUP_TIMING.full_depth_agreement
    timing = replace(FAST, full_depth_agreement=tune.STARTUP_TIMING.full_depth_agreement)
    result = run_tune(checkpoint, tmp_path / "cache", 1, "split", timing, candidates=[Candidate("torch", "fp32")])
    [m] = result.measurements
    assert m.full_depth_agreement is None and m.balanced_agreement == 1.0 and m.balanced_accuracy is not None
    assert m.eligible and result.choice == "torch-fp32" and m.seconds is not None and m.seconds <= result.seconds
    [full] = run_tune(
        checkpoint, tmp_path / "cache", 1, "split", FAST, candidates=[Candidate("torch", "fp32")]
    ).measurements
    assert full.full_depth_agreement == 1.0


def test_a_tune_times_a_close_call_again_with_the_real_runtimes(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = _sampled_checkpoint(tiny_checkpoint, tmp_path)
    monkeypatch.setattr(tune, "CLOSE_CALL", 1e9)  # every pair counts as close
    candidates = [Candidate("torch", "fp32"), Candidate("onnxruntime", "fp32")]
    result = run_tune(checkpoint, tmp_path / "cache", threads=1, objective="split", timing=FAST, candidates=candidates)
    assert all(m.batch1_retimed and m.batch1_ms and m.batch1_ms > 0 for m in result.measurements)
    assert all(m.batched_retimed and m.batched_per_s and m.batched_per_s > 0 for m in result.measurements)
    assert result.choice == min(result.measurements, key=lambda m: m.batch1_ms or 0).candidate
    batched = max(result.measurements, key=lambda m: m.batched_per_s or 0).candidate
    assert (result.batched_choice or result.choice) == batched
    stored = cached_result(tmp_path / "cache", result.fingerprint)
    assert stored is not None and all(m.batch1_retimed and m.batched_retimed for m in stored.measurements)


def test_a_close_call_that_would_overrun_the_budget_is_left_alone(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first-start tune is bounded: a close call whose passes would not fit in what is left is skipped."""
    checkpoint = _sampled_checkpoint(tiny_checkpoint, tmp_path)
    monkeypatch.setattr(tune, "CLOSE_CALL", 1e9)  # every pair counts as close ...
    monkeypatch.setattr(tune, "CLOSE_CALL_ROUNDS", 10**7)  # ... and retiming it would take days
    candidates = [Candidate("torch", "fp32"), Candidate("onnxruntime", "fp32")]
    with caplog.at_level("INFO", logger="deebert.tune"):
        result = run_tune(
            checkpoint, tmp_path / "cache", threads=1, objective="split", timing=FAST, budget_s=600,
            candidates=candidates,
        )  # fmt: skip
    assert not any(m.batch1_retimed or m.batched_retimed for m in result.measurements)
    assert result.choice is not None
    assert sum("would overrun the 600 s budget" in r.getMessage() for r in caplog.records) == 2  # alone, batches


def test_another_cpu_tunes_again_and_the_same_one_does_not(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    digest = model_digest(load_model(tiny_checkpoint))
    cache = tmp_path / "cache"
    here = fingerprint(digest, 1, 8)
    store_result(cache, TuneResult(here, "mixed", "openvino-fp32", [measured("openvino-fp32", 1.0, 500)]))
    tunes: list[Path] = []

    def counting_tune(directory: Path, *args: object, **kwargs: object) -> TuneResult:
        tunes.append(directory)
        return TuneResult(fingerprint(digest, 1, 8), "mixed", "torch-fp32", [measured("torch-fp32", 2.0, 100)])

    monkeypatch.setattr(tune, "run_tune", counting_tune)
    candidate, batched, reason = resolve_auto(tiny_checkpoint, digest, cache, 1, 8, budget_s=30)
    assert candidate == Candidate("openvino", "fp32") and batched is None and "tuned" in reason and tunes == []
    # Another CPU (other flags): the stored choice is not for it.
    name, flags = tune.cpu_description()
    monkeypatch.setattr(tune, "cpu_description", lambda: (name, [*flags, "amx_bf16"]))
    assert cache_path(cache, fingerprint(digest, 1, 8)) != cache_path(cache, here)
    candidate, _, _ = resolve_auto(tiny_checkpoint, digest, cache, 1, 8, budget_s=30)
    assert tunes == [tiny_checkpoint] and candidate == Candidate("torch", "fp32")
    # Other weights, or another batch size, are other keys too.
    assert cache_path(cache, fingerprint("0" * 64, 1, 8)) != cache_path(cache, here)
    assert cache_path(cache, fingerprint(digest, 1, 64)) != cache_path(cache, here)
    # A server that splits its batches at another setting times its batches otherwise: another key.
    assert cache_path(cache, fingerprint(digest, 1, 8, split_tokens=0)) != cache_path(cache, fingerprint(digest, 1, 8))
    # Another deebert (its graphs and loops time differently) tunes again as well.
    before = fingerprint(digest, 1, 8)
    versions = tune.runtime_versions()
    assert versions["deebert"]
    monkeypatch.setattr(tune, "runtime_versions", lambda: {**versions, "deebert": "99.0"})
    assert cache_path(cache, fingerprint(digest, 1, 8)) != cache_path(cache, before)
    monkeypatch.setattr(tune, "runtime_versions", lambda: {**versions, "deebert_code": "0" * 16})
    assert cache_path(cache, fingerprint(digest, 1, 8)) != cache_path(cache, before)


def test_the_code_digest_follows_the_sources(tmp_path: Path) -> None:
    """A changed loop or export (the same version number) is another key; the digest of the same sources is the
    same; only Python sources count."""
    (tmp_path / "loop.py").write_text("def step(): return 1\n")
    (tmp_path / "graphs.py").write_text("FORMAT = 7\n")
    first = tune.code_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("not code")
    assert tune.code_digest(tmp_path) == first and len(first) == 16
    (tmp_path / "loop.py").write_text("def step(): return 2\n")
    assert tune.code_digest(tmp_path) != first
    assert tune.runtime_versions()["deebert_code"] == tune.code_digest()  # this package's own sources


def test_no_budget_means_no_tune_and_a_line_saying_how(tiny_checkpoint: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="deebert.tune"):
        candidate, batched, reason = resolve_auto(tiny_checkpoint, "f" * 64, tmp_path, None, 32, budget_s=0)
    assert candidate == tune.default_candidate() and batched is None and "not tuned" in reason
    assert "deebert tune --checkpoint" in caplog.text


def test_the_server_serves_the_tuned_choice_and_says_why(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from server.engine import Engine
    from tests.server_helpers import settings

    digest = model_digest(load_model(tiny_checkpoint))
    print_ = fingerprint(digest, 1, 32)
    store_result(tmp_path, TuneResult(print_, "mixed", "openvino-fp32", [measured("openvino-fp32", 1.0, 500)]))
    engine = Engine.load(
        settings(checkpoint=str(tiny_checkpoint), device="cpu", cache_dir=str(tmp_path), threads=1, tune_budget_s=0)
    )
    assert engine.backend == "openvino" and engine.dtype_name == "float32"
    assert engine.backend_reason.startswith("tuned (mixed)")
    # A split: batches of one on ONNX Runtime, batches on OpenVINO, each with its own presets.
    both_measured = [measured("onnxruntime-fp32", 1.0, 500), measured("openvino-fp32", 2.0, 900)]
    split = TuneResult(print_, "split", "onnxruntime-fp32", both_measured)
    split.batched_choice = "openvino-fp32"
    store_result(tmp_path, split)
    both = Engine.load(
        settings(checkpoint=str(tiny_checkpoint), device="cpu", cache_dir=str(tmp_path), threads=1, tune_budget_s=0)
    )
    assert both.backend == "onnxruntime+openvino" and "batches on openvino-fp32" in both.backend_reason
    requested = Engine.load(
        settings(checkpoint=str(tiny_checkpoint), backend="torch", device="cpu", cache_dir=str(tmp_path))
    )
    assert requested.backend == "torch" and requested.backend_reason == "requested"


def test_a_bounded_tune_at_first_start(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """No tune stored: the engine tunes within its budget (a tiny model: seconds), stores it, and serves it."""
    from server.engine import Engine
    from tests.server_helpers import settings

    engine = Engine.load(
        settings(checkpoint=str(tiny_checkpoint), device="cpu", cache_dir=str(tmp_path), threads=1, tune_budget_s=60)
    )
    stored = cached_result(tmp_path, fingerprint(model_digest(load_model(tiny_checkpoint)), 1, 32))
    assert stored is not None and stored.choice is not None
    assert stored.sample.startswith("synthetic")  # the tiny checkpoint ships no sample: fp32 only
    assert Candidate.parse(stored.choice).precision == "fp32"
    # Whichever candidates won on this machine (timing decides): one runtime, or a split (batches of one on
    # one runtime, batches on another) served as both.
    runtimes = [Candidate.parse(stored.choice).backend]
    if stored.batched_choice is not None and stored.batched_choice != stored.choice:
        runtimes.append(Candidate.parse(stored.batched_choice).backend)
    assert engine.backend == "+".join(runtimes) and engine.backend_reason == stored.reason()


def test_a_split_model_answers_each_batch_size_on_its_runtime(tiny_checkpoint: Path, tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from model.backends import SplitExitModel
    from model.config import Preset
    from model.tune import load_served
    from tests.helpers import SENTENCES, encode

    config_path = tiny_checkpoint
    from model.config import DeeBertConfig

    config = DeeBertConfig.load(config_path)
    config.with_presets([Preset("balanced", 0.25)], runtime="openvino-fp32").save(config_path)
    served = load_served(tiny_checkpoint, Candidate("onnxruntime", "fp32"), Candidate("openvino", "fp32"), tmp_path, 1)
    assert isinstance(served, SplitExitModel) and served.backend == "onnxruntime+openvino"
    reference = load_model(tiny_checkpoint).eval()
    batch = encode(tokenizer)
    balanced = served.config.preset("balanced").threshold
    assert balanced == 0.2  # the batch-1 runtime's presets are the served ones
    calls: list[tuple[str, list[float]]] = []
    for name, part in (("single", served.single), ("batched", served.batched)):
        original = part.infer

        def spy(*args, _original=original, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            calls.append((_name, list(args[3])))
            return _original(*args, **kwargs)

        part.infer = spy  # type: ignore[method-assign]
    together = served.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [balanced] * len(SENTENCES))
    one = encode(tokenizer, [SENTENCES[0]])
    alone = served.infer(one.input_ids, one.attention_mask, one.token_type_ids, [balanced])
    # Batches on OpenVINO at its own balanced (0.25); one row on ONNX Runtime at the served balanced (0.2).
    assert calls == [("batched", [0.25] * len(SENTENCES)), ("single", [0.2])]
    expected = reference.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [0.25] * len(SENTENCES))
    assert together.exit_layer == expected.exit_layer and together.label == expected.label
    assert alone.exit_layer[0] >= 1


def test_under_a_preloaded_allocator_openvino_is_measured_and_tuned_apart(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """OpenVINO runs under jemalloc once oneTBB drops RTLD_DEEPBIND (TBB_ENABLE_SANITIZERS=1, which the check
    sets), so the tune measures it there too; kept only where a user pinned that variable otherwise. Timings
    differ by allocator, so a tune holds for one allocator."""
    pytest.importorskip("openvino")
    from model.backends import BackendError, pick_backend

    system = fingerprint("d" * 64, 2, 32)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")  # read, not loaded
    monkeypatch.setenv("TBB_ENABLE_SANITIZERS", "")  # recorded, so the value the check sets is undone after
    monkeypatch.delenv("TBB_ENABLE_SANITIZERS")
    runnable, skipped = tune.available_candidates(PLAIN_CPUS)
    assert any(c.key == "openvino-fp32" for c in runnable) and "openvino-fp32" not in skipped
    assert os.environ["TBB_ENABLE_SANITIZERS"] == "1"
    monkeypatch.setenv("TBB_ENABLE_SANITIZERS", "0")
    runnable, skipped = tune.available_candidates(PLAIN_CPUS)
    assert all(c.backend != "openvino" for c in runnable) and "TBB_ENABLE_SANITIZERS=0" in skipped["openvino-fp32"]
    with pytest.raises(BackendError, match="RTLD_DEEPBIND"):
        pick_backend("openvino", torch.device("cpu"), torch.float32)
    assert fingerprint("d" * 64, 2, 32)["allocator"] == "jemalloc" != system["allocator"]


def test_batches_are_timed_as_the_server_runs_texts_arriving_one_per_request() -> None:
    """In the sample's order, split at the server's setting: not length-sorted (which flatters every runtime)."""
    from model.tokenization import Encoded

    lengths = [30, 5, 31, 6, 29, 5, 7, 28]
    encoded = [Encoded(list(range(1, n + 1)), [0] * n, n) for n in lengths]
    whole = batched_inputs(encoded, 0, 4, 0)
    assert [tuple(b.input_ids.shape) for b in whole] == [(4, 31), (4, 29)], "in arrival order, padded to the longest"
    split = batched_inputs(encoded, 0, 4, 20)
    assert [tuple(b.input_ids.shape) for b in split] == [(2, 6), (2, 31), (2, 7), (2, 29)]
    # Unset, each candidate's batches split as the server would split them for it: whole for packed layers.
    assert Timing().split_tokens is None
    padded, packed = types.SimpleNamespace(packs_tokens=False), types.SimpleNamespace(packs_tokens=True)
    assert candidate_split_tokens(padded, Timing().split_tokens) == DEFAULT_SPLIT_TOKENS
    assert candidate_split_tokens(packed, Timing().split_tokens) == 0
    set_to_50 = Timing(split_tokens=50).split_tokens
    assert candidate_split_tokens(packed, set_to_50) == candidate_split_tokens(padded, set_to_50) == 50
