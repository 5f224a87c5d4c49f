#!/usr/bin/env bash
# The vocabulary-transfer pipeline, from the repository root: all-MiniLM-L6-v2 converted onto the 52,543-token MedEIR
# tokenizer with its ALiBi slopes scaled x 0.05 (small enough that MiniLM's attention still works untrained), the new
# tokens' embedding rows taught by word-aligned distillation from MiniLM (every other weight kept), then every weight
# by the same distillation, then domain training with the teacher kept in the loss, plus the leave-one-source-out
# (LOSO) models that evaluation.run scores out of distribution. Measured against the shipped model in docs/experiments.md, "Domain training after the
# vocabulary transfer". Every stage resumes from its last checkpoint if interrupted (run the script again).
set -euo pipefail
export HF_HUB_OFFLINE=1
PY=${PYTHON:-python}
[ -f data/manifest.json ] || $PY -m corpus.build
[ -f runs/conversion/medeir-vocab-x0.05/config.json ] || $PY -m train.initialize minilm --alibi-slope-scale 0.05 \
  --fold-positions 32 --cls-position --out runs/conversion/medeir-vocab-x0.05
# vocabulary transfer (no HPO or ICD-10-CM text, so it is shared by the main and the LOSO models): every word that uses
# a new row read alone, three passes; then 8,000 drawn texts
$PY -m train.pretrain --recipe train/recipes/pretrain-vocab-transfer-small.yaml
$PY -m train.pretrain --recipe train/recipes/pretrain-vocab-transfer-small.yaml \
  --set init=runs/vocab-transfer/words/final --set output_dir=runs/vocab-transfer/words-then-texts \
  --set distill_texts=8000 --set distill_words=0 --set batch_size=32 --set max_steps=250 --set warmup_steps=20 \
  --set save_every=125 --set eval_every=125
# then every weight by the same word-aligned distillation, 40,000 drawn texts (recovers prose before any pairs)
$PY -m train.pretrain --recipe train/recipes/pretrain-vocab-transfer-small.yaml \
  --set init=runs/vocab-transfer/words-then-texts/final --set output_dir=runs/vocab-transfer/whole-body-40k \
  --set new_rows_only=false --set distill_words=0 --set distill_texts=40000 --set batch_size=32 --set seq_len=256 \
  --set lr=1e-4 --set weight_decay=0.01 --set max_steps=1250 --set warmup_steps=50 --set save_every=250 \
  --set eval_every=250 --set seed=1
# domain training: the main model, then the same recipe with one source left out entirely
INIT=runs/vocab-transfer/whole-body-40k/final
$PY -m train.finetune --recipe train/recipes/finetune-recovery-small.yaml \
  --set "init=$INIT" --set output_dir=runs/transfer-small/finetune --set teacher_cache=runs/teacher-cache
for source in hpo icd10cm; do
  $PY -m train.finetune --recipe train/recipes/finetune-recovery-small.yaml \
    --set "init=$INIT" --set "exclude_sources=[$source]" --set "output_dir=runs/transfer-small/loso-$source" \
    --set teacher_cache=runs/teacher-cache
done
# each model exported so that it reads 8,192 tokens (the evaluation scores these folders)
for run in finetune loso-hpo loso-icd10cm; do
  $PY -m train.export "runs/transfer-small/$run/final" "runs/transfer-small/export-$run" --no-onnx
done
