"""Inference Endpoints handler for MedEIR: texts in, unit-length embeddings (and cosine similarities) out.

Published at the root of the Hub model repository as `handler.py`, beside `request_checks.py` (the request limits
and text rules it shares with the Space demo); it needs only torch and sentence-transformers (and onnxruntime with
MEDEIR_BACKEND=onnx, which runs the folder's onnx/ file through the folder's own `onnx_encoder.py`, written by
train.export; MEDEIR_ONNX_FILE picks the file, e.g. onnx/model_qint8_avx512_vnni.onnx for int8).
`python -m evaluation.endpoint_load FOLDER` measures its time and memory at the limits in an assembled repository.

Requests
    {"inputs": "text" | ["text", ...], "parameters": {...}}
        -> {"embeddings": [[number, ...], ...], "tokens": [int, ...], "dimension": int, "precision": str}
           plus "similarity": [[float, ...], ...] (cosine, inputs x inputs) when parameters.similarity is true
    {"inputs": {"source_sentence": "text", "sentences": ["text", ...]}}     (the Hub's sentence-similarity task)
        -> [float, ...]: cosine similarity of the source sentence to each sentence

Parameters (all optional)
    similarity    bool  add the inputs x inputs cosine matrix (default false)
    truncate      bool  cut inputs longer than the model's limit instead of refusing them (default false); inputs
                        over MEDEIR_MAX_CHARS characters are then cut to that many characters before tokenizing
    batch_size    int   encoding batch size, 1 to 256 (default 32); lowered so that one forward pass holds at most
                        MEDEIR_MAX_BATCH_TOKENS padded tokens
    prompt_name   str   one of the model's prompts (config_sentence_transformers.json), if it has any
    truncate_dim  int   keep the first N dimensions (Matryoshka) and renormalise, 1 to the model's dimension
    precision     str   "float32" (default), "int8", "uint8", "binary" or "ubinary" (sentence-transformers'
                        quantize_embeddings; binary ones are packed 8 dimensions per number). int8 / uint8 use
                        per-dimension ranges calibrated once per replica on the model's embeddings of 2,048
                        vocabulary words, so they compare across requests and replicas. "similarity" is always
                        computed in float32.

`tokens` counts what the model reads for each input: the prompt, the text, [CLS] and [SEP].

Errors: a request that breaks a rule raises ValueError with a message naming the input and the limit. The
Endpoints toolkit answers any exception from a handler with HTTP 400 and {"error": "<message>"}, so this is
what a client sees. The limits (environment variables, checked when the replica starts) are HANDLER_LIMITS in
request_checks.py; the model's token limit per input is 8,192. A fault of the deployment (weights that give NaN)
raises RuntimeError.
"""

import importlib.util
import os
import threading
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

try:  # the current module path; the older one (deprecated in 6.2) where it is missing
    from sentence_transformers.util.quantization import quantize_embeddings
except ImportError:
    from sentence_transformers.quantization import quantize_embeddings

# beside this file in the model repository (hub.publish copies it), at the root of the source repository
from request_checks import HANDLER_LIMITS as LIMITS
from request_checks import TokenCounter, has_visible_text, lone_surrogate, read_limits

PARAMETERS = {
    "similarity": bool,
    "truncate": bool,
    "batch_size": int,
    "prompt_name": str,
    "truncate_dim": int,
    "precision": str,
}
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
# MEDEIR_BACKEND: "torch" (sentence-transformers, the default) or "onnx" (onnxruntime on the folder's ONNX file,
# MEDEIR_ONNX_FILE, default onnx/model.onnx; onnx/model_qint8_avx512_vnni.onnx is the int8 one). The ONNX graph
# materialises each attention matrix, so its memory grows with the square of the input length.
BACKENDS = ("torch", "onnx")
ONNX_FILE = "onnx/model.onnx"
CALIBRATION_WORDS = 2048


