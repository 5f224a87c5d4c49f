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

A late-interaction (ColBERT) folder, one that sentence-transformers' MultiVectorEncoder saved (train.colbert's output;
its config_sentence_transformers.json says "model_type": "MultiVectorEncoder"), is loaded as a MultiVectorEncoder and
serves one vector per token instead:
    {"inputs": "text" | ["text", ...], "parameters": {"output": "multi_vector", "input_type": "query" | "document"}}
        -> {"multi_vectors": [[[number, ...], ...], ...], "tokens": [int, ...], "dimension": int, "input_type": str}
           multi_vectors[i]: input i's token vectors in token order, as MultiVectorEncoder's encode_query /
           encode_document give them (projected, unit length; padding and, for documents, the model's skiplisted
           tokens such as punctuation dropped; query expansion tokens added if the model expands queries)

Parameters (all optional)
    output        str   "dense" (default: one embedding per text) or "multi_vector" (token vectors); each needs a folder
                        of its kind, and the other is refused with a message naming what the folder is
    input_type    str   multi_vector only: "document" (default: the document length, prompt and skiplist) or "query"
                        (the model's query length, 128 tokens for train.colbert's, query prompt and query expansion)
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
For "output": "multi_vector", "truncate" cuts at the side's token limit (queries: the model's query length),
"prompt_name" replaces the side's own prompt, "truncate_dim" keeps the first N dimensions of every token vector and
renormalises it, and "similarity" or a precision other than "float32" is refused: token vectors are scored with MaxSim,
which the client computes from them.

