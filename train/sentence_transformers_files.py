"""Write the sentence-transformers files next to a saved MedEIR model, so one folder loads both ways:

    AutoModel.from_pretrained(folder, trust_remote_code=True)
    SentenceTransformer(folder, trust_remote_code=True)   # Transformer -> mean Pooling -> Normalize

The type strings are sentence-transformers' legacy names, which every version (2.x to 6.x) still loads.
`trust_remote_code` is never written into these files: sentence-transformers strips it on purpose, users pass it.
"""

import json
from pathlib import Path

import sentence_transformers
import torch
import transformers


def write_sentence_transformers_files(
    model_dir: str | Path,
    hidden_size: int,
    max_seq_length: int = 8192,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
) -> list[Path]:
    """Write modules.json, sentence_bert_config.json, 1_Pooling/config.json, 2_Normalize/ and
    config_sentence_transformers.json into `model_dir`; return the paths written."""
    model_dir = Path(model_dir)
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "1_Pooling/config.json": {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
        "config_sentence_transformers.json": {
            "__version__": {
                "sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
            },
            "prompts": prompts or {},
            "default_prompt_name": default_prompt_name,
            "similarity_fn_name": "cosine",
        },
    }
    written = []
    for name, content in files.items():
        path = model_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
        written.append(path)
    (model_dir / "2_Normalize").mkdir(exist_ok=True)
    return written


def is_multi_vector_folder(path: str | Path) -> bool:
    """Whether a folder was saved by sentence-transformers' MultiVectorEncoder (a late-interaction model: its
    config_sentence_transformers.json says "model_type": "MultiVectorEncoder")."""
    config = Path(path) / "config_sentence_transformers.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "MultiVectorEncoder"
