#!/usr/bin/env bash
# The exact commands that produce models/medeir-small, from the repository root. On the 2-core CPU this
# repository is developed on, the fine-tuning step takes about two hours; it resumes from its last checkpoint
# if interrupted (run the script again).
set -euo pipefail
export HF_HUB_OFFLINE=1
[ -f data/manifest.json ] || python -m corpus.build
python -m train.initialize minilm --fold-positions 32 --out runs/medeir-small/init
python -m train.finetune --recipe train/recipes/finetune-small.yaml
python -m train.export runs/medeir-small/finetune/final models/medeir-small
