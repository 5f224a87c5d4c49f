"""Inference Endpoints handler for MedEIR: texts in, unit-length embeddings (and cosine similarities) out.

Published at the root of the Hub model repository as `handler.py`; it needs only torch and sentence-transformers.

Requests
    {"inputs": "text" | ["text", ...], "parameters": {...}}
        -> {"embeddings": [[float, ...], ...], "tokens": [int, ...], "dimension": int}
           plus "similarity": [[float, ...], ...] (cosine, inputs x inputs) when parameters.similarity is true
    {"inputs": {"source_sentence": "text", "sentences": ["text", ...]}}     (the Hub's sentence-similarity task)
        -> [float, ...]: cosine similarity of the source sentence to each sentence

Parameters (all optional)
    similarity   bool  add the inputs x inputs cosine matrix (default false)
    truncate     bool  cut inputs longer than the model's limit instead of refusing them (default false)
    batch_size   int   encoding batch size, 1 to 256 (default 32)
    prompt_name  str   one of the model's prompts (config_sentence_transformers.json), if it has any

Errors: a request that breaks a rule raises ValueError with a message naming the input and the limit. The
Endpoints toolkit answers any exception from a handler with HTTP 400 and {"error": "<message>"}, so this is
what a client sees. Limits: MEDEIR_MAX_BATCH inputs per request (default 64), the model's token limit per input
(8,192), MEDEIR_MAX_TOTAL_TOKENS per request (default 131,072).
"""

import os
from typing import Any

import torch
from sentence_transformers import SentenceTransformer

PARAMETERS = {"similarity": bool, "truncate": bool, "batch_size": int, "prompt_name": str}


class EndpointHandler:
    """Loaded once per Endpoint replica with the repository folder; called once per request."""

    def __init__(self, path: str = ""):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(path or ".", trust_remote_code=True, device=device)
        self.model.eval()
        config = getattr(self.model[0], "auto_model", None)
        limit = getattr(getattr(config, "config", None), "max_position_embeddings", None)
        self.max_tokens = min(self.model.max_seq_length, limit) if limit else self.model.max_seq_length
        self.max_batch = int(os.environ.get("MEDEIR_MAX_BATCH", 64))
        self.max_total_tokens = int(os.environ.get("MEDEIR_MAX_TOTAL_TOKENS", 131_072))

    def __call__(self, data: dict[str, Any]) -> dict[str, Any] | list[float]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('The request must be a JSON object with "inputs": a string or a list of strings.')
        parameters = self._parameters(data.get("parameters"))
        inputs = data["inputs"]
        if isinstance(inputs, dict):
            return self._sentence_similarity(inputs, parameters)
        texts = self._texts(inputs)
        tokens = self._check_total(self._check(texts, parameters["truncate"]))
        embeddings = self._encode(texts, parameters)
        result: dict[str, Any] = {
            "embeddings": embeddings.tolist(),
            "tokens": tokens,
            "dimension": int(embeddings.shape[1]),
        }
        if parameters["similarity"]:
            result["similarity"] = (embeddings @ embeddings.T).tolist()
        return result

    # -- validation ---------------------------------------------------------------------------------------------
    def _parameters(self, given: Any) -> dict[str, Any]:
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise ValueError(f'"parameters" must be an object, not {type(given).__name__}.')
        unknown = sorted(set(given) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"Unknown parameter(s) {', '.join(unknown)}; known: {', '.join(PARAMETERS)}.")
        for name, value in given.items():
            kind = PARAMETERS[name]
            # bool is a subclass of int: refuse true/false as a batch size
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f'Parameter "{name}" must be {kind.__name__}, not {type(value).__name__}.')
        out = {"similarity": False, "truncate": False, "batch_size": 32, "prompt_name": None, **given}
        if not 1 <= out["batch_size"] <= 256:
            raise ValueError(f'Parameter "batch_size" must be between 1 and 256, not {out["batch_size"]}.')
        prompts = getattr(self.model, "prompts", None) or {}
        if out["prompt_name"] is not None and out["prompt_name"] not in prompts:
            known = ", ".join(sorted(prompts)) or "none: this model has no prompts"
            raise ValueError(f'Unknown prompt_name "{out["prompt_name"]}"; known: {known}.')
        return out

    def _texts(self, inputs: Any, field: str = "inputs") -> list[str]:
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list):
            raise ValueError(f'"{field}" must be a string or a list of strings, not {type(inputs).__name__}.')
        if not texts:
            raise ValueError(f'"{field}" is an empty list: send at least one text.')
        if len(texts) > self.max_batch:
            raise ValueError(f'"{field}" has {len(texts)} texts; the limit is {self.max_batch} per request.')
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"{field}[{i}] must be a string, not {type(text).__name__}.")
            if not text.strip():
                raise ValueError(f"{field}[{i}] is empty.")
        return texts

    def _check(self, texts: list[str], truncate: bool, field: str = "inputs") -> list[int]:
        """Token counts ([CLS] and [SEP] included); refuse over-long texts unless truncation was asked for."""
        counts = [len(ids) for ids in self.model.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]
        if not truncate:
            for i, count in enumerate(counts):
                if count > self.max_tokens:
                    raise ValueError(
                        f"{field}[{i}] is {count:,} tokens long; the limit is {self.max_tokens:,} tokens "
                        '(shorten it, or pass "truncate": true to embed its first tokens only).'
                    )
        return [min(c, self.max_tokens) for c in counts]

    def _check_total(self, counts: list[int]) -> list[int]:
        if sum(counts) > self.max_total_tokens:
            raise ValueError(
                f"The request has {sum(counts):,} tokens in all; the limit is {self.max_total_tokens:,} "
                "per request: split it into several requests."
            )
        return counts

    # -- encoding -----------------------------------------------------------------------------------------------
    def _encode(self, texts: list[str], parameters: dict[str, Any]):
        return self.model.encode(
            texts,
            batch_size=parameters["batch_size"],
            prompt_name=parameters["prompt_name"],
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )

    def _sentence_similarity(self, inputs: dict[str, Any], parameters: dict[str, Any]) -> list[float]:
        missing = {"source_sentence", "sentences"} - set(inputs)
        if missing:
            raise ValueError(
                f'"inputs" as an object needs "source_sentence" and "sentences"; missing: {", ".join(sorted(missing))}.'
            )
        source = self._texts(inputs["source_sentence"], "source_sentence")
        if len(source) != 1:
            raise ValueError('"source_sentence" must be one string.')
        sentences = self._texts(inputs["sentences"], "sentences")
        texts = source + sentences
        if len(texts) > self.max_batch:
            raise ValueError(f"The request has {len(texts)} texts; the limit is {self.max_batch} per request.")
        self._check_total(
            self._check(source, parameters["truncate"], "source_sentence")
            + self._check(sentences, parameters["truncate"], "sentences")
        )
        embeddings = self._encode(texts, parameters)
        return (embeddings[1:] @ embeddings[0]).tolist()
