# One virtual environment for every job. torch is pinned first so pip takes the CPU build on disk
# instead of pulling several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install test speed lint demo space-index

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install  ## the test suite (CI runs this)
	$(BIN)/python -m pytest

speed: install  ## tokens/s and peak memory against length, per attention backend, next to BertModel
	$(BIN)/python -m evaluation.speed

MODEL ?= models/medeir-small
demo: install  ## the Gradio demo on $(MODEL) at http://127.0.0.1:7860 (builds its ICD-10-CM + HPO index first if needed)
	$(BIN)/python -m space.app --model $(MODEL)

space-index: install  ## precompute the demo's index embeddings of $(MODEL) and all-MiniLM-L6-v2 (re-run after retraining)
	$(BIN)/python -m space.precompute --model $(MODEL)
	$(BIN)/python -m space.precompute --model minilm

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
