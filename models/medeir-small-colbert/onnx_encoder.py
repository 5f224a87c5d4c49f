"""Encode with a model folder's ONNX files: what `SentenceTransformer(folder).encode` returns, on onnxruntime.

    from onnx_encoder import OnnxEncoder
    encoder = OnnxEncoder("models/medeir-small")                                  # onnx/model.onnx
    encoder = OnnxEncoder("models/medeir-small", "onnx/model_qint8_avx512_vnni.onnx")  # int8
    embeddings = encoder.encode(["fever and productive cough", "community-acquired pneumonia"])

Why it exists: sentence-transformers' own `backend="onnx"` needs optimum-onnx, whose only release (0.1.0) requires
transformers < 4.58 while sentence-transformers 6 requires transformers 5, so installing it breaks MedEIR. This
module needs only onnxruntime, tokenizers and numpy (no torch), and follows the folder's sentence-transformers
files: tokenizer.json, max_seq_length (sentence_bert_config.json), prompts (config_sentence_transformers.json),
mean pooling over the attention mask (1_Pooling, include_prompt) and Normalize when modules.json lists it.
"""

import json
import threading
from pathlib import Path

import numpy as np

DEFAULT_FILE = "onnx/model.onnx"
# The graph attends in full: every layer holds (batch, heads, length, length) fp32 scores. `encode` splits a batch so
# that batch x heads x length^2 stays within this many elements (512 MiB of scores), and runs a text longer than that
# allows (over ~3,300 tokens with 12 heads) alone, on a session without onnxruntime's memory arena: the arena grows
# by doubling, which for such tensors doubles the peak (one 8,192-token text: about 12.7 GB without it in
# `python -m evaluation.speed`, out of 24 GB with it). Short batches keep the arena, which is faster there. For long
# documents the torch model (windowed ALiBi) is faster still.
MAX_ATTENTION_ELEMENTS = 1 << 27