`tokens` counts what the model reads for each input: the prompt, the text, [CLS] and [SEP] (for multi-vector output
after the cut at the side's limit, without query expansion tokens).

Errors: a request that breaks a rule raises ValueError with a message naming the input and the limit. The
Endpoints toolkit answers any exception from a handler with HTTP 400 and {"error": "<message>"}, so this is
what a client sees. The limits (environment variables, checked when the replica starts) are HANDLER_LIMITS in
request_checks.py; the model's token limit per input is 8,192. MEDEIR_MAX_TOTAL_VECTORS (default 16,384) bounds the
token vectors of one multi-vector response: each input's count is known from the tokenizer before anything is
encoded, and a request over the limit is refused then. A fault of the deployment (weights that give NaN) raises
RuntimeError; a multi-vector folder whose vector counts the handler cannot predict (token pooling, say) stops the
replica at start-up.

Threads: token counts use private tokenizer copies, so any number of requests are checked at once. Dense requests
encode concurrently; multi-vector encodes run one at a time, because queries and documents set different truncation
and padding on the model's one tokenizer, and two at once would cut each other's texts.
"""

import importlib.util
import json
import os
import threading
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.multi_vector_encoder import MultiVectorEncoder
from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

try:  # the current module path; the older one (deprecated in 6.2) where it is missing
    from sentence_transformers.util.quantization import quantize_embeddings
except ImportError:
    from sentence_transformers.quantization import quantize_embeddings

# beside this file in the model repository (hub.publish copies it), at the root of the source repository
from request_checks import HANDLER_LIMITS as LIMITS
from request_checks import TokenCounter, has_visible_text, lone_surrogate, read_limits

PARAMETERS = {
    "output": str,
    "input_type": str,
    "similarity": bool,
    "truncate": bool,
    "batch_size": int,
    "prompt_name": str,
    "truncate_dim": int,
    "precision": str,
}
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
OUTPUTS = ("dense", "multi_vector")
INPUT_TYPES = ("document", "query")
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


def folder_kind(path: str) -> str:
    """ "multi_vector" for a folder a MultiVectorEncoder saved (its config_sentence_transformers.json says so), else
    "dense"."""
    settings = os.path.join(path, "config_sentence_transformers.json")
    if os.path.isfile(settings):
        with open(settings, encoding="utf-8") as f:
            if json.load(f).get("model_type") == "MultiVectorEncoder":
                return "multi_vector"
    return "dense"


def skiplist_ids(mask: MultiVectorMask, tokenizer) -> frozenset[int]:
    """The ids of the mask's skiplist words, resolved as MultiVectorMask resolves them (words the vocabulary lacks
    would be [UNK] and are left out)."""
    ids = ((tokenizer.convert_tokens_to_ids(word), word) for word in mask.skiplist_words)
    return frozenset(i for i, word in ids if i != tokenizer.unk_token_id or word == tokenizer.unk_token)


class EndpointHandler:
    """Loaded once per Endpoint replica with the repository folder; called once per request, from several threads."""

    def __init__(self, path: str = ""):
        limits = read_limits(LIMITS)  # before the model loads: a bad setting fails at once
        self.max_batch = limits["MEDEIR_MAX_BATCH"]
        self.max_chars = limits["MEDEIR_MAX_CHARS"]
        self.max_total_chars = limits["MEDEIR_MAX_TOTAL_CHARS"]
        self.max_total_tokens = limits["MEDEIR_MAX_TOTAL_TOKENS"]
        self.max_batch_tokens = limits["MEDEIR_MAX_BATCH_TOKENS"]
        self.max_total_vectors = limits["MEDEIR_MAX_TOTAL_VECTORS"]
        self.kind = folder_kind(path or ".")
        backend = os.environ.get("MEDEIR_BACKEND", "torch").strip() or "torch"
        if backend not in BACKENDS:
            raise ValueError(f"MEDEIR_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}; fix the setting.")
        self.backend = backend
        if backend == "onnx":
            if self.kind == "multi_vector":
                raise ValueError(
                    f"MEDEIR_BACKEND=onnx serves dense models, and {path or '.'} is a late-interaction "
                    "(MultiVectorEncoder) folder: serve it with MEDEIR_BACKEND=torch."
                )
            self.model, config = _onnx_model(path or ".", os.environ.get("MEDEIR_ONNX_FILE") or ONNX_FILE)
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model_class = MultiVectorEncoder if self.kind == "multi_vector" else SentenceTransformer
            self.model = model_class(path or ".", trust_remote_code=True, device=device)
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
        self._encode_lock = threading.Lock()  # multi-vector encodes only (see the module docstring)
        if self.kind == "multi_vector":
            self._prepare_multi_vector(limit, path or ".")

    def _prepare_multi_vector(self, position_limit: int | None, path: str) -> None:
        """Each side's token limit, skiplist and query expansion as the model applies them, then a check on a few
        texts that the vector counts predicted from them are the ones the model returns."""
        transformer = self.model[0]
        expansion = getattr(transformer, "query_expansion", None)
        query_length = getattr(transformer, "query_length", None)
        if expansion is not None:  # the expansion length is the queries' width ("fixed") or their floor ("min")
            fixed = expansion["strategy"] == "fixed"
            query_length = expansion["length"] if fixed or not query_length else max(query_length, expansion["length"])
        self.expansion_length = expansion["length"] if expansion is not None else 0

        def cap(length: int | None) -> int:
            length = length or self.model.max_seq_length
            return min(length, position_limit) if position_limit else length

        self.side_tokens = {"query": cap(query_length), "document": cap(getattr(transformer, "document_length", None))}
        self.max_tokens = self.side_tokens["document"]
        mask = next((m for m in self.model if isinstance(m, MultiVectorMask)), None)
        skip = skiplist_ids(mask, self.model.tokenizer) if mask is not None else frozenset()
        self._skip = {
            side: skip if mask is not None and side in mask.skiplist_tasks else frozenset() for side in INPUT_TYPES
        }
        # the ids each side reads, cut at its limit as the model's tokenizer cuts them: for counting skiplisted tokens
        self._side_ids = {
            side: TokenCounter(self.model.tokenizer, max_length=self.side_tokens[side]) for side in INPUT_TYPES
        }
        probe = [
            "fever, cough (dry).",
            "Cholera due to Vibrio cholerae 01, biovar cholerae",
            "word " * (min(self.side_tokens["query"], 256) + 8),
        ]
        for side in INPUT_TYPES:
            prompt = self._side_prompt(side, None)
            prompted = [prompt + text for text in probe]
            tokens = [min(count, self.side_tokens[side]) for count in self.count_tokens(prompted)]
            expected = self._vector_counts(prompted, tokens, side)
            got = [len(v) for v in self._encode_multi_vector(probe, side, prompt, len(probe), None)]
            if got != expected:
                raise RuntimeError(
                    f"{path} returns {got} token vectors for {side}s where its tokenizer and settings give {expected}: "
                    "the handler cannot bound its responses (a module that changes the number of vectors, such as "
                    "token pooling, is not supported)."
                )

    def __call__(self, data: dict[str, Any]) -> dict[str, Any] | list[float]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('The request must be a JSON object with "inputs": a string or a list of strings.')
        parameters = self._parameters(data.get("parameters"))
        inputs = data["inputs"]
        if parameters["output"] == "multi_vector":
            return self._multi_vector(inputs, parameters)
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
        defaults = {"output": "dense", "similarity": False, "truncate": False, "batch_size": 32, "prompt_name": None}
        out = {**defaults, "truncate_dim": None, "precision": "float32", **given}
        self._check_output(out, given)
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

    def _check_output(self, parameters: dict[str, Any], given: dict[str, Any]) -> None:
        """The output the request asks for must be one this folder gives, with parameters that mean something for it."""
        output = parameters["output"]
        if output not in OUTPUTS:
            raise ValueError(f'Parameter "output" must be one of {", ".join(OUTPUTS)}, not "{output}".')
        if output == "multi_vector" and self.kind == "dense":
            raise ValueError(
                '"output": "multi_vector" needs a late-interaction (MultiVectorEncoder) model, and this Endpoint serves '
                'a dense (SentenceTransformer) model, which gives one embedding per text: leave "output" out.'
            )
        if output == "dense" and self.kind == "multi_vector":
            raise ValueError(
                "This Endpoint serves a late-interaction (MultiVectorEncoder) model, which gives one vector per token "
                'and no single embedding per text: pass "output": "multi_vector" (and "input_type": "query" or '
                '"document"), with "inputs" a string or a list of strings.'
            )
        if output == "dense":
            if "input_type" in given:
                raise ValueError(
                    '"input_type" applies to "output": "multi_vector" only; a dense request picks its prompt with '
                    '"prompt_name".'
                )
            return
        parameters.setdefault("input_type", "document")
        if parameters["input_type"] not in INPUT_TYPES:
            raise ValueError(
                f'Parameter "input_type" must be one of {", ".join(INPUT_TYPES)}, not "{parameters["input_type"]}".'
            )
        if parameters["similarity"]:
            raise ValueError(
                '"similarity" applies to "output": "dense" only: token vectors are scored with MaxSim (each query '
                "vector's best match among a document's, summed), which needs a query and a document; compute it "
                "from the returned vectors."
            )
        if parameters["precision"] != "float32":
            raise ValueError(
                f'"output": "multi_vector" returns float32 token vectors only, not "{parameters["precision"]}": '
                'leave "precision" out.'
            )

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
        return self._check_lengths([prompt + text for text in texts], parameters, prompt, self.max_tokens, field)

    def _check_lengths(
        self,
        prompted: list[str],
        parameters: dict[str, Any],
        prompt: str,
        limit: int,
        field: str = "inputs",
        per: str = "",
    ) -> list[int]:
        """Token counts of the prompted texts, cut at `limit` when truncating; an over-long text is refused otherwise."""
        counts = self.count_tokens(prompted)
        if not parameters["truncate"]:
            for i, count in enumerate(counts):
                if count > limit:
                    with_prompt = f" with the {parameters['prompt_name'] or 'default'} prompt" if prompt else ""
                    raise ValueError(
                        f"{field}[{i}] is {count:,} tokens long{with_prompt}; the limit is {limit:,} tokens{per} "
                        '(shorten it, or pass "truncate": true to embed its first tokens only).'
                    )
        return [min(c, limit) for c in counts]

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

    # -- multi-vector (late-interaction) output -----------------------------------------------------------------
    def _multi_vector(self, inputs: Any, parameters: dict[str, Any]) -> dict[str, Any]:
        if isinstance(inputs, dict):
            raise ValueError(
                '"output": "multi_vector" takes "inputs" as a string or a list of strings; the sentence-similarity '
                'request ("source_sentence", "sentences") is for dense models.'
            )
        side = parameters["input_type"]
        texts = self._texts(inputs, parameters["truncate"])
        self._check_total_chars(texts)
        prompt = self._side_prompt(side, parameters["prompt_name"])
        prompted = [prompt + text for text in texts]
        limit = self.side_tokens[side]
        tokens = self._check_total(self._check_lengths(prompted, parameters, prompt, limit, per=f" per {side}"))
        expected = self._vector_counts(prompted, tokens, side)
        if sum(expected) > self.max_total_vectors:
            raise ValueError(
                f"The request would return {sum(expected):,} token vectors; the limit is {self.max_total_vectors:,} "
                "per request (MEDEIR_MAX_TOTAL_VECTORS): split it into several requests."
            )
        # the model pads each batch to its longest text (a query to at least its expansion length)
        width = max(max(tokens), self.expansion_length if side == "query" else 0)
        batch_size = max(1, min(parameters["batch_size"], self.max_batch_tokens // width))
        vectors = self._encode_multi_vector(texts, side, prompt, batch_size, parameters["truncate_dim"])
        bad = [i for i, v in enumerate(vectors) if not np.isfinite(v).all()]
        if bad:
            raise RuntimeError(
                f"The model returned NaN or infinite token vectors (inputs {', '.join(map(str, bad[:10]))}): a fault "
                "of this deployment (its weights or dtype), not of the request."
            )
        got = [len(v) for v in vectors]
        if got != expected:  # checked at start-up; never send a response larger than the one that was allowed
            raise RuntimeError(f"The model returned {got} token vectors where {expected} were counted beforehand.")
        return {
            "multi_vectors": [v.tolist() for v in vectors],
            "tokens": tokens,
            "dimension": parameters["truncate_dim"] or self.dimension,
            "input_type": side,
        }

    def _side_prompt(self, side: str, prompt_name: str | None) -> str:
        """The prompt MultiVectorEncoder prepends on this side: the named one, else the side's own ("query"; for
        documents the first of "document", "passage", "corpus"), else the model's default, else none."""
        prompts = getattr(self.model, "prompts", None) or {}
        if prompt_name is None:
            names = ("query",) if side == "query" else ("document", "passage", "corpus")
            prompt_name = next((name for name in names if name in prompts), None)
        return (prompts.get(prompt_name) or "") if prompt_name is not None else self._prompt(None)

    def _vector_counts(self, prompted: list[str], tokens: list[int], side: str) -> list[int]:
        """Token vectors the model returns per prompted text that it reads as `tokens` tokens on this side: those
        tokens less the skiplisted ones, plus the query expansion tokens that fill a query up to its length."""
        skip = self._skip[side]
        if skip:
            kept = self._side_ids[side].ids(prompted)
            counts = [sum(1 for token in ids if token not in skip) for ids in kept]
        else:
            counts = list(tokens)
        if side == "query" and self.expansion_length:
            counts = [n + max(0, self.expansion_length - t) for n, t in zip(counts, tokens, strict=True)]
        return counts

    def _encode_multi_vector(
        self, texts: list[str], side: str, prompt: str, batch_size: int, truncate_dim: int | None
    ) -> list[np.ndarray]:
        """Each text's token vectors (float32, tokens x dimension) from encode_query or encode_document."""
        encode = self.model.encode_query if side == "query" else self.model.encode_document
        with self._encode_lock:
            vectors = encode(
                texts,
                prompt=prompt,
                batch_size=batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
                truncate_dim=truncate_dim,
            )
        return [np.asarray(v, dtype=np.float32) for v in vectors]