def _onnx_model(path: str, file_name: str):
    """The folder's ONNX encoder and its config, the folder's tokenizer files checked against it by the folder's own
    remote code (`modeling_medeir.check_tokenizer_matches`, as AutoModel loading does)."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    for name in (file_name, "onnx_encoder.py"):  # train.export writes both into every model folder
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(
                f"MEDEIR_BACKEND=onnx but {os.path.join(path, name)} does not exist: export it first "
                f"(python -m train.export --onnx-only FOLDER)."
            )
    # The folder's own encoder, like its remote code: the one that was exported and checked with these files.
    spec = importlib.util.spec_from_file_location("medeir_onnx_encoder", os.path.join(path, "onnx_encoder.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    get_class_from_dynamic_module("modeling_medeir.check_tokenizer_matches", path)(config, path)
    return module.OnnxEncoder(path, file_name), config


class EndpointHandler:
    """Loaded once per Endpoint replica with the repository folder; called once per request, from several threads."""

    def __init__(self, path: str = ""):
        limits = read_limits(LIMITS)  # before the model loads: a bad setting fails at once
        self.max_batch = limits["MEDEIR_MAX_BATCH"]
        self.max_chars = limits["MEDEIR_MAX_CHARS"]
        self.max_total_chars = limits["MEDEIR_MAX_TOTAL_CHARS"]
        self.max_total_tokens = limits["MEDEIR_MAX_TOTAL_TOKENS"]
        self.max_batch_tokens = limits["MEDEIR_MAX_BATCH_TOKENS"]
        backend = os.environ.get("MEDEIR_BACKEND", "torch").strip() or "torch"
        if backend not in BACKENDS:
            raise ValueError(f"MEDEIR_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}; fix the setting.")
        self.backend = backend
        if backend == "onnx":
            self.model, config = _onnx_model(path or ".", os.environ.get("MEDEIR_ONNX_FILE") or ONNX_FILE)
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model = SentenceTransformer(path or ".", trust_remote_code=True, device=device)
            self.model.eval()
            encoder = getattr(self.model[0], "auto_model", None)
            config = getattr(encoder, "config", None)
            if hasattr(encoder, "check_tokenizer"):  # the loaded tokenizer object must be this model's own
                encoder.check_tokenizer(self.model.tokenizer, f"the tokenizer of {path or '.'}")
            bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
            if bad:
                raise RuntimeError(
                    f"The model's weights contain NaN or infinity ({', '.join(bad[:5])}): redeploy them."
                )
        limit = getattr(config, "max_position_embeddings", None)
        self.max_tokens = min(self.model.max_seq_length, limit) if limit else self.model.max_seq_length
        self.dimension = self.model.get_embedding_dimension()
        # the ONNX encoder keeps its own non-truncating copy of the tokenizer
        self._count = TokenCounter(self.model.tokenizer, self.model.counter if backend == "onnx" else None)
        self._ranges: np.ndarray | None = None
        self._ranges_lock = threading.Lock()

    def __call__(self, data: dict[str, Any]) -> dict[str, Any] | list[float]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('The request must be a JSON object with "inputs": a string or a list of strings.')
        parameters = self._parameters(data.get("parameters"))
        inputs = data["inputs"]
        if isinstance(inputs, dict):
            return self._sentence_similarity(inputs, parameters)
        texts = self._texts(inputs, parameters["truncate"])
        self._check_total_chars(texts)
        tokens = self._check_total(self._check(texts, parameters))
        embeddings = self._encode(texts, tokens, parameters)
        result: dict[str, Any] = {
            "embeddings": self._quantize(embeddings, parameters["precision"]).tolist(),
            "tokens": tokens,
            "dimension": int(embeddings.shape[1]),
            "precision": parameters["precision"],
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
        defaults = {"similarity": False, "truncate": False, "batch_size": 32, "prompt_name": None}
        out = {**defaults, "truncate_dim": None, "precision": "float32", **given}
        if not 1 <= out["batch_size"] <= 256:
            raise ValueError(f'Parameter "batch_size" must be between 1 and 256, not {out["batch_size"]}.')
        prompts = getattr(self.model, "prompts", None) or {}
        if out["prompt_name"] is not None and out["prompt_name"] not in prompts:
            known = ", ".join(sorted(prompts)) or "none: this model has no prompts"
            raise ValueError(f'Unknown prompt_name "{out["prompt_name"]}"; known: {known}.')
        if out["truncate_dim"] is not None and not 1 <= out["truncate_dim"] <= self.dimension:
            raise ValueError(
                f'Parameter "truncate_dim" must be between 1 and {self.dimension} (the model\'s dimension), '
                f"not {out['truncate_dim']}."
            )
        if out["precision"] not in PRECISIONS:
            raise ValueError(f'Parameter "precision" must be one of {", ".join(PRECISIONS)}, not "{out["precision"]}".')
        return out

    def _texts(self, inputs: Any, truncate: bool, field: str = "inputs") -> list[str]:
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list):
            raise ValueError(f'"{field}" must be a string or a list of strings, not {type(inputs).__name__}.')
        if not texts:
            raise ValueError(f'"{field}" is an empty list: send at least one text.')
        if len(texts) > self.max_batch:
            raise ValueError(f'"{field}" has {len(texts)} texts; the limit is {self.max_batch} per request.')
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"{field}[{i}] must be a string, not {type(text).__name__}.")
            if len(text) > self.max_chars:
                if not truncate:
                    raise ValueError(
                        f"{field}[{i}] is {len(text):,} characters long; the limit is {self.max_chars:,} characters "
                        f'(and {self.max_tokens:,} tokens) per text. Shorten it, or pass "truncate": true to embed '
                        "its first tokens only."
                    )
                text = text[: self.max_chars]
            position = lone_surrogate(text)
            if position is not None:
                raise ValueError(
                    f"{field}[{i}] has a lone UTF-16 surrogate at character {position}: send valid Unicode text."
                )
            if not has_visible_text(text):
                raise ValueError(
                    f"{field}[{i}] is empty: it has no letters, digits or symbols "
                    "(only whitespace, control or invisible formatting characters)."
                )
            out.append(text)
        return out

    def _check_total_chars(self, texts: list[str]) -> None:
        total = sum(map(len, texts))
        if total > self.max_total_chars:
            raise ValueError(
                f"The request has {total:,} characters in all; the limit is {self.max_total_chars:,} per request: "
                "split it into several requests."
            )

    def _prompt(self, prompt_name: str | None) -> str:
        """The prompt sentence-transformers prepends: the named one, else the model's default, else none."""
        name = prompt_name if prompt_name is not None else getattr(self.model, "default_prompt_name", None)
        return (getattr(self.model, "prompts", None) or {}).get(name) or "" if name is not None else ""

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens the model reads per text ([CLS] and [SEP] included, no truncation); safe from any thread."""
        return self._count(texts)

    def _check(self, texts: list[str], parameters: dict[str, Any], field: str = "inputs") -> list[int]:
        """Token counts as the model reads them (prompt included); refuse over-long texts unless truncating."""
        prompt = self._prompt(parameters["prompt_name"])
        counts = self.count_tokens([prompt + text for text in texts])
        if not parameters["truncate"]:
            for i, count in enumerate(counts):
                if count > self.max_tokens:
                    with_prompt = f" with the {parameters['prompt_name'] or 'default'} prompt" if prompt else ""
                    raise ValueError(
                        f"{field}[{i}] is {count:,} tokens long{with_prompt}; the limit is {self.max_tokens:,} tokens "
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
    def _encode(self, texts: list[str], tokens: list[int], parameters: dict[str, Any]) -> np.ndarray:
        """Unit-length float32 embeddings, truncated to `truncate_dim` and renormalised when asked."""
        # sentence-transformers pads each batch to its longest text: cap the padded tokens of one forward pass
        batch_size = max(1, min(parameters["batch_size"], self.max_batch_tokens // max(tokens)))
        embeddings = self.model.encode(
            texts,
            batch_size=batch_size,
            prompt_name=parameters["prompt_name"],
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        ).astype(np.float32)
        finite = np.isfinite(embeddings).all(axis=1)
        if not finite.all():
            rows = ", ".join(str(i) for i in np.flatnonzero(~finite)[:10])
            raise RuntimeError(
                f"The model returned NaN or infinite embeddings (inputs {rows}): a fault of this deployment "
                "(its weights or dtype), not of the request."
            )
        if parameters["truncate_dim"] is not None:
            embeddings = embeddings[:, : parameters["truncate_dim"]]
            norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
            embeddings = embeddings / np.where(norms > 0, norms, 1)
        return embeddings

    def _quantize(self, embeddings: np.ndarray, precision: str) -> np.ndarray:
        if precision == "float32":
            return embeddings
        ranges = None
        if precision.endswith("int8"):
            ranges = self.int8_ranges()[:, : embeddings.shape[1]]
        return quantize_embeddings(embeddings, precision=precision, ranges=ranges)

    def int8_ranges(self) -> np.ndarray:
        """(2, dimension) per-dimension minimum and maximum, from the model's embeddings of vocabulary words.

        Fixed for the replica (and the same on every replica of the model), so int8 embeddings of different
        requests are on one scale. Computed on the first int8 request.
        """
        with self._ranges_lock:
            if self._ranges is None:
                vocab = sorted(self.model.tokenizer.get_vocab().items(), key=lambda item: item[1])
                words = [w for w, _ in vocab if w.isalpha() and len(w) >= 4][:CALIBRATION_WORDS]
                calibration = self.model.encode(
                    words, batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
                )
                self._ranges = np.stack([calibration.min(axis=0), calibration.max(axis=0)]).astype(np.float32)
            return self._ranges

    def _sentence_similarity(self, inputs: dict[str, Any], parameters: dict[str, Any]) -> list[float]:
        missing = {"source_sentence", "sentences"} - set(inputs)
        if missing:
            raise ValueError(
                f'"inputs" as an object needs "source_sentence" and "sentences"; missing: {", ".join(sorted(missing))}.'
            )
        source = self._texts(inputs["source_sentence"], parameters["truncate"], "source_sentence")
        if len(source) != 1:
            raise ValueError('"source_sentence" must be one string.')
        sentences = self._texts(inputs["sentences"], parameters["truncate"], "sentences")
        texts = source + sentences
        if len(texts) > self.max_batch:
            raise ValueError(f"The request has {len(texts)} texts; the limit is {self.max_batch} per request.")
        self._check_total_chars(texts)
        tokens = self._check_total(
            self._check(source, parameters, "source_sentence") + self._check(sentences, parameters, "sentences")
        )
        embeddings = self._encode(texts, tokens, parameters)
        return (embeddings[1:] @ embeddings[0]).tolist()