def session_options(arena: bool = True):
    """onnxruntime session options of OnnxEncoder (and evaluation.speed): every graph optimisation; `arena=False`
    for inputs beyond MAX_ATTENTION_ELEMENTS."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = arena
    return options


class OnnxEncoder:
    """A sentence-embedding model run by onnxruntime; `encode` mirrors SentenceTransformer.encode's numpy output."""

    def __init__(
        self,
        folder: str | Path,
        file_name: str = DEFAULT_FILE,
        providers: list[str] | None = None,
        max_attention_elements: int = MAX_ATTENTION_ELEMENTS,
    ):
        import onnxruntime
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.file_name = file_name
        self.providers = providers or ["CPUExecutionProvider"]
        self.session = onnxruntime.InferenceSession(
            str(self.folder / file_name), session_options(), providers=self.providers
        )
        self._long_session = None  # without the memory arena, made on the first text over max_attention_elements
        self._lock = threading.Lock()
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        st_config = self._json("sentence_bert_config.json")
        self.max_seq_length = int(st_config.get("max_seq_length") or 512)
        self.do_lower_case = bool(st_config.get("do_lower_case", False))
        pooling = self._json("1_Pooling/config.json") or {"pooling_mode_mean_tokens": True}
        modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"{self.folder} pools with {modes}; OnnxEncoder implements mean pooling only")
        self.include_prompt = bool(pooling.get("include_prompt", True))
        modules = self._json("modules.json") or []
        self.normalize = any(m.get("type", "").endswith("Normalize") for m in modules) if modules else True
        st = self._json("config_sentence_transformers.json")
        self.prompts: dict[str, str] = st.get("prompts") or {}
        self.default_prompt_name: str | None = st.get("default_prompt_name")
        config = self._json("config.json")
        self.dimension = int(config.get("hidden_size") or 0) or None
        self.heads = int(config.get("num_attention_heads") or 1)
        self.max_attention_elements = max_attention_elements
        # Counting needs a tokenizer that never truncates; toggling one shared tokenizer's truncation would race with
        # an encode on another thread, so the counter is a second, fixed copy (both are then safe to share).
        self.counter = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.counter.no_padding()
        self.counter.no_truncation()
        self.tokenizer.enable_truncation(self.max_seq_length)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")

    def _json(self, name: str) -> dict:
        path = self.folder / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask (int64, right-padded to the batch's longest, truncated to max_seq_length)."""
        encodings = self.tokenizer.encode_batch([t.lower() if self.do_lower_case else t for t in texts])
        return {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens per text, [CLS] and [SEP] included, before truncation; safe from any thread."""
        texts = [t.lower() if self.do_lower_case else t for t in texts]
        return [len(e.ids) for e in self.counter.encode_batch(texts)]

    def session_for(self, attention_elements: int):
        """The session for a forward whose attention scores hold `attention_elements` per layer: the pooled one
        within max_attention_elements, else (one long text) the one without a memory arena."""
        if attention_elements <= self.max_attention_elements:
            return self.session
        with self._lock:  # one second session, however many threads encode at once
            if self._long_session is None:
                import onnxruntime

                self._long_session = onnxruntime.InferenceSession(
                    str(self.folder / self.file_name), session_options(arena=False), providers=self.providers
                )
        return self._long_session

    def _batches(self, order: np.ndarray, lengths: list[int], batch_size: int):
        """Consecutive runs of `order` (longest first): at most `batch_size` texts, and at most as many as keep the
        batch's attention scores (its first text is its longest) within `max_attention_elements`; at least one."""
        start = 0
        while start < len(order):
            longest = lengths[order[start]]
            fits = max(1, self.max_attention_elements // (self.heads * longest * longest))
            yield order[start : start + min(batch_size, fits)]
            start += min(batch_size, fits)

    def get_embedding_dimension(self) -> int | None:
        """The embedding size (the encoder's hidden size), as SentenceTransformer.get_embedding_dimension."""
        return self.dimension

    def encode(
        self,
        sentences: str | list[str],
        batch_size: int = 32,
        prompt_name: str | None = None,
        prompt: str | None = None,
        normalize_embeddings: bool = False,
        **unused,
    ) -> np.ndarray:
        """(n, dim) float32 sentence embeddings (one (dim,) row for a single string), as SentenceTransformer.encode.

        Texts are batched longest first (less padding), like sentence-transformers, and long texts in smaller batches
        (MAX_ATTENTION_ELEMENTS); the order of the output is the order of the input. A prompt (by name or text) is prepended; Normalize runs when the model has it, or when
        `normalize_embeddings` asks for it.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if prompt is None:
            name = prompt_name or self.default_prompt_name
            if name is not None and name not in self.prompts:
                raise ValueError(f"Unknown prompt_name {name!r}; known: {sorted(self.prompts)}")
            prompt = self.prompts.get(name, "") if name is not None else ""
        skip = 0
        if prompt:
            texts = [prompt + t for t in texts]
            if not self.include_prompt:  # sentence-transformers: the prompt's tokens without its final [SEP]
                skip = len(self.tokenizer.encode(prompt).ids) - 1
        lengths = [min(n, self.max_seq_length) for n in self.token_counts(texts)]
        order = np.argsort([-n for n in lengths], kind="stable")
        out = np.zeros((len(texts), 0), dtype=np.float32)
        for chosen in self._batches(order, lengths, batch_size):
            features = self.tokenize([texts[i] for i in chosen])
            session = self.session_for(features["input_ids"].size * features["input_ids"].shape[1] * self.heads)
            (hidden,) = session.run(["last_hidden_state"], features)
            mask = features["attention_mask"].astype(np.float32)
            if skip:
                mask[:, :skip] = 0
            pooled = (hidden * mask[..., None]).sum(1) / np.clip(mask.sum(1, keepdims=True), 1e-9, None)
            if out.shape[1] == 0:
                out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
            out[chosen] = pooled
        if self.normalize or normalize_embeddings:
            out = out / np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
        return out[0] if single else out
