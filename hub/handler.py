"""Inference Endpoints handler for MedEIR: texts in, unit-length embeddings (and cosine similarities) out.

Published at the root of the Hub model repository as `handler.py`; it needs only torch and sentence-transformers
(and onnxruntime with MEDEIR_BACKEND=onnx, which runs the folder's onnx/ file through the folder's own `onnx_encoder.py`,
written by train.export; MEDEIR_ONNX_FILE picks the file, e.g. onnx/model_qint8_avx512_vnni.onnx for int8).

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
what a client sees. The limits (environment variables, checked when the replica starts) are in LIMITS below; the
model's token limit per input is 8,192. A fault of the deployment (weights that give NaN) raises RuntimeError.
"""

import copy
import importlib.util
import os
import threading
import unicodedata
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

try:  # the current module path; the older one (deprecated in 6.2) where it is missing
    from sentence_transformers.util.quantization import quantize_embeddings
except ImportError:
    from sentence_transformers.quantization import quantize_embeddings

# Deployer-set limits: environment variable -> default. Checked before any tokenizing, cheapest first, so an
# oversized request is refused in milliseconds and bounded memory.
LIMITS = {
    "MEDEIR_MAX_BATCH": 64,  # texts per request
    "MEDEIR_MAX_CHARS": 100_000,  # characters per text (8,192 tokens of medical prose are ~35,000)
    "MEDEIR_MAX_TOTAL_CHARS": 1_000_000,  # characters per request
    "MEDEIR_MAX_TOTAL_TOKENS": 131_072,  # tokens per request, prompts included
    "MEDEIR_MAX_BATCH_TOKENS": 16_384,  # padded tokens per forward pass: bounds peak memory, not what is accepted
}
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


def read_limits(environ: Any = os.environ) -> dict[str, int]:
    """The limits from the environment; a value that is not a positive integer stops the replica at start-up."""
    limits = {}
    for name, default in LIMITS.items():
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            limits[name] = default
            continue
        try:
            value = int(raw.strip().replace("_", ""))
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{name}={raw!r} is not a positive integer (default {default:,}); fix the setting.")
        limits[name] = value
    return limits


def has_visible_text(text: str) -> bool:
    """True if `text` has a letter, digit, punctuation mark or symbol: whitespace, control and formatting characters
    (NUL, zero-width spaces, BOMs) and lone combining marks are dropped by the tokenizer's normaliser."""
    return any(unicodedata.category(char)[0] in "LNPS" for char in text)


def lone_surrogate(text: str) -> int | None:
    """Position of the first lone UTF-16 surrogate (which no tokenizer can encode), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _onnx_model(path: str, file_name: str):
    """The folder's ONNX encoder and its config (loading the config checks the tokenizer files against it)."""
    from transformers import AutoConfig

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
    return module.OnnxEncoder(path, file_name), AutoConfig.from_pretrained(path, trust_remote_code=True)


class EndpointHandler:
    """Loaded once per Endpoint replica with the repository folder; called once per request, from several threads."""

    def __init__(self, path: str = ""):
        limits = read_limits()  # before the model loads: a bad setting fails at once
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
            config = getattr(getattr(self.model[0], "auto_model", None), "config", None)
            if hasattr(config, "check_tokenizer"):  # the loaded tokenizer object must be this model's own
                config.check_tokenizer(self.model.tokenizer, f"the tokenizer of {path or '.'}")
            bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
            if bad:
                raise RuntimeError(
                    f"The model's weights contain NaN or infinity ({', '.join(bad[:5])}): redeploy them."
                )
        limit = getattr(config, "max_position_embeddings", None)
        self.max_tokens = min(self.model.max_seq_length, limit) if limit else self.model.max_seq_length
        self.dimension = self.model.get_embedding_dimension()
        # Token counts come from a private copy of the tokenizer that never pads or truncates. The model's own
        # tokenizer is reconfigured (padding, truncation) by every encode call: counting with it from several
        # request threads at once flipped its state under a concurrent encode.
        fast = getattr(self.model.tokenizer, "backend_tokenizer", None)
        if backend == "onnx":
            fast = self.model.counter  # the encoder's own non-truncating copy
        self._counter = copy.deepcopy(fast) if fast is not None else None
        if self._counter is not None:
            self._counter.no_padding()
            self._counter.no_truncation()
        self._count_lock = threading.Lock()  # only for a slow (Python) tokenizer
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
        if self._counter is not None:
            return [len(e.ids) for e in self._counter.encode_batch(texts, add_special_tokens=True)]
        with self._count_lock:
            encoded = self.model.tokenizer(texts, add_special_tokens=True, truncation=False, padding=False)
        return [len(ids) for ids in encoded["input_ids"]]

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


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_case(model: str, case: str) -> dict[str, Any]:
    """Seconds and peak resident memory of one request at the limits (one case per fresh process)."""
    import time

    handler = EndpointHandler(model)
    before = _peak_rss_bytes()
    word = "word "  # one token in bert-base-uncased and MedEIR vocabularies: requests of exact token counts
    if case == "refuse-oversized":
        request = {"inputs": "x" * 30_000_000}
    elif case == "worst-accepted":  # the most padded tokens the limits allow in one request
        per_text = min(handler.max_tokens, handler.max_total_tokens // handler.max_batch)
        texts = [word * (per_text - 2)] * min(handler.max_batch, handler.max_total_tokens // per_text)
        request = {"inputs": texts, "parameters": {"batch_size": 256}}
    elif case == "longest-accepted":  # the longest texts, as many as the limits allow
        longest = min(handler.max_tokens, handler.max_total_tokens)
        texts = [word * (longest - 2)] * min(handler.max_batch, handler.max_total_tokens // longest)
        request = {"inputs": texts, "parameters": {"batch_size": 256}}
    else:
        raise ValueError(f"unknown case {case!r}")
    start = time.perf_counter()
    try:
        result = handler(request)
        outcome = f"{len(result['embeddings'])} embeddings, {sum(result['tokens']):,} tokens"
    except ValueError as err:
        outcome = f"refused: {str(err)[:120]}"
    return {
        "case": case,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_gb": round(_peak_rss_bytes() / 1e9, 3),
        "rss_before_gb": round(before / 1e9, 3),
        "outcome": outcome,
        "limits": read_limits(),
    }


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import subprocess
    import sys

    parser = argparse.ArgumentParser(description="Measure the handler's limits (run on an idle machine).")
    parser.add_argument("--measure", metavar="MODEL", required=True, help="model folder, e.g. models/medeir-small")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(_measure_case(args.measure, args.case)))
        return
    for case in ("refuse-oversized", "worst-accepted", "longest-accepted"):
        command = [sys.executable, "-m", "hub.handler", "--measure", args.measure, "--case", case]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        print(result.stdout.strip().splitlines()[-1] if result.returncode == 0 else f"{case}: {result.stderr[-500:]}")


if __name__ == "__main__":
    main()
